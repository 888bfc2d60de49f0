"""The jobs on a real local cluster: `ray start --head`, then `ray job submit jobs/...`.

This module starts no embedded Ray of its own: `ray stop` would end it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import REPO, free_port, tiny_raw, write_spec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def ray_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # As on a real node, the cluster's Python environment comes first on PATH: `ray job submit
    # -- python ...` runs the entrypoint with whatever `python` the cluster's daemons find.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    assert not ray.is_initialized(), "an embedded Ray is alive; `ray stop` would kill it"
    dashboard, gcs = free_port(), free_port()
    started = ray_cli(
        "start", "--head", "--num-cpus=2", "--disable-usage-stats", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
    )
    assert started.returncode == 0, started.stderr
    yield {"dashboard": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}"}
    ray_cli("stop", "--force")


def start_worker_node(cluster: dict, **resources: float) -> psutil.Process:
    """A second node on this machine (ports of its own) holding ``resources``; its raylet."""
    ports = [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port")]
    started = ray_cli("start", f"--address={cluster['gcs']}", "--num-cpus=2", "--disable-usage-stats",
                      f"--resources={json.dumps(resources)}", *ports)
    assert started.returncode == 0, started.stderr
    node_manager = ports[0].split("=")[1]
    (raylet,) = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet"
                 and f"--node_manager_port={node_manager}" in (p.info["cmdline"] or [])]
    return raylet


def parts(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("part-*.parquet")}


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_submitted_job_survives_a_lost_engine_node_and_a_killed_driver(cluster, tiny_model, tmp_path):
    """`ray job submit jobs/pipeline.py` on a two-node cluster, with two faults:

    1. the worker node holding the engine (pinned there by ``engine.resources``) dies once a part
       is committed, raylet and engine killed -9, and a new node joins, as an autoscaler replaces
       a lost spot node: the replica restarts there and parts land again;
    2. then the job's driver is killed -9, and the same command is submitted again: it resumes
       from the committed parts and runs generate, dedup and train to the end.
    Every planned row lands exactly once.
    """
    lost = start_worker_node(cluster, engine_node=1)
    train = {"base_model": "builtin:all-minilm-l6-v2", "num_workers": 2, "num_iterations": 1, "batch_size": 8,
             "max_pairs": 64}
    raw = tiny_raw(tmp_path / "out", "faults", languages=["en"], n_subtopic=1, sample_per_subtopic=100, train=train,
                   engine={"resources": {"engine_node": 1}})
    raw["sampling"]["examples_per_request"] = 5  # 160 requests: the suite's time is counted
    spec_file = write_spec(tmp_path / "spec.yaml", raw)
    command = ("--address", cluster["dashboard"], "--working-dir", ".", "--",
               "python", "jobs/pipeline.py", "--config", str(spec_file), "--set", "sampling.seed=3")
    submitted = ray_cli("job", "submit", "--no-wait", *command)
    assert submitted.returncode == 0, submitted.stderr
    run = tmp_path / "out" / "faults"
    wait_for(lambda: parts(run / "data"), "the first part")

    engines = [p for p in psutil.process_iter(["cmdline"]) if "ray::Replica" in " ".join(p.info["cmdline"] or [])]
    for process in [lost, *engines]:  # the machine is gone: its raylet and the engine on it
        process.kill()
    before_loss = parts(run / "data")
    start_worker_node(cluster, engine_node=1)
    wait_for(lambda: parts(run / "data") - before_loss, "a part from the replacement engine")

    (driver,) = [p for p in psutil.process_iter(["cmdline"])
                 if "jobs/pipeline.py" in " ".join(p.info["cmdline"] or []) and str(spec_file) in p.info["cmdline"]]
    driver.kill()
    driver.wait(timeout=30)
    before_resubmit = parts(run / "data")
    assert not (run / "manifest.json").exists()  # not presented as complete

    done = ray_cli("job", "submit", *command, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "anyclf-ray: generate complete: 800 of 800 rows" in done.stdout
    assert "anyclf-ray: joined the Ray cluster at " in done.stdout  # not "started an embedded"
    assert before_resubmit < parts(run / "data")  # the first job's parts kept as they were
    ids = pq.read_table(run / "data").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 800
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["engine"]["starts"] == 1  # the second job's one start
    assert manifest["settings"]["sampling"]["seed"] == 3  # the --set override reached the job
    dedup = json.loads((run / "dedup" / "manifest.json").read_text())
    trained = json.loads((run / "train" / "manifest.json").read_text())
    assert dedup["rows"]["input"] == 800 and trained["data"]["rows"] == dedup["rows"]["kept"]
    assert trained["settings"]["num_workers"] == 2 and (run / "model" / "model_head.pkl").is_file()


def test_bad_spec_fails_the_submitted_job_early(cluster, tmp_path):
    raw = {**tiny_raw(tmp_path / "out", "bad"), "n_topic": 0}
    spec_file = write_spec(tmp_path / "spec.yaml", raw)
    done = ray_cli(
        "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
        "python", "jobs/generate.py", "--config", str(spec_file),
    )
    assert done.returncode != 0
    assert "anyclf-ray: error: n_topic: Input should be greater than 0" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
