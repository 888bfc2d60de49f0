"""The job spec: one typed, validated description of a run.

In: a YAML file plus ``--set key=value`` overrides. Out: a ``JobSpec`` whose every field has been
checked, or a ``ConfigError`` whose one-line message names the field and the fix. Nothing here
touches Ray, a model or the network, so bad input fails before any cluster time is spent.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import pycountry
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anyclf_ray import models


class ConfigError(ValueError):
    """A job spec that cannot run; ``str(error)`` is the one line to show the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value.strip()


def _embedder(value: str) -> str:
    models.check_embedder(value)
    return value


class Label(_Strict):
    """A class the classifier predicts: ``id`` is what rows carry, ``desc`` what the LLM reads."""

    id: str
    desc: str

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # Ids written as YAML integers (0, 1) are kept as their text so the column has one type.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    _blank = field_validator("id", "desc")(_non_blank)


class ModelSpec(_Strict):
    """Which LLM writes the data and how vLLM loads it."""

    name: str = "builtin:smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(2048, gt=0)
    # Skips torch.compile/CUDA graphs: faster start, slower decode. Right for tests and tiny runs.
    enforce_eager: bool = False

    @field_validator("name")
    @classmethod
    def _loadable(cls, value: str) -> str:
        models.check_reference(value)
        return value


class ActorPlacement(_Strict):
    """Where a stage's model actors run: ``replicas`` actors on ``device`` (``auto``: GPU if any)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    replicas: int = Field(1, gt=0)
    cpus_per_replica: float = Field(1.0, gt=0)

    @property
    def gpus_per_replica(self) -> int:
        return 1


class EngineSpec(ActorPlacement):
    """How the vLLM replicas run and sample. CPU and GPU differ only in these values."""

    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(1, gt=0)
    # Off by default: vLLM's CPU build cannot rewind a per-request seeded sampler after a
    # partial prefill ("CPU Generator does not use offset"). On GPUs it may be turned on.
    chunked_prefill: bool = False
    batch_size: int = Field(256, gt=0)
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    seed: int = 0
    max_retries: int = Field(2, ge=0)
    examples_per_request: int = Field(5, gt=0)
    max_text_chars: int = Field(1200, gt=0)
    max_item_chars: int = Field(80, gt=0)
    env: dict[str, str] = {}

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size


class DedupSpec(ActorPlacement):
    """Exact and embedding near-duplicate removal (``dedup.py``); on by default in full jobs."""

    enabled: bool = True
    # A sentence-transformers model: builtin:all-minilm-l6-v2 (offline), a folder or a hub id.
    model: str = "builtin:all-minilm-l6-v2"
    # Cosine similarity at or above which two texts are near-duplicates. With MiniLM, a changed
    # word or reordered clause scores 0.95-0.99, while opposite statements can reach 0.89.
    threshold: float = Field(0.92, gt=0, le=1)
    # Near-duplicates with different labels: drop every row involved, or keep them (counted).
    conflicts: Literal["drop", "keep"] = "drop"
    partition_size: int = Field(2000, gt=1)
    probes: int = Field(3, gt=0)
    batch_size: int = Field(128, gt=0)
    seed: int = 0

    _loadable = field_validator("model")(_embedder)

    def fingerprint(self) -> str:
        """A digest of the settings that decide which rows are kept (not where actors run)."""
        return _digest(self.model_dump(exclude=set(ActorPlacement.model_fields) | {"batch_size", "enabled"}))


class EvalSetSpec(_Strict):
    """A real labelled set to evaluate on: Parquet, CSV, JSONL or a ``datasets`` folder."""

    path: str
    text_column: str = "text"
    label_column: str = "label"
    # Its label values → the job's label ids; values not listed must already be label ids.
    label_map: dict[str, str] = {}

    @field_validator("label_map", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        # YAML reads 0/1 and true/false as numbers and booleans; labels are compared as text.
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value


class TrainSpec(_Strict):
    """SetFit training on Ray Train (``train.py``) and evaluation (``evaluate.py``)."""

    enabled: bool = True
    # A sentence-transformers body: the seed's mpnet by default; builtin:all-minilm-l6-v2 offline.
    base_model: str = "sentence-transformers/paraphrase-mpnet-base-v2"
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Contrastive pairs = min(max_pairs, num_iterations × training rows), sampled as they are used.
    num_iterations: int = Field(20, ge=0)
    max_pairs: int = Field(100_000, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    max_seq_length: int = Field(128, gt=0)
    # Share of the synthetic rows held out for evaluation, chosen by id (stable across re-runs).
    test_size: float = Field(0.2, ge=0, lt=1)
    head_max_iter: int = Field(1000, gt=0)
    seed: int = 0
    eval_set: EvalSetSpec | None = None

    _loadable = field_validator("base_model")(_embedder)

    def fingerprint(self) -> str:
        return _digest(self.model_dump(exclude={"enabled", "use_gpu", "cpus_per_worker"}))


class OutputSpec(_Strict):
    """Where a run's artifacts go: ``<path>/<run_id>/``, a local folder or ``s3://bucket/prefix``."""

    path: str = "runs"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    rows_per_shard: int = Field(50_000, gt=0)

    @field_validator("path")
    @classmethod
    def _supported_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("", "s3", "file"):
            raise ValueError(f"unsupported scheme {scheme}://; use a local path or s3://bucket/prefix")
        if scheme == "s3" and not value[len("s3://") :].strip("/"):
            raise ValueError("s3:// needs a bucket, as in s3://bucket/prefix")
        return value

    @property
    def is_s3(self) -> bool:
        return self.path.startswith("s3://")


