"""The job spec's declarations: one typed, validated description of a run.

In: a mapping (``loading.load`` reads it from YAML). Out: a ``JobSpec`` whose every field has
been checked, each field described (``Field(description=...)``, so the spec's JSON Schema comes
from the models); a bad value raises the ``ValueError`` whose message ``loading`` turns into one
line naming the field and the fix. Nothing here touches Ray, a model or the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.parse
from typing import Annotated, Any, Literal

import pycountry
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
from anyclf_ray.core.tokens import ITEM_OVERHEAD_CHARS, MIN_TEXT_CHARS, answer_tokens, chars_per_token


class ConfigError(ValueError):
    """A job spec (or an input it names) that cannot run; ``str(error)`` is the one line to show
    the user, naming the field and the fix."""


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

    enabled: bool = Field(True, description="Run this stage; off, the stage after it reads this one's input.")


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

    id: str = Field(description="What rows carry as the label, as written (quote nothing: YAML values stay text).")
    desc: str = Field(description="What the LLM reads: a description of the label in words.")
    desc_by_language: dict[str, str] = Field(
        {}, description="The description in other languages, by language code; a language's prompts use its own "
                        "(else desc, with a stronger instruction to write in that language).")

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # Ids written as YAML integers (0, 1) are kept as their text so the column has one type.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    _blank = field_validator("id", "desc")(_non_blank)


class ModelSpec(_Strict):
    """Which LLM writes the data and how vLLM loads it (checked against ``engine.kind`` by ``JobSpec``)."""

    name: Annotated[str, DECIDES, Field(
        description="The LLM: builtin:smollm2-135m-instruct or builtin:tiny-random (offline), a local model "
                    "folder, or a hub id such as Qwen/Qwen2.5-7B-Instruct; with engine.kind openai, the name the "
                    "endpoint serves it under (as its /v1/models lists it).")] = "builtin:smollm2-135m-instruct"
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], DECIDES, Field(
        description="Weights' precision in vLLM; float32 on CPUs without fast bfloat16 (engine.kind vllm).")] = "auto"
    max_model_len: Annotated[int, DECIDES, Field(
        gt=0, description="Context length in tokens: every prompt and its answer budget must fit it (with "
                          "engine.kind openai, the served model's).")] = 2048
    enforce_eager: bool = Field(
        False, description="Skip torch.compile and CUDA graphs: faster start, slower decode (tests, tiny runs; "
                           "engine.kind vllm).")

    _blank = field_validator("name")(_non_blank)


class ActorPlacement(_Strict):
    """Where a stage's model actors run: ``replicas`` actors on ``device`` (``auto``: GPU if any).

    ``cpus_per_replica`` is what each actor reserves from Ray, not a thread count.
    """

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the actors run; auto: GPU if the "
                                                                        "cluster has one.")
    replicas: int = Field(1, gt=0, description="Actors, each holding one copy of the model.")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs each actor reserves from Ray (not a thread count).")
    threads: int | None = Field(
        None, gt=0, description="CPU threads per replica on CPU (unused on GPUs); null: the cluster's cores divided "
                                "among the replicas (at most one node's), so one replica on a laptop uses every core.")

    @property
    def gpus_per_replica(self) -> int:
        return 1


SAMPLING_KEYS = {"max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "max_retries",
                 "examples_per_request", "max_text_chars", "max_item_chars", "valid_items", "min_text_words"}


# Settings of the in-process vLLM engine, and of the HTTP client of an endpoint: each kind
# refuses the other's, so that a setting that would do nothing is never silently ignored.
VLLM_ENGINE_KEYS = ("tensor_parallel_size", "threads", "gpu_memory_utilization", "cpu_kv_cache_gib",
                    "chunked_prefill")
OPENAI_ENGINE_KEYS = ("base_url", "api_key_env", "max_concurrency", "timeout_seconds", "retry_seconds",
                      "send_repetition_penalty", "top_logprobs")
# A replica of kind openai is an HTTP client: threads waiting on sockets, hence a small share of a core.
OPENAI_CPUS_PER_REPLICA = 0.1
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EngineSpec(ActorPlacement):
    """How the LLM replicas run: in-process vLLM engines (``kind: vllm``), or clients of an
    OpenAI-compatible HTTP endpoint (``kind: openai``). None of it decides the text."""

    kind: Literal["vllm", "openai"] = Field(
        "vllm", description="vllm: a vLLM engine in each replica; openai: each replica sends the requests to the "
                            "OpenAI-compatible API at base_url (a vLLM, SGLang or TGI server, or a hosted API), "
                            "which serves model.name.")
    cpus_per_replica: float = Field(
        1.0, gt=0, description=f"CPUs each replica reserves from Ray (not a thread count); with kind openai, an "
                               f"HTTP client, {OPENAI_CPUS_PER_REPLICA} unless given.")
    base_url: str | None = Field(
        None, description="kind openai: the API's base URL, the part before /chat/completions "
                          "(http://127.0.0.1:8000/v1).")
    api_key_env: str | None = Field(
        None, description="kind openai: the name of the environment variable holding the API key, sent as a bearer "
                          "token; never the key itself (the key is kept out of the spec, the manifests and the "
                          "logs). null: no key.")
    max_concurrency: int = Field(
        16, gt=0, description="kind openai: requests in flight to the endpoint at once, split evenly among the "
                              "replicas.")
    timeout_seconds: float = Field(
        600.0, gt=0, description="kind openai: seconds the endpoint may take to answer one request (or between two "
                                 "bytes of its answer) before the request is sent again.")
    retry_seconds: float = Field(
        300.0, ge=0, description="kind openai: how long after its first failure a request is sent again, on 429, "
                                 "5xx, a timeout or a lost connection, with backoff doubling from 1 s up to 30 s; past "
                                 "it the request fails (counted, never dropped).")
    send_repetition_penalty: bool = Field(
        True, description="kind openai: send sampling.repetition_penalty (vLLM and SGLang take it); off for APIs "
                          "that refuse parameters OpenAI's lacks, which then sample without it.")
    top_logprobs: int = Field(
        20, ge=-1, description="kind openai: the likeliest tokens whose log-probabilities a choice's answer reads "
                               "(OpenAI allows 20; a vLLM server up to its --max-logprobs, and -1, the whole "
                               "vocabulary, when started with --max-logprobs -1); an option among none of them has "
                               "probability 0.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per replica (vLLM's tensor parallelism, in a "
                                                           "placement group).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    cpu_kv_cache_gib: int = Field(1, gt=0, description="KV cache per replica on CPU, in GiB.")
    # vLLM's CPU build cannot rewind a per-request seeded sampler after a partial prefill ("CPU
    # Generator does not use offset"), hence off by default.
    chunked_prefill: bool = Field(False, description="vLLM's chunked prefill; may be turned on on GPUs.")
    batch_size: int = Field(256, gt=0, description="Requests per replica in one engine call.")
    restarts: int = Field(3, ge=0, description="Times a dead replica is replaced; the call it held is asked again "
                                               "on its replacement.")
    env: dict[str, str] = Field({}, description="Environment variables for the engines' processes.")
    resources: dict[str, float] = Field(
        {}, description='Custom Ray resources a replica needs, to keep engines on some nodes ({"engine_node": 1}); '
                        "split across a tensor-parallel replica's GPU bundles.")

    @model_validator(mode="before")
    @classmethod
    def _sampling_moved(cls, raw: Any) -> Any:
        moved = sorted(SAMPLING_KEYS & set(raw)) if isinstance(raw, dict) else []
        if moved:
            raise ValueError(f"{moved[0]} moved to sampling.{moved[0]}; write it under sampling:")
        return raw

    @model_validator(mode="before")
    @classmethod
    def _client_cpus(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("kind") == "openai" and "cpus_per_replica" not in raw:
            return {**raw, "cpus_per_replica": OPENAI_CPUS_PER_REPLICA}
        return raw

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urllib.parse.urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL; give the API's base URL, such as "
                             "http://127.0.0.1:8000/v1")
        return value.strip().rstrip("/")

    @field_validator("top_logprobs")
    @classmethod
    def _some_logprobs(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1 (20 for OpenAI's API), or -1 for the whole vocabulary")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        # The value is never echoed: a key pasted here by mistake must not reach a log.
        if value is not None and not ENV_NAME.match(value):
            raise ValueError("must be the name of an environment variable (such as OPENAI_API_KEY), not the key "
                             "itself; export the key in that variable")
        return value

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size


class SamplingSpec(_Strict):
    """How the LLM samples and how much each request asks for: all of it decides the text."""

    max_tokens: int = Field(1024, gt=0, description="Token budget of one generation answer.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (judgements use 0).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling: the probability mass sampled from.")
    repetition_penalty: float = Field(1.1, gt=0, description="vLLM's repetition penalty (above 1 discourages loops).")
    seed: int = Field(0, description="Base of every request's seed: the same seed writes the same texts.")
    max_retries: int = Field(2, ge=0, description="Times an answer that fails (cut off, refused items) is asked "
                                                  "again, with a new seed.")
    examples_per_request: int = Field(5, gt=0, description="Texts one generation request asks for.")
    max_text_chars: int | None = Field(None, gt=0, description="Longest text, in characters; null: what max_tokens "
                                                               "holds for examples_per_request texts.")
    max_item_chars: int = Field(80, gt=0, description="Longest tree item (source type, topic, subtopic), in "
                                                      "characters.")
    valid_items: bool = Field(
        True, description="Hold items to the rules of llm/items.py (no JSON syntax, no echo, no placeholders, "
                          "distinct), retrying what fails; off is the plain AnyClassifier recipe.")
    min_text_words: int = Field(5, ge=0, description="Fewest words in a generated text (scripts without spaces "
                                                     "counted by characters).")

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

    model: Annotated[str, DECIDES, Field(description="The embedder: a sentence-transformers model "
                                                      "(builtin:all-minilm-l6-v2 offline, a folder or a hub id).")
                     ] = "builtin:all-minilm-l6-v2"
    # With MiniLM, a changed word or reordered clause scores 0.95-0.99, while opposite statements
    # can reach 0.89.
    threshold: Annotated[float, DECIDES, Field(gt=0, le=1, description="Cosine similarity at or above which two "
                                                                       "texts are near-duplicates.")] = 0.92
    conflicts: Annotated[Literal["drop", "keep"], DECIDES, Field(
        description="Near-duplicates with different labels: drop every row involved, or keep them (counted).")
    ] = "drop"
    partition_size: Annotated[int, DECIDES, Field(gt=1, description="Rows per k-means partition of the "
                                                                    "near-duplicate search.")] = 2000
    probes: Annotated[int, DECIDES, Field(gt=0, description="Partitions each row is compared in.")] = 3
    batch_size: int = Field(128, gt=0, description="Texts per embedding batch.")
    seed: Annotated[int, DECIDES, Field(description="Seed of the k-means partitions.")] = 0

    _loadable = field_validator("model")(_embedder)


LABEL_CHECK_METHODS = ("llm", "crossfit", "similarity")
# A judgement's options are lettered A, B, ...: one token each in every tokenizer we know of.
MAX_OPTIONS = 26


class JudgeSpec(_Strict):
    """How an LLM choice is read (``judgement.py``): the options' probabilities at the answer's
    first token, with the model's prior over them divided out (calibration), and a confidence."""

    calibration: Annotated[Literal["batch", "content_free", "none"], DECIDES, Field(
        description="batch: divide by the mean probabilities over the pass (Zhou et al. 2023); content_free: by "
                    "the probabilities for content-free inputs such as N/A (Zhao et al. 2021); none: raw.")] = "batch"
    min_batch: Annotated[int, DECIDES, Field(
        ge=2, description="batch calibration needs this many questions of a kind in a pass; a smaller pass is "
                          "calibrated content_free (and says so).")] = 16
    min_confidence: Annotated[float, DECIDES, Field(
        ge=0, lt=1, description="A judgement whose calibrated probability of its choice (in a multi-label run, of "
                                "its least sure label) is below this abstains: the row is removed as "
                                "low_confidence. 0: never.")] = 0.0


