"""A judgement pass at any scale: rows' questions streamed through the run's engine pool into
committed parts, calibrated over the whole pass, read back a part at a time.

In: a Ray Data dataset of question requests (``questions``: ``judgement.request`` rows with
``QUESTION_FIELDS``: the row's id, the question's kind, the row's language, its text where the
asker writes the row from the answers, and its own label key where the asker compares with it),
the run's engine pool and the ``JudgeSpec``. Out, under the asker's answers folder:

- ``data/part-*.parquet``: committed parts (``sources.parts``) of answered questions, one row a
  question (``ANSWER_SCHEMA``, with the raw probabilities of its options); ``failures/``: the
  questions that failed after their retries. A re-run asks only what no committed part answered.
- the priors (``priors``): each kind's calibration and the prior it divides out, from every
  committed answer (batch calibration needs the whole pass) or from content-free questions;
- the judgements (``whole_rows``, then ``judgement``): part by part, the rows whose questions are
  all answered, calibrated. The driver holds one part and the rows whose questions it has not
  all seen yet, never a column of every row.

Used by annotation (``sources/annotate.py``) and the label check's llm method
(``filters/label_check.py``); the calibration itself is ``judgement.py``'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core.config import JudgeSpec
from anyclf_ray.core.progress import Progress
from anyclf_ray.core.results import Usage
from anyclf_ray.core.stage import Context
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels.scheme import LabelScheme
from anyclf_ray.llm import engine, judgement
from anyclf_ray.llm.judgement import Judgement
from anyclf_ray.sources import parts

# What a question request carries beside ``engine.REQUEST_FIELDS`` (``parts.FAILURE_SCHEMA``
# keeps its stage and language when it fails).
QUESTION_FIELDS = {"stage": pa.string(), "row_id": pa.string(), "kind": pa.int32(), "text": pa.string(),
                   "language": pa.string(), "label": pa.string()}
ANSWER_SCHEMA = pa.schema([("row_id", pa.string()), ("kind", pa.int32()), ("text", pa.string()),
                           ("language", pa.string()), ("label", pa.string()), ("raw", pa.list_(pa.float64()))])


def questions(labels: LabelScheme, asker: str, ids: list[str], texts: list[str], languages: list[str | None],
              keys: list[str | None], keep_text: bool, committed: ray.ObjectRef) -> pa.Table:
    """The judge's questions of rows (``LabelScheme.judge_questions``, request ids the
    ``asker``'s), less those a committed part answered (``committed``: their sorted ids). A
    question carries its row's ``keys`` value (its own label key, or None) and, with
    ``keep_text``, the text on its row's first question."""
    rows = [{**judgement.request(question), "stage": asker, "row_id": row_id, "kind": question.kind,
             "text": text if keep_text and question.kind == 0 else None, "language": language, "label": key}
            for row_id, text, language, key in zip(ids, texts, languages, keys)
            for question in labels.judge_questions(row_id, text, asker)]
    return parts.uncommitted(engine.requests_table(rows, QUESTION_FIELDS), committed)


def answer_rows(answered: pa.Table) -> pa.Table:
    """A part's answered questions → ``ANSWER_SCHEMA`` rows with their raw probabilities."""
    good = answered.filter(pc.field("ok"))
    logprobs = good["option_logprobs"].to_pylist()
    raw = judgement.probabilities(logprobs, len(logprobs[0]) if logprobs else 2)
    return pa.table({**{name: good[name] for name in ANSWER_SCHEMA.names[:-1]},
                     "raw": pa.array(list(raw), pa.list_(pa.float64()))}, schema=ANSWER_SCHEMA)


def ask(ctx: Context, name: str, folder: str, asked: ray.data.Dataset, pending: int, total: int,
        committed: int) -> tuple[dict[str, parts.Part], int]:
    """The pass ``name``: the ``asked`` questions (``pending`` of ``total``, ``committed`` already
    answered) through the run's engine pool, committed in parts of ``output.commit_rows``
    questions under ``folder``; the parts committed and the S3 calls their writes retried."""
    pool = ctx.engines()
    per_part = max(ctx.spec.output.commit_rows, pool.engine.replicas)
    # A map task's output batches are merged into one block until its input block is done, and
    # an answered block is written only then: an input read as one block (one file) would commit
    # nothing until the pass ends. Blocks of one part's questions commit as they go.
    asked = asked.repartition(target_num_rows_per_block=per_part)
    sink = parts.PartSink(ctx.location, folder, answer_rows, per_part)
    progress = Progress(ctx.location, name, pending, total, committed)
    return parts.commit_pass(pool, name, asked, sink, pending, progress, ctx.spec.output.status_seconds)


