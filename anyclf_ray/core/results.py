"""Typed stage results: what every stage commits, and each stage's own report.

In: the figures a stage measured. Out: a ``StageResult`` whose JSON dump is the stage's
``manifest.json`` (written last, so its presence marks the stage done) and which every reader
of a finished stage takes instead of a dict: skip-when-done, the next stage's input, the cards,
``--retry-failures``, embedding reuse. A manifest of another ``SCHEMA_VERSION`` is refused in
one line (``read``): its fields may mean other things.

Counts that are tables (rows per label, per (label, language)...) stay lists of records
(``CountTable``), the form ``datasets`` and pandas read directly.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Generic, Literal, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anyclf_ray.core.config import ConfigError

SCHEMA_VERSION = 1
CountTable = list[dict[str, Any]]


def counts(table: pa.Table, keys: list[str], weights: str | None = None) -> CountTable:
    """Rows per combination of ``keys`` (or, given ``weights``, the sum of that column), sorted
    (nulls last: an annotated row has no topic)."""
    if not table.num_rows:
        return []
    # On the calling thread only: a threaded plan run from a thread other than the main one can
    # touch more threads than Acero's per-plan index holds ("thread index 11 is out of range").
    aggregate: list = [(weights, "sum")] if weights else [([], "count_all")]
    grouped = table.group_by(keys, use_threads=False).aggregate(aggregate).rename_columns([*keys, "rows"])
    return sorted(grouped.to_pylist(), key=lambda row: [(row[k] is None, row[k]) for k in keys])


def rows_by(table: CountTable, key: str) -> dict[Any, int]:
    """A count table's rows added up per value of its column ``key``: what readers of a result
    ask of its tables, so that none indexes their rows."""
    found: collections.Counter = collections.Counter()
    for row in table:
        found[row[key]] += row["rows"]
    return dict(found)


def added(*tables: CountTable) -> CountTable:
    """Tables of ``counts`` added up, in its order."""
    total: collections.Counter = collections.Counter()
    for row in itertools.chain(*tables):
        total[tuple((key, value) for key, value in row.items() if key != "rows")] += row["rows"]
    return sorted(({**dict(key), "rows": n} for key, n in total.items()),
                  key=lambda row: [(value is None, value) for key, value in row.items() if key != "rows"])


class Model(BaseModel):
    """A part of a result: its fields are exactly these (a renamed key fails loudly, not silently)."""

    model_config = ConfigDict(extra="forbid")


class InputRef(Model):
    """What a stage read: the stage before it as committed then (a later commit makes it stale)."""

    stage: str
    fingerprint: str
    finished_at: str


class Rows(Model):
    """Rows a stage read (None for a source) and rows it passed on (written, kept, trained on)."""

    input: int | None = None
    output: int


class Shards(Model):
    """The stage's Parquet shards by kind, paths relative to the run folder."""

    data: list[str] = []
    removed: list[str] = []


class EmbeddingsRef(Model):
    """Embeddings a stage wrote (``id``, ``embedding``), for a later stage to reuse."""

    model: str
    rows: int
    dim: int
    shards: list[str]


class Usage(Model):
    """LLM requests of a pass: answered, failed after retries, tokens, items refused by reason."""

    requests: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    refused: dict[str, int] = {}

    def __add__(self, other: Usage) -> Usage:
        refused = {key: self.refused.get(key, 0) + other.refused.get(key, 0) for key in {*self.refused, *other.refused}}
        return Usage(requests=self.requests + other.requests, failed=self.failed + other.failed,
                     tokens_in=self.tokens_in + other.tokens_in, tokens_out=self.tokens_out + other.tokens_out,
                     refused=dict(sorted(refused.items())))


class PassCounts(Model):
    requests: int
    failed: int


class HttpFigures(Model):
    """An endpoint's traffic (``engine.kind: openai``): HTTP requests sent, retries included; those
    sent again, by reason (the HTTP status, ``timeout`` or ``connection``); requests that got no
    answer (refused, or unreachable past ``engine.retry_seconds``)."""

    sent: int = 0
    retried: dict[str, int] = {}
    unanswered: int = 0


class EngineFigures(Model):
    """The run's engine pool: replicas, starts (replacements counted apart), seconds spent starting;
    with an endpoint, its HTTP traffic."""

    kind: str = "vllm"
    replicas: int = 0
    device: str | None = None
    threads_per_replica: int | None = None
    starts: int = 0
    restarts: int = 0
    start_seconds: float = 0.0
    start_wall_seconds: float = 0.0
    passes: dict[str, PassCounts] = {}
    http: HttpFigures | None = None


# -- sources ------------------------------------------------------------------------------------


class PlannedRows(Model):
    expected: int
    written: int
    missing: int


class LanguageRows(Model):
    language: str
    expected: int
    written: int
    missing: int
    failed_requests: int


