"""Weak spots: where a trained classifier fails, measured exactly from its scored rows.

In: scored rows: held-out rows (``id``, ``text``, ``label``, ``language``, ``source_type``,
``topic``, ``subtopic``) and, optionally, the dev set's (``text``, ``label``, ``language``), each
with ``scores``, the classifier's probability per label in the order of ``label_ids``. Out: one
table (``SPOT_SCHEMA``, written as ``rounds/<k>/weak_spots.parquet``) of three kinds of spot,
each ranked weakest first (``rank`` 0):

- ``confusion``: per label pair (``label`` true, ``predicted`` the label said instead) with at
  least one held-out confusion: ``errors`` (= ``rows``) the confusions, the leaf most of them
  came from, their mean margin and the confused ``text`` of lowest margin; ranked by confusions;
- ``leaf``: per leaf (``label``, ``language``, ``source_type``, ``topic``, ``subtopic``): held-out
  ``rows``, ``errors``, ``error_rate``, ``mean_margin`` and its most frequent wrong prediction;
  ranked by error rate, then margin (lowest first);
- ``dev_error``: per misclassified dev text: the ``text``, its true ``label``, the ``predicted``
  one and its margin; ranked by margin.

A row's margin is the probability of its true label less the highest probability of any other
label: below 0 it is misclassified (ties go to the first label, as argmax does). Pure: no Ray.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pyarrow as pa

from anyclf_ray.labels import metrics as label_metrics

LEAF = ("label", "language", "source_type", "topic", "subtopic")
SPOT_SCHEMA = pa.schema([
    ("round", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("label", pa.string()),
    ("predicted", pa.string()), ("language", pa.string()), ("source_type", pa.string()), ("topic", pa.string()),
    ("subtopic", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()), ("error_rate", pa.float64()),
    ("mean_margin", pa.float64()), ("text", pa.string()),
])
KINDS = ("confusion", "leaf", "dev_error")


def predictions(scored: pa.Table, label_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's true label index, predicted index (argmax) and margin."""
    position = {label: i for i, label in enumerate(label_ids)}
    true = np.array([position[label] for label in scored["label"].to_pylist()], np.int64)
    scores = np.array(scored["scores"].to_pylist(), np.float64).reshape(len(true), len(label_ids))
    predicted = scores.argmax(axis=1) if len(true) else np.zeros(0, np.int64)
    own = scores[np.arange(len(true)), true]
    others = scores.copy()
    others[np.arange(len(true)), true] = -np.inf
    margin = own - others.max(axis=1) if len(true) else np.zeros(0)
    return true, predicted, margin


def figures(scored: pa.Table, label_ids: list[str]) -> dict:
    """Accuracy, macro- and weighted-F1 and the confusion matrix of the scored rows."""
    true, predicted, _ = predictions(scored, label_ids)
    return label_metrics.metrics(label_metrics.confusion(true, predicted, len(label_ids)), label_ids)


def _most_common(values: list) -> Any:
    """The most frequent value; ties to the smallest as text (a stable choice)."""
    counts = collections.Counter(values)
    return min(counts, key=lambda value: (-counts[value], str(value)))


def measure(held_out: pa.Table, dev: pa.Table | None, label_ids: list[str], round_: int) -> pa.Table:
    """The weak spots of the scored ``held_out`` rows and ``dev`` rows (module docstring)."""
    spots: list[dict] = []
    true, predicted, margin = predictions(held_out, label_ids)
    rows = held_out.select(["text", *LEAF]).to_pylist()
    by_pair: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    by_leaf: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        by_leaf[tuple(row[key] for key in LEAF)].append(i)
        if predicted[i] != true[i]:
            by_pair[(int(true[i]), int(predicted[i]))].append(i)
    pairs = sorted(by_pair.items(), key=lambda item: (-len(item[1]), item[0]))
    for rank, ((a, b), members) in enumerate(pairs):
        leaf = _most_common([tuple(rows[i][key] for key in LEAF[1:]) for i in members])
        weakest = min(members, key=lambda i: (margin[i], rows[i]["text"]))
        spots.append({"kind": "confusion", "rank": rank, "label": label_ids[a], "predicted": label_ids[b],
                      **dict(zip(LEAF[1:], leaf)), "rows": len(members), "errors": len(members), "error_rate": None,
                      "mean_margin": float(np.mean(margin[members])), "text": rows[weakest]["text"]})
    leaves = []
    for key, members in by_leaf.items():
        wrong = [i for i in members if predicted[i] != true[i]]
        leaves.append({"kind": "leaf", **dict(zip(LEAF, key)), "rows": len(members), "errors": len(wrong),
                       "error_rate": len(wrong) / len(members), "mean_margin": float(np.mean(margin[members])),
                       "predicted": label_ids[_most_common([int(predicted[i]) for i in wrong])] if wrong else None,
                       "text": None})
    leaves.sort(key=lambda spot: (-spot["error_rate"], spot["mean_margin"], tuple(map(str, (spot[k] for k in LEAF)))))
    spots += [{**spot, "rank": rank} for rank, spot in enumerate(leaves)]
    if dev is not None and dev.num_rows:
        true, predicted, margin = predictions(dev, label_ids)
        texts, languages = dev["text"].to_pylist(), dev["language"].to_pylist()
        wrong = sorted((i for i in range(len(texts)) if predicted[i] != true[i]), key=lambda i: (margin[i], texts[i]))
        spots += [{"kind": "dev_error", "rank": rank, "label": label_ids[true[i]], "predicted": label_ids[predicted[i]],
                   "language": languages[i], "rows": 1, "errors": 1, "error_rate": 1.0,
                   "mean_margin": float(margin[i]), "text": texts[i]} for rank, i in enumerate(wrong)]
    return pa.Table.from_pylist([{**spot, "round": round_} for spot in spots], schema=SPOT_SCHEMA)


def summary(spots: pa.Table, top: int = 3) -> dict:
    """Spots per kind and the ``top`` weakest of each, as plain records (a report's figures)."""
    found: dict = {"by_kind": {}, "weakest": {}}
    kinds = spots["kind"].to_pylist()
    for kind in KINDS:
        chosen = [row for row, k in zip(spots.to_pylist(), kinds) if k == kind]
        found["by_kind"][kind] = len(chosen)
        found["weakest"][kind] = [{key: row[key] for key in ("label", "predicted", "topic", "subtopic", "rows",
                                                              "errors", "error_rate", "mean_margin")}
                                  for row in sorted(chosen, key=lambda r: r["rank"])[:top]]
    return found
