"""The plan report: what a spec will generate and what it can cost, before any LLM time.

In: a ``JobSpec`` and, optionally, a decode rate per replica. Out: tree sizes, leaves, LLM
requests per pass, planned rows per label and language, tokens and, given the rate, time.
No Ray and no model: the tree is a frame whose every item is ``max_item_chars`` long, so prompt
lengths are upper bounds, and answers are counted at their token budgets (``max_tokens``): what
a run's first attempts spend at most (retries of refused or cut-off answers add to both).
``anyclf-ray plan`` prints it; the generation's manifest keeps it beside the figures the run
measured.
"""

from __future__ import annotations

import collections
import math

import pyarrow as pa

from anyclf_ray import plan
from anyclf_ray.config import CHARS_PER_TOKEN, JobSpec


def placeholder_tree(spec: JobSpec) -> pa.Table:
    """Every planned leaf, each item as long as an item may be."""
    filler = "x" * spec.sampling.max_item_chars
    rows = plan.full_tree(spec).to_pylist()
    for row in rows:
        row.update({level: filler for level in plan.TREE_LEVELS})
    return pa.Table.from_pylist(rows, schema=plan.TREE_SCHEMA)


def prompt_tokens(requests: list[dict]) -> int:
    return math.ceil(sum(len(request["prompt"]) for request in requests) / CHARS_PER_TOKEN)


def estimate(spec: JobSpec, tokens_per_second: float | None = None) -> dict:
    """The plan of ``spec``; with ``tokens_per_second`` (decoded per replica), its time too."""
    tree = placeholder_tree(spec)
    rows = tree.to_pylist()
    counts = plan.samples_per_leaf(spec, tree)
    requests, tokens_in, tokens_out = {}, 0, 0
    for level in plan.TREE_LEVELS:
        level_requests = [] if spec.tree_path else plan.tree_requests(level, spec, rows)  # a given tree costs none
        requests[level] = len(level_requests)
        tokens_in += prompt_tokens(level_requests)
        tokens_out += sum(request["max_tokens"] for request in level_requests)
    per_request = spec.sampling.examples_per_request
    by_label = collections.Counter()
    generate = 0
    leaves = plan.leaves(spec, tree)
    for lang, row in leaves:
        by_label[rows[row]["label"]] += counts[lang][row]
        generate += math.ceil(counts[lang][row] / per_request)
    # One leaf's prompts stand for all: they differ only in the tree items, here all alike.
    first_leaves = [row for row in rows if row["source_type_index"] == row["topic_index"] == row["subtopic_index"] == 0]
    one_each = spec.model_copy(update={"n_record_to_generate": None, "sample_per_subtopic": 1})
    sample = plan.generation_requests(one_each, pa.Table.from_pylist(first_leaves, schema=plan.TREE_SCHEMA))
    requests["generate"] = generate
    tokens_in += math.ceil(prompt_tokens(sample) / len(sample) * generate)
    tokens_out += generate * spec.sampling.max_tokens
    found = {
        "sizes": spec.sizes(),
        "tree_languages": spec.tree_languages,
        "leaves": len(leaves),
        "rows": {
            "total": sum(by_label.values()),
            "by_label": {label.id: by_label[label.id] for label in spec.labels},
            "by_language": dict(zip(spec.languages, map(sum, counts))),  # as plan.expected_rows, from these counts
        },
        "requests": {**requests, "total": sum(requests.values())},
        "tokens": {"in": tokens_in, "out_budget": tokens_out},
    }
    if tokens_per_second:
        replicas = spec.engine.replicas
        found["time"] = {
            "tokens_per_second_per_replica": tokens_per_second,
            "replicas": replicas,
            "hours_at_budget": round(tokens_out / (tokens_per_second * replicas) / 3600, 2),
        }
    return found
