"""The rounds' own stages and their order: measure, then target, then everything again.

In: a spec with ``rounds.enabled`` and the run's finished stages. Out, per round k:

- ``WeakSpots`` (``rounds/<k>/weak_spots``; round 0 measures the first pass's model): the
  round's model scores the held-out rows of the first round's training input (the same rows
  every round: a fixed yardstick, never trained on) and the dev set, on Ray Data actors; the
  weak spots (``weak_spots.py``) land in ``rounds/<k>/weak_spots.parquet``, the metrics and
  the gain over the round before in its manifest;
- ``Targeted`` (``rounds/<k>/targeted``, k ≥ 1): a source that asks the run's engine pool for
  the requests ``targeted.py`` makes of the weak spots of round k-1, committed as parts under
  its folder (``sources/parts.py``: a killed round resumes with the requests no part holds).

``round_stages`` lists them with every filter and training again per round (those read all
sources' rows: the first pass's and every round's so far); ``stop`` says whether the next round
runs: not past ``max_rounds``, and not once a round's metric gained less than ``min_gain``.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core import results, runtime
from anyclf_ray.core.config import ConfigError, JobSpec, RoundsSpec
from anyclf_ray.core.progress import Progress
from anyclf_ray.core.results import (
    Counts,
    Failures,
    PlannedRows,
    Rows,
    Shards,
    SpotRows,
    StageResult,
    TargetedReport,
    WeakSpotsReport,
)
from anyclf_ray.core.stage import ROUNDS_FOLDER, Context, Input, Outcome, SourceStage, Stage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.rounds import targeted, weak_spots
from anyclf_ray.sources import generate, parts
from anyclf_ray.training import evaluate, predict, train

log = logging.getLogger(__name__)

MEASURED = ["id", "text", "label", "language", "source_type", "topic", "subtopic"]


def spots_file(round_: int) -> str:
    return f"{ROUNDS_FOLDER}/{round_}/weak_spots.parquet"


def dev_set(spec: JobSpec) -> evaluate.EvalSet | None:
    settings = spec.rounds.dev_set
    return None if settings is None else evaluate.load_eval_set(settings, scheme(spec), "rounds.dev_set")


def metric_of(report: WeakSpotsReport, metric: str) -> float:
    """The round's ``metric``: on the dev set where there is one, else on the held-out rows."""
    return float((report.dev_set if report.dev_set is not None else report.held_out)[metric])


def best(measured: list[WeakSpotsReport], metric: str) -> WeakSpotsReport:
    """The round of ``measured`` with the highest ``metric`` (as ``metric_of`` reads it: rounds
    measured before a change of ``rounds.metric`` are compared by the new one), the earliest on
    a tie (the same score from fewer rows)."""
    return max(measured, key=lambda report: (metric_of(report, metric), -report.round))


def stop(settings: RoundsSpec, measured: list[WeakSpotsReport]) -> str | None:
    """Why no further round runs after the rounds ``measured`` (in order, round 0 first), or None."""
    last = measured[-1]
    if last.round >= settings.max_rounds:
        return f"max_rounds {settings.max_rounds} reached"
    if len(measured) > 1:
        gain = metric_of(last, settings.metric) - metric_of(measured[-2], settings.metric)
        if gain < settings.min_gain:
            return (f"round {last.round} gained {gain:+.4f} {settings.metric}, less than min_gain "
                    f"{settings.min_gain}")
    return None


def first_training_input(finished: list[StageResult]) -> list[str]:
    """The data shards the first training read (its input as committed)."""
    by_name = {found.stage: found for found in finished}
    first = by_name.get("train")
    if first is None:
        raise ConfigError("rounds.enabled: the first training has not finished; run `anyclf-ray run`")
    return [shard for ref in first.inputs for shard in by_name[ref.stage].shards.data]


def held_out_rows(location: RunLocation, shards: list[str], test_size: float) -> pa.Table:
    """The held-out rows of ``shards`` (their id draw below ``test_size``), shard by shard (rounds
    run on one label a row: the ``label`` column)."""
    tables = []
    for shard in shards:
        names = location.read_footer(shard).schema.names
        table = location.read_table(shard, columns=[c for c in MEASURED if c in names]).replace_schema_metadata(None)
        for column in MEASURED[4:]:
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
        held = train.draws(table["id"].to_pylist()) < test_size
        tables.append(table.filter(pa.array(held)).select(MEASURED))
    return pa.concat_tables(tables).sort_by("id") if tables else pa.table({c: pa.array([], pa.string())
                                                                            for c in MEASURED})


