"""The stage contract: what every step of a run shares, written once.

A stage reads the committed output of the stage before it and writes its own under
``<run>/<folder>/``, its ``manifest.json`` last: that file is the stage's completion mark. Its
fingerprint is a digest of its input's fingerprint and of its settings' deciding fields
(``config.decisive``), so a stage is skipped exactly when its output for this input and these
settings is already committed, and redone (after clearing a stale attempt) otherwise.

``Stage`` does the chain, skip-when-done, clearing, timings and the manifest; a subclass says
what it checks before any cluster time (``check``) and what it does (``execute``).
``FilterStage`` is a stage that keeps or removes rows, each removed row with its ``reason``:
the base reads the input shards (one at a time for a ``row_by_row`` filter, so the driver
never holds the run's rows), writes ``data/`` and ``removed/``, counts kept and removed rows
per label, language and reason, and adds the stage's config to the dataset card. A new filter is one
module with a ``decide`` method, one spec section and one line in ``pipeline.STAGES``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import logging
import time
from collections.abc import Callable
from typing import ClassVar

import pyarrow as pa

from anyclf_ray.core import manifest as cards
from anyclf_ray.core.config import JobSpec, StageSpec, decisive, digest
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.llm.pool import EnginePool

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Context:
    """What a stage runs with: the spec, the run's folder, the run's engine pool (started on
    first use by ``engines()``) and the stages finished so far, in order, with their manifests."""

    spec: JobSpec
    location: RunLocation
    start_engines: Callable[[], EnginePool]
    finished: list[tuple[Stage, dict]] = dataclasses.field(default_factory=list)
    pool: EnginePool | None = None
    # Generation asks again for what failed in its committed parts (``--retry-failures``).
    retry_failures: bool = False

    def engines(self) -> EnginePool:
        if self.pool is None:
            self.pool = self.start_engines()
        return self.pool

    def close_engines(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def engine_figures(self) -> dict:
        return self.pool.figures() if self.pool else {"starts": 0}

    def write_card(self, stage: Stage | None = None, manifest: dict | None = None) -> None:
        """The dataset card, from the finished stages plus the one about to commit."""
        stages = self.finished + ([(stage, manifest)] if stage else [])
        self.location.write_bytes("README.md", cards.card(self.spec, self.location.run_id, stages).encode())


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def input_of(upstream: dict | None) -> dict | None:
    """What a stage's manifest records of the input it read: a later stage's output is stale
    when this no longer matches its input's manifest."""
    return {key: upstream[key] for key in ("stage", "fingerprint", "finished_at")} if upstream else None


