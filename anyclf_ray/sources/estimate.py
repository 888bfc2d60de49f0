"""The plan report: what a spec will generate and what it can cost, before any LLM time.

In: a ``JobSpec`` and, optionally, a decode rate per replica. Out: tree sizes, leaves, LLM
requests per pass, planned rows per label and language, tokens and, given the rate, time.
No Ray and no model: the tree's items are all taken ``max_item_chars`` long, so prompt lengths
are upper bounds, and answers are counted at their token budgets (``max_tokens``): what
a run's first attempts spend at most (retries of refused or cut-off answers add to both).
``anyclf-ray plan`` prints it; the generation's manifest keeps it beside the figures the run
measured.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from anyclf_ray.core.config import JobSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.tokens import CHARS_PER_TOKEN
from anyclf_ray.labels import pair_prior
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.sources import annotate, plan


def one_leaf_each(spec: JobSpec) -> pa.Table:
    """A tree of one source type, topic and subtopic per (tree, label), every item as long as an
    item may be: one prompt of each kind, standing for all of its kind (prompts of a kind differ
    only in their tree items, here all alike)."""
    one = spec.model_copy(update={"n_record_to_generate": None, "n_source_type": 1, "n_topic": 1, "n_subtopic": 1,
                                  "sample_per_subtopic": 1})
    tree = plan.full_tree(one)
    filler = pa.array(["x" * spec.sampling.max_item_chars] * tree.num_rows)
    for level in plan.TREE_LEVELS:
        tree = tree.set_column(tree.schema.get_field_index(level), level, filler)
    return tree


# The settings of each filter that the plan shows.
CHECKS = {"language_check": ("min_confidence",), "label_check": ("methods", "action"), "dedup": ("threshold",)}


def sample_leaves(spec: JobSpec, tree: pa.Table) -> pa.Table:
    """One leaf of one sample per (language, row) of ``one_leaf_each``'s tree, with its row's
    label; where a set of several labels is planned, a largest one instead, whose prompt stands
    for all (every label is named in a set's prompt, wanted or avoided)."""
    language, row = np.nonzero(plan.on_leaf(spec, tree))
    leaves = tree.take(pa.array(row)).drop_columns(["language"])
    leaves = leaves.add_column(0, "language", pa.array(spec.languages).take(pa.array(language)))
    labels = scheme(spec)
    largest = max(labels.sets(), key=len)
    own = [[label] for label in leaves["label"].to_pylist()]
    chosen = [[labels.ids[i] for i in largest]] * leaves.num_rows if len(largest) > 1 else own
    for column, values in (("labels", chosen), ("label_names", [[labels.descs[labels.position[i]] for i in found]
                                                                  for found in chosen])):
        leaves = leaves.append_column(column, pa.array(values, pa.list_(pa.string())))
    return leaves.append_column("n_samples", pa.array(np.ones(leaves.num_rows, np.int32)))


def prompt_tokens(prompts: list[str]) -> int:
    return math.ceil(sum(map(len, prompts)) / CHARS_PER_TOKEN)


def check_rows(spec: JobSpec, by_label: np.ndarray) -> None:
    """ConfigError naming the fix when a label gets no planned row, or, with training on, fewer
    than training needs: 2 rows with the label once ``train.test_size`` is held out."""
    fix = "raise n_record_to_generate" if spec.n_record_to_generate else "raise sample_per_subtopic"
    planned = dict(zip((label.id for label in spec.labels), by_label.astype(int).tolist()))
    empty = [label for label, n in planned.items() if not n]
    if empty:
        raise ConfigError(f"labels: label {empty[0]!r} gets no row of the plan; {fix}")
    if not spec.train.enabled:
        return
    for label, n in planned.items():
        trained = math.floor(n * (1 - spec.train.test_size))
        if trained < 2:
            raise ConfigError(
                f"labels: label {label!r} gets {n} planned row(s), {trained} left to train on after "
                f"train.test_size {spec.train.test_size}, and training needs 2; {fix} or lower train.test_size")


def estimate(spec: JobSpec, tokens_per_second: float | None = None,
             prompt_tokens_per_second: float | None = None) -> dict:
    """The plan of ``spec``; with ``tokens_per_second`` (decoded per replica), its time too; with
    annotation on, ``annotate``: what it asks of the input, read from its metadata
    (``annotate.plan``; its time from ``prompt_tokens_per_second``).

    Counted from arrays over the leaves, never a row or request each, so planning 10M rows
    takes about what planning 1M does.
    """
    one_tree = one_leaf_each(spec)
    sizes = spec.sizes()
    # Nodes of each level under one (tree, label) node of the level above.
    nodes_per_node = {"source_type": 1, "topic": sizes["n_source_type"],
                      "subtopic": sizes["n_source_type"] * sizes["n_topic"]}
    requests, tokens_in, tokens_out = {}, 0, 0
    asked = pair_prior.requests(spec)  # planned with weight 1 per pair: the answers are not known yet
    if asked.num_rows:
        requests["pair_prior"] = asked.num_rows
        tokens_in += prompt_tokens(asked["prompt"].to_pylist())
        tokens_out += sum(asked["max_tokens"].to_pylist())
    one_nodes = one_tree.to_pylist()
    for level in plan.TREE_LEVELS:
        level_requests = [] if spec.tree_path else plan.tree_requests(level, spec, one_nodes)  # a given tree costs none
        requests[level] = len(level_requests) * nodes_per_node[level]
        tokens_in += prompt_tokens([r["prompt"] for r in level_requests]) * nodes_per_node[level]
        tokens_out += sum(r["max_tokens"] for r in level_requests) * nodes_per_node[level]
    tree = plan.full_tree(spec)
    members = scheme(spec).members_of_sets()
    # Added up group by group: the plan never holds a 10M-row run's leaves at once.
    set_rows, by_language, generate = np.zeros(len(members)), np.zeros(len(spec.languages)), 0
    for language, _, set_index, n_samples in plan.leaf_groups(spec, tree):
        set_rows += np.bincount(set_index, weights=n_samples, minlength=len(members))
        by_language += np.bincount(language, weights=n_samples, minlength=len(spec.languages))
        generate += int(np.sum(-(-n_samples // spec.sampling.examples_per_request)))
    by_label = set_rows @ members
    by_size = np.bincount(members.sum(axis=1), weights=set_rows)
    check_rows(spec, by_label)
    sample = plan.render_requests(spec, sample_leaves(spec, one_tree)).column("prompt").to_pylist()
    requests["generate"] = generate
    tokens_in += math.ceil(prompt_tokens(sample) / len(sample) * generate)
    tokens_out += generate * spec.sampling.max_tokens
    found: dict[str, Any] = {
        "sizes": sizes,
        "tree_languages": spec.tree_languages,
        "leaves": int(plan.on_leaf(spec, tree).sum()),
        "rows": {
            "total": int(by_language.sum()),
            "by_label": {label.id: int(n) for label, n in zip(spec.labels, by_label)},
            "label_sets": len(members),
            "by_set_size": {str(size): int(n) for size, n in enumerate(by_size) if size in members.sum(axis=1)},
            "by_language": dict(zip(spec.languages, by_language.astype(int).tolist())),  # as plan.expected_rows
        },
        "requests": {**requests, "total": sum(requests.values())},
        # What checks the rows, as the run kind resolved it (a multi-label run's judge by default).
        "checks": {section: {key: getattr(getattr(spec, section), key) for key in keys}
                   for section, keys in CHECKS.items() if getattr(spec, section).enabled},
        "tokens": {"in": tokens_in, "out_budget": tokens_out},
    }
    if spec.annotate.enabled:
        found["annotate"] = annotate.plan(spec, prompt_tokens_per_second)
        # Unknown (null) until the run reads a CSV or JSONL corpus: the total leaves it out.
        found["requests"] = {**requests, "annotate": found["annotate"]["questions"],
                             "total": sum(requests.values()) + (found["annotate"]["questions"] or 0)}
        found["tokens"] = {"in": tokens_in + (found["annotate"]["prompt_tokens"] or 0),
                           "out_budget": tokens_out + (found["annotate"]["answer_tokens"] or 0)}
    if spec.rounds.enabled:  # the most every round together asks (they may stop sooner)
        from anyclf_ray.rounds import targeted
        from anyclf_ray.training.evaluate import load_eval_set

        dev = spec.rounds.dev_set
        dev_set = load_eval_set(dev, scheme(spec), "rounds.dev_set") if dev else None
        found["rounds"] = targeted.bound(spec, found["rows"]["total"], dev_set.texts if dev_set else [])
        if dev_set:  # what the rounds will read of it: rows without a text or a label are skipped
            found["rounds"]["dev_set"] = {"texts": len(dev_set.texts), **dev_set.skipped}
    if tokens_per_second:
        replicas = spec.engine.replicas
        found["time"] = {
            "tokens_per_second_per_replica": tokens_per_second,
            "replicas": replicas,
            "hours_at_budget": round(tokens_out / (tokens_per_second * replicas) / 3600, 2),
        }
    return found


def _figure(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:,g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _sections(found: dict) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The plan's figures a person reads, by section: (name, value) lines."""
    rows, tokens = found["rows"], found["tokens"]
    by_size = list(rows["by_set_size"].items()) if set(rows["by_set_size"]) != {"1"} else []
    sections = [
        ("rows", [("total", rows["total"]), *((f"label {label}", n) for label, n in rows["by_label"].items()),
                  *((f"language {language}", n) for language, n in rows["by_language"].items()),
                  *((f"{size} label(s) a row", n) for size, n in by_size)]),
        ("LLM requests per pass", list(found["requests"].items())),
        ("tokens (first attempts)", [("prompts", tokens["in"]), ("answer budget", tokens["out_budget"]),
                                     *((f"longest prompt, {name}", n)
                                       for name, n in found.get("longest_prompt_tokens", {}).items())]),
    ]
    if "time" in found:
        time = found["time"]
        sections.append((f"time at {_figure(time['tokens_per_second_per_replica'])} tokens/s a replica, "
                         f"{time['replicas']} replica(s)", [("hours for the answer budget", time["hours_at_budget"])]))
    if "annotate" in found:
        annotating = found["annotate"]
        sections.append(("annotate", [(key.replace("_", " "), annotating[key]) for key in
                                      ("texts", "questions", "prompt_tokens", "answer_tokens", "hours_at_rate")
                                      if key in annotating]))
    if "rounds" in found:
        bound = found["rounds"]
        dev_set = bound.get("dev_set", {})
        sections.append((f"rounds (at most {bound['max_rounds']}, first attempts)", [
            *((f"dev set {key.replace('_', ' ')}", n) for key, n in dev_set.items() if n or key == "texts"),
            ("rows", bound["rows"]), ("generation requests", bound["generate_requests"]),
            ("prompt tokens", bound["tokens"]["in"]), ("answer budget", bound["tokens"]["out_budget"]),
            *((("label check judgements", bound["label_check_requests"]),) if "label_check_requests" in bound
              else ())]))
    sections.append(("checks", [(f"{section} {key}", ", ".join(value) if isinstance(value, list) else value)
                                for section, settings in found["checks"].items() for key, value in settings.items()]))
    return sections


def table(found: dict) -> str:
    """``estimate``'s plan as aligned text (``anyclf-ray plan``; ``--json`` prints ``found``)."""
    sizes = ", ".join(f"{key}={value}" for key, value in found["sizes"].items())
    lines = [f"{found['rows']['total']:,} rows on {found['leaves']:,} leaves; tree sizes {sizes} "
             f"({found['tree_languages'].replace('_', ' ')} tree)"]
    sections = [(title, [(name, _figure(value)) for name, value in figures]) for title, figures in _sections(found)]
    names = max(len(name) for _, figures in sections for name, _ in figures)
    values = max(len(value) for _, figures in sections for _, value in figures)
    for title, figures in sections:
        lines += ["", title, *(f"  {name:<{names}}  {value:>{values}}" for name, value in figures)]
    if "time" not in found:
        lines += ["", "time: give --tokens-per-second, a replica's decode rate, for the hours"]
    return "\n".join(lines)
