"""The engine seam: an LLM that answers prompts under a JSON schema or reads option letters.

In: a table of requests (``REQUEST_FIELDS``: the prompt, the items wanted and the rules they
must meet, or the lettered options of a choice). Out: the same rows plus ``RESULT_FIELDS``:
``items`` (exactly ``n_items`` valid strings when ``ok``; for a choice, the likeliest option),
``option_logprobs`` (a choice's log-probability of each option as the answer's first token),
``ok``, ``attempts``, ``error``, ``last_output``, ``rejected`` (the reasons items were refused)
and the tokens spent.

``Engine`` is the whole interface an LLM must offer: ``complete(prompts) -> completions``.
``VLLMEngine`` runs vLLM in-process, ``endpoint.EndpointEngine`` asks an OpenAI-compatible HTTP
API; tests put a fake behind the same seam. ``answer`` is the logic
above it: each request's answer must parse as ``n_items`` items that pass ``items.py``'s rules
(a choice's, as a log-probability for every option); what is missing (cut off at its token
budget, refused items) is asked again with a new seed, up to ``max_retries`` times, then
reported as failed, never dropped. Where engines run and how many is ``pool.py``'s business.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anyclf_ray.core import models
from anyclf_ray.core.config import EngineSpec, ModelSpec, SamplingSpec
from anyclf_ray.core.results import Usage
from anyclf_ray.llm import items as valid
from anyclf_ray.llm import prompts

# A request: its prompt, and the rules its ``n_items`` items must meet (``items.py``):
# ``min_words``, ``echoes`` (strings an item must not merely repeat) and ``choices`` (the only
# values allowed, for answers that pick one; null for free text); or, for a choice read from
# log-probabilities (``judgement.py``), its ``options``.
REQUEST_FIELDS = {
    "request_id": pa.string(),
    "prompt": pa.string(),
    "item_key": pa.string(),
    "n_items": pa.int32(),
    "max_chars": pa.int32(),
    "max_tokens": pa.int32(),
    "min_words": pa.int32(),
    "echoes": pa.list_(pa.string()),
    "choices": pa.list_(pa.string()),
    # Overrides sampling.temperature (0 for a judge's answer); null keeps it.
    "temperature": pa.float32(),
    # A choice instead of items: the option letters whose log-probabilities as the answer's first
    # token are wanted (no text is generated); null for items.
    "options": pa.list_(pa.string()),
    # The items name tree nodes: placeholders, identifiers, paths and URLs are refused.
    "names": pa.bool_(),
}
REQUEST_COLUMNS = list(REQUEST_FIELDS)
RESULT_FIELDS = {
    "items": pa.list_(pa.string()),
    # A choice's log-probability of each option (natural log, unnormalised); null otherwise.
    "option_logprobs": pa.list_(pa.float64()),
    "ok": pa.bool_(),
    "attempts": pa.int32(),
    "error": pa.string(),
    "last_output": pa.string(),
    # The reason (``items.REASONS``) of every item refused on the way, kept or not in the end.
    "rejected": pa.list_(pa.string()),
    "tokens_in": pa.int64(),
    "tokens_out": pa.int64(),
}
# Failed answers are kept for the failures artifact, cut to this length.
KEPT_OUTPUT_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One user message to answer as JSON matching ``schema``, within ``max_tokens``; or, with
    ``options``, to read the log-probability of each option string as the answer's first token
    (no schema, nothing sampled past that token)."""

    text: str
    schema: dict
    seed: int
    max_tokens: int
    temperature: float | None = None  # None: the engine's sampling.temperature
    options: tuple[str, ...] = ()


# A completion's finish reason when its prompt and answer budget do not fit the model's context:
# nothing was asked, and asking again cannot help.
PROMPT_TOO_LONG = "prompt_too_long"
# A completion's finish reason when an endpoint gave no answer (``endpoint.py``): it refused the
# request, or stayed unreachable past its retries; the text says which. Final too: asking again at
# once cannot help (``--retry-failures`` asks later).
NO_ANSWER = "no_answer"


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    # "stop"; "length" when cut off at max_tokens; PROMPT_TOO_LONG (tokens_in: the prompt's, 0 if
    # unknown); NO_ANSWER (text: why)
    finish_reason: str
    tokens_in: int
    tokens_out: int
    # With ``Prompt.options``: each option's log-probability as the first answer token, in order.
    option_logprobs: tuple[float, ...] | None = None


