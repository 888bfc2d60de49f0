"""Annotation stage: the user's own unlabeled texts, each labelled by a calibrated LLM judgement.

AnyClassifier's other path (the seed's section 5: the LLM labels real texts, a classifier is
trained on them). A source (``stage.SourceStage``) beside generation. In: the texts at
``annotate.path`` (Parquet, CSV, JSONL, a Parquet or ``datasets`` folder; local or ``s3://``;
streamed by Ray Data) and the run's engine pool. Out, under ``<run>/annotate/``:

- ``answers/data/part-*.parquet``: committed parts (``parts.py``) of answered questions, one row
  a question (``ANSWER_SCHEMA``: the text's row id, text and language, the question's kind, the
  raw probabilities of its options); ``answers/failures/``: the questions that failed after
  their retries;
- ``prior.json``: each kind's calibration and the prior it divides out (``judgement.py``), from
  every committed answer (batch) or from content-free questions;
- ``data/part-*.parquet``: the annotated rows in the run's row schema (``origin: annotated``),
  labelled by the calibrated judgement, with its ``probabilities`` and ``confidence``;
- ``removed/part-*.parquet``: the rows whose judgement abstained (``low_confidence``, below
  ``annotate.judge.min_confidence``) or whose labels make no set the run allows
  (``no_allowed_set``), with ``reason``;
- ``manifest.json`` (an ``AnnotationReport``), last.

Each text is asked its label scheme's questions (one lettered question; for label sets, a yes/no
question per label) in one pass that commits parts as the answers stream out; a re-run of the same
run id asks only what no committed part answered, so every text is annotated once. Batch
calibration needs the whole pass, so the rows are written after it, a committed part at a time
(the driver holds one part, and the rows whose questions it has not all seen yet). A row id is
``annotate.id_column``'s value (refused when one repeats), else a stable hash of the text:
equal texts are one row, asked and written once (counted as ``duplicates``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core import cards, results, runtime, storage, tables
from anyclf_ray.core.config import AnnotateSpec, JobSpec, decisive, digest
from anyclf_ray.core.ids import hash64, stable_id
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import AnnotatedRows, AnnotationReport, Counts, Failures, Rows, Shards, StageResult
from anyclf_ray.core.stage import Context, Input, Outcome, SourceStage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.tokens import CHARS_PER_TOKEN
from anyclf_ray.labels.scheme import LabelScheme, scheme
from anyclf_ray.llm import engine, judge_pass, judgement
from anyclf_ray.sources import parts

log = logging.getLogger(__name__)

FOLDER = "annotate"
ANSWERS = f"{FOLDER}/answers"
PRIOR_FILE = f"{FOLDER}/prior.json"
ABSTAINED, NOT_ALLOWED = "low_confidence", "no_allowed_set"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What ``Annotate.check`` learned of the input: its rows (at most ``max_rows``) and, of
    those, the texts that repeat an earlier one (without ``id_column``: one row id, so one row)."""

    rows: int
    duplicates: int = 0

    @property
    def texts(self) -> int:
        """The distinct texts: the rows annotation writes or removes."""
        return self.rows - self.duplicates


