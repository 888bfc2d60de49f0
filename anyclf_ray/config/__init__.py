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
from typing import Annotated, Any, Literal

import pycountry
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from anyclf_ray.core import models
from anyclf_ray.llm.items import normalise


class ConfigError(ValueError):
    """A job spec that cannot run; ``str(error)`` is the one line to show the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decides:
    """Field marker (``Annotated[T, DECIDES]``): the field's value decides a stage's output.

    Fingerprints are digests of the marked fields only (``decisive``), so a new setting that only
    says where or how fast things run cannot invalidate finished work by accident.
    """


DECIDES = Decides()


class StageSpec(_Strict):
    """Settings of one stage after generation; its fingerprint is chained from its input's."""

    enabled: bool = True


def decisive(spec: BaseModel) -> dict:
    """The marked fields of ``spec``, recursing into unmarked sections (other stages' excluded)."""
    dumped, found = spec.model_dump(), {}
    for name, field in type(spec).model_fields.items():
        value = getattr(spec, name)
        if any(isinstance(meta, Decides) for meta in field.metadata):
            found[name] = dumped[name]
        elif isinstance(value, _Strict) and not isinstance(value, StageSpec) and (inner := decisive(value)):
            found[name] = inner
    return found


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value.strip()


def _embedder(value: str) -> str:
    models.check_embedder(value)
    return value


def _optional_embedder(value: str | None) -> str | None:
    return value if value is None else _embedder(value)


class Label(_Strict):
    """A class the classifier predicts: ``id`` is what rows carry, ``desc`` what the LLM reads."""

    id: str
    desc: str
    # The description in other languages, by language code; the generation prompt of a language
    # uses its own (else ``desc``, with a stronger instruction to write in that language).
    desc_by_language: dict[str, str] = {}

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # Ids written as YAML integers (0, 1) are kept as their text so the column has one type.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    _blank = field_validator("id", "desc")(_non_blank)


class ModelSpec(_Strict):
    """Which LLM writes the data and how vLLM loads it."""

    name: Annotated[str, DECIDES] = "builtin:smollm2-135m-instruct"
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], DECIDES] = "auto"
    max_model_len: Annotated[int, DECIDES, Field(gt=0)] = 2048
    # Skips torch.compile/CUDA graphs: faster start, slower decode. Right for tests and tiny runs.
    enforce_eager: bool = False

    @field_validator("name")
    @classmethod
    def _loadable(cls, value: str) -> str:
        models.check_reference(value)
        return value


