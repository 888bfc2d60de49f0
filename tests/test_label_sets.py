"""Multi-label planning: which label sets exist, exact rows per set, the leaves and requests
they make, and the specs refused before any LLM time. Pure functions: no Ray, no model."""

from __future__ import annotations

import collections
import itertools
import re

import numpy as np
import pyarrow as pa
import pytest
from conftest import OptionJudge, plan_in_fresh_process, tiny_raw, write_spec

from anyclf_ray import cli
from anyclf_ray.core import config, loading
from anyclf_ray.filters import dedup
from anyclf_ray.labels import label_sets, pair_prior
from anyclf_ray.llm import engine
from anyclf_ray.sources import estimate, plan

LABELS = [{"id": f"l{i}", "desc": f"subject {i}"} for i in range(4)]


def multi_raw(tmp_path, n_records: int = 301, labels=LABELS, **multi_label) -> dict:
    raw = {k: v for k, v in tiny_raw(tmp_path, "multi").items() if k not in config.SIZE_FIELDS}
    return {**raw, "labels": labels, "n_record_to_generate": n_records, "train": {"enabled": False},
            "multi_label": {"enabled": True, **multi_label}}


def filled_tree(spec: config.JobSpec) -> pa.Table:
    tree = plan.full_tree(spec)
    for level in plan.TREE_LEVELS:
        texts = [f"{level} {i}" for i in range(tree.num_rows)]
        tree = tree.set_column(tree.schema.get_field_index(level), level, pa.array(texts))
    return tree


def set_rows(spec: config.JobSpec) -> collections.Counter:
    """Planned rows per label set (ids joined by '|'), all languages, from the leaf table."""
    leaves = plan.leaf_table(spec, filled_tree(spec))
    found = collections.Counter()
    for labels, n in zip(leaves["labels"].to_pylist(), leaves["n_samples"].to_pylist()):
        found["|".join(labels)] += n
    return found


def test_rows_per_set_are_exact_with_floors_weights_and_a_none_share(tmp_path):
    spec = loading.parse(multi_raw(tmp_path, min_labels=1, max_labels=2, none_share=0.1, min_rows=3,
                                  pair_weights={"l0|l1": 0, "l2|l3": 4}))
    # By hand, per language (151 en, 150 fr; "l0|l1" weighs 0, so it is no set):
    # - none: round(0.1 x 151) = 15, round(0.1 x 150) = 15;
    # - floors: 3 rows for each of the 4 singles and the 5 allowed pairs (27);
    # - the rest (109; 108) split between sizes by what each lacks of half the labelled rows:
    #   151: 68 - 12 = 56 singles, 68 - 15 = 53 pairs; 150: 67.5 - 12 = 55.5 and 52.5, so
    #   55 and 52 plus the one left over to the first of the tied remainders: 56 and 52;
    # - singles: 56 / 4 = 14 each, + 3 = 17 in both languages;
    # - pairs by weight (1, 1, 1, 1, 4 of 8): 53 gives 6.625 x 4 and 26.5, so 6, 6, 6, 6, 26 and
    #   the 3 left to the largest remainders (the first three); 52 gives 6.5 x 4 and 26, so the 2
    #   left to the first two. Then + 3 each.
    per_language = [
        {"": 15, "l0": 17, "l1": 17, "l2": 17, "l3": 17,
         "l0|l2": 10, "l0|l3": 10, "l1|l2": 10, "l1|l3": 9, "l2|l3": 29},
        {"": 15, "l0": 17, "l1": 17, "l2": 17, "l3": 17, "l0|l2": 10, "l0|l3": 10, "l1|l2": 9, "l1|l3": 9, "l2|l3": 29},
    ]
    assert set_rows(spec) == collections.Counter(per_language[0]) + collections.Counter(per_language[1])
    assert sum(per_language[0].values()) == 151 and sum(per_language[1].values()) == 150