def scores(location: RunLocation, model_folder: str, texts: list[str], spec: JobSpec) -> pa.ChunkedArray:
    """The model's probability per label of each of ``texts``, in order, by Ray Data actors (one
    pass for all of them: each pass starts its actors)."""
    if not texts:
        return pa.chunked_array([], pa.list_(pa.float32()))
    placement = train.embedding_placement(spec.train)
    table = pa.table({"row": np.arange(len(texts)), "text": pa.array(texts, pa.string())})
    found = predict.predicted(runtime.blocks_dataset(table, 256, placement.replicas),
                              (location.fs, location.path(model_folder)), "text", placement, batch_size=64)
    out = pa.concat_tables([t.replace_schema_metadata(None) for t in ray.get(found.to_arrow_refs()) if t.num_rows])
    return out.sort_by("row")["scores"]


class WeakSpots(Stage[WeakSpotsReport, "evaluate.EvalSet | None"]):
    """A round's measure: its model's metrics and weak spots (module docstring)."""

    name = "weak_spots"
    section = "rounds"
    report_type = WeakSpotsReport

    @property
    def settings(self) -> RoundsSpec:
        return self.spec.rounds

    def check(self, location: RunLocation) -> evaluate.EvalSet | None:
        return dev_set(self.spec)

    def execute(self, ctx: Context, upstream: Input | None, dev: evaluate.EvalSet | None) -> Outcome[WeakSpotsReport]:
        assert upstream is not None
        spec, location, labels = self.spec, ctx.location, scheme(self.spec)
        model_folder = f"{self.prefix}{train.MODEL_FOLDER}"
        held = held_out_rows(location, first_training_input(ctx.finished), spec.train.test_size)
        dev_texts = dev.texts if dev is not None else []
        found = scores(location, model_folder, held["text"].to_pylist() + dev_texts, spec)
        held_scored = held.append_column("scores", found.slice(0, held.num_rows))
        dev_scored = None
        if dev is not None:
            dev_scored = pa.table({"text": dev.texts, "label": dev.labels,
                                   "language": pa.array(dev.languages or [None] * len(dev.texts), pa.string()),
                                   "scores": found.slice(held.num_rows)})
        spots = weak_spots.measure(held_scored, dev_scored, labels.ids, self.round)
        location.write_table(spots_file(self.round), spots)

        def brief(figures: dict) -> dict:
            return {key: value for key, value in figures.items() if key != "per_class"}

        held_figures = brief(weak_spots.figures(held_scored, labels.ids))
        dev_figures = brief(weak_spots.figures(dev_scored, labels.ids)) if dev_scored is not None else None
        metric = self.settings.metric
        value = float((dev_figures or held_figures)[metric])
        earlier = [found.report for found in ctx.finished if isinstance(found.report, WeakSpotsReport)
                   and found.report.round < self.round]
        gain = value - metric_of(earlier[-1], metric) if earlier else None
        report = WeakSpotsReport(round=self.round, model=model_folder, file=spots_file(self.round), metric=metric,
                                 measured_on="dev_set" if dev_figures else "held_out", value=round(value, 4),
                                 gain=None if gain is None else round(gain, 4), held_out=held_figures,
                                 dev_set=dev_figures, spots=weak_spots.summary(spots))
        chosen = best([*earlier, report], metric)
        report.best_round, report.best_model = chosen.round, chosen.model
        return Outcome(report=report, rows=Rows(input=held.num_rows + (len(dev.texts) if dev else 0),
                                                output=spots.num_rows),
                       output=location.uri(spots_file(self.round)))

    def describe(self, result: StageResult[WeakSpotsReport]) -> str:
        found = result.report
        kinds = ", ".join(f"{n} {kind}" for kind, n in found.spots["by_kind"].items())
        gain = f" ({found.gain:+.4f})" if found.gain is not None else ""
        where = found.measured_on.replace("_", " ")
        return (f"round {found.round}: {found.metric} {found.value:.4f}{gain} on the {where}; "
                f"weak spots {kinds} in {found.file}; best round so far {found.best_round} "
                f"({found.best_model}/)")

    def card_section(self, result: StageResult[WeakSpotsReport]) -> str:
        found = result.report
        line = f"**Round {found.round}**: {self.describe(result)}."
        weakest = found.spots["weakest"].get("confusion") or []
        if weakest:
            pairs = ", ".join(f"`{spot['label']}` said `{spot['predicted']}` {spot['errors']}x" for spot in weakest)
            line += f" Most confused: {pairs}."
        return line