class Failures(Model):
    """LLM requests that failed after their retries, the rows they cost, and where they are listed."""

    requests: int = 0
    rows_lost: int = 0
    by_stage: CountTable = []
    files: list[str] = []

    def of_stage(self, stage: str) -> int:
        """Requests of ``stage`` that failed."""
        return rows_by(self.by_stage, "stage").get(stage, 0)


class Counts(Model):
    """Rows per label and (label, language), a row counting once for each of its labels; for
    label sets also per set, (set, language) and set size."""

    by_label: CountTable
    by_label_language: CountTable = []
    by_label_set: CountTable | None = None
    by_label_set_language: CountTable | None = None
    by_set_size: CountTable | None = None

    def per_label(self) -> dict[str, int]:
        return rows_by(self.by_label, "label")

    def per_set_size(self) -> dict[str, int]:
        return rows_by(self.by_set_size or [], "size")


class CoOccurrence(Model):
    labels: list[str]
    rows: list[list[int]]


class PriorSummary(Model):
    """The pair prior's record (``label_prior.json``) in the generation's result: its weights, the
    pairs unanswered, the calibration and the prior it divided out, and what it cost."""

    file: str
    weights: dict[str, float]
    unanswered: int
    calibration: str | None = None
    prior: dict[str, float] | None = None
    usage: Usage

    @classmethod
    def of(cls, record: dict, file: str) -> PriorSummary:
        """The summary of a prior's record (its per-pair rows stay in the file)."""
        return cls.model_validate({**{name: record[name] for name in cls.model_fields if name in record},
                                   "file": file})


class GenerationReport(Model):
    sizes: dict[str, int]
    versions: dict[str, str]
    plan: dict[str, Any]
    rows: PlannedRows
    languages: list[LanguageRows]
    counts: Counts
    co_occurrence: CoOccurrence | None = None
    failures: Failures
    llm: Usage
    pair_prior: PriorSummary | None = None
    engine: EngineFigures
    # S3 calls an outage met and backoff rode out, on the driver and in the write tasks.
    s3_retries: int = 0


class AnnotatedRows(Model):
    """The texts annotation read (``expected``, after ``max_rows``), those that repeat an earlier
    text (``duplicates``: one row id, labelled once), the rows it wrote, those it removed (the
    judgement abstained, or its labels make no allowed set) and those lost to questions that
    failed after their retries: expected = duplicates + written + removed + lost."""

    expected: int
    duplicates: int = 0
    written: int
    removed: int
    lost: int


class AnnotationReport(Model):
    input: str
    rows: AnnotatedRows
    counts: Counts
    removed: dict[str, int]
    # The judgement's calibration per kind of question and the prior it divided out, by label.
    calibration: list[str]
    prior: dict[str, float]
    failures: Failures
    llm: Usage
    engine: EngineFigures
    s3_retries: int = 0


# -- filters ------------------------------------------------------------------------------------


class Removals(Model):
    by_reason: dict[str, int]
    by_label_reason: CountTable
    by_language_reason: CountTable


class LanguageRemovals(Model):
    language: str
    input: int
    removed: int
    removed_share: float


class FilterReport(Model):
    """What every filter reports: rows removed by reason, label and language; rows kept by label."""

    removed: Removals
    languages: list[LanguageRemovals]
    kept_by_label: CountTable


class LanguageCheckReport(FilterReport):
    requested_by_detected: CountTable
    figure: str
    rows_per_second: float | None


class MethodReport(Model):
    """One label-check method: rows it could judge (``checked``), rows it failed, per label; and
    what the method itself measured."""

    checked: int
    failed: int = 0
    failed_by_label: dict[str, int] = {}
    unanswered: int | None = None
    judged: CountTable | None = None
    missing_by_label: dict[str, int] | None = None
    extra_by_label: dict[str, int] | None = None
    usage: Usage | None = None
    engine: EngineFigures | None = None
    # llm: the calibration methods used (``judgement.py``), the prior they divided out by label,
    # and the rows that abstained (below judge.min_confidence).
    calibration: list[str] | None = None
    prior: dict[str, float] | None = None
    abstained: int | None = None
    # crossfit: its folds, its threshold, and the rows its heads were fitted on (at most
    # label_check.sample_per_label a label; the others are scored by the head of their fold).
    folds: int | None = None
    threshold: float | None = None
    sampled: int | None = None
    skipped: str | None = None
    margin: float | None = None


class Unchecked(Model):
    method: str
    checked: int
    rows: int


class Relabelled(Model):
    rows: int
    by_reason: dict[str, int]


class LabelCheckReport(FilterReport):
    action: str
    flagged: int
    methods: dict[str, MethodReport]
    unchecked: list[Unchecked] = []
    relabelled: Relabelled | None = None


