"""Tree stage step: expand the instruction into source types, topics and subtopics.

In: a ``JobSpec`` and the run's engine pool. Out: the tree, one row per planned (label, source
type, topic, subtopic) leaf position (``plan.TREE_SCHEMA``), failure records and LLM usage.
Each level is one pass of the pool over that level's nodes. A node whose answer still fails
after retries leaves its subtree's text null and is recorded with the number of examples it
cost; its siblings go on.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from anyclf_ray.core.config import JobSpec
from anyclf_ray.core.results import Usage
from anyclf_ray.labels import label_sets
from anyclf_ray.llm import engine
from anyclf_ray.llm.pool import EnginePool
from anyclf_ray.sources import parts, plan

log = logging.getLogger(__name__)

LEVEL_INDEX = {"source_type": "source_type_index", "topic": "topic_index", "subtopic": "subtopic_index"}


def _fill_level(level: str, keys: tuple[str, ...], rows: list[dict], results: list[dict],
                rows_per_leaf: list[int]) -> list[dict]:
    """Write each node's answer into the leaves under it (a node named by ``keys``); return
    failure records."""
    by_node = {tuple(r[k] for k in keys): r for r in results}
    failures = []
    lost: dict[tuple, int] = {}
    for row, n_rows in zip(rows, rows_per_leaf):
        node = tuple(row[k] for k in keys)
        result = by_node.get(node)
        if result is None:
            continue
        if result["ok"]:
            row[level] = str(result["items"][row[LEVEL_INDEX[level]]])
        else:
            lost[node] = lost.get(node, 0) + n_rows
    for node, n_rows in lost.items():
        failures.append(parts.failure_record(by_node[node], n_rows))
    return failures


def expand(spec: JobSpec, pool: EnginePool, prior: dict[str, float]) -> tuple[pa.Table, list[dict], Usage]:
    """Build the whole tree level by level; return it, the failures met and the LLM usage.
    ``prior``: a multi-label run's pair weights, which decide the rows a failed node costs."""
    tree = label_sets.with_prior(plan.full_tree(spec), prior)
    rows_per_leaf = plan.samples_per_leaf(spec, tree).sum(axis=0).tolist()
    rows = tree.to_pylist()
    failures: list[dict] = []
    total = Usage()
    for level in plan.TREE_LEVELS:
        requests = plan.tree_requests(level, spec, rows)
        if not requests:  # every parent failed: nothing left to expand
            break
        log.info("tree: expanding %d %s node(s)", len(requests), level)
        results = pool.answer_table(engine.requests_table(requests), f"tree/{level}")
        failures += _fill_level(level, plan.node_keys(level, spec), rows, results.to_pylist(), rows_per_leaf)
        total += engine.usage(results)
    return pa.Table.from_pylist(rows, schema=plan.TREE_SCHEMA), failures, total
