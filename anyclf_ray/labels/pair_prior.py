"""The LLM's co-occurrence prior of a multi-label run: how often real texts carry two labels.

In: a ``JobSpec`` with ``multi_label.pair_prior: llm`` and the run's engine pool. Out: a weight
per allowed label pair the user did not weigh (``pair_weights``), from the LLM's calibrated
judgement (``judgement.py``, ``multi_label.judge``) of one question per pair (never, rarely,
sometimes or often, lettered), and the record kept in ``label_prior.json``: each pair's answer,
its calibrated probabilities and weight, the pairs unanswered after retries (weight 1, as
without a prior), the calibration and the prior it divided out, and the tokens spent. Asked
once, in the tree step, and stored in the tree's footer (``label_sets.PRIOR_KEY``), so a resumed
run plans the same sets from it. A run asks few pairs, so batch calibration usually falls back to
content-free (both label descriptions "N/A" and the like).

The prior only weighs: no answer forbids a pair (``never`` still leaves it a small weight), so
which sets exist, and the rows every label and pair is guaranteed, are known before any LLM time.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from anyclf_ray.core.config import LABEL_SET_SEPARATOR, JobSpec
from anyclf_ray.core.ids import stable_id
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import engine, judgement, prompts
from anyclf_ray.llm.judgement import Question

FILE = "label_prior.json"
WEIGHTS = {"never": 0.1, "rarely": 0.5, "sometimes": 1.0, "often": 2.0}
ANSWERS = list(WEIGHTS)


def asked_pairs(spec: JobSpec) -> list[tuple[int, int]]:
    """The label pairs the LLM is asked about: every pair a set may hold, but the user's."""
    settings = spec.multi_label
    if not settings.enabled or settings.pair_prior != "llm" or settings.max_labels < 2:
        return []
    ids = [label.id for label in spec.labels]
    given = {frozenset(pair.split(LABEL_SET_SEPARATOR)) for pair in settings.pair_weights}
    return [(a, b) for a, b in itertools.combinations(range(len(ids)), 2) if frozenset((ids[a], ids[b])) not in given]


def question(spec: JobSpec, first: str, second: str) -> str:
    """How often a real text expresses both label descriptions (JSON-quoted in the prompt)."""
    return prompts.render(prompts.PAIR_PRIOR, instruction=spec.instruction, labels=scheme(spec).labels_text(),
                          first=json.dumps(first, ensure_ascii=False), second=json.dumps(second, ensure_ascii=False),
                          options=judgement.lettered(ANSWERS))


def questions(spec: JobSpec) -> list[Question]:
    """One question per asked pair, its options ``ANSWERS``."""
    return [Question(stable_id("pair_prior", spec.labels[a].id, spec.labels[b].id),
                     question(spec, spec.labels[a].desc, spec.labels[b].desc), len(ANSWERS))
            for a, b in asked_pairs(spec)]


def blank(spec: JobSpec, kind: int, text: str) -> str:
    """The question about two content-free labels (content-free calibration)."""
    return question(spec, text, text)


def requests(spec: JobSpec) -> pa.Table:
    """Every request the prior asks (its questions, and the content-free ones when calibrated
    so): what the plan counts and the context check measures."""
    asked, _ = judgement.plan(questions(spec), 1, functools.partial(blank, spec), spec.multi_label.judge)
    return engine.requests_table([judgement.request(one) for one in asked], {})


def ask(spec: JobSpec, engines: Callable[[], Any]) -> dict | None:
    """The prior's record (``FILE``): ``weights`` by pair ("a|b"), each pair's answer and
    calibrated probabilities, the calibration and the prior it removed, usage; None when the spec
    asks for no prior (``engines``, the run's pool started on demand, is then never started)."""
    pairs = asked_pairs(spec)
    if not pairs:
        return None
    found = judgement.judge(lambda requests: engines().answer_table(requests, "pair_prior"), questions(spec), 1,
                            functools.partial(blank, spec), spec.multi_label.judge)
    rows = []
    for (a, b), choice, probabilities in zip(pairs, found.choice, found.probabilities):
        answer = ANSWERS[choice] if choice >= 0 else None
        rows.append({"pair": LABEL_SET_SEPARATOR.join((spec.labels[a].id, spec.labels[b].id)), "answer": answer,
                     "probabilities": None if answer is None else [round(float(p), 4) for p in probabilities],
                     "weight": WEIGHTS[answer] if answer else 1.0})
    return {"weights": {row["pair"]: row["weight"] for row in rows}, "pairs": rows,
            "unanswered": sum(row["answer"] is None for row in rows), "calibration": found.calibration[0],
            "prior": dict(zip(ANSWERS, (round(float(p), 4) for p in found.priors[0]))),
            "usage": found.usage.model_dump()}
