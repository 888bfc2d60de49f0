"""Publishing a finished run on the Hugging Face Hub (``anyclf-ray push``).

In: a run folder (local or S3) whose every stage is complete, a dataset repo id and optionally a
model repo id. Out: the dataset repo holding the dataset card (``README.md``), the Parquet shards
its ``configs:`` name at the same paths (so ``load_dataset(repo, config)`` reads what
``load_dataset(<run folder>, config)`` reads), ``tree.parquet``, the figures, ``eval/metrics.json``
and each stage's manifest; the model repo holding ``model/`` as training wrote it, its model card
included (with error-driven rounds, the best round's ``rounds/<k>/model/``). Never published:
``failures/`` (the requests' last outputs), ``removed/``, embeddings, ``spec.json``, ``status.json``,
Ray Train's checkpoints.

``publication`` decides the files from the run alone, with no network: every refusal (a stage not
complete, no card, no model) comes before any HTTP call, and so does ``guard``'s (a file that
would publish the run's local address or a secret). A manifest is published with its ``output``
relative to the run and the engines' environment values left out (they may be tokens). ``push``
compares each file's hash with the repo's own (the Git blob id, or the LFS sha256) and commits
only what changed, in one commit per repo, with the shards the card's patterns no longer match
deleted (and, in the model repo, files the model no longer has): a second push commits nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable

import yaml

from anyclf_ray import pipeline
from anyclf_ray.core.config import ConfigError, JobSpec
from anyclf_ray.core.results import SCHEMA_VERSION, StageResult, WeakSpotsReport
from anyclf_ray.core.stage import Stage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.training.train import MODEL_FOLDER

log = logging.getLogger(__name__)

CARD = "README.md"
TREE = "tree.parquet"
METRICS = "eval/metrics.json"
# What the Hub keeps in every repo; never ours to delete.
HUB_FILES = (".gitattributes",)
# Files read as text: each is scanned for the run's address and for secrets before it goes.
TEXT = (".md", ".json", ".txt")
# Environment variables whose values are secrets: no published file may hold one.
SECRETS = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
NOT_PUBLISHED = "<not published>"
# The Hub's repo ids: an owner and a name.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)


@dataclasses.dataclass(frozen=True)
class Upload:
    """One file to publish: its path in the repo, its path in the run, and its bytes when they
    are published in another form than stored (a manifest); None: the file as stored."""

    path: str
    source: str
    data: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Publication:
    """What a push uploads: the dataset repo's files, the model repo's (empty without
    ``--model-repo``), the card's ``configs:`` data-file patterns, and the card's metadata."""

    dataset: list[Upload]
    model: list[Upload]
    data_files: list[str]
    card: dict


def check_repo(repo: str, argument: str) -> str:
    """``repo`` if it is an ``OWNER/NAME`` Hub id; ConfigError naming ``argument`` otherwise."""
    if not REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise ConfigError(f"{argument}: {repo!r} is not a Hub repo id; give OWNER/NAME, as in my-org/sentiment-data")
    return repo


def finished(location: RunLocation) -> list[tuple[Stage, StageResult]]:
    """The run's stages with their committed results, in run order: every stage its spec enables
    and any other stage committed since, then the error-driven rounds' stages that ran (rounds
    may stop early). ConfigError in one line for a run that is not there, a stage not finished
    or finished incomplete, or one that read an input redone since."""
    if not location.exists("spec.json"):
        raise ConfigError(f"RUN: no anyclf-ray run at {location.uri()} (it has no spec.json); give a run folder, "
                          "as in runs/<run_id> or s3://bucket/prefix/<run_id>")
    pinned = location.read_json("spec.json")
    if pinned.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"RUN: {location.uri()} was written by another anyclf-ray (schema "
                          f"{pinned.get('schema_version')!r}); push it with that version")
    spec = JobSpec.model_validate(pinned["spec"])
    found = []
    for cls in [*pipeline.STAGES, *pipeline.round_stages(spec)]:
        stage = cls(spec)
        result = stage.read(location)
        if result is None and cls in pipeline.STAGES and cls.enabled(spec):
            raise ConfigError(f"RUN: its {stage.name} stage has not finished (no {stage.manifest_path}); run "
                              f"`anyclf-ray {stage.command}` (or `anyclf-ray run`) before pushing")
        if result is not None and not result.complete:
            raise ConfigError(f"RUN: its {stage.name} stage finished incomplete ({stage.describe(result)}); "
                              "run `anyclf-ray run --retry-failures` before pushing")
        if result is not None:
            found.append((stage, result))
    committed = {result.stage: result.ref for _, result in found}
    for stage, result in found:
        for ref in result.inputs:
            if committed.get(ref.stage) != ref:
                raise ConfigError(f"RUN: its {stage.name} stage read a {ref.stage} stage that has been redone since; "
                                  f"run `anyclf-ray {stage.command}` (or `anyclf-ray run`) before pushing")
    return found


def card_metadata(location: RunLocation) -> dict:
    """The dataset card's YAML front matter; ConfigError if the run has no card."""
    text = location.read_bytes(CARD).decode() if location.exists(CARD) else ""
    header = FRONT_MATTER.match(text)
    if not header:
        raise ConfigError(f"RUN: {location.uri(CARD)} is not a dataset card with a YAML header; "
                          "run `anyclf-ray run` to write it")
    return yaml.safe_load(header.group(1))


