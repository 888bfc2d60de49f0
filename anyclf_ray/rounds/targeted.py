"""Targeted generation requests: a round's weak spots → generation requests, and their bound.

In: the weak spots of the round before (``weak_spots.SPOT_SCHEMA``), the spec and the round.
Out: generation requests in the generation stage's request schema (``plan.GENERATION_FIELDS``;
so the pool, the parts, resume and ``generate.examples_from`` serve them unchanged), each asking
for rows of one spot:

- a weak ``leaf``: more rows of its label, source type, topic and subtopic, asked to be clear
  where texts of that kind are often misread;
- a ``confusion`` (true A, said B): contrastive rows that clearly carry A while sharing the
  topic (the leaf most of the confused rows came from) that made the classifier say B;
- a ``dev_error``: new texts in the manner of the misclassified dev text, with its true label
  (a copy of the text is refused as an echo of the prompt; near copies are removed later as
  ``dev_leak``, ``leak.py``).

Each round asks ``ceil(rows_per_round / examples_per_request)`` requests (every request
``examples_per_request`` rows, the last one the rest), shared evenly by the labels (the spots'
true labels), within a label evenly by the kinds present and within a kind by weight:
confusions and leaf errors by their counts, dev errors alike; a label's leaves take part only
with errors (or, when none has one, its lowest-margin quarter). The even split by label keeps
the label balance the tree gives the first pass: sharing by errors alone gave every row of a
round to the label the errors were on, and the classifier swung to it (``bench/rounds.py``: SMS
macro-F1 0.713 → 0.095 after one round). Ids are stable: a request is (round, kind, rank of its
spot, first sample). Pure: no Ray.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from anyclf_ray.core.config import JobSpec, language_name
from anyclf_ray.core.ids import stable_id
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import engine, prompts
from anyclf_ray.sources import plan

# The kinds in the order shares go to them (the first ones get a request left over).
ORDER = ("dev_error", "confusion", "leaf")
# The source type, topic and subtopic columns of a dev-error row (a real text has no leaf).
DEV_LEAF = ("real text", "like a dev set text", None)


def spot_leaf_id(round_: int, kind: str, rank: int) -> str:
    """The ``leaf_id`` of a spot's rows: their example ids hang on it, apart from every other round's."""
    return stable_id("rounds", round_, kind, rank)


def apportion(weights: list[float], total: int) -> list[int]:
    """``total`` split by ``weights`` (largest remainder; ties to the first)."""
    if not weights or total <= 0:
        return [0] * len(weights)
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    found = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - found[i]), i))[:total - sum(found)]:
        found[i] += 1
    return found


def eligible(spots: pa.Table) -> dict[str, list[dict]]:
    """The spots each kind asks rows for, weakest first, with their weights (``weight``)."""
    rows = sorted(spots.to_pylist(), key=lambda row: (row["kind"], row["rank"]))
    found: dict[str, list[dict]] = {kind: [] for kind in ORDER}
    found["confusion"] = [{**row, "weight": row["errors"]} for row in rows if row["kind"] == "confusion"]
    found["dev_error"] = [{**row, "weight": 1} for row in rows if row["kind"] == "dev_error"]
    leaves = [row for row in rows if row["kind"] == "leaf" and row["topic"] is not None]
    wrong = [{**row, "weight": row["errors"]} for row in leaves if row["errors"]]
    found["leaf"] = wrong or [{**row, "weight": 1} for row in leaves[:math.ceil(len(leaves) / 4)]]
    return found


def allocate(spec: JobSpec, spots: pa.Table) -> list[tuple[dict, int]]:
    """Each spot that gets rows, with its number of requests (module docstring)."""
    total = math.ceil(spec.rounds.rows_per_round / spec.sampling.examples_per_request)
    by_label = {label: kinds for label in scheme(spec).ids
                if (kinds := {kind: chosen for kind, chosen in
                              eligible(spots.filter(pc.equal(spots["label"], label))).items() if chosen})}
    found = []
    for kinds, label_share in zip(by_label.values(), apportion([1.0] * len(by_label), total)):
        for kind, share in zip(kinds, apportion([1.0] * len(kinds), label_share)):
            chosen = kinds[kind]
            for spot, n in zip(chosen, apportion([float(spot["weight"]) for spot in chosen], share)):
                if n:
                    found.append((spot, n))
    return found


def requests(spec: JobSpec, spots: pa.Table, round_: int) -> pa.Table:
    """The round's generation requests from the weak spots of the round before."""
    labels, per_request = scheme(spec), spec.sampling.examples_per_request
    max_chars = spec.sampling.text_chars(spec.languages)
    left = spec.rounds.rows_per_round
    found = []
    for spot, n_requests in allocate(spec, spots):
        language = spot["language"] if spot["language"] in spec.languages else spec.languages[0]
        kind, label = spot["kind"], spot["label"]
        source_type, topic, subtopic = ((spot["source_type"], spot["topic"], spot["subtopic"]) if kind != "dev_error"
                                        else DEV_LEAF)
        fields = {"instruction": spec.instruction_by_language.get(language, spec.instruction),
                  "labels": labels.labels_text(language), "label": labels.label_text(label, language),
                  "other": labels.label_text(spot["predicted"], language) if spot["predicted"] else "",
                  "topic": topic or "any", "subtopic": subtopic or "any", "source_type": source_type or "any",
                  "example": spot["text"] or "",
                  "language_rule": prompts.language_rule(language_name(language),
                                                         language in spec.instruction_by_language)}
        template = {"leaf": prompts.TARGETED_LEAF, "confusion": prompts.TARGETED_CONFUSION,
                    "dev_error": prompts.TARGETED_DEV}[kind]
        this_leaf = spot_leaf_id(round_, kind, spot["rank"])
        echoes = [fields["label"], *(value for value in (source_type, topic, subtopic) if value)]
        for index in range(n_requests):
            n = min(per_request, left)
            if n <= 0:
                break
            left -= n
            first = index * per_request
            found.append(plan._request(
                "generate", stable_id("rounds", round_, this_leaf, first), prompts.render(template, n=n, **fields), n,
                max_chars, spec.sampling.max_tokens, leaf_id=this_leaf, first_sample=first,
                min_words=spec.sampling.min_text_words, echoes=echoes, language=language, label=label,
                label_name=labels.label_text(label, None), source_type_index=None, topic_index=None,
                subtopic_index=None, source_type=source_type, topic=topic, subtopic=subtopic, labels=[label],
                label_names=[labels.label_text(label, None)]))
    return engine.requests_table(found, plan.GENERATION_FIELDS)


