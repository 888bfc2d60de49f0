"""The LLM's co-occurrence prior of a multi-label run: how often real texts carry two labels.

In: a ``JobSpec`` with ``multi_label.pair_prior: llm`` and the run's engine pool. Out: a weight
per allowed label pair the user did not weigh (``pair_weights``), from the LLM's answer to one
request per pair (never, rarely, sometimes or often, at temperature 0), and the record kept in
``label_prior.json``: each pair's answer and weight, the pairs unanswered after retries (weight
1, as without a prior) and the tokens spent. Asked once, in the tree step, and stored in the
tree's footer (``label_sets.PRIOR_KEY``), so a resumed run plans the same sets from it.

The prior only weighs: no answer forbids a pair (``never`` still leaves it a small weight), so
which sets exist, and the rows every label and pair is guaranteed, are known before any LLM time.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from anyclf_ray.core.config import LABEL_SET_SEPARATOR, JobSpec
from anyclf_ray.core.ids import stable_id
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import engine, prompts

FILE = "label_prior.json"
WEIGHTS = {"never": 0.1, "rarely": 0.5, "sometimes": 1.0, "often": 2.0}


def asked_pairs(spec: JobSpec) -> list[tuple[int, int]]:
    """The label pairs the LLM is asked about: every pair a set may hold, but the user's."""
    settings = spec.multi_label
    if not settings.enabled or settings.pair_prior != "llm" or settings.max_labels < 2:
        return []
    ids = [label.id for label in spec.labels]
    given = {frozenset(pair.split(LABEL_SET_SEPARATOR)) for pair in settings.pair_weights}
    return [(a, b) for a, b in itertools.combinations(range(len(ids)), 2) if frozenset((ids[a], ids[b])) not in given]


def requests(spec: JobSpec) -> pa.Table:
    """One request per asked pair, its answer one of ``WEIGHTS``."""
    longest = max(map(len, WEIGHTS))
    return engine.requests_table([
        {"request_id": stable_id("pair_prior", spec.labels[a].id, spec.labels[b].id),
         "prompt": prompts.render(prompts.PAIR_PRIOR, instruction=spec.instruction, labels=scheme(spec).labels_text(),
                                  first=json.dumps(spec.labels[a].desc, ensure_ascii=False),
                                  second=json.dumps(spec.labels[b].desc, ensure_ascii=False),
                                  choices=", ".join(WEIGHTS)),
         "item_key": "frequency", "n_items": 1, "max_chars": longest, "choices": list(WEIGHTS),
         "max_tokens": prompts.answer_budget(prompts.longest_choice("frequency", list(WEIGHTS))), "temperature": 0.0}
        for a, b in asked_pairs(spec)
    ], {})


def ask(spec: JobSpec, engines: Callable[[], Any]) -> dict | None:
    """The prior's record (``FILE``): ``weights`` by pair ("a|b"), each pair's answer, usage;
    None when the spec asks for no prior (``engines``, the run's pool started on demand, is
    then never started)."""
    pairs = asked_pairs(spec)
    if not pairs:
        return None
    answers = engines().answer_table(requests(spec), "pair_prior")
    by_request = dict(zip(answers["request_id"].to_pylist(), answers["items"].to_pylist()))
    found = []
    for a, b in pairs:
        first, second = spec.labels[a].id, spec.labels[b].id
        items = by_request[stable_id("pair_prior", first, second)]
        answer = items[0] if items else None
        found.append({"pair": LABEL_SET_SEPARATOR.join((first, second)), "answer": answer,
                      "weight": WEIGHTS[answer] if answer else 1.0})
    return {"weights": {row["pair"]: row["weight"] for row in found}, "pairs": found,
            "unanswered": sum(row["answer"] is None for row in found), "usage": engine.usage(answers).model_dump()}
