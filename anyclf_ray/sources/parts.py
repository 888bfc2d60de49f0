"""Committed parts: how a source's rows land, are found again and are counted.

In: LLM results (answered requests, ``engine.RESULT_FIELDS``) streaming out of the engine pool,
and the source's function from results to rows. Out, under the source's folder:
``failures/part-*.parquet`` (``FAILURE_SCHEMA``: the requests that failed after their retries,
with the rows they cost), then ``data/part-*.parquet``, whose footer (``Part``) names the
requests it answered and what they cost: a part is committed when its data file lands.

For a run: the committed parts' footers, read once (``committed``) and added to by the parts
a pass writes (``PartSink.written``); the failures no later part answered (``failures``); and
rows per (label key, language), counted part by part so the driver never holds a column of
every row (``written_counts``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import ConfigDict
from ray.data import Datasink
from ray.data.block import BlockAccessor

from anyclf_ray.core import results, runtime, storage
from anyclf_ray.core.ids import STABLE_ID, stable_id
from anyclf_ray.core.progress import Progress
from anyclf_ray.core.results import Usage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.llm import engine
from anyclf_ray.llm.pool import EnginePool

# One row per LLM request that still failed after its retries, and the rows it cost.
FAILURE_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("request_id", pa.string()),
        ("language", pa.string()),
        ("label", pa.string()),
        ("source_type_index", pa.int32()),
        ("topic_index", pa.int32()),
        ("subtopic_index", pa.int32()),
        ("first_sample", pa.int32()),
        ("n_items", pa.int32()),
        ("attempts", pa.int32()),
        ("error", pa.string()),
        ("last_output", pa.string()),
        ("rows_lost", pa.int64()),
    ]
)
PART_METADATA_KEY = "anyclf_ray.part"


class Part(results.Model):
    """A committed part's footer: the requests it answered (as a ``STABLE_ID`` array once read:
    a 10M-row run's 2.3M ids take 37 MiB, not 300 as Python strings), its rows and usage."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    request_ids: np.ndarray
    rows: int
    usage: Usage


def failure_record(result: dict, rows_lost: int) -> dict:
    """A FAILURE_SCHEMA row for a failed request result (fields it lacks are null)."""
    return {**{name: result.get(name) for name in FAILURE_SCHEMA.names}, "rows_lost": rows_lost}


def failures_from(answered: pa.Table) -> pa.Table:
    failed = answered.filter(~pc.field("ok")).to_pylist()
    return pa.Table.from_pylist([failure_record(r, r["n_items"]) for r in failed], schema=FAILURE_SCHEMA)


class PartSink(Datasink):
    """Writes LLM results as one committed part (failures, then data) per write task; once the
    pass is done, ``written`` holds the parts written (on the driver) and ``s3_retries`` the S3
    calls the write tasks tried again."""

    def __init__(self, location: RunLocation, folder: str, rows_of: Callable[[pa.Table], pa.Table],
                 requests_per_part: int):
        self.location, self.folder, self.rows_of = location, folder, rows_of
        self.requests_per_part = requests_per_part
        self.pass_id = uuid.uuid4().hex
        self.written: dict[str, Part] = {}
        self.s3_retries = 0

    @property
    def min_rows_per_write(self) -> int:
        return self.requests_per_part

    def path(self, kind: str, name: str) -> str:
        return f"{self.folder}/{kind}/{name}" if self.folder else f"{kind}/{name}"

    def write(self, blocks, ctx) -> tuple[dict[str, str], int]:
        """Commit the blocks' results; the parts' footers by path, and the S3 calls this took
        again (a write task's process runs one task at a time)."""
        retried = storage.retries()
        # Ray Data hands over empty blocks without a schema too (a block of leaves all committed
        # before a resume): they hold nothing to write, and would not concatenate.
        tables = [table for table in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if table.num_rows]
        if not tables:
            return {}, 0
        answered = pa.concat_tables(tables)
        # Ray may hand over more than a part's worth at once; cut so parts stay near the size asked.
        footers = dict(self._write_part(answered.slice(start, self.requests_per_part))
                       for start in range(0, answered.num_rows, self.requests_per_part))
        return footers, storage.retries() - retried

    def _write_part(self, answered: pa.Table) -> tuple[str, str]:
        # Named by this pass and its requests: a write task Ray retries (its node lost) rewrites
        # the same part in place, never a second copy of its rows.
        name = f"part-{stable_id('part', self.pass_id, *answered['request_id'].to_pylist())}.parquet"
        failures = failures_from(answered)
        if failures.num_rows:
            self.location.write_table(self.path("failures", name), failures)
        rows = self.rows_of(answered)
        footer = json.dumps({"request_ids": answered["request_id"].to_pylist(), "rows": rows.num_rows,
                             "usage": engine.usage(answered).model_dump()})
        self.location.write_table(self.path("data", name), rows.replace_schema_metadata({PART_METADATA_KEY: footer}))
        return self.path("data", name), footer  # the data file above is the commit point of this part

    def on_write_complete(self, write_result) -> None:
        for footers, retried in write_result.write_returns:
            self.written |= {path: read_part(footer) for path, footer in footers.items()}
            self.s3_retries += retried


