"""Training stage: SetFit's recipe, with the contrastive phase on Ray Train.

In: a run's training rows (``dedup/data`` when the dedup stage ran, else ``data``) and the
spec's ``train`` section. Out: a ``SetFitModel`` (body fine-tuned, logistic-regression head),
saved under ``<run>/model/`` in SetFit's format with a model card, and the embeddings of the
evaluation texts for ``evaluate.py``.

1. **Split.** A ``test_size`` share of rows is held out by a hash of the row id, so the split is
   the same on every re-run and independent of shard order.
2. **Contrastive fine-tuning** (skipped when ``num_iterations`` is 0): ``num_workers`` Ray Train
   workers run DDP (gloo on CPU, NCCL on GPU). Each samples its own pairs, half same-label and
   half different-label, batch by batch from per-label row indices: memory is linear in rows,
   never in pairs, and SetFit's up-front pair list (quadratic, out of memory at 40-50k rows) is
   never built. Pairs in total = min(``max_pairs``, ``num_iterations`` × rows). Loss: SetFit's
   default, cosine similarity against 1 (same label) or 0. Rank 0 checkpoints the body to the
   run's storage.
3. **Head.** Every row is embedded with the fine-tuned body on replicated Ray actors
   (``embed.embed``); a logistic regression is fitted on all training rows on the driver.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from anyclf_ray import dedup, embed, runtime
from anyclf_ray.config import ActorPlacement, ConfigError, JobSpec, TrainSpec
from anyclf_ray.storage import RunLocation

log = logging.getLogger(__name__)

SPLIT_BUCKETS = 10_000
MODEL_FOLDER = "model"
MANIFEST = "train/manifest.json"


def is_held_out(row_id: str, test_size: float) -> bool:
    digest = hashlib.blake2b(row_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SPLIT_BUCKETS < test_size * SPLIT_BUCKETS


def training_rows(location: RunLocation, spec: JobSpec) -> tuple[pa.Table, str]:
    """The rows to learn from (id, text, label) and which stage they come from."""
    if spec.dedup.enabled and location.exists(dedup.MANIFEST):
        source, shards = "dedup", location.read_json(dedup.MANIFEST)["shards"]["data"]
    elif location.exists("manifest.json"):
        source, shards = "generate", location.read_json("manifest.json")["shards"]
    else:
        raise ConfigError(
            f"run_id: no generated data at {location.uri()}; run `anyclf-ray generate` (or `run`) first"
        )
    tables = [location.read_table(s, columns=["id", "text", "label"]).replace_schema_metadata(None) for s in shards]
    empty = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())]).empty_table()
    return pa.concat_tables([empty, *tables]).sort_by("id"), source


def split(rows: pa.Table, settings: TrainSpec) -> tuple[pa.Table, pa.Table]:
    held_out = pa.array([is_held_out(i, settings.test_size) for i in rows["id"].to_pylist()], pa.bool_())
    return rows.filter(pa.compute.invert(held_out)), rows.filter(held_out)


def check_labels(train_rows: pa.Table, spec: JobSpec) -> None:
    """Every label needs 2 training rows: one for a head class, two for a positive pair."""
    counts = dict(zip(*np.unique(train_rows["label"].to_numpy(zero_copy_only=False), return_counts=True)))
    for label in spec.labels:
        have = int(counts.get(label.id, 0))
        if have < 2:
            raise ConfigError(
                f"train: label {label.id!r} has {have} training row(s), at least 2 are needed; generate more rows "
                "or lower train.test_size"
            )


def check_workers(settings: TrainSpec) -> None:
    """ConfigError if the cluster can never place ``num_workers`` workers."""
    runtime.require(
        "GPU" if settings.use_gpu else "CPU",
        settings.num_workers * (1 if settings.use_gpu else settings.cpus_per_worker),
        "train.num_workers", f"{settings.num_workers} worker(s)",
        "lower train.num_workers (or cpus_per_worker) or add nodes",
    )


def embedding_placement(settings: TrainSpec) -> ActorPlacement:
    """The head's embedding actors sit where the training workers sat."""
    return ActorPlacement(
        device="cuda" if settings.use_gpu else "cpu", replicas=settings.num_workers,
        cpus_per_replica=settings.cpus_per_worker,
    )


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


