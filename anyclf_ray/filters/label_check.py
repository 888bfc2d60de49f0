"""Label check stage: rows whose text does not say what their label says.

A ``FilterStage`` (``stage.py``). In: the rows the stage before it committed. Out, under
``<run>/label_check/``:

- ``data/part-*.parquet``: the kept rows (with ``action: flag``, every row; with ``relabel``,
  the failing rows whose judged labels make an allowed set, carrying those labels);
- ``removed/part-*.parquet``: the failing rows, with ``reason`` (the first method, in the spec's
  order, that failed them: ``REASONS``, the judge's from the label scheme; ``low_confidence``
  where the judge abstained);
- ``embeddings/part-*.parquet``: every row's embedding by the check's embedder, when a method
  needed one (training reuses them);
- ``answers/``: the judge's committed answers (``llm.judge_pass``), kept across a crash so that
  a re-run asks only what no part answered; ``prior.json``, the prior its calibration divided
  out; ``verdicts/part-*.parquet``, its verdicts on the rows it judged;
- ``manifest.json``: per method and label, the rows that failed; the judged-by-intended counts,
  the judge's calibration and the prior it divided out; the rows relabelled, by reason.

Every row out carries the audit columns of the methods run: ``judged_label`` (llm;
``judged_labels`` in a multi-label run; null when the judge's answer failed after its retries,
and the row is then not failed by it) and ``judge_confidence``, ``own_probability``
(crossfit), ``nearest_label`` (similarity), ``relabelled_from`` (relabel) and
``label_check_failed``, the methods that failed it. The methods:

- ``llm``: the run's engine pool is asked which label each text expresses, the labels'
  descriptions lettered as options, and the answer read as calibrated probabilities
  (``judgement.py``, ``label_check.judge``). Any other label than the row's own fails the row.
  In a multi-label run it is asked one yes/no question per label; any difference from the row's
  set fails it. A judgement less sure than ``judge.min_confidence`` abstains: the row is
  removed as ``low_confidence`` (kept, with ``action: flag``).
- ``crossfit``: k-fold logistic regression over the embeddings of a sample of at most
  ``sample_per_label`` rows a label (``sampled``: by a hash of the id), weighed back to the
  labels' shares; a row fails when its probability of its own label is below the threshold, out
  of sample either way: out-of-fold for a sample row, by the head of its fold (a hash of its id)
  for any other (no LLM time). Below the limit the sample is every row: k-fold over all of them.
- ``similarity``: a row fails unless its embedding is nearer its own label's description than
  every other label's, by ``margin`` (no LLM time, no training).

The check runs on the cluster (``LabelCheck.execute``; the steps are below), the driver holding
counts, crossfit's sample ids and heads, and one committed part of the judge's answers; ``check``
is the same arithmetic in one process, which tests and benchmarks compare with.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core import cards, embed, results, runtime
from anyclf_ray.core.config import JobSpec, LabelCheckSpec
from anyclf_ray.core.ids import hash64, stable_id
from anyclf_ray.core.results import (
    EmbeddingsRef,
    LabelCheckReport,
    MethodReport,
    Relabelled,
    StageResult,
    Unchecked,
)
from anyclf_ray.core.stage import Context, FilterStage, Input, Outcome
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels.scheme import LabelScheme, scheme
from anyclf_ray.llm import engine, judge_pass, judgement
from anyclf_ray.llm.judgement import Judgement, Question
from anyclf_ray.sources import parts

log = logging.getLogger(__name__)

# Why the embedding methods fail a row (the llm judge's reasons are the label scheme's).
REASONS = {"crossfit": "low_own_probability", "similarity": "nearer_another_label"}
# A row the judge was not sure enough about (below ``judge.min_confidence``).
ABSTAINED = "low_confidence"
# Below this share of rows checked, a method's verdict is missing work: the stage is incomplete
# (exit code 3), not clean.
MIN_CHECKED = 0.9


def judge_questions(labels: LabelScheme, rows: pa.Table) -> list[Question]:
    """The judge's questions of ``rows`` (``LabelScheme.judge_questions``), row by row.

    The labels are named by their descriptions, as in every other prompt: ids can be codes the
    model cannot read (``ham``, ``LOC``); the verdicts map the answers back to the ids."""
    return [question for row_id, text in zip(rows["id"].to_pylist(), rows["text"].to_pylist())
            for question in labels.judge_questions(row_id, text)]


def relabelled(labels: LabelScheme, rows: pa.Table, judged: np.ndarray, mask: np.ndarray) -> pa.Table:
    """``rows`` with the label columns of the ``mask`` rows set to their ``judged`` labels (rows ×
    labels booleans)."""
    values = labels.columns(labels.ids_of(judged))
    for field in labels.fields:
        merged = [new if chosen else old for old, new, chosen in zip(rows[field.name].to_pylist(),
                                                                     values[field.name].to_pylist(), mask)]
        rows = rows.set_column(rows.schema.get_field_index(field.name), field.name, pa.array(merged, field.type))
    return rows


def relabelling(labels: LabelScheme, failed: np.ndarray, judged: np.ndarray, reason: np.ndarray) -> np.ndarray:
    """relabel's rows: those the judge failed whose judged labels make a set the run allows, and
    did not abstain (the llm is relabel's one method)."""
    return failed & labels.allowed(judged) & (reason != ABSTAINED)


def judge_verdicts(settings: LabelCheckSpec, labels: LabelScheme, intended: np.ndarray, found: Judgement
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, pa.Array], dict]:
    """The llm method's verdicts on rows whose own labels are ``intended`` (rows × labels
    booleans), from the calibrated judgements of their questions (``judge_size`` a row): the
    rows it fails, each one's reason, the labels judged (rows × labels), the audit columns (the
    labels judged, ``judge_confidence``: null where a question went unanswered) and the figures
    (rows checked, unanswered and abstained; ``LabelScheme.judge_figures``)."""
    judged, answered, confidence = labels.judged(found)
    abstained = answered & (confidence < settings.judge.min_confidence)
    missing, extra = intended & ~judged, judged & ~intended
    failed = answered & ((missing | extra).any(axis=1) | abstained)
    reason = np.where(abstained, ABSTAINED, labels.judge_reason(missing, extra))
    name, verdicts = labels.verdicts(judged, answered)
    columns = {name: verdicts, "judge_confidence": pa.array(confidence, pa.float32(), mask=~answered)}
    figures = {"checked": int(answered.sum()), "unanswered": int((~answered).sum()),
               "abstained": int(abstained.sum()), **labels.judge_figures(intended, judged, answered)}
    return failed, reason, judged, columns, figures