def means(location: RunLocation, found: dict[str, parts.Part], kinds: int, options: int) -> tuple[np.ndarray, ...]:
    """Questions per kind and their mean raw probabilities over every committed part (NaN rows
    for a kind without answers), read a part at a time."""
    counts, sums = np.zeros(kinds, np.int64), np.zeros((kinds, options))
    for path in found:
        table = location.read_table(path, columns=["kind", "raw"])
        if table.num_rows:
            kind = table["kind"].to_numpy()
            np.add.at(counts, kind, 1)
            np.add.at(sums, kind, np.array(table["raw"].to_pylist()))
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, sums / counts[:, None]


def options(labels: LabelScheme) -> int:
    """The options of each of the judge's questions: yes and no for label sets, else the labels."""
    return 2 if labels.judge_size > 1 else len(labels.ids)


def prior(labels: LabelScheme, found_priors: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """The prior calibration divided out, by label (``LabelScheme.judge_prior``)."""
    empty = np.zeros((0, found_priors.shape[1]))
    return labels.judge_prior(Judgement(raw=empty, probabilities=empty, priors=found_priors, calibration=kinds,
                                        usage=Usage()))


def priors(ctx: Context, found: dict[str, parts.Part], labels: LabelScheme, settings: JudgeSpec, name: str,
           path: str) -> tuple[np.ndarray, list[str], Usage]:
    """Each kind's prior (``(kinds, options)``) and calibration over every committed answer, the
    content-free questions asked as pass ``name`` where calibration needs them, and what they
    cost; written to ``path`` (JSON: calibration, priors, questions per kind)."""
    n_options = options(labels)
    counts, batch_means = means(ctx.location, found, labels.judge_size, n_options)
    kinds = judgement.methods(counts, settings)
    blanks = judgement.blank_questions(kinds, counts, labels.judge_blank, n_options)
    blank_raw, usage = np.zeros((0, n_options)), Usage()
    if blanks:
        answered = ctx.engines().answer_table(
            engine.requests_table([judgement.request(question) for question in blanks]), name)
        by_id = dict(zip(answered["request_id"].to_pylist(), answered["option_logprobs"].to_pylist()))
        blank_raw = judgement.probabilities([by_id[question.request_id] for question in blanks], n_options)
        usage = engine.usage(answered)
    found_priors, used = judgement.priors(kinds, batch_means, blank_raw,
                                          np.array([question.kind for question in blanks], int))
    ctx.location.write_json(path, {"calibration": used, "priors": found_priors.tolist(), "questions": counts.tolist()})
    return found_priors, used, usage


def whole_rows(location: RunLocation, found: dict[str, parts.Part], size: int) -> Iterator[tuple[int, list[dict]]]:
    """The committed parts in order, each as its number and the ``ANSWER_SCHEMA`` rows of every
    row whose ``size`` questions are now all answered (a row's kinds in order); a row some of
    whose questions failed is never given."""
    waiting: dict[str, dict[int, dict]] = {}
    for number, path in enumerate(sorted(found)):
        for question in location.read_table(path).to_pylist():
            waiting.setdefault(question["row_id"], {})[question["kind"]] = question
        whole = [row_id for row_id, kinds_seen in waiting.items() if len(kinds_seen) == size]
        if whole:
            yield number, [waiting[row_id][kind] for row_id in whole for kind in range(size)]
            for row_id in whole:
                del waiting[row_id]


def judgement_of(answers: list[dict], found_priors: np.ndarray, kinds: list[str], size: int) -> Judgement:
    """The calibrated judgement of rows' answers (``whole_rows``'s: ``size`` a row, in order)."""
    raw = np.array([answer["raw"] for answer in answers]).reshape(-1, found_priors.shape[1])
    of_kind = np.tile(np.arange(size), len(answers) // size)
    return Judgement(raw=raw, probabilities=judgement.calibrated_by_kind(raw, of_kind, found_priors, kinds),
                     priors=found_priors, calibration=kinds, usage=Usage())