def test_every_label_and_pair_gets_min_rows_even_when_rows_are_few(tmp_path):
    labels = [{"id": f"l{i}", "desc": f"subject {i}"} for i in range(6)]
    spec = loading.parse({**multi_raw(tmp_path, n_records=120, labels=labels, min_labels=2, max_labels=3, min_rows=4),
                         "languages": ["en"]})
    found = set_rows(spec)
    assert sum(found.values()) == 120
    assert all(len(key.split("|")) in (2, 3) for key in found)
    for a in range(6):
        for b in range(a + 1, 6):
            assert sum(n for key, n in found.items() if {f"l{a}", f"l{b}"} <= set(key.split("|"))) >= 4


def test_leaves_and_requests_cover_every_sample_once_with_stable_ids(tmp_path):
    spec = loading.parse(multi_raw(tmp_path, max_labels=2, none_share=0.1))
    requests = plan.generation_requests(spec, filled_tree(spec))
    assert sum(requests["n_items"].to_pylist()) == 301
    ids = {plan.example_id(r["leaf_id"], r["first_sample"] + k)
           for r in requests.to_pylist() for k in range(r["n_items"])}
    assert len(ids) == 301
    planned = plan.generation_requests(spec, filled_tree(spec))
    assert requests["request_id"].to_pylist() == planned["request_id"].to_pylist()
    # A set's leaves are its members' (any label's for none), and its prompt names its labels.
    for request in requests.to_pylist():
        assert request["label"] in request["labels"] or not request["labels"]
        assert [f"subject {label[1:]}" for label in request["labels"]] == request["label_names"]
        wanted = ", ".join(f'"{name}"' for name in request["label_names"])
        assert (f"every one of these labels: [{wanted}]" in request["prompt"]) == bool(request["labels"])
    # Rows per language as planned, and the per-row counts agree with the leaves.
    assert plan.expected_rows(spec, filled_tree(spec)) == {"en": 151, "fr": 150}


def test_leaves_are_the_same_whatever_the_group_size(tmp_path, monkeypatch):
    spec = loading.parse(multi_raw(tmp_path, n_records=5_000, max_labels=3, none_share=0.1))
    tree = filled_tree(spec)
    whole = plan.leaf_table(spec, tree)
    monkeypatch.setattr(label_sets, "REQUESTS_AT_ONCE", 7)
    groups = list(plan.leaf_groups(spec, tree))
    assert len(groups) > 2 * len(spec.languages)
    assert all(column.dtype == np.int32 for group in groups for column in group)
    assert plan.leaf_table(spec, tree).equals(whole)
    assert sum(int(group[3].sum()) for group in groups) == 5_000


