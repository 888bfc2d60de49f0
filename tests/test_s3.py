"""Output on S3: a real SeaweedFS server on loopback, through pyarrow's S3 filesystem."""

from __future__ import annotations

import functools
import glob
import io
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import datasets
import pyarrow.parquet as pq
import pytest
from conftest import S3_KEY, read_parts, tiny_raw, write_spec
from test_engine import FakeEngine

from anyclf_ray import cli, pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.core.storage import RunLocation

pytestmark = pytest.mark.slow


def s3_raw(s3_server, run_id: str, bucket: str = "anyclf") -> dict:
    # A spec whose tree comes from the LLM too, but smaller than the local tests' one.
    raw = tiny_raw(f"s3://{bucket}/runs", run_id, languages=["en"], n_subtopic=1)
    raw["output"].update(endpoint_url=s3_server["endpoint"], rows_per_shard=12, commit_rows=12)
    return raw


def keys(s3_server, prefix: str) -> list[str]:
    listing = s3_server["client"].list_objects_v2(Bucket=s3_server["bucket"], Prefix=prefix)
    # pyarrow writes zero-byte "folder/" markers; they are not files.
    return sorted(o["Key"] for o in listing.get("Contents", []) if not o["Key"].endswith("/"))


def wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"waited {timeout} s for {what} in vain")
        time.sleep(0.2)


def test_round_trip_through_s3(s3_server, s3_credentials, local_ray, tiny_model, monkeypatch):
    spec = loading.parse(s3_raw(s3_server, "s3-run"))
    manifest = pipeline.run(spec, only="generate")["generate"]
    expected = 2 * 2 * 2 * 1 * 3
    assert manifest.status == "complete" and manifest.report.rows.written == expected
    assert manifest.output == "s3://anyclf/runs/s3-run"

    stored = keys(s3_server, "runs/s3-run/")
    assert {"runs/s3-run/manifest.json", "runs/s3-run/README.md", "runs/s3-run/tree.parquet",
            "runs/s3-run/spec.json"} <= set(stored)
    shards = [k for k in stored if k.startswith("runs/s3-run/data/")]
    assert len(shards) == len(manifest.shards.data) >= 2
    assert not [k for k in stored if "/_tmp/" in k]

    location = RunLocation(spec.output, "s3-run")
    rows = read_parts(location)
    assert rows.num_rows == expected and len(set(rows["id"].to_pylist())) == expected

    # datasets' offline switch refuses every remote URL; this read only goes to the loopback server.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    loaded = datasets.load_dataset(
        "parquet", data_files=location.uri("data/*.parquet"), storage_options=location.storage_options(), split="train"
    )
    assert sorted(loaded["id"]) == sorted(rows["id"].to_pylist())


def test_a_multi_label_run_round_trips_through_s3(s3_server, s3_credentials, local_ray, tiny_model, monkeypatch):
    raw = {key: value for key, value in s3_raw(s3_server, "s3-label-sets").items() if key not in config.SIZE_FIELDS}
    spec = loading.parse({**raw, "n_record_to_generate": 12,
                         "multi_label": {"enabled": True, "max_labels": 2, "min_rows": 1, "pair_prior": "llm"}})
    manifest = pipeline.run(spec, only="generate")["generate"]
    assert manifest.report.rows.written + manifest.report.failures.rows_lost == 12
    stored = set(keys(s3_server, "runs/s3-label-sets/"))
    assert {"runs/s3-label-sets/label_prior.json", "runs/s3-label-sets/co_occurrence.png"} <= stored
    location = RunLocation(spec.output, "s3-label-sets")
    rows = read_parts(location)
    assert rows.num_rows == manifest.report.rows.written >= 6  # enough rows to read back
    assert set(rows["label_set"].to_pylist()) == {"neg", "pos", "neg|pos"}
    assert location.read_json("label_prior.json")["weights"] == manifest.report.pair_prior.weights
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    loaded = datasets.load_dataset(
        "parquet", data_files=location.uri("data/*.parquet"), storage_options=location.storage_options(), split="train")
    written = zip(rows["id"].to_pylist(), rows["labels"].to_pylist())
    assert sorted(zip(loaded["id"], loaded["labels"])) == sorted(written)


