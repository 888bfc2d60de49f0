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

Without the llm method the check runs on the cluster (``LabelCheck.execute``; the steps are
below), the driver holding counts, the sample's ids and the heads; ``check`` is the same
arithmetic in one process, which the stage uses with the llm method (``decide``: the rows are read
on the driver) and tests and benchmarks compare with.
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
from anyclf_ray.core.stage import Context, Decision, FilterStage, Input, Outcome
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels.scheme import LabelScheme, scheme
from anyclf_ray.llm import engine, judgement
from anyclf_ray.llm.judgement import Question

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
    """``rows`` with the label columns of the ``mask`` rows set to their judged labels, and
    ``relabelled_from``: the label (or set) they carried before, null for the others."""
    values = labels.columns(labels.ids_of(judged))
    before = rows[labels.key].to_pylist()
    for field in labels.fields:
        merged = [new if chosen else old for old, new, chosen in zip(rows[field.name].to_pylist(),
                                                                     values[field.name].to_pylist(), mask)]
        rows = rows.set_column(rows.schema.get_field_index(field.name), field.name, pa.array(merged, field.type))
    return rows.append_column("relabelled_from",
                              pa.array([b if m else None for b, m in zip(before, mask)], pa.string()))


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
        judged, answered, confidence = labels.judged(judgements)
        abstained = answered & (confidence < settings.judge.min_confidence)
        missing, extra = intended & ~judged, judged & ~intended
        failed["llm"] = answered & ((missing | extra).any(axis=1) | abstained)
        reasons["llm"] = np.where(abstained, ABSTAINED, labels.judge_reason(missing, extra))
        name, verdicts = labels.verdicts(judged, answered)
        columns[name] = verdicts
        columns["judge_confidence"] = pa.array(confidence, pa.float32(), mask=~answered)
        figures["llm"] = {"checked": int(answered.sum()), "unanswered": int((~answered).sum()),
                          **labels.judge_figures(intended, judged, answered), "usage": judgements.usage,
                          "calibration": sorted(set(judgements.calibration)), "prior": labels.judge_prior(judgements),
                          "abstained": int(abstained.sum())}

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
        relabelling = any_failed & labels.allowed(judged) & (reason != ABSTAINED)
        removing = any_failed & ~relabelling
        out = relabelled(labels, out, judged, relabelling)
        by_reason = np.unique(reason[relabelling].astype(str), return_counts=True)
        fields["relabelled"] = Relabelled(rows=int(relabelling.sum()),
                                          by_reason={r: int(n) for r, n in zip(*by_reason)})
    removed = out.filter(pa.array(removing)).append_column("reason", pa.array(reason[removing].tolist(), pa.string()))
    return out.filter(pa.array(~removing)), removed, fields, vectors


# -- on the cluster -------------------------------------------------------------------------------
#
# A check by crossfit and similarity alone runs as Ray tasks and Ray Data operators; the driver
# holds counts, crossfit's sample (at most ``sample_per_label`` ids a label) and its heads:
#
# 1. The rows stream through the embedding actors and are written as the stage's ``embeddings/``
#    shards (``id``, ``embedding`` and ``label``, the row's label key); meanwhile ``shard_sample``
#    (a task per input shard, reading ``id`` and the label) draws each shard's sample, and the
#    driver keeps the sample of the samples (``sampled``: the same rows as over the whole input).
# 2. ``fit_heads`` (a task) reads the sample's embeddings and fits crossfit's folds on them.
# 3. ``score_block`` (Ray Data, over the embeddings shards) gives every row its verdict: crossfit's
#    probability (``own_label_probabilities``), similarity's nearest label, the methods combined;
#    ``FilterStage.split`` joins the verdicts to the rows and writes them kept or removed.

# Rows a hash partition of the verdicts' join holds.
JOIN_ROWS = 200_000


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
    """Ray Data function: a block of the embeddings shards → its rows' verdicts: ``id``, the
    audit columns (``verdict_fields``), ``reason`` (null for a kept row; every row is kept under
    ``action: flag``) and ``checked_label`` (the row's label key, for the counts)."""
    ids, keys = batch["id"].to_pylist(), batch["label"].to_pylist()
    vectors = np.stack(batch["embedding"].to_numpy(zero_copy_only=False))
    y = labels.members(keys).argmax(axis=1)
    probability = own_label_probabilities(heads, held_out, ids, vectors, y, settings.seed)
    failed, columns = embedding_checks(settings, labels, vectors, y, probability, label_vectors)
    reasons = {method: np.full(len(ids), reason, dtype=object) for method, reason in REASONS.items()}
    reason, any_failed, failed_methods = combined(settings.methods, failed, reasons)
    if settings.action == "flag":
        reason[:] = None
    return pa.table({"id": pa.array(ids, pa.string()), **columns, "label_check_failed": failed_methods,
                     "reason": pa.array(reason.tolist(), pa.string()), "checked_label": pa.array(keys, pa.string())})


