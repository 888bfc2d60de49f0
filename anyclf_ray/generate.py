"""Generation stage: every (language, leaf, sample) becomes one labelled example.

In: a ``JobSpec``, the tree and the run's location. Out: Parquet parts ``data/part-*.parquet``
(``EXAMPLE_SCHEMA``) and, for requests that failed after their retries,
``failures/part-*.parquet`` (``plan.FAILURE_SCHEMA``), written by Ray Data write tasks while the
LLM answers stream out of the vLLM replicas.

A part is committed when its data file lands (atomically, after its failures file). Its footer
names the requests it answered and the tokens they cost, so a re-run of the same run id skips
committed requests, and the manifest adds the parts up without reading their rows.
"""

from __future__ import annotations

import json
import logging
import uuid

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import BlockAccessor

from anyclf_ray import llm, plan
from anyclf_ray.config import JobSpec
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
PART_METADATA_KEY = "anyclf_ray.part"
# Write tasks only move bytes; a small CPU share keeps them schedulable next to busy engines.
WRITE_TASK_CPUS = 0.25


def examples_from(results: pa.Table, model_name: str) -> pa.Table:
    """One row per item of every successful result, with its stable id."""
    rows = []
    for result in results.filter(pc.field("ok")).to_pylist():
        for offset, text in enumerate(result["items"]):
            sample_index = result["first_sample"] + offset
            rows.append(
                {
                    "id": plan.example_id(result["leaf_id"], sample_index),
                    "text": text,
                    "label": result["label"],
                    "label_name": result["label_name"],
                    "language": result["language"],
                    "source_type": result["source_type"],
                    "topic": result["topic"],
                    "subtopic": result["subtopic"],
                    "leaf_id": result["leaf_id"],
                    "sample_index": sample_index,
                    "model": model_name,
                }
            )
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def failures_from(results: pa.Table) -> pa.Table:
    failed = results.filter(~pc.field("ok")).to_pylist()
    return pa.Table.from_pylist([plan.failure_record(r, r["n_items"]) for r in failed], schema=plan.FAILURE_SCHEMA)


class ShardSink(Datasink):
    """Writes LLM results as one committed part (data + failures) per write task."""

    def __init__(self, location: RunLocation, model_name: str, requests_per_part: int):
        self.location = location
        self.model_name = model_name
        self.requests_per_part = requests_per_part

    @property
    def min_rows_per_write(self) -> int:
        return self.requests_per_part

    def write(self, blocks, ctx) -> None:
        results = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        # Ray may hand over more than a part's worth at once; cut so parts stay near the size asked.
        for start in range(0, results.num_rows, self.requests_per_part):
            self._write_part(results.slice(start, self.requests_per_part))

    def _write_part(self, results: pa.Table) -> None:
        name = f"part-{uuid.uuid4().hex[:16]}.parquet"
        failures = failures_from(results)
        if failures.num_rows:
            self.location.write_table(f"failures/{name}", failures)
        part = {**llm.usage(results), "request_ids": results["request_id"].to_pylist()}
        examples = examples_from(results, self.model_name)
        examples = examples.replace_schema_metadata({PART_METADATA_KEY: json.dumps(part)})
        self.location.write_table(f"data/{name}", examples)  # the commit point of this part


def committed_parts(location: RunLocation) -> dict[str, dict]:
    """Footer metadata of every committed data part, by relative path."""
    return {
        path: json.loads(location.read_metadata(path)[PART_METADATA_KEY])
        for path in location.list("data")
    }


def run(spec: JobSpec, tree: pa.Table, location: RunLocation) -> None:
    """Generate every example not already in a committed part of this run."""
    done = {rid for part in committed_parts(location).values() for rid in part["request_ids"]}
    requests = [r for r in plan.generation_requests(spec, tree) if r["request_id"] not in done]
    log.info("generate: %d request(s) to run, %d already committed", len(requests), len(done))
    if not requests:
        return
    per_part = max(1, spec.output.rows_per_shard // spec.engine.examples_per_request)
    dataset = llm.generate(llm.requests_dataset(requests, spec.engine), spec.model, spec.engine)
    dataset.write_datasink(
        ShardSink(location, spec.model.name, per_part), ray_remote_args={"num_cpus": WRITE_TASK_CPUS}
    )
