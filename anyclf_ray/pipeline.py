"""The jobs: generate (tree stage → generation stage → manifest) and dedup, resumable by run id.

In: a validated ``JobSpec``. Out: the run folder ``<output>/<run_id>/`` and each stage's manifest.

Order of writes: ``spec.json`` first (it pins what the run id means), then the tree (after its
failures), then the data parts, then the card and ``manifest.json`` last. A re-run of the same
run id finds what is already committed and does only the rest; a run id reused with a different
spec is refused rather than mixed.
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq

from anyclf_ray import dedup, embed, generate, llm, manifest, plan, runtime, tree
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
