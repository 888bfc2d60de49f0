"""The dev-leak guard: no row that copies a dev-set text is trained on (``rounds.dev_set``).

A filter on the stage contract, first after the sources in every round (the first pass too),
on when rounds run with a dev set. In: the rows of the run and the dev set's texts. Out:
``dev_leak/{data,removed}``, the removed rows with reason ``dev_leak`` and ``dev_similarity``
(their highest similarity to a dev text), and the counts of exact and near copies.

A row is an exact copy when its normal form (``core.text.normalise``: NFKC, case and
whitespace folded) is a dev text's; a near copy when the Jaccard similarity of their character
5-gram sets reaches ``rounds.leak_similarity``. Dev texts are few (tens a class), so each row
is compared through an index from 5-gram to the dev texts that hold it: only dev texts sharing
a 5-gram with the row are weighed. Row by row: the driver holds one input shard at a time.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa

from anyclf_ray.core.config import ConfigError, RoundsSpec
from anyclf_ray.core.results import LeakReport, StageResult
from anyclf_ray.core.stage import Context, Decision, FilterStage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import normalise
from anyclf_ray.labels.scheme import scheme

SHINGLE = 5
REASONS = ("dev_leak",)


def shingles(text: str) -> frozenset[str]:
    """The character 5-grams of ``text``'s normal form (the whole form when shorter)."""
    form = normalise(text)
    return frozenset(form[i:i + SHINGLE] for i in range(max(1, len(form) - SHINGLE + 1)))


class DevIndex:
    """The dev texts, ready to compare rows with: their normal forms and 5-gram sets, and the
    index from 5-gram to the dev texts holding it."""

    def __init__(self, texts: list[str]):
        self.forms = {normalise(text) for text in texts}
        self.sets = [shingles(text) for text in texts]
        self.holding: dict[str, list[int]] = collections.defaultdict(list)
        for i, found in enumerate(self.sets):
            for gram in found:
                self.holding[gram].append(i)

    def similarity(self, text: str) -> tuple[bool, float]:
        """Whether ``text`` is an exact copy of a dev text, and its highest Jaccard similarity to one."""
        if normalise(text) in self.forms:
            return True, 1.0
        own = shingles(text)
        shared: collections.Counter = collections.Counter()
        for gram in own:
            shared.update(self.holding.get(gram, ()))
        best = max((n / (len(own) + len(self.sets[i]) - n) for i, n in shared.items()), default=0.0)
        return False, best


class DevLeak(FilterStage[LeakReport, DevIndex]):
    """Removes rows that copy, exactly or nearly, a text of ``rounds.dev_set``."""

    name = "dev_leak"
    section = "rounds"
    report_type = LeakReport
    card_config = "dev_checked"
    row_by_row = True

    @classmethod
    def enabled(cls, spec) -> bool:
        return spec.rounds.enabled and spec.rounds.dev_set is not None

    @property
    def settings(self) -> RoundsSpec:
        return self.spec.rounds

    @property
    def reasons(self) -> tuple[str, ...]:
        return REASONS

    def check(self, location: RunLocation) -> DevIndex:
        from anyclf_ray.training.evaluate import load_eval_set

        if self.settings.dev_set is None:
            raise ConfigError("rounds.dev_set: the dev-leak guard needs the dev set; give rounds.dev_set")
        return DevIndex(load_eval_set(self.settings.dev_set, scheme(self.spec), "rounds.dev_set").texts)

    def decide(self, ctx: Context, rows: pa.Table, index: DevIndex) -> Decision:
        found = [index.similarity(text) for text in rows["text"].to_pylist()]
        exact = np.array([copy for copy, _ in found], bool)
        similarity = np.array([value for _, value in found], np.float64)
        near = ~exact & (similarity >= self.settings.leak_similarity)
        removing = exact | near
        removed = rows.filter(pa.array(removing)).append_column(
            "dev_similarity", pa.array(similarity[removing], pa.float32()))
        removed = removed.append_column("reason", pa.array(["dev_leak"] * int(removing.sum()), pa.string()))
        return Decision(kept=rows.filter(pa.array(~removing)), removed=removed,
                        counts={"copies": [{"kind": "exact", "rows": int(exact.sum())},
                                           {"kind": "near", "rows": int(near.sum())}]},
                        fields={"dev_texts": len(index.sets)})

    def summarise(self, ctx: Context, totals: dict, rows: int, timings: dict) -> dict:
        by_kind = {row["kind"]: row["rows"] for row in totals.get("copies", [])}
        return {"exact": by_kind.get("exact", 0), "near": by_kind.get("near", 0)}

    def describe(self, result: StageResult[LeakReport]) -> str:
        found = result.report
        return (f"{self.name} {result.status}: kept {result.rows.output} of {result.rows.input} rows in "
                f"{self.folder}/ (removed {found.exact} exact and {found.near} near copies of the "
                f"{found.dev_texts} dev texts)")
