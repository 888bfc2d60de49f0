"""The jobs: generate, dedup, train (with evaluation) and ``run``, which chains them.

In: a validated ``JobSpec``. Out: the run folder ``<output>/<run_id>/`` and each stage's manifest.
Every job checks its input before Ray starts and returns at once when its complete output for
this run id and these settings already exists.

Order of writes: ``spec.json`` first (it pins what the run id means), then the tree (after its
failures), then the data parts, then the card and ``manifest.json`` last. A re-run of the same
run id finds what is already committed and does only the rest; a run id reused with a different
spec is refused rather than mixed.
"""

from __future__ import annotations

import datetime
import json
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq

from anyclf_ray import dedup, embed, evaluate, generate, llm, manifest, plan, runtime, train, tree
from anyclf_ray.config import ConfigError, JobSpec
from anyclf_ray.storage import RunLocation

log = logging.getLogger(__name__)


def _claim(location: RunLocation, spec: JobSpec) -> None:
    """Pin the run id to this spec, or refuse if it already means another one."""
    if location.exists("spec.json"):
        pinned = location.read_json("spec.json")["fingerprint"]
        if pinned != spec.fingerprint():
            raise ConfigError(
                f"run_id: {location.run_id!r} already holds a run of a different spec; "
                "use a new run_id (or the same spec to resume it)"
            )
    else:
        location.write_json("spec.json", {"fingerprint": spec.fingerprint(), "spec": spec.model_dump()})