class Engine(Protocol):
    def complete(self, prompts: list[Prompt]) -> list[Completion]:
        """One completion per prompt, in order."""


def request_seed(base_seed: int, request_id: str, attempt: int) -> int:
    """A per-request, per-attempt seed: reproducible, and different on every retry."""
    digest = hashlib.blake2b(f"{base_seed}:{request_id}:{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def requests_table(requests: list[dict], fields: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Request dicts as a table with ``REQUEST_FIELDS`` typed (rules left out default to none).

    ``fields``: what a pass keeps beside each request (its place in the tree...), typed; given,
    the table has exactly these columns, even with no requests.
    """
    defaults = {"min_words": 0, "echoes": [], "choices": None, "temperature": None, "options": None, "names": False}
    if fields is not None:
        schema = pa.schema({**REQUEST_FIELDS, **fields})
        return pa.Table.from_pylist([{**defaults, **r} for r in requests], schema=schema)
    table = pa.Table.from_pylist(requests)
    for name, dtype in REQUEST_FIELDS.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, table[name].cast(dtype))
        else:
            table = table.append_column(name, pa.array([defaults[name]] * table.num_rows, dtype))
    return table


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at char {error.pos})") from None


def parse_items(text: str, key: str, n_items: int) -> list[str]:
    """The ``n_items`` strings of a JSON answer, or ValueError saying what is wrong with it."""
    value = _json(text)
    if not isinstance(value, list):
        raise ValueError("not a JSON array")
    if len(value) != n_items:
        raise ValueError(f"{len(value)} items, {n_items} asked for")
    found = []
    for item in value:
        text_value = item.get(key) if isinstance(item, dict) else None
        if not isinstance(text_value, str) or not any(ch.isalnum() for ch in text_value):
            raise ValueError(f"an item has no text under {key!r}")
        found.append(text_value.strip())
    return found


def parse_options(completion: Completion, options: list[str]) -> list[float]:
    """A choice's log-probability per option, or ValueError when the engine gave none."""
    found = completion.option_logprobs
    if found is None or len(found) != len(options):
        raise ValueError(f"no log-probability for each of the options {options}")
    if not max(found) > float("-inf"):
        raise ValueError("every option has probability 0")
    return list(found)


def _schema(request: dict, sampling: SamplingSpec) -> dict:
    if request["options"]:
        return {}
    pattern = valid.text_pattern() if sampling.valid_items else None
    return prompts.items_schema(request["item_key"], request["n_items"], request["max_chars"], pattern,
                                request["choices"])


def _take(request: dict, found: list[str], kept: list[str], sampling: SamplingSpec) -> list[str]:
    """Add the valid items of ``found`` to ``kept`` (up to ``n_items``); the refusals' reasons."""
    refused = []
    seen = {valid.normalise(item) for item in kept}
    for item in found:
        if len(kept) == request["n_items"]:
            break
        if request["choices"]:
            reason = None if item in request["choices"] else "not_a_choice"
        elif sampling.valid_items:
            reason = valid.problem(item, request["min_words"], request["echoes"], request["prompt"], request["names"])
            reason = reason or ("repeated" if valid.normalise(item) in seen else None)
        else:
            reason = None
        if reason:
            refused.append(reason)
        else:
            kept.append(item)
            seen.add(valid.normalise(item))
    return refused


@dataclasses.dataclass
class Answer:
    """One request's answer so far (``RESULT_FIELDS``): the valid items kept (a choice's
    log-probabilities), the attempts, the last error and output, the reasons items were
    refused, the tokens spent."""

    items: list[str] = dataclasses.field(default_factory=list)
    option_logprobs: list[float] | None = None
    ok: bool = False
    attempts: int = 0
    error: str | None = None
    last_output: str | None = None
    rejected: list[str] = dataclasses.field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0


def answer(engine: Engine, requests: pa.Table, sampling: SamplingSpec) -> pa.Table:
    """``requests`` with their answers (``RESULT_FIELDS``).

    An attempt that does not parse is retried whole; one with refused items is retried for the
    items still missing (the valid ones are kept), each attempt with a new seed.
    """
    rows = requests.select(REQUEST_COLUMNS).to_pylist()
    results = [Answer() for _ in rows]
    pending = list(range(len(rows)))
    for attempt in range(sampling.max_retries + 1):
        if not pending:
            break
        asked = [
            Prompt(
                text=rows[i]["prompt"],
                schema=_schema(rows[i], sampling),
                seed=request_seed(sampling.seed, rows[i]["request_id"], attempt),
                max_tokens=rows[i]["max_tokens"],
                temperature=rows[i]["temperature"],
                options=tuple(rows[i]["options"] or ()),
            )
            for i in pending
        ]
        still_pending = []
        for i, completion in zip(pending, engine.complete(asked)):
            request, result = rows[i], results[i]
            result.attempts = attempt + 1
            if completion.finish_reason == PROMPT_TOO_LONG:  # never asked, and final: it never fits
                prompt = f"the prompt's {completion.tokens_in} tokens" if completion.tokens_in else "the prompt"
                result.error = (f"{prompt} and its answer budget of {request['max_tokens']} do not fit the "
                                "model's context (model.max_model_len)")
                continue
            if completion.finish_reason == NO_ANSWER:  # final: the engine already asked again
                result.error = completion.text
                continue
            result.tokens_in += completion.tokens_in
            result.tokens_out += completion.tokens_out
            try:
                if request["options"]:
                    result.option_logprobs = parse_options(completion, request["options"])
                    found = [request["options"][int(np.argmax(result.option_logprobs))]]
                else:
                    found = parse_items(completion.text, request["item_key"], request["n_items"])
            except ValueError as error:
                cut = " (cut off at max_tokens)" if completion.finish_reason == "length" else ""
                result.error, result.last_output = f"{error}{cut}", completion.text[:KEPT_OUTPUT_CHARS]
                still_pending.append(i)
                continue
            refused = _take(request, found, result.items, sampling)
            result.rejected += refused
            if len(result.items) == request["n_items"]:
                result.ok, result.error, result.last_output = True, None, None
            else:
                missing = request["n_items"] - len(result.items)
                result.error = f"{missing} item(s) still missing; refused: {', '.join(refused)}"
                result.last_output = completion.text[:KEPT_OUTPUT_CHARS]
                still_pending.append(i)
        pending = still_pending
    for name, dtype in RESULT_FIELDS.items():
        values = [getattr(result, name) if name not in ("items", "option_logprobs") or result.ok else None
                  for result in results]
        requests = requests.append_column(name, pa.array(values, type=dtype))
    return requests


def usage(results: pa.Table) -> Usage:
    """Requests, failures, tokens and refused items of answered requests."""
    refused = collections.Counter(pc.list_flatten(results["rejected"]).to_pylist())
    return Usage(requests=results.num_rows, failed=pc.sum(pc.invert(results["ok"]).cast(pa.int64())).as_py() or 0,
                 tokens_in=pc.sum(results["tokens_in"]).as_py() or 0,
                 tokens_out=pc.sum(results["tokens_out"]).as_py() or 0,
                 refused={reason: refused[reason] for reason in valid.REASONS})


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user message in ``tokenizer``'s chat template, ready to answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def option_ids(tokenizer, options: tuple[str, ...]) -> list[int]:
    """The token each option's answer starts with in ``tokenizer``; ValueError when two options
    start with the same one (their probabilities could not be told apart)."""
    found = [tokenizer.encode(option, add_special_tokens=False)[0] for option in options]
    if len(set(found)) != len(found):
        raise ValueError(f"the options {list(options)} do not start with distinct tokens")
    return found


def engine_env(engine: EngineSpec) -> dict[str, str]:
    """Environment for an engine's process: the CPU build's settings for vLLM on CPU, plus the user's."""
    env = {}
    if engine.kind == "vllm" and engine.device == "cpu":
        env = {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib),
            # In-process engine: starts in seconds instead of spawning a second process.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # Several replicas may share a node's cores; pinning threads would make them fight.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            # Ray sets OMP_NUM_THREADS to the CPUs an actor reserves (1); the engine's own count wins.
            "OMP_NUM_THREADS": str(engine.threads or max(1, int(engine.cpus_per_replica))),
            # The CPU build cannot load its own AOT-compiled artifacts ("'function' object has no
            # attribute 'finalize_loading'") and recompiles on every start; the plain compile
            # cache works, so a warm engine starts in seconds.
            "VLLM_USE_AOT_COMPILE": "0",
        }
    # Ray workers fork; tokenizers' thread pool must not be live across that.
    return {"TOKENIZERS_PARALLELISM": "false", **env, **engine.env}


