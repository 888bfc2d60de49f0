"""Evaluation: the trained classifier on held-out synthetic rows and on an optional real set.

In: tallies per split and language, added up batch by batch as the rows stream past
(``train.py``): a confusion matrix of label indices, or for a multi-label model the true and
false positives and false negatives per label with the rows whose whole set was right; for the
real set, its file and column settings (``train.eval_set``). Out: ``eval/metrics.json``
(accuracy, macro- and weighted-F1, per-class figures and the confusion matrix; multi-label:
micro- and macro-F1, subset accuracy, Hamming loss and per-label figures, with each label's
threshold, tuned for F1 on held-out rows) and a PNG per split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anyclf_ray.core import plots, tables
from anyclf_ray.core.config import EvalSetSpec
from anyclf_ray.core.loading import ConfigError


def label_lists(values: list, settings: EvalSetSpec) -> list[list[str] | None]:
    """A multi-label eval set's label values as lists: a list as it is, text split at
    ``label_separator`` (null stays null: the row has no labels given)."""
    if any(isinstance(value, list) for value in values):
        return [None if value is None else [v for v in value if v is not None] for value in values]
    if settings.label_separator is None:
        raise ConfigError(f"train.eval_set.label_separator: {settings.label_column!r} holds text, not lists; "
                          "give the separator between its labels, such as ','")
    return [None if value is None else [part.strip() for part in value.split(settings.label_separator) if part.strip()]
            for value in values]


@dataclasses.dataclass
class EvalSet:
    """A real labelled set, as the job's label ids: ``labels`` holds one id a row (a list of
    ids in a multi-label run); ``languages`` is None without ``language_column``; ``skipped``
    counts the rows left out for a missing text or label (``null_text``, ``null_label``)."""

    texts: list[str]
    labels: list
    languages: list[str | None] | None
    skipped: dict[str, int]


def load_eval_set(settings: EvalSetSpec, label_ids: list[str], multi_label: bool = False) -> EvalSet:
    """The real set at ``settings.path`` (``tables.read``), its labels as job label ids through
    ``label_map``; rows without a text or a label are skipped and counted. ConfigError naming
    the field to fix."""
    wanted = [("text_column", settings.text_column), ("label_column", settings.label_column)]
    if settings.language_column:
        wanted.append(("language_column", settings.language_column))
    table, features = tables.read(settings.path, "train.eval_set.path", [settings.text_column],
                                  [settings.label_column, *([settings.language_column] if settings.language_column else [])])
    for field, column in wanted:
        if column not in table.column_names:
            raise ConfigError(
                f"train.eval_set.{field}: {settings.path} has no column {column!r}; it has {table.column_names}"
            )
    texts = tables.text_values(table, settings.text_column)
    raw = tables.label_values(table, settings.label_column, features)
    # A single label left blank is missing; a multi-label row's blank cell is the empty set.
    raw_labels = label_lists(raw, settings) if multi_label else [[v] if v else None for v in raw]
    languages = tables.text_values(table, settings.language_column) if settings.language_column else None
    keep = [text is not None and labels is not None for text, labels in zip(texts, raw_labels)]
    skipped = {"null_text": sum(text is None for text in texts),
               "null_label": sum(text is not None and labels is None for text, labels in zip(texts, raw_labels))}
    labels = [[settings.label_map.get(v, v) for v in values] for values, kept in zip(raw_labels, keep) if kept]
    unknown = sorted({raw for raws, mapped in zip([r for r, k in zip(raw_labels, keep) if k], labels)
                      for raw, label in zip(raws, mapped) if label not in label_ids})
    if unknown:
        raise ConfigError(
            f"train.eval_set.label_map: value {unknown[0]!r} of {settings.label_column!r} maps to no job label; "
            f"map it to one of {label_ids}"
        )
    if not any(keep):
        raise ConfigError(f"train.eval_set.path: {settings.path} has no row with both a text and a label")
    return EvalSet(
        texts=[text for text, kept in zip(texts, keep) if kept],
        labels=labels if multi_label else [values[0] for values in labels],
        languages=[language for language, kept in zip(languages, keep) if kept] if languages else None,
        skipped=skipped,
    )


def confusion(true: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """The confusion matrix of label indices: ``[true, predicted]`` row counts."""
    matrix = np.zeros((n_labels, n_labels), np.int64)
    np.add.at(matrix, (np.asarray(true, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def metrics(matrix: np.ndarray, label_ids: list[str]) -> dict:
    """Accuracy, macro- and weighted-F1 and per-class figures from a confusion matrix (a score
    with a zero denominator is 0, as scikit-learn's ``zero_division=0``)."""
    hits, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(hits / predicted)
        recall = np.nan_to_num(hits / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    rows = int(matrix.sum())
    return {
        "rows": rows,
        "accuracy": float(hits.sum() / rows) if rows else 0.0,
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / rows) if rows else 0.0,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for label, p, r, f, n in zip(label_ids, precision, recall, f1, support)
        },
        "confusion_matrix": {"labels": label_ids, "rows_true_columns_predicted": matrix.tolist()},
    }