def longest(spec: JobSpec, dev_texts: list[str]) -> pa.Table:
    """A request of each kind with every field at its longest (``max_item_chars`` for tree
    items, the longest dev text), for ``llm.budgets`` and the plan."""
    label = spec.labels[0].id
    item = "x" * spec.sampling.max_item_chars
    other = spec.labels[1].id if len(spec.labels) > 1 else label
    rows = [{"round": 1, "kind": kind, "rank": 0, "label": label, "predicted": other, "language": spec.languages[0],
             "source_type": item, "topic": item, "subtopic": item, "rows": 1, "errors": 1, "error_rate": 1.0,
             "mean_margin": -1.0, "text": max(dev_texts, key=len) if dev_texts else None}
            for kind in ("confusion", "leaf", *(("dev_error",) if dev_texts else ()))]
    from anyclf_ray.rounds.weak_spots import SPOT_SCHEMA

    return requests(spec, pa.Table.from_pylist(rows, schema=SPOT_SCHEMA), 1)


def bound(spec: JobSpec, first_rows: int, dev_texts: list[str]) -> dict:
    """The most every round together asks: generation requests and rows, prompt tokens (at the
    longest prompt) and answer budget, and, with the llm label check, its judgements (each round
    checks all rows again). ``first_rows``: the rows of the run's first pass."""
    rounds = spec.rounds.max_rounds
    per_round = math.ceil(spec.rounds.rows_per_round / spec.sampling.examples_per_request)
    from anyclf_ray.sources.estimate import prompt_tokens

    sample = longest(spec, dev_texts)
    requests_ = rounds * per_round
    found = {"max_rounds": rounds, "rows": rounds * spec.rounds.rows_per_round, "generate_requests": requests_,
             "tokens": {"in": math.ceil(max(prompt_tokens([p]) for p in sample["prompt"].to_pylist()) * requests_),
                        "out_budget": requests_ * spec.sampling.max_tokens}}
    if spec.label_check.enabled and "llm" in spec.label_check.methods:
        found["label_check_requests"] = sum(first_rows + k * spec.rounds.rows_per_round for k in range(1, rounds + 1))
    return found