class LabelCheckSpec(ActorPlacement, StageSpec):
    """Rows whose text does not say what their label says (``label_check.py``).

    Methods, combined (a row fails if any fails it): ``llm`` asks the run's engines which label
    fits; ``crossfit`` is a k-fold classifier over the rows' embeddings; ``similarity`` compares
    each row with every label's description. The placement is the embedding actors'.
    """

    methods: Annotated[list[Literal["llm", "crossfit", "similarity"]], DECIDES, Field(
        description="The checks, combined (a row fails if any fails it); unset: the run kind's default, crossfit "
                    "for single-label runs and llm for multi-label ones.")] = ["crossfit"]
    action: Annotated[Literal["remove", "flag", "relabel"], DECIDES, Field(
        description="remove: failing rows go to removed/; flag: they stay, marked in label_check_failed; "
                    "relabel: they take the llm judge's labels when those make a set the run allows, and are "
                    "removed otherwise.")] = "remove"
    model: Annotated[str | None, DECIDES, Field(description="The embedder of crossfit and similarity; null: "
                                                             "train.base_model.")] = None
    folds: Annotated[int, DECIDES, Field(ge=2, description="crossfit's folds.")] = 5
    threshold: Annotated[float | None, DECIDES, Field(
        gt=0, lt=1, description="crossfit: a row whose out-of-fold probability of its own label is below this "
                                "fails; null: 1 / number of labels (less its own than chance).")] = None
    margin: Annotated[float, DECIDES, Field(
        ge=0, lt=2, description="similarity: how much nearer its own label's description a row must be than any "
                                "other's (cosine).")] = 0.0
    # bench/label_check_sample.py (MiniLM, default threshold): verdicts of heads fitted on 1,000
    # rows a label agree with heads fitted on every row on 0.995 of SMS spam (ham capped from
    # 3,955) and 0.982 of TREC (four of six labels capped), against 0.9965 and 0.986 for every
    # row with other folds; 500: 0.991 and 0.973. The smallest limit at 0.98 on both.
    sample_per_label: Annotated[int, DECIDES, Field(
        ge=2, description="crossfit fits its folds on at most this many rows of each label, drawn by a hash of the "
                          "row id with seed; every other row is scored by the head of its fold (a hash of its id), "
                          "which never saw it.")] = 1000
    batch_size: int = Field(128, gt=0, description="Texts per embedding batch.")
    seed: Annotated[int, DECIDES, Field(description="Seed of crossfit's sample and folds.")] = 0
    judge: Annotated[JudgeSpec, DECIDES, Field(description="How the llm method's judgement is read.")] = JudgeSpec()

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

    # Each language weighed costs accuracy on short texts, so the detector weighs the run's
    # languages, English (what models drift into) and these, not every language it knows.
    also_detect: Annotated[list[str], DECIDES, Field(
        description="Languages a model may write instead of the one asked (es for a pt run), weighed with the "
                    "run's languages and English.")] = []
    min_confidence: Annotated[float, DECIDES, Field(
        ge=0, lt=1, description="A row is kept only if its requested language is the one detected, with at least "
                                "this confidence (lingua's, among the weighed languages).")] = 0.2

    @field_validator("also_detect")
    @classmethod
    def _known_codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            language_name(code)
        return codes


