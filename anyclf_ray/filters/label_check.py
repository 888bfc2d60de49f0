"""Label check stage: rows whose text does not say what their label says.

A ``FilterStage`` (``stage.py``). In: the rows the stage before it committed. Out, under
``<run>/label_check/``:

- ``data/part-*.parquet``: the kept rows (with ``action: flag``, every row; with ``relabel``,
  the failing rows whose judged labels make an allowed set, carrying those labels);
- ``removed/part-*.parquet``: the failing rows, with ``reason`` (the first method, in the spec's
  order, that failed them: ``REASONS``; ``SET_REASONS`` in a multi-label run);
- ``embeddings/part-*.parquet``: every row's embedding by the check's embedder, when a method
  needed one (training reuses them);
- ``manifest.json``: per method and label, the rows that failed; the judged-by-intended counts;
  the rows relabelled, by reason.

Every row out carries the audit columns of the methods run: ``judged_label`` (llm;
``judged_labels`` in a multi-label run; null when the judge's answer failed after its retries,
and the row is then not failed by it), ``own_probability`` (crossfit), ``nearest_label``
(similarity), ``relabelled_from`` (relabel) and ``label_check_failed``, the methods that failed
it. The methods:

- ``llm``: the run's engine pool reads each text and answers which label it expresses,
  constrained to the labels' descriptions and ``none`` (at temperature 0). Any other label than
  the row's own, or none, fails the row. In a multi-label run it answers a JSON object with one
  boolean per label; any difference from the row's set fails it.
- ``crossfit``: k-fold logistic regression over the rows' embeddings; a row fails when its
  out-of-fold probability of its own label is below the threshold (no LLM time).
- ``similarity``: a row fails unless its embedding is nearer its own label's description than
  every other label's, by ``margin`` (no LLM time, no training).
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import pyarrow as pa

from anyclf_ray.core import embed, runtime
from anyclf_ray.core import manifest as cards
from anyclf_ray.core.config import LABEL_SET_SEPARATOR, NO_LABEL, JobSpec
from anyclf_ray.core.stage import Context, Decision, FilterStage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels import label_sets
from anyclf_ray.llm import engine, prompts
from anyclf_ray.sources import plan

log = logging.getLogger(__name__)

REASONS = {"llm": "label_mismatch", "crossfit": "low_own_probability", "similarity": "nearer_another_label"}
# Below this share of rows checked, a method's verdict is missing work: the stage is incomplete
# (exit code 3), not clean.
MIN_CHECKED = 0.9
# Why the judge fails a multi-label row: a label of its set judged absent (first), or a label
# outside its set judged present.
SET_REASONS = ("label_missing", "label_extra")


def judge_requests(spec: JobSpec, rows: pa.Table) -> pa.Table:
    """One request per row: which label (or none) does its text express? In a multi-label
    run: does it express each label, one boolean per label?

    The labels are named by their descriptions, as in every other prompt: ids can be codes the
    model cannot read (``ham``, ``LOC``); ``judged_labels`` maps the answer back to the ids."""
    descriptions = [label.desc for label in spec.labels]
    if spec.multi_label.enabled:
        template, n_items, longest = prompts.JUDGE_SET, len(descriptions), max(map(len, descriptions)) + len("false")
        answer, max_tokens = {"flags": descriptions}, prompts.answer_budget(prompts.longest_flags(descriptions))
    else:
        choices = descriptions + [NO_LABEL]
        template, n_items, longest = prompts.JUDGE, 1, max(map(len, choices))
        answer, max_tokens = {"choices": choices}, prompts.answer_budget(prompts.longest_choice("label", choices))
    return engine.requests_table(
        [
            {"request_id": plan.stable_id("label_check", row_id),
             "prompt": prompts.render(template, instruction=spec.instruction, labels=plan.labels_text(spec), text=text),
             "item_key": "label", "n_items": n_items, "max_chars": longest, "max_tokens": max_tokens,
             "temperature": 0.0, **answer}
            for row_id, text in zip(rows["id"].to_pylist(), rows["text"].to_pylist())
        ]
    )


def judged_labels(spec: JobSpec, rows: pa.Table, answers: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Each row's labels as judged (rows × labels, in spec order; none for ``none``) and whether
    the judge answered it at all."""
    descriptions = [label.desc for label in spec.labels]
    by_request = dict(zip(answers["request_id"].to_pylist(), answers["items"].to_pylist()))
    judged = np.zeros((rows.num_rows, len(descriptions)), bool)
    answered = np.zeros(rows.num_rows, bool)
    for i, row_id in enumerate(rows["id"].to_pylist()):
        items = by_request[plan.stable_id("label_check", row_id)]
        if items is None:
            continue
        answered[i] = True
        if spec.multi_label.enabled:
            judged[i] = [item == "true" for item in items]
        elif items[0] != NO_LABEL:
            judged[i, descriptions.index(items[0])] = True
    return judged, answered


