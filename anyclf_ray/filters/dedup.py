"""Dedup stage: exact, then embedding near-duplicate removal, per label within each language.

A ``FilterStage`` (``stage.py``). In: the rows the stage before it committed. Out, under
``<run>/dedup/``:

- ``data/part-*.parquet``: the kept rows, same schema as the input;
- ``removed/part-*.parquet``: every removed row with ``reason`` (``exact``, ``near`` or
  ``conflict``), ``kept_id`` (the kept row it duplicates; empty for conflicts, where nothing of
  the pair is kept), ``matched_id`` (the row it matched) and their ``similarity``;
- ``embeddings/part-*.parquet``: ``id`` and L2-normalised ``embedding`` of every embedded row
  (the kept rows among them), so training can reuse them;
- ``manifest.json``, last: counts per label and reason, conflicts, settings and timings.

The rules, in order:

1. Rows are ordered by id. Texts equal after Unicode NFKC, case folding and whitespace folding
   are exact duplicates; the first row of each (language, text, label) is its *representative*.
2. Representatives are embedded, and pairs at or above ``threshold`` cosine found within each
   language (``neighbours.near_pairs``). Exact copies across labels count as pairs at 1.0.
3. A pair with different labels (in a multi-label run, different label sets) is a label
   conflict. Policy ``drop`` removes every representative in a conflict; ``keep`` leaves them
   and only counts them.
4. Among the remaining representatives of each label, a row is kept unless it is near an earlier
   kept row (``neighbours.greedy_keepers``), so the keeper is deterministic and every removed
   row has a kept twin above the threshold.
5. A row that is not a representative shares its representative's fate; if the representative
   is kept, the row is removed as its exact copy.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core import cards, embed, runtime
from anyclf_ray.core.config import DedupSpec, JobSpec
from anyclf_ray.core.ids import hash64, stable_id
from anyclf_ray.core.results import Conflicts, DedupReport, EmbeddingsRef, StageResult
from anyclf_ray.core.stage import Context, FilterStage, Input, Outcome, read_shards
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import normalise
from anyclf_ray.filters import neighbours

log = logging.getLogger(__name__)

REASONS = ("exact", "near", "conflict")
AUDIT_FIELDS = [
    pa.field("reason", pa.string()),
    pa.field("kept_id", pa.string()),
    pa.field("matched_id", pa.string()),
    pa.field("similarity", pa.float32()),
]


def _best_partner(ends: np.ndarray, partners: np.ndarray, sims: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each index in ``ends``, its most similar partner and that similarity."""
    partner, similarity = np.full(size, -1, np.int64), np.full(size, np.nan, np.float32)
    order = np.lexsort((-sims, ends))
    unique_ends, first = np.unique(ends[order], return_index=True)
    partner[unique_ends], similarity[unique_ends] = partners[order][first], sims[order][first]
    return partner, similarity


@dataclasses.dataclass
class Fates:
    """What rules 3 and 4 decide of ``n`` representatives in id order: ``reason`` ("" kept,
    ``near`` or ``conflict``), ``matched`` (the index of the kept twin, or of the closest
    partner of another label; -1 for kept rows), their ``similarity``, and the label-conflict
    ``cross_pairs`` found."""

    reason: np.ndarray
    matched: np.ndarray
    similarity: np.ndarray
    cross_pairs: int


