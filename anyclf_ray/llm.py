"""The LLM stage: replicated vLLM engines that answer prompts with schema-valid JSON arrays.

In: a Ray Dataset of requests with columns ``request_id``, ``prompt``, ``item_key``,
``n_items``, ``max_chars``. Out: the same rows plus ``items`` (exactly ``n_items`` strings when
``ok``), ``ok``, ``attempts``, ``error``, ``last_output``, ``tokens_in`` and ``tokens_out``.

Each replica is a Ray actor holding one ``vllm.LLM`` and is fed batches by ``map_batches``. A
request's answer is constrained to a JSON schema asking for exactly ``n_items`` items; an answer
that still does not parse (cut off at ``max_tokens``, blank items) is retried inside the same
actor with a new seed, up to ``max_retries`` times, then reported as failed, never dropped.
Tensor parallelism, GPUs and the CPU build are settings of ``EngineSpec``, not other code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray import models, prompts, runtime
from anyclf_ray.config import EngineSpec, ModelSpec

RESULT_FIELDS = {
    "items": pa.list_(pa.string()),
    "ok": pa.bool_(),
    "attempts": pa.int32(),
    "error": pa.string(),
    "last_output": pa.string(),
    "tokens_in": pa.int64(),
    "tokens_out": pa.int64(),
}
# Failed answers are kept for the failures artifact, cut to this length.
KEPT_OUTPUT_CHARS = 2000


def request_seed(base_seed: int, request_id: str, attempt: int) -> int:
    """A per-request, per-attempt seed: reproducible, and different on every retry."""
    digest = hashlib.blake2b(f"{base_seed}:{request_id}:{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def parse_items(text: str, key: str, n_items: int) -> list[str]:
    """The ``n_items`` strings of a JSON answer, or ValueError saying what is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at char {error.pos})") from None
    if not isinstance(value, list):
        raise ValueError("not a JSON array")
    if len(value) != n_items:
        raise ValueError(f"{len(value)} items, {n_items} asked for")
    items = []
    for item in value:
        text_value = item.get(key) if isinstance(item, dict) else None
        if not isinstance(text_value, str) or not any(ch.isalnum() for ch in text_value):
            raise ValueError(f"an item has no text under {key!r}")
        items.append(text_value.strip())
    return items


def engine_env(engine: EngineSpec) -> dict[str, str]:
    """Environment for an engine actor: the CPU build's settings when on CPU, plus the user's."""
    env = {}
    if engine.device == "cpu":
        env = {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib),
            # In-process engine: starts in seconds instead of spawning a second process.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # Several replicas share the cores; pinning threads would make them fight.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(max(1, int(engine.cpus_per_replica))),
            # The CPU build cannot load its own AOT-compiled artifacts ("'function' object has no
            # attribute 'finalize_loading'") and recompiles on every start; the plain compile
            # cache works, so a warm engine starts in seconds.
            "VLLM_USE_AOT_COMPILE": "0",
        }
    # Ray workers fork; tokenizers' thread pool must not be live across that.
    return {"TOKENIZERS_PARALLELISM": "false", **env, **engine.env}


def replica_options(engine: EngineSpec) -> dict[str, Any]:
    """``map_batches`` arguments that place ``engine.replicas`` engine actors on the cluster."""
    options = {**runtime.actor_options(engine), "runtime_env": {"env_vars": engine_env(engine)}}
    if engine.device == "cuda" and engine.tensor_parallel_size > 1:
        # vLLM starts one Ray worker per GPU shard itself; the actor reserves a placement group
        # of tensor_parallel_size GPU bundles and lets vLLM's workers capture it.
        tp = engine.tensor_parallel_size

        def placement() -> dict[str, Any]:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK")
            return {
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group, placement_group_capture_child_tasks=True
                )
            }

        options.update(num_cpus=0, num_gpus=0, ray_remote_args_fn=placement)
    return options


def conversation(request: dict) -> list[dict]:
    return [{"role": "user", "content": request["prompt"]}]


class StructuredGenerator:
    """A vLLM engine as a Ray Data callable class (one instance per replica)."""

    def __init__(self, model: ModelSpec, engine: EngineSpec):
        from vllm import LLM

        self.engine = engine
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
            seed=engine.seed,
            # guidance keeps raw control characters out of strings and, with whitespace off,
            # spends no tokens between JSON tokens.
            structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True},
        )

    def sampling_params(self, request: dict, attempt: int):
        """Sampling for one request: its own seed per attempt, its answer held to the schema."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        schema = prompts.items_schema(request["item_key"], request["n_items"], request["max_chars"])
        return SamplingParams(
            max_tokens=self.engine.max_tokens,
            temperature=self.engine.temperature,
            top_p=self.engine.top_p,
            repetition_penalty=self.engine.repetition_penalty,
            seed=request_seed(self.engine.seed, request["request_id"], attempt),
            structured_outputs=StructuredOutputsParams(json=schema),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["request_id", "prompt", "item_key", "n_items", "max_chars"]).to_pylist()
        results = [
            {"items": None, "ok": False, "attempts": 0, "error": None, "last_output": None,
             "tokens_in": 0, "tokens_out": 0}
            for _ in rows
        ]
        pending = list(range(len(rows)))
        for attempt in range(self.engine.max_retries + 1):
            if not pending:
                break
            outputs = self.llm.chat(
                [conversation(rows[i]) for i in pending],
                [self.sampling_params(rows[i], attempt) for i in pending],
                use_tqdm=False,
            )
            still_pending = []
            for i, output in zip(pending, outputs):
                completion = output.outputs[0]
                result = results[i]
                result["attempts"] = attempt + 1
                result["tokens_in"] += len(output.prompt_token_ids)
                result["tokens_out"] += len(completion.token_ids)
                try:
                    result["items"] = parse_items(completion.text, rows[i]["item_key"], rows[i]["n_items"])
                    result.update(ok=True, error=None, last_output=None)
                except ValueError as error:
                    cut = " (cut off at max_tokens)" if completion.finish_reason == "length" else ""
                    result.update(error=f"{error}{cut}", last_output=completion.text[:KEPT_OUTPUT_CHARS])
                    still_pending.append(i)
            pending = still_pending
        for name, dtype in RESULT_FIELDS.items():
            batch = batch.append_column(name, pa.array([r[name] for r in results], type=dtype))
        return batch


def requests_dataset(requests: list[dict], engine: EngineSpec) -> ray.data.Dataset:
    return runtime.blocks_dataset(pa.Table.from_pylist(requests), engine.batch_size, engine.replicas)


def generate(requests: ray.data.Dataset, model: ModelSpec, engine: EngineSpec) -> ray.data.Dataset:
    """Answer every request in ``requests`` on ``engine.replicas`` vLLM replicas (lazy)."""
    return requests.map_batches(
        StructuredGenerator,
        fn_constructor_kwargs={"model": model, "engine": engine},
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        **replica_options(engine),
    )


USAGE_KEYS = ("requests", "failed", "tokens_in", "tokens_out")


def usage(results: pa.Table) -> dict[str, int]:
    """Requests, failures and tokens (``USAGE_KEYS``) of a table of LLM results."""
    return {
        "requests": results.num_rows,
        "failed": pc.sum(pc.invert(results["ok"]).cast(pa.int64())).as_py() or 0,
        "tokens_in": pc.sum(results["tokens_in"]).as_py() or 0,
        "tokens_out": pc.sum(results["tokens_out"]).as_py() or 0,
    }