class DiversitySpec(ActorPlacement, StageSpec):
    """The diversity report of the rows the run keeps (``diversity.py``): figures and plots."""

    model: Annotated[str | None, DECIDES, Field(description="The embedder of the pairwise cosine and the 2-D map; "
                                                             "null: dedup.model.")] = None
    sample_rows: Annotated[int, DECIDES, Field(gt=1, description="Rows per label sampled (those of smallest hash "
                                                                 "of seed and id) for distinct-n, the compression "
                                                                 "ratio, the pairwise cosine and the 2-D map.")] = 2000
    batch_size: int = Field(128, gt=0, description="Texts per embedding batch.")
    seed: Annotated[int, DECIDES, Field(description="Seed of the sample's hash.")] = 0

    _loadable = field_validator("model")(_optional_embedder)


class EvalSetSpec(_Strict):
    """A real labelled set to evaluate on: Parquet, CSV, JSONL or a ``datasets`` folder."""

    path: str = Field(description="A .parquet, .csv or .jsonl file or a datasets folder, local or s3://.")
    text_column: str = Field("text", description="The column of texts.")
    label_column: str = Field("label", description="The column of labels, read as the text written.")
    language_column: str | None = Field(None, description="A column of language codes: metrics per language too.")
    label_map: dict[str, str] = Field({}, description="Its label values → the job's label ids; values not listed "
                                                      "must already be label ids.")
    label_separator: str | None = Field(None, description="Multi-label runs: the label column holds lists, or text "
                                                          "with labels split by this.")

    @field_validator("label_map", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        # YAML reads 0/1 and true/false as numbers and booleans; labels are compared as text.
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else value


class AnnotateSpec(StageSpec):
    """The user's own unlabeled texts, labelled by the run's LLM (``annotate.py``): a source of
    rows beside generation, each text's label the calibrated judgement's choice."""

    enabled: bool = Field(False, description="Annotate the texts at path (a source of rows beside generation).")
    path: Annotated[str | None, DECIDES, Field(
        description="A .parquet, .csv or .jsonl file, a Parquet folder or a datasets folder, local or s3://; "
                    "read as it stands when the run starts (a changed file at the same path is not noticed).")] = None
    text_column: Annotated[str, DECIDES, Field(description="The column of texts.")] = "text"
    id_column: Annotated[str | None, DECIDES, Field(
        description="A column of unique row ids, kept as the rows' ids; null: a stable hash of the text.")] = None
    language_column: Annotated[str | None, DECIDES, Field(
        description="A column of language codes (among languages); null: every text is in the first language.")
    ] = None
    max_rows: Annotated[int | None, DECIDES, Field(gt=0, description="Annotate the first this many rows only.")] = None
    judge: Annotated[JudgeSpec, DECIDES, Field(description="How each text's judgement is read.")] = JudgeSpec()


class TrainSpec(StageSpec):
    """SetFit training on Ray Train (``train.py``) and evaluation (``evaluate.py``)."""

    base_model: Annotated[str, DECIDES, Field(
        description="The sentence-transformers body: the seed's mpnet by default, builtin:all-minilm-l6-v2 "
                    "offline.")] = "sentence-transformers/paraphrase-mpnet-base-v2"
    # Each worker samples its own pairs, so the worker count decides the pairs seen.
    num_workers: Annotated[int, DECIDES, Field(gt=0, description="Ray Train workers (DDP: gloo on CPU, NCCL on "
                                                                 "GPU).")] = 1
    use_gpu: bool = Field(False, description="A GPU per training worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")
    threads: int | None = Field(
        None, gt=0, description="CPU threads per worker, and per embedding and prediction actor of the evaluation, "
                                "on CPU (unused with use_gpu); null: the cluster's cores divided among the workers "
                                "(at most one node's).")
    num_iterations: Annotated[int, DECIDES, Field(
        ge=0, description="Contrastive pairs = min(max_pairs, num_iterations × training rows); 0 skips "
                          "fine-tuning.")] = 20
    max_pairs: Annotated[int, DECIDES, Field(gt=0, description="Contrastive pairs at most.")] = 100_000
    batch_size: Annotated[int, DECIDES, Field(gt=0, description="Pairs per training step and worker.")] = 16
    learning_rate: Annotated[float, DECIDES, Field(gt=0, description="AdamW's learning rate.")] = 2e-5
    max_seq_length: Annotated[int, DECIDES, Field(gt=0, description="Tokens of a text the body reads.")] = 128
    test_size: Annotated[float, DECIDES, Field(
        ge=0, lt=1, description="Share of the rows held out for evaluation, chosen by id (stable across "
                                "re-runs).")] = 0.2
    max_rows: Annotated[int, DECIDES, Field(
        gt=0, description="Training rows at most, the lowest id draws; the rest stream past.")] = 50_000
    head_max_iter: Annotated[int, DECIDES, Field(gt=0, description="Iterations of the logistic-regression head."
                                                 )] = 1000
    seed: Annotated[int, DECIDES, Field(description="Seed of pairs and head.")] = 0
    eval_set: Annotated[EvalSetSpec | None, DECIDES, Field(description="A real labelled set to evaluate on.")] = None

    _loadable = field_validator("base_model")(_embedder)


class RoundsSpec(StageSpec):
    """Error-driven rounds (``rounds/``): after training, the classifier's weak spots (held-out
    confusions per label pair, error and margin per leaf, a real dev set's errors) drive a round
    of targeted generation; the filters and training rerun on all rows, until the metric stops
    improving by ``min_gain`` or ``max_rounds`` rounds have run."""

    enabled: bool = Field(False, description="Run rounds of targeted generation after the first training.")
    # Not deciding: raising it continues a finished run with more rounds; its rounds are kept.
    max_rounds: int = Field(3, ge=1, le=20, description="Rounds after the first training, at most.")
    rows_per_round: Annotated[int, DECIDES, Field(
        gt=0, description="Rows each round asks the LLM for, shared among its weak spots.")] = 200
    dev_set: Annotated[EvalSetSpec | None, DECIDES, Field(
        description="A small real labelled set (read like train.eval_set): its errors drive generation and "
                    "its metric the stopping; never trained on.")] = None
    min_gain: float = Field(0.005, ge=-1, le=1, description="Stop when the metric (on the dev set, else on the first "
                                                        "round's held-out rows) improves by less than this; -1: "
                                                        "run every round.")
    metric: Literal["macro_f1", "accuracy", "weighted_f1"] = Field(
        "macro_f1", description="The metric rounds are compared by.")
    leak_similarity: Annotated[float, DECIDES, Field(
        gt=0, le=1, description="Rows whose character 5-gram Jaccard similarity to a dev text reaches this are "
                                "removed as dev_leak (exact copies always).")] = 0.6


LABEL_SET_SEPARATOR = "|"
# Label sets a multi-label run may enumerate at most (20 labels with 1-3 each are 1,350).
MAX_LABEL_SETS = 1_000_000


class MultiLabelSpec(_Strict):
    """Multi-label runs (``label_sets.py``): each text carries a set of labels, drawn so that
    every label set gets an exact number of rows.

    Rows are split evenly across the set sizes (or by ``size_weights``), then within a size by
    each set's weight: the product of its pairs' weights: ``pair_weights`` where listed (0 forbids
    the pair), else the LLM's prior (``pair_prior: llm``, ``pair_prior.py``), else 1. Every label
    and every allowed pair first gets ``min_rows`` rows, in the smallest set that holds it, so
    rare ones are never left out.
    """

    enabled: Annotated[bool, DECIDES, Field(description="Rows carry a set of labels.")] = False
    min_labels: Annotated[int, DECIDES, Field(ge=1, description="Fewest labels a text carries.")] = 1
    max_labels: Annotated[int, DECIDES, Field(ge=1, description="Most labels a text carries.")] = 2
    size_weights: Annotated[list[float] | None, DECIDES, Field(
        description="Relative rows per set size, from min_labels to max_labels; null: equal.")] = None
    pair_weights: Annotated[dict[str, float], DECIDES, Field(
        description='Weights of label pairs written "a|b"; 0 forbids the pair in any set.')] = {}
    pair_prior: Annotated[Literal["none", "llm"], DECIDES, Field(
        description="llm: the run's LLM says once how often real texts carry each pair not in pair_weights, and "
                    "its answers weigh the sets (label_prior.json); none: weight 1.")] = "none"
    none_share: Annotated[float, DECIDES, Field(ge=0, lt=1, description="Share of the texts that express none of "
                                                                        "the labels.")] = 0.0
    min_rows: Annotated[int, DECIDES, Field(ge=1, description="Rows each label and each allowed pair gets before the "
                                                              "weights share out the rest.")] = 5
    judge: Annotated[JudgeSpec, DECIDES, Field(description="How the pair prior's judgement is read.")] = JudgeSpec()

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

    path: str = Field("runs", description="A local folder or s3://bucket/prefix; the run goes to <path>/<run_id>/.")
    endpoint_url: str | None = Field(None, description="An S3 endpoint other than AWS (MinIO, SeaweedFS...).")
    region: str = Field("us-east-1", description="The S3 region.")
    rows_per_shard: int = Field(50_000, gt=0, description="Rows per Parquet shard a stage writes.")
    # What a crash can lose, whatever engine.batch_size.
    commit_rows: int = Field(2_000, gt=0, description="A source commits a part at least every this many rows.")
    commit_seconds: float = Field(
        120.0, gt=0, description="...and sooner when commit_rows would take the engines longer than this, at the "
                                 "rate the tree passes measured.")
    status_seconds: float = Field(30.0, gt=0, description="How often a long pass logs its progress and rewrites "
                                                          "<run>/status.json.")

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

    instruction: Annotated[str, DECIDES, Field(description="The classifier's task, as the LLM reads it: "
                                                          "'classify a text's sentiment'.")]
    instruction_by_language: Annotated[dict[str, str], DECIDES, Field(
        description="The instruction in other languages, by language code.")] = {}
    labels: Annotated[list[Label], DECIDES, Field(description="The label set: what the classifier predicts.")]
    n_record_to_generate: Annotated[int | None, DECIDES, Field(
        gt=0, description="Rows in all (per language the same share); or give the four sizes below.")] = None
    n_source_type: Annotated[int | None, DECIDES, Field(gt=0, description="Source types of the tree.")] = None
    n_topic: Annotated[int | None, DECIDES, Field(gt=0, description="Topics per (label, source type).")] = None
    n_subtopic: Annotated[int | None, DECIDES, Field(gt=0, description="Subtopics per topic.")] = None
    sample_per_subtopic: Annotated[int | None, DECIDES, Field(gt=0, description="Rows per leaf.")] = None
    languages: Annotated[list[str], DECIDES, Field(description="ISO 639-1 codes; each multiplies the leaves.")] = ["en"]
    # Shared is the default: the languages' rows then come from the same leaves, so their counts
    # and metrics compare like with like, and tree passes do not grow with the languages.
    tree_languages: Annotated[Literal["shared", "per_language"], DECIDES, Field(
        description="One tree read by every language (its items in English), or a tree per language written in "
                    "it.")] = "shared"
    model: ModelSpec = Field(ModelSpec(), description="The LLM.")
    engine: EngineSpec = Field(EngineSpec(), description="The LLM's replicas: placement and engine settings.")
    sampling: Annotated[SamplingSpec, DECIDES, Field(description="How the LLM samples and what each request "
                                                                 "asks for.")] = SamplingSpec()
    output: OutputSpec = Field(OutputSpec(), description="Where the run's artifacts go.")
    language_check: LanguageCheckSpec = Field(LanguageCheckSpec(), description="The language check filter.")
    label_check: LabelCheckSpec = Field(LabelCheckSpec(), description="The label check filter.")
    dedup: DedupSpec = Field(DedupSpec(), description="Exact and near-duplicate removal.")
    diversity: DiversitySpec = Field(DiversitySpec(), description="The diversity report.")
    train: TrainSpec = Field(TrainSpec(), description="SetFit training and evaluation.")
    annotate: AnnotateSpec = Field(AnnotateSpec(), description="Label the user's own texts with the LLM.")
    multi_label: MultiLabelSpec = Field(MultiLabelSpec(), description="Rows that carry label sets.")
    rounds: RoundsSpec = Field(RoundsSpec(), description="Error-driven rounds of targeted generation.")
    run_id: str | None = Field(None, description="Names the run's folder; default: run-<digest of the spec>.")
    tree_path: Annotated[str | None, DECIDES, Field(
        description="A tree Parquet (possibly edited by hand) to generate from instead of expanding a new one.")
    ] = None

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
            given = raw.get(section, {})  # a null section is left for its own validation to name
            if isinstance(given, dict) and field not in given:
                raw[section] = {**given, field: models.MULTILINGUAL_EMBEDDER}
        return raw

    @model_validator(mode="after")
    def _engine_kind(self) -> JobSpec:
        """The model and engine settings that ``engine.kind`` reads, and none it would ignore."""
        engine = self.engine
        # By value, not by model_fields_set: a spec dumped and read back (spec.json) sets every field.
        given = [key for key in (*OPENAI_ENGINE_KEYS, *VLLM_ENGINE_KEYS)
                 if getattr(engine, key) != type(engine).model_fields[key].default]
        if engine.kind == "vllm":
            try:
                models.check_reference(self.model.name)
            except ValueError as error:  # a whole-spec check's message names its field itself
                raise ValueError(f"model.name: {error}") from None
            for key in OPENAI_ENGINE_KEYS:
                if key in given:
                    raise ValueError(f"engine.{key}: applies to engine.kind openai only; remove it or set "
                                     "engine.kind: openai")
            return self
        if engine.base_url is None:
            raise ValueError("engine.base_url: engine.kind openai sends the requests to an OpenAI-compatible API; "
                             "give its base URL, such as http://127.0.0.1:8000/v1")
        if self.model.name.startswith(models.BUILTIN_PREFIX):
            raise ValueError(f"model.name: {self.model.name} runs in-process (engine.kind vllm); with kind openai "
                             "give the name the endpoint serves (as its /v1/models lists it)")
        unused = [f"engine.{key}" for key in VLLM_ENGINE_KEYS if key in given]
        unused += [f"model.{key}" for key in ("dtype", "enforce_eager")
                   if getattr(self.model, key) != type(self.model).model_fields[key].default]
        if engine.device == "cuda":
            unused.append("engine.device")
        if unused:
            raise ValueError(f"{unused[0]}: a setting of the in-process vLLM engine, which engine.kind openai does "
                             "not run (the endpoint's server sets its own); remove it")
        if engine.max_concurrency < engine.replicas:
            raise ValueError(f"engine.max_concurrency: {engine.max_concurrency} requests in flight cannot be split "
                             f"among {engine.replicas} replicas; raise it to at least {engine.replicas} or lower "
                             "engine.replicas")
        return self

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
                raise ValueError(f"{field}: {unknown[0]!r} is not in languages {self.languages}; add it there or "
                                 "drop it")
        self.sampling.check_budget(self.languages)
        self.multi_label.check([label.id for label in self.labels], self.n_record_to_generate)
        if self.label_check.enabled and self.label_check.action == "relabel" and self.label_check.methods != ["llm"]:
            raise ValueError("label_check.action: relabel takes the llm judge's labels; set methods: [llm]")
        if self.multi_label.enabled and self.label_check.enabled and self.label_check.methods != ["llm"]:
            raise ValueError("label_check.methods: a multi-label run is checked by the llm judge only (crossfit and "
                             "similarity read one label a row); set methods: [llm]")
        single_judge = self.label_check.enabled and "llm" in self.label_check.methods and not self.multi_label.enabled
        if single_judge and len(self.labels) > MAX_OPTIONS:
            raise ValueError(f"label_check.methods: the llm judge letters its options A to Z, and there are "
                             f"{len(self.labels)} labels; use crossfit or similarity")
        if self.annotate.enabled:
            if not self.annotate.path:
                raise ValueError("annotate.path: name the texts to annotate (a Parquet, CSV or JSONL file or folder)")
            if len(self.labels) > MAX_OPTIONS and not self.multi_label.enabled:
                raise ValueError(f"annotate.enabled: a judgement letters its options A to Z, and there are "
                                 f"{len(self.labels)} labels; annotate with at most {MAX_OPTIONS}")
        if self.rounds.enabled:
            if not self.train.enabled:
                raise ValueError("rounds.enabled: rounds are driven by the trained classifier's errors; set "
                                 "train.enabled: true or rounds.enabled: false")
            if self.multi_label.enabled:
                raise ValueError("rounds.enabled: rounds measure one label a row; a multi-label run cannot use "
                                 "them (set rounds.enabled: false)")
        multi = self.multi_label
        if multi.enabled and self.train.enabled and not multi.none_share and multi.min_labels == len(self.labels):
            raise ValueError("multi_label.min_labels: every row would carry every label, so no label has negatives "
                             "to train on; lower min_labels or raise multi_label.none_share")
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
        if rows > MAX_ROWS:  # named by the size that weighs most in it
            field = "n_record_to_generate" if self.n_record_to_generate else max(SIZE_FIELDS, key=sizes.__getitem__)
            raise ValueError(f"{field}: {rows:,} rows is more than the {MAX_ROWS:,} one run plans; split the job "
                             "into several runs (each with its own run_id and sampling.seed)")
        if leaves <= MAX_TREE_LEAVES:
            return
        if self.n_record_to_generate is None:
            field = max(SIZE_FIELDS[:3], key=sizes.__getitem__)
            raise ValueError(f"{field}: the tree would hold {leaves:,} leaves, more than the {MAX_TREE_LEAVES:,} "
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
            field = "diversity.model" if self.diversity.model else "dedup.model"
            found[field] = self.diversity.model or self.dedup.model
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
        if self.annotate.enabled:  # generated rows then carry the columns annotated rows have
            found["row_origin"] = True
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