def test_a_million_row_plan_counts_every_label_set(tmp_path):
    labels = [{"id": f"l{i}", "desc": f"subject {i}"} for i in range(20)]
    # A hub model this machine lacks: the prompts are estimated, and no tokenizer is loaded.
    raw = {**multi_raw(tmp_path, n_records=1_000_000, labels=labels, min_labels=1, max_labels=3), "languages": ["en"],
           "model": {"name": "Qwen/Qwen2.5-7B-Instruct"}}
    spec = loading.parse(raw)
    found, took = plan_in_fresh_process(write_spec(tmp_path / "million.yaml", raw))
    # Measured on this 2-core machine: 0.17 s past the imports, 28 MiB above them; only the plan's
    # growth is bounded, as in test_estimate (bench/plan.py prints the peaks).
    assert took["seconds"] < 2.0 and took["peak_mib"] - took["imports_mib"] < 64
    assert found["rows"]["total"] == 1_000_000
    assert found["rows"]["label_sets"] == 20 + 190 + 1140
    # By hand: floors of 5 rows for every label (in its single) and pair (in its pair set), 1,050
    # in all; each size lacks a third of 1M less its floors (333,233.3; 332,383.3; 333,333.3),
    # so the 998,950 left split 333,234 (the tied remainder's one to the first size), 332,383
    # and 333,333. Within a size every set weighs 1: the floor share each, and one more to the
    # first sets in order (14 of 20 singles, 73 of 190 pairs, 453 of 1,140 triples).
    singles = [16_661 + (i < 14) + 5 for i in range(20)]
    pairs = {members: 1_749 + (k < 73) + 5 for k, members in enumerate(itertools.combinations(range(20), 2))}
    triples = {members: 292 + (k < 453) for k, members in enumerate(itertools.combinations(range(20), 3))}
    assert found["rows"]["by_set_size"] == {"1": 333_334, "2": 333_333, "3": 333_333}
    assert sum(singles) == 333_334 and sum(pairs.values()) == sum(triples.values()) == 333_333
    assert found["rows"]["by_label"] == {
        f"l{label}": singles[label] + sum(n for members, n in [*pairs.items(), *triples.items()] if label in members)
        for label in range(20)}
    # A set's rows are cut in requests of 2 (their leaves merge, never splitting a request).
    per_request = spec.sampling.examples_per_request
    assert per_request == 2
    sets = [*singles, *pairs.values(), *triples.values()]
    assert found["requests"]["generate"] == sum(-(-n // per_request) for n in sets)


def test_single_label_specs_keep_their_fingerprint(tmp_path):
    """Adding the multi_label section must not move single-label runs' ids (resume would refuse them)."""
    assert loading.parse(tiny_raw("/tmp/x", "fp")).fingerprint() == "deb23f2875f2c4bb"
    spec = loading.parse(multi_raw(tmp_path))
    other = loading.parse(multi_raw(tmp_path, max_labels=3))
    assert spec.fingerprint() != other.fingerprint()


def test_near_duplicates_with_other_label_sets_are_conflicts(tmp_path):
    """Dedup's conflict rule on label sets; exact copies pair at 1.0 whatever the embedder (the
    real embedder's path is the slow multi-label run's)."""
    spec = loading.parse(multi_raw(tmp_path))
    rows = pa.table({"id": ["a", "b", "c", "d", "e"], "language": ["en"] * 5,
                     "text": ["Rain and taxes.", "Rain and taxes.", "Sun and sport.", "Sun and sport.", "Other."],
                     "label_set": ["l0|l1", "l0|l1", "l2", "l2|l3", "l3"]})
    found = dedup.decide(rows, lambda texts: np.eye(len(texts), 8, dtype=np.float32), spec)
    removed = dict(zip(found["removed"]["id"].to_pylist(), found["removed"]["reason"].to_pylist()))
    assert removed == {"b": "exact", "c": "conflict", "d": "conflict"}
    assert found["kept"]["id"].to_pylist() == ["a", "e"]


@pytest.mark.parametrize(
    ("multi_label", "extra", "message"),
    [
        ({"max_labels": 5}, {}, "multi_label.max_labels: 5 labels per text, but the spec has 4 labels"),
        ({"min_labels": 3, "max_labels": 2}, {}, "multi_label.min_labels: 3 is above max_labels 2"),
        ({"pair_weights": {"l0|sport": 2}}, {}, "multi_label.pair_weights: 'l0|sport' names unknown label 'sport'"),
        ({"pair_weights": {"l0": 2}}, {}, "multi_label.pair_weights: 'l0' is not a pair"),
        ({"size_weights": [1]}, {}, "multi_label.size_weights: 1 weight(s) for 2 set size(s)"),
        ({}, {"labels": [{"id": "a|b", "desc": "x"}, {"id": "c", "desc": "y"}]}, "labels: id 'a|b' holds '|'"),
        ({"min_rows": 100}, {}, "n_record_to_generate: 151 rows (in each language) cannot give each of the 4 labels "
                                "and 6 allowed pairs multi_label.min_rows (100) rows, 1000 are needed"),
    ],
)
def test_bad_multi_label_specs_fail_in_one_line_before_any_llm_time(tmp_path, capsys, multi_label, extra, message):
    raw = {**multi_raw(tmp_path, **multi_label), **extra}
    code = cli.main(["plan", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith(f"anyclf-ray: error: {message}") and "\n" not in error


def test_explicit_sizes_are_refused_for_multi_label(tmp_path):
    raw = {**tiny_raw(tmp_path, "multi"), "train": {"enabled": False}, "multi_label": {"enabled": True}}
    with pytest.raises(loading.ConfigError, match="multi_label: give n_record_to_generate"):
        loading.parse(raw)


def test_label_sets_are_enumerated_in_size_then_label_order(tmp_path):
    sets = label_sets.LabelSets(loading.parse(multi_raw(tmp_path, max_labels=2, none_share=0.2)))
    assert [sets.key(i) for i in range(len(sets.sets))] == [
        "l0", "l1", "l2", "l3", "l0|l1", "l0|l2", "l0|l3", "l1|l2", "l1|l3", "l2|l3", ""]


# -- the LLM's co-occurrence prior ---------------------------------------------------------------


PRIOR_ANSWERS = {("subject 0", "subject 1"): "often", ("subject 0", "subject 2"): "never"}


def prior_weights(text: str | None, options: list[str], prompt: str) -> list[float] | None:
    """The prior's judge: 0.7 on the answer ``PRIOR_ANSWERS`` gives the pair it names (else
    sometimes), 0.1 on the others; uniform about content-free labels (N/A...); no answer about
    ``subject 3``, every time."""
    first, second = re.search(r'both "(.*?)" and "(.*?)"\?', prompt).groups()
    assert text is None and options == pair_prior.ANSWERS
    if "subject 3" in (first, second):
        return None
    if first == second:  # content-free: both labels "N/A", "" or "[MASK]"
        return [0.25] * 4
    answer = PRIOR_ANSWERS.get((first, second), "sometimes")
    return [0.7 if option == answer else 0.1 for option in options]


class InProcessPool:
    """The pool seam in this process (the real pool's path is the slow multi-label run's)."""

    def __init__(self, spec: config.JobSpec):
        self.spec, self.passes = spec, []

    def answer_table(self, requests: pa.Table, name: str) -> pa.Table:
        self.passes.append((name, requests.num_rows))
        return engine.answer(OptionJudge(prior_weights), requests, self.spec.sampling)


def test_the_llm_prior_weighs_pairs_it_was_asked_and_never_forbids_one(tmp_path):
    spec = loading.parse(multi_raw(tmp_path, pair_prior="llm", pair_weights={"l1|l2": 3}))
    pool = InProcessPool(spec)
    record = pair_prior.ask(spec, lambda: pool)
    # 6 pairs, less the one the user weighed; fewer than judge.min_batch, so calibrated on the
    # 3 content-free questions asked beside them (a uniform prior here).
    assert pool.passes == [("pair_prior", 5 + 3)]
    assert record["calibration"] == "content_free" and record["prior"] == dict.fromkeys(pair_prior.ANSWERS, 0.25)
    assert record["weights"] == {"l0|l1": 2.0, "l0|l2": 0.1, "l0|l3": 1.0, "l1|l3": 1.0, "l2|l3": 1.0}
    assert [row["answer"] for row in record["pairs"]] == ["often", "never", None, None, None]
    assert record["pairs"][0]["probabilities"] == [0.1, 0.1, 0.1, 0.7]
    assert record["unanswered"] == 3 and record["usage"]["failed"] == 3
    tree = label_sets.with_prior(plan.full_tree(spec), record["weights"])
    assert label_sets.prior(tree) == record["weights"]
    weighed, plain = label_sets.LabelSets(spec, label_sets.prior(tree)), label_sets.LabelSets(spec)
    assert weighed.sets == plain.sets  # the same sets: the prior only weighs them
    weights = dict(zip((weighed.key(i) for i in range(len(weighed.sets))), weighed.weights))
    assert (weights["l0|l1"], weights["l0|l2"], weights["l1|l2"], weights["l2|l3"]) == (2.0, 0.1, 3.0, 1.0)
    rows = dict(zip((weighed.key(i) for i in range(len(weighed.sets))), weighed.rows(spec, 151)))
    assert rows["l0|l1"] > rows["l0|l3"] > rows["l0|l2"] >= spec.multi_label.min_rows
    assert sum(rows.values()) == 151
    planned = set_rows(spec)
    with_prior = collections.Counter()
    leaves = plan.leaf_table(spec, label_sets.with_prior(filled_tree(spec), record["weights"]))
    for labels, n in zip(leaves["labels"].to_pylist(), leaves["n_samples"].to_pylist()):
        with_prior["|".join(labels)] += n
    assert sum(with_prior.values()) == sum(planned.values()) == 301 and with_prior != planned
    assert estimate.estimate(spec)["requests"]["pair_prior"] == 5 + 3