class Conflicts(Model):
    policy: str
    pairs: int
    rows_removed: int


class DedupReport(FilterReport):
    conflicts: Conflicts


# -- the report and training --------------------------------------------------------------------


class EmbeddingsUse(Model):
    model: str
    rows: int
    reused: bool


class LabelDiversity(Model):
    rows: int
    distinct_1: float
    distinct_2: float
    compression_ratio: float
    mean_pairwise_cosine: float | None
    sampled_rows: int
    topics: int
    subtopics: int
    rows_per_topic: dict[str, float]


class DiversityReport(Model):
    embeddings: EmbeddingsUse
    by_label: dict[str, LabelDiversity]
    figures: dict[str, str]


class TrainData(Model):
    source: str
    train_rows: int
    held_out_rows: int
    eval_set_rows: int
    eval_set_skipped: dict[str, int] | None = None
    # In a run that annotates: the training rows by origin (generated, annotated).
    train_rows_by_origin: dict[str, int] | None = None


class TrainReport(Model):
    data: TrainData
    files: list[str]
    figures: dict[str, Any]
    metrics: dict[str, Any]


class WeakSpotsReport(Model):
    """A round's measure (``rounds/stages.py``): its model's metrics on the first round's held-out
    rows and on the dev set, and its weak spots (``rounds/<k>/weak_spots.parquet``) in brief."""

    round: int
    model: str
    file: str
    # The metric rounds are compared by (``rounds.metric``), where it was measured (``dev_set``,
    # else ``held_out``), its value and its gain over the round before (None in round 0).
    metric: str
    measured_on: str
    value: float
    gain: float | None = None
    # The round with the highest metric so far, this one included (the earliest on a tie), and
    # its model folder: the run's model to use and publish once the rounds end.
    best_round: int = 0
    best_model: str = "model"
    held_out: dict[str, Any]
    dev_set: dict[str, Any] | None = None
    spots: dict[str, Any]


class SpotRows(Model):
    """Rows a round asked for and wrote for one weak spot."""

    kind: str
    rank: int
    label: str
    predicted: str | None = None
    topic: str | None = None
    subtopic: str | None = None
    planned: int
    written: int


class TargetedReport(Model):
    """A round's targeted generation (``rounds/targeted.py``)."""

    round: int
    rows: PlannedRows
    counts: Counts
    by_kind: dict[str, int]
    spots: list[SpotRows]
    failures: Failures
    llm: Usage
    engine: EngineFigures


class LeakReport(FilterReport):
    """The dev-leak guard (``rounds/leak.py``): the dev texts held against, and rows removed as
    exact or near copies."""

    dev_texts: int
    exact: int
    near: int


# -- the result of any stage --------------------------------------------------------------------

ReportT = TypeVar("ReportT", bound=Model)


class StageResult(BaseModel, Generic[ReportT]):
    """What a stage commits, its ``manifest.json``: where it stands in the run, what it read and
    wrote, and its ``report``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    run_id: str
    stage: str
    status: Literal["complete", "incomplete"] = "complete"
    finished_at: str
    fingerprint: str
    inputs: list[InputRef] = Field(description="The stages read, as committed when read.")
    settings: dict[str, Any]
    output: str = Field(description="Where the stage's rows or files are, as a user (or datasets) addresses them.")
    rows: Rows
    shards: Shards = Shards()
    embeddings: EmbeddingsRef | None = None
    timings_s: dict[str, float] = {}
    warnings: list[str] = []
    report: ReportT

    @property
    def ref(self) -> InputRef:
        return InputRef(stage=self.stage, fingerprint=self.fingerprint, finished_at=self.finished_at)

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def result_type(report: type[ReportT]) -> type[StageResult[ReportT]]:
    """``StageResult`` of a report type, the class pydantic validates a stage's result with."""
    return StageResult[report]  # type: ignore[valid-type]


def read(raw: bytes, report: type[ReportT], where: str) -> StageResult[ReportT]:
    """The result in ``raw`` (a manifest's bytes, at ``where``); ConfigError in one line for a
    manifest of another schema version or form."""
    import json

    try:
        found = json.loads(raw)
    except ValueError as error:  # cut short, or not JSON at all
        raise ConfigError(f"run_id: {where} is not a manifest this anyclf-ray can read ({error}); delete the stage's "
                          "folder to run it again") from None
    version = found.get("schema_version", 0) if isinstance(found, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(f"run_id: {where} was written by another anyclf-ray (manifest schema {version!r}, this one "
                          f"reads {SCHEMA_VERSION}); use a new run_id, or delete the run folder to start it again")
    try:
        return result_type(report).model_validate(found)
    except ValidationError as error:
        raise ConfigError(f"run_id: {where} is not a manifest this anyclf-ray can read "
                          f"({error.errors()[0]['loc']}: {error.errors()[0]['msg']})") from None