class ActorPlacement(_Strict):
    """Where a stage's model actors run: ``replicas`` actors on ``device`` (``auto``: GPU if any).

    ``cpus_per_replica`` is what each actor reserves from Ray, not a thread count.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    replicas: int = Field(1, gt=0)
    cpus_per_replica: float = Field(1.0, gt=0)

    @property
    def gpus_per_replica(self) -> int:
        return 1


SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "max_retries",
                 "examples_per_request", "max_text_chars", "max_item_chars", "valid_items", "min_text_words"}


class EngineSpec(ActorPlacement):
    """How the vLLM replicas run: placement and engine settings. None of it decides the text."""

    tensor_parallel_size: int = Field(1, gt=0)
    # CPU threads per replica; None: the cluster's cores divided among the replicas (at most one
    # node's), so one replica on a laptop uses every core while reserving one CPU from Ray.
    threads: int | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(1, gt=0)
    # Off by default: vLLM's CPU build cannot rewind a per-request seeded sampler after a
    # partial prefill ("CPU Generator does not use offset"). On GPUs it may be turned on.
    chunked_prefill: bool = False
    batch_size: int = Field(256, gt=0)
    # Times a dead replica is replaced (its in-flight batch is retried on the new one).
    restarts: int = Field(3, ge=0)
    env: dict[str, str] = {}
    # Custom Ray resources a replica needs, to keep engines on some nodes (a node type's label,
    # ``{"engine_node": 1}``); split across a tensor-parallel replica's GPU bundles.
    resources: dict[str, float] = {}

    @model_validator(mode="before")
    @classmethod
    def _sampling_moved(cls, raw: Any) -> Any:
        moved = sorted(SAMPLING_KEYS & set(raw)) if isinstance(raw, dict) else []
        if moved:
            raise ValueError(f"{moved[0]} moved to sampling.{moved[0]}; write it under sampling:")
        return raw

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size


# Characters per token when sizing an answer's token budget: a cautious figure for scripts
# written with spaces, and one character a token for scripts without them.
CHARS_PER_TOKEN = 3.0
DENSE_SCRIPT_LANGUAGES = {"zh", "ja", "ko", "th", "lo", "km", "my", "bo"}
# JSON around each item besides its text: {"<key>":""}, and the array's brackets.
ITEM_OVERHEAD_CHARS = 8
MIN_TEXT_CHARS = 20


def chars_per_token(languages: list[str]) -> float:
    return 1.0 if DENSE_SCRIPT_LANGUAGES & {code.lower()[:2] for code in languages} else CHARS_PER_TOKEN


def answer_tokens(n_items: int, key: str, max_chars: int, languages: list[str]) -> int:
    """Tokens that always hold a JSON array of ``n_items`` objects of at most ``max_chars``."""
    chars = n_items * (max_chars + len(key) + ITEM_OVERHEAD_CHARS) + 2
    return math.ceil(chars / chars_per_token(languages))


class SamplingSpec(_Strict):
    """How the LLM samples and how much each request asks for: all of it decides the text."""

    max_tokens: int = Field(1024, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    seed: int = 0
    max_retries: int = Field(2, ge=0)
    examples_per_request: int = Field(5, gt=0)
    # Longest text, in characters; None: what max_tokens holds for examples_per_request texts.
    max_text_chars: int | None = Field(None, gt=0)
    max_item_chars: int = Field(80, gt=0)
    # Hold items to ``items.py``'s rules (no JSON syntax, no echo of the prompt, distinct within
    # a node), retrying what fails. Off is the plain AnyClassifier recipe, kept for comparison.
    valid_items: bool = True
    # Fewest words in a generated text (scripts without spaces counted by characters).
    min_text_words: int = Field(5, ge=0)

    def text_chars(self, languages: list[str]) -> int:
        """The per-text character limit: as given, or derived from ``max_tokens``."""
        if self.max_text_chars is not None:
            return self.max_text_chars
        budget = (self.max_tokens * chars_per_token(languages) - 2) / self.examples_per_request
        return int(budget) - len("text") - ITEM_OVERHEAD_CHARS

    def check_budget(self, languages: list[str]) -> None:
        """ValueError naming the fix when ``max_tokens`` cannot hold the texts asked for."""
        n, limit = self.examples_per_request, self.text_chars(languages)
        if self.max_text_chars is None and limit < MIN_TEXT_CHARS:
            raise ValueError(
                f"sampling.max_tokens: {self.max_tokens} tokens leave {max(limit, 0)} characters for each of "
                f"{n} texts; raise max_tokens or lower examples_per_request"
            )
        need = answer_tokens(n, "text", limit, languages)
        if need > self.max_tokens:
            raise ValueError(
                f"sampling.max_tokens: {self.max_tokens} tokens cannot hold {n} texts of up to {limit} characters "
                f"(about {need} tokens); raise max_tokens to {need}, lower examples_per_request or "
                "max_text_chars, or leave max_text_chars unset to derive it"
            )


class DedupSpec(ActorPlacement, StageSpec):
    """Exact and embedding near-duplicate removal (``dedup.py``); on by default in full jobs."""

    # A sentence-transformers model: builtin:all-minilm-l6-v2 (offline), a folder or a hub id.
    model: Annotated[str, DECIDES] = "builtin:all-minilm-l6-v2"
    # Cosine similarity at or above which two texts are near-duplicates. With MiniLM, a changed
    # word or reordered clause scores 0.95-0.99, while opposite statements can reach 0.89.
    threshold: Annotated[float, DECIDES, Field(gt=0, le=1)] = 0.92
    # Near-duplicates with different labels: drop every row involved, or keep them (counted).
    conflicts: Annotated[Literal["drop", "keep"], DECIDES] = "drop"
    partition_size: Annotated[int, DECIDES, Field(gt=1)] = 2000
    probes: Annotated[int, DECIDES, Field(gt=0)] = 3
    batch_size: int = Field(128, gt=0)
    seed: Annotated[int, DECIDES] = 0

    _loadable = field_validator("model")(_embedder)


LABEL_CHECK_METHODS = ("llm", "crossfit", "similarity")
# The llm judge's answer for a text that expresses none of the labels.
NO_LABEL = "none"


class LabelCheckSpec(ActorPlacement, StageSpec):
    """Rows whose text does not say what their label says (``label_check.py``).

    Methods, combined (a row fails if any fails it): ``llm`` asks the run's engines which label
    fits; ``crossfit`` is a k-fold classifier over the rows' embeddings; ``similarity`` compares
    each row with every label's description. The placement is the embedding actors'.
    """

    # Unset: the run kind's default (``default_methods``): crossfit for a single-label run, the
    # llm judge for a multi-label one (crossfit and similarity read one label a row).
    methods: Annotated[list[Literal["llm", "crossfit", "similarity"]], DECIDES] = ["crossfit"]
    # remove: failing rows go to removed/; flag: they stay, marked in ``label_check_failed``;
    # relabel: they take the llm judge's labels when those make a set the run allows, and are
    # removed otherwise.
    action: Annotated[Literal["remove", "flag", "relabel"], DECIDES] = "remove"
    # The embedder of crossfit and similarity; None: the training body (train.base_model).
    model: Annotated[str | None, DECIDES] = None
    folds: Annotated[int, DECIDES, Field(ge=2)] = 5
    # crossfit: rows whose out-of-fold probability of their own label is below this are removed;
    # None: 1 / number of labels, i.e. the classifier finds the row less its own than chance.
    threshold: Annotated[float | None, DECIDES, Field(gt=0, lt=1)] = None
    # similarity: how much nearer its own label's description a row must be than any other's.
    margin: Annotated[float, DECIDES, Field(ge=0, lt=2)] = 0.0
    batch_size: int = Field(128, gt=0)
    seed: Annotated[int, DECIDES] = 0

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, methods: list[str]) -> list[str]:
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"list each method once, from {list(LABEL_CHECK_METHODS)} (or set enabled: false)")
        return methods

    _loadable = field_validator("model")(_optional_embedder)

    @staticmethod
    def default_methods(multi_label: bool) -> list[str]:
        return ["llm"] if multi_label else ["crossfit"]


class LanguageCheckSpec(StageSpec):
    """Rows not written in the language they were asked in (``language_check.py``)."""

    # The detector weighs the run's languages, English (what models drift into) and these:
    # others a model may write instead (es for a pt run). Each one added costs accuracy on
    # short texts, so the detector does not weigh every language it knows.
    also_detect: Annotated[list[str], DECIDES] = []

    @field_validator("also_detect")
    @classmethod
    def _known_codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            language_name(code)
        return codes
    # A row is kept only if its requested language is the one detected, with at least this
    # confidence (lingua's confidence among the weighed languages, 0-1).
    min_confidence: Annotated[float, DECIDES, Field(ge=0, lt=1)] = 0.2


class DiversitySpec(ActorPlacement, StageSpec):
    """The diversity report of the rows the run keeps (``diversity.py``): figures and plots."""

    # The embedder of the pairwise cosine and the 2-D map; None: dedup.model.
    model: Annotated[str | None, DECIDES] = None
    # Rows per label embedded for the pairwise cosine and the 2-D map.
    sample_rows: Annotated[int, DECIDES, Field(gt=1)] = 2000
    batch_size: int = Field(128, gt=0)
    seed: Annotated[int, DECIDES] = 0

    _loadable = field_validator("model")(_optional_embedder)


class EvalSetSpec(_Strict):
    """A real labelled set to evaluate on: Parquet, CSV, JSONL or a ``datasets`` folder."""

    path: str
    text_column: str = "text"
    label_column: str = "label"
    # A column of language codes: metrics are then reported per language too.
    language_column: str | None = None
    # Its label values → the job's label ids; values not listed must already be label ids.
    label_map: dict[str, str] = {}
    # Multi-label runs: the label column holds lists, or text with labels split by this.
    label_separator: str | None = None

    @field_validator("label_map", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        # YAML reads 0/1 and true/false as numbers and booleans; labels are compared as text.
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value


class TrainSpec(StageSpec):
    """SetFit training on Ray Train (``train.py``) and evaluation (``evaluate.py``)."""

    # A sentence-transformers body: the seed's mpnet by default; builtin:all-minilm-l6-v2 offline.
    base_model: Annotated[str, DECIDES] = "sentence-transformers/paraphrase-mpnet-base-v2"
    # Each worker samples its own pairs, so the worker count decides the pairs seen.
    num_workers: Annotated[int, DECIDES, Field(gt=0)] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Contrastive pairs = min(max_pairs, num_iterations × training rows), sampled as they are used.
    num_iterations: Annotated[int, DECIDES, Field(ge=0)] = 20
    max_pairs: Annotated[int, DECIDES, Field(gt=0)] = 100_000
    batch_size: Annotated[int, DECIDES, Field(gt=0)] = 16
    learning_rate: Annotated[float, DECIDES, Field(gt=0)] = 2e-5
    max_seq_length: Annotated[int, DECIDES, Field(gt=0)] = 128
    # Share of the synthetic rows held out for evaluation, chosen by id (stable across re-runs).
    test_size: Annotated[float, DECIDES, Field(ge=0, lt=1)] = 0.2
    # Training rows at most, the rest streamed past: the driver holds this many texts and their
    # embeddings whatever the run's size. Beyond it a share of every label is taken, by id.
    max_rows: Annotated[int, DECIDES, Field(gt=0)] = 50_000
    head_max_iter: Annotated[int, DECIDES, Field(gt=0)] = 1000
    seed: Annotated[int, DECIDES] = 0
    eval_set: Annotated[EvalSetSpec | None, DECIDES] = None

    _loadable = field_validator("base_model")(_embedder)


LABEL_SET_SEPARATOR = "|"
# Label sets a multi-label run may enumerate at most (20 labels with 1-3 each are 1,350).
MAX_LABEL_SETS = 1_000_000


class MultiLabelSpec(_Strict):
    """Multi-label runs (``label_sets.py``): each text carries a set of labels, drawn so that
    every label set gets an exact number of rows.

    Rows are split evenly across the set sizes (or by ``size_weights``), then within a size by
    each set's weight: the product of its pairs' weights: ``pair_weights`` where listed (0 forbids
    the pair), else the LLM's prior (``pair_prior: llm``, ``pair_prior.py``), else 1. Every label and every allowed pair first gets ``min_rows`` rows, in the smallest
    set that holds it, so rare ones are never left out.
    """

    enabled: Annotated[bool, DECIDES] = False
    min_labels: Annotated[int, DECIDES, Field(ge=1)] = 1
    max_labels: Annotated[int, DECIDES, Field(ge=1)] = 2
    # Relative rows per set size, from min_labels to max_labels; None: equal.
    size_weights: Annotated[list[float] | None, DECIDES] = None
    # Weights of label pairs written "a|b"; 0 forbids the pair in any set.
    pair_weights: Annotated[dict[str, float], DECIDES] = {}
    # llm: the run's LLM says once, before generation, how often real texts carry each pair not
    # in pair_weights; its answers weigh the sets (kept in label_prior.json). none: weight 1.
    pair_prior: Annotated[Literal["none", "llm"], DECIDES] = "none"
    # Share of the texts that express none of the labels.
    none_share: Annotated[float, DECIDES, Field(ge=0, lt=1)] = 0.0
    # Rows each label and each allowed pair gets before the weights share out the rest.
    min_rows: Annotated[int, DECIDES, Field(ge=1)] = 5

    @field_validator("size_weights")
    @classmethod
    def _positive_sizes(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and (any(w < 0 for w in weights) or not any(weights)):
            raise ValueError("weights must be 0 or more with at least one above 0, one per set size")
        return weights

    @field_validator("pair_weights")
    @classmethod
    def _no_negative_pairs(cls, weights: dict[str, float]) -> dict[str, float]:
        negative = sorted(pair for pair, w in weights.items() if w < 0)
        if negative:
            raise ValueError(f"{negative[0]!r}: a weight must be 0 (forbidden) or more")
        return weights

    def check(self, label_ids: list[str], n_records: int | None) -> None:
        """ValueError naming the field and the fix when the labels cannot hold these sets."""
        if not self.enabled:
            return
        if n_records is None:
            raise ValueError("multi_label: give n_record_to_generate; a multi-label run's rows are split by label set, "
                             "not per leaf")
        if self.max_labels > len(label_ids):
            raise ValueError(f"multi_label.max_labels: {self.max_labels} labels per text, but the spec has "
                             f"{len(label_ids)} labels; lower max_labels or add labels")
        if self.min_labels > self.max_labels:
            raise ValueError(f"multi_label.min_labels: {self.min_labels} is above max_labels {self.max_labels}; "
                             "lower it or raise max_labels")
        sizes = self.max_labels - self.min_labels + 1
        if self.size_weights is not None and len(self.size_weights) != sizes:
            raise ValueError(f"multi_label.size_weights: {len(self.size_weights)} weight(s) for {sizes} set size(s) "
                             f"({self.min_labels} to {self.max_labels}); give one per size")
        joined = [label for label in label_ids if LABEL_SET_SEPARATOR in label]
        if joined:
            raise ValueError(f"labels: id {joined[0]!r} holds {LABEL_SET_SEPARATOR!r}, which joins a multi-label "
                             "row's label_set; rename it")
        for pair in self.pair_weights:
            parts = pair.split(LABEL_SET_SEPARATOR)
            unknown = [part for part in parts if part not in label_ids]
            if len(parts) != 2 or parts[0] == parts[1]:
                raise ValueError(f"multi_label.pair_weights: {pair!r} is not a pair; write two label ids as 'a|b'")
            if unknown:
                raise ValueError(f"multi_label.pair_weights: {pair!r} names unknown label {unknown[0]!r}; "
                                 f"labels are {label_ids}")


class OutputSpec(_Strict):
    """Where a run's artifacts go: ``<path>/<run_id>/``, a local folder or ``s3://bucket/prefix``."""

    path: str = "runs"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    rows_per_shard: int = Field(50_000, gt=0)
    # Generation commits a part at least every ``commit_rows`` rows, and sooner when that many
    # would take the engines longer than ``commit_seconds`` at the rate the tree passes measured:
    # what a crash can lose, whatever ``engine.batch_size``.
    commit_rows: int = Field(2_000, gt=0)
    commit_seconds: float = Field(120.0, gt=0)
    # How often a long pass logs its progress and rewrites ``<run>/status.json``.
    status_seconds: float = Field(30.0, gt=0)

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
# What one run plans at most: its rows, and its tree's leaf positions (every one of them is held
# by the driver while the tree passes fill it in).
MAX_ROWS = 1_000_000_000
MAX_TREE_LEAVES = 2_000_000
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobSpec(_Strict):
    """A whole run. Sizes are either ``n_record_to_generate`` or all four explicit sizes."""

    instruction: Annotated[str, DECIDES]
    # The instruction in other languages, by language code (as ``Label.desc_by_language``).
    instruction_by_language: Annotated[dict[str, str], DECIDES] = {}
    labels: Annotated[list[Label], DECIDES]
    n_record_to_generate: Annotated[int | None, DECIDES, Field(gt=0)] = None
    n_source_type: Annotated[int | None, DECIDES, Field(gt=0)] = None
    n_topic: Annotated[int | None, DECIDES, Field(gt=0)] = None
    n_subtopic: Annotated[int | None, DECIDES, Field(gt=0)] = None
    sample_per_subtopic: Annotated[int | None, DECIDES, Field(gt=0)] = None
    languages: Annotated[list[str], DECIDES] = ["en"]
    # One tree read by every language (its items in English), or a tree per language written in
    # it. Shared is the default: the languages' rows then come from the same leaves, so their
    # counts and metrics compare like with like, and tree passes do not grow with the languages.
    tree_languages: Annotated[Literal["shared", "per_language"], DECIDES] = "shared"
    model: ModelSpec = ModelSpec()
    engine: EngineSpec = EngineSpec()
    sampling: Annotated[SamplingSpec, DECIDES] = SamplingSpec()
    output: OutputSpec = OutputSpec()
    language_check: LanguageCheckSpec = LanguageCheckSpec()
    label_check: LabelCheckSpec = LabelCheckSpec()
    dedup: DedupSpec = DedupSpec()
    diversity: DiversitySpec = DiversitySpec()
    train: TrainSpec = TrainSpec()
    multi_label: MultiLabelSpec = MultiLabelSpec()
    run_id: str | None = None
    # A tree Parquet (possibly edited by hand) to generate from instead of expanding a new one.
    tree_path: Annotated[str | None, DECIDES] = None

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

    @model_validator(mode="before")
    @classmethod
    def _label_check_default(cls, raw: Any) -> Any:
        """The label check's methods, when not given, are the run kind's (``default_methods``)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("label_check", {}), dict):
            return raw
        given = raw.get("label_check") or {}
        if "methods" in given:
            return raw
        multi = raw.get("multi_label")
        enabled = multi.get("enabled", False) if isinstance(multi, dict) else getattr(multi, "enabled", False)
        try:
            multi_label = TypeAdapter(bool).validate_python(enabled)
        except ValidationError:  # reported by the field's own validation
            multi_label = False
        return {**raw, "label_check": {**given, "methods": LabelCheckSpec.default_methods(multi_label)}}

    @model_validator(mode="before")
    @classmethod
    def _multilingual_defaults(cls, raw: Any) -> Any:
        """Runs in other languages than English default to a multilingual embedder for dedup
        and training (the built-in MiniLM and the seed's mpnet read English only)."""
        if not isinstance(raw, dict) or not non_english(raw.get("languages") or ["en"]):
            return raw
        raw = dict(raw)
        for section, field in (("dedup", "model"), ("train", "base_model")):
            given = raw.get(section) or {}
            if isinstance(given, dict) and field not in given:
                raw[section] = {**given, field: models.MULTILINGUAL_EMBEDDER}
        return raw

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
        self._plannable()
        translated = [("instruction_by_language", self.instruction_by_language)] + [
            (f"labels[{i}].desc_by_language", label.desc_by_language) for i, label in enumerate(self.labels)]
        for field, by_language in translated:
            unknown = sorted(set(by_language) - set(self.languages))
            if unknown:
                raise ValueError(f"{field}: {unknown[0]!r} is not in languages {self.languages}; add it there or drop it")
        self.sampling.check_budget(self.languages)
        self.multi_label.check([label.id for label in self.labels], self.n_record_to_generate)
        if self.label_check.enabled and self.label_check.action == "relabel" and self.label_check.methods != ["llm"]:
            raise ValueError("label_check.action: relabel takes the llm judge's labels; set methods: [llm]")
        if self.multi_label.enabled and self.label_check.enabled and self.label_check.methods != ["llm"]:
            raise ValueError("label_check.methods: a multi-label run is checked by the llm judge only (crossfit and "
                             "similarity read one label a row); set methods: [llm]")
        single_judge = self.label_check.enabled and "llm" in self.label_check.methods and not self.multi_label.enabled
        reserved = [label.desc for label in self.labels if normalise(label.desc) == NO_LABEL]
        if single_judge and reserved:
            raise ValueError(f"label_check.methods: the llm check answers {NO_LABEL!r} for no label; reword the "
                             f"label desc {reserved[0]!r}")
        if self.sampling.max_tokens >= self.model.max_model_len:
            raise ValueError(
                f"sampling.max_tokens: {self.sampling.max_tokens} leaves no room for the prompt in "
                f"model.max_model_len {self.model.max_model_len}; lower it or raise max_model_len"
            )
        return self

    def _plannable(self) -> None:
        """ValueError unless the plan fits a driver: at most ``MAX_ROWS`` rows and a tree of at
        most ``MAX_TREE_LEAVES`` leaf positions (the tree passes hold every one)."""
        sizes, trees = self.sizes(), len(self.languages) if self.tree_languages == "per_language" else 1
        leaves = trees * len(self.labels) * sizes["n_source_type"] * sizes["n_topic"] * sizes["n_subtopic"]
        rows = self.n_record_to_generate or leaves // trees * len(self.languages) * sizes["sample_per_subtopic"]
        if rows > MAX_ROWS:
            field = "n_record_to_generate" if self.n_record_to_generate else "sample_per_subtopic"
            raise ValueError(f"{field}: {rows:,} rows is more than the {MAX_ROWS:,} one run plans; split the job "
                             "into several runs (each with its own run_id and sampling.seed)")
        if leaves <= MAX_TREE_LEAVES:
            return
        if self.n_record_to_generate is None:
            raise ValueError(f"n_subtopic: the tree would hold {leaves:,} leaves, more than the {MAX_TREE_LEAVES:,} "
                             "one run expands; lower n_source_type, n_topic or n_subtopic")
        low, high = 1, self.n_record_to_generate  # the most rows whose derived tree still fits
        while low < high:
            middle = (low + high + 1) // 2
            derived = sizes_for_records(middle, len(self.labels) * len(self.languages))
            fits = trees * len(self.labels) * math.prod(derived[f] for f in SIZE_FIELDS[:3]) <= MAX_TREE_LEAVES
            low, high = (middle, high) if fits else (low, middle - 1)
        raise ValueError(f"n_record_to_generate: {rows:,} rows need a tree of {leaves:,} leaves, more than the "
                         f"{MAX_TREE_LEAVES:,} one run expands; split the job into runs of at most {low:,} rows")

    # -- derived values -------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        """The four tree sizes, derived from ``n_record_to_generate`` when that is what was given."""
        if self.n_record_to_generate is None:
            return {f: getattr(self, f) for f in SIZE_FIELDS}
        return sizes_for_records(self.n_record_to_generate, len(self.labels) * len(self.languages))

    @property
    def label_column(self) -> str:
        """The column that holds a row's label: its id, or a multi-label row's ``label_set``."""
        return "label_set" if self.multi_label.enabled else "label"

    def embedders(self) -> dict[str, str]:
        """The embedding model of every enabled stage that embeds, by the field that names it."""
        found = {}
        if self.label_check.enabled and {"crossfit", "similarity"} & set(self.label_check.methods):
            found["label_check.model" if self.label_check.model else "train.base_model"] = (
                self.label_check.model or self.train.base_model)
        if self.dedup.enabled:
            found["dedup.model"] = self.dedup.model
        if self.diversity.enabled:
            found["diversity.model" if self.diversity.model else "dedup.model"] = self.diversity.model or self.dedup.model
        if self.train.enabled:
            found["train.base_model"] = self.train.base_model
        return found

    def warnings(self) -> list[str]:
        """What will run but read poorly: English-only embedders on other languages."""
        others = non_english(self.languages)
        if not others:
            return []
        return [
            f"{field}: {model} reads English only, but languages include {', '.join(others)}; "
            f"set a multilingual model such as {models.MULTILINGUAL_EMBEDDER}"
            for field, model in self.embedders().items() if model in models.ENGLISH_ONLY
        ]

    def fingerprint(self) -> str:
        """A digest of the fields that decide the generated rows (``decisive``).

        Later stages' sections are left out: they have their own fingerprints, chained from this
        one, so tuning them reuses the generated data of the same run id.
        """
        found = decisive(self)
        if not self.multi_label.enabled:  # so single-label runs keep the ids they had before it
            del found["multi_label"]
        return digest(found)

    def resolved_run_id(self) -> str:
        return self.run_id or f"run-{self.fingerprint()}"


def digest(content: object) -> str:
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


def non_english(codes: list) -> list:
    return [code for code in codes if not (isinstance(code, str) and code.lower() in ("en", "eng"))]


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


class AsWritten(yaml.SafeLoader):
    """YAML whose plain scalars stay the text the user wrote; only ``null``, ``~`` and empty
    values are read as null.

    YAML 1.1, which PyYAML follows, reads ``no`` as false, ``010`` as 8 and ``0x1F`` as 31, so a
    label id or a ``label_map`` key written that way would no longer match the labels in the
    user's files. Numbers and booleans of typed fields are read from that text by the spec's
    models (``"2"`` as 2, ``"true"`` or ``"yes"`` as true), so they lose nothing.
    """


AsWritten.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=AsWritten)  # noqa: S506 (a SafeLoader)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are read as YAML (lists, mappings), as written."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. engine.replicas=2")
        try:
            value = read_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: not valid YAML ({error.problem})") from None
        _set_dotted(raw, key.strip(), value)
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
    if first["type"] == "int_parsing" and isinstance(first["input"], str):
        return f"{_location(loc)}: {first['input']!r} is not a whole number; write it in digits{_in_digits(first['input'])}"
    # Whole-spec checks have no location; their messages start with the field they blame.
    return f"{_location(loc)}: {message}" if loc else message


def _in_digits(text: str) -> str:
    """``text`` (such as ``1e6``) as digits, for the fix: ", such as 1000000", or nothing."""
    try:
        value = float(text)
    except ValueError:
        return ""
    return f", such as {int(value)}" if value.is_integer() and abs(value) < 1e30 else ""


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
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; save the spec as UTF-8 YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: must be a mapping of fields, such as instruction: ...")
    return parse(apply_overrides(raw, list(overrides)))