def resolve(labels: np.ndarray, left: np.ndarray, right: np.ndarray, sim: np.ndarray, conflicts: str) -> Fates:
    """Rules 3 and 4 over the pairs ``(left, right, sim)`` of representatives indexed in id order
    (``labels``: each one's label, or label set, as a string). A pair found twice (as exact text
    and by embedding, or from two partitions) counts once, at its highest similarity."""
    n = len(labels)
    order = np.argsort(-sim, kind="stable")
    _, first = np.unique(left[order] * n + right[order], return_index=True)
    left, right, sim = left[order][first], right[order][first], sim[order][first]
    cross = labels[left] != labels[right]
    conflicted = np.zeros(n, bool)
    if conflicts == "drop":
        conflicted[left[cross]] = conflicted[right[cross]] = True
    partner, partner_sim = _best_partner(
        np.concatenate([left[cross], right[cross]]), np.concatenate([right[cross], left[cross]]),
        np.concatenate([sim[cross], sim[cross]]), n,
    )
    within = ~cross & ~conflicted[left] & ~conflicted[right]
    kept, kept_by, kept_sim = neighbours.greedy_keepers(n, left[within], right[within], sim[within])
    kept &= ~conflicted
    return Fates(reason=np.where(conflicted, "conflict", np.where(kept, "", "near")).astype(object),
                 matched=np.where(conflicted, partner, kept_by),
                 similarity=np.where(conflicted, partner_sim, kept_sim), cross_pairs=int(cross.sum()))


