"""Training stage: SetFit's recipe, with the contrastive phase on Ray Train, then evaluation.

In: the rows the stage before it committed (``dedup/data`` after dedup, else the generated
``data``) and the spec's ``train`` section. Out: a ``SetFitModel`` (body fine-tuned,
logistic-regression head) under ``<run>/model/`` in SetFit's format with a model card;
``eval/metrics.json`` and confusion PNGs (``evaluate.py``); ``train/manifest.json``, last.

The rows stream through Ray Data; the driver holds the training sample only, never the run.

1. **Split and sample.** Each row id hashes to a fixed draw in [0, 1): rows under ``test_size``
   are held out, and of the rest a share is taken so that about ``max_rows`` rows (never more)
   are trained on. Both are the same on every re-run and independent of shard order.
2. **Contrastive fine-tuning** (skipped when ``num_iterations`` is 0): ``num_workers`` Ray Train
   workers run DDP (gloo on CPU, NCCL on GPU). Each samples its own pairs, half same-label and
   half different-label, batch by batch from per-label row indices: memory is linear in rows,
   never in pairs, and SetFit's up-front pair list (quadratic, out of memory at 40-50k rows) is
   never built. Pairs in total = min(``max_pairs``, ``num_iterations`` × rows). Loss: SetFit's
   default, cosine similarity against 1 (same label) or 0. Rank 0 checkpoints the body to the
   run's storage.
3. **Head.** The training rows are embedded with the fine-tuned body on replicated Ray actors
   (``embed.embed``); a logistic regression is fitted on them on the driver.
4. **Evaluation.** The held-out rows and the real eval set stream through the same actors; the
   driver predicts each batch with the head and keeps only confusion counts per language.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray import embed, evaluate, runtime
from anyclf_ray.config import ActorPlacement, ConfigError, JobSpec, TrainSpec
from anyclf_ray.stage import Context, Stage
from anyclf_ray.storage import RunLocation

log = logging.getLogger(__name__)

SPLIT_BUCKETS = 10_000
MODEL_FOLDER = "model"
ROW_COLUMNS = ["id", "text", "label", "language"]


def draws(ids: list[str]) -> np.ndarray:
    """Each row id's fixed draw in [0, 1). Its hash's bucket (of ``SPLIT_BUCKETS``) leads, so
    ``draw < test_size`` holds out exactly the rows earlier versions held out."""
    found = np.empty(len(ids), np.float64)
    for i, row_id in enumerate(ids):
        digest = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")
        bucket, rest = divmod(digest, SPLIT_BUCKETS)
        found[i] = (rest + bucket / (2**64 // SPLIT_BUCKETS + 1)) / SPLIT_BUCKETS
    return found


def is_held_out(row_id: str, test_size: float) -> bool:
    return bool(draws([row_id])[0] < test_size)


def with_draws(batch: pa.Table) -> pa.Table:
    return batch.append_column("draw", pa.array(draws(batch["id"].to_pylist())))


def drawn_between(batch: pa.Table, low: float, high: float) -> pa.Table:
    draw = batch["draw"]
    return batch.filter(pc.and_(pc.greater_equal(draw, low), pc.less(draw, high)))


def input_rows(location: RunLocation, shards: list[str], blocks: int) -> tuple[ray.data.Dataset, int]:
    """The committed rows as a Dataset (at least ``blocks`` blocks), each with its ``draw``, and
    their number (from the Parquet footers)."""
    paths = [location.path(shard) for shard in shards]
    dataset = ray.data.read_parquet(paths, filesystem=location.fs, columns=ROW_COLUMNS,
                                    override_num_blocks=max(blocks, len(paths)))
    return dataset.map_batches(with_draws, batch_format="pyarrow", batch_size=None), dataset.count()


def training_sample(rows: ray.data.Dataset, settings: TrainSpec, total: int) -> pa.Table:
    """The rows to train on, gathered on the driver: every row past the held-out share while
    they number ``max_rows`` or fewer, else the ``max_rows`` lowest draws, sorted by id."""
    share = min(1.0, settings.max_rows / max(1.0, total * (1 - settings.test_size)))
    # A little over the expected share, so the cut below rarely falls short of max_rows.
    high = min(1.0, settings.test_size + (1 - settings.test_size) * min(1.0, share * 1.05))
    chosen = rows.map_batches(drawn_between, fn_kwargs={"low": settings.test_size, "high": high},
                              batch_format="pyarrow", batch_size=None)
    tables = [table for table in ray.get(chosen.to_arrow_refs()) if table.num_rows]
    if not tables:
        return pa.table({column: pa.array([], pa.string()) for column in ROW_COLUMNS})
    gathered = pa.concat_tables([table.replace_schema_metadata(None) for table in tables])
    return gathered.sort_by("draw").slice(0, settings.max_rows).drop_columns(["draw"]).sort_by("id")


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
    """The head's and the evaluation's embedding actors sit where the training workers sat."""
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


def reusable_embeddings(location: RunLocation, finished: list[dict], settings: TrainSpec, ids: list[str]) -> np.ndarray | None:
    """Embeddings of ``ids`` a finished stage kept, when they are what the head would compute
    anyway: the body is not fine-tuned and is the model that stage embedded with."""
    return None if settings.num_iterations else embed.kept_embeddings(location, finished, settings.base_model, ids)


def label_positions(labels: pa.ChunkedArray | pa.Array, label_ids: list[str]) -> np.ndarray:
    """Label ids as their positions in ``label_ids``."""
    return pc.index_in(labels, pa.array(label_ids)).to_numpy(zero_copy_only=False)


def fit(location: RunLocation, spec: JobSpec, train_rows: pa.Table, run_name: str, finished: list[dict] = ()) -> dict:
    """Fine-tune, embed and fit the head. Returns the SetFit model, its body's reference (a
    checkpoint once fine-tuned) and training figures."""
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    settings = spec.train
    label_ids = [label.id for label in spec.labels]
    texts = train_rows["text"].to_pylist()
    y = label_positions(train_rows["label"], label_ids)
    timings, figures = {}, {"train_rows": len(texts), "pairs": 0}
    started = time.perf_counter()
    body_reference = _loadable(settings.base_model)
    if settings.num_iterations:
        checkpoint, metrics = fine_tune(location, spec, texts, y, run_name)
        figures.update(metrics)
        body_reference = checkpoint
    timings["contrastive"] = time.perf_counter() - started

    started = time.perf_counter()
    vectors = reusable_embeddings(location, list(finished), settings, train_rows["id"].to_pylist())
    figures["reused_dedup_embeddings"] = vectors is not None
    if vectors is None:
        vectors = embed.embed(texts, body_reference, embedding_placement(settings), batch_size=64)
    timings["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    head = LogisticRegression(max_iter=settings.head_max_iter, random_state=settings.seed)
    head.fit(vectors, y)
    timings["head"] = time.perf_counter() - started
    model = SetFitModel(
        model_body=embed.load(body_reference, device="cpu"), model_head=head,
        normalize_embeddings=True, labels=label_ids,
    )
    return {"model": model, "body": body_reference, "figures": figures, "timings": timings}


def evaluation_rows(held_out: ray.data.Dataset, real: tuple | None, replicas: int) -> ray.data.Dataset:
    """The held-out rows and the real eval set as one Dataset of ``split``, ``text``, ``label``
    and ``language`` (null where the eval set has none)."""
    def tagged(batch: pa.Table) -> pa.Table:
        return batch.select(["text", "label", "language"]).add_column(0, "split", pa.array(["held_out"] * batch.num_rows))

    # Materialized (into the object store, not the driver) before the actors start: a fixed
    # pool of embedding actors may hold every CPU, and the read tasks feeding it would wait forever.
    tagged_held_out = held_out.map_batches(tagged, batch_format="pyarrow", batch_size=None).materialize()
    if not real:
        return tagged_held_out
    texts, labels, languages = real
    table = pa.table({"split": ["eval_set"] * len(texts), "text": texts, "label": labels,
                      "language": pa.array(languages or [None] * len(texts), pa.string())})
    return tagged_held_out.union(runtime.blocks_dataset(table, 256, replicas))


def evaluate_streamed(rows: ray.data.Dataset, body, head, settings: TrainSpec, label_ids: list[str]) -> dict:
    """Each split's metrics: the rows embedded on actors, predicted batch by batch on the driver,
    tallied into confusion matrices by language (all the driver keeps)."""
    tallies: dict[str, dict] = {"held_out": {}, "eval_set": {}}
    embedded = embed.embedded(rows, body, embedding_placement(settings), batch_size=64)
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        true = label_positions(pa.array(batch["label"], pa.string()), label_ids)
        predicted = head.predict(batch["embedding"]) if len(true) else true
        groups = defaultdict(list)
        for i, key in enumerate(zip(batch["split"].tolist(), batch["language"].tolist())):
            groups[key].append(i)
        for (split, language), chosen in groups.items():
            matrix = evaluate.confusion(true[chosen], predicted[chosen], len(label_ids))
            tallies[split][language] = tallies[split].get(language, 0) + matrix
    return {split: evaluate.split_metrics(found, label_ids) for split, found in tallies.items() if found}


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
the rows its `{source}` stage committed; {figures["train_rows"]} training rows,
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


class Train(Stage):
    """Training and evaluation on the stage contract: its input is whatever the last stage kept."""

    name = "train"
    section = "train"
    clears = (MODEL_FOLDER, "eval", "train")

    def check(self, location: RunLocation) -> None:
        """Labels, body and eval set, before any engine starts (the rows are checked once they exist)."""
        if len(self.spec.labels) < 2:
            raise ConfigError(
                f"labels: training needs at least 2 labels and the spec has {len(self.spec.labels)}; "
                "add a label or set train.enabled: false"
            )
        embed.check_model(self.settings.base_model, "train.base_model")
        label_ids = [label.id for label in self.spec.labels]
        eval_set = self.settings.eval_set
        self.real = evaluate.load_eval_set(eval_set, label_ids) if eval_set else None

    def execute(self, ctx: Context, upstream: dict) -> dict:
        spec, settings, location = self.spec, self.settings, ctx.location
        label_ids = [label.id for label in spec.labels]
        check_workers(settings)
        rows, total = input_rows(location, upstream["shards"]["data"], blocks=4 * settings.num_workers)
        train_rows = training_sample(rows, settings, total)
        check_labels(train_rows, spec)
        finished = [found for _, found in ctx.finished]
        fingerprint = self.fingerprint(upstream["fingerprint"])
        result = fit(location, spec, train_rows, run_name=f"train-{fingerprint}", finished=finished)
        held_out = rows.map_batches(drawn_between, fn_kwargs={"low": 0.0, "high": settings.test_size},
                                    batch_format="pyarrow", batch_size=None)
        evaluation = evaluate_streamed(evaluation_rows(held_out, self.real, settings.num_workers), result["body"],
                                       result["model"].model_head, settings, label_ids)
        for name, figures in evaluation.items():
            location.write_bytes(f"eval/confusion-{name}.png", evaluate.confusion_png(figures, name))
        location.write_json("eval/metrics.json", evaluation)
        card = model_card(spec, location.run_id, upstream["stage"], result["figures"], evaluation)
        return {
            "data": {"source": upstream["stage"], "rows": total, "train_rows": train_rows.num_rows,
                     "held_out_rows": evaluation.get("held_out", {}).get("rows", 0),
                     "eval_set_rows": len(self.real[0]) if self.real else 0},
            "model": location.uri(MODEL_FOLDER),
            "files": save(location, result["model"], card),
            "figures": result["figures"],
            "metrics": evaluation,
            "timings_s": result["timings"],
        }

    def describe(self, found: dict) -> str:
        scores = ", ".join(f"{split} accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f}"
                           for split, m in found["metrics"].items())
        return f"trained on {found['data']['train_rows']} rows: {found['model']} ({scores or 'no evaluation rows'})"