def intended_labels(spec: JobSpec, rows: pa.Table) -> np.ndarray:
    """Each row's own labels (rows × labels, in spec order)."""
    position = {label.id: i for i, label in enumerate(spec.labels)}
    lists = rows["labels"].to_pylist() if spec.multi_label.enabled else [[label] for label in rows["label"].to_pylist()]
    intended = np.zeros((rows.num_rows, len(position)), bool)
    for i, labels in enumerate(lists):
        intended[i, [position[label] for label in labels]] = True
    return intended


def allowed_sets(spec: JobSpec, judged: np.ndarray) -> np.ndarray:
    """Whether each judged row is a label set the run could have written: one label in a
    single-label run; a set of ``label_sets.LabelSets`` (sizes, pairs, none) in a multi-label one."""
    if not spec.multi_label.enabled:
        return judged.sum(axis=1) == 1
    allowed = {members.tobytes() for members in label_sets.LabelSets(spec).members}
    return np.array([row.tobytes() in allowed for row in judged], bool)


def relabelled(spec: JobSpec, rows: pa.Table, judged: np.ndarray, mask: np.ndarray) -> pa.Table:
    """``rows`` with the label columns of the ``mask`` rows set to their judged labels, and
    ``relabelled_from``: the label (or set) they carried before, null for the others."""
    chosen = [np.flatnonzero(row) for row in judged]
    ids = [[spec.labels[i].id for i in row] for row in chosen]
    names = [[spec.labels[i].desc for i in row] for row in chosen]
    if spec.multi_label.enabled:
        values = {"labels": ids, "label_names": names, "label_set": [LABEL_SET_SEPARATOR.join(row) for row in ids]}
    else:
        values = {"label": [row[0] if row else None for row in ids], "label_name": [row[0] if row else None for row in names]}
    before = rows[spec.label_column].to_pylist()
    for name, new in values.items():
        merged = [n if m else old for old, n, m in zip(rows[name].to_pylist(), new, mask)]
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(merged, rows.schema.field(name).type))
    return rows.append_column("relabelled_from", pa.array([b if m else None for b, m in zip(before, mask)], pa.string()))


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


