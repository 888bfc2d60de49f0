"""Generation stage: the tree, then every (language, leaf, sample) as one labelled example.

In: a ``JobSpec`` and the run's engine pool. Out, at the run's root: ``spec.json`` (what the run
id means), ``tree.parquet`` (``tree.py``), Parquet parts ``data/part-*.parquet``
(``EXAMPLE_SCHEMA``, or ``MULTI_LABEL_EXAMPLE_SCHEMA`` for label sets) and, for requests that
failed after their retries, ``failures/part-*.parquet`` (``plan.FAILURE_SCHEMA``), written by Ray
Data write tasks while the answers stream out of the engine pool; then, for label sets,
``co_occurrence.png``; the dataset card and ``manifest.json``, last.
While the pass runs, ``status.json`` says how far it is (``progress.py``).

A part is committed when its data file lands (atomically, after its failures file). Its footer
names the requests it answered and the tokens they cost, so a re-run of the same run id skips
committed requests, and the manifest adds the parts up without reading their rows.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from anyclf_ray import engine, estimate, label_sets, manifest, pair_prior, plan, plots, runtime, storage, tree
from anyclf_ray.config import LABEL_SET_SEPARATOR, ConfigError, JobSpec
from anyclf_ray.pool import EnginePool
from anyclf_ray.progress import Progress
from anyclf_ray.stage import Context, Stage
from anyclf_ray.storage import RunLocation

log = logging.getLogger(__name__)

EXAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
        ("label_name", pa.string()),
        ("language", pa.string()),
        ("source_type", pa.string()),
        ("topic", pa.string()),
        ("subtopic", pa.string()),
        ("leaf_id", pa.string()),
        ("sample_index", pa.int32()),
        ("model", pa.string()),
    ]
)
# A multi-label run's rows: the set as ``labels`` and ``label_names`` lists, and as one string
# (``label_set``, ids joined by "|", "" for none) for grouping and filtering.
MULTI_LABEL_EXAMPLE_SCHEMA = pa.schema(
    [EXAMPLE_SCHEMA.field("id"), EXAMPLE_SCHEMA.field("text"), ("labels", pa.list_(pa.string())),
     ("label_names", pa.list_(pa.string())), ("label_set", pa.string()),
     *(field for field in EXAMPLE_SCHEMA if field.name not in ("id", "text", "label", "label_name"))]
)
PART_METADATA_KEY = "anyclf_ray.part"
# Requests per replica below which a part's time bound does not cut it: a smaller batch leaves
# an engine idle between parts.
PART_FLOOR = 16
# Render and write tasks only move bytes; a small CPU share keeps them schedulable next to busy engines.
TASK_CPUS = 0.25
CO_OCCURRENCE_PNG = "co_occurrence.png"


def examples_from(results: pa.Table, model_name: str, multi_label: bool) -> pa.Table:
    """One row per item of every successful result, with its stable id."""
    rows = []
    for result in results.filter(pc.field("ok")).to_pylist():
        if multi_label:
            labelled = {"labels": result["labels"], "label_names": result["label_names"],
                        "label_set": LABEL_SET_SEPARATOR.join(result["labels"])}
        else:
            labelled = {"label": result["label"], "label_name": result["label_name"]}
        for offset, text in enumerate(result["items"]):
            sample_index = result["first_sample"] + offset
            rows.append(
                {
                    "id": plan.example_id(result["leaf_id"], sample_index),
                    "text": text,
                    **labelled,
                    "language": result["language"],
                    "source_type": result["source_type"],
                    "topic": result["topic"],
                    "subtopic": result["subtopic"],
                    "leaf_id": result["leaf_id"],
                    "sample_index": sample_index,
                    "model": model_name,
                }
            )
    return pa.Table.from_pylist(rows, schema=MULTI_LABEL_EXAMPLE_SCHEMA if multi_label else EXAMPLE_SCHEMA)


def failures_from(results: pa.Table) -> pa.Table:
    failed = results.filter(~pc.field("ok")).to_pylist()
    return pa.Table.from_pylist([plan.failure_record(r, r["n_items"]) for r in failed], schema=plan.FAILURE_SCHEMA)


class ShardSink(Datasink):
    """Writes LLM results as one committed part (data + failures) per write task; once done,
    ``s3_retries`` holds the S3 calls the write tasks retried."""

    def __init__(self, location: RunLocation, model_name: str, multi_label: bool, requests_per_part: int):
        self.location = location
        self.model_name = model_name
        self.multi_label = multi_label
        self.requests_per_part = requests_per_part
        self.pass_id = uuid.uuid4().hex
        self.s3_retries = 0

    @property
    def min_rows_per_write(self) -> int:
        return self.requests_per_part

    def write(self, blocks, ctx) -> int:
        """Commit the blocks' results; the S3 calls this took again (a write task's process
        runs one task at a time)."""
        retried = storage.retries()
        # Ray Data hands over empty blocks without a schema too (a block of leaves all committed
        # before a resume): they hold nothing to write, and would not concatenate.
        tables = [table for table in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if table.num_rows]
        if not tables:
            return 0
        results = pa.concat_tables(tables)
        # Ray may hand over more than a part's worth at once; cut so parts stay near the size asked.
        for start in range(0, results.num_rows, self.requests_per_part):
            self._write_part(results.slice(start, self.requests_per_part))
        return storage.retries() - retried

    def on_write_complete(self, write_result) -> None:
        self.s3_retries = int(sum(write_result.write_returns))

    def _write_part(self, results: pa.Table) -> None:
        # Named by this pass and its requests: a write task Ray retries (its node lost) rewrites
        # the same part in place, never a second copy of its rows.
        name = f"part-{plan.stable_id('part', self.pass_id, *results['request_id'].to_pylist())}.parquet"
        failures = failures_from(results)
        if failures.num_rows:
            self.location.write_table(f"failures/{name}", failures)
        examples = examples_from(results, self.model_name, self.multi_label)
        part = {**engine.usage(results), "rows": examples.num_rows,
                "request_ids": results["request_id"].to_pylist()}
        examples = examples.replace_schema_metadata({PART_METADATA_KEY: json.dumps(part)})
        self.location.write_table(f"data/{name}", examples)  # the commit point of this part


def committed_parts(location: RunLocation) -> dict[str, dict]:
    """Footer metadata of every committed data part, by relative path, its ``request_ids`` as
    a ``plan.STABLE_ID`` array (a 10M-row run's 2.3M ids: 37 MiB, not 300 as Python strings)."""
    found = {}
    for path in location.list("data"):
        part = json.loads(location.read_metadata(path)[PART_METADATA_KEY])
        found[path] = {**part, "request_ids": np.array(part["request_ids"], plan.STABLE_ID)}
    return found


def pending_requests(leaves: pa.Table, spec: JobSpec, committed: list) -> pa.Table:
    """Ray Data map: the generation requests of a block of leaves, less the committed ones
    (``committed``: one object ref to their sorted ids, fetched zero-copy where the task runs)."""
    requests = plan.render_requests(spec, leaves)
    done = ray.get(committed[0])
    ids = np.array(requests.column("request_id").to_pylist(), dtype=plan.STABLE_ID)
    return requests.filter(pa.array(~np.isin(ids, done, assume_unique=True)))


def requests_per_part(spec: JobSpec, tokens_per_second: float | None, replicas: int) -> int:
    """Requests per committed part: ``output.commit_rows`` worth, fewer when answering them at
    ``tokens_per_second`` (all replicas; None: not measured) would pass ``output.commit_seconds``
    with every answer at its token budget, but then never fewer than ``PART_FLOOR`` per replica
    (the tree's few requests at a time measure a low rate: parts cut by it alone would starve the
    engines); and never fewer than one per replica."""
    bound = spec.output.commit_rows // spec.sampling.examples_per_request
    if tokens_per_second:
        in_time = int(spec.output.commit_seconds * tokens_per_second / spec.sampling.max_tokens)
        bound = min(bound, max(in_time, PART_FLOOR * replicas))
    return max(bound, replicas)


def run(spec: JobSpec, tree_table: pa.Table, location: RunLocation, pool: EnginePool,
        tokens_per_second: float | None, retry_failures: bool = False) -> int:
    """Generate every example not already in a committed part of this run (and, with
    ``retry_failures``, the requests that failed in one); the S3 calls its write tasks retried.

    The driver holds the leaves and the committed request ids; requests are rendered by Ray
    Data tasks, block by block, as the engines take them.
    """
    found = committed_parts(location)
    retry = manifest.generation_failures(location, found)[0]["request_id"].to_pylist() if retry_failures else []
    parts = found.values()
    committed = np.setdiff1d(  # sorted and unique, as pending_requests wants them
        np.concatenate([np.empty(0, plan.STABLE_ID), *(part["request_ids"] for part in parts)]),
        np.array(retry, plan.STABLE_ID))
    leaves = plan.leaf_table(spec, tree_table)
    total = plan.request_count(spec, leaves)
    pending = total - len(committed)
    log.info("generate: %d request(s) to run, %d already committed", pending, len(committed))
    if not pending:
        return 0
    per_part = requests_per_part(spec, tokens_per_second, pool.engine.replicas)
    log.info("generate: a part commits every %d request(s) (%d rows)", per_part,
             per_part * spec.sampling.examples_per_request)
    leaves_per_block = max(1, leaves.num_rows * per_part // total)
    requests = runtime.blocks_dataset(leaves, leaves_per_block, pool.engine.replicas).map_batches(
        pending_requests, fn_kwargs={"spec": spec, "committed": [ray.put(committed)]},
        batch_size=None, batch_format="pyarrow", num_cpus=TASK_CPUS,
    )
    answers = pool.answer(requests, "generate", batch_size=per_part, total=pending)
    sink = ShardSink(location, spec.model.name, spec.multi_label.enabled, per_part)
    progress = Progress(location, "generate", pending, int(pc.sum(leaves.column("n_samples")).as_py()),
                        sum(part["rows"] for part in parts))
    try:
        pool.run_pass("generate", lambda: answers.write_datasink(sink, ray_remote_args={"num_cpus": TASK_CPUS}),
                      report=progress, interval=spec.output.status_seconds)
    except BaseException:
        progress.finish("failed")
        raise
    progress.finish("finished")
    return sink.s3_retries


def user_tree(spec: JobSpec) -> pa.Table:
    """A tree Parquet named by ``tree_path``, checked against the spec's labels."""
    try:
        table = pq.read_table(spec.tree_path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ConfigError(f"tree_path: cannot read {spec.tree_path!r} as Parquet ({error})") from None
    if "language" not in table.column_names:  # a tree without languages is shared by all of them
        table = table.append_column("language", pa.nulls(table.num_rows, pa.string()))
    missing = [name for name in plan.TREE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ConfigError(f"tree_path: column {missing[0]!r} is missing; a tree has {plan.TREE_SCHEMA.names}")
    table = table.select(plan.TREE_SCHEMA.names).cast(plan.TREE_SCHEMA)
    for column, allowed, what in (("label", [label.id for label in spec.labels], "label ids"),
                                  ("language", [*spec.languages, None], "languages (or null: shared)")):
        unknown = set(table.column(column).to_pylist()) - set(allowed)
        if unknown:
            raise ConfigError(f"tree_path: {column} {min(map(str, unknown))!r} is not among the spec's {what}")
    return table


class Generate(Stage):
    """The first stage: it has no input, writes at the run's root, and resumes rather than redoes."""

    name = "generate"
    uses_llm = True
    card_config = "default"
    folder = ""
    manifest_path = "manifest.json"
    # What a crash left half-written: staged files never renamed into place (committed parts stay).
    clears = ("_tmp",)

    @classmethod
    def enabled(cls, spec: JobSpec) -> bool:
        return True

    @property
    def settings(self) -> JobSpec:
        return self.spec

    def data_path(self, shard: str) -> str:
        return shard

    def fingerprint(self, upstream: str | None) -> str:
        return self.spec.fingerprint()  # the run id's default is derived from it

    def retries(self, manifest: dict) -> bool:
        return any(row["stage"] == "generate" for row in manifest["failures"]["by_stage"])

    def check(self, location: RunLocation) -> None:
        """The user's tree, that a multi-label run's rows hold its sets, and that the run id is
        free or holds this very spec."""
        self.tree = user_tree(self.spec) if self.spec.tree_path else None
        if self.spec.multi_label.enabled:
            label_sets.check(self.spec)
        if location.exists("spec.json") and location.read_json("spec.json")["fingerprint"] != self.spec.fingerprint():
            raise ConfigError(
                f"run_id: {location.run_id!r} already holds a run of a different spec; "
                "use a new run_id (or the same spec to resume it)"
            )

    def _tree(self, ctx: Context) -> pa.Table:
        location = ctx.location
        if location.exists(manifest.TREE_FILE):
            log.info("tree: reusing the committed tree of this run")
            return location.read_table(manifest.TREE_FILE)
        prior = {}
        if self.spec.multi_label.pair_prior == "llm":  # asked first: it decides what a failed node costs
            record = pair_prior.ask(self.spec, ctx.engines())
            location.write_json(pair_prior.FILE, record)
            prior = record["weights"]
        if self.tree is not None:
            table, failures, usage = self.tree, [], dict.fromkeys(engine.USAGE_KEYS, 0)
            seconds = 0.0
        else:
            pool = ctx.engines()
            started = time.perf_counter()
            table, failures, usage = tree.expand(self.spec, pool, prior)
            seconds = time.perf_counter() - started
        if failures:
            location.write_table(manifest.TREE_FAILURES_FILE, pa.Table.from_pylist(failures, schema=plan.FAILURE_SCHEMA))
        # The tree passes' seconds give the decode rate that sizes generation's parts, on resumes too.
        usage = {**usage, "seconds": round(seconds, 3)}
        table = label_sets.with_prior(table.replace_schema_metadata({manifest.USAGE_KEY: json.dumps(usage)}), prior)
        location.write_table(manifest.TREE_FILE, table)
        return table

    def execute(self, ctx: Context, upstream: None) -> dict:
        location, spec = ctx.location, self.spec
        if not location.exists("spec.json"):  # pin the run id to this spec before any work
            location.write_json("spec.json", {"fingerprint": spec.fingerprint(), "spec": spec.model_dump()})
        timings = {}
        retried_here = storage.retries()
        started = time.perf_counter()
        tree_table = self._tree(ctx)
        timings["tree"] = time.perf_counter() - started
        started = time.perf_counter()
        tree_usage = json.loads(tree_table.schema.metadata[manifest.USAGE_KEY.encode()])
        seconds = tree_usage.get("seconds")
        tokens_per_second = tree_usage["tokens_out"] / seconds if seconds else None
        retried_by_writes = run(spec, tree_table, location, ctx.engines(), tokens_per_second, ctx.retry_failures)
        timings["generate"] = time.perf_counter() - started
        summary = manifest.summarise(location, spec, tree_table, committed_parts(location))
        if "co_occurrence" in summary:
            labels = summary["co_occurrence"]["labels"]
            location.write_bytes(CO_OCCURRENCE_PNG, plots.heatmap(
                summary["co_occurrence"]["rows"], labels, labels, "label", "label",
                "rows holding both labels (diagonal: rows holding the label)"))
        if location.exists(pair_prior.FILE):
            record = location.read_json(pair_prior.FILE)
            summary["pair_prior"] = {"file": pair_prior.FILE, "weights": record["weights"],
                                     "unanswered": record["unanswered"], "usage": record["usage"]}
        return {
            "status": "complete" if summary["rows"]["missing"] == 0 else "incomplete",
            "output": location.uri(),
            "sizes": spec.sizes(),
            "versions": manifest.versions(),
            "plan": estimate.estimate(spec),
            **summary,
            "engine": ctx.engine_figures(),
            # Calls an S3 outage met and backoff rode out: on the driver and in the write tasks.
            "s3_retries": storage.retries() - retried_here + retried_by_writes,
            "timings_s": timings,
        }

    def card_section(self, found: dict) -> str:
        """Rows per language, when there are several: a language that fails shows apart. For
        label sets, rows per set size and the co-occurrence figure."""
        section = ""
        if len(found["languages"]) > 1:
            lines = "".join(f"| {row['language']} | {row['expected']} | {row['written']} | {row['failed_requests']} |\n"
                            for row in found["languages"])
            section = f"| language | planned | written | failed requests |\n|---|---|---|---|\n{lines}"
        if "co_occurrence" in found:
            sizes = ", ".join(f"{row['rows']} with {row['size']}" for row in found["counts"]["by_set_size"])
            section += (f"\nRows by number of labels: {sizes}. Labels written together "
                        f"(`manifest.json` holds the counts):\n\n![co-occurrence]({CO_OCCURRENCE_PNG})\n")
        if "pair_prior" in found:
            weights = ", ".join(f"`{pair}` {weight}" for pair, weight in found["pair_prior"]["weights"].items())
            section += (f"\nSets weighed by the LLM's prior of how often real texts carry each pair "
                        f"(`{pair_prior.FILE}`): {weights}.\n")
        return section

    def describe(self, found: dict) -> str:
        rows, failures = found["rows"], found["failures"]
        return (
            f"generate {found['status']}: {rows['written']} of {rows['expected']} rows at {found['output']} "
            f"({failures['requests']} failed request(s), {failures['rows_lost']} rows lost; "
            f"{found['engine']['starts']} engine start(s))"
        )
