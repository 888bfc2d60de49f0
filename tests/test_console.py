"""The default console (issue 31): the project's lines only, no Ray warning or error line.

The CLI runs in a fresh Python, as a user runs it, with the fake engine of test_engine.py behind
the engine seam (the console's lines do not depend on the engine; vLLM's own output goes to the
engine's log, not the console).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_raw, write_spec

from anyclf_ray.core import console

HERE = Path(__file__).parent
CLI_ON_FAKE_ENGINE = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
import ray
import test_engine
ray.cloudpickle.register_pickle_by_value(test_engine)
from anyclf_ray import cli, pipeline
started = pipeline.start_engines
pipeline.start_engines = lambda spec, factory=None: started(spec, test_engine.FakeEngine)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_demo_console_shows_the_projects_lines_only(tmp_path):
    # As the demo: training's two workers embed on two actors (the held-out rows are one block).
    raw = tiny_raw(tmp_path / "runs", "console", languages=["en"], label_check={"enabled": True},
                   diversity={"enabled": True}, train={"enabled": True, "num_iterations": 0, "num_workers": 2})
    raw["dedup"]["enabled"] = False  # the fake engine's texts repeat across labels: dedup would remove all
    spec = write_spec(tmp_path / "spec.yaml", raw)
    # Ray's own default authentication, as a user's first run has it.
    env = {name: value for name, value in os.environ.items() if name != "RAY_AUTH_MODE"}
    done = subprocess.run([sys.executable, "-c", CLI_ON_FAKE_ENGINE, "run", "--config", str(spec)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("anyclf-ray: ")] == []
    assert any(line.startswith("anyclf-ray: started an embedded local Ray") for line in lines)
    assert any(line.startswith("anyclf-ray: trained on ") for line in lines)


def test_the_stderr_filter_drops_false_alarms_and_keeps_the_rest(tmp_path):
    child = textwrap.dedent("""
        import os, sys
        from anyclf_ray.core import console
        console.filter_stderr(console.FALSE_ALARMS)
        os.write(2, b"kept before\\n[2026-12-01 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' "
                    b"has constructor arguments in the object store and max_restarts > 0. If ...\\n")
        os.write(2, b"progress 50%\\r")  # no line end: copied at once, not held
        print("a python warning", file=sys.stderr)
        raise SystemExit("the last words")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.decode().split("\n") == ["kept before", "progress 50%\ra python warning", "the last words", ""]


def test_false_alarms_name_what_ray_prints():
    # The exact words of Ray's line (core_worker.cc), as ray-project/ray#57733 quotes them.
    ray_line = (b"Actor with class name: 'MapWorker(MapBatches(PoolClient))' and ID: 'b82d' has constructor "
                b"arguments in the object store and max_restarts > 0. If the arguments in the object store go "
                b"out of scope or are lost, the actor restart will fail.")
    assert any(alarm in ray_line for alarm in console.FALSE_ALARMS)
