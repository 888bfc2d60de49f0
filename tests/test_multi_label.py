"""A multi-label run end to end on real parts: the tiny model on vLLM (CPU build) writes the
rows, the real MiniLM deduplicates them on embedded Ray actors, ``datasets`` reads them."""

from __future__ import annotations

import collections
import json

import datasets
import pytest

from anyclf_ray import config, generate, pipeline, plan
from anyclf_ray.storage import RunLocation
from conftest import read_parts, tiny_raw

pytestmark = pytest.mark.slow

ROWS = 40


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, local_ray, tiny_model):
    raw = {k: v for k, v in tiny_raw(tmp_path_factory.mktemp("runs"), "multi").items() if k not in config.SIZE_FIELDS}
    spec = config.parse({
        **raw, "languages": ["en"], "n_record_to_generate": ROWS, "train": {"enabled": False},
        "labels": [{"id": "rain", "desc": "weather"}, {"id": "vote", "desc": "politics"},
                   {"id": "goal", "desc": "sport"}],
        "multi_label": {"enabled": True, "min_labels": 1, "max_labels": 2, "none_share": 0.1, "min_rows": 2},
    })
    return spec, RunLocation(spec.output, "multi"), pipeline.run(spec)


def test_rows_carry_label_sets_with_exact_counts_and_planned_ids(multi_run):
    spec, location, found = multi_run
    rows = read_parts(location)
    assert rows.schema == generate.MULTI_LABEL_EXAMPLE_SCHEMA
    assert rows.num_rows == ROWS and found["generate"]["rows"] == {"expected": ROWS, "written": ROWS, "missing": 0}
    leaves = plan.leaf_table(spec, location.read_table("tree.parquet"))
    planned = collections.Counter()
    ids = set()
    for leaf in leaves.to_pylist():
        leaf_id = plan.leaf_id(leaf["language"], json.dumps([leaf["labels"], leaf["label"]]), leaf["source_type_index"],
                               leaf["topic_index"], leaf["subtopic_index"])
        ids |= {plan.example_id(leaf_id, k) for k in range(leaf["n_samples"])}
        planned["|".join(leaf["labels"])] += leaf["n_samples"]
    assert set(rows["id"].to_pylist()) == ids
    written = collections.Counter(rows["label_set"].to_pylist())
    assert written == planned and written[""] == 4  # 10% with none of the labels
    assert set(written) == {"", "rain", "vote", "goal", "rain|vote", "rain|goal", "vote|goal"}
    names = {label.id: label.desc for label in spec.labels}
    for row in rows.select(["labels", "label_names", "label_set"]).to_pylist():
        assert row["label_names"] == [names[label] for label in row["labels"]] and row["label_set"] == "|".join(row["labels"])
    counts = found["generate"]["counts"]
    assert {row["label_set"]: row["rows"] for row in counts["by_label_set"]} == dict(written)
    assert sum(row["rows"] for row in counts["by_set_size"]) == ROWS
    assert {row["label"]: row["rows"] for row in counts["by_label"]} == {
        label: sum(n for key, n in written.items() if label in key.split("|")) for label in names}


def test_dedup_runs_on_label_sets_and_datasets_reads_both_configs(multi_run):
    _, location, found = multi_run
    kept = read_parts(location, "dedup/data")
    assert found["dedup"]["rows"]["kept"] == kept.num_rows and found["dedup"]["rows"]["input"] == ROWS
    assert {row["label_set"] for row in found["dedup"]["kept_by_label"]} <= set(read_parts(location)["label_set"].to_pylist())
    loaded = datasets.load_dataset(location.path(""), split="train")
    assert loaded.num_rows == ROWS and loaded.features["labels"].feature.dtype == "string"
    assert datasets.load_dataset(location.path(""), "deduplicated", split="train").num_rows == kept.num_rows
