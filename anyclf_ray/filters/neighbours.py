"""Near-neighbour pairs above a cosine threshold, without comparing all pairs.

In: L2-normalised embeddings (n × d, float32). Out: every pair (i, j), i < j, whose cosine
similarity is at least the threshold, with that similarity; and a deterministic choice of
keepers among them.

The method follows SemDeDup (partition, then compare inside partitions) with two changes that
matter for recall and memory:

- **Partitions** come from spherical k-means with ``k = ceil(n / partition_size)``, fitted on a
  bounded sample. Each row is compared from its nearest centroid (its *home*) against every row
  that has that centroid among its ``probes`` nearest, so a pair split across a partition border
  is still found when either row lists the other's home among its ``probes`` nearest.
- **Blocks**: a partition is compared ``block_rows`` home rows at a time, so memory is
  ``block_rows × partition members`` floats, never ``n²`` or even ``partition²``.

Work grows as ``n × partition_size × probes`` plus the centroid assignment ``n × k``.
"""

from __future__ import annotations

import math

import numpy as np

KMEANS_ITERATIONS = 10
# Near pairs one partition's search may hold (about 2 GB once written as id records) before it
# stops: an embedder that scores almost every pair above the threshold (a threshold too low for
# it, or a degenerate model) would otherwise fill memory with n² pairs, and Ray would retry the
# task it kills without end.
MAX_PARTITION_PAIRS = 20_000_000
SAMPLE_PER_CENTROID = 128
ASSIGN_CHUNK = 16_384


def spherical_kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` unit centroids fitted by Lloyd's iterations on a sample of at most 128·k rows."""
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), SAMPLE_PER_CENTROID * k), replace=False))]
    centroids = sample[rng.choice(len(sample), size=k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        home = np.argmax(sample @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, home, sample)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        # An empty cluster restarts at a random sample row rather than dying.
        sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()))]
        norms[empty] = 1.0
        centroids = (sums / norms).astype(x.dtype)
    return centroids


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """Indices (n × probes) of each row's nearest centroids, nearest first, in bounded chunks."""
    probes = min(probes, len(centroids))
    out = np.empty((len(x), probes), dtype=np.int32)
    for start in range(0, len(x), ASSIGN_CHUNK):
        scores = x[start : start + ASSIGN_CHUNK] @ centroids.T
        top = np.argpartition(-scores, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + ASSIGN_CHUNK] = np.take_along_axis(top, order, axis=1)
    return out


def near_pairs(
    x: np.ndarray,
    threshold: float,
    partition_size: int = 2000,
    probes: int = 3,
    seed: int = 0,
    block_rows: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(left, right, similarity)`` with ``left < right`` and similarity ≥ ``threshold``."""
    n = len(x)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    k = max(1, math.ceil(n / partition_size))
    centroids = spherical_kmeans(x, k, np.random.default_rng(seed))
    nearest = nearest_centroids(x, centroids, probes)
    homes = nearest[:, 0]
    home_order = np.argsort(homes, kind="stable")
    home_bounds = np.searchsorted(homes[home_order], np.arange(k + 1))
    member_rows = np.repeat(np.arange(n), nearest.shape[1])
    member_centroid = nearest.ravel()
    member_order = np.argsort(member_centroid, kind="stable")
    member_bounds = np.searchsorted(member_centroid[member_order], np.arange(k + 1))

    found = []
    for c in range(k):
        home = home_order[home_bounds[c] : home_bounds[c + 1]]
        members = member_rows[member_order[member_bounds[c] : member_bounds[c + 1]]]
        if len(home) and len(members) > 1:
            found.append(partition_pairs(home, x[home], members, x[members], threshold, block_rows))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    left, right, sim = (np.concatenate(column) for column in zip(*found))
    # A pair seen from both rows' partitions is reported once.
    _, first = np.unique(left.astype(np.int64) * n + right, return_index=True)
    return left[first].astype(np.int64), right[first].astype(np.int64), sim[first].astype(np.float32)


def partition_pairs(home: np.ndarray, home_vectors: np.ndarray, members: np.ndarray, member_vectors: np.ndarray,
                    threshold: float, block_rows: int = 1024,
                    max_pairs: int = MAX_PARTITION_PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One partition's pairs: each ``home`` row (its keys, and its vectors) against every
    member, ``block_rows`` home rows at a time; ``(left, right, similarity)`` with ``left < right``
    by key (any keys that order: row indices, or ids), a row never paired with itself.
    ValueError (naming ``dedup.threshold``) past ``max_pairs`` pairs."""
    found_left, found_right, found_sim = [], [], []
    for start in range(0, len(home), block_rows):
        rows = home[start : start + block_rows]
        sims = home_vectors[start : start + block_rows] @ member_vectors.T
        i, j = np.nonzero(sims >= threshold)
        left, right = rows[i], members[j]
        distinct, first = left != right, left < right
        found_left.append(np.where(first, left, right)[distinct])
        found_right.append(np.where(first, right, left)[distinct])
        # Rounding can put a vector's similarity to its copy a hair above 1.
        found_sim.append(np.minimum(sims[i, j][distinct], 1.0).astype(np.float32))
        pairs = sum(len(found) for found in found_left)
        if pairs > max_pairs:
            raise ValueError(f"dedup.threshold: over {max_pairs:,} pairs at or above {threshold} among "
                             f"{len(members):,} rows of one partition; the embedder finds nearly every pair a "
                             "near-duplicate: raise dedup.threshold, or choose another dedup.model")
    return np.concatenate(found_left), np.concatenate(found_right), np.concatenate(found_sim)


def greedy_keepers(
    n: int, left: np.ndarray, right: np.ndarray, sim: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep rows in index order unless they are near an already kept row.

    Returns ``(kept, kept_by, similarity)``: a mask of kept rows; for each removed row the index
    of the kept row it duplicates (its most similar kept neighbour, -1 for kept rows) and their
    similarity. So every removed row has a kept twin at or above the threshold, no two kept rows
    are a found pair, and the result depends only on the order of the rows.
    """
    kept = np.ones(n, dtype=bool)
    kept_by = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan, dtype=np.float32)
    # Pairs by the later row, most similar first: deciding a row only needs earlier rows decided.
    order = np.lexsort((-sim, right))
    for a, b, s in zip(left[order].tolist(), right[order].tolist(), sim[order].tolist()):
        if kept[b] and kept[a]:
            kept[b], kept_by[b], similarity[b] = False, a, s
    return kept, kept_by, similarity