def survey(spec: JobSpec) -> Corpus:
    """The input's rows, scanned a batch at a time before any engine starts; ConfigError in one
    line for a column it lacks, no rows, a row without a text, a language not in the run's, or an
    id repeated. The driver holds a 64-bit hash of each row id (8 bytes a row)."""
    settings = spec.annotate
    path = str(settings.path)
    found = tables.columns(path, "annotate.path")
    for field in ("text_column", "id_column", "language_column"):
        column = getattr(settings, field)
        if column is not None and column not in found:
            raise ConfigError(f"annotate.{field}: {path} has no column {column!r}; it has {found}")
    names = list(dict.fromkeys(name for name in (settings.text_column, settings.id_column, settings.language_column)
                               if name))
    rows = missing = missing_ids = 0
    foreign: set[str] = set()
    hashes = []
    for batch in tables.scan(path, "annotate.path", names):
        if settings.max_rows is not None:
            batch = batch.slice(0, settings.max_rows - rows)
        texts = batch[settings.text_column]
        missing += texts.null_count + pc.sum(pc.equal(pc.utf8_trim_whitespace(texts), "")).as_py() or 0
        if settings.language_column:
            foreign |= set(batch[settings.language_column].to_pylist()) - set(spec.languages)
        # The row id's hash: the id column's value, else the text's (its stable id's part).
        if settings.id_column:
            missing_ids += batch[settings.id_column].null_count
        hashes.append(hash64([str(value) for value in batch[settings.id_column or settings.text_column].to_pylist()]))
        rows += batch.num_rows
        if rows == settings.max_rows:
            break
    if not rows:
        raise ConfigError(f"annotate.path: {path} holds no rows; give a corpus of texts")
    if missing:
        raise ConfigError(f"annotate.text_column: {missing} of the {rows} rows of {path} have no text in "
                          f"{settings.text_column!r} (null, missing or blank); drop or fill them")
    if foreign:
        raise ConfigError(f"annotate.language_column: {path} has language {min(map(str, foreign))!r}, not among "
                          f"languages {spec.languages}; add it there or drop those rows")
    if missing_ids:
        raise ConfigError(f"annotate.id_column: {missing_ids} of the {rows} rows of {path} have no id in "
                          f"{settings.id_column!r}; fill them, or leave id_column unset (a text's hash)")
    duplicates = rows - len(np.unique(np.concatenate(hashes)))
    if duplicates and settings.id_column:
        raise ConfigError(f"annotate.id_column: {duplicates} of the {rows} values of {settings.id_column!r} in {path} "
                          "repeat an earlier one; give every text an id of its own, or leave id_column unset (a "
                          "text's hash)")
    return Corpus(rows=rows, duplicates=duplicates)


def questions_of(batch: pa.Table, spec: JobSpec, committed: ray.ObjectRef) -> pa.Table:
    """Ray Data map: a batch of the input → its texts' questions (``judge_pass.questions``), less
    the committed ones (``committed``: their sorted ids)."""
    settings = spec.annotate
    texts = tables.text_values(batch, settings.text_column)
    ids = tables.text_values(batch, settings.id_column) if settings.id_column else [None] * len(texts)
    languages = (tables.text_values(batch, settings.language_column) if settings.language_column
                 else [spec.languages[0]] * len(texts))
    asked: dict[str, tuple[str, str | None]] = {}
    for row_id, text, language in zip(ids, texts, languages):
        if text is None or not text.strip():  # refused by survey; a file changed since is counted lost
            continue
        # A text repeated in the batch is asked once (survey counted it).
        asked.setdefault(row_id or stable_id("annotated", text), (text, language))
    return judge_pass.questions(scheme(spec), "annotate", list(asked), [text for text, _ in asked.values()],
                                [language for _, language in asked.values()], [None] * len(asked), True, committed)


def labelled(labels: LabelScheme, spec: JobSpec, questions: list[dict], found_priors: np.ndarray,
             kinds: list[str]) -> tuple[pa.Table, pa.Table]:
    """Rows whose every question was answered (``questions``: their ``ANSWER_SCHEMA`` rows, a
    row's kinds in order) → the annotated rows kept and removed (with ``reason``)."""
    size = labels.judge_size
    found = judge_pass.judgement_of(questions, found_priors, kinds, size)
    judged, _, confidence = labels.judged(found)
    firsts = questions[::size]
    columns = labels.columns(labels.ids_of(judged))
    n = len(firsts)
    values = {"id": [q["row_id"] for q in firsts], "text": [q["text"] for q in firsts],
              "language": [q["language"] for q in firsts], "model": [spec.model.name] * n, "origin": ["annotated"] * n,
              "probabilities": [list(row) for row in labels.label_probabilities(found)], "confidence": confidence}
    rows = pa.table([columns[field.name] if field.name in columns
                     else pa.array(values.get(field.name, [None] * n), field.type) for field in labels.row_schema],
                    schema=labels.row_schema)
    reason = np.where(confidence < spec.annotate.judge.min_confidence, ABSTAINED,
                      np.where(labels.allowed(judged), "", NOT_ALLOWED))
    keep = pa.array(reason == "")
    removed = rows.filter(pc.invert(keep)).append_column("reason", pa.array(reason[reason != ""].tolist(), pa.string()))
    return rows.filter(keep), removed