def threshold(settings: LabelCheckSpec, labels: LabelScheme) -> float:
    """crossfit's threshold: the setting, or 1 / number of labels (less its own than chance)."""
    return settings.threshold or 1 / len(labels.ids)


def sampled(ids: list[str], keys: list[str], limit: int, seed: int) -> np.ndarray:
    """crossfit's sample of rows ``ids`` with labels ``keys``, as a mask: per label, the ``limit``
    rows of lowest 64-bit hash of their id with ``seed`` (every row of a smaller label). A row's
    place depends on its id alone, so the sample of a union of parts is the sample of their
    samples: the stage draws it part by part, holding ``labels × limit`` ids at most."""
    rank = hash64(ids, f"label-check-sample-{seed}")
    key_array = np.asarray(keys, dtype=str)
    order = np.lexsort((np.asarray(ids, dtype=str), rank, key_array))
    ordered = key_array[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else np.zeros(0, np.int64)
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    chosen = np.zeros(len(ids), bool)
    chosen[order[position < limit]] = True
    return chosen


def folds_of(ids: list[str], folds: int, seed: int) -> np.ndarray:
    """The fold (0 to ``folds`` - 1) of rows outside crossfit's sample: a hash of the id with
    ``seed``, so a task scoring any block of rows finds it alone."""
    return (hash64(ids, f"label-check-fold-{seed}") % np.uint64(folds)).astype(np.int64)


def _own_column(head, vectors: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``head``'s probability of each row's own class ``y``."""
    column = {c: i for i, c in enumerate(head.classes_)}
    return head.predict_proba(vectors)[np.arange(len(y)), [column[c] for c in y]]


def class_weights(totals: dict[int, int], limit: int) -> dict[int, float] | None:
    """Per class, its rows over its rows in the sample (``totals[c] / min(totals[c], limit)``):
    the sample weighed back to the input's label shares, so that a capped label does not look
    rarer to the heads than it is. None when no label is capped (every weight 1)."""
    weights = {c: n / min(n, limit) for c, n in totals.items()}
    return weights if any(w != 1 for w in weights.values()) else None


def own_probabilities(vectors: np.ndarray, y: np.ndarray, folds: int, seed: int,
                      weights: dict[int, float] | None = None) -> tuple[np.ndarray, list]:
    """Each row's out-of-fold probability of its own class ``y`` (``StratifiedKFold``, shuffled
    by ``seed``; a scikit-learn ``LogisticRegression`` a fold, its classes weighed by
    ``weights``: ``class_weights``), and the heads fitted, fold by fold: ``folds`` of them, fewer
    when a class has fewer rows than ``folds``; none, with NaN probabilities, below two."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    probability = np.full(len(y), np.nan)
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if len(classes) < 2 or k < 2:
        return probability, []
    heads = []
    for train, held_out in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(vectors, y):
        head = LogisticRegression(max_iter=1000, random_state=seed, class_weight=weights)
        heads.append(head.fit(vectors[train], y[train]))
        probability[held_out] = _own_column(heads[-1], vectors[held_out], y[held_out])
    return probability, heads


def own_label_probabilities(heads: list, held_out: dict[str, float], ids: list[str], vectors: np.ndarray,
                            y: np.ndarray, seed: int) -> np.ndarray:
    """crossfit's verdict input: each row's probability of its own class ``y``, out of sample
    either way: a sample row's is its out-of-fold one (``held_out``, by id), any other row's is
    given by the head of its fold (``folds_of``), which never saw it. NaN without heads."""
    probability = np.array([held_out.get(row_id, np.nan) for row_id in ids])
    outside = np.flatnonzero([row_id not in held_out for row_id in ids])
    if heads and len(outside):
        fold = folds_of([ids[i] for i in outside], len(heads), seed)
        for f, head in enumerate(heads):
            rows = outside[fold == f]
            if len(rows):
                probability[rows] = _own_column(head, vectors[rows], y[rows])
    return probability


def nearest_labels(vectors: np.ndarray, label_vectors: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest label (by cosine to the labels' descriptions) and how much nearer its
    own label is than the nearest other one (negative: another label is nearer)."""
    similarity = vectors @ label_vectors.T
    own = similarity[np.arange(len(y)), y]
    others = similarity.copy()
    others[np.arange(len(y)), y] = -np.inf
    return similarity.argmax(axis=1), own - others.max(axis=1)


def embedding_checks(settings: LabelCheckSpec, labels: LabelScheme, vectors: np.ndarray, y: np.ndarray,
                     probability: np.ndarray, label_vectors: np.ndarray | None
                     ) -> tuple[dict[str, np.ndarray], dict[str, pa.Array]]:
    """crossfit's and similarity's verdicts on rows with ``vectors`` (``(n, d)``, L2-normalised)
    and label index ``y``, given crossfit's own-label ``probability`` (NaN: not judged, fails
    nothing) and the labels' description vectors: each method's failures (``(n,)`` booleans)
    and audit columns (``own_probability``, ``nearest_label``)."""
    failed: dict[str, np.ndarray] = {}
    columns: dict[str, pa.Array] = {}
    if "crossfit" in settings.methods:
        failed["crossfit"] = probability < threshold(settings, labels)
        columns["own_probability"] = pa.array(probability, pa.float32())
    if "similarity" in settings.methods:
        assert label_vectors is not None, "similarity compares rows with the labels' descriptions"
        nearest, margin = nearest_labels(vectors, label_vectors, y)
        failed["similarity"] = ~(margin > settings.margin)
        columns["nearest_label"] = pa.array([labels.ids[i] for i in nearest], pa.string())
    return failed, columns


def combined(methods: Sequence[str], failed: dict[str, np.ndarray], reasons: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """The methods' failures combined, row by row: the ``reason`` of the first method in
    ``methods``' (the spec's) order that failed the row (None: none did), whether any did, and
    ``label_check_failed``, the methods that did."""
    n = len(next(iter(failed.values())))
    any_failed = np.zeros(n, bool)
    reason = np.full(n, None, dtype=object)
    for method in methods:
        first = failed[method] & ~any_failed
        reason[first] = reasons[method][first]
        any_failed |= failed[method]
    failed_methods = [[m for m in methods if failed[m][i]] for i in range(n)]
    return reason, any_failed, pa.array(failed_methods, pa.list_(pa.string()))


def crossfit_figures(settings: LabelCheckSpec, labels: LabelScheme, checked: int, folds: int, sample: int) -> dict:
    """crossfit's report figures but its failures: rows judged, folds, threshold, sample size."""
    figures: dict = {"checked": checked, "folds": folds, "threshold": threshold(settings, labels), "sampled": sample}
    if not folds:
        figures["skipped"] = "a label has fewer than 2 rows; nothing was judged"
    return figures


def _by_label(labels: np.ndarray, mask: np.ndarray) -> dict[str, int]:
    found, counts = np.unique(labels[mask], return_counts=True)
    return {str(label): int(n) for label, n in zip(found, counts)}


def check(spec: JobSpec, rows: pa.Table, answer: Callable[[pa.Table], pa.Table] | None,
          embed_texts: Callable[[list[str]], np.ndarray] | None) -> tuple[pa.Table, pa.Table, dict, np.ndarray | None]:
    """The label check's verdicts on ``rows``: every row with its audit columns, the removed rows
    with their ``reason``, the report's fields, and the rows' embeddings (None without an
    embedding method). ``answer`` asks the judge (requests → answered requests) and
    ``embed_texts`` embeds (texts → L2-normalised vectors): the run's engines and embedding
    actors, or anything behind the same seams."""
    settings, labels = spec.label_check, scheme(spec)
    own = np.asarray(rows[labels.key].to_pylist(), dtype=object)
    intended = labels.members(own.tolist())
    y = intended.argmax(axis=1)  # crossfit and similarity read one label a row
    failed: dict[str, np.ndarray] = {}
    columns: dict[str, pa.Array] = {}
    figures: dict[str, dict] = {}
    reasons = {method: np.full(rows.num_rows, reason, dtype=object) for method, reason in REASONS.items()}
    vectors: np.ndarray | None = None
    judged = np.zeros_like(intended)

    if "llm" in settings.methods:
        assert answer is not None, "the llm method asks the judge"
        judgements = judgement.judge(answer, judge_questions(labels, rows), labels.judge_size, labels.judge_blank,
                                     settings.judge)
        failed["llm"], reasons["llm"], judged, found_columns, found_figures = judge_verdicts(settings, labels,
                                                                                            intended, judgements)
        columns.update(found_columns)
        figures["llm"] = {**found_figures, "usage": judgements.usage, "prior": labels.judge_prior(judgements),
                          "calibration": sorted(set(judgements.calibration))}

    if {"crossfit", "similarity"} & set(settings.methods):
        assert embed_texts is not None, "crossfit and similarity read embeddings"
        texts, ids = rows["text"].to_pylist(), rows["id"].to_pylist()
        found = embed_texts(texts + labels.descs)
        vectors, label_vectors = found[: len(texts)], found[len(texts) :]
        probability = np.full(rows.num_rows, np.nan)
        if "crossfit" in settings.methods:
            chosen = sampled(ids, own.tolist(), settings.sample_per_label, settings.seed)
            weights = class_weights(dict(zip(*(c.tolist() for c in np.unique(y, return_counts=True)))),
                                    settings.sample_per_label)
            held_out, heads = own_probabilities(vectors[chosen], y[chosen], settings.folds, settings.seed, weights)
            probability = own_label_probabilities(heads, dict(zip(np.asarray(ids, object)[chosen], held_out)), ids,
                                                  vectors, y, settings.seed)
            figures["crossfit"] = crossfit_figures(settings, labels, int((~np.isnan(probability)).sum()),
                                                   len(heads), int(chosen.sum()))
        if "similarity" in settings.methods:
            figures["similarity"] = {"checked": rows.num_rows, "margin": settings.margin}
        found_failed, found_columns = embedding_checks(settings, labels, vectors, y, probability, label_vectors)
        failed.update(found_failed)
        columns.update(found_columns)

    reason, any_failed, failed_methods = combined(settings.methods, failed, reasons)
    for method in settings.methods:
        figures[method].update(failed=int(failed[method].sum()), failed_by_label=_by_label(own, failed[method]))
    out = rows
    for name, column in columns.items():
        out = out.append_column(name, column)
    out = out.append_column("label_check_failed", failed_methods)
    fields: dict = {"action": settings.action, "flagged": int(any_failed.sum()),
                    "methods": {m: MethodReport(**figures[m]) for m in settings.methods},
                    "unchecked": [Unchecked(method=m, checked=figures[m]["checked"], rows=rows.num_rows)
                                  for m in settings.methods if figures[m]["checked"] < MIN_CHECKED * rows.num_rows]}
    removing = any_failed if settings.action != "flag" else np.zeros(rows.num_rows, bool)
    if settings.action == "relabel":  # methods are [llm]: every failed row was judged
        relabels = relabelling(labels, any_failed, judged, reason)
        removing = any_failed & ~relabels
        before = out[labels.key].to_pylist()
        out = relabelled(labels, out, judged, relabels).append_column(
            "relabelled_from", pa.array([b if m else None for b, m in zip(before, relabels)], pa.string()))
        by_reason = np.unique(reason[relabels].astype(str), return_counts=True)
        fields["relabelled"] = Relabelled(rows=int(relabels.sum()), by_reason={r: int(n) for r, n in zip(*by_reason)})
    removed = out.filter(pa.array(removing)).append_column("reason", pa.array(reason[removing].tolist(), pa.string()))
    return out.filter(pa.array(~removing)), removed, fields, vectors


# -- on the cluster -------------------------------------------------------------------------------
#
# The check runs as Ray tasks and Ray Data operators; the driver holds counts, crossfit's sample
# (at most ``sample_per_label`` ids a label) and its heads, and a part of the judge's answers:
#
# 1. llm: every row's questions stream through the run's engine pool in one pass
#    (``judge_pass.ask``), committed in parts; the pass's prior is divided out of every answer
#    (``judge_pass.priors``) and the verdicts (``judged_block``) are written part by part.
# 2. crossfit and similarity: the rows stream through the embedding actors and are written as
#    the stage's ``embeddings/`` shards (``id``, ``embedding`` and ``label``, the row's label key);
#    meanwhile ``shard_sample`` (a task per input shard, reading ``id`` and the label) draws each
#    shard's sample, and the driver keeps the sample of the samples (``sampled``: the same rows as
#    over the whole input). ``fit_heads`` (a task) reads the sample's embeddings and fits
#    crossfit's folds on them; ``score_block`` (Ray Data, over the embeddings shards) gives every
#    row crossfit's probability (``own_label_probabilities``) and similarity's nearest label.
# 3. The methods' verdicts are joined on ``id`` and combined (``settle_block``);
#    ``FilterStage.split`` joins them to the rows and writes them kept or removed.

# Rows a hash partition of the verdicts' join holds.
JOIN_ROWS = 200_000
# What a run of the stage writes, cleared before it runs again (the judge's answers are kept).
OUTPUTS = ("manifest.json", "data", "removed", "embeddings", "verdicts", "prior.json")


def write_embedded(batch: dict[str, np.ndarray], location: RunLocation, folder: str, model: str,
                   key: str) -> dict[str, list]:
    """Ray Data function: a block of embedded rows written as an embeddings shard (``id``,
    ``embedding``, ``label``: the row's ``key`` column); its path and rows."""
    ids = [str(i) for i in batch["id"]]
    table = embed.embeddings_table(ids, batch["embedding"], model).append_column(
        "label", pa.array([str(k) for k in batch[key]], pa.string()))
    path = f"{folder}/part-{stable_id(len(ids), min(ids), max(ids))}.parquet"
    location.write_table(path, table)
    return {"path": [path], "rows": [len(ids)]}


@ray.remote
def shard_sample(location: RunLocation, shard: str, key: str, limit: int, seed: int) -> tuple[pa.Table, dict]:
    """One input shard's rows in crossfit's sample (``sampled``: ``id`` and ``label``), and its
    rows per label."""
    table = location.read_table(shard, columns=["id", key]).replace_schema_metadata(None)
    table = table.rename_columns(["id", "label"])
    keys = table["label"].to_pylist()
    return (table.filter(pa.array(sampled(table["id"].to_pylist(), keys, limit, seed))),
            dict(collections.Counter(keys)))


@ray.remote
def fit_heads(location: RunLocation, shards: list[str], sample: pa.Table, labels: LabelScheme,
              weights: dict[int, float] | None, folds: int, seed: int) -> tuple[list, dict[str, float]]:
    """crossfit's heads (``own_probabilities``, classes weighed by ``weights``), fitted on the
    ``sample`` rows' embeddings read from ``shards`` in id order, and each sample row's
    out-of-fold probability, by id."""
    wanted = sample["id"]
    table = pa.concat_tables([location.read_table(path, columns=["id", "embedding", "label"])
                              .replace_schema_metadata(None).filter(pc.is_in(pc.field("id"), wanted))
                              for path in shards]).sort_by("id")
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    y = labels.members(table["label"].to_pylist()).argmax(axis=1)
    held_out, heads = own_probabilities(vectors, y, folds, seed, weights)
    return heads, dict(zip(table["id"].to_pylist(), held_out.tolist()))


def score_block(batch: pa.Table, settings: LabelCheckSpec, labels: LabelScheme, heads: list,
                held_out: dict[str, float], label_vectors: np.ndarray | None) -> pa.Table:
    """Ray Data function: a block of the embeddings shards → the embedding methods' verdicts on
    its rows: ``id``, their audit columns, ``failed_<method>`` (booleans) and ``checked_label``
    (the row's label key, for the counts); ``settle_block`` combines them."""
    ids, keys = batch["id"].to_pylist(), batch["label"].to_pylist()
    vectors = np.stack(batch["embedding"].to_numpy(zero_copy_only=False))
    y = labels.members(keys).argmax(axis=1)
    probability = own_label_probabilities(heads, held_out, ids, vectors, y, settings.seed)
    failed, columns = embedding_checks(settings, labels, vectors, y, probability, label_vectors)
    return pa.table({"id": pa.array(ids, pa.string()), **columns,
                     **{f"failed_{method}": pa.array(found) for method, found in failed.items()},
                     "checked_label": pa.array(keys, pa.string())})


def row_questions(batch: pa.Table, labels: LabelScheme, committed: ray.ObjectRef) -> pa.Table:
    """Ray Data function: a block of the input rows → the judge's questions of each
    (``judge_pass.questions``: its own label key kept, not its text), less the committed ones."""
    return judge_pass.questions(labels, "label_check", batch["id"].to_pylist(), batch["text"].to_pylist(),
                                batch["language"].to_pylist(), batch[labels.key].to_pylist(), False, committed)


def judged_block(settings: LabelCheckSpec, labels: LabelScheme, answers: list[dict], found_priors: np.ndarray,
                 kinds: list[str]) -> tuple[pa.Table, dict]:
    """The llm method's verdicts on rows whose questions are all answered (``answers``:
    ``judge_pass.whole_rows``'s), calibrated by the pass's priors: ``id``, its audit columns,
    ``failed_llm``, ``judge_reason``, ``checked_label`` and, under relabel, ``relabelled_from``
    and ``relabelled_to`` (the row's label key before and after; null for a row kept as it is);
    and its figures (``judge_verdicts``', with the rows relabelled, by reason)."""
    found = judge_pass.judgement_of(answers, found_priors, kinds, labels.judge_size)
    keys = [answer["label"] for answer in answers[:: labels.judge_size]]
    failed, reason, judged, columns, figures = judge_verdicts(settings, labels, labels.members(keys), found)
    table = pa.table({"id": pa.array([answer["row_id"] for answer in answers[:: labels.judge_size]], pa.string()),
                      **columns, "failed_llm": pa.array(failed), "judge_reason": pa.array(reason.tolist(), pa.string()),
                      "checked_label": pa.array(keys, pa.string())})
    if settings.action == "relabel":
        relabels = relabelling(labels, failed, judged, reason)
        judged_keys = [labels.key_of(ids) for ids in labels.ids_of(judged)]
        table = table.append_column("relabelled_from", pa.array(keys, pa.string(), mask=~relabels)).append_column(
            "relabelled_to", pa.array(judged_keys, pa.string(), mask=~relabels))
        figures["relabelled"] = collections.Counter(reason[relabels].tolist())
    return table, figures


def settle_block(batch: pa.Table, methods: Sequence[str], action: str) -> pa.Table:
    """Ray Data function: a block of the methods' verdicts (``failed_<method>``, null where a
    method did not judge the row; the llm's ``judge_reason``) → the row's verdict:
    ``label_check_failed`` and ``reason`` (``combined``; null for a kept row: every row under
    ``action: flag``, a relabelled one under ``relabel``)."""
    n = batch.num_rows
    failed = {method: pc.fill_null(batch[f"failed_{method}"], False).to_numpy(zero_copy_only=False)
              for method in methods}
    reasons = {method: np.asarray(batch["judge_reason"].to_pylist(), object) if method == "llm"
               else np.full(n, REASONS[method], dtype=object) for method in methods}
    reason, _, failed_methods = combined(methods, failed, reasons)
    if action == "flag":
        reason[:] = None
    if "relabelled_from" in batch.column_names:
        reason[pc.is_valid(batch["relabelled_from"]).to_numpy(zero_copy_only=False)] = None
    batch = batch.drop_columns([name for name in batch.column_names
                                if name.startswith("failed_") or name == "judge_reason"])
    return batch.append_column("label_check_failed", failed_methods).append_column(
        "reason", pa.array(reason.tolist(), pa.string()))


def verdict_fields(settings: LabelCheckSpec, labels: LabelScheme) -> list[pa.Field]:
    """The audit columns of the verdicts, in the order the rows carry them (``check``'s);
    ``reason`` last (the removed rows')."""
    fields = []
    if "llm" in settings.methods:
        name, verdicts = labels.verdicts(np.zeros((0, len(labels.ids)), bool), np.zeros(0, bool))
        fields += [pa.field(name, verdicts.type), pa.field("judge_confidence", pa.float32())]
    if "crossfit" in settings.methods:
        fields.append(pa.field("own_probability", pa.float32()))
    if "similarity" in settings.methods:
        fields.append(pa.field("nearest_label", pa.string()))
    fields.append(pa.field("label_check_failed", pa.list_(pa.string())))
    if settings.action == "relabel":
        fields.append(pa.field("relabelled_from", pa.string()))
    return [*fields, pa.field("reason", pa.string())]


def added_figures(total: dict, part: dict) -> dict:
    """The llm method's figures of two sets of rows added up: counts, count tables and counts by
    key."""
    found = dict(total)
    for name, value in part.items():
        if isinstance(value, list):
            found[name] = results.added(found.get(name, []), value)
        elif isinstance(value, dict):
            found[name] = dict(collections.Counter(found.get(name, {})) + collections.Counter(value))
        else:
            found[name] = found.get(name, 0) + value
    return found


def count_block(batch: pa.Table) -> dict[str, list]:
    """Ray Data function: a block of verdicts → its counts (JSON): rows, rows crossfit judged,
    rows any method failed, and failures per method and label."""
    failed = batch["label_check_failed"]
    failures = pa.table({"method": pc.list_flatten(failed),
                         "label": pc.take(batch["checked_label"], pc.list_parent_indices(failed))})
    probability = batch["own_probability"] if "own_probability" in batch.column_names else None
    judged = batch.num_rows if probability is None else int(pc.sum(pc.invert(pc.is_nan(probability))).as_py() or 0)
    return {"counts": [json.dumps({"rows": batch.num_rows, "judged": judged,
                                   "flagged": int(pc.sum(pc.greater(pc.list_value_length(failed), 0)).as_py() or 0),
                                   "failures": results.counts(failures, ["method", "label"])})]}


class LabelCheck(FilterStage[LabelCheckReport, None]):
    """The label check on the stage contract: the methods above, combined."""

    name = "label_check"
    section = "label_check"
    report_type = LabelCheckReport
    card_config = "label_checked"

    @property
    def settings(self) -> LabelCheckSpec:
        return self.spec.label_check

    @property
    def reasons(self) -> tuple[str, ...]:
        return (*scheme(self.spec).judge_reasons, ABSTAINED, *REASONS.values())

    @property
    def uses_llm(self) -> bool:
        return "llm" in self.settings.methods

    @property
    def embedder(self) -> str:
        return self.settings.model or self.spec.train.base_model

    def check(self, location: RunLocation) -> None:
        if {"crossfit", "similarity"} & set(self.settings.methods):
            embed.check_model(self.embedder, "label_check.model" if self.settings.model else "train.base_model")

    def longest_requests(self) -> dict[str, pa.Table]:
        """The judge's request of a text ``max_text_chars`` long (of characters that take the
        most tokens in the run's scripts)."""
        if "llm" not in self.settings.methods:
            return {}
        longest = self.spec.sampling.text_chars(self.spec.languages)
        filler = "字" if any(code[:2] in ("zh", "ja", "ko") for code in self.spec.languages) else "x "
        text = (filler * longest)[:longest]
        questions = judge_questions(scheme(self.spec), pa.table({"id": ["0"], "text": [text]}))
        return {"label_check/llm": engine.requests_table([judgement.request(question) for question in questions])}

    @property
    def answers(self) -> str:
        """Where the judge's answers are committed: they outlive a crash (``clears``)."""
        return self.data_path("answers")

    @property
    def clears(self) -> tuple[str, ...]:
        # The judge's committed answers are kept for a re-run of the same questions (``run``).
        return tuple(self.data_path(name) for name in (*OUTPUTS, *(() if self.uses_llm else ("answers",))))

    def run(self, ctx: Context, upstream: Input | None, fingerprint: str, checked: None
            ) -> StageResult[LabelCheckReport]:
        """As every stage's, but the judge's committed answers resume the pass only when they were
        asked for this ``fingerprint`` (the same rows, labels, model and settings)."""
        if self.uses_llm:
            asked = f"{self.answers}/fingerprint.json"
            if not ctx.location.exists(asked) or ctx.location.read_json(asked)["fingerprint"] != fingerprint:
                ctx.location.delete(self.answers)
                ctx.location.write_json(asked, {"fingerprint": fingerprint})
        return super().run(ctx, upstream, fingerprint, checked)

    def execute(self, ctx: Context, upstream: Input | None, checked: None) -> Outcome[LabelCheckReport]:
        """Every method on the cluster (the steps above), combined by ``settle_block``; the
        verdicts joined to the rows by ``FilterStage.split``."""
        assert upstream is not None
        settings, location = self.settings, ctx.location
        shards = self.input_shards(location, upstream)
        timings: dict[str, float] = {}
        methods: list[ray.data.Dataset] = []
        figures: dict[str, dict] = {}
        embeddings, folds, sample = None, 0, 0
        if self.uses_llm:
            started = time.perf_counter()
            judged, figures["llm"] = self._judge(ctx, upstream, shards)
            methods.append(judged)
            timings["llm"] = time.perf_counter() - started
            ctx.release_engines()  # the embedding methods' actors and tasks need their cores
        if {"crossfit", "similarity"} & set(settings.methods):
            scored, embeddings, folds, sample = self._score(ctx, upstream, shards, timings)
            if methods:  # the judge's verdicts (rows it answered) beside every row's scores
                scored = scored.join(methods.pop().drop_columns(["checked_label"]), "left_outer",
                                     max(1, math.ceil(upstream.rows / JOIN_ROWS)), on=("id",))
            methods.append(scored)
        started = time.perf_counter()
        verdicts = methods[0].map_batches(functools.partial(settle_block, methods=settings.methods,
                                                            action=settings.action),
                                          batch_size=None, batch_format="pyarrow",
                                          num_cpus=runtime.TASK_CPUS).materialize()
        counted = verdicts.map_batches(count_block, batch_size=None, batch_format="pyarrow",
                                       num_cpus=runtime.TASK_CPUS).take_all()
        audit = verdict_fields(settings, scheme(self.spec))
        written_shards, total = self.split(ctx, shards, verdicts, audit, kept_audit=tuple(f.name for f in audit[:-1]),
                                           partitions=max(1, math.ceil(upstream.rows / JOIN_ROWS)))
        timings["write"] = time.perf_counter() - started
        fields = self.fields([json.loads(row["counts"]) for row in counted], upstream.rows, figures, folds, sample)
        return self.outcome(ctx, total, fields, written_shards, embeddings, timings, bool(fields["unchecked"]))

    def _judge(self, ctx: Context, upstream: Input, shards: list[str]) -> tuple[ray.data.Dataset, dict]:
        """The llm method: every row's questions asked in one pass (``judge_pass``) whose parts
        commit as they go, a re-run asking only what no part answered; calibrated over the pass;
        the verdicts (``judged_block``) written part by part under ``verdicts/``. The verdicts (of
        the rows whose questions were all answered) and the method's figures."""
        settings, location, labels = self.settings, ctx.location, scheme(self.spec)
        found = parts.committed(location, self.answers)
        committed = parts.done_ids(location, found, ctx.retry_failures)
        total = upstream.rows * labels.judge_size
        pending = total - len(committed)
        log.info("label_check: %d question(s) of %d row(s) to ask the judge, %d already committed", pending,
                 upstream.rows, len(committed))
        if pending > 0:
            rows = ray.data.read_parquet([location.path(shard) for shard in shards], filesystem=location.fs,
                                         columns=["id", "text", labels.key, "language"])
            asked = rows.map_batches(functools.partial(row_questions, labels=labels, committed=ray.put(committed)),
                                     batch_format="pyarrow", num_cpus=runtime.TASK_CPUS)
            found |= judge_pass.ask(ctx, "label_check/llm", self.answers, asked, pending, total, len(committed))[0]
        found_priors, kinds, blank_usage = judge_pass.priors(ctx, found, labels, settings.judge,
                                                             "label_check/content_free", self.data_path("prior.json"))
        figures: dict = {"checked": 0, "abstained": 0}
        written = []
        for number, answers in judge_pass.whole_rows(location, found, labels.judge_size):
            table, part_figures = judged_block(settings, labels, answers, found_priors, kinds)
            written.append(self.data_path(f"verdicts/part-{number:05d}.parquet"))
            location.write_table(written[-1], table)
            figures = added_figures(figures, part_figures)
        if not written:  # no row's questions all answered: an empty shard gives the verdicts' schema
            written.append(self.data_path("verdicts/part-00000.parquet"))
            location.write_table(written[-1], judged_block(settings, labels, [], found_priors, kinds)[0])
        relabelled = figures.pop("relabelled", None)
        figures.update(unanswered=upstream.rows - figures["checked"], calibration=sorted(set(kinds)),
                       prior=judge_pass.prior(labels, found_priors, kinds),
                       usage=sum((part.usage for part in found.values()), blank_usage), engine=ctx.engine_figures())
        if settings.action == "relabel":
            figures["relabelled"] = Relabelled(rows=sum((relabelled or {}).values()), by_reason=relabelled or {})
        return ray.data.read_parquet([location.path(path) for path in written], filesystem=location.fs), figures

    def _score(self, ctx: Context, upstream: Input, shards: list[str], timings: dict[str, float]
               ) -> tuple[ray.data.Dataset, EmbeddingsRef, int, int]:
        """crossfit and similarity (steps 1 to 3 above): their verdicts on every row
        (``score_block``), the embeddings written, crossfit's folds and sample size."""
        settings, location, labels = self.settings, ctx.location, scheme(self.spec)
        placement = runtime.resolve_placement(settings, "label_check")
        log.info("label_check: %d rows with %s on %s", upstream.rows, self.embedder, placement.device)
        started = time.perf_counter()
        samples = [shard_sample.remote(location, shard, labels.key, settings.sample_per_label, settings.seed)
                   for shard in shards] if "crossfit" in settings.methods else []
        rows = ray.data.read_parquet([location.path(shard) for shard in shards], filesystem=location.fs,
                                     columns=["id", "text", labels.key])
        write = functools.partial(write_embedded, location=location, folder=self.data_path("embeddings"),
                                  model=self.embedder, key=labels.key)
        written = embed.embedded(rows, self.embedder, placement, settings.batch_size).map_batches(
            write, batch_size=self.spec.output.rows_per_shard, batch_format="numpy",
            num_cpus=runtime.TASK_CPUS).take_all()
        embedding_shards = sorted(row["path"] for row in written)
        dim = location.read_footer(embedding_shards[0]).schema.to_arrow_schema().field("embedding").type.list_size
        embeddings = EmbeddingsRef(model=self.embedder, rows=sum(row["rows"] for row in written), dim=dim,
                                   shards=embedding_shards)
        label_vectors = (embed.embed(labels.descs, self.embedder, placement, settings.batch_size)
                         if "similarity" in settings.methods else None)
        timings["embed"] = time.perf_counter() - started

        started = time.perf_counter()
        heads: list = []
        held_out: dict[str, float] = {}
        sample = pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.string())})
        totals: collections.Counter = collections.Counter()
        for ref in samples:  # the sample of the shards' samples: at most two shards' worth held
            part, counts = ray.get(ref)
            sample = pa.concat_tables([sample, part])
            sample = sample.filter(pa.array(sampled(sample["id"].to_pylist(), sample["label"].to_pylist(),
                                                    settings.sample_per_label, settings.seed)))
            totals.update(counts)
        if samples:
            positions = labels.members(list(totals)).argmax(axis=1).tolist()
            weights = class_weights(dict(zip(positions, totals.values())), settings.sample_per_label)
            heads, held_out = ray.get(fit_heads.remote(location, embedding_shards, sample, labels, weights,
                                                       settings.folds, settings.seed))
        timings["fit"] = time.perf_counter() - started
        score = functools.partial(score_block, settings=settings, labels=labels, heads=heads, held_out=held_out,
                                  label_vectors=label_vectors)
        scored = ray.data.read_parquet([location.path(shard) for shard in embedding_shards],
                                       filesystem=location.fs).map_batches(
            score, batch_size=None, batch_format="pyarrow", num_cpus=runtime.TASK_CPUS)
        return scored, embeddings, len(heads), sample.num_rows

    def fields(self, counts: list[dict], rows: int, figures: dict[str, dict], folds: int, sample: int) -> dict:
        """The report's fields from the verdicts' ``counts`` (``count_block``'s) of a check of
        ``rows`` rows, the llm's ``figures`` (``_judge``'s) and crossfit's folds and sample, as
        ``check`` gives them."""
        settings, labels = self.settings, scheme(self.spec)
        judged = sum(found["judged"] for found in counts)
        relabelled = figures.get("llm", {}).pop("relabelled", None)
        if "crossfit" in settings.methods:
            figures["crossfit"] = crossfit_figures(settings, labels, judged, folds, sample)
        if "similarity" in settings.methods:
            figures["similarity"] = {"checked": rows, "margin": settings.margin}
        failures: collections.Counter = collections.Counter()
        for found in counts:
            failures.update({(row["method"], row["label"]): row["rows"] for row in found["failures"]})
        for method, found in figures.items():
            by_label = {label: n for (m, label), n in sorted(failures.items()) if m == method}
            found.update(failed=sum(by_label.values()), failed_by_label=by_label)
        unchecked = [Unchecked(method=m, checked=figures[m]["checked"], rows=rows)
                     for m in settings.methods if figures[m]["checked"] < MIN_CHECKED * rows]
        for gap in unchecked:  # a check that could not run is not reported as clean
            log.warning("label_check: %s checked only %d of %d rows", gap.method, gap.checked, gap.rows)
        found_fields = {"action": settings.action, "flagged": sum(found["flagged"] for found in counts),
                        "methods": {m: MethodReport(**figures[m]) for m in settings.methods}, "unchecked": unchecked}
        return {**found_fields, "relabelled": relabelled} if relabelled is not None else found_fields

    def amended(self, joined: pa.Table) -> pa.Table:
        """A row no method judged (its questions unanswered) failed none; under relabel, the
        rows relabelled (``relabelled_to``) carry their judged labels."""
        failed = joined.schema.get_field_index("label_check_failed")
        joined = joined.set_column(failed, "label_check_failed", pc.fill_null(
            joined["label_check_failed"], pa.scalar([], pa.list_(pa.string()))))
        if self.settings.action != "relabel":
            return joined
        labels = scheme(self.spec)
        to = joined["relabelled_to"]
        mask = pc.is_valid(to).to_numpy(zero_copy_only=False)
        return relabelled(labels, joined, labels.members(pc.fill_null(to, joined[labels.key]).to_pylist()), mask)

    def retries(self, result: StageResult[LabelCheckReport]) -> bool:
        return not result.complete  # --retry-failures asks again what it could not check

    def describe(self, result: StageResult[LabelCheckReport]) -> str:
        found = result.report
        failed = ", ".join(f"{figures.failed} by {method}" for method, figures in found.methods.items())
        unchecked = "".join(f"; {gap.method} checked only {gap.checked} of {gap.rows} rows" for gap in found.unchecked)
        if found.action == "flag":
            return (f"label_check {result.status}: flagged {found.flagged} of {result.rows.input} rows ({failed}), "
                    f"removed none{unchecked}")
        relabelled = f", relabelled {found.relabelled.rows}" if found.relabelled else ""
        return f"{super().describe(result)}; failed {failed}{relabelled}{unchecked}"

    def card_section(self, result: StageResult[LabelCheckReport]) -> str:
        """Rows per label: checked, failed by each method, kept; for label sets, per label, the
        rows whose set holds it but the judge says not, and the reverse."""
        found, methods = result.report, list(result.report.methods)
        llm = found.methods.get("llm")
        table = scheme(self.spec).judge_table(llm.missing_by_label, llm.extra_by_label) if llm else None
        if table is not None:
            return f"### Label check ({found.action})\n\n{table}"
        key = self.spec.label_column
        kept = results.rows_by(found.kept_by_label, key)
        removed = results.rows_by(found.removed.by_label_reason, key)
        header = "| label | rows | " + " | ".join(f"failed {m}" for m in methods) + " | kept |\n"
        header += "|---" * (len(methods) + 3) + "|\n"
        lines = "".join(
            f"| {cards.code(label.id)} | {kept.get(label.id, 0) + removed.get(label.id, 0)} | "
            + " | ".join(str(found.methods[m].failed_by_label.get(label.id, 0)) for m in methods)
            + f" | {kept.get(label.id, 0)} |\n"
            for label in self.spec.labels
        )
        return f"### Label check ({found.action})\n\n{header}{lines}"