# The thresholds a multi-label model's per-label cut is chosen from.
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def multi_label_tally(true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """A multi-label batch's counts, to add up across batches: true positives, false positives
    and false negatives per label, then the rows whose whole set was right, then the rows."""
    true, predicted = true.astype(bool), predicted.astype(bool)
    return np.concatenate([(true & predicted).sum(0), (~true & predicted).sum(0), (true & ~predicted).sum(0),
                           [(true == predicted).all(1).sum(), len(true)]]).astype(np.int64)


def multi_label_metrics(tally: np.ndarray, label_ids: list[str]) -> dict:
    """Micro- and macro-F1, subset accuracy, Hamming loss and per-label figures from a tally."""
    n = len(label_ids)
    tp, fp, fn = tally[:n], tally[n : 2 * n], tally[2 * n : 3 * n]
    exact, rows = int(tally[3 * n]), int(tally[3 * n + 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / (tp + fp))
        recall = np.nan_to_num(tp / (tp + fn))
        f1 = np.nan_to_num(2 * tp / (2 * tp + fp + fn))
    errors = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "rows": rows,
        "micro_f1": float(2 * tp.sum() / errors) if errors else 0.0,
        "macro_f1": float(f1.mean()),
        "subset_accuracy": exact / rows if rows else 0.0,
        "hamming_loss": float((fp.sum() + fn.sum()) / (rows * n)) if rows else 0.0,
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(label_ids, precision, recall, f1, tp + fn)
        },
    }


def threshold_counts(true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``[threshold, label, (tp, fp, fn)]`` of ``scores`` cut at each of ``THRESHOLDS``."""
    predicted = scores[None] >= THRESHOLDS[:, None, None]
    truth = true.astype(bool)[None]
    return np.stack([(predicted & truth).sum(1), (predicted & ~truth).sum(1), (~predicted & truth).sum(1)], -1)


def tuned_thresholds(counts: np.ndarray) -> np.ndarray:
    """Each label's threshold of best F1 in ``threshold_counts`` (nearest 0.5 among equals, so
    a label with no rows keeps 0.5)."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * tp / (2 * tp + fp + fn))
    nearness = np.abs(THRESHOLDS - 0.5)
    best = [np.flatnonzero(column == column.max()) for column in f1.T]
    return np.array([THRESHOLDS[ties[np.argmin(nearness[ties])]] for ties in best])


def split_metrics(by_language: dict[str | None, np.ndarray], label_ids: list[str], figures=metrics) -> dict:
    """A split's ``figures`` (``metrics`` or ``multi_label_metrics``) from its tallies by language
    (key None: rows without a language), with ``by_language`` (no confusion matrix) when every
    row has one."""
    found = figures(sum(by_language.values()), label_ids)
    if None not in by_language:
        found["by_language"] = {
            language: {k: v for k, v in figures(by_language[language], label_ids).items() if k != "confusion_matrix"}
            for language in sorted(by_language)
        }
    return found


def headline(result: dict) -> dict[str, float]:
    """A split's figures for a card or a summary line."""
    keys = ("micro_f1", "macro_f1", "subset_accuracy") if "micro_f1" in result else ("accuracy", "macro_f1", "weighted_f1")
    return {key: result[key] for key in keys}


def split_png(result: dict, title: str) -> bytes:
    """The confusion matrix, or for a multi-label model each label's precision, recall and F1."""
    subtitle = f"{title}\n" + ", ".join(f"{key} {value:.3f}" for key, value in headline(result).items())
    if "per_label" in result:
        labels = list(result["per_label"])
        figures = np.round([[result["per_label"][label][key] for key in ("precision", "recall", "f1")]
                            for label in labels], 2)
        return plots.heatmap(figures, labels, ["precision", "recall", "F1"], "label", "", subtitle)
    labels = result["confusion_matrix"]["labels"]
    return plots.heatmap(np.asarray(result["confusion_matrix"]["rows_true_columns_predicted"]), labels, labels,
                         "true", "predicted", subtitle)
