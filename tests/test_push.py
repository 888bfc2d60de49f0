"""`anyclf-ray push`: the files a finished run publishes, and the HTTP calls that publish them.

The run is finished by the pipeline's own code where that is cheap: the generation's shards and
result (``write_generated``), then the real language check through ``pipeline.run`` (it runs on
the driver, so Ray is not started). Training is the exception: its result, ``eval/`` and the
model's files are written by the training stage's own writers (``train.save``, the model card)
around a stand-in model, since push uploads a model's bytes and never loads them.

The Hub cannot be reached from the tests: ``HubStandIn``, a recording HTTP server on loopback,
stands in for it. It answers the endpoints ``huggingface_hub`` calls (create repo, tree, YAML
validation, preupload, commit), keeps the committed files and records every request. It answers
every preupload "regular", so each file's bytes travel base64 in the commit itself and the
stand-in holds exactly what was sent (the real Hub takes Parquet, PNG and weights through LFS /
Xet, which is huggingface_hub's own transfer); its tree listing shows those binaries as the Hub
does, as LFS files with their sha256, so a second push compares them as it would on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pytest
from conftest import tiny_raw, write_generated

from anyclf_ray import cli, pipeline, publish
from anyclf_ray.core import cards, loading, runtime, storage
from anyclf_ray.core.results import SCHEMA_VERSION, StageResult, TrainReport
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.sources.generate import Generate
from anyclf_ray.training import train

TOKEN = "hf_test_token_for_the_stand_in"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_TOKEN": "hf_engine_secret_value"}
ROWS = [
    ("r0", "neg", "en", "The hotel room was dirty and the staff were rude to us."),
    ("r1", "pos", "en", "What a lovely meal, every dish was fresh and full of flavour."),
    ("r2", "neg", "en", "My new phone stopped working after two days of normal use."),
    ("r3", "pos", "en", "The concert was wonderful and the band played for three hours."),
    ("r4", "neg", "en", "The service was slow and the food arrived cold at our table."),
    ("r5", "pos", "en", "This book kept me reading late into the night, a real joy."),
]
LFS = (".parquet", ".png", ".safetensors", ".pkl")


class StandInModel:
    """What ``train.save`` asks of a SetFit model: files written by ``save_pretrained``."""

    def save_pretrained(self, folder: str) -> None:
        for name, data in {"config_setfit.json": b'{"labels": ["neg", "pos"]}', "model_head.pkl": b"head",
                           "model.safetensors": b"weights", "1_Pooling/config.json": b"{}"}.items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_bytes(data)


def finish_training(spec, location) -> None:
    """The train stage's committed output, written by its own writers around ``StandInModel``:
    model/ with its model card, eval/ (metrics and a figure), then train/manifest.json."""
    stage, source = train.Train(spec), pipeline.stages(spec)[1]
    evaluation = {"held_out": {"rows": 1, "accuracy": 1.0, "macro_f1": 1.0}}
    card = cards.model_card(spec, location.run_id, source.name, {"train_rows": 4, "pairs": 8},
                            evaluation, "logistic regression", 'model.predict(["some text"])')
    files = train.save(location, StandInModel(), card, None)
    location.write_json(publish.METRICS, evaluation)
    location.write_bytes("eval/confusion-held_out.png", b"\x89PNG figure")
    upstream = source.read(location)
    stage.commit(location, StageResult[TrainReport].model_validate({
        "run_id": location.run_id, "stage": "train", "finished_at": "2026-01-01T00:00:00+00:00",
        "fingerprint": "f" * 16, "inputs": [upstream.ref.model_dump()], "settings": spec.train.model_dump(),
        "output": location.uri(train.MODEL_FOLDER), "rows": {"input": 5, "output": 4},
        "report": {"data": {"source": source.name, "train_rows": 4, "held_out_rows": 1, "eval_set_rows": 0},
                   "files": files, "figures": {}, "metrics": evaluation}}))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished run: generation, the language check, training; its card written last."""
    root = tmp_path_factory.mktemp("push")
    # A model that is not on this machine: no LLM runs here, and its prompts are measured by length.
    spec = loading.parse(tiny_raw(root / "runs", "pushed", languages=["en"], engine={"env": ENGINE_ENV},
                                  model={"name": "example-org/an-llm-not-here"},
                                  language_check={"enabled": True}, dedup={"enabled": False}))
    location = write_generated(spec, ROWS)
    generated = Generate(spec)  # its settings as the generation commits them: the whole spec
    generated.commit(location, generated.read(location).model_copy(update={"settings": spec.model_dump()}))
    location.write_table(publish.TREE, pa.table({"label": ["neg", "pos"], "source_type": ["review"] * 2,
                                                 "topic": ["t"] * 2, "subtopic": ["s"] * 2}))
    location.write_json("spec.json", {"schema_version": SCHEMA_VERSION, "fingerprint": spec.fingerprint(),
                                      "spec": spec.model_dump()})
    with pytest.MonkeyPatch.context() as monkeypatch:  # the language check runs on the driver: no Ray
        monkeypatch.setattr(runtime, "connect", lambda *args, **kwargs: None)
        pipeline.run(spec, only="language_check")
    finish_training(spec, location)
    # The card as the pipeline writes it after training, naming each stage's folder relative to
    # the run as issue 31's part 1 has cards do (a card naming the local folder is refused:
    # test_a_run_that_cannot_be_published_is_refused_before_any_http_call).
    done = [(stage, result.model_copy(update={"output": stage.folder or "."}))
            for stage in pipeline.stages(spec) if (result := stage.read(location))]
    location.write_bytes(publish.CARD, cards.dataset_card(spec, location.run_id, done,
                                                          scheme(spec).columns_text).encode())
    return Path(location.root)


