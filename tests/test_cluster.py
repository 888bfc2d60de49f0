"""The jobs on a real local cluster: `ray start --head`, then `ray job submit jobs/...`.

This module starts no embedded Ray of its own: `ray stop` would end it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    dashboard = free_port()
    started = ray_cli(
        "start", "--head", "--num-cpus=2", "--disable-usage-stats", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
    )
    assert started.returncode == 0, started.stderr
    yield f"http://127.0.0.1:{dashboard}"
    ray_cli("stop", "--force")


def test_ray_job_submit_runs_the_whole_pipeline(cluster, tiny_model, tmp_path):
    train = {"base_model": "builtin:all-minilm-l6-v2", "num_workers": 2, "num_iterations": 1, "batch_size": 8}
    raw = tiny_raw(tmp_path / "out", "submitted", languages=["en"], n_subtopic=1, train=train)
    spec_file = write_spec(tmp_path / "spec.yaml", raw)
    done = ray_cli(
        "job", "submit", "--address", cluster, "--working-dir", ".", "--",
        "python", "jobs/pipeline.py", "--config", str(spec_file), "--set", "sampling.seed=3",
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "anyclf-ray: generate complete: 24 of 24 rows" in done.stdout
    assert "anyclf-ray: joined the Ray cluster at " in done.stdout  # not "started an embedded"
    run = tmp_path / "out" / "submitted"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["settings"]["sampling"]["seed"] == 3  # the --set override reached the job
    assert manifest["engine"]["starts"] == 1
    dedup = json.loads((run / "dedup" / "manifest.json").read_text())
    trained = json.loads((run / "train" / "manifest.json").read_text())
    assert dedup["rows"]["input"] == 24 and trained["data"]["rows"] == dedup["rows"]["kept"]
    assert trained["settings"]["num_workers"] == 2 and (run / "model" / "model_head.pkl").is_file()


def test_bad_spec_fails_the_submitted_job_early(cluster, tmp_path):
    raw = {**tiny_raw(tmp_path / "out", "bad"), "n_topic": 0}
    spec_file = write_spec(tmp_path / "spec.yaml", raw)
    done = ray_cli(
        "job", "submit", "--address", cluster, "--working-dir", ".", "--",
        "python", "jobs/generate.py", "--config", str(spec_file),
    )
    assert done.returncode != 0
    assert "anyclf-ray: error: n_topic: Input should be greater than 0" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