class Stage:
    """One step of a run. Subclasses set ``name`` and ``section`` and define ``execute``."""

    name: ClassVar[str]
    # The spec section holding this stage's settings (a ``StageSpec``).
    section: ClassVar[str]
    uses_llm: ClassVar[bool] = False
    # A dataset-card config for this stage's data/, if it writes rows.
    card_config: ClassVar[str | None] = None
    # A report reads its input and writes figures only: the next stage reads the same input,
    # and its fingerprint is not chained from the report's (a report setting redoes no work).
    report_only: ClassVar[bool] = False

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @classmethod
    def enabled(cls, spec: JobSpec) -> bool:
        return getattr(spec, cls.section).enabled

    @property
    def settings(self) -> StageSpec:
        return getattr(self.spec, self.section)

    @property
    def folder(self) -> str:
        return self.name

    @property
    def manifest_path(self) -> str:
        return f"{self.folder}/manifest.json"

    # Folders cleared before the stage runs, so a stale attempt never mixes in or passes for done.
    @property
    def clears(self) -> tuple[str, ...]:
        return (self.folder,)

    def data_path(self, shard: str) -> str:
        return f"{self.folder}/{shard}"

    def fingerprint(self, upstream: str | None) -> str:
        return digest({"input": upstream, "stage": self.name, "settings": decisive(self.settings)})

    def check(self, location: RunLocation) -> None:
        """Refuse (ConfigError) settings or inputs that cannot work, before Ray starts."""

    def done(self, location: RunLocation, fingerprint: str, upstream: dict | None) -> dict | None:
        """This stage's manifest if its output for ``fingerprint`` is committed, from the input
        committed now (``upstream``: its manifest; None for the first stage): an input redone
        since, even with the same settings (a retry of failures), makes the output stale."""
        if location.exists(self.manifest_path):
            found = location.read_json(self.manifest_path)
            if found.get("fingerprint") == fingerprint and found["input"] == input_of(upstream):
                return found
        return None

    def retries(self, manifest: dict) -> bool:
        """Whether ``--retry-failures`` redoes this stage's committed output (``manifest``)."""
        return False

    def execute(self, ctx: Context, upstream: dict | None) -> dict:
        """Do the work; return the stage's own manifest fields (``timings_s`` optional)."""
        raise NotImplementedError

    def describe(self, manifest: dict) -> str:
        """One line for the console and the dataset card."""
        return f"{self.name} complete"

    def card_section(self, manifest: dict) -> str:
        """Markdown the dataset card shows for this stage, beyond its ``describe`` line."""
        return ""

    def run(self, ctx: Context, upstream: dict | None, fingerprint: str) -> dict:
        """Clear, execute, then write the card and the manifest (last)."""
        started = time.perf_counter()
        for folder in self.clears:
            ctx.location.delete(folder)
        fields = self.execute(ctx, upstream)
        timings = {**fields.pop("timings_s", {}), "total": time.perf_counter() - started}
        manifest = {
            "run_id": ctx.location.run_id,
            "stage": self.name,
            "status": fields.pop("status", "complete"),
            "finished_at": now(),
            "fingerprint": fingerprint,
            "input": input_of(upstream),
            "settings": self.settings.model_dump(),
            **({"warnings": warnings} if (warnings := ctx.spec.warnings()) else {}),
            **fields,
            "timings_s": {step: round(seconds, 3) for step, seconds in timings.items()},
        }
        ctx.write_card(self, manifest)
        ctx.location.write_json(self.manifest_path, manifest)
        return manifest


def read_rows(location: RunLocation, shards: list[str], columns: list[str] | None = None) -> pa.Table:
    """The rows of ``shards`` as one table sorted by id (footer metadata dropped)."""
    tables = [location.read_table(s, columns=columns).replace_schema_metadata(None) for s in shards]
    return pa.concat_tables(tables).sort_by("id")


@dataclasses.dataclass
class Decision:
    """What a filter decided: the rows kept, the rows removed with a ``reason`` column (and any
    audit columns), the manifest fields the filter adds, other shards it wrote, its step timings,
    and ``counts`` (tables of ``manifest.counts``) that the base adds up over the input shards
    of a ``row_by_row`` filter and hands to its ``summarise``."""

    kept: pa.Table
    removed: pa.Table
    fields: dict = dataclasses.field(default_factory=dict)
    shards: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    counts: dict[str, list[dict]] = dataclasses.field(default_factory=dict)


def added(*tables: list[dict]) -> list[dict]:
    """Tables of ``manifest.counts`` added up, in its order."""
    total: collections.Counter = collections.Counter()
    for row in itertools.chain(*tables):
        total[tuple((key, value) for key, value in row.items() if key != "rows")] += row["rows"]
    return sorted(({**dict(key), "rows": n} for key, n in total.items()),
                  key=lambda row: [value for key, value in row.items() if key != "rows"])


