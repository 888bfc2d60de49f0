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
- ``crossfit``: k-fold logistic regression over the rows' embeddings; a row fails when its
  out-of-fold probability of its own label is below the threshold (no LLM time).
- ``similarity``: a row fails unless its embedding is nearer its own label's description than
  every other label's, by ``margin`` (no LLM time, no training).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from anyclf_ray.core import cards, embed, results, runtime
from anyclf_ray.core.config import JobSpec, LabelCheckSpec
from anyclf_ray.core.results import LabelCheckReport, MethodReport, Relabelled, StageResult, Unchecked
from anyclf_ray.core.stage import Context, Decision, FilterStage
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


def own_probabilities(vectors: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, int]:
    """Each row's out-of-fold probability of its own class ``y``, and the folds used (fewer
    when a class has fewer rows than ``folds``; 0, with NaN probabilities, below two)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    probability = np.full(len(y), np.nan)
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if len(classes) < 2 or k < 2:
        return probability, 0
    for train, held_out in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(vectors, y):
        head = LogisticRegression(max_iter=1000, random_state=seed).fit(vectors[train], y[train])
        column = {c: i for i, c in enumerate(head.classes_)}
        scores = head.predict_proba(vectors[held_out])
        probability[held_out] = scores[np.arange(len(held_out)), [column[c] for c in y[held_out]]]
    return probability, k


def nearest_labels(vectors: np.ndarray, label_vectors: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest label (by cosine to the labels' descriptions) and how much nearer its
    own label is than the nearest other one (negative: another label is nearer)."""
    similarity = vectors @ label_vectors.T
    own = similarity[np.arange(len(y)), y]
    others = similarity.copy()
    others[np.arange(len(y)), y] = -np.inf
    return similarity.argmax(axis=1), own - others.max(axis=1)


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
        texts = rows["text"].to_pylist()
        found = embed_texts(texts + labels.descs)
        vectors, label_vectors = found[: len(texts)], found[len(texts) :]
        if "crossfit" in settings.methods:
            threshold = settings.threshold or 1 / len(labels.ids)
            probability, folds = own_probabilities(vectors, y, settings.folds, settings.seed)
            failed["crossfit"] = probability < threshold  # NaN (not run) fails nothing
            columns["own_probability"] = pa.array(probability, pa.float32())
            figures["crossfit"] = {"checked": int((~np.isnan(probability)).sum()), "folds": folds,
                                   "threshold": threshold}
            if not folds:
                figures["crossfit"]["skipped"] = "a label has fewer than 2 rows; nothing was judged"
        if "similarity" in settings.methods:
            nearest, margin = nearest_labels(vectors, label_vectors, y)
            failed["similarity"] = ~(margin > settings.margin)
            columns["nearest_label"] = pa.array([labels.ids[i] for i in nearest], pa.string())
            figures["similarity"] = {"checked": rows.num_rows, "margin": settings.margin}

    any_failed = np.zeros(rows.num_rows, bool)
    reason = np.full(rows.num_rows, None, dtype=object)
    for method in settings.methods:  # the spec's order decides which reason a row gets
        first = failed[method] & ~any_failed
        reason[first] = reasons[method][first]
        any_failed |= failed[method]
        figures[method].update(failed=int(failed[method].sum()), failed_by_label=_by_label(own, failed[method]))
    out = rows
    for name, column in columns.items():
        out = out.append_column(name, column)
    failed_methods = [[m for m in settings.methods if failed[m][i]] for i in range(rows.num_rows)]
    out = out.append_column("label_check_failed", pa.array(failed_methods, pa.list_(pa.string())))
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