class LabelCheck(FilterStage):
    """The label check on the stage contract: the methods above, combined."""

    name = "label_check"
    section = "label_check"
    card_config = "label_checked"

    @property
    def reasons(self) -> tuple[str, ...]:
        return SET_REASONS if self.spec.multi_label.enabled else tuple(REASONS.values())

    @property
    def uses_llm(self) -> bool:
        return "llm" in self.settings.methods

    @property
    def embedder(self) -> str:
        return self.settings.model or self.spec.train.base_model

    def check(self, location: RunLocation) -> None:
        if {"crossfit", "similarity"} & set(self.settings.methods):
            embed.check_model(self.embedder, "label_check.model" if self.settings.model else "train.base_model")

    def decide(self, ctx: Context, rows: pa.Table) -> Decision:
        settings, spec = self.settings, self.spec
        label_ids = [label.id for label in spec.labels]
        labels = np.asarray(rows[spec.label_column].to_pylist(), dtype=object)
        intended = intended_labels(spec, rows)
        y = intended.argmax(axis=1)  # crossfit and similarity: single-label runs only
        failed, columns, figures, timings, shards = {}, {}, {}, {}, {}
        reasons = {method: np.full(rows.num_rows, reason, dtype=object) for method, reason in REASONS.items()}

        if "llm" in settings.methods:
            started = time.perf_counter()
            answers = ctx.engines().answer_table(judge_requests(spec, rows), "label_check/llm")
            judged, answered = judged_labels(spec, rows, answers)
            missing, extra = intended & ~judged, judged & ~intended
            failed["llm"] = answered & (missing | extra).any(axis=1)
            figures["llm"] = {"checked": int(answered.sum()), "unanswered": int((~answered).sum())}
            if spec.multi_label.enabled:
                reasons["llm"] = np.where(missing.any(axis=1), *SET_REASONS)
                verdicts = [[label_ids[i] for i in np.flatnonzero(row)] if ok else None for row, ok in zip(judged, answered)]
                columns["judged_labels"] = pa.array(verdicts, pa.list_(pa.string()))
                for name, mask in (("missing_by_label", missing), ("extra_by_label", extra)):
                    found = (mask & answered[:, None]).sum(axis=0)
                    figures["llm"][name] = {label: int(n) for label, n in zip(label_ids, found) if n}
            else:
                verdicts = [(label_ids[row.argmax()] if row.any() else NO_LABEL) if ok else None
                            for row, ok in zip(judged, answered)]
                columns["judged_label"] = pa.array(verdicts, pa.string())
                pairs = collections.Counter((a, b) for a, b, ok in zip(labels, verdicts, answered) if ok)
                figures["llm"]["judged"] = [{"label": a, "judged": b, "rows": n} for (a, b), n in sorted(pairs.items())]
            figures["llm"] |= {"usage": engine.usage(answers), "engine": ctx.engine_figures()}
            timings["llm"] = time.perf_counter() - started

        if {"crossfit", "similarity"} & set(settings.methods):
            started = time.perf_counter()
            placement = runtime.resolve_placement(settings, "label_check")
            texts = rows["text"].to_pylist()
            vectors = embed.embed(texts + [label.desc for label in spec.labels], self.embedder, placement,
                                  settings.batch_size)
            vectors, label_vectors = vectors[: len(texts)], vectors[len(texts) :]
            table = embed.embeddings_table(rows["id"].to_pylist(), vectors, self.embedder)
            shards["embeddings"] = ctx.location.write_shards(self.data_path("embeddings"), table, spec.output.rows_per_shard)
            figures["embeddings"] = embed.embeddings_figures(table)
            timings["embed"] = time.perf_counter() - started

            if "crossfit" in settings.methods:
                started = time.perf_counter()
                threshold = settings.threshold or 1 / len(label_ids)
                probability, folds = own_probabilities(vectors, y, settings.folds, settings.seed)
                failed["crossfit"] = probability < threshold  # NaN (not run) fails nothing
                columns["own_probability"] = pa.array(probability, pa.float32())
                figures["crossfit"] = {"checked": int((~np.isnan(probability)).sum()), "folds": folds,
                                       "threshold": threshold}
                if not folds:
                    figures["crossfit"]["skipped"] = "a label has fewer than 2 rows; nothing was judged"
                timings["crossfit"] = time.perf_counter() - started

            if "similarity" in settings.methods:
                nearest, margin = nearest_labels(vectors, label_vectors, y)
                failed["similarity"] = ~(margin > settings.margin)
                columns["nearest_label"] = pa.array([label_ids[i] for i in nearest], pa.string())
                figures["similarity"] = {"checked": rows.num_rows, "margin": settings.margin}

        any_failed = np.zeros(rows.num_rows, bool)
        reason = np.full(rows.num_rows, None, dtype=object)
        for method in settings.methods:  # the spec's order decides which reason a row gets
            first = failed[method] & ~any_failed
            reason[first] = reasons[method][first]
            any_failed |= failed[method]
            figures.setdefault(method, {}).update(failed=int(failed[method].sum()),
                                                  failed_by_label=_by_label(labels, failed[method]))
        out = rows
        for name, column in columns.items():
            out = out.append_column(name, column)
        failed_methods = [[m for m in settings.methods if failed[m][i]] for i in range(rows.num_rows)]
        out = out.append_column("label_check_failed", pa.array(failed_methods, pa.list_(pa.string())))
        fields = {"action": settings.action, "flagged": int(any_failed.sum())}
        short = [{"method": m, "checked": figures[m]["checked"], "rows": rows.num_rows} for m in settings.methods
                 if figures[m]["checked"] < MIN_CHECKED * rows.num_rows]
        if short:  # a check that could not run is not reported as clean
            fields |= {"status": "incomplete", "unchecked": short}
            for gap in short:
                log.warning("label_check: %s checked only %d of %d rows", gap["method"], gap["checked"], gap["rows"])
        removing = any_failed if settings.action != "flag" else np.zeros(rows.num_rows, bool)
        if settings.action == "relabel":  # methods are [llm]: every failed row was judged
            relabelling = any_failed & allowed_sets(spec, judged)
            removing = any_failed & ~relabelling
            out = relabelled(spec, out, judged, relabelling)
            fields["relabelled"] = {"rows": int(relabelling.sum()),
                                    "by_reason": dict(collections.Counter(reason[relabelling].tolist()))}
        removed = out.filter(pa.array(removing)).append_column(
            "reason", pa.array(reason[removing].tolist(), pa.string()))
        return Decision(
            kept=out.filter(pa.array(~removing)),
            removed=removed,
            fields={**fields, "methods": {m: figures[m] for m in settings.methods},
                    **({"embeddings": figures["embeddings"]} if "embeddings" in figures else {})},
            shards=shards,
            timings=timings,
        )

    def describe(self, manifest: dict) -> str:
        failed = ", ".join(f"{figures['failed']} by {method}" for method, figures in manifest["methods"].items())
        unchecked = "".join(f"; {gap['method']} checked only {gap['checked']} of {gap['rows']} rows"
                            for gap in manifest.get("unchecked", []))
        if manifest["action"] == "flag":
            rows = manifest["rows"]
            return (f"label_check {manifest['status']}: flagged {manifest['flagged']} of {rows['input']} rows ({failed}), "
                    f"removed none{unchecked}")
        relabelled = f", relabelled {manifest['relabelled']['rows']}" if "relabelled" in manifest else ""
        return f"{super().describe(manifest)}; failed {failed}{relabelled}{unchecked}"

    def retries(self, manifest: dict) -> bool:
        return manifest["status"] != "complete"  # --retry-failures asks again what it could not check

    def card_section(self, manifest: dict) -> str:
        """Rows per label: checked, failed by each method, kept. A multi-label run's: per label,
        the rows whose set holds it but the judge says not, and the reverse."""
        methods = list(manifest["methods"])
        if self.spec.multi_label.enabled:
            llm = manifest["methods"]["llm"]
            header = "| label | in the set, judged absent | outside the set, judged present |\n|---|---|---|\n"
            lines = "".join(f"| {cards.code(label.id)} | {llm['missing_by_label'].get(label.id, 0)} | "
                            f"{llm['extra_by_label'].get(label.id, 0)} |\n" for label in self.spec.labels)
            return f"### Label check ({manifest['action']})\n\n{header}{lines}"
        kept = {row["label"]: row["rows"] for row in manifest["kept_by_label"]}
        removed = {}
        for row in manifest["removed"]["by_label_reason"]:
            removed[row["label"]] = removed.get(row["label"], 0) + row["rows"]
        header = "| label | rows | " + " | ".join(f"failed {m}" for m in methods) + " | kept |\n"
        header += "|---" * (len(methods) + 3) + "|\n"
        lines = "".join(
            f"| {cards.code(label.id)} | {kept.get(label.id, 0) + removed.get(label.id, 0)} | "
            + " | ".join(str(manifest["methods"][m]["failed_by_label"].get(label.id, 0)) for m in methods)
            + f" | {kept.get(label.id, 0)} |\n"
            for label in self.spec.labels
        )
        return f"### Label check ({manifest['action']})\n\n{header}{lines}"