class Targeted(SourceStage[TargetedReport, None]):
    """A round's targeted generation (module docstring)."""

    name = "targeted"
    section = "rounds"
    report_type = TargetedReport
    card_config = None

    @property
    def settings(self) -> RoundsSpec:
        return self.spec.rounds

    @property
    def uses_llm(self) -> bool:
        return True

    def retries(self, result: StageResult[TargetedReport]) -> bool:
        return result.report.failures.requests > 0

    def longest_requests(self) -> dict[str, pa.Table]:
        found = dev_set(self.spec)
        return {"targeted": targeted.longest(self.spec, found.texts if found else [])}

    def execute(self, ctx: Context, upstream: Input | None, checked: None) -> Outcome[TargetedReport]:
        spec, location, labels = self.spec, ctx.location, scheme(self.spec)
        requests = targeted.requests(spec, location.read_table(spots_file(self.round - 1)), self.round)
        planned = parts.request_ids(requests)
        found = parts.committed(location, self.folder)
        if any(not np.isin(part.request_ids, planned).all() for part in found.values()):
            log.info("%s: committed parts of other requests (other settings); starting the round again", self.name)
            location.delete(self.folder)
            found = {}
        done = parts.done_ids(location, found, ctx.retry_failures)
        pending = requests.filter(pa.array(~np.isin(parts.request_ids(requests), done)))
        log.info("%s: %d request(s) to run, %d already committed", self.name, pending.num_rows,
                 requests.num_rows - pending.num_rows)
        if pending.num_rows:
            pool = ctx.engines()
            per_part = generate.requests_per_part(spec, None, pool.engine.replicas)
            sink = parts.PartSink(location, self.folder, functools.partial(
                generate.examples_from, model_name=spec.model.name, labels=labels), per_part)
            progress = Progress(location, self.name, pending.num_rows, sum(requests["n_items"].to_pylist()),
                                sum(part.rows for part in found.values()))
            written, _ = parts.commit_pass(pool, "targeted", runtime.blocks_dataset(pending, per_part,
                                                                                   pool.engine.replicas),
                                           sink, pending.num_rows, progress, spec.output.status_seconds)
            found |= written
        failures, files = parts.failures(location, found)
        rows_by_leaf: dict[str, int] = {}
        for path in found:
            for leaf in location.read_table(path, columns=["leaf_id"])["leaf_id"].to_pylist():
                rows_by_leaf[leaf] = rows_by_leaf.get(leaf, 0) + 1
        spots: list[SpotRows] = []
        for spot, _ in targeted.allocate(spec, location.read_table(spots_file(self.round - 1))):
            leaf = targeted.spot_leaf_id(self.round, spot["kind"], spot["rank"])
            asked = sum(requests.filter(pc.equal(requests["leaf_id"], leaf))["n_items"].to_pylist())
            spots.append(SpotRows(kind=spot["kind"], rank=spot["rank"], label=spot["label"],
                                  predicted=spot["predicted"], topic=spot["topic"], subtopic=spot["subtopic"],
                                  planned=asked, written=rows_by_leaf.get(leaf, 0)))
        by_kind: dict[str, int] = {}
        for row in spots:
            by_kind[row.kind] = by_kind.get(row.kind, 0) + row.written
        written_total = sum(part.rows for part in found.values())
        expected = sum(requests["n_items"].to_pylist())
        usage = sum((part.usage for part in found.values()), results.Usage())
        report = TargetedReport(
            round=self.round, rows=PlannedRows(expected=expected, written=written_total,
                                               missing=expected - written_total),
            counts=Counts(**labels.counts(parts.written_counts(location, found, labels.key))), by_kind=by_kind,
            spots=spots, failures=Failures(requests=failures.num_rows, rows_lost=sum(failures["rows_lost"].to_pylist()),
                                           by_stage=results.counts(failures, ["stage"]), files=files),
            llm=usage, engine=ctx.engine_figures())
        return Outcome(report=report, rows=Rows(output=written_total), output=location.uri(self.folder),
                       shards=Shards(data=sorted(found)),
                       status="complete" if written_total == expected else "incomplete")

    def describe(self, result: StageResult[TargetedReport]) -> str:
        found = result.report
        kinds = ", ".join(f"{n} for {kind} spots" for kind, n in found.by_kind.items())
        return (f"round {found.round} targeted {result.status}: {found.rows.written} of {found.rows.expected} rows in "
                f"{self.folder}/data/ ({kinds}; {found.failures.requests} failed request(s))")

    def card_section(self, result: StageResult[TargetedReport]) -> str:
        found = result.report
        lines = "".join(f"| {spot.kind} | `{spot.label}` | {f'`{spot.predicted}`' if spot.predicted else ''} | "
                        f"{spot.topic or ''} | {spot.planned} | {spot.written} |\n" for spot in found.spots)
        labels = ", ".join(f"`{label}` {n}" for label, n in found.counts.per_label().items())
        return (f"Round {found.round} added {found.rows.written} rows ({labels}):\n\n"
                f"| weak spot | label | said instead | topic | asked | written |\n|---|---|---|---|---|---|\n{lines}")