def plan(spec: JobSpec, prompt_tokens_per_second: float | None = None) -> dict:
    """What annotation will ask and cost, from the input's metadata alone (Parquet footers: rows
    and the text column's uncompressed bytes; other formats: the file's bytes, rows unknown
    until read): texts, questions, prompt tokens (estimated at ``CHARS_PER_TOKEN``, a text's
    bytes counted in each of its questions), answer tokens (one a question) and, given
    ``prompt_tokens_per_second`` (per replica: a judgement is prefill), hours."""
    settings, labels = spec.annotate, scheme(spec)
    rows, text_bytes = tables.metadata_size(str(settings.path), "annotate.path", settings.text_column)
    if rows is not None and settings.max_rows is not None and rows > settings.max_rows:
        text_bytes, rows = text_bytes * settings.max_rows // rows, settings.max_rows
    empty = sum(len(question.prompt) for question in labels.judge_questions("0", "", "annotate"))
    questions = None if rows is None else rows * labels.judge_size
    prompt_tokens = None if rows is None else math.ceil((rows * empty + text_bytes * labels.judge_size)
                                                        / CHARS_PER_TOKEN)
    found: dict = {"input": settings.path, "texts": rows, "text_bytes": text_bytes, "questions": questions,
                   "prompt_tokens": prompt_tokens, "answer_tokens": questions}
    if prompt_tokens is not None and prompt_tokens_per_second:
        found["hours_at_rate"] = round(prompt_tokens / (prompt_tokens_per_second * spec.engine.replicas) / 3600, 2)
    return found


