"""A multi-label run end to end on real parts: the tiny model on vLLM (CPU build) writes the
rows, the real MiniLM deduplicates them on embedded Ray actors and is trained on them (Ray
Train, one-vs-rest head, tuned thresholds), ``datasets`` reads them, ``predict`` gives label sets."""

from __future__ import annotations

import collections
import json
import math

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from conftest import read_parts, tiny_raw
from setfit import SetFitModel

from anyclf_ray import cli, pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.core.results import PlannedRows, Rows
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels import label_sets, pair_prior
from anyclf_ray.labels.metrics import THRESHOLDS
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.sources import plan
from anyclf_ray.training import train

pytestmark = pytest.mark.slow

ROWS = 40
EVAL_SET = {"Storms delayed the election count.": "weather;politics", "A late goal won the derby.": "sport",
            "The senate passed the budget.": "politics", "Heavy rain stopped the match.": "weather;sport",
            "The shop opens at nine.": ""}


LABELS = ["rain", "vote", "goal"]
PAIRS = ["rain|vote", "rain|goal", "vote|goal"]


def planned_rows(weights: dict[str, float]) -> dict[str, int]:
    """Rows per label set of the spec below, worked out from the README's rules: 4 of the 40
    rows (10%) carry no label; 2 go to each label's single and each pair's set; the other 24
    split evenly by size (18 each, less the 6 of floors: 12 and 12); the singles' 12 evenly;
    the pairs' 12 by the prior's weights, the ones left to the largest remainders (first on ties)."""
    quota = {pair: 12 * weights[pair] / sum(weights[pair] for pair in PAIRS) for pair in PAIRS}
    left = 12 - sum(math.floor(share) for share in quota.values())
    extra = sorted(PAIRS, key=lambda pair: (math.floor(quota[pair]) - quota[pair], PAIRS.index(pair)))[:left]
    return {"": 4, **{label: 2 + 4 for label in LABELS},
            **{pair: 2 + math.floor(quota[pair]) + (pair in extra) for pair in PAIRS}}


