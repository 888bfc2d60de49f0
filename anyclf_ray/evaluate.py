"""Evaluation: the trained classifier on held-out synthetic rows and on an optional real set.

In: confusion matrices of true and predicted label indices per split and language (tallied batch by
batch as the rows stream past, ``train.py``); for the real set, its file and column settings
(``train.eval_set``). Out: ``eval/metrics.json`` (accuracy, macro-F1, weighted-F1, per-class
precision, recall, F1 and support, the confusion matrix) and ``eval/confusion-<split>.png``.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.fs as pafs
import pyarrow.json
import pyarrow.parquet as pq

from anyclf_ray import plots, storage
from anyclf_ray.config import ConfigError, EvalSetSpec

# Each reader takes a file opened on its filesystem, local or S3.
READERS = {"parquet": pq.read_table, "csv": pyarrow.csv.read_csv, "jsonl": pyarrow.json.read_json,
           "json": pyarrow.json.read_json}


def _read_datasets_folder(path: str) -> pa.Table:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"train.eval_set.path: {path} is not a `datasets` folder ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
    return loaded.data.table


def _read(path: str) -> pa.Table:
    """The eval set at ``path``: a local or ``s3://`` file, or a local ``datasets`` folder."""
    filesystem, resolved = storage.resolve(path)
    kind = filesystem.get_file_info(resolved).type
    if kind == pafs.FileType.Directory and isinstance(filesystem, pafs.LocalFileSystem):
        return _read_datasets_folder(resolved)
    reader = READERS.get(storage.extension(resolved))
    if reader is None:
        raise ConfigError(f"train.eval_set.path: {path}: use a .parquet, .csv or .jsonl file or a local `datasets` folder")
    if kind != pafs.FileType.File:
        raise ConfigError(f"train.eval_set.path: {path}: no such file")
    try:
        with filesystem.open_input_file(resolved) as stream:
            return reader(stream)
    except (pa.ArrowInvalid, OSError) as error:
        raise ConfigError(f"train.eval_set.path: cannot read {path} ({str(error).splitlines()[0]})") from None


def load_eval_set(settings: EvalSetSpec, label_ids: list[str]) -> tuple[list[str], list[str], list[str] | None]:
    """Texts, job label ids and languages (None without ``language_column``) of the real set;
    ConfigError naming the field to fix."""
    table = _read(settings.path)
    columns = [("text_column", settings.text_column), ("label_column", settings.label_column)]
    if settings.language_column:
        columns.append(("language_column", settings.language_column))
    for field, column in columns:
        if column not in table.column_names:
            raise ConfigError(
                f"train.eval_set.{field}: {settings.path} has no column {column!r}; it has {table.column_names}"
            )
    texts = [str(t) for t in table[settings.text_column].to_pylist()]
    raw_labels = [str(v) for v in table[settings.label_column].to_pylist()]
    labels = [settings.label_map.get(v, v) for v in raw_labels]
    unknown = sorted({raw for raw, label in zip(raw_labels, labels) if label not in label_ids})
    if unknown:
        raise ConfigError(
            f"train.eval_set.label_map: value {unknown[0]!r} of {settings.label_column!r} maps to no job label; "
            f"map it to one of {label_ids}"
        )
    languages = [str(v) for v in table[settings.language_column].to_pylist()] if settings.language_column else None
    return texts, labels, languages


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


def split_metrics(by_language: dict[str | None, np.ndarray], label_ids: list[str]) -> dict:
    """A split's ``metrics`` from its confusion matrices by language (key None: rows without a
    language), with ``by_language`` (no confusion matrix) when every row has one."""
    found = metrics(sum(by_language.values()), label_ids)
    if None not in by_language:
        found["by_language"] = {
            language: {k: v for k, v in metrics(by_language[language], label_ids).items() if k != "confusion_matrix"}
            for language in sorted(by_language)
        }
    return found


def confusion_png(result: dict, title: str) -> bytes:
    labels = result["confusion_matrix"]["labels"]
    return plots.heatmap(
        np.asarray(result["confusion_matrix"]["rows_true_columns_predicted"]), labels, labels, "true", "predicted",
        f"{title}\naccuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}",
    )