SIZE_FIELDS = ("n_source_type", "n_topic", "n_subtopic", "sample_per_subtopic")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobSpec(_Strict):
    """A whole run. Sizes are either ``n_record_to_generate`` or all four explicit sizes."""

    instruction: str
    labels: list[Label]
    n_record_to_generate: int | None = Field(None, gt=0)
    n_source_type: int | None = Field(None, gt=0)
    n_topic: int | None = Field(None, gt=0)
    n_subtopic: int | None = Field(None, gt=0)
    sample_per_subtopic: int | None = Field(None, gt=0)
    languages: list[str] = ["en"]
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    output: OutputSpec = OutputSpec()
    dedup: DedupSpec = DedupSpec()
    train: TrainSpec = TrainSpec()
    run_id: str | None = None
    # A tree Parquet (possibly edited by hand) to generate from instead of expanding a new one.
    tree_path: str | None = None

    _blank = field_validator("instruction")(_non_blank)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[Label]) -> list[Label]:
        if not labels:
            raise ValueError("needs at least one label, each with id and desc")
        for attr in ("id", "desc"):
            values = [getattr(label, attr) for label in labels]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"duplicate label {attr} {repeated[0]!r}; every label {attr} must be unique")
        return labels

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, codes: list[str]) -> list[str]:
        if not codes:
            raise ValueError("needs at least one language code, such as ['en']")
        for code in codes:
            language_name(code)
        if len(set(codes)) != len(codes):
            raise ValueError("lists a language twice; list each code once")
        return codes

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str | None) -> str | None:
        if value is not None and not RUN_ID.match(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder)")
        return value

    @model_validator(mode="after")
    def _one_way_to_size(self) -> JobSpec:
        explicit = [f for f in SIZE_FIELDS if getattr(self, f) is not None]
        if self.n_record_to_generate is not None and explicit:
            raise ValueError(
                f"n_record_to_generate and {explicit[0]} are both set; "
                "give n_record_to_generate alone or all of " + ", ".join(SIZE_FIELDS)
            )
        if self.n_record_to_generate is None and len(explicit) != len(SIZE_FIELDS):
            missing = [f for f in SIZE_FIELDS if f not in explicit]
            raise ValueError(
                f"{missing[0]} is missing; give n_record_to_generate or all of " + ", ".join(SIZE_FIELDS)
            )
        return self

    # -- derived values -------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        """The four tree sizes, derived from ``n_record_to_generate`` when that is what was given."""
        if self.n_record_to_generate is None:
            return {f: getattr(self, f) for f in SIZE_FIELDS}
        return sizes_for_records(self.n_record_to_generate, len(self.labels) * len(self.languages))

    def fingerprint(self) -> str:
        """A digest of everything that decides the generated rows (not where they are written).

        Later stages (dedup, train) are left out: they have their own fingerprints, so tuning
        them reuses the generated data of the same run id.
        """
        placement = set(ActorPlacement.model_fields) | {
            "tensor_parallel_size", "gpu_memory_utilization", "cpu_kv_cache_gib", "chunked_prefill", "batch_size", "env"
        }
        return _digest(
            self.model_dump(
                exclude={"output": True, "run_id": True, "dedup": True, "train": True,
                         "model": {"enforce_eager"}, "engine": placement}
            )
        )

    def resolved_run_id(self) -> str:
        return self.run_id or f"run-{self.fingerprint()}"


def _digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def sizes_for_records(n_records: int, groups: int) -> dict[str, int]:
    """Tree sizes whose leaves can hold ``n_records`` spread over ``groups`` (label, language) pairs.

    Balanced so that no level dominates: a few samples per leaf, the rest split between source
    types, topics and subtopics. The plan then gives each leaf an exact share, so the run yields
    exactly ``n_records`` rows (see ``plan.samples_per_leaf``).
    """
    per_group = math.ceil(n_records / groups)
    samples = max(1, round(per_group ** 0.25))
    leaves = math.ceil(per_group / samples)
    n_source_type = max(1, round(leaves ** (1 / 3)))
    n_topic = max(1, round(math.sqrt(leaves / n_source_type)))
    n_subtopic = math.ceil(leaves / (n_source_type * n_topic))
    return {
        "n_source_type": n_source_type,
        "n_topic": n_topic,
        "n_subtopic": n_subtopic,
        "sample_per_subtopic": samples,
    }


def language_name(code: str) -> str:
    """English name of an ISO 639-1 or 639-3 code; ValueError naming the code otherwise."""
    found = None
    if isinstance(code, str) and code.isalpha():
        key = {2: "alpha_2", 3: "alpha_3"}.get(len(code))
        found = key and pycountry.languages.get(**{key: code.lower()})
    if not found:
        raise ValueError(f"unknown language code {code!r}; use ISO 639-1 codes such as 'en', 'fr', 'zh'")
    return found.name


# -- loading ------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are read as YAML (numbers, lists, booleans)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. engine.replicas=2")
        _set_dotted(raw, key.strip(), yaml.safe_load(text))
    return raw


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    spec: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = spec.model_fields[part].annotation
        # list[Label] and EvalSetSpec | None: the model class among the type's arguments.
        spec = next(a for a in getattr(annotation, "__args__", ()) + (annotation,) if hasattr(a, "model_fields"))
    return list(spec.model_fields)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc, message = first["loc"], first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "remove it"
        return f"{_location(loc)}: unknown key; {fix}"
    if first["type"] == "missing":
        return f"{_location(loc)}: is required"
    # Whole-spec checks have no location; their messages start with the field they blame.
    return f"{_location(loc)}: {message}" if loc else message


def parse(raw: dict) -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None


def load(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read, override and validate a job spec file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error.problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: must be a mapping of fields, such as instruction: ...")
    return parse(apply_overrides(raw, list(overrides)))