def test_an_s3_outage_mid_generation_is_ridden_out(s3_server, s3_credentials, local_ray):
    """The S3 server killed while the run is writing (a part committed, its status "running")
    and back 5 s later: the calls that met the outage are retried with backoff and counted,
    every row lands once, parts land after it too, and every part listed is whole."""
    raw = s3_raw(s3_server, "outage")
    raw.update(sample_per_subtopic=30, dedup={"enabled": False}, train={"enabled": False})
    raw["output"]["status_seconds"] = 0.5  # the driver writes its status through the outage too
    spec = loading.parse(raw)
    server, client = s3_server["server"], s3_server["client"]
    with ThreadPoolExecutor(1) as background:
        running = background.submit(pipeline.run, spec, only="generate",
                                    engine_factory=functools.partial(FakeEngine, delay=0.5))
        wait_for(lambda: keys(s3_server, "runs/outage/data/") and keys(s3_server, "runs/outage/status.json"),
                 "the first part and status", 300)
        status = json.loads(client.get_object(Bucket="anyclf", Key="runs/outage/status.json")["Body"].read())
        before = keys(s3_server, "runs/outage/data/")
        assert not running.done() and status["state"] == "running"
        assert status["rows"]["done"] < status["rows"]["planned"]
        server.stop(kill=True)
        time.sleep(5)
        server.start(attempts=1)  # a restart keeps its ports: the run holds the endpoint
        manifest = running.result(timeout=600)["generate"]
    expected = 2 * 2 * 2 * 1 * 30
    assert manifest.status == "complete" and manifest.report.rows.written == expected
    assert manifest.report.s3_retries >= 1  # the outage met S3 calls, and backoff rode them out
    location = RunLocation(spec.output, "outage")
    parts = keys(s3_server, "runs/outage/data/")
    assert len(parts) == len(manifest.shards.data) and len(parts) >= 10  # parts of 12 rows
    assert set(before) < set(parts)  # the run went on writing after the outage
    rows = read_parts(location)  # every listed part reads whole, footer and all
    assert rows.num_rows == expected and len(set(rows["id"].to_pylist())) == expected


def test_missing_bucket_is_refused_before_any_work(s3_server, s3_credentials, tmp_path, capsys):
    raw = s3_raw(s3_server, "nobucket", bucket="no-such-bucket")
    code = cli.main(["generate", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    assert code == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == (
        "anyclf-ray: error: output.path: bucket 'no-such-bucket' does not exist; create it or fix the path"
    )


def test_refused_credentials_are_reported(s3_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    raw = s3_raw(s3_server, "badcreds")
    code = cli.main(["generate", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    assert code == cli.EXIT_BAD_INPUT
    assert "output.path: S3 refused the credentials for bucket 'anyclf'" in capsys.readouterr().err
    assert keys(s3_server, "runs/badcreds/") == []


def test_dedup_training_and_prediction_on_s3(s3_server, s3_credentials, local_ray, tiny_model, monkeypatch, tmp_path):
    # The eval set is read from S3 too; like predict's paths, its endpoint comes from AWS_ENDPOINT_URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    s3_server["client"].put_object(Bucket="anyclf", Key="eval/real.csv", Body=b"text,label\nok then,neg\nfine,pos\n")
    train = {"base_model": "builtin:all-minilm-l6-v2", "num_workers": 1, "num_iterations": 1, "batch_size": 8,
             "eval_set": {"path": "s3://anyclf/eval/real.csv"}}
    spec = loading.parse({**s3_raw(s3_server, "s3-run"), "train": train})
    stages = pipeline.run(spec)  # generation is reused when the round-trip test made it
    assert stages["train"].report.metrics["eval_set"]["rows"] == 2
    assert stages["dedup"].rows.input == stages["generate"].report.rows.written
    assert stages["train"].rows.input == stages["dedup"].rows.output
    assert stages["train"].output == "s3://anyclf/runs/s3-run/model"
    stored = set(keys(s3_server, "runs/s3-run/"))
    assert {"runs/s3-run/dedup/manifest.json", "runs/s3-run/model/model_head.pkl", "runs/s3-run/model/README.md",
            "runs/s3-run/eval/metrics.json", "runs/s3-run/train/manifest.json"} <= stored
    assert not [k for k in stored if "/_tmp/" in k]

    # Prediction fetches the model from S3 (into a temporary folder it removes once loaded).
    fetched = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "anyclf-model-*")))  # noqa: E731
    before = fetched()
    source = tmp_path / "input.jsonl"
    source.write_text("".join(f'{{"text": "message {i}"}}\n' for i in range(9)))
    code = cli.main(["predict", "--model", "s3://anyclf/runs/s3-run/model", "--input", str(source),
                     "--output", str(tmp_path / "out")])
    assert code == 0
    assert pq.read_table(tmp_path / "out").num_rows == 9
    assert fetched() == before

    # The same, with the input and the predictions on S3 too.
    s3_server["client"].upload_file(str(source), "anyclf", "inputs/input.jsonl")
    code = cli.main(["predict", "--model", "s3://anyclf/runs/s3-run/model", "--input", "s3://anyclf/inputs/input.jsonl",
                     "--output", "s3://anyclf/predictions/run1"])
    assert code == 0
    parts = [k for k in keys(s3_server, "predictions/run1/") if k.endswith(".parquet")]
    rows = sum(pq.read_table(io.BytesIO(s3_server["client"].get_object(Bucket="anyclf", Key=k)["Body"].read())).num_rows
               for k in parts)
    assert rows == 9 and "predictions/run1/_manifest.json" in keys(s3_server, "predictions/run1/")
