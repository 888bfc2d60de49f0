"""Sentence embeddings on replicated Ray actors.

In: texts, a sentence-transformers model (a reference, or a Ray Train checkpoint of one) and an
``ActorPlacement``. Out: an
``(n, d)`` float32 array of L2-normalised embeddings in the input's order. Each actor loads
the model once (on a GPU when the placement resolved to ``cuda``) and encodes batches streamed
to it by Ray Data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import ray.train

from anyclf_ray import models, runtime
from anyclf_ray.config import ActorPlacement, ConfigError

EMBEDDING_MODEL_KEY = "anyclf_ray.embedding_model"


class Embedder:
    """Ray Data callable class: a batch of ``text`` → the same batch with ``embedding``."""

    def __init__(self, model: str | ray.train.Checkpoint, device: str, batch_size: int):
        from sentence_transformers import SentenceTransformer

        # A checkpoint may sit on another node's storage (S3): fetch it to this node first.
        folder = model.to_directory() if isinstance(model, ray.train.Checkpoint) else models.resolve_embedder(model)
        self.model = SentenceTransformer(folder, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.model.encode(
            list(batch["text"]), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return {"row": batch["row"], "embedding": vectors.astype(np.float32)}


def check_model(reference: str, section: str) -> None:
    """ConfigError naming ``section``.model unless the model can be loaded from here."""
    try:
        models.check_available(reference)
    except ValueError as error:
        raise ConfigError(f"{section}.model: {error}") from None


def embed(texts: list[str], model: str | ray.train.Checkpoint, placement: ActorPlacement, batch_size: int) -> np.ndarray:
    """Embeddings of ``texts`` (in order) from ``placement.replicas`` actors; Ray must be up."""
    table = pa.table({"row": np.arange(len(texts), dtype=np.int64), "text": pa.array(texts, pa.string())})
    dataset = runtime.blocks_dataset(table, batch_size * 4, placement.replicas).map_batches(
        Embedder,
        fn_constructor_kwargs={"model": model, "device": placement.device, "batch_size": batch_size},
        batch_size=batch_size * 4,
        batch_format="numpy",
        **runtime.actor_options(placement),
    )
    vectors: np.ndarray | None = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if vectors is None:
            vectors = np.empty((len(texts), batch["embedding"].shape[1]), dtype=np.float32)
        vectors[batch["row"]] = batch["embedding"]
    if vectors is None:
        raise ValueError("embed() needs at least one text")
    return vectors
