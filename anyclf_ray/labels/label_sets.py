"""Label sets of a multi-label run: which sets exist, how many rows each gets, on which leaves.

In: a ``JobSpec`` with ``multi_label.enabled`` and its tree (one subtree per label, as in a
single-label run). Out: the allowed sets with their weights, exact rows per (language, set),
and every (language, set, tree row) leaf with its sample count, in groups a plan adds up without
holding them all: the multi-label counterpart of ``plan.samples_per_leaf``. Pure numpy, no Ray and no model.

The tree stays per label: a set's rows take leaves from its members' subtrees in turn (a
none-of-the-labels row from every label's), so the tree passes cost what a single-label run's
do however many sets there are (20 labels with 1-3 each make 1,350 sets), and each member's
topics reach the set's texts.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from anyclf_ray.core.config import LABEL_SET_SEPARATOR, MAX_LABEL_SETS, JobSpec
from anyclf_ray.core.loading import ConfigError

# The tree's footer key holding the LLM's pair weights (``pair_prior.py``), when asked for.
PRIOR_KEY = "anyclf_ray.labels.pair_prior"


class LabelSets:
    """The allowed label sets (tuples of label positions, the empty set last when some rows
    carry no label), their weights and membership matrix. ``prior``: the LLM's pair weights
    (``pair_prior.py``), under the user's ``pair_weights``; they weigh sets, never forbid one."""

    def __init__(self, spec: JobSpec, prior: dict[str, float] | None = None):
        settings, n_labels = spec.multi_label, len(spec.labels)
        possible = sum(math.comb(n_labels, k) for k in range(settings.min_labels, settings.max_labels + 1))
        if possible > MAX_LABEL_SETS:
            raise ConfigError(f"multi_label.max_labels: {n_labels} labels make {possible} label sets, more than "
                              f"{MAX_LABEL_SETS}; lower max_labels")
        ids = [label.id for label in spec.labels]
        pair_weight = np.ones((n_labels, n_labels))
        for pair, weight in {**(prior or {}), **settings.pair_weights}.items():
            a, b = (ids.index(part) for part in pair.split(LABEL_SET_SEPARATOR))
            pair_weight[a, b] = pair_weight[b, a] = weight
        self.sets, weights = [], []
        for size in range(settings.min_labels, settings.max_labels + 1):
            for members in itertools.combinations(range(n_labels), size):
                weight = math.prod(pair_weight[a, b] for a, b in itertools.combinations(members, 2))
                if weight > 0:
                    self.sets.append(members)
                    weights.append(weight)
        if settings.none_share:
            self.sets.append(())
            weights.append(0.0)
        self.weights = np.asarray(weights)
        self.sizes = np.array([len(members) for members in self.sets])
        self.members = np.zeros((len(self.sets), n_labels), bool)
        for i, members in enumerate(self.sets):
            self.members[i, list(members)] = True
        self.allowed_pairs = [(a, b) for a, b in itertools.combinations(range(n_labels), 2)
                              if pair_weight[a, b] > 0 and settings.max_labels >= 2]
        self.ids = ids

    def key(self, index: int) -> str:
        """A set's ``label_set`` value: its label ids in spec order, joined ('' for none)."""
        return LABEL_SET_SEPARATOR.join(self.ids[i] for i in self.sets[index])

    def rows(self, spec: JobSpec, n_rows: int) -> np.ndarray:
        """Rows per set for ``n_rows`` texts, exactly: the none share, then ``min_rows`` for every
        label and allowed pair (in the smallest, then heaviest, set holding it), then the rest
        by size share and weight, rounded by largest remainder."""
        settings = spec.multi_label
        counts = np.zeros(len(self.sets), np.int64)
        labelled = ~(self.sizes == 0)
        if not labelled.all():
            counts[~labelled] = round(n_rows * settings.none_share)
        # Smallest set first, then the heaviest, then the first listed.
        rank = np.lexsort((np.arange(len(self.sets)), -self.weights, self.sizes))
        order = np.empty_like(rank)
        order[rank] = np.arange(len(rank))
        needs = [[label] for label in range(len(self.ids))] + [list(pair) for pair in self.allowed_pairs]
        for need in needs:
            holds = labelled & self.members[:, need].all(axis=1)
            if not (holds & (counts > 0)).any():
                counts[np.argmin(np.where(holds, order, len(order)))] += settings.min_rows
        rest = n_rows - int(counts.sum())
        if rest < 0:
            raise ConfigError(
                f"n_record_to_generate: {n_rows} rows (in each language) cannot give each of the "
                f"{len(self.ids)} labels and {len(self.allowed_pairs)} allowed pairs multi_label.min_rows "
                f"({settings.min_rows}) rows, "
                f"{n_rows - rest} are needed; raise n_record_to_generate or lower min_rows"
            )
        # Each size's share of the labelled rows, less the floors it already holds.
        sizes = list(range(settings.min_labels, settings.max_labels + 1))
        size_weights = np.asarray(settings.size_weights or [1.0] * len(sizes), float)
        size_weights *= [(self.sizes == size).any() for size in sizes]
        target = (n_rows - counts[~labelled].sum()) * size_weights / size_weights.sum()
        free = np.maximum(0, target - [counts[self.sizes == size].sum() for size in sizes])
        size_rows = apportion(rest, free)
        for size, n_size in zip(sizes, size_rows):
            mine = np.flatnonzero(self.sizes == size)
            counts[mine] += apportion(int(n_size), self.weights[mine])
        return counts


