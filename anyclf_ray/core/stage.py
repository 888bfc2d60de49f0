"""The stage contract: what every step of a run shares, written once.

A stage reads the rows its input committed and writes its own under ``<run>/<folder>/``, its
``manifest.json`` (a ``results.StageResult``) last: that file is the stage's completion mark.
Its fingerprint is a digest of its input's fingerprint and of its settings' deciding fields
(``config.decisive``), so a stage is skipped exactly when its output for this input and these
settings is already committed, and redone (after clearing a stale attempt) otherwise.

The kinds of stage:

- a ``SourceStage`` writes the run's rows from nothing before it (generation; the rows of the
  run are every source's), and resumes rather than redoes: its committed parts are kept;
- a ``FilterStage`` keeps or removes rows, each removed row with its ``reason``: the base reads
  the input shards (one at a time for a ``row_by_row`` filter, so the driver never holds the
  run's rows), writes ``data/`` and ``removed/`` and counts kept and removed rows per label,
  language and reason; a new filter is one module with a ``decide`` method, one spec section
  and one line in ``pipeline.STAGES``;
- a report (``report_only``) reads rows and writes figures: the next stage reads the same input;
- training reads the rows and writes a model.

``check`` refuses what cannot work before any cluster time and returns what ``execute`` needs;
``execute`` does the work and returns an ``Outcome``; ``run`` clears, executes and commits.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import BaseModel

from anyclf_ray.core import results, runtime
from anyclf_ray.core.config import ConfigError, JobSpec, decisive, digest
from anyclf_ray.core.ids import stable_id
from anyclf_ray.core.results import (
    CountTable,
    EmbeddingsRef,
    EngineFigures,
    FilterReport,
    InputRef,
    LanguageRemovals,
    Removals,
    Rows,
    Shards,
    StageResult,
)
from anyclf_ray.core.storage import STAGING, RunLocation

R = TypeVar("R", bound=results.Model)
# Where the error-driven rounds write: ``rounds/<k>/`` for round k.
ROUNDS_FOLDER = "rounds"
F = TypeVar("F", bound=FilterReport)
Checked = TypeVar("Checked")


class Engines(Protocol):
    """The run's engine pool as stages use it (``llm.pool.EnginePool``)."""

    def answer_table(self, requests: pa.Table, name: str) -> pa.Table: ...

    def figures(self) -> EngineFigures: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Context:
    """What a stage runs with: the spec, the run's folder, the run's engine pool (started on
    first use by ``engines()``), the results of the stages finished so far, in order."""

    spec: JobSpec
    location: RunLocation
    start_engines: Callable[[], Any]
    finished: list[StageResult] = dataclasses.field(default_factory=list)
    pool: Any = None
    # A source asks again for what failed in its committed parts (``--retry-failures``).
    retry_failures: bool = False
    # Whether the running stage is the last of its round to ask the engines (``release_engines``).
    last_llm_stage: bool = False

    def engines(self) -> Any:
        """The run's ``llm.pool.EnginePool``, started on first use."""
        if self.pool is None:
            self.pool = self.start_engines()
        return self.pool

    def close_engines(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def release_engines(self) -> None:
        """The running stage's LLM passes are over: its work after them (embedding actors, Ray
        Data tasks) gets the engines' cores, unless a later stage of its round asks them."""
        if self.last_llm_stage:
            self.close_engines()

    def engine_figures(self) -> EngineFigures:
        return self.pool.figures() if self.pool else EngineFigures()


@dataclasses.dataclass
class Outcome(Generic[R]):
    """What ``execute`` returns: the stage's report and what ``run`` commits beside it."""

    report: R
    rows: Rows
    output: str
    shards: Shards = dataclasses.field(default_factory=Shards)
    embeddings: EmbeddingsRef | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    status: str = "complete"


class Input:
    """The committed results a stage reads: the stage before it, or every source of the run."""

    def __init__(self, found: list[StageResult]):
        self.results = found

    @property
    def data(self) -> list[str]:
        """The rows' shards, every source's in a row."""
        return [shard for found in self.results for shard in found.shards.data]

    @property
    def refs(self) -> list[InputRef]:
        return [found.ref for found in self.results]

    @property
    def stage(self) -> str:
        return "+".join(found.stage for found in self.results)

    @property
    def rows(self) -> int:
        return sum(found.rows.output for found in self.results)


def input_fingerprint(fingerprints: list[str]) -> str | None:
    """One fingerprint for what a stage reads: its input's, or a digest of several sources'."""
    if len(fingerprints) < 2:
        return fingerprints[0] if fingerprints else None
    return digest(sorted(fingerprints))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Stage(Generic[R, Checked]):
    """One step of a run. Subclasses set ``name``, ``section`` and ``report_type`` and define
    ``execute``."""

    name: ClassVar[str]
    # The spec section holding this stage's settings (a ``StageSpec``).
    section: ClassVar[str]
    report_type: ClassVar[type[Any]]
    # A dataset-card config for this stage's data/, if it writes rows.
    card_config: ClassVar[str | None] = None
    # A source writes the run's rows; it has no input and resumes what it committed.
    source: ClassVar[bool] = False
    # A report reads its input and writes figures only: the next stage reads the same input,
    # and its fingerprint is not chained from the report's (a report setting redoes no work).
    report_only: ClassVar[bool] = False
    # The error-driven round the stage runs in (``rounds/``): 0 for the run's first pass; a later
    # round's stage is named and writes under ``rounds/<k>/`` (``in_round``).
    round: ClassVar[int] = 0

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @classmethod
    def in_round(cls, k: int) -> type[Stage]:
        """This stage as it runs in round ``k``: named ``rounds/<k>/<name>`` (so its folder is
        that too), with its own dataset-card config."""
        config = f"{cls.card_config}_round_{k}" if cls.card_config else None
        return type(f"{cls.__name__}Round{k}", (cls,), {"name": f"{ROUNDS_FOLDER}/{k}/{cls.name}", "round": k,
                                                       "card_config": config, "__module__": cls.__module__})

    @property
    def prefix(self) -> str:
        """What this stage's fixed paths (a model, its evaluation) start with: ``rounds/<k>/``
        in a later round, nothing in the first."""
        return f"{ROUNDS_FOLDER}/{self.round}/" if self.round else ""

    @classmethod
    def enabled(cls, spec: JobSpec) -> bool:
        return getattr(spec, cls.section).enabled

    @property
    def settings(self) -> BaseModel:
        """The spec's part that decides this stage's output (its section; a source: the whole spec)."""
        return getattr(self.spec, self.section)

    @property
    def uses_llm(self) -> bool:
        """Whether the stage asks the run's engines (they start before it and stay up for it)."""
        return False

    @property
    def folder(self) -> str:
        """Where the stage writes, under the run folder ("" for the run folder itself)."""
        return self.name

    @property
    def command(self) -> str:
        """The CLI command that runs this stage alone."""
        return self.name.replace("_", "-")

    @property
    def manifest_path(self) -> str:
        return self.data_path("manifest.json")

    @property
    def clears(self) -> tuple[str, ...]:
        """Folders cleared before the stage runs, so a stale attempt never mixes in or passes for
        done; a source keeps its committed parts, and clears only what a crash left half-written:
        staged files never renamed into place."""
        return (STAGING,) if self.source else (self.folder,)

    def data_path(self, shard: str) -> str:
        return f"{self.folder}/{shard}" if self.folder else shard

    def fingerprint(self, upstream: str | None) -> str:
        return digest({"input": upstream, "stage": self.name, "settings": decisive(self.settings)})

    def check(self, location: RunLocation) -> Checked:
        """Refuse (ConfigError) settings or inputs that cannot work, before Ray starts; return
        what ``execute`` needs of them."""
        return None  # type: ignore[return-value]

    def longest_requests(self) -> dict[str, pa.Table]:
        """The stage's LLM passes, each with its longest requests, by pass name (``llm.budgets``
        checks them against the model's context before Ray starts)."""
        return {}

    def read(self, location: RunLocation) -> StageResult[R] | None:
        """This stage's committed result, if any."""
        if not location.exists(self.manifest_path):
            return None
        return results.read(location.read_bytes(self.manifest_path), self.report_type, location.uri(self.manifest_path))

    def done(self, location: RunLocation, fingerprint: str, upstream: Input | None) -> StageResult[R] | None:
        """This stage's result if its output for ``fingerprint`` is committed, from the input
        committed now (``upstream``; None for a source): an input redone since, even with the
        same settings (a retry of failures), makes the output stale."""
        found = self.read(location)
        refs = upstream.refs if upstream else []
        if found and found.fingerprint == fingerprint and found.inputs == refs:
            return found
        return None

    def retries(self, result: StageResult[R]) -> bool:
        """Whether ``--retry-failures`` redoes this stage's committed ``result``."""
        return False

    def execute(self, ctx: Context, upstream: Input | None, checked: Checked) -> Outcome[R]:
        raise NotImplementedError

    def describe(self, result: StageResult[R]) -> str:
        """One line for the console and the dataset card; it names folders relative to the run
        folder (a card is published, the machine's paths are not; the run logs its folder)."""
        return f"{self.name} {result.status}"

    def card_section(self, result: StageResult[R]) -> str:
        """Markdown the dataset card shows for this stage, beyond its ``describe`` line."""
        return ""

    def run(self, ctx: Context, upstream: Input | None, fingerprint: str, checked: Checked) -> StageResult[R]:
        """Clear, execute, then commit the result (its manifest, last)."""
        started = time.perf_counter()
        for folder in self.clears:
            ctx.location.delete(folder)
        outcome = self.execute(ctx, upstream, checked)
        timings = {**outcome.timings, "total": time.perf_counter() - started}
        result = results.result_type(self.report_type)(
            run_id=ctx.location.run_id, stage=self.name, status=outcome.status, finished_at=now(),
            fingerprint=fingerprint, inputs=upstream.refs if upstream else [], settings=self.settings.model_dump(),
            output=outcome.output, rows=outcome.rows, shards=outcome.shards, embeddings=outcome.embeddings,
            timings_s={step: round(seconds, 3) for step, seconds in timings.items()}, warnings=ctx.spec.warnings(),
            report=outcome.report,
        )
        return result

    def commit(self, location: RunLocation, result: StageResult[R]) -> None:
        location.write_bytes(self.manifest_path, result.model_dump_json(indent=2).encode())


class SourceStage(Stage[R, Checked]):
    """A stage that writes the run's rows from nothing before it, as committed parts it resumes
    from (``sources.parts``)."""

    source = True


def read_shards(location: RunLocation, shards: list[str], columns: list[str] | None = None) -> pa.Table:
    """``columns`` (all by default) of ``shards`` as one table in shard order, footer metadata dropped."""
    return pa.concat_tables([location.read_table(s, columns=columns).replace_schema_metadata(None) for s in shards])


def read_rows(location: RunLocation, shards: list[str], columns: list[str] | None = None) -> pa.Table:
    """The rows of ``shards`` as one table sorted by id (footer metadata dropped)."""
    return read_shards(location, shards, columns).sort_by("id")


@dataclasses.dataclass
class Decision:
    """What a filter decided: the rows kept, the rows removed with a ``reason`` column (and any
    audit columns), the report fields the filter adds, other shards it wrote (its embeddings),
    its step timings and ``counts`` (``results.counts`` tables) that the base adds up over the
    input shards of a ``row_by_row`` filter and hands to its ``summarise``; and whether it is
    ``incomplete`` (a method could not judge the rows)."""

    kept: pa.Table
    removed: pa.Table
    fields: dict = dataclasses.field(default_factory=dict)
    embeddings: EmbeddingsRef | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    counts: dict[str, CountTable] = dataclasses.field(default_factory=dict)
    incomplete: bool = False


def split_block(batch: pa.Table, location: RunLocation, folder: str, sides: dict[str, pa.Schema],
                stage: FilterStage) -> dict[str, list]:
    """Ray Data function: a block of rows joined with their verdicts, as the ``stage`` writes
    them (``amended``), written as a kept (``data``) and a ``removed`` shard of the ``sides``'
    schemas (an empty one left out); their paths and the block's ``tally`` (JSON)."""
    batch = stage.amended(batch)
    removed_mask = pc.is_valid(batch["reason"])
    ids = batch["id"].to_pylist()
    name = f"part-{stable_id(len(ids), min(ids), max(ids))}.parquet"
    tables = {"data": batch.filter(pc.invert(removed_mask)), "removed": batch.filter(removed_mask)}
    written = {}
    for side, schema in sides.items():
        table = tables[side] = tables[side].select(schema.names).cast(schema)
        written[side] = [f"{folder}/{side}/{name}" if table.num_rows else ""]
        if table.num_rows:
            location.write_table(written[side][0], table)
    return {**written, "tally": [json.dumps(stage.tally(batch, tables["data"], tables["removed"]))]}


class FilterStage(Stage[F, Checked]):
    """A stage that keeps or removes rows of its input; subclasses define ``decide`` and ``reasons``."""

    # A filter whose verdict on a row depends on that row alone: the base hands ``decide`` one
    # input shard at a time, so the driver holds a shard, never the run's rows. Such a filter
    # reports through ``Decision.counts`` and ``summarise``; its ``fields`` are its last shard's.
    row_by_row: ClassVar[bool] = False

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the filter removes a row: the values of its ``reason`` column."""
        raise NotImplementedError

    @property
    def required_columns(self) -> tuple[str, ...]:
        return "id", "text", self.spec.label_column, "language"

    def input_shards(self, location: RunLocation, upstream: Input) -> list[str]:
        """The input's data shards that hold rows (a generation part whose requests all failed
        holds none), checked from their footers."""
        holding = []
        for shard in upstream.data:
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

    def decide(self, ctx: Context, rows: pa.Table, checked: Checked) -> Decision:
        raise NotImplementedError

    def summarise(self, ctx: Context, totals: dict[str, CountTable], rows: int, timings: dict) -> dict:
        """Report fields from every shard's ``Decision.counts`` added up (``totals``), the
        ``rows`` read in all and the summed ``timings``: by default the totals themselves."""
        return totals

    def execute(self, ctx: Context, upstream: Input | None, checked: Checked) -> Outcome[F]:
        assert upstream is not None
        location, per_shard = ctx.location, self.spec.output.rows_per_shard
        shards = self.input_shards(location, upstream)
        groups = [[shard] for shard in shards] if self.row_by_row else [shards]
        written: dict[str, list[str]] = {"data": [], "removed": []}
        total: dict[str, CountTable] = {}
        timings: collections.Counter = collections.Counter()
        incomplete = False
        decision = None
        for group in groups:
            rows = read_rows(location, group)
            decision = self.decide(ctx, rows, checked)
            kept, removed = decision.kept, decision.removed
            if kept.num_rows + removed.num_rows != rows.num_rows:
                raise AssertionError(f"{self.name}: kept + removed ({kept.num_rows} + {removed.num_rows}) "
                                     f"!= input {rows.num_rows}")
            for folder, table in (("data", kept), ("removed", removed)):
                # A shard's empty side is left out, but every folder gets a shard (its schema).
                if table.num_rows or (group is groups[-1] and not written[folder]):
                    written[folder] += location.write_shards(self.data_path(folder), table, per_shard,
                                                             first=len(written[folder]))
            tally = {**self.tally(rows, kept, removed), **decision.counts}
            total = {name: results.added(total.get(name, []), table) for name, table in tally.items()}
            timings.update(decision.timings)
            incomplete |= decision.incomplete
        assert decision is not None
        return self.outcome(ctx, total, decision.fields, Shards(**written), decision.embeddings, dict(timings),
                            incomplete)

    def split(self, ctx: Context, shards: list[str], verdicts: ray.data.Dataset, audit: list[pa.Field],
              kept_audit: tuple[str, ...] = (), partitions: int = 1) -> tuple[Shards, dict[str, CountTable]]:
        """The input ``shards`` split on the cluster by ``verdicts`` (``id``, ``reason``: null for a
        kept row, and the ``audit`` columns; rows without one are kept): a Ray Data join on ``id``
        in ``partitions`` hash partitions, then each block written as a kept shard (the input's
        columns and ``kept_audit``) and a removed one (the input's and every ``audit`` column).
        The shards written and the ``tally`` tables added up; the driver holds neither rows nor
        verdicts."""
        location = ctx.location
        schema = location.read_footer(shards[0]).schema.to_arrow_schema().remove_metadata()
        sides = {"data": pa.schema([*schema, *(f for f in audit if f.name in kept_audit)]),
                 "removed": pa.schema([*schema, *audit])}
        rows = ray.data.read_parquet([location.path(shard) for shard in shards], filesystem=location.fs)
        split = rows.join(verdicts, "left_outer", partitions, on=("id",)).repartition(
            target_num_rows_per_block=self.spec.output.rows_per_shard).map_batches(
            functools.partial(split_block, location=location, folder=self.folder, sides=sides, stage=self),
            batch_size=None, batch_format="pyarrow", num_cpus=runtime.TASK_CPUS).take_all()
        written = {}
        for side, side_schema in sides.items():
            written[side] = sorted(row[side] for row in split if row[side])
            if not written[side]:  # every folder gets a shard: its schema
                written[side] = location.write_shards(self.data_path(side), side_schema.empty_table(), 1)
        total: dict[str, CountTable] = {}
        for row in split:
            tally = json.loads(row["tally"])
            total = {name: results.added(total.get(name, []), table) for name, table in tally.items()}
        return Shards(**written), total

    def amended(self, joined: pa.Table) -> pa.Table:
        """A block of rows joined with their verdicts (``split``), as the filter writes them: as
        they are, unless a filter changes what it keeps (the label check's relabel)."""
        return joined

    def tally(self, rows: pa.Table, kept: pa.Table, removed: pa.Table) -> dict[str, CountTable]:
        """The counts a filter's report is made of, of one piece of its input (``rows``) and what
        it decided of it; ``outcome`` adds them up."""
        label = self.spec.label_column
        return {"input_language": results.counts(rows, ["language"]),
                "by_label_reason": results.counts(removed, [label, "reason"]),
                "by_language_reason": results.counts(removed, ["language", "reason"]),
                "kept_by_label": results.counts(kept, [label])}

    def outcome(self, ctx: Context, total: dict[str, CountTable], fields: dict, shards: Shards,
                embeddings: EmbeddingsRef | None, timings: dict, incomplete: bool) -> Outcome[F]:
        """The filter's outcome from its ``tally`` tables added up (``total``, with any counts of
        its own for ``summarise``) and the report ``fields`` it adds."""
        # Removed rows by reason and by language, from the (language, reason) counts.
        reasons: collections.Counter = collections.Counter()
        removed_by: collections.Counter = collections.Counter()
        for row in total["by_language_reason"]:
            reasons[row["reason"]] += row["rows"]
            removed_by[row["language"]] += row["rows"]
        by_language = total.pop("input_language")
        n_input, n_removed = sum(row["rows"] for row in by_language), sum(reasons.values())
        report = FilterReport(
            removed=Removals(by_reason={reason: reasons[reason] for reason in self.reasons},
                             by_label_reason=total.pop("by_label_reason"),
                             by_language_reason=total.pop("by_language_reason")),
            languages=[LanguageRemovals(language=row["language"], input=row["rows"],
                                        removed=removed_by[row["language"]],
                                        removed_share=round(removed_by[row["language"]] / row["rows"], 4))
                       for row in by_language],
            kept_by_label=total.pop("kept_by_label"),
        ).model_dump()
        return Outcome(report=self.report_type.model_validate({**report, **fields,
                                                               **self.summarise(ctx, total, n_input, timings)}),
                       rows=Rows(input=n_input, output=n_input - n_removed), output=ctx.location.uri(self.folder),
                       shards=shards, embeddings=embeddings, timings=timings,
                       status="incomplete" if incomplete else "complete")

    def describe(self, result: StageResult[F]) -> str:
        removed = ", ".join(f"{n} {reason}" for reason, n in result.report.removed.by_reason.items())
        return (f"{self.name} {result.status}: kept {result.rows.output} of {result.rows.input} rows in "
                f"{self.folder}/ (removed {removed})")