class Annotate(SourceStage[AnnotationReport, Corpus]):
    """The annotation source: it writes under ``annotate/`` and resumes rather than redoes."""

    name = "annotate"
    section = "annotate"
    report_type = AnnotationReport
    card_config = "annotated"

    @property
    def settings(self) -> AnnotateSpec:
        return self.spec.annotate

    @property
    def uses_llm(self) -> bool:
        return True

    def fingerprint(self, upstream: str | None) -> str:
        # What decides the labels beside the section: the task, the label set and the model.
        spec = self.spec
        return digest({"stage": self.name, "settings": decisive(self.settings), "instruction": spec.instruction,
                       "labels": [label.model_dump() for label in spec.labels], "model": decisive(spec.model),
                       "scheme": scheme(spec).decisive,
                       "languages": spec.languages})

    def check(self, location: RunLocation) -> Corpus:
        return survey(self.spec)

    def longest_requests(self) -> dict[str, pa.Table]:
        """The questions about an empty text: what every question holds besides its text. The
        user's texts are as long as they are; one too long for the context fails alone, counted
        (``lost``), never a crash."""
        questions = scheme(self.spec).judge_questions("0", "", "annotate")
        return {"annotate": engine.requests_table([judgement.request(question) for question in questions])}

    def retries(self, result: StageResult[AnnotationReport]) -> bool:
        return result.report.rows.lost > 0

    def _ask(self, ctx: Context, corpus: Corpus, found: dict[str, parts.Part]) -> tuple[dict[str, parts.Part], int]:
        """Ask every question no committed part answered (and, with ``--retry-failures``, those
        that failed); the parts this pass committed and the S3 calls its writes tried again."""
        spec, location, labels = self.spec, ctx.location, scheme(self.spec)
        committed = parts.done_ids(location, found, ctx.retry_failures)
        total = corpus.texts * labels.judge_size
        pending = total - len(committed)
        log.info("annotate: %d question(s) of %d text(s) to ask, %d already committed", pending, corpus.texts,
                 len(committed))
        if pending <= 0:
            return {}, 0
        texts = tables.dataset(str(self.settings.path), "annotate.path", self.settings.text_column)
        if self.settings.max_rows is not None:
            texts = texts.limit(self.settings.max_rows)
        questions = texts.map_batches(functools.partial(questions_of, spec=spec, committed=ray.put(committed)),
                                      batch_format="pyarrow", num_cpus=runtime.TASK_CPUS)
        return judge_pass.ask(ctx, "annotate", ANSWERS, questions, pending, total, len(committed))

    def _write_rows(self, location: RunLocation, found: dict[str, parts.Part], found_priors: np.ndarray,
                    kinds: list[str]) -> tuple[list[str], list[str], list, dict[str, int]]:
        """The rows of every text whose questions were all answered, written a committed part at a
        time: the data and removed shards, rows per (label key, language) and removed by reason."""
        labels, size = scheme(self.spec), scheme(self.spec).judge_size
        for folder in ("data", "removed"):
            location.delete(f"{FOLDER}/{folder}")  # a crash mid-way leaves no stale shard to mix in
        data, removed_shards, counted, removed = [], [], [], {ABSTAINED: 0, NOT_ALLOWED: 0}
        for number, questions in judge_pass.whole_rows(location, found, size):
            kept, dropped = labelled(labels, self.spec, questions, found_priors, kinds)
            name = f"part-{number:05d}.parquet"
            if kept.num_rows:
                location.write_table(f"{FOLDER}/data/{name}", kept)
                data.append(f"{FOLDER}/data/{name}")
                counted.append(results.counts(kept, [labels.key, "language"]))
            if dropped.num_rows:
                location.write_table(f"{FOLDER}/removed/{name}", dropped)
                removed_shards.append(f"{FOLDER}/removed/{name}")
                for reason in dropped["reason"].to_pylist():
                    removed[reason] += 1
        return data, removed_shards, results.added(*counted), removed

    def execute(self, ctx: Context, upstream: Input | None, corpus: Corpus) -> Outcome[AnnotationReport]:
        location, labels, timings = ctx.location, scheme(self.spec), {}
        retried_here = storage.retries()
        started = time.perf_counter()
        found = parts.committed(location, ANSWERS)
        written, retried_by_writes = self._ask(ctx, corpus, found)
        found |= written
        timings["ask"] = time.perf_counter() - started
        started = time.perf_counter()
        found_priors, kinds, blank_usage = judge_pass.priors(ctx, found, labels, self.settings.judge,
                                                             "annotate/content_free", PRIOR_FILE)
        data, removed_shards, by_key, removed = self._write_rows(location, found, found_priors, kinds)
        timings["label"] = time.perf_counter() - started
        rows = sum(row["rows"] for row in by_key)
        failures, files = parts.failures(location, found)
        lost = corpus.texts - rows - sum(removed.values())
        written_table = pa.Table.from_pylist(by_key, schema=pa.schema(
            [(labels.key, pa.string()), ("language", pa.string()), ("rows", pa.int64())]))
        report = AnnotationReport(
            input=str(self.settings.path),
            rows=AnnotatedRows(expected=corpus.rows, duplicates=corpus.duplicates, written=rows,
                               removed=sum(removed.values()), lost=lost),
            counts=Counts(**labels.counts(written_table)), removed=removed, calibration=kinds,
            prior=judge_pass.prior(labels, found_priors, kinds),
            failures=Failures(requests=failures.num_rows, rows_lost=lost, by_stage=results.counts(failures, ["stage"]),
                              files=files),
            llm=sum((part.usage for part in found.values()), blank_usage), engine=ctx.engine_figures(),
            s3_retries=storage.retries() - retried_here + retried_by_writes)
        return Outcome(report=report, rows=Rows(output=rows), output=location.uri(FOLDER),
                       shards=Shards(data=data, removed=removed_shards), timings=timings,
                       status="complete" if lost == 0 else "incomplete")

    def describe(self, result: StageResult[AnnotationReport]) -> str:
        found = result.report
        calibration = ", ".join(sorted(set(found.calibration)))
        repeated = f"{found.rows.duplicates} repeating another, once; " if found.rows.duplicates else ""
        return (f"annotate {result.status}: {found.rows.written} of {found.rows.expected} texts labelled in "
                f"{FOLDER}/ ({repeated}{found.rows.removed} removed; {found.rows.lost} lost to "
                f"{found.failures.requests} failed question(s); calibration {calibration})")

    def card_section(self, result: StageResult[AnnotationReport]) -> str:
        found = result.report
        prior = ", ".join(f"{cards.code(label)} {p}" for label, p in found.prior.items())
        removed = ", ".join(f"{n} {reason}" for reason, n in found.removed.items())
        return (f"### Annotated texts\n\nThe `annotated` config holds {found.rows.written} of the "
                f"{found.rows.expected} texts of `{cards.shown(found.input)}`, written by people or systems other than "
                f"the LLM and labelled by it (`origin: annotated`), each with its calibrated `probabilities` and "
                f"`confidence`; {found.rows.duplicates} repeated another text (labelled once), "
                f"{found.rows.removed} were removed ({removed}) and {found.rows.lost} lost to failed questions. "
                f"Calibration: {', '.join(sorted(set(found.calibration)))}; the prior it divided out: {prior}.\n")
