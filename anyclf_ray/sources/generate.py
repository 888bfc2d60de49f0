"""Generation stage: the tree, then every (language, leaf, sample) as one labelled example.

A source (``stage.SourceStage``). In: a ``JobSpec`` and the run's engine pool. Out, at the run's
root: ``spec.json`` (what the run id means), ``tree.parquet`` (``tree.py``), committed parts
``data/part-*.parquet`` in the run's row schema (``LabelScheme.row_schema``) and, for requests
that failed after their retries, ``failures/part-*.parquet`` (``parts.py``), written by Ray Data
write tasks while the answers stream out of the engine pool; then, for label sets,
``co_occurrence.png``; the dataset card and ``manifest.json`` (a ``GenerationReport``), last.
While the pass runs, ``status.json`` says how far it is (``progress.py``).

A re-run of the same run id skips committed requests (their ids are in the parts' footers),
and the manifest adds the parts up without reading their rows.
"""

from __future__ import annotations

import functools
import json
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from anyclf_ray.core import cards, plots, results, runtime, storage
from anyclf_ray.core.config import JobSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.progress import Progress
from anyclf_ray.core.results import (
    CoOccurrence,
    Counts,
    Failures,
    GenerationReport,
    LanguageRows,
    PlannedRows,
    PriorSummary,
    Rows,
    Shards,
    StageResult,
    Usage,
)
from anyclf_ray.core.stage import Context, Input, Outcome, SourceStage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels import label_sets, pair_prior
from anyclf_ray.labels.scheme import LabelScheme, scheme
from anyclf_ray.llm import engine
from anyclf_ray.llm.pool import EnginePool
from anyclf_ray.sources import estimate, parts, plan, tree

log = logging.getLogger(__name__)

TREE_FILE = "tree.parquet"
TREE_FAILURES_FILE = "failures/tree.parquet"
# The tree's footer key: the tree passes' usage and seconds (their decode rate sizes the parts).
USAGE_KEY = "anyclf_ray.usage"
# Requests per replica below which a part's time bound does not cut it: a smaller batch leaves
# an engine idle between parts.
PART_FLOOR = 16
CO_OCCURRENCE_PNG = "co_occurrence.png"


def examples_from(answered: pa.Table, model_name: str, labels: LabelScheme) -> pa.Table:
    """One row per item of every successful result, with its stable id, in the run's row schema."""
    good = answered.filter(pc.field("ok")).to_pylist()
    rows = pa.Table.from_pylist(
        [{"id": plan.example_id(result["leaf_id"], result["first_sample"] + offset), "text": text,
          "language": result["language"], "source_type": result["source_type"], "topic": result["topic"],
          "subtopic": result["subtopic"], "leaf_id": result["leaf_id"], "sample_index": result["first_sample"] + offset,
          "model": model_name, "origin": "generated"}
         for result in good for offset, text in enumerate(result["items"])],
        schema=pa.schema([field for field in labels.row_schema if field not in labels.fields]))
    columns = labels.columns([result["labels"] for result in good for _ in result["items"]])
    return pa.table([columns[field.name] if field in labels.fields else rows[field.name]
                     for field in labels.row_schema], schema=labels.row_schema)


def pending_requests(leaves: pa.Table, spec: JobSpec, committed: ray.ObjectRef) -> pa.Table:
    """Ray Data map: the generation requests of a block of leaves, less the committed ones
    (``committed``: an object ref to their sorted ids, fetched zero-copy where the task runs)."""
    return parts.uncommitted(plan.render_requests(spec, leaves), committed)


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