def prior(tree: pa.Table) -> dict[str, float]:
    """The LLM's pair weights stored in a tree's footer; none when the run asked for none."""
    found = (tree.schema.metadata or {}).get(PRIOR_KEY.encode())
    return json.loads(found) if found else {}


def with_prior(tree: pa.Table, weights: dict[str, float]) -> pa.Table:
    """``tree`` with the LLM's pair weights in its footer (kept as they are when none)."""
    if not weights:
        return tree
    return tree.replace_schema_metadata({**(tree.schema.metadata or {}), PRIOR_KEY: json.dumps(weights)})


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """``total`` split in proportion to ``weights`` exactly: floors, then one more to the largest
    remainders (the first on ties)."""
    weights = np.asarray(weights, float)
    if not total or not weights.sum():
        return np.zeros(len(weights), np.int64)
    quota = total * weights / weights.sum()
    whole = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.arange(len(quota)), -(quota - whole)))
    whole[order[: total - int(whole.sum())]] += 1
    return whole


def check(spec: JobSpec) -> None:
    """ConfigError naming the fix when the spec's rows cannot hold its label sets' floors."""
    sets = LabelSets(spec)
    for n_rows in set(per_language(spec)):
        sets.rows(spec, n_rows)


def per_language(spec: JobSpec) -> list[int]:
    """``n_record_to_generate`` split over the languages, the first ones taking the remainder."""
    assert spec.n_record_to_generate is not None  # a multi-label spec gives it (MultiLabelSpec.check)
    return apportion(spec.n_record_to_generate, np.ones(len(spec.languages))).tolist()


# Requests placed at once: the leaves come in groups of about this many requests, so a caller
# that only adds them up (the plan) holds one group at a time whatever the row count.
REQUESTS_AT_ONCE = 1 << 16


def leaf_samples(spec: JobSpec, label_sets: LabelSets, on_leaf: np.ndarray,
                 row_label: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Every (language, tree row, set) leaf and its samples, as groups of four int32 arrays
    (consecutive sets of one language; concatenated, they are sorted by language, set, row).

    A set's rows are cut in requests of ``examples_per_request``; its j-th request goes to member
    ``j mod k`` (of its k labels; every label for the empty set), on that label's leaf
    ``offset + j div k`` in tree order (wrapping), ``offset`` being the set's position, so sets
    start on different leaves. Requests that meet on one leaf are merged.
    """
    # Each set's members in turn, padded: the empty set's turns go to every label.
    turns = [members or range(len(spec.labels)) for members in label_sets.sets]
    turn_label = np.zeros((len(turns), max(map(len, turns))), np.int32)
    for index, members in enumerate(turns):
        turn_label[index, : len(members)] = members
    turn_count = np.array([len(members) for members in turns], np.int32)
    per_request, n_rows = spec.sampling.examples_per_request, on_leaf.shape[1]
    for language, n_language in enumerate(per_language(spec)):
        label_leaves = [np.flatnonzero(on_leaf[language] & (row_label == label))
                        for label in range(len(spec.labels))]
        counts = label_sets.rows(spec, n_language)
        chunks = -(-counts // per_request)
        cuts = np.flatnonzero(np.diff(np.cumsum(chunks) // REQUESTS_AT_ONCE)) + 1
        for sets in np.split(np.arange(len(counts)), cuts):
            chunk_set = np.repeat(sets, chunks[sets]).astype(np.int32)
            first = np.repeat(np.cumsum(chunks[sets]) - chunks[sets], chunks[sets])
            j = (np.arange(len(chunk_set)) - first).astype(np.int32)
            size = turn_count[chunk_set]
            member, position = turn_label[chunk_set, j % size], chunk_set + j // size
            samples = np.minimum(per_request, counts[chunk_set] - j * per_request)
            row = np.empty(len(chunk_set), np.int64)
            for label, leaves in enumerate(label_leaves):
                chosen = member == label
                row[chosen] = leaves[position[chosen] % len(leaves)]
            merged, inverse = np.unique(chunk_set * np.int64(n_rows) + row, return_inverse=True)
            n_samples = np.bincount(inverse, weights=samples)
            yield tuple(column.astype(np.int32) for column in (
                np.full(len(merged), language), merged % n_rows, merged // n_rows, n_samples))
