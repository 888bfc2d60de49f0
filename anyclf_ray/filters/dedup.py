"""Dedup stage: exact, then embedding near-duplicate removal, per label within each language.

A ``FilterStage`` (``stage.py``). In: the rows the stage before it committed. Out, under
``<run>/dedup/``:

- ``data/part-*.parquet``: the kept rows, same schema as the input;
- ``removed/part-*.parquet``: every removed row with ``reason`` (``exact``, ``near`` or
  ``conflict``), ``kept_id`` (the kept row it duplicates; empty for conflicts, where nothing of
  the pair is kept), ``matched_id`` (the row it matched) and their ``similarity``;
- ``embeddings/part-*.parquet``: ``id`` and L2-normalised ``embedding`` of every embedded row
  (the kept rows among them), so training can reuse them;
- ``manifest.json``, last: counts per label and reason, conflicts, settings and timings.

The rules, in order:

1. Rows are ordered by id. Texts equal after Unicode NFKC, case folding and whitespace folding
   are exact duplicates; the first row of each (language, text, label) is its *representative*.
2. Representatives are embedded, and pairs at or above ``threshold`` cosine found within each
   language (``neighbours.near_pairs``). Exact copies across labels count as pairs at 1.0.
3. A pair with different labels (in a multi-label run, different label sets) is a label
   conflict. Policy ``drop`` removes every representative in a conflict; ``keep`` leaves them
   and only counts them.
4. Among the remaining representatives of each label, a row is kept unless it is near an earlier
   kept row (``neighbours.greedy_keepers``), so the keeper is deterministic and every removed
   row has a kept twin above the threshold.
5. A row that is not a representative shares its representative's fate; if the representative
   is kept, the row is removed as its exact copy.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from anyclf_ray.core import cards, embed, runtime
from anyclf_ray.core.config import DedupSpec, JobSpec
from anyclf_ray.core.results import Conflicts, DedupReport, StageResult
from anyclf_ray.core.stage import Context, Decision, FilterStage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import normalise
from anyclf_ray.filters import neighbours

log = logging.getLogger(__name__)

REASONS = ("exact", "near", "conflict")
AUDIT_FIELDS = [
    pa.field("reason", pa.string()),
    pa.field("kept_id", pa.string()),
    pa.field("matched_id", pa.string()),
    pa.field("similarity", pa.float32()),
]


def _best_partner(ends: np.ndarray, partners: np.ndarray, sims: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each index in ``ends``, its most similar partner and that similarity."""
    partner, similarity = np.full(size, -1, np.int64), np.full(size, np.nan, np.float32)
    order = np.lexsort((-sims, ends))
    unique_ends, first = np.unique(ends[order], return_index=True)
    partner[unique_ends], similarity[unique_ends] = partners[order][first], sims[order][first]
    return partner, similarity