def data_file_patterns(card: dict) -> list[str]:
    """Every ``data_files`` path of the card's ``configs:``, in order."""
    patterns: list[str] = []
    for config in card.get("configs", []):
        for split in config["data_files"]:
            paths = split["path"]
            patterns += [paths] if isinstance(paths, str) else paths
    return patterns


def matching(location: RunLocation, pattern: str) -> list[str]:
    """The run's files a ``folder/*.parquet``-style pattern matches (a pattern's folder is plain)."""
    folder, _, name = pattern.rpartition("/")
    if any(c in folder for c in "*?["):
        raise ConfigError(f"RUN: the card's data_files pattern {pattern!r} has a wildcard folder; push reads "
                          "patterns such as dedup/data/*.parquet")
    return [path for path in listed(location, folder) if fnmatch.fnmatchcase(path.rpartition("/")[2], name)]


def listed(location: RunLocation, folder: str, suffix: str = "") -> list[str]:
    """The files directly in ``folder`` ("" for the run folder itself) ending in ``suffix``."""
    return [path.lstrip("/") for path in location.list(folder, suffix)]


def published_manifest(location: RunLocation, raw: bytes) -> bytes:
    """A manifest as published: ``output`` relative to the run folder (``.`` for the folder
    itself), the engines' environment values replaced by ``NOT_PUBLISHED``."""
    found = json.loads(raw)
    root = location.uri()
    if found["output"] == root or found["output"].startswith(root + "/"):
        found["output"] = found["output"][len(root):].lstrip("/") or "."
    env = found["settings"].get("engine", {}).get("env")
    if env:
        found["settings"]["engine"]["env"] = dict.fromkeys(env, NOT_PUBLISHED)
    return json.dumps(found, indent=2, ensure_ascii=False).encode()


def publication(location: RunLocation, with_model: bool) -> Publication:
    """The files a push uploads, read from the run alone (no network): see the module's
    docstring for which. ConfigError in one line for a run that cannot be published:
    ``finished``'s refusals, a card whose patterns match no file, no model with ``with_model``."""
    stages = finished(location)
    card = card_metadata(location)
    patterns = data_file_patterns(card)
    dataset = [Upload(CARD, CARD)]
    for pattern in patterns:
        shards = matching(location, pattern)
        if not shards:
            raise ConfigError(f"RUN: the card's data_files pattern {pattern!r} matches no file in {location.uri()}")
        dataset += [Upload(shard, shard) for shard in shards]
    if location.exists(TREE):
        dataset.append(Upload(TREE, TREE))
    folders = dict.fromkeys([*(stage.folder for stage, _ in stages), "eval"])
    dataset += [Upload(png, png) for folder in folders for png in listed(location, folder, ".png")]
    if location.exists(METRICS):
        dataset.append(Upload(METRICS, METRICS))
    dataset += [Upload(stage.manifest_path, stage.manifest_path,
                       published_manifest(location, location.read_bytes(stage.manifest_path)))
                for stage, _ in stages]
    model: list[Upload] = []
    if with_model:
        # With rounds, the best round's model (the last measure names it), else the first training's.
        measures = [result.report for _, result in stages if isinstance(result.report, WeakSpotsReport)]
        folder = measures[-1].best_model if measures else MODEL_FOLDER
        trained = next((result for stage, result in stages
                        if stage.name == f"{folder.removesuffix(MODEL_FOLDER)}train"), None)
        files = trained.report.files if trained else []
        if f"{folder}/{CARD}" not in files:
            raise ConfigError(f"--model-repo: the run at {location.uri()} has no trained model with its card; "
                              "run `anyclf-ray train` first, or push the dataset alone")
        model = [Upload(path.removeprefix(f"{folder}/"), path) for path in files]
    return Publication(dataset=dataset, model=model, data_files=patterns, card=card)


def content(location: RunLocation, upload: Upload) -> bytes:
    return upload.data if upload.data is not None else location.read_bytes(upload.source)