class FilterStage(Stage):
    """A stage that keeps or removes rows of its input; subclasses define ``decide`` and ``reasons``."""

    reasons: ClassVar[tuple[str, ...]]
    # A filter whose verdict on a row depends on that row alone: the base hands ``decide`` one
    # input shard at a time, so the driver holds a shard, never the run's rows. Such a filter
    # reports through ``Decision.counts`` and ``summarise``; its ``fields`` and ``shards`` are
    # its last shard's.
    row_by_row: ClassVar[bool] = False

    @property
    def required_columns(self) -> tuple[str, ...]:
        return "id", "text", self.spec.label_column, "language"

    def input_shards(self, location: RunLocation, upstream: dict) -> list[str]:
        """The input's data shards that hold rows (a generation part whose requests all failed
        holds none), checked from their footers."""
        holding = []
        for shard in upstream["shards"]["data"]:
            footer = location.read_footer(shard)
            missing = [c for c in self.required_columns if c not in footer.schema.names]
            if missing:
                raise ConfigError(
                    f"run_id: shard {shard} has no {missing[0]!r} column; {self.name} reads rows "
                    f"with columns {list(self.required_columns)}"
                )
            if footer.num_rows:
                holding.append(shard)
        if not holding:
            raise ConfigError(f"run_id: the run at {location.uri()} has no rows for {self.name}; nothing to do")
        return holding

    def decide(self, ctx: Context, rows: pa.Table) -> Decision:
        raise NotImplementedError

    def summarise(self, ctx: Context, totals: dict[str, list[dict]], rows: int, timings: dict) -> dict:
        """Manifest fields from every shard's ``Decision.counts`` added up (``totals``), the
        ``rows`` read in all and the summed ``timings``: by default the totals themselves."""
        return totals

    def execute(self, ctx: Context, upstream: dict) -> dict:
        location, label, per_shard = ctx.location, self.spec.label_column, self.spec.output.rows_per_shard
        shards = self.input_shards(location, upstream)
        groups = [[shard] for shard in shards] if self.row_by_row else [shards]
        written: dict[str, list[str]] = {"data": [], "removed": []}
        total: dict[str, list[dict]] = {}
        timings: collections.Counter = collections.Counter()
        for group in groups:
            rows = read_rows(location, group)
            decision = self.decide(ctx, rows)
            kept, removed = decision.kept, decision.removed
            if kept.num_rows + removed.num_rows != rows.num_rows:
                raise AssertionError(f"{self.name}: kept + removed ({kept.num_rows} + {removed.num_rows}) "
                                     f"!= input {rows.num_rows}")
            for folder, table in (("data", kept), ("removed", removed)):
                # A shard's empty side is left out, but every folder gets a shard (its schema).
                if table.num_rows or (group is groups[-1] and not written[folder]):
                    written[folder] += location.write_shards(self.data_path(folder), table, per_shard,
                                                             first=len(written[folder]))
            tally = {"input_language": cards.counts(rows, ["language"]),
                     "by_label_reason": cards.counts(removed, [label, "reason"]),
                     "by_language_reason": cards.counts(removed, ["language", "reason"]),
                     "kept_by_label": cards.counts(kept, [label]),
                     **decision.counts}
            total = {name: added(total.get(name, []), table) for name, table in tally.items()}
            timings.update(decision.timings)
        # Removed rows by reason and by language, from the (language, reason) counts.
        reasons, removed_by = collections.Counter(), collections.Counter()
        for row in total["by_language_reason"]:
            reasons[row["reason"]] += row["rows"]
            removed_by[row["language"]] += row["rows"]
        by_language = total.pop("input_language")
        n_input, n_removed = sum(row["rows"] for row in by_language), sum(reasons.values())
        return {
            "output": location.uri(self.folder),
            "rows": {"input": n_input, "kept": n_input - n_removed, "removed": n_removed},
            "removed": {
                "by_reason": {reason: reasons[reason] for reason in self.reasons},
                "by_label_reason": total.pop("by_label_reason"),
                "by_language_reason": total.pop("by_language_reason"),
            },
            "languages": [
                {"language": row["language"], "input": row["rows"], "removed": removed_by[row["language"]],
                 "removed_share": round(removed_by[row["language"]] / row["rows"], 4)}
                for row in by_language
            ],
            "kept_by_label": total.pop("kept_by_label"),
            **decision.fields,
            **self.summarise(ctx, total, n_input, dict(timings)),
            "shards": {**written, **decision.shards},
            "timings_s": dict(timings),
        }

    def describe(self, manifest: dict) -> str:
        rows, reasons = manifest["rows"], manifest["removed"]["by_reason"]
        removed = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        return f"{self.name} {manifest['status']}: kept {rows['kept']} of {rows['input']} rows at {manifest['output']} (removed {removed})"