def decide(rows: pa.Table, embed_texts: Callable[[list[str]], np.ndarray], spec: JobSpec) -> dict:
    """Apply the module's rules to ``rows`` (sorted by id); return the kept/removed split.

    The result holds ``kept`` and ``removed`` tables, the representatives' ``embedded_ids`` and
    ``embeddings``, the ``conflict_pairs`` count and per-step ``timings``.
    """
    settings = spec.dedup
    timings, started = {}, time.perf_counter()
    n = rows.num_rows
    texts = rows["text"].to_pylist()
    frame = pd.DataFrame(
        {"language": rows["language"].to_pylist(), "norm": [normalise(t) for t in texts],
         "label": rows[spec.label_column].to_pylist()}
    )
    group = frame.groupby(["language", "norm", "label"], sort=False).ngroup().to_numpy()
    first_row = np.full(group.max() + 1, n, np.int64)
    np.minimum.at(first_row, group, np.arange(n))
    representative = first_row[group]  # row index of each row's representative
    reps = np.flatnonzero(representative == np.arange(n))
    position = np.full(n, -1, np.int64)
    position[reps] = np.arange(len(reps))
    timings["exact"] = time.perf_counter() - started

    started = time.perf_counter()
    vectors = embed_texts([texts[r] for r in reps])
    timings["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    rep_language = frame["language"].to_numpy()[reps]
    rep_label = frame["label"].to_numpy()[reps]
    lefts, rights, sims = [], [], []
    for language in np.unique(rep_language):
        members = np.flatnonzero(rep_language == language)
        left, right, sim = neighbours.near_pairs(
            vectors[members], settings.threshold, settings.partition_size, settings.probes, settings.seed
        )
        lefts.append(members[left])
        rights.append(members[right])
        sims.append(sim)
    # Representatives with the same normalised text (so different labels) pair at 1.0.
    same_text = frame.iloc[reps].groupby(["language", "norm"], sort=False).ngroup().to_numpy()
    shared = np.flatnonzero(pd.Series(same_text).duplicated(keep=False).to_numpy())
    exact_pairs = [
        pair
        for _, members in pd.Series(shared).groupby(same_text[shared])
        for pair in itertools.combinations(members.tolist(), 2)
    ]
    if exact_pairs:
        pairs = np.asarray(exact_pairs, np.int64)
        lefts.append(pairs[:, 0])
        rights.append(pairs[:, 1])
        sims.append(np.ones(len(pairs), np.float32))
    left, right, sim = np.concatenate(lefts), np.concatenate(rights), np.concatenate(sims)
    # A pair found both as exact text and by embedding is one pair.
    order = np.argsort(-sim, kind="stable")
    _, first = np.unique(left[order] * len(reps) + right[order], return_index=True)
    left, right, sim = left[order][first], right[order][first], sim[order][first]
    cross = rep_label[left] != rep_label[right]
    conflicted = np.zeros(len(reps), bool)
    if settings.conflicts == "drop":
        conflicted[left[cross]] = conflicted[right[cross]] = True
    partner, partner_sim = _best_partner(
        np.concatenate([left[cross], right[cross]]), np.concatenate([right[cross], left[cross]]),
        np.concatenate([sim[cross], sim[cross]]), len(reps),
    )
    within = ~cross & ~conflicted[left] & ~conflicted[right]
    rep_kept, kept_by, kept_sim = neighbours.greedy_keepers(len(reps), left[within], right[within], sim[within])
    rep_kept &= ~conflicted
    timings["near"] = time.perf_counter() - started

    # Every row's fate, from its representative's.
    rep_reason = np.where(conflicted, "conflict", np.where(rep_kept, "", "near")).astype(object)
    rep_matched = np.where(conflicted, partner, kept_by)
    rep_similarity = np.where(conflicted, partner_sim, kept_sim)
    ids = np.asarray(rows["id"].to_pylist(), dtype=object)
    p = position[representative]
    is_rep = representative == np.arange(n)
    copy_of_kept = ~is_rep & rep_kept[p]
    kept = is_rep & rep_kept[p]
    reason = np.where(copy_of_kept, "exact", rep_reason[p])
    matched_row = np.where(copy_of_kept, representative, reps[np.maximum(rep_matched[p], 0)])
    similarity = np.where(copy_of_kept, np.float32(1.0), rep_similarity[p])
    removed_mask = ~kept
    audit = {
        "reason": reason[removed_mask].tolist(),
        "kept_id": [None if r == "conflict" else m
                    for r, m in zip(reason[removed_mask], ids[matched_row[removed_mask]])],
        "matched_id": ids[matched_row[removed_mask]].tolist(),
        "similarity": similarity[removed_mask].astype(np.float32),
    }
    removed = rows.filter(pa.array(removed_mask))
    for field in AUDIT_FIELDS:
        removed = removed.append_column(field, pa.array(audit[field.name], field.type))
    return {
        "kept": rows.filter(pa.array(kept)),
        "removed": removed,
        "embedded_ids": ids[reps].tolist(),
        "embeddings": vectors,
        "conflict_pairs": int(cross.sum()),
        "timings": timings,
    }


class Dedup(FilterStage[DedupReport, None]):
    """The dedup stage on the stage contract: ``decide`` above, with embeddings kept for reuse."""

    name = "dedup"
    section = "dedup"
    report_type = DedupReport
    card_config = "deduplicated"

    @property
    def settings(self) -> DedupSpec:
        return self.spec.dedup

    @property
    def reasons(self) -> tuple[str, ...]:
        return REASONS

    def check(self, location: RunLocation) -> None:
        embed.check_model(self.settings.model, "dedup.model")

    def decide(self, ctx: Context, rows: pa.Table, checked: None) -> Decision:
        settings = self.settings
        placement = runtime.resolve_placement(settings, "dedup")
        log.info("dedup: %d rows with %s on %s", rows.num_rows, settings.model, placement.device)
        result = decide(rows, lambda texts: embed.embed(texts, settings.model, placement, settings.batch_size),
                        self.spec)
        removed = result["removed"]
        embeddings = embed.embeddings_table(result["embedded_ids"], result["embeddings"], settings.model)
        return Decision(
            kept=result["kept"],
            removed=removed,
            fields={"conflicts": Conflicts(policy=settings.conflicts, pairs=result["conflict_pairs"],
                                           rows_removed=removed["reason"].to_pylist().count("conflict"))},
            embeddings=embed.write_embeddings(ctx.location, self.data_path("embeddings"), embeddings,
                                              self.spec.output.rows_per_shard),
            timings=result["timings"],
        )

    def describe(self, result: StageResult[DedupReport]) -> str:
        model = cards.shown(self.settings.model)
        return f"{super().describe(result)} at cosine {self.settings.threshold} with `{model}`"