def representatives(frame: pd.DataFrame) -> np.ndarray:
    """Rule 1: each row's representative, the first row (rows in id order: the lowest id) of its
    group of equal values in every column of ``frame`` (language, normalised text or its hash,
    label); an int64 row index a row."""
    n = len(frame)
    group = frame.groupby(list(frame.columns), sort=False).ngroup().to_numpy()
    first_row = np.full(group.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(first_row, group, np.arange(n))
    return first_row[group]


def decide(rows: pa.Table, embed_texts: Callable[[list[str]], np.ndarray], spec: JobSpec) -> dict:
    """The module's rules applied to ``rows`` (sorted by id) in this process: the reference the
    stage's cluster path (``Dedup.execute``) gives the same kept ids as, for inputs one process
    holds (``bench/quality.py``'s). Returns the kept/removed split.

    The result holds ``kept`` and ``removed`` tables, the representatives' ``embedded_ids`` and
    ``embeddings``, the ``conflict_pairs`` count and per-step ``timings``.
    """
    settings = spec.dedup
    timings, started = {}, time.perf_counter()
    n = rows.num_rows
    texts = rows["text"].to_pylist()
    frame = pd.DataFrame(
        {"language": rows["language"].to_pylist(), "norm": [normalise(t) for t in texts],
         "label": rows[spec.label_column].to_pylist()}
    )
    representative = representatives(frame)
    reps = np.flatnonzero(representative == np.arange(n))
    position = np.full(n, -1, np.int64)
    position[reps] = np.arange(len(reps))
    timings["exact"] = time.perf_counter() - started

    started = time.perf_counter()
    vectors = embed_texts([texts[r] for r in reps])
    timings["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    rep_language = frame["language"].to_numpy()[reps]
    rep_label = frame["label"].to_numpy()[reps]
    lefts, rights, sims = [], [], []
    for language in np.unique(rep_language):
        members = np.flatnonzero(rep_language == language)
        left, right, sim = neighbours.near_pairs(
            vectors[members], settings.threshold, settings.partition_size, settings.probes, settings.seed
        )
        lefts.append(members[left])
        rights.append(members[right])
        sims.append(sim)
    # Representatives with the same normalised text (so different labels) pair at 1.0.
    same_text = frame.iloc[reps].groupby(["language", "norm"], sort=False).ngroup().to_numpy()
    shared = np.flatnonzero(pd.Series(same_text).duplicated(keep=False).to_numpy())
    exact_pairs = [
        pair
        for _, members in pd.Series(shared).groupby(same_text[shared])
        for pair in itertools.combinations(members.tolist(), 2)
    ]
    if exact_pairs:
        pairs = np.asarray(exact_pairs, np.int64)
        lefts.append(pairs[:, 0])
        rights.append(pairs[:, 1])
        sims.append(np.ones(len(pairs), np.float32))
    fates = resolve(rep_label.astype(str), np.concatenate(lefts), np.concatenate(rights), np.concatenate(sims),
                    settings.conflicts)
    rep_kept = fates.reason == ""
    timings["near"] = time.perf_counter() - started

    # Every row's fate, from its representative's.
    ids = np.asarray(rows["id"].to_pylist(), dtype=object)
    p = position[representative]
    is_rep = representative == np.arange(n)
    copy_of_kept = ~is_rep & rep_kept[p]
    kept = is_rep & rep_kept[p]
    reason = np.where(copy_of_kept, "exact", fates.reason[p])
    matched_row = np.where(copy_of_kept, representative, reps[np.maximum(fates.matched[p], 0)])
    similarity = np.where(copy_of_kept, np.float32(1.0), fates.similarity[p])
    removed_mask = ~kept
    audit = {
        "reason": reason[removed_mask].tolist(),
        "kept_id": [None if r == "conflict" else m
                    for r, m in zip(reason[removed_mask], ids[matched_row[removed_mask]])],
        "matched_id": ids[matched_row[removed_mask]].tolist(),
        "similarity": similarity[removed_mask].astype(np.float32),
    }
    removed = rows.filter(pa.array(removed_mask))
    for field in AUDIT_FIELDS:
        removed = removed.append_column(field, pa.array(audit[field.name], field.type))
    return {
        "kept": rows.filter(pa.array(kept)),
        "removed": removed,
        "embedded_ids": ids[reps].tolist(),
        "embeddings": vectors,
        "conflict_pairs": fates.cross_pairs,
        "timings": timings,
    }


# -- on the cluster ------------------------------------------------------------------------------
#
# The stage runs the rules above as Ray tasks and Ray Data operators; the driver holds counts,
# object references and file names, never a column of every row:
#
# 1. ``scatter_rows`` (a task per batch of input shards) keys each row by a 128-bit hash of its language
#    and normalised text and routes it to a bucket of that key; ``exact_groups`` (a task per
#    bucket) finds the representatives, their copies and the same texts under other labels.
# 2. The representatives are embedded by the embedding actors as they stream, and written as the
#    stage's ``embeddings/`` shards, with a sample per language drawn by a hash of the id.
# 3. Per language, ``fit_centroids`` fits the k-means partitions on that sample;
#    ``scatter_to_partitions`` (a task per batch of embeddings shards) writes each row to the groups
#    of its ``probes`` nearest partitions (``placed/``); ``search_partitions`` (a task per group,
#    spread over the nodes) compares each partition's home rows with its members: compact pair
#    records come back.
# 4. ``resolve_language`` (a task per language) applies rules 3 and 4 to that language's pairs;
#    two Ray Data joins give every copy its representative's fate and every row its verdict, and
#    the rows are written kept or removed block by block.

# Rows a bucket (of exact dedup, and of the joins) holds, texts included: one task holds a bucket.
BUCKET_ROWS = 200_000
# Rows a scatter task's piece for one bucket holds at least. Ray keeps a task's return under
# 100 KiB in its owner's memory, here the driver's: a piece per input shard and bucket shrinks as
# rows grow (shards and buckets both grow), and at 10M rows it put 4.3 GB of rows on the driver.
# A scatter task reads as many shards as it takes to fill its pieces (and, placing rows, to write
# files of this size to each search group, not ever smaller ones).
PIECE_ROWS = 4_000
# Every representative's vector once per probe, by search group: ``placed/group-G/batch-B.parquet``.
# The stage's largest intermediate, and all of it exists before the first search starts, so it goes
# to the stage's folder, not the object store (at 10M rows it spilled 46 GB of a 2-core node's disk
# and Ray stopped creating objects). Removed once the pairs are found.
PLACED = "placed"
# Partition search tasks per CPU of the cluster: enough to even out partitions of unequal size;
# more when the placed rows (each row once per probe) would put over BUCKET_ROWS in one task, so
# a task's memory stays the same at any row count.
SEARCH_TASKS_PER_CPU = 4
# The embeddings of representatives in a sample file: each language's k-means sample.
SAMPLE = "sample"
PAIR_SCHEMA = pa.schema([("language", pa.string()), ("left", pa.string()), ("right", pa.string()),
                         ("left_label", pa.string()), ("right_label", pa.string()), ("similarity", pa.float32())])
FATE_SCHEMA = pa.schema([("id", pa.string()), *AUDIT_FIELDS])


def _refs(found: ray.ObjectRef | list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """A task's returns as a list (``num_returns=1`` gives one reference, not a list)."""
    return found if isinstance(found, list) else [found]


def _returns(tables: list[pa.Table]) -> pa.Table | tuple[pa.Table, ...]:
    """A task's tables as its returns (one return is the value itself, not a tuple of one)."""
    return tables[0] if len(tables) == 1 else tuple(tables)


def shard_batches(shards: list[str], rows: int, pieces: int) -> list[list[str]]:
    """``shards`` (of ``rows`` rows in all, about evenly) in consecutive batches, one a scatter
    task, each large enough that split ``pieces`` ways it gives ``PIECE_ROWS`` rows a piece."""
    size = max(1, math.ceil(PIECE_ROWS * pieces * len(shards) / max(1, rows)))
    return [shards[start : start + size] for start in range(0, len(shards), size)]


@ray.remote
def scatter_rows(location: RunLocation, shards: list[str], key_column: str,
                 buckets: int) -> pa.Table | tuple[pa.Table, ...]:
    """Input shards' ``id, text, language, label`` and ``text_key`` (a 128-bit hash of the
    language and the normalised text), split into ``buckets`` by that key."""
    table = read_shards(location, shards, ["id", "text", "language", key_column])
    table = table.rename_columns(["id", "text", "language", "label"])
    keys = [hashlib.blake2b(f"{language}\x1f{normalise(text)}".encode(), digest_size=16).digest()
            for language, text in zip(table["language"].to_pylist(), table["text"].to_pylist())]
    table = table.append_column("text_key", pa.array(keys, pa.binary(16)))
    bucket = np.array([int.from_bytes(key[:8], "big") % buckets for key in keys])
    return _returns([table.filter(pa.array(bucket == b)) for b in range(buckets)])


@ray.remote(num_returns=4)
def exact_groups(*parts: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, int]]:
    """Rules 1 and 2's exact half on one bucket (every row of a text is in it): the
    representatives (``id, text, language, label``), the copies (``id, rep_id``), pairs of
    representatives with the same text and other labels (``PAIR_SCHEMA``, at 1.0), and the
    representatives per language."""
    table = pa.concat_tables(parts).sort_by("id")
    representative = representatives(table.select(["language", "text_key", "label"]).to_pandas())
    is_rep = representative == np.arange(table.num_rows)
    ids = np.asarray(table["id"].to_pylist(), dtype=object)
    reps = table.filter(pa.array(is_rep))
    copies = pa.table({"id": pa.array(ids[~is_rep].tolist(), pa.string()),
                       "rep_id": pa.array(ids[representative[~is_rep]].tolist(), pa.string())})
    twins = [
        (language, left["id"], right["id"], left["label"], right["label"], 1.0)
        for (language, _), members in reps.select(["id", "language", "text_key", "label"]).to_pandas()
        .groupby(["language", "text_key"], sort=False)
        if len(members) > 1
        for left, right in itertools.combinations(members.to_dict("records"), 2)
    ]
    pairs = pa.Table.from_pylist([dict(zip(PAIR_SCHEMA.names, twin)) for twin in twins], PAIR_SCHEMA)
    languages = collections.Counter(reps["language"].to_pylist())
    return reps.select(["id", "text", "language", "label"]), copies, pairs, dict(languages)


def write_embedded(batch: dict[str, np.ndarray], location: RunLocation, folder: str, sample_folder: str,
                   model: str, rates: dict[str, float], seed: int) -> dict[str, list]:
    """Ray Data function: a block of embedded representatives written as an embeddings shard
    (``id, embedding, language, label``), and its rows in their language's k-means sample
    (``rates``: the share of a language sampled) as a sample shard beside it."""
    ids = [str(i) for i in batch["id"]]
    table = embed.embeddings_table(ids, batch["embedding"], model)
    table = table.append_column("language", pa.array(batch["language"].tolist(), pa.string()))
    table = table.append_column("label", pa.array(batch["label"].tolist(), pa.string()))
    name = f"part-{stable_id(len(ids), min(ids), max(ids))}.parquet"
    location.write_table(f"{folder}/{name}", table)
    rate = np.array([rates[language] for language in table["language"].to_pylist()])
    chosen = hash64(ids, f"sample-{seed}") < rate * float(2**64)
    location.write_table(f"{sample_folder}/{name}", table.filter(pa.array(chosen)))
    return {"path": [f"{folder}/{name}"], "rows": [len(ids)]}


@ray.remote
def fit_centroids(location: RunLocation, samples: list[str], language: str, k: int, seed: int) -> np.ndarray:
    """``language``'s k-means partitions (``neighbours.spherical_kmeans``) fitted on its sample."""
    tables = [location.read_table(path, columns=["id", "language", "embedding"]) for path in samples]
    sample = pa.concat_tables(tables).filter(pc.field("language") == language).sort_by("id")
    x = np.stack(sample["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    return neighbours.spherical_kmeans(x, min(k, len(x)), np.random.default_rng(seed))


def placed_path(folder: str, group: int, batch: int | None = None) -> str:
    """A search group's folder of placed rows, or one scatter task's file in it."""
    return f"{folder}/group-{group:05d}" + ("" if batch is None else f"/batch-{batch:05d}.parquet")


@ray.remote
def scatter_to_partitions(location: RunLocation, shards: list[str], folder: str, batch: int, probes: int, groups: int,
                          languages: list[str], *centroids: np.ndarray) -> int:
    """Embeddings shards' rows, once per partition among their ``probes`` nearest (``home``: the
    nearest) of their language's ``centroids``, written to ``groups`` files by (language,
    partition), one a group (``placed_path``, empty ones too); the rows placed."""
    table = read_shards(location, shards, ["id", "language", "label", "embedding"])
    pieces = []
    for language, found in zip(languages, centroids):
        rows = table.filter(pc.field("language") == language)
        if not rows.num_rows:
            continue
        x = np.stack(rows["embedding"].to_numpy(zero_copy_only=False))
        nearest = neighbours.nearest_centroids(x, found, probes)
        for probe in range(nearest.shape[1]):
            piece = rows.append_column("partition", pa.array(nearest[:, probe], pa.int32()))
            pieces.append(piece.append_column("home", pa.array(np.full(rows.num_rows, probe == 0))))
    empty = table.schema.append(pa.field("partition", pa.int32())).append(pa.field("home", pa.bool_()))
    placed = pa.concat_tables(pieces) if pieces else empty.empty_table()
    salt = hash64(placed["language"].to_pylist())
    group = (salt + placed["partition"].to_numpy().astype(np.uint64)) % np.uint64(groups)
    for g in range(groups):
        location.write_table(placed_path(folder, g, batch), placed.filter(pa.array(group == g)))
    return placed.num_rows


@ray.remote(scheduling_strategy="SPREAD")
def search_partitions(location: RunLocation, folder: str, group: int, threshold: float, *scattered: int) -> pa.Table:
    """The pairs at or above ``threshold`` of every partition in search group ``group``
    (``PAIR_SCHEMA``): each partition's home rows against all its members
    (``neighbours.partition_pairs``). ``scattered``: the scatter tasks' results, awaited so that
    the group's files are all written."""
    table = read_shards(location, location.list(placed_path(folder, group)))
    table = table.sort_by([("language", "ascending"), ("partition", "ascending"), ("id", "ascending")])
    if not table.num_rows:
        return PAIR_SCHEMA.empty_table()
    language, partition = table["language"].to_numpy(zero_copy_only=False), table["partition"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (language[1:] != language[:-1]) | (partition[1:] != partition[:-1])])
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    ids, labels = np.asarray(table["id"].to_pylist(), object), np.asarray(table["label"].to_pylist(), object)
    home = table["home"].to_numpy(zero_copy_only=False)
    found = []
    for start, end in zip(starts, np.r_[starts[1:], table.num_rows]):
        members = np.arange(start, end)  # in id order: their positions order as their ids
        homes = members[home[start:end]]
        if len(homes) and len(members) > 1:
            left, right, sim = neighbours.partition_pairs(homes, vectors[homes], members, vectors[members], threshold)
            columns = [np.full(len(left), language[start]), ids[left], ids[right], labels[left], labels[right]]
            found.append(pa.table([*(pa.array(column.tolist(), pa.string()) for column in columns),
                                   pa.array(sim, pa.float32())], schema=PAIR_SCHEMA))
    return pa.concat_tables(found) if found else PAIR_SCHEMA.empty_table()


@ray.remote(num_returns=2)
def resolve_language(language: str, conflicts: str, *pairs: pa.Table) -> tuple[pa.Table, int]:
    """Rules 3 and 4 on one language's pairs: the representatives removed (``FATE_SCHEMA``) and
    the label-conflict pairs found."""
    table = pa.concat_tables(pairs).filter(pc.field("language") == language)
    left, right = table["left"].to_numpy(zero_copy_only=False), table["right"].to_numpy(zero_copy_only=False)
    ids, index = np.unique(np.concatenate([left, right]), return_inverse=True)  # sorted: the id order
    labels = np.empty(len(ids), object)
    labels[index] = np.concatenate([table["left_label"].to_numpy(zero_copy_only=False),
                                    table["right_label"].to_numpy(zero_copy_only=False)])
    fates = resolve(labels.astype(str), index[: len(left)], index[len(left) :],
                    table["similarity"].to_numpy(), conflicts)
    removed = fates.reason != ""
    matched = ids[np.maximum(fates.matched[removed], 0)]
    reason = fates.reason[removed]
    return pa.table([pa.array(ids[removed].tolist(), pa.string()), pa.array(reason.tolist(), pa.string()),
                     pa.array([None if r == "conflict" else m for r, m in zip(reason, matched)], pa.string()),
                     pa.array(matched.tolist(), pa.string()),
                     pa.array(fates.similarity[removed], pa.float32())], schema=FATE_SCHEMA), fates.cross_pairs


def copy_fates(batch: pa.Table) -> pa.Table:
    """Ray Data function: copies joined with their representative's fate (``rep_`` columns, null
    for a kept representative) → their own fate (rule 5)."""
    kept = pc.is_null(batch["rep_reason"])
    return pa.table([batch["id"], pc.if_else(kept, "exact", batch["rep_reason"]),
                     pc.if_else(kept, batch["rep_id"], batch["rep_kept_id"]),
                     pc.if_else(kept, batch["rep_id"], batch["rep_matched_id"]),
                     pc.if_else(kept, pa.scalar(1.0, pa.float32()), batch["rep_similarity"])], schema=FATE_SCHEMA)


class Dedup(FilterStage[DedupReport, None]):
    """The dedup stage on the stage contract: ``decide`` above, with embeddings kept for reuse."""

    name = "dedup"
    section = "dedup"
    report_type = DedupReport
    card_config = "deduplicated"

    @property
    def settings(self) -> DedupSpec:
        return self.spec.dedup

    @property
    def reasons(self) -> tuple[str, ...]:
        return REASONS

    def check(self, location: RunLocation) -> None:
        embed.check_model(self.settings.model, "dedup.model")

    def execute(self, ctx: Context, upstream: Input | None, checked: None) -> Outcome[DedupReport]:
        """The rules on the cluster (the steps above); rows, embeddings and pairs stay in the
        object store and the stage's shards."""
        assert upstream is not None
        settings, location, spec = self.settings, ctx.location, self.spec
        shards = self.input_shards(location, upstream)
        placement = runtime.resolve_placement(settings, "dedup")
        log.info("dedup: %d rows with %s on %s", upstream.rows, settings.model, placement.device)
        buckets = max(1, math.ceil(upstream.rows / BUCKET_ROWS))
        timings, started = {}, time.perf_counter()
        scatter = scatter_rows.options(num_returns=buckets)
        scattered = [_refs(scatter.remote(location, batch, spec.label_column, buckets))
                     for batch in shard_batches(shards, upstream.rows, buckets)]
        rep_refs, copy_refs, twin_refs, language_refs = zip(
            *(exact_groups.remote(*(refs[b] for refs in scattered)) for b in range(buckets)))
        # Here and below: pieces are freed as soon as the tasks that read them are done.
        del scattered
        per_language: collections.Counter = collections.Counter()
        for found in ray.get(list(language_refs)):
            per_language.update(found)
        timings["exact"] = time.perf_counter() - started

        started = time.perf_counter()
        partitions = {language: math.ceil(n / settings.partition_size) for language, n in per_language.items() if n > 1}
        rates = {language: min(1.0, neighbours.SAMPLE_PER_CENTROID * partitions.get(language, 1) / n)
                 for language, n in per_language.items()}
        embedded = embed.embedded(ray.data.from_arrow_refs(list(rep_refs)), settings.model, placement,
                                  settings.batch_size)
        write = functools.partial(write_embedded, location=location, folder=self.data_path("embeddings"),
                                  sample_folder=self.data_path(SAMPLE), model=settings.model, rates=rates,
                                  seed=settings.seed)
        written = embedded.map_batches(write, batch_size=spec.output.rows_per_shard, batch_format="numpy",
                                       num_cpus=runtime.TASK_CPUS).take_all()
        del embedded, rep_refs
        embedding_shards = sorted(row["path"] for row in written)
        dim = location.read_footer(embedding_shards[0]).schema.to_arrow_schema().field("embedding").type.list_size
        embeddings = EmbeddingsRef(model=settings.model, rows=sum(row["rows"] for row in written), dim=dim,
                                   shards=embedding_shards)
        timings["embed"] = time.perf_counter() - started

        started = time.perf_counter()
        samples = location.list(self.data_path(SAMPLE))
        languages = sorted(partitions)
        centroids = [fit_centroids.remote(location, samples, language, partitions[language], settings.seed)
                     for language in languages]
        placed_rows = embeddings.rows * settings.probes
        spread = max(SEARCH_TASKS_PER_CPU * int(ray.cluster_resources()["CPU"]), math.ceil(placed_rows / BUCKET_ROWS))
        groups = max(1, min(sum(partitions.values()), spread))
        folder = self.data_path(PLACED)
        location.delete(folder)  # an interrupted attempt's files
        scattered = [scatter_to_partitions.remote(location, batch, folder, index, settings.probes, groups, languages,
                                                  *centroids)
                     for index, batch in enumerate(shard_batches(embedding_shards, placed_rows, groups))]
        pairs = [search_partitions.remote(location, folder, g, settings.threshold, *scattered) for g in range(groups)]
        fate_refs, cross_refs = zip(*(resolve_language.remote(language, settings.conflicts, *pairs, *twin_refs)
                                      for language in sorted(per_language)))
        del pairs, twin_refs
        cross_pairs = sum(ray.get(list(cross_refs)))
        location.delete(folder)
        timings["near"] = time.perf_counter() - started

        started = time.perf_counter()
        fates = ray.data.from_arrow_refs(list(fate_refs))
        rep_fates = fates.rename_columns({name: f"rep_{name}" for name in FATE_SCHEMA.names})
        copies = ray.data.from_arrow_refs(list(copy_refs)).join(rep_fates, "left_outer", buckets, on=("rep_id",))
        verdicts = fates.union(copies.map_batches(copy_fates, batch_format="pyarrow", num_cpus=runtime.TASK_CPUS))
        shards_written, total = self.split(ctx, shards, verdicts, AUDIT_FIELDS, partitions=buckets)
        timings["write"] = time.perf_counter() - started
        conflicts = Conflicts(policy=settings.conflicts, pairs=cross_pairs,
                              rows_removed=sum(row["rows"] for row in total["by_language_reason"]
                                               if row["reason"] == "conflict"))
        return self.outcome(ctx, total, {"conflicts": conflicts}, shards_written, embeddings, timings,
                            incomplete=False)

    def describe(self, result: StageResult[DedupReport]) -> str:
        model = cards.shown(self.settings.model)
        return f"{super().describe(result)} at cosine {self.settings.threshold} with `{model}`"