def _user_tree(spec: JobSpec) -> pa.Table:
    """A tree Parquet named by ``tree_path``, checked against the spec's labels."""
    try:
        table = pq.read_table(spec.tree_path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ConfigError(f"tree_path: cannot read {spec.tree_path!r} as Parquet ({error})") from None
    missing = [name for name in plan.TREE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ConfigError(f"tree_path: column {missing[0]!r} is missing; a tree has {plan.TREE_SCHEMA.names}")
    table = table.select(plan.TREE_SCHEMA.names).cast(plan.TREE_SCHEMA)
    unknown = set(table.column("label").to_pylist()) - {label.id for label in spec.labels}
    if unknown:
        raise ConfigError(f"tree_path: label {sorted(unknown)[0]!r} is not among the spec's label ids")
    return table


def _tree(spec: JobSpec, location: RunLocation, user_tree: pa.Table | None) -> pa.Table:
    if location.exists(manifest.TREE_FILE):
        log.info("tree: reusing the committed tree of this run")
        return location.read_table(manifest.TREE_FILE)
    if user_tree is not None:
        table, failures, usage = user_tree, [], dict.fromkeys(llm.USAGE_KEYS, 0)
    else:
        table, failures, usage = tree.expand(spec)
    if failures:
        location.write_table(manifest.TREE_FAILURES_FILE, pa.Table.from_pylist(failures, schema=plan.FAILURE_SCHEMA))
    table = table.replace_schema_metadata({manifest.USAGE_KEY: json.dumps(usage)})
    location.write_table(manifest.TREE_FILE, table)
    return table


def run_generate(spec: JobSpec, address: str | None = None) -> dict:
    """Run (or resume, or find complete) the generate job; return its manifest."""
    location = RunLocation(spec.output, spec.resolved_run_id())
    location.check_writable()
    user_tree = _user_tree(spec) if spec.tree_path else None
    _claim(location, spec)
    if location.exists("manifest.json"):
        log.info("run %s is already complete at %s", location.run_id, location.uri())
        return location.read_json("manifest.json")
    runtime.connect(address)
    spec = spec.model_copy(update={"engine": runtime.resolve_placement(spec.engine, "engine")})
    log.info("run %s → %s (device %s)", location.run_id, location.uri(), spec.engine.device)

    timings = {}
    started = time.perf_counter()
    tree_table = _tree(spec, location, user_tree)
    timings["tree"] = time.perf_counter() - started

    started = time.perf_counter()
    generate.run(spec, tree_table, location)
    timings["generate"] = time.perf_counter() - started

    return manifest.write(location, spec, tree_table, timings)


def run_dedup(spec: JobSpec, address: str | None = None) -> dict:
    """Deduplicate the run's generated rows (or find it done with these settings); its manifest."""
    location = RunLocation(spec.output, spec.resolved_run_id())
    location.check_writable()
    dedup.check_input(location)
    if location.exists(dedup.MANIFEST):
        done = location.read_json(dedup.MANIFEST)
        if done["fingerprint"] == dedup.fingerprint(spec):
            log.info("dedup of run %s is already complete at %s", location.run_id, done["output"])
            return done
    embed.check_model(spec.dedup.model, "dedup")
    runtime.connect(address)
    placement = runtime.resolve_placement(spec.dedup, "dedup")
    log.info("dedup: run %s with %s on %s", location.run_id, spec.dedup.model, placement.device)
    return dedup.run(
        location, spec, lambda texts: embed.embed(texts, spec.dedup.model, placement, spec.dedup.batch_size)
    )


def run_train(spec: JobSpec, address: str | None = None) -> dict:
    """Train and evaluate a classifier on the run's data (or find it done); its manifest."""
    location = RunLocation(spec.output, spec.resolved_run_id())
    location.check_writable()
    settings, label_ids = spec.train, [label.id for label in spec.labels]
    rows, source = train.training_rows(location, spec)
    train_rows, held_out = train.split(rows, settings)
    train.check_labels(train_rows, spec)
    real = evaluate.load_eval_set(settings.eval_set, label_ids) if settings.eval_set else None
    data = dedup.fingerprint(spec) if source == "dedup" else spec.fingerprint()
    fingerprint = f"{data}-{settings.fingerprint()}"
    if location.exists(train.MANIFEST) and location.read_json(train.MANIFEST)["fingerprint"] == fingerprint:
        log.info("training of run %s is already complete at %s", location.run_id, location.uri(train.MODEL_FOLDER))
        return location.read_json(train.MANIFEST)
    embed.check_model(settings.base_model, "train")
    runtime.connect(address)
    train.check_workers(settings)
    # A model of other settings must not mix into this one, nor pass for complete if this run dies.
    for folder in (train.MODEL_FOLDER, "eval", "train"):
        location.delete(folder)

    started = time.perf_counter()
    splits = {"held_out": (held_out["text"].to_pylist(), held_out["label"].to_pylist())}
    if real:
        splits["eval_set"] = real
    texts = [text for split_texts, _ in splits.values() for text in split_texts]
    result = train.fit(location, spec, train_rows, texts, run_name=f"train-{fingerprint}")
    head, vectors, evaluation, offset = result["model"].model_head, result["other_vectors"], {}, 0
    for name, (split_texts, truth) in splits.items():
        if not split_texts:
            continue
        predicted = [label_ids[i] for i in head.predict(vectors[offset : offset + len(split_texts)])]
        offset += len(split_texts)
        evaluation[name] = evaluate.metrics(truth, predicted, label_ids)
        location.write_bytes(f"eval/confusion-{name}.png", evaluate.confusion_png(evaluation[name], name))
    location.write_json("eval/metrics.json", evaluation)
    card = train.model_card(spec, location.run_id, source, result["figures"], evaluation)
    files = train.save(location, result["model"], card)
    train_manifest = {
        "run_id": location.run_id,
        "stage": "train",
        "status": "complete",
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "settings": settings.model_dump(),
        "data": {"source": source, "rows": rows.num_rows, "train_rows": train_rows.num_rows,
                 "held_out_rows": held_out.num_rows, "eval_set_rows": len(real[0]) if real else 0},
        "model": location.uri(train.MODEL_FOLDER),
        "files": files,
        "figures": result["figures"],
        "metrics": evaluation,
        "timings_s": {k: round(v, 3) for k, v in {**result["timings"], "total": time.perf_counter() - started}.items()},
    }
    location.write_json(train.MANIFEST, train_manifest)
    return train_manifest


def run_all(spec: JobSpec, address: str | None = None) -> dict:
    """generate → dedup (if enabled) → train and evaluate (if enabled); each stage's manifest."""
    stages = {"generate": run_generate(spec, address)}
    if spec.dedup.enabled:
        stages["dedup"] = run_dedup(spec, address)
    if spec.train.enabled:
        stages["train"] = run_train(spec, address)
    return stages