def copy(run_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_folder, tmp_path / "runs" / run_folder.name))


DATASET_FILES = {
    "README.md", "data/part-0.parquet", "data/part-1.parquet", "language_check/data/part-00000.parquet",
    "language_check/data/part-00001.parquet",
    "tree.parquet", "language_check/languages.png", "eval/confusion-held_out.png", "eval/metrics.json",
    "manifest.json", "language_check/manifest.json", "train/manifest.json",
}
MODEL_FILES = {"README.md", "config_setfit.json", "model_head.pkl", "model.safetensors", "1_Pooling/config.json"}


def test_the_publication_is_the_card_its_shards_figures_and_manifests(run_folder):
    location = storage.locate(str(run_folder))
    found = publish.publication(location, with_model=True)
    assert {upload.path for upload in found.dataset} == DATASET_FILES
    assert {upload.path: upload.source for upload in found.model} == {
        path: f"model/{path}" for path in MODEL_FILES}
    assert found.card == {
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]},
            {"config_name": "language_checked",
             "data_files": [{"split": "train", "path": "language_check/data/*.parquet"}]},
        ],
        "language": ["en"], "task_categories": ["text-classification"], "tags": ["synthetic", "anyclf-ray"],
    }
    assert found.data_files == ["data/*.parquet", "language_check/data/*.parquet"]
    model_card = (run_folder / "model" / "README.md").read_text()
    assert publish.FRONT_MATTER.match(model_card).group(1).splitlines()[:3] == [
        "library_name: setfit", "base_model: sentence-transformers/all-MiniLM-L6-v2",
        "pipeline_tag: text-classification"]
    # Manifests go with their output relative to the run and the engines' environment values left out.
    manifests = {upload.path: json.loads(upload.data) for upload in found.dataset if upload.data is not None}
    assert {path: manifest["output"] for path, manifest in manifests.items()} == {
        "manifest.json": ".", "language_check/manifest.json": "language_check", "train/manifest.json": "model"}
    assert manifests["manifest.json"]["settings"]["engine"]["env"] == dict.fromkeys(ENGINE_ENV, publish.NOT_PUBLISHED)
    assert json.loads((run_folder / "manifest.json").read_text())["settings"]["engine"]["env"] == ENGINE_ENV
    publish.guard(location, found)  # nothing in it names the run's folder or a secret
    assert {u.path for u in publish.publication(location, with_model=False).dataset} == {u.path for u in found.dataset}
    assert publish.publication(location, with_model=False).model == []