def commit_pass(pool: EnginePool, name: str, requests: ray.data.Dataset, sink: PartSink, total: int,
                progress: Progress, interval: float) -> tuple[dict[str, Part], int]:
    """The LLM pass ``name``: ``requests`` (``total`` of them) answered by the engine pool and
    committed part by part by ``sink``, ``progress`` written every ``interval`` seconds (and
    marked failed if the pass fails); the parts written and the S3 calls their writes retried."""
    answers = pool.answer(requests, name, batch_size=sink.requests_per_part, total=total)
    try:
        pool.run_pass(name, lambda: answers.write_datasink(sink, ray_remote_args={"num_cpus": runtime.TASK_CPUS}),
                      report=progress, interval=interval)
    except BaseException:
        progress.finish("failed")
        raise
    progress.finish("finished")
    return sink.written, sink.s3_retries


def read_part(footer: str) -> Part:
    """A part's footer (JSON), its request ids as a ``STABLE_ID`` array."""
    found = json.loads(footer)
    return Part(request_ids=np.array(found["request_ids"], STABLE_ID), rows=found["rows"],
                usage=Usage.model_validate(found["usage"]))


def committed(location: RunLocation, folder: str = "") -> dict[str, Part]:
    """Every committed data part of a source (``folder``) by its path, from its footer alone."""
    data = f"{folder}/data" if folder else "data"
    return {path: read_part(location.read_metadata(path)[PART_METADATA_KEY]) for path in location.list(data)}


def done_ids(location: RunLocation, parts: dict[str, Part], retry_failures: bool) -> np.ndarray:
    """The request ids the committed ``parts`` answered, sorted and unique (``uncommitted`` wants
    them so); with ``retry_failures``, less those that failed, so that they are asked again."""
    retry = failures(location, parts)[0]["request_id"].to_pylist() if retry_failures else []
    return np.setdiff1d(np.concatenate([np.empty(0, STABLE_ID), *(part.request_ids for part in parts.values())]),
                        np.array(retry, STABLE_ID))


def uncommitted(requests: pa.Table, done: ray.ObjectRef) -> pa.Table:
    """``requests`` less those whose id is in ``done`` (an object ref to ``done_ids``, fetched
    zero-copy where the Ray Data task runs)."""
    ids = request_ids(requests)
    return requests.filter(pa.array(~np.isin(ids, ray.get(done), assume_unique=True)))


def request_ids(table: pa.Table) -> np.ndarray:
    return np.array(table["request_id"].to_pylist(), STABLE_ID)


def failures(location: RunLocation, parts: dict[str, Part]) -> tuple[pa.Table, list[str]]:
    """The failed requests of the committed ``parts`` that no part has answered since, and the
    failures files read. (``--retry-failures`` commits retried requests in new parts: answered,
    a request is no longer a failure; failed again, it counts once.)"""
    tables, files, answered = [FAILURE_SCHEMA.empty_table()], [], [np.empty(0, STABLE_ID)]
    for path, part in parts.items():
        # A failures file counts only with its committed data part (a crash can leave it alone).
        failed = FAILURE_SCHEMA.empty_table()
        paired = path.replace("/data/", "/failures/") if "/data/" in path else path.replace("data/", "failures/", 1)
        if location.exists(paired):
            failed = location.read_table(paired)
            tables.append(failed)
            files.append(paired)
        answered.append(np.setdiff1d(part.request_ids, request_ids(failed)))
    found = pa.concat_tables(tables)
    found = found.filter(pa.array(~np.isin(request_ids(found), np.concatenate(answered))))
    once = {rid: row for row, rid in enumerate(found["request_id"].to_pylist())}
    return found.take(pa.array(sorted(once.values()), pa.int64())), files


def written_counts(location: RunLocation, parts: dict[str, Part], key: str) -> pa.Table:
    """Rows per (``key``, language) of the committed ``parts``, counted part by part."""
    schema = pa.schema([(key, pa.string()), ("language", pa.string()), ("rows", pa.int64())])
    per_part = [pa.Table.from_pylist(results.counts(location.read_table(path, columns=[key, "language"]),
                                                    [key, "language"]), schema=schema) for path in parts]
    return pa.concat_tables([schema.empty_table(), *per_part])
