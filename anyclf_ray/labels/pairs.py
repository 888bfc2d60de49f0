"""Contrastive pairs for SetFit's body, drawn on demand (never SetFit's up-front pair list,
quadratic in rows): the sampler of one label a row and the sampler of label sets.

In: the training rows' targets (label positions, or 0/1 rows per label) and a seed. Out:
batches of (anchor, partner, target) row indices, target 1 for a pair that should embed alike.
Memory is linear in rows, whatever the pairs drawn.
"""

from __future__ import annotations

import numpy as np


class PairSampler:
    """Random contrastive pairs drawn on demand: half same-label, half different-label."""

    def __init__(self, labels: np.ndarray, seed: int):
        self.labels = labels
        self.rng = np.random.default_rng(seed)
        self.by_label = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        anchors = self.rng.integers(0, len(self.labels), size)
        positive = self.rng.random(size) < 0.5
        partners = np.empty(size, np.int64)
        for i, (anchor, same) in enumerate(zip(anchors, positive)):
            pool = self.by_label[self.labels[anchor]]
            if same:
                partners[i] = pool[self.rng.integers(0, len(pool))]
            else:  # reject same-label draws; with ≥ 2 labels this ends fast
                while self.labels[partner := self.rng.integers(0, len(self.labels))] == self.labels[anchor]:
                    pass
                partners[i] = partner
        return anchors, partners, positive.astype(np.float32)


class SetPairSampler:
    """Contrastive pairs for label sets, drawn on demand, as SetFit's multi-label sampler scores
    them (1 when the two sets share a label, else 0). An anchor has at least one label, so rows
    with none are never paired with themselves; half its partners share one of its labels (never
    the anchor itself), half lack that label, so every label gets negatives."""

    def __init__(self, labels: np.ndarray, seed: int):
        self.labels = labels.astype(bool)
        self.rng = np.random.default_rng(seed)
        self.anchors = np.flatnonzero(self.labels.any(1))
        self.with_label = [np.flatnonzero(column) for column in self.labels.T]
        self.without_label = [np.flatnonzero(~column) for column in self.labels.T]

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        anchors = self.anchors[self.rng.integers(0, len(self.anchors), size)]
        positive = self.rng.random(size) < 0.5
        partners = np.empty(size, np.int64)
        for i, (anchor, same) in enumerate(zip(anchors, positive)):
            label = self.rng.choice(np.flatnonzero(self.labels[anchor]))
            pool = (self.with_label if same else self.without_label)[label]
            # check_labels leaves every label 2 rows, so another row with it exists
            while (partner := pool[self.rng.integers(0, len(pool))]) == anchor:
                pass
            partners[i] = partner
        shared = (self.labels[anchors] & self.labels[partners]).any(1)
        return anchors, partners, shared.astype(np.float32)