def guard(location: RunLocation, found: Publication) -> None:
    """ConfigError naming the first text file (``TEXT``) that would publish the run folder's
    address (as given or with links resolved) or the value of a ``SECRETS`` variable."""
    addresses = {location.root, *([] if location.bucket else [os.path.realpath(location.root)])}
    secrets = {os.environ[name]: name for name in SECRETS if len(os.environ.get(name, "")) >= 8}
    for upload in [*found.dataset, *found.model]:
        if not upload.path.endswith(TEXT):
            continue
        text = content(location, upload).decode(errors="replace")
        for address in addresses:
            if address in text:
                raise ConfigError(f"RUN: {upload.source} holds the run's local address {address}, which push would "
                                  "publish; it publishes only files that name places relative to the run")
        for value, name in secrets.items():
            if value in text:
                raise ConfigError(f"RUN: {upload.source} holds the value of {name}; push never publishes a secret")


def digests(location: RunLocation, upload: Upload) -> tuple[str, str]:
    """A file's Git blob id (how the Hub names a regular file) and its sha256 (an LFS file's)."""
    path = location.path(upload.source)
    size = len(upload.data) if upload.data is not None else location.fs.get_file_info(path).size
    blob, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    # Streamed: a shard or the model's weights may be large.
    with io.BytesIO(upload.data) if upload.data is not None else location.fs.open_input_stream(path) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            blob.update(chunk)
            sha256.update(chunk)
    return blob.hexdigest(), sha256.hexdigest()


def push(location: RunLocation, repo: str, model_repo: str | None = None,
         private: bool = False) -> dict[tuple[str, str], int]:
    """Publish the run at ``location`` to the dataset repo ``repo`` (and its model to
    ``model_repo``), creating them if need be (``private``, else as the owner's default has new
    repos), with the token in ``HF_TOKEN``
    at ``HF_ENDPOINT`` (else the Hub); the files uploaded per (repo type, repo id), 0 where the
    repo held them all and no commit was made. ConfigError in one line, before any HTTP call,
    for a bad repo id, no token, offline mode, or a run that cannot be published; the Hub's own
    refusals as ``huggingface_hub`` raises them."""
    from huggingface_hub import constants

    check_repo(repo, "--repo")
    if model_repo is not None:
        check_repo(model_repo, "--model-repo")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ConfigError("HF_TOKEN: not set; set it to a Hugging Face token that may write to the repos")
    if constants.is_offline_mode():
        raise ConfigError("HF_HUB_OFFLINE: set, so the Hub cannot be reached; unset it to push")
    found = publication(location, with_model=model_repo is not None)
    guard(location, found)
    targets = [("dataset", repo, found.dataset,
                lambda path: any(fnmatch.fnmatchcase(path, pattern) for pattern in found.data_files))]
    if model_repo is not None:
        targets.append(("model", model_repo, found.model, lambda path: path not in HUB_FILES))
    return {(kind, repo_id): commit(location, kind, repo_id, uploads, owned, private, token)
            for kind, repo_id, uploads, owned in targets}


def held(remote, blob_id: str, sha256: str) -> bool:
    """Whether the repo's file (a ``RepoFile``, or None) has these bytes: by sha256 for an LFS
    file, by Git blob id for a regular one."""
    return remote is not None and (remote.lfs.sha256 == sha256 if remote.lfs else remote.blob_id == blob_id)


def commit(location: RunLocation, kind: str, repo_id: str, uploads: list[Upload], owned: Callable[[str], bool],
           private: bool, token: str) -> int:
    """Create the ``kind`` repo ``repo_id`` if need be, then commit the ``uploads`` whose bytes it
    does not hold and delete its ``owned`` files that are not among them; the files uploaded."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, repo_type=kind, private=private or None, exist_ok=True)  # None: the owner's default
    remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, repo_type=kind, recursive=True)
              if isinstance(entry, RepoFile)}
    changed = [upload for upload in uploads if not held(remote.get(upload.path), *digests(location, upload))]
    paths = {upload.path for upload in uploads}
    stale = sorted(path for path in remote if owned(path) and path not in paths)
    if not changed and not stale:
        log.info("%s: the %s repo already holds all %d file(s); nothing to commit", repo_id, kind, len(uploads))
        return 0
    local = not location.bucket  # a local file is streamed from its path; an S3 object read
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=upload.path, path_or_fileobj=location.path(upload.source)
                           if local and upload.data is None else content(location, upload))
        for upload in changed]
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    api.create_commit(repo_id, operations, repo_type=kind,
                      commit_message=f"anyclf-ray push of run {location.run_id}: {len(changed)} file(s) "
                                     f"uploaded, {len(stale)} deleted")
    log.info("%s: %d of %d file(s) uploaded to the %s repo, %d deleted", repo_id, len(changed), len(uploads), kind,
             len(stale))
    return len(changed)