class HubStandIn(http.server.ThreadingHTTPServer):
    """A recording HTTP server standing in for the Hugging Face Hub: the endpoints
    huggingface_hub calls to create a repo, list its tree, validate a card and commit; the repos'
    files (``repos``: (kind, repo id) → path → bytes) and every request (``calls``)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.private: dict[tuple[str, str], bool] = {}
        self.calls: list[dict] = []


class StandInHandler(http.server.BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.handle_call("GET")

    def do_POST(self) -> None:
        self.handle_call("POST")

    def handle_call(self, method: str) -> None:
        path = urlparse(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        call = {"method": method, "path": path, "token": self.headers.get("Authorization")}
        self.server.calls.append(call)
        parts = path.split("/")
        if call["token"] != f"Bearer {TOKEN}":
            return self.answer(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            request = json.loads(body)
            key = (request.get("type") or "model", f"{request['organization']}/{request['name']}")
            call["visibility"] = request.get("visibility")
            url = f"{self.server.url}/{key[0]}s/{key[1]}"
            if key in self.server.repos:  # as the Hub answers: the conflict, with the repo's address
                return self.answer(409, {"error": "You already created this repo", "url": url})
            self.server.repos[key] = {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"}
            self.server.private[key] = request.get("visibility") == "private"
            return self.answer(200, {"url": url})
        if path == "/api/validate-yaml":
            return self.answer(200, {"errors": [], "warnings": []})
        if len(parts) >= 7 and parts[1] == "api":
            key, action = (parts[2].removesuffix("s"), f"{parts[3]}/{parts[4]}"), parts[5]
            files = self.server.repos.get(key)
            if files is None:
                return self.answer(404, {"error": "Repository not found"})
            if action == "tree" and method == "GET":
                return self.answer(200, [tree_entry(name, data) for name, data in sorted(files.items())])
            if action == "preupload":
                asked = json.loads(body)["files"]
                call["paths"] = sorted(f["path"] for f in asked)
                return self.answer(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": blob_id(files[f["path"]]) if f["path"] in files else None} for f in asked]})
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines()]
                added = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                deleted = [line["value"]["path"] for line in lines if line["key"] == "deletedFile"]
                assert {line["key"] for line in lines} <= {"header", "file", "deletedFile"}
                call.update(added=sorted(added), deleted=sorted(deleted))
                files.update(added)
                for name in deleted:
                    del files[name]
                return self.answer(200, {"success": True, "commitOid": "c" * 40,
                                         "commitUrl": f"{self.server.url}/{key[1]}/commit/{'c' * 40}"})
        self.answer(404, {"error": f"the stand-in does not answer {method} {path}"})


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(name: str, data: bytes) -> dict:
    """A file as the Hub's tree API lists it: binaries as LFS files, with their sha256."""
    entry = {"type": "file", "path": name, "size": len(data), "oid": blob_id(data)}
    if name.endswith(LFS):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
    return entry


@pytest.fixture
def hub(monkeypatch):
    """The stand-in, serving, with HF_ENDPOINT and HF_TOKEN pointing huggingface_hub at it."""
    from huggingface_hub import constants

    server = HubStandIn()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' default; the stand-in is on loopback
    yield server
    server.shutdown()
    server.server_close()


def commits(server: HubStandIn) -> list[dict]:
    return [call for call in server.calls if call["path"].endswith("/commit/main")]


def test_push_creates_the_repos_and_commits_the_publication_then_nothing(run_folder, tmp_path, hub, capsys):
    import datasets

    args = ["push", str(run_folder), "--repo", "me/pushed-data", "--model-repo", "me/pushed-model", "--private"]
    assert cli.main(args) == 0
    creates = [call for call in hub.calls if call["path"] == "/api/repos/create"]
    assert [call["visibility"] for call in creates] == ["private", "private"]
    assert hub.private == {("dataset", "me/pushed-data"): True, ("model", "me/pushed-model"): True}
    assert {call["token"] for call in hub.calls} == {f"Bearer {TOKEN}"}
    assert [(call["path"], set(call["added"]), call["deleted"]) for call in commits(hub)] == [
        ("/api/datasets/me/pushed-data/commit/main", DATASET_FILES, []),
        ("/api/models/me/pushed-model/commit/main", MODEL_FILES, [])]
    dataset = hub.repos[("dataset", "me/pushed-data")]
    assert dataset["data/part-0.parquet"] == (run_folder / "data/part-0.parquet").read_bytes()
    assert dataset["README.md"] == (run_folder / "README.md").read_bytes()
    assert hub.repos[("model", "me/pushed-model")]["model.safetensors"] == b"weights"
    assert capsys.readouterr().out.splitlines() == [
        f"anyclf-ray: dataset repo me/pushed-data: {len(DATASET_FILES)} file(s) uploaded",
        f"anyclf-ray: model repo me/pushed-model: {len(MODEL_FILES)} file(s) uploaded"]

    # The repo as published reads as the run does, config by config.
    mirror = tmp_path / "mirror"
    for name, data in dataset.items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(data)
    for config in ("default", "language_checked"):
        published = datasets.load_dataset(str(mirror), config, split="train")
        local = datasets.load_dataset(str(run_folder), config, split="train")
        assert sorted(published["id"]) == sorted(local["id"]) and len(local) > 0

    # A second push finds every file there: it creates nothing and commits nothing.
    before = len(hub.calls)
    assert cli.main(args) == 0
    again = hub.calls[before:]
    assert [call["path"] for call in again] == [
        "/api/repos/create", "/api/datasets/me/pushed-data/tree/main",
        "/api/repos/create", "/api/models/me/pushed-model/tree/main"]
    assert capsys.readouterr().out.splitlines() == ["anyclf-ray: dataset repo me/pushed-data: up to date",
                                                    "anyclf-ray: model repo me/pushed-model: up to date"]