def planned_ids(tree: list[dict], rows: dict[str, int]) -> set[str]:
    """The ids of those rows, by the README's rule: a set's requests (2 rows each) go to its
    members in turn (every label's for none), the j-th to leaf (set's position + j // members)
    of its member's subtree in tree order, wrapping; requests that meet on a leaf merge."""
    subtree = {label: [row for row in tree if row["label"] == label] for label in LABELS}
    samples = collections.Counter()
    for position, key in enumerate([*LABELS, *PAIRS, ""]):
        members = key.split("|") if key else LABELS
        for j in range(-(-rows[key] // 2)):
            member = members[j % len(members)]
            leaf = subtree[member][(position + j // len(members)) % len(subtree[member])]
            place = (leaf["source_type_index"], leaf["topic_index"], leaf["subtopic_index"])
            samples[(key, member, place)] += min(2, rows[key] - 2 * j)
    return {plan.example_id(plan.leaf_id("en", json.dumps([key.split("|") if key else [], member]), *place), k)
            for (key, member, place), n in samples.items() for k in range(n)}


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, local_ray, tiny_model):
    folder = tmp_path_factory.mktemp("runs")
    raw = {k: v for k, v in tiny_raw(folder, "multi").items() if k not in config.SIZE_FIELDS}
    # A real set with its own label names, in a delimited column.
    pyarrow.csv.write_csv(pa.table({"text": list(EVAL_SET), "tags": list(EVAL_SET.values())}), folder / "real.csv")
    eval_set = {"path": str(folder / "real.csv"), "text_column": "text", "label_column": "tags",
                "label_separator": ";", "label_map": {"weather": "rain", "politics": "vote", "sport": "goal"}}
    spec = loading.parse({
        **raw, "languages": ["en"], "n_record_to_generate": ROWS,
        "train": {"base_model": "builtin:all-minilm-l6-v2", "num_iterations": 1, "batch_size": 8, "test_size": 0.3,
                  "eval_set": eval_set},
        "labels": [{"id": "rain", "desc": "weather"}, {"id": "vote", "desc": "politics"},
                   {"id": "goal", "desc": "sport"}],
        "multi_label": {"enabled": True, "min_labels": 1, "max_labels": 2, "none_share": 0.1, "min_rows": 2,
                        "pair_prior": "llm"},
        # The tiny model's verdicts are noise: flagged, not removed, so the rows downstream stay known.
        "label_check": {"enabled": True, "methods": ["llm"], "action": "flag"},
        "diversity": {"enabled": True},
    })
    return spec, RunLocation(spec.output, "multi"), pipeline.run(spec)


def test_rows_carry_label_sets_with_exact_counts_and_planned_ids(multi_run):
    spec, location, found = multi_run
    generated = found["generate"].report
    rows = read_parts(location)
    assert rows.schema == scheme(spec).row_schema
    assert rows.num_rows == ROWS and generated.rows == PlannedRows(expected=ROWS, written=ROWS, missing=0)
    # The LLM's prior, asked once on the same engine, weighs the sets the rows were planned by.
    prior = location.read_json(pair_prior.FILE)
    assert [row["pair"] for row in prior["pairs"]] == PAIRS
    assert all(row["weight"] == pair_prior.WEIGHTS.get(row["answer"], 1.0) for row in prior["pairs"])
    # 3 pairs, fewer than judge.min_batch: calibrated on 3 content-free questions beside them.
    assert prior["unanswered"] == prior["usage"]["failed"] and prior["usage"]["requests"] == 3 + 3
    assert prior["calibration"] == "content_free" and sum(prior["prior"].values()) == pytest.approx(1, abs=1e-3)
    assert all(row["answer"] in pair_prior.WEIGHTS for row in prior["pairs"])  # read from log-probabilities
    tree = location.read_table("tree.parquet")
    assert generated.pair_prior.weights == prior["weights"] == label_sets.prior(tree)
    assert all(tree[level].null_count == 0 for level in plan.TREE_LEVELS)  # every leaf can take rows
    planned = planned_rows(prior["weights"])
    written = collections.Counter(rows["label_set"].to_pylist())
    assert sum(planned.values()) == ROWS and written == planned
    assert set(rows["id"].to_pylist()) == planned_ids(tree.to_pylist(), planned)
    assert "pair_prior" in generated.engine.passes and generated.engine.starts == 1
    names = {label.id: label.desc for label in spec.labels}
    for row in rows.select(["labels", "label_names", "label_set"]).to_pylist():
        assert row["label_names"] == [names[label] for label in row["labels"]]
        assert row["label_set"] == "|".join(row["labels"])
    counts = generated.counts
    assert {row["label_set"]: row["rows"] for row in counts.by_label_set} == dict(written)
    assert sum(row["rows"] for row in counts.by_set_size) == ROWS
    assert {row["label"]: row["rows"] for row in counts.by_label} == {
        label: sum(n for key, n in written.items() if label in key.split("|")) for label in names}
    together = generated.co_occurrence
    assert together.labels == ["rain", "vote", "goal"]
    assert together.rows == [[sum(n for key, n in written.items() if {a, b} <= set(key.split("|")))
                                 for b in names] for a in names]
    assert location.read_bytes("co_occurrence.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![co-occurrence](co_occurrence.png)" in location.read_bytes("README.md").decode()


def test_the_llm_judge_asks_one_question_per_label_on_the_same_engine(multi_run):
    _, location, found = multi_run
    checked = found["label_check"]
    llm = checked.report.methods["llm"]
    assert checked.rows == Rows(input=ROWS, output=ROWS) and llm.usage.requests == ROWS * 3
    assert llm.calibration == ["batch"] and llm.unanswered == 0  # a real vLLM gives every letter's log-probability
    assert llm.engine.starts == 1 and "label_check/llm" in llm.engine.passes
    rows = read_parts(location, "label_check/data").to_pylist()
    answered = [row for row in rows if row["judged_labels"] is not None]
    assert len(answered) == ROWS - llm.unanswered and len(answered) >= ROWS // 2
    for row in answered:
        assert set(row["judged_labels"]) <= {"rain", "vote", "goal"}
        assert bool(row["label_check_failed"]) == (row["judged_labels"] != row["labels"])
        assert 0.5 <= row["judge_confidence"] <= 1  # the least sure of its three yes/no answers
    assert checked.report.flagged == llm.failed == sum(bool(row["label_check_failed"]) for row in rows)


def test_dedup_runs_on_label_sets_and_datasets_reads_both_configs(multi_run):
    _, location, found = multi_run
    kept = read_parts(location, "dedup/data")
    deduplicated = found["dedup"]
    assert deduplicated.inputs == [found["label_check"].ref]
    assert deduplicated.rows == Rows(input=ROWS, output=kept.num_rows)
    written_sets = set(read_parts(location)["label_set"].to_pylist())
    assert {row["label_set"] for row in deduplicated.report.kept_by_label} <= written_sets
    loaded = datasets.load_dataset(location.path(""), split="train")
    assert loaded.num_rows == ROWS and loaded.features["labels"].feature.dtype == "string"
    assert datasets.load_dataset(location.path(""), "deduplicated", split="train").num_rows == kept.num_rows


def test_the_diversity_report_counts_a_row_under_each_of_its_labels(multi_run):
    _, location, found = multi_run
    kept = read_parts(location, "dedup/data")
    found_report = found["diversity"]
    report = found_report.report
    assert found_report.inputs == [found["dedup"].ref] and found_report.rows.input == kept.num_rows
    assert report.embeddings.reused
    holding = collections.Counter(label for labels in kept["labels"].to_pylist() for label in labels)
    assert {label: figures.rows for label, figures in report.by_label.items()} == {
        label: holding[label] for label in ("rain", "vote", "goal")}
    assert location.read_bytes(report.figures["embeddings"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_tunes_thresholds_and_evaluates_label_sets(multi_run):
    spec, location, found = multi_run
    trained = found["train"].report
    kept = read_parts(location, "dedup/data")
    held_out = [d for d in train.draws(kept["id"].to_pylist()) if d < spec.train.test_size]
    upper = sum(d >= spec.train.test_size / 2 for d in held_out)
    assert trained.data.train_rows == kept.num_rows - len(held_out) and trained.figures["pairs"] > 0
    metrics = location.read_json("eval/metrics.json")
    assert set(metrics) == {"held_out", "eval_set"}
    assert metrics["held_out"]["rows"] == upper and metrics["eval_set"]["rows"] == len(EVAL_SET)
    for figures in metrics.values():
        assert {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"} <= set(figures)
        assert set(figures["per_label"]) == {"rain", "vote", "goal"}
    assert list(metrics["held_out"]["by_language"]) == ["en"] and "by_language" not in metrics["eval_set"]
    assert sum(figures["support"] for figures in metrics["eval_set"]["per_label"].values()) == 6
    thresholds = location.read_json("model/thresholds.json")
    assert list(thresholds) == ["rain", "vote", "goal"] and set(thresholds.values()) <= set(THRESHOLDS.tolist())
    assert {label: figures["threshold"] for label, figures in metrics["held_out"]["per_label"].items()} == thresholds
    assert location.exists("eval/per-label-held_out.png") and location.exists("eval/per-label-eval_set.png")
    model = SetFitModel.from_pretrained(location.path("model"))
    assert model.labels == ["rain", "vote", "goal"] and model.predict_proba(["a text"], as_numpy=True).shape == (1, 3)
    # Each split's figures again, from the saved model's scores cut at its thresholds.
    upper_half = [row for row, draw in zip(kept.to_pylist(), train.draws(kept["id"].to_pylist()))
                  if spec.train.test_size / 2 <= draw < spec.train.test_size]
    assert len(upper_half) >= 4
    names = {"weather": "rain", "politics": "vote", "sport": "goal"}
    for split, texts, sets in (
        ("held_out", [row["text"] for row in upper_half], [row["labels"] for row in upper_half]),
        ("eval_set", list(EVAL_SET), [[names[tag] for tag in tags.split(";") if tag] for tags in EVAL_SET.values()]),
    ):
        truth = np.array([[label in labels for label in LABELS] for labels in sets])
        hits = model.predict_proba(texts, as_numpy=True) >= np.array(list(thresholds.values()))
        figures = metrics[split]
        assert figures["rows"] == len(texts) and figures["hamming_loss"] == pytest.approx((hits != truth).mean())
        assert figures["subset_accuracy"] == pytest.approx((hits == truth).all(axis=1).mean())
        assert figures["micro_f1"] == pytest.approx(2 * (hits & truth).sum() / (hits.sum() + truth.sum()))
    card = location.read_bytes("model/README.md").decode()
    assert "| evaluation | rows | micro f1 | macro f1 | subset accuracy |" in card and "one-vs-rest" in card


def test_predict_gives_label_sets_with_a_score_per_label(multi_run, tmp_path, capsys):
    _, location, _ = multi_run
    source = tmp_path / "input.parquet"
    pq.write_table(pa.table({"text": list(EVAL_SET)}), source)
    output = tmp_path / "predictions"
    code = cli.main(["predict", "--model", location.path("model"), "--input", str(source), "--output", str(output)])
    assert code == 0 and f"wrote {len(EVAL_SET)} prediction(s)" in capsys.readouterr().out
    predicted = pq.read_table(output)
    assert predicted.column_names == ["text", "labels", "scores"]
    thresholds = location.read_json("model/thresholds.json")
    cut = np.array(list(thresholds.values()))
    for labels, scores in zip(predicted["labels"].to_pylist(), predicted["scores"].to_pylist()):
        assert labels == [label for label, hit in zip(thresholds, np.array(scores) >= cut) if hit]