def average_gradients(parameters: list, world_size: int) -> None:
    """All-reduce every gradient as one flat buffer and divide by the number of workers."""
    import torch
    import torch.distributed as dist

    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter).clone()
        offset += size


def contrastive_loop(config: dict) -> None:
    """Ray Train worker: DDP fine-tuning of the body on sampled pairs; rank 0 checkpoints it."""
    import torch
    import ray.train
    import ray.train.torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import batch_to_device

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    body = SentenceTransformer(config["model"], device=str(device))
    body.max_seq_length = config["max_seq_length"]
    # Data parallel with one gradient all-reduce per step (gloo on CPU, NCCL on GPU). Not DDP's
    # wrapper: sentence-transformers' forward trips its "parameter marked ready twice" check.
    body = ray.train.torch.prepare_model(body, parallel_strategy=None)
    parameters = [p for p in body.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config["learning_rate"])
    texts, labels = ray.get(config["rows"])
    sampler = PairSampler(labels, seed=config["seed"] * 1000 + rank)
    losses = []
    body.train()
    for _ in range(config["steps_per_worker"]):
        a, b, target = sampler.batch(config["batch_size"])
        features = batch_to_device(body.preprocess([texts[i] for i in a] + [texts[i] for i in b]), device)
        vectors = body(features)["sentence_embedding"]
        similarity = torch.cosine_similarity(vectors[: len(a)], vectors[len(a) :])
        loss = torch.nn.functional.mse_loss(similarity, torch.from_numpy(target).to(device))
        optimizer.zero_grad()
        loss.backward()
        average_gradients(parameters, context.get_world_size())
        optimizer.step()
        losses.append(loss.item())
    metrics = {
        "loss_first": float(np.mean(losses[:10])) if losses else 0.0,
        "loss_last": float(np.mean(losses[-10:])) if losses else 0.0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            body.save(folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def fine_tune(location: RunLocation, spec: JobSpec, texts: list[str], labels: np.ndarray, run_name: str):
    """Run the contrastive phase; the body as a Ray Train checkpoint, and the run's metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = spec.train
    pairs = min(settings.max_pairs, settings.num_iterations * len(texts))
    steps = -(-pairs // (settings.num_workers * settings.batch_size))
    log.info("train: %d pairs on %d worker(s), %d steps each", pairs, settings.num_workers, steps)
    trainer = TorchTrainer(
        contrastive_loop,
        train_loop_config={
            "model": _loadable(settings.base_model), "rows": ray.put((texts, labels)), "seed": settings.seed,
            "steps_per_worker": steps, "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate, "max_seq_length": settings.max_seq_length,
        },
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})},
        ),
        run_config=RunConfig(name=run_name, storage_path=location.path("train/ray"), storage_filesystem=location.fs),
    )
    result = trainer.fit()
    return result.checkpoint, {**result.metrics, "pairs": pairs, "steps_per_worker": steps}


def _loadable(reference: str) -> str:
    from anyclf_ray import models

    return models.resolve_embedder(reference)


def reusable_embeddings(location: RunLocation, spec: JobSpec, ids: list[str]) -> np.ndarray | None:
    """The dedup stage's embeddings of ``ids``, when they are what the head would compute anyway.

    That is when the body is not fine-tuned and is the model dedup embedded with.
    """
    settings = spec.train
    if settings.num_iterations or not location.exists(dedup.MANIFEST):
        return None
    done = location.read_json(dedup.MANIFEST)
    if done["settings"]["model"] != settings.base_model:
        return None
    table = pa.concat_tables([location.read_table(s) for s in done["shards"]["embeddings"]])
    index = {row_id: i for i, row_id in enumerate(table["id"].to_pylist())}
    if not all(i in index for i in ids):
        return None
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    return vectors[[index[i] for i in ids]]


def fit(location: RunLocation, spec: JobSpec, train_rows: pa.Table, other_texts: list[str], run_name: str) -> dict:
    """Fine-tune, embed and fit the head. Returns the SetFit model, the embeddings of
    ``other_texts`` (for evaluation) and training figures."""
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    settings = spec.train
    label_ids = [label.id for label in spec.labels]
    texts = train_rows["text"].to_pylist()
    y = np.asarray([label_ids.index(label) for label in train_rows["label"].to_pylist()])
    timings, figures = {}, {"train_rows": len(texts), "pairs": 0}
    started = time.perf_counter()
    body_reference = _loadable(settings.base_model)
    if settings.num_iterations:
        checkpoint, metrics = fine_tune(location, spec, texts, y, run_name)
        figures.update(metrics)
        body_reference = checkpoint
    timings["contrastive"] = time.perf_counter() - started

    started = time.perf_counter()
    reused = reusable_embeddings(location, spec, train_rows["id"].to_pylist())
    figures["reused_dedup_embeddings"] = reused is not None
    to_embed = other_texts if reused is not None else texts + other_texts
    vectors = (
        embed.embed(to_embed, body_reference, embedding_placement(settings), batch_size=64)
        if to_embed else np.empty((0, 1), np.float32)
    )
    train_vectors, other_vectors = (reused, vectors) if reused is not None else (vectors[: len(texts)], vectors[len(texts) :])
    timings["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    head = LogisticRegression(max_iter=settings.head_max_iter, random_state=settings.seed)
    head.fit(train_vectors, y)
    timings["head"] = time.perf_counter() - started
    model = SetFitModel(
        model_body=embed.load(body_reference, device="cpu"), model_head=head,
        normalize_embeddings=True, labels=label_ids,
    )
    return {"model": model, "other_vectors": other_vectors, "figures": figures, "timings": timings}


def model_card(spec: JobSpec, run_id: str, source: str, figures: dict, evaluation: dict) -> str:
    """A Hugging Face model card: base model, data, labels and the evaluation figures."""
    label_rows = "\n".join(f"| `{label.id}` | {label.desc} |" for label in spec.labels)
    metric_rows = "\n".join(
        f"| {split} | {m['rows']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['weighted_f1']:.4f} |"
        for split, m in evaluation.items()
    )
    settings = spec.train
    return f"""---
library_name: setfit
base_model: {settings.base_model}
pipeline_tag: text-classification
tags:
- setfit
- anyclf-ray
- synthetic-data
---
# {run_id} classifier

A SetFit classifier for: {spec.instruction}

It was trained by anyclf-ray on synthetic data written by `{spec.model.name}` (run `{run_id}`,
{"deduplicated rows" if source == "dedup" else "all generated rows"}; {figures["train_rows"]} training rows,
held-out share {settings.test_size}). Body: `{settings.base_model}`, fine-tuned contrastively on
{figures["pairs"]} sampled pairs on {settings.num_workers} Ray Train worker(s); head: logistic regression.

```python
from setfit import SetFitModel
model = SetFitModel.from_pretrained("<this folder>")
model.predict(["some text"])
```

| label | description |
|---|---|
{label_rows}

| evaluation | rows | accuracy | macro-F1 | weighted-F1 |
|---|---|---|---|---|
{metric_rows}

The training data is synthetic: check the held-out figures against a real labelled set
(`train.eval_set`) before trusting the model.
"""


def save(location: RunLocation, model, card: str) -> list[str]:
    """Write the model in SetFit's format to ``model/`` (local or S3); return the files."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        (Path(folder) / "README.md").write_text(card)
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        for path in files:
            location.write_bytes(f"{MODEL_FOLDER}/{path.relative_to(folder)}", path.read_bytes())
    return [f"{MODEL_FOLDER}/{p.relative_to(folder)}" for p in files]