class VLLMEngine:
    """``Engine`` on ``vllm.LLM``: batched chat with schema-constrained JSON and per-request seeds."""

    def __init__(self, model: ModelSpec, engine: EngineSpec, sampling: SamplingSpec):
        from vllm import LLM

        self.sampling = sampling
        self.max_model_len = model.max_model_len
        self.llm = LLM(
            model=models.resolve(model.name),
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            enforce_eager=model.enforce_eager,
            tensor_parallel_size=engine.tensor_parallel_size,
            distributed_executor_backend="ray" if engine.tensor_parallel_size > 1 else None,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            enable_chunked_prefill=engine.chunked_prefill,
            # Without chunking, a step's token budget must hold the longest prompt whole.
            max_num_batched_tokens=None if engine.chunked_prefill else max(8192, model.max_model_len),
            seed=sampling.seed,
            # guidance keeps raw control characters out of strings and, with whitespace off,
            # spends no tokens between JSON tokens.
            structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True},
        )

    def _params(self, prompt: Prompt):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if prompt.options:  # one greedy token; the options' raw log-probabilities are read at it
            return SamplingParams(max_tokens=1, temperature=0.0, seed=prompt.seed,
                                  logprob_token_ids=option_ids(self.llm.get_tokenizer(), prompt.options))
        return SamplingParams(
            max_tokens=prompt.max_tokens,
            temperature=self.sampling.temperature if prompt.temperature is None else prompt.temperature,
            top_p=self.sampling.top_p,
            repetition_penalty=self.sampling.repetition_penalty,
            seed=prompt.seed,
            structured_outputs=StructuredOutputsParams(json=prompt.schema),
        )

    def complete(self, prompts: list[Prompt]) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        # Tokenised here, in the chat template vLLM would apply, so that a prompt too long for the
        # context fails alone (vLLM refuses the whole call) and is not tokenised twice.
        tokenizer = self.llm.get_tokenizer()
        ids = [chat_ids(tokenizer, prompt.text) for prompt in prompts]
        fits = [len(found) + prompt.max_tokens <= self.max_model_len for found, prompt in zip(ids, prompts)]
        asked = [i for i, ok in enumerate(fits) if ok]
        params = [self._params(prompts[i]) for i in asked]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in asked], params, use_tqdm=False)
        found = [Completion("", PROMPT_TOO_LONG, len(prompt_ids), 0) for prompt_ids in ids]
        for i, output, param in zip(asked, outputs, params):
            sample = output.outputs[0]
            logprobs = None
            if param.logprob_token_ids:  # the first (only) position's log-probabilities, by token id
                first = sample.logprobs[0] if sample.logprobs else {}
                logprobs = tuple(first[t].logprob if t in first else float("-inf") for t in param.logprob_token_ids)
            found[i] = Completion(
                text=sample.text,
                finish_reason=sample.finish_reason or "stop",
                tokens_in=len(output.prompt_token_ids or ()),
                tokens_out=len(sample.token_ids),
                option_logprobs=logprobs,
            )
        return found