def run(spec: JobSpec, tree_table: pa.Table, location: RunLocation, pool: EnginePool, found: dict[str, parts.Part],
        tokens_per_second: float | None, retry_failures: bool = False) -> tuple[dict[str, parts.Part], int]:
    """Generate every example not already in a committed part (``found``) of this run (and,
    with ``retry_failures``, the requests that failed in one); the parts this pass committed,
    and the S3 calls its write tasks tried again.

    The driver holds the leaves and the committed request ids; requests are rendered by Ray
    Data tasks, block by block, as the engines take them.
    """
    committed = parts.done_ids(location, found, retry_failures)
    leaves = plan.leaf_table(spec, tree_table)
    total = plan.request_count(spec, leaves)
    pending = total - len(committed)
    log.info("generate: %d request(s) to run, %d already committed", pending, len(committed))
    if not pending:
        return {}, 0
    per_part = requests_per_part(spec, tokens_per_second, pool.engine.replicas)
    log.info("generate: a part commits every %d request(s) (%d rows)", per_part,
             per_part * spec.sampling.examples_per_request)
    leaves_per_block = max(1, leaves.num_rows * per_part // total)
    requests = runtime.blocks_dataset(leaves, leaves_per_block, pool.engine.replicas).map_batches(
        functools.partial(pending_requests, spec=spec, committed=ray.put(committed)),
        batch_size=None, batch_format="pyarrow", num_cpus=runtime.TASK_CPUS,
    )
    sink = parts.PartSink(location, "", functools.partial(examples_from, model_name=spec.model.name,
                                                          labels=scheme(spec)), per_part)
    progress = Progress(location, "generate", pending, int(pc.sum(leaves.column("n_samples")).as_py()),
                        sum(part.rows for part in found.values()))
    return parts.commit_pass(pool, "generate", requests, sink, pending, progress, spec.output.status_seconds)


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


def summarise(location: RunLocation, spec: JobSpec, tree_table: pa.Table, found: dict[str, parts.Part]) -> dict:
    """Rows, languages, counts, failures and usage of the generation as committed (``found``:
    every committed part with its footer)."""
    labels = scheme(spec)
    written = parts.written_counts(location, found, labels.key)
    generation, files = parts.failures(location, found)
    tree_files = [TREE_FAILURES_FILE] if location.exists(TREE_FAILURES_FILE) else []
    failures = pa.concat_tables([generation] + [location.read_table(path) for path in tree_files])
    tree_usage = json.loads(location.read_metadata(TREE_FILE)[USAGE_KEY])
    usage = sum((part.usage for part in found.values()), Usage.model_validate(tree_usage["usage"]))
    expected = plan.expected_rows(spec, tree_table)
    written_by_language = {row["language"]: row["rows"] for row in results.counts(written, ["language"], "rows")}
    failed_by_language = {row["language"]: row["rows"] for row in results.counts(failures, ["language"])}
    total = int(pc.sum(written["rows"]).as_py() or 0)
    co_occurrence = labels.co_occurrence(written)
    return {
        "rows": PlannedRows(expected=sum(expected.values()), written=total, missing=sum(expected.values()) - total),
        # One line per language, so a language that fails shows apart from the others.
        "languages": [LanguageRows(language=language, expected=n, written=written_by_language.get(language, 0),
                                   missing=n - written_by_language.get(language, 0),
                                   failed_requests=failed_by_language.get(language, 0))
                      for language, n in expected.items()],
        "counts": Counts(**labels.counts(written)),
        "co_occurrence": (None if co_occurrence is None
                          else CoOccurrence(labels=labels.ids, rows=co_occurrence.tolist())),
        "failures": Failures(requests=failures.num_rows, rows_lost=sum(failures["rows_lost"].to_pylist()),
                             by_stage=results.counts(failures, ["stage"]), files=tree_files + files),
        "llm": usage,
    }


class Generate(SourceStage[GenerationReport, "pa.Table | None"]):
    """The generation source: it writes at the run's root and resumes rather than redoes."""

    name = "generate"
    report_type = GenerationReport
    card_config = "default"
    folder = ""

    @classmethod
    def enabled(cls, spec: JobSpec) -> bool:
        return True

    @property
    def uses_llm(self) -> bool:
        return True

    @property
    def settings(self) -> JobSpec:
        return self.spec

    def fingerprint(self, upstream: str | None) -> str:
        return self.spec.fingerprint()  # the run id's default is derived from it

    def retries(self, result: StageResult[GenerationReport]) -> bool:
        return result.report.failures.of_stage("generate") > 0

    def check(self, location: RunLocation) -> pa.Table | None:
        """The plan (a label without the rows it needs is refused), the sets' floors, that the
        run id is free or holds this very spec; the user's tree, if any."""
        estimate.estimate(self.spec)
        scheme(self.spec).check()
        if location.exists("spec.json"):
            pinned = location.read_json("spec.json")
            if pinned.get("schema_version") != results.SCHEMA_VERSION:
                raise ConfigError(f"run_id: {location.run_id!r} was started by another anyclf-ray; use a new run_id")
            if pinned["fingerprint"] != self.spec.fingerprint():
                raise ConfigError(f"run_id: {location.run_id!r} already holds a run of a different spec; "
                                  "use a new run_id (or the same spec to resume it)")
        return user_tree(self.spec) if self.spec.tree_path else None

    def longest_requests(self) -> dict[str, pa.Table]:
        """The tree levels' requests with every item ``max_item_chars`` long, generation's, and
        the pair prior's (``estimate``'s one leaf each)."""
        one_tree = estimate.one_leaf_each(self.spec)
        found = {}
        if not self.spec.tree_path:
            nodes = one_tree.to_pylist()
            found = {f"tree/{level}": engine.requests_table(plan.tree_requests(level, self.spec, nodes))
                     for level in plan.TREE_LEVELS}
        found["generate"] = plan.render_requests(self.spec, estimate.sample_leaves(self.spec, one_tree))
        found["pair_prior"] = pair_prior.requests(self.spec)
        return found

    def _tree(self, ctx: Context, given: pa.Table | None) -> pa.Table:
        location = ctx.location
        if location.exists(TREE_FILE):
            log.info("tree: reusing the committed tree of this run")
            return location.read_table(TREE_FILE)
        prior = pair_prior.ask(self.spec, ctx.engines)  # asked first: it decides what a failed node costs
        if prior is not None:
            location.write_json(pair_prior.FILE, prior)
        weights = prior["weights"] if prior else {}
        failures: list[dict] = []
        if given is not None:
            table, usage, seconds = given, Usage(), 0.0
        else:
            started = time.perf_counter()
            table, failures, usage = tree.expand(self.spec, ctx.engines(), weights)
            seconds = time.perf_counter() - started
        if failures:
            location.write_table(TREE_FAILURES_FILE, pa.Table.from_pylist(failures, schema=parts.FAILURE_SCHEMA))
        # The tree passes' seconds give the decode rate that sizes generation's parts, on resumes too.
        footer = json.dumps({"usage": usage.model_dump(), "seconds": round(seconds, 3)})
        table = label_sets.with_prior(table.replace_schema_metadata({USAGE_KEY: footer}), weights)
        location.write_table(TREE_FILE, table)
        return table

    def execute(self, ctx: Context, upstream: Input | None, given: pa.Table | None) -> Outcome[GenerationReport]:
        location, spec = ctx.location, self.spec
        if not location.exists("spec.json"):  # pin the run id to this spec before any work
            location.write_json("spec.json", {"schema_version": results.SCHEMA_VERSION,
                                              "fingerprint": spec.fingerprint(), "spec": spec.model_dump()})
        timings = {}
        retried_here = storage.retries()
        started = time.perf_counter()
        tree_table = self._tree(ctx, given)
        timings["tree"] = time.perf_counter() - started
        started = time.perf_counter()
        seconds = json.loads(tree_table.schema.metadata[USAGE_KEY.encode()])
        tokens_per_second = seconds["usage"]["tokens_out"] / seconds["seconds"] if seconds["seconds"] else None
        found = parts.committed(location)
        written, retried_by_writes = run(spec, tree_table, location, ctx.engines(), found, tokens_per_second,
                                         ctx.retry_failures)
        found |= written
        timings["generate"] = time.perf_counter() - started
        summary = summarise(location, spec, tree_table, found)
        if summary["co_occurrence"] is not None:
            matrix = summary["co_occurrence"]
            names = [scheme(spec).shown(label) for label in matrix.labels]
            location.write_bytes(CO_OCCURRENCE_PNG, plots.heatmap(
                matrix.rows, names, names, "label", "label",
                "rows holding both labels (diagonal: rows holding the label)"))
        prior = None
        if location.exists(pair_prior.FILE):
            prior = PriorSummary.of(location.read_json(pair_prior.FILE), pair_prior.FILE)
        report = GenerationReport(sizes=spec.sizes(), versions=cards.versions(), plan=estimate.estimate(spec),
                                  pair_prior=prior, engine=ctx.engine_figures(),
                                  s3_retries=storage.retries() - retried_here + retried_by_writes, **summary)
        return Outcome(report=report, rows=Rows(output=report.rows.written), output=location.uri(),
                       shards=Shards(data=sorted(found)), timings=timings,
                       status="complete" if report.rows.missing == 0 else "incomplete")

    def card_section(self, result: StageResult[GenerationReport]) -> str:
        """Rows per language, when there are several: a language that fails shows apart. For
        label sets, rows per set size and the co-occurrence figure."""
        found, section = result.report, ""
        if len(found.languages) > 1:
            lines = "".join(f"| {row.language} | {row.expected} | {row.written} | {row.failed_requests} |\n"
                            for row in found.languages)
            section = f"| language | planned | written | failed requests |\n|---|---|---|---|\n{lines}"
        if found.co_occurrence is not None:
            sizes = ", ".join(f"{n} with {size}" for size, n in found.counts.per_set_size().items())
            section += (f"\nRows by number of labels: {sizes}. Labels written together "
                        f"(`manifest.json` holds the counts):\n\n![co-occurrence]({CO_OCCURRENCE_PNG})\n")
        if found.pair_prior is not None:
            weights = ", ".join(f"{cards.code(pair)} {weight}" for pair, weight in found.pair_prior.weights.items())
            section += (f"\nSets weighed by the LLM's prior of how often real texts carry each pair "
                        f"(`{pair_prior.FILE}`): {weights}.\n")
        return section

    def describe(self, result: StageResult[GenerationReport]) -> str:
        found = result.report
        unanswered = (f"; the LLM's prior left {found.pair_prior.unanswered} label pair(s) unanswered, weighed 1"
                      if found.pair_prior and found.pair_prior.unanswered else "")
        return (
            f"generate {result.status}: {found.rows.written} of {found.rows.expected} rows in data/ "
            f"({found.failures.requests} failed request(s), {found.failures.rows_lost} rows lost; "
            f"{found.engine.starts} engine start(s)){unanswered}"
        )
