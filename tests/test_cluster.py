"""The jobs on a real local cluster: `ray start --head`, then `ray job submit jobs/...`.

This module shuts the session's embedded Ray down, starts none of its own, and stops only the
processes of the cluster it started (named by its GCS port), never another Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import REPO, free_ports, read_parts, tiny_raw, write_generated, write_spec
from ray.job_submission import JobStatus, JobSubmissionClient

from anyclf_ray.core import loading, results
from anyclf_ray.core.results import DedupReport, GenerationReport, PassCounts
from anyclf_ray.sources import plan

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
def ray_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # As on a real node, the cluster's Python environment comes first on PATH: `ray job submit
    # -- python ...` runs the entrypoint with whatever `python` the cluster's daemons find.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


# A node's ports besides the GCS's and the dashboard's, each given a free one: Ray's defaults
# would clash with any other cluster on this machine.
NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port")


def port_options(*names: str) -> list[str]:
    """``--NAME=PORT`` for each name, the ports distinct (chosen one at a time, two could repeat:
    a node once failed to start with its object manager and metrics exporter on one port)."""
    return [f"--{name}={port}" for name, port in zip(names, free_ports(len(names)))]


def cluster_processes(gcs_port: int) -> set[psutil.Process]:
    """The daemons of the cluster whose GCS listens on ``gcs_port`` (each names that port in its
    arguments), and every process they started."""
    def ours(arguments: list[str]) -> bool:
        return any(argument == f"--gcs_server_port={gcs_port}" or argument.endswith(f":{gcs_port}")
                   for argument in arguments)

    roots = [p for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])]
    return {*roots, *(child for root in roots for child in root.children(recursive=True))}


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.shutdown()  # the session's embedded Ray: the jobs' drivers join this cluster, none of ours may be up
    dashboard, gcs = free_ports(2)
    # A temp dir of its own (short: it holds Unix sockets), so no other Ray on this machine
    # finds the cluster through /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    started = ray_cli(
        "start", "--head", "--num-cpus=2", "--disable-usage-stats", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
        *port_options(*NODE_PORTS, "ray-client-server-port"),
    )
    assert started.returncode == 0, started.stderr
    yield {"dashboard": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "temp_dir": temp_dir}
    processes = cluster_processes(gcs)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone since it was listed: what we want
            process.terminate()
    for process in psutil.wait_procs(processes, timeout=5)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited between the wait and the kill
            process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def start_worker_node(cluster: dict, **resources: float) -> psutil.Process:
    """A second node on this machine (ports of its own) holding ``resources``; its raylet."""
    ports = port_options(*NODE_PORTS)
    started = ray_cli("start", f"--address={cluster['gcs']}", "--num-cpus=2", "--disable-usage-stats",
                      f"--temp-dir={cluster['temp_dir']}", f"--resources={json.dumps(resources)}", *ports)
    assert started.returncode == 0, started.stderr
    node_manager = ports[0].split("=")[1]
    (raylet,) = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet"
                 and f"--node_manager_port={node_manager}" in (p.info["cmdline"] or [])]
    return raylet


def submit(cluster: dict, spec_file: Path, job: str = "jobs/pipeline.py", wait: bool = False, command: str = ""):
    """``ray job submit`` of ``job`` (a script, or ``-m`` to run the CLI's ``command``) on
    ``spec_file``: its id, or with ``wait`` its finished CLI run."""
    job_id = f"anyclf-test-{uuid.uuid4().hex[:8]}"
    entry = ["-m", "anyclf_ray.cli", command] if job == "-m" else [job]
    done = ray_cli("job", "submit", "--address", cluster["dashboard"], "--submission-id", job_id,
                   *([] if wait else ["--no-wait"]), "--working-dir", ".", "--",
                   "python", *entry, "--config", str(spec_file), "--set", "sampling.seed=3", timeout=900)
    assert wait or done.returncode == 0, done.stderr
    return done if wait else job_id


def parts(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("part-*.parquet")}


def committed(path: Path, report: type) -> results.StageResult:
    """A stage's committed result, read as the package reads it."""
    return results.read(path.read_bytes(), report, str(path))


def committed_requests(folder: Path) -> list[str]:
    """The request ids the committed parts name in their footers."""
    return [rid for path in sorted(folder.glob("part-*.parquet"))
            for rid in json.loads(pq.read_metadata(path).metadata[b"anyclf_ray.part"])["request_ids"]]


def planned_ids(samples: int) -> list[str]:
    """The ids of the specs below: English, 2 labels, a 2 x 2 x 1 tree, ``samples`` per leaf."""
    return sorted(plan.example_id(plan.leaf_id("en", label, s, t, 0), k)
                  for label in ("neg", "pos") for s in range(2) for t in range(2) for k in range(samples))


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_job_that_loses_its_engine_node_finishes_on_its_own(cluster, tiny_model, tmp_path):
    """`ray job submit jobs/generate.py` on a two-node cluster: the worker node holding the engine
    (pinned there by ``engine.resources``) dies once a part is committed, its raylet and every
    process it started killed -9, and a new node joins, as an autoscaler replaces a lost spot
    node. With no resubmission, the replica restarts there and the job completes: one restart,
    the plan's requests asked once each, every planned row written once."""
    lost = start_worker_node(cluster, engine_node=1)
    raw = tiny_raw(tmp_path / "out", "node", languages=["en"], n_subtopic=1, sample_per_subtopic=30,
                   engine={"resources": {"engine_node": 1}}, dedup={"enabled": False}, train={"enabled": False})
    raw["sampling"]["examples_per_request"] = 5  # 48 requests in parts of 10: the kill comes mid-pass
    raw["output"]["commit_rows"] = 50
    job = submit(cluster, write_spec(tmp_path / "spec.yaml", raw), "jobs/generate.py")
    run = tmp_path / "out" / "node"
    wait_for(lambda: parts(run / "data"), "the first part")

    node = [lost, *lost.children(recursive=True)]
    engines = [p for p in node if "ray::Replica" in " ".join(p.cmdline())]
    assert engines, "the engine was not on the node that was lost"
    for process in node:  # the machine is gone: its raylet and everything on it
        with contextlib.suppress(psutil.NoSuchProcess):  # a child that died with its parent
            process.kill()
    start_worker_node(cluster, engine_node=1)
    jobs = JobSubmissionClient(cluster["dashboard"])
    wait_for(lambda: jobs.get_job_status(job).is_terminal(), "the job to end", timeout=600)
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-3000:]

    manifest = committed(run / "manifest.json", GenerationReport)
    assert manifest.status == "complete" and manifest.report.rows.written == 240
    assert manifest.report.engine.starts == 2 and manifest.report.engine.restarts == 1
    assert manifest.report.engine.passes["generate"] == PassCounts(requests=48, failed=0)
    asked = committed_requests(run / "data")
    assert len(asked) == len(set(asked)) == 48
    assert sorted(pq.read_table(run / "data").column("id").to_pylist()) == planned_ids(30)


