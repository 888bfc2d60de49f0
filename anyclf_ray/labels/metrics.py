"""Classification metrics, added up batch by batch: a confusion matrix for one label a row,
true and false positives and false negatives per label for label sets.

In: true and predicted labels of a batch (label positions, or 0/1 rows per label). Out:
tallies that add up across batches and languages, then the figures: accuracy, macro- and
weighted-F1 and per-class precision, recall, F1 and support; for label sets micro- and
macro-F1, subset accuracy and Hamming loss, and each label's threshold of best F1. A score with
a zero denominator is 0, as scikit-learn's ``zero_division=0``.
"""

from __future__ import annotations

import numpy as np


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


def set_tally(true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """A multi-label batch's counts, to add up across batches: true positives, false positives
    and false negatives per label, then the rows whose whole set was right, then the rows."""
    true, predicted = true.astype(bool), predicted.astype(bool)
    return np.concatenate([(true & predicted).sum(0), (~true & predicted).sum(0), (true & ~predicted).sum(0),
                           [(true == predicted).all(1).sum(), len(true)]]).astype(np.int64)


def set_metrics(tally: np.ndarray, label_ids: list[str]) -> dict:
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
