"""Sentence embeddings on replicated Ray actors.

In: texts, a sentence-transformers model (a reference, or a Ray Train checkpoint of one) and an
``ActorPlacement``. Out: an
``(n, d)`` float32 array of L2-normalised embeddings in the input's order. Each actor loads
the model once (on a GPU when the placement resolved to ``cuda``) and encodes batches streamed
to it by Ray Data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train

from anyclf_ray.core import models, runtime
from anyclf_ray.core.config import ActorPlacement
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import EmbeddingsRef, StageResult
from anyclf_ray.core.storage import RunLocation

EMBEDDING_MODEL_KEY = "anyclf_ray.embedding_model"


class Embedder:
    """Ray Data callable class: a batch with ``text`` → the batch with ``embedding`` in its place."""

    def __init__(self, model: str | ray.train.Checkpoint, device: str, batch_size: int, threads: int):
        runtime.use_threads(device, threads)
        self.model = load(model, device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.model.encode(
            list(batch["text"]), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        others = {column: values for column, values in batch.items() if column != "text"}
        return {**others, "embedding": vectors.astype(np.float32)}


def load(model: str | ray.train.Checkpoint, device: str):
    """A ``SentenceTransformer`` from a model reference or a Ray Train checkpoint of one."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model, ray.train.Checkpoint):  # it may sit on another node's storage (S3)
        with checkpoint_folder(model) as folder:
            return SentenceTransformer(folder, device=device)
    return SentenceTransformer(models.resolve_embedder(model), device=device)


def checkpoint_folder(checkpoint: ray.train.Checkpoint) -> tempfile.TemporaryDirectory:
    """A private local copy of ``checkpoint``, deleted with the returned object (or its ``with``).

    Not ``to_directory()``'s default folder: all processes on a node share that one, and a process
    that arrives after the download has finished downloads again into it, under its readers.
    """
    scratch = tempfile.TemporaryDirectory(prefix="anyclf-checkpoint-")
    checkpoint.to_directory(scratch.name)
    return scratch


def check_model(reference: str, field: str) -> None:
    """ConfigError naming the spec ``field`` unless the model can be loaded from here."""
    try:
        models.check_available(reference)
    except ValueError as error:
        raise ConfigError(f"{field}: {error}") from None


def embedded(dataset: ray.data.Dataset, model: str | ray.train.Checkpoint, placement: ActorPlacement,
             batch_size: int) -> ray.data.Dataset:
    """``dataset`` with ``embedding`` in place of ``text`` (other columns kept), computed by
    ``placement.replicas`` actors as the rows stream past."""
    return runtime.actor_map(dataset, Embedder, {"model": model, "batch_size": batch_size}, placement,
                             batch_size * 4, "numpy")


def embed(texts: list[str], model: str | ray.train.Checkpoint, placement: ActorPlacement,
          batch_size: int) -> np.ndarray:
    """Embeddings of ``texts`` (in order) from ``placement.replicas`` actors; Ray must be up."""
    table = pa.table({"row": np.arange(len(texts), dtype=np.int64), "text": pa.array(texts, pa.string())})
    dataset = embedded(runtime.blocks_dataset(table, batch_size * 4, placement.replicas), model, placement, batch_size)
    vectors: np.ndarray | None = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if vectors is None:
            vectors = np.empty((len(texts), batch["embedding"].shape[1]), dtype=np.float32)
        vectors[batch["row"]] = batch["embedding"]
    if vectors is None:
        raise ValueError("embed() needs at least one text")
    return vectors


def embeddings_table(ids: list[str], vectors: np.ndarray, model: str) -> pa.Table:
    """Rows' ``id`` and ``embedding`` as a table a later stage can reuse (``model`` in its footer)."""
    dim = vectors.shape[1]
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()),
         pa.FixedSizeListArray.from_arrays(np.ascontiguousarray(vectors, np.float32).ravel(), dim)],
        schema=schema,
    ).replace_schema_metadata({EMBEDDING_MODEL_KEY: model})


def write_embeddings(location: RunLocation, folder: str, table: pa.Table, rows_per_shard: int) -> EmbeddingsRef:
    """``table`` (``embeddings_table``) as shards under ``folder``; the reference a later stage
    finds them by (``kept_embeddings``)."""
    return EmbeddingsRef(model=table.schema.metadata[EMBEDDING_MODEL_KEY.encode()].decode(), rows=table.num_rows,
                         dim=table.schema.field("embedding").type.list_size,
                         shards=location.write_shards(folder, table, rows_per_shard))


def kept_embeddings(location: RunLocation, finished: Sequence[StageResult], model: str,
                    ids: list[str]) -> np.ndarray | None:
    """Embeddings of ``ids`` by ``model`` that a finished stage kept, or None when no stage kept
    them all."""
    for found in finished:
        if found.embeddings is None or found.embeddings.model != model:
            continue
        wanted = pa.array(ids, pa.string())  # filtered shard by shard: only these rows are held
        table = pa.concat_tables([location.read_table(s, columns=["id", "embedding"])
                                  .filter(pc.is_in(pc.field("id"), wanted)) for s in found.embeddings.shards])
        index = {row_id: i for i, row_id in enumerate(table["id"].to_pylist())}
        if all(i in index for i in ids):
            vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
            return vectors[[index[i] for i in ids]]
    return None