def test_a_killed_driver_is_resubmitted_and_asks_only_for_the_missing_requests(cluster, tiny_model, tmp_path):
    """`ray job submit jobs/pipeline.py`, its driver killed -9 once parts are committed, then the
    same command submitted again: the second job asks for the requests no part holds, and only
    those, then runs generate and dedup to the end. Every planned row lands once. (Training on
    a cluster's workers is the one step left out: the suite's time is counted, and test_train
    and test_s3 train on Ray Train's workers the same way.)"""
    raw = tiny_raw(tmp_path / "out", "driver", languages=["en"], n_subtopic=1, sample_per_subtopic=40,
                   train={"enabled": False})
    raw["sampling"]["examples_per_request"] = 5  # 64 requests in parts of 10
    raw["output"]["commit_rows"] = 50
    spec_file = write_spec(tmp_path / "spec.yaml", raw)
    job = submit(cluster, spec_file)
    run = tmp_path / "out" / "driver"
    wait_for(lambda: parts(run / "data"), "the first part")

    (driver,) = [p for p in psutil.process_iter(["cmdline"])
                 if "jobs/pipeline.py" in " ".join(p.info["cmdline"] or []) and str(spec_file) in p.info["cmdline"]]
    driver.kill()
    jobs = JobSubmissionClient(cluster["dashboard"])
    wait_for(lambda: jobs.get_job_status(job).is_terminal(), "the job to be reported dead")
    assert jobs.get_job_status(job) == JobStatus.FAILED
    before = parts(run / "data")
    asked_before = committed_requests(run / "data")
    assert 0 < len(asked_before) < 64 and not (run / "manifest.json").exists()  # not presented as complete

    done = submit(cluster, spec_file, wait=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "anyclf-ray: generate complete: 320 of 320 rows" in done.stdout
    assert "anyclf-ray: joined the Ray cluster at " in done.stdout  # not "started an embedded"
    assert before < parts(run / "data")  # the first job's parts kept as they were
    manifest = committed(run / "manifest.json", GenerationReport)
    assert manifest.status == "complete" and manifest.report.engine.starts == 1  # the second job's one start
    assert manifest.report.engine.passes["generate"] == PassCounts(requests=64 - len(asked_before), failed=0)
    asked = committed_requests(run / "data")
    assert len(asked) == len(set(asked)) == 64
    assert sorted(pq.read_table(run / "data").column("id").to_pylist()) == planned_ids(40)
    assert manifest.settings["sampling"]["seed"] == 3  # the --set override reached the job
    dedup = committed(run / "dedup" / "manifest.json", DedupReport)
    assert dedup.status == "complete" and dedup.rows.input == 320 and not (run / "train").exists()


def test_dedup_searches_on_both_nodes_and_keeps_what_one_node_keeps(cluster, tmp_path):
    """`anyclf-ray dedup` submitted to a cluster of two nodes or more, on test_dedup's planted rows
    with 7 k-means partitions: its partition search tasks ran on more than one node (Ray's state
    API), and it kept and removed exactly what the one-node run of test_dedup does."""
    from ray.util.state import list_tasks
    from test_dedup import KEPT_WHEN_DROPPING, REMOVED_WHEN_DROPPING, ROWS

    start_worker_node(cluster)
    # 13 English representatives in partitions of 2; probes cover them all (a complete search).
    raw = tiny_raw(tmp_path / "out", "spread", dedup={"partition_size": 2, "probes": 8})
    raw["sampling"]["seed"] = 3  # as submit() sets it: the input written is the job's
    location = write_generated(loading.parse(raw), ROWS)
    job = submit(cluster, write_spec(tmp_path / "spec.yaml", raw), "-m", command="dedup")
    jobs = JobSubmissionClient(cluster["dashboard"])
    wait_for(lambda: jobs.get_job_status(job).is_terminal(), "the job to end")
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, jobs.get_job_logs(job)[-3000:]

    tasks = list_tasks(address=cluster["dashboard"], limit=1000, filters=[
        ("job_id", "=", jobs.get_job_info(job).job_id), ("func_or_class_name", "=", "search_partitions")])
    assert len(tasks) == 7 and all(task.state == "FINISHED" for task in tasks)
    assert len({task.node_id for task in tasks}) >= 2  # spread: on more than the driver's node
    kept, removed = read_parts(location, "dedup/data"), read_parts(location, "dedup/removed")
    assert set(kept["id"].to_pylist()) == KEPT_WHEN_DROPPING
    assert {r["id"]: (r["reason"], r["kept_id"], r["matched_id"]) for r in removed.to_pylist()} == REMOVED_WHEN_DROPPING


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
