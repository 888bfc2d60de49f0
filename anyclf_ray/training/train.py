"""Training stage: SetFit's recipe, with the contrastive phase on Ray Train, then evaluation.

In: the rows the stage before it committed (``dedup/data`` after dedup, else the generated
``data``) and the spec's ``train`` section. Out: a ``SetFitModel`` (body fine-tuned,
logistic-regression head; one-vs-rest with per-label thresholds in ``thresholds.json`` for a
multi-label run) under ``<run>/model/`` in SetFit's format with a model card;
``eval/metrics.json`` and a PNG per split (``evaluate.py``); ``train/manifest.json``, last.

The rows stream through Ray Data; the driver holds the training sample only, never the run.

1. **Split and sample.** Each row id hashes to a fixed draw in [0, 1): rows under ``test_size``
   are held out, and of the rest the ``max_rows`` lowest draws (all of them when fewer) are
   trained on. Both are the same on every re-run and independent of shard order.
2. **Contrastive fine-tuning** (skipped when ``num_iterations`` is 0): ``num_workers`` Ray Train
   workers run DDP (gloo on CPU, NCCL on GPU). Each samples its own pairs, half same-label and
   half different-label (multi-label: half sharing a label of the anchor's, half lacking it),
   batch by batch from per-label row indices: memory is linear in rows,
   never in pairs, and SetFit's up-front pair list (quadratic, out of memory at 40-50k rows) is
   never built. Pairs in total = min(``max_pairs``, ``num_iterations`` × rows). Loss: SetFit's
   default, cosine similarity against 1 (same label; multi-label: any label shared) or 0. Rank 0
   checkpoints the body to the run's storage.
3. **Head.** The training rows are embedded with the fine-tuned body on replicated Ray actors
   (``embed.embed``); a logistic regression (one-vs-rest for label sets) is fitted on them on
   the driver.
4. **Evaluation.** The held-out rows and the real eval set stream through the same actors; the
   driver predicts each batch with the head and keeps only counts per language. A multi-label
   model first streams the lower half of the held-out draws to tune each label's threshold for
   F1, and is evaluated on the upper half.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core import cards, embed, progress, results, runtime
from anyclf_ray.core.config import ActorPlacement, JobSpec, TrainSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import Rows, StageResult, TrainData, TrainReport
from anyclf_ray.core.stage import Context, Input, Outcome, Stage, input_fingerprint
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.training import evaluate

log = logging.getLogger(__name__)

SPLIT_BUCKETS = 10_000
MODEL_FOLDER = "model"
THRESHOLDS_FILE = "thresholds.json"
# The columns training reads; ``label`` holds a row's label id, or its label set joined by "|";
# ``origin`` says which source wrote the row in a run that annotates (null otherwise).
ROW_COLUMNS = ["id", "text", "label", "language", "origin"]


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


def with_draws(batch: pa.Table, label_column: str) -> pa.Table:
    """``batch`` as ``ROW_COLUMNS`` (a null ``origin`` where it has none), with each row's ``draw``."""
    origin = batch["origin"] if "origin" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    batch = batch.select(["id", "text", label_column, "language"]).append_column("origin", origin)
    return batch.rename_columns(ROW_COLUMNS).append_column("draw", pa.array(draws(batch["id"].to_pylist())))


def drawn_between(batch: pa.Table, low: float, high: float) -> pa.Table:
    draw = batch["draw"]
    return batch.filter(pc.and_(pc.greater_equal(draw, low), pc.less(draw, high)))


def input_rows(location: RunLocation, shards: list[str], label_column: str, blocks: int,
               origin: bool = False) -> tuple[ray.data.Dataset, int]:
    """The committed rows as a Dataset (at least ``blocks`` blocks) of ``ROW_COLUMNS``, each
    with its ``draw``, and their number (from the Parquet footers). ``origin``: the rows carry
    one (a run that annotates)."""
    paths = [location.path(shard) for shard in shards]
    columns = ["id", "text", label_column, "language", *(["origin"] if origin else [])]
    dataset = ray.data.read_parquet(paths, filesystem=location.fs, columns=columns,
                                    override_num_blocks=max(blocks, len(paths)))
    rows = dataset.map_batches(functools.partial(with_draws, label_column=label_column), batch_format="pyarrow",
                               batch_size=None)
    return rows, dataset.count()