def verdict_fields(settings: LabelCheckSpec) -> list[pa.Field]:
    """The audit columns of the embedding methods' verdicts, in the order the rows carry them;
    ``reason`` last (the removed rows')."""
    own = [pa.field("own_probability", pa.float32())] if "crossfit" in settings.methods else []
    nearest = [pa.field("nearest_label", pa.string())] if "similarity" in settings.methods else []
    return [*own, *nearest, pa.field("label_check_failed", pa.list_(pa.string())), pa.field("reason", pa.string())]


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

    def execute(self, ctx: Context, upstream: Input | None, checked: None) -> Outcome[LabelCheckReport]:
        """crossfit and similarity on the cluster (the steps above); with the llm method, the
        rows are read on the driver and decided in process (``decide``)."""
        if self.uses_llm:
            return super().execute(ctx, upstream, checked)
        assert upstream is not None
        settings, location, labels = self.settings, ctx.location, scheme(self.spec)
        shards = self.input_shards(location, upstream)
        placement = runtime.resolve_placement(settings, "label_check")
        log.info("label_check: %d rows with %s on %s", upstream.rows, self.embedder, placement.device)
        timings, started = {}, time.perf_counter()
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

        started = time.perf_counter()
        score = functools.partial(score_block, settings=settings, labels=labels, heads=heads, held_out=held_out,
                                  label_vectors=label_vectors)
        verdicts = ray.data.read_parquet([location.path(shard) for shard in embedding_shards],
                                         filesystem=location.fs).map_batches(
            score, batch_size=None, batch_format="pyarrow", num_cpus=runtime.TASK_CPUS).materialize()
        counted = verdicts.map_batches(count_block, batch_size=None, batch_format="pyarrow",
                                       num_cpus=runtime.TASK_CPUS).take_all()
        audit = verdict_fields(settings)
        written_shards, total = self.split(ctx, shards, verdicts, audit, kept_audit=tuple(f.name for f in audit[:-1]),
                                           partitions=max(1, math.ceil(upstream.rows / JOIN_ROWS)))
        timings["write"] = time.perf_counter() - started
        fields = self.embedding_fields([json.loads(row["counts"]) for row in counted], len(heads), sample.num_rows)
        return self.outcome(ctx, total, fields, written_shards, embeddings, timings, bool(fields["unchecked"]))

    def embedding_fields(self, counts: list[dict], folds: int, sample: int) -> dict:
        """The report's fields of a check by crossfit and similarity from its verdicts' ``counts``
        (``count_block``'s), as ``check`` gives them."""
        settings, labels = self.settings, scheme(self.spec)
        rows, judged = sum(found["rows"] for found in counts), sum(found["judged"] for found in counts)
        figures: dict[str, dict] = {}
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
        return {"action": settings.action, "flagged": sum(found["flagged"] for found in counts),
                "methods": {m: MethodReport(**figures[m]) for m in settings.methods}, "unchecked": unchecked}

    def decide(self, ctx: Context, rows: pa.Table, checked: None) -> Decision:
        settings, timings = self.settings, {}

        def answer(requests: pa.Table) -> pa.Table:
            started = time.perf_counter()
            found = ctx.engines().answer_table(requests, "label_check/llm")
            timings["llm"] = time.perf_counter() - started
            return found

        def embed_texts(texts: list[str]) -> np.ndarray:
            started = time.perf_counter()
            found = embed.embed(texts, self.embedder, runtime.resolve_placement(settings, "label_check"),
                                settings.batch_size)
            timings["embed"] = time.perf_counter() - started
            return found

        kept, removed, fields, vectors = check(self.spec, rows, answer, embed_texts)
        if "llm" in fields["methods"]:
            fields["methods"]["llm"].engine = ctx.engine_figures()
        embeddings = None
        if vectors is not None:
            table = embed.embeddings_table(rows["id"].to_pylist(), vectors, self.embedder)
            embeddings = embed.write_embeddings(ctx.location, self.data_path("embeddings"), table,
                                                self.spec.output.rows_per_shard)
        for gap in fields["unchecked"]:  # a check that could not run is not reported as clean
            log.warning("label_check: %s checked only %d of %d rows", gap.method, gap.checked, gap.rows)
        return Decision(kept=kept, removed=removed, fields=fields, embeddings=embeddings, timings=timings,
                        incomplete=bool(fields["unchecked"]))

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