def test_a_push_after_a_change_commits_the_changed_files_and_drops_stale_shards(run_folder, tmp_path, hub):
    run = copy(run_folder, tmp_path)
    location = storage.locate(str(run))
    assert publish.push(location, "me/data") == {("dataset", "me/data"): len(DATASET_FILES)}
    assert hub.calls[0]["visibility"] is None  # without --private: as the owner's default has it
    files = hub.repos[("dataset", "me/data")]
    files["data/part-9.parquet"] = b"a shard of an earlier run"  # matched by the card's data/*.parquet
    files["notes.md"] = b"the owner's own file"  # matched by none: not push's to delete
    (run / "eval" / "metrics.json").write_text('{"held_out": {"rows": 2}}')
    assert publish.push(location, "me/data") == {("dataset", "me/data"): 1}
    assert (commits(hub)[-1]["added"], commits(hub)[-1]["deleted"]) == (["eval/metrics.json"],
                                                                        ["data/part-9.parquet"])
    assert "notes.md" in files and ".gitattributes" in files


def refused(args: list[str], capsys) -> str:
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("anyclf-ray: error: "), err
    return err.removeprefix("anyclf-ray: error: ")


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(("change", "repo", "message"), [
    (lambda run: shutil.rmtree(run), "me/data", "RUN: no anyclf-ray run at"),
    (lambda run: (run / "language_check" / "manifest.json").unlink(), "me/data",
     "RUN: its language_check stage has not finished (no language_check/manifest.json)"),
    (lambda run: edit_json(run / "language_check" / "manifest.json", status="incomplete"), "me/data",
     "RUN: its language_check stage finished incomplete"),
    (lambda run: edit_json(run / "manifest.json", finished_at="2026-02-02T00:00:00+00:00"), "me/data",
     "RUN: its language_check stage read a generate stage that has been redone since"),
    (lambda run: (run / "README.md").unlink(), "me/data", "README.md is not a dataset card with a YAML header"),
    (lambda run: None, "not-an-owner-slash-name", "--repo: 'not-an-owner-slash-name' is not a Hub repo id"),
    (lambda run: None, "me/../x", "--repo: 'me/../x' is not a Hub repo id"),
    (lambda run: (run / "README.md").write_text((run / "README.md").read_text() + f"\nSee {run}/data.\n"), "me/data",
     "RUN: README.md holds the run's local address"),
    (lambda run: (run / "model" / "README.md").write_text(f"token {TOKEN}"), "me/data",
     "RUN: model/README.md holds the value of HF_TOKEN"),
])
def test_a_run_that_cannot_be_published_is_refused_before_any_http_call(run_folder, tmp_path, hub, capsys, change,
                                                                        repo, message):
    run = copy(run_folder, tmp_path)
    change(run)
    assert message in refused(["push", str(run), "--repo", repo, "--model-repo", "me/model"], capsys)
    assert hub.calls == []


def test_the_runs_folder_is_recognised_through_a_link(run_folder, tmp_path, hub, capsys):
    """A run addressed through a symbolic link: a file naming its real folder is refused too."""
    run = copy(run_folder, tmp_path)
    (tmp_path / "link").symlink_to(run.parent)
    (run / "README.md").write_text((run / "README.md").read_text() + f"\nSee {run}/data.\n")
    message = refused(["push", str(tmp_path / "link" / run.name), "--repo", "me/data"], capsys)
    assert message.startswith(f"RUN: README.md holds the run's local address {run}") and hub.calls == []


def test_pushing_a_model_needs_a_trained_one_and_pushing_needs_a_token_and_the_hub(run_folder, tmp_path, hub, capsys,
                                                                                   monkeypatch):
    from huggingface_hub import constants

    run = copy(run_folder, tmp_path)
    pinned = json.loads((run / "spec.json").read_text())
    pinned["spec"]["train"]["enabled"] = False
    (run / "spec.json").write_text(json.dumps(pinned))
    (run / "train" / "manifest.json").unlink()
    assert refused(["push", str(run), "--repo", "me/data", "--model-repo", "me/model"], capsys).startswith(
        "--model-repo: the run at")
    monkeypatch.delenv("HF_TOKEN")
    assert refused(["push", str(run), "--repo", "me/data"], capsys).startswith("HF_TOKEN: not set")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert refused(["push", str(run), "--repo", "me/data"], capsys).startswith("HF_HUB_OFFLINE: set")
    assert hub.calls == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli.main(["push", str(run), "--repo", "me/data"]) == 0  # the dataset alone
    assert [call["path"] for call in commits(hub)] == ["/api/datasets/me/data/commit/main"]


def test_the_hubs_refusal_is_one_line(run_folder, hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_a_token_the_hub_does_not_know")
    assert cli.main(["push", str(run_folder), "--repo", "me/data"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("anyclf-ray: error: the Hub refused: ") and "\n" not in err
    assert "Invalid credentials" in err and commits(hub) == [] and hub.repos == {}


def test_a_hub_that_does_not_answer_is_one_line(run_folder, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli.main(["push", str(run_folder), "--repo", "me/data"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("anyclf-ray: error: the Hub at http://127.0.0.1:9 did not answer (ConnectError")