def training_sample(rows: ray.data.Dataset, settings: TrainSpec, total: int) -> pa.Table:
    """The rows to train on, gathered on the driver: every row past the held-out share while
    they number ``max_rows`` or fewer, else the ``max_rows`` lowest draws, sorted by id."""
    share = min(1.0, settings.max_rows / max(1.0, total * (1 - settings.test_size)))
    while True:
        # A little over the expected share, so one pass rarely falls short of max_rows; when it
        # does, the rows are read again with twice the share.
        high = min(1.0, settings.test_size + (1 - settings.test_size) * min(1.0, share * 1.05))
        chosen = rows.map_batches(functools.partial(drawn_between, low=settings.test_size, high=high),
                                  batch_format="pyarrow", batch_size=None)
        tables = [table.replace_schema_metadata(None) for table in ray.get(chosen.to_arrow_refs())
                  if table.num_rows]
        if high == 1.0 or sum(table.num_rows for table in tables) >= settings.max_rows:
            break
        share *= 2
    if not tables:
        return pa.table({column: pa.array([], pa.string()) for column in ROW_COLUMNS})
    gathered = pa.concat_tables(tables)
    return gathered.sort_by("draw").slice(0, settings.max_rows).drop_columns(["draw"]).sort_by("id")


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
        cpus_per_replica=settings.cpus_per_worker, threads=settings.threads,
    )


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
    import ray.train
    import ray.train.torch
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import batch_to_device

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config["seed"])
    device = ray.train.torch.get_device()
    runtime.use_threads(device.type, config["threads"])
    body = SentenceTransformer(config["model"], device=str(device))
    body.max_seq_length = config["max_seq_length"]
    # Data parallel with one gradient all-reduce per step (gloo on CPU, NCCL on GPU). Not DDP's
    # wrapper: sentence-transformers' forward trips its "parameter marked ready twice" check.
    ray.train.torch.prepare_model(body, parallel_strategy=None)  # moved to the worker's device, in place
    parameters = [p for p in body.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config["learning_rate"])
    texts, labels, sampler_of = ray.get(config["rows"])
    sampler = sampler_of(labels, seed=config["seed"] * 1000 + rank)
    losses = []
    body.train()
    for _ in range(config["steps_per_worker"]):
        if rank == 0:  # the driver's progress (fire and forget: a step takes far longer)
            config["steps_done"].advance.remote()
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
    if device.type == "cpu":
        metrics["threads_per_worker"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            body.save(folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def scaling_config(settings: TrainSpec):
    """The Ray Train workers: ``num_workers`` of ``cpus_per_worker`` CPUs, and a GPU each with
    ``use_gpu`` (NCCL then, gloo on CPU)."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=settings.num_workers, use_gpu=settings.use_gpu,
        resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})},
    )


class StepCounter:
    """Ray actor: the contrastive steps rank 0 has taken, for the driver's progress."""

    def __init__(self) -> None:
        self.done = 0

    def advance(self) -> None:
        self.done += 1

    def count(self) -> int:
        return self.done


def show_steps(counter, total: int, interval: float, stopped: threading.Event) -> None:
    """Driver thread until ``stopped``: the steps of ``counter`` out of ``total``, as a progress
    bar on a terminal (tqdm), else a log line every ``interval`` seconds."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    bar = tqdm(total=total, desc="train", unit="step") if terminal else None
    started = time.monotonic()
    while True:
        finished = stopped.wait(1.0 if terminal else interval)
        try:
            done = ray.get(counter.count.remote())
        except ray.exceptions.RayError as error:  # progress is a courtesy: training goes on without it
            log.warning("train: no step count to show (%s)", type(error).__name__)
            break
        if bar is not None:
            bar.update(done - bar.n)
        elif not finished and done:
            left = (time.monotonic() - started) / done * (total - done)
            log.info("train: step %d of %d (%.1f%%), ETA %s", done, total, 100 * done / total, progress.duration(left))
        if finished:
            break
    if bar is not None:
        bar.close()


def fine_tune(location: RunLocation, spec: JobSpec, texts: list[str], labels: np.ndarray, run_name: str):
    """Run the contrastive phase, its steps shown as they go (``show_steps``); the body as a Ray
    Train checkpoint, and the run's metrics."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    settings = spec.train
    pairs = min(settings.max_pairs, settings.num_iterations * len(texts))
    steps = -(-pairs // (settings.num_workers * settings.batch_size))
    threads = runtime.actor_threads(embedding_placement(settings))
    log.info("train: %d pairs on %d worker(s)%s, %d steps each", pairs, settings.num_workers,
             "" if settings.use_gpu else f" of {threads} CPU thread(s)", steps)
    counter: Any = ray.remote(num_cpus=0)(StepCounter).remote()
    trainer = TorchTrainer(
        contrastive_loop,
        train_loop_config={
            "model": _loadable(settings.base_model), "rows": ray.put((texts, labels, scheme(spec).sampler)),
            "seed": settings.seed, "steps_done": counter,
            "threads": threads,
            "steps_per_worker": steps, "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate, "max_seq_length": settings.max_seq_length,
        },
        scaling_config=scaling_config(settings),
        run_config=RunConfig(name=run_name, storage_path=location.path("train/ray"), storage_filesystem=location.fs),
    )
    stopped = threading.Event()
    shown = threading.Thread(target=show_steps, args=(counter, steps, spec.output.status_seconds, stopped),
                             name="train-steps", daemon=True)
    shown.start()
    try:
        result = trainer.fit()
    finally:
        stopped.set()
        shown.join()
        ray.kill(counter)
    return result.checkpoint, {**(result.metrics or {}), "pairs": pairs, "steps_per_worker": steps}


def _loadable(reference: str) -> str:
    from anyclf_ray.core import models

    return models.resolve_embedder(reference)


def reusable_embeddings(location: RunLocation, finished: Sequence[StageResult], settings: TrainSpec,
                        ids: list[str]) -> np.ndarray | None:
    """Embeddings of ``ids`` a finished stage kept, when they are what the head would compute
    anyway: the body is not fine-tuned and is the model that stage embedded with."""
    return None if settings.num_iterations else embed.kept_embeddings(location, finished, settings.base_model, ids)


def fit(location: RunLocation, spec: JobSpec, train_rows: pa.Table, run_name: str,
        finished: Sequence[StageResult] = ()) -> dict:
    """Fine-tune, embed and fit the head (ConfigError first if a label is short of rows).
    Returns the SetFit model, its body's reference (a checkpoint once fine-tuned) and training
    figures."""
    from setfit import SetFitModel

    settings, labels = spec.train, scheme(spec)
    texts = train_rows["text"].to_pylist()
    y = labels.targets(train_rows["label"].to_pylist())
    labels.check_targets(y)
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
    head = labels.head(settings.head_max_iter, settings.seed).fit(vectors, y)
    timings["head"] = time.perf_counter() - started
    model = SetFitModel(model_body=embed.load(body_reference, device="cpu"), model_head=head, normalize_embeddings=True,
                        labels=labels.ids, multi_target_strategy=labels.strategy)
    return {"model": model, "body": body_reference, "figures": figures, "timings": timings}


def held_out_splits(rows: ray.data.Dataset, splits: dict[str, tuple[float, float]]) -> dict[str, ray.data.Dataset]:
    """The held-out rows by use (``LabelScheme.splits``: its draws' [low, high) by split)."""
    return {name: rows.map_batches(functools.partial(drawn_between, low=low, high=high), batch_format="pyarrow",
                                   batch_size=None) for name, (low, high) in splits.items()}


def evaluation_rows(held_out: ray.data.Dataset, split: str, real: evaluate.EvalSet | None = None,
                    replicas: int = 1) -> ray.data.Dataset:
    """Held-out rows tagged ``split``, and the real eval set (tagged ``eval_set``), as one
    Dataset of ``split``, ``text``, ``label``, ``language`` (null where the eval set has none)
    and ``origin`` (null for the eval set)."""
    columns = ["text", "label", "language", "origin"]

    def tagged(batch: pa.Table) -> pa.Table:
        return batch.select(columns).add_column(0, "split", pa.array([split] * batch.num_rows))

    # Materialized (into the object store, not the driver) before the actors start: a fixed
    # pool of embedding actors may hold every CPU, and the read tasks feeding it would wait forever.
    tagged_held_out = held_out.map_batches(tagged, batch_format="pyarrow", batch_size=None).materialize()
    if not real:
        return tagged_held_out
    table = pa.table({"split": ["eval_set"] * len(real.texts), "text": real.texts, "label": real.labels,
                      "language": pa.array(real.languages or [None] * len(real.texts), pa.string()),
                      "origin": pa.nulls(len(real.texts), pa.string())})
    return tagged_held_out.union(runtime.blocks_dataset(table, 256, replicas))


def streamed_tallies(rows: ray.data.Dataset, body, settings: TrainSpec, tally) -> dict[str, dict]:
    """Each split's tallies by (language, origin): the rows embedded on actors, then
    ``tally(keys, embeddings)`` of each batch added up on the driver (all it keeps)."""
    tallies: dict[str, dict] = defaultdict(dict)
    embedded = embed.embedded(rows, body, embedding_placement(settings), batch_size=64)
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        groups = defaultdict(list)
        for i, (split, language, origin) in enumerate(zip(batch["split"].tolist(), batch["language"].tolist(),
                                                          batch["origin"].tolist())):
            # A column of nulls reaches numpy as NaN floats, each its own key: a null is None here.
            groups[(split, *(value if isinstance(value, str) else None for value in (language, origin)))].append(i)
        for (split, *group), chosen in groups.items():
            found = tally(batch["label"][chosen].tolist(), batch["embedding"][chosen])
            tallies[split][tuple(group)] = tallies[split].get(tuple(group), 0) + found
    return tallies


def evaluate_model(spec: JobSpec, held_out: dict[str, ray.data.Dataset], real: evaluate.EvalSet | None, body,
                   head) -> tuple[dict, np.ndarray | None]:
    """Each split's figures (by language and by origin too), and the head's tuned thresholds
    (None where the label scheme tunes none)."""
    labels, settings = scheme(spec), spec.train

    def over(split: str, tally) -> np.ndarray | None:
        found = streamed_tallies(evaluation_rows(held_out[split], split), body, settings, tally)
        return sum(found[split].values()) if found else None

    thresholds = labels.tune(head, over)
    found = streamed_tallies(evaluation_rows(held_out["held_out"], "held_out", real, settings.num_workers), body,
                             settings, lambda keys, vectors: labels.tally(head, thresholds, keys, vectors))
    return {split: evaluate.split_metrics(found[split], lambda tally: labels.metrics(tally, thresholds))
            for split in found}, thresholds


def save(location: RunLocation, model, card: str, thresholds: np.ndarray | None,
         target: str = MODEL_FOLDER) -> list[str]:
    """Write the model in SetFit's format to ``target`` (``model/``; local or S3), with a
    multi-label model's thresholds by label; return the files."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        (Path(folder) / "README.md").write_text(card)
        if thresholds is not None:
            by_label = dict(zip(model.labels, thresholds.tolist()))
            (Path(folder) / THRESHOLDS_FILE).write_text(json.dumps(by_label, indent=2))
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        for path in files:
            location.write_bytes(f"{target}/{path.relative_to(folder)}", path.read_bytes())
    return [f"{target}/{p.relative_to(folder)}" for p in files]


class Train(Stage[TrainReport, "evaluate.EvalSet | None"]):
    """Training and evaluation on the stage contract: its input is whatever the last stage kept."""

    name = "train"
    section = "train"
    report_type = TrainReport

    @property
    def clears(self) -> tuple[str, ...]:
        return f"{self.prefix}{MODEL_FOLDER}", f"{self.prefix}eval", self.folder

    @property
    def settings(self) -> TrainSpec:
        return self.spec.train

    def check(self, location: RunLocation) -> evaluate.EvalSet | None:
        """Labels, body and eval set, before any engine starts (the rows are checked once they
        exist); the eval set, read, its labels as the rows carry them."""
        if len(self.spec.labels) < 2:
            raise ConfigError(
                f"labels: training needs at least 2 labels and the spec has {len(self.spec.labels)}; "
                "add a label or set train.enabled: false"
            )
        embed.check_model(self.settings.base_model, "train.base_model")
        if self.settings.eval_set is None:
            return None
        real = evaluate.load_eval_set(self.settings.eval_set, scheme(self.spec))
        if any(real.skipped.values()):
            log.warning("train: the eval set's rows without a text or a label are skipped: %s", real.skipped)
        return real

    def execute(self, ctx: Context, upstream: Input | None, real: evaluate.EvalSet | None) -> Outcome[TrainReport]:
        assert upstream is not None
        spec, settings, location, labels = self.spec, self.settings, ctx.location, scheme(self.spec)
        check_workers(settings)
        rows, total = input_rows(location, upstream.data, labels.key, blocks=4 * settings.num_workers,
                                 origin=spec.annotate.enabled)
        train_rows = training_sample(rows, settings, total)
        fingerprint = self.fingerprint(input_fingerprint([found.fingerprint for found in upstream.results]))
        result = fit(location, spec, train_rows, run_name=f"train-{fingerprint}", finished=ctx.finished)
        evaluation, thresholds = evaluate_model(spec, held_out_splits(rows, labels.splits(settings.test_size)), real,
                                                result["body"], result["model"].model_head)
        if real and "eval_set" in evaluation:  # rows without a text or a label were skipped, not scored
            evaluation["eval_set"]["skipped"] = real.skipped
        for name, figures in evaluation.items():
            location.write_bytes(f"{self.prefix}eval/{labels.figure}-{name}.png", labels.split_png(figures, name))
        location.write_json(f"{self.prefix}eval/metrics.json", evaluation)
        headlines = {f"{split}{f' ({origin})' if origin else ''}": {"rows": m["rows"], **labels.headline(m)}
                     for split, figures in evaluation.items()
                     for origin, m in [(None, figures), *figures.get("by_origin", {}).items()]}
        by_origin = results.rows_by(results.counts(train_rows, ["origin"]), "origin") if spec.annotate.enabled else None
        card = cards.model_card(spec, location.run_id, upstream.stage, result["figures"], headlines, labels.head_text,
                                labels.usage_text, by_origin)
        report = TrainReport(
            data=TrainData(source=upstream.stage, train_rows=train_rows.num_rows, train_rows_by_origin=by_origin,
                           held_out_rows=evaluation.get("held_out", {}).get("rows", 0),
                           eval_set_rows=len(real.texts) if real else 0,
                           eval_set_skipped=real.skipped if real else None),
            files=save(location, result["model"], card, thresholds, f"{self.prefix}{MODEL_FOLDER}"),
            figures=result["figures"], metrics=evaluation)
        return Outcome(report=report, rows=Rows(input=total, output=train_rows.num_rows),
                       output=location.uri(f"{self.prefix}{MODEL_FOLDER}"), timings=result["timings"])

    def describe(self, result: StageResult[TrainReport]) -> str:
        labels = scheme(self.spec)
        scores = ", ".join(f"{split} " + " ".join(f"{key} {value:.3f}" for key, value in labels.headline(m).items())
                           for split, m in result.report.metrics.items())
        return (f"trained on {result.report.data.train_rows} rows: {self.prefix}{MODEL_FOLDER}/ "
                f"({scores or 'no evaluation rows'})")
