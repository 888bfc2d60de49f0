"""Generation throughput and end-to-end time, each side by side in one run.

    python bench/generation.py steady --model builtin:tiny-random --prompts 1024
    python bench/generation.py steady --model builtin:smollm2-135m-instruct --dtype float32 --prompts 128 \
        --loop-prompts 8 --max-text-chars 400
    python bench/generation.py end-to-end --rows 200     # SmolLM2, tree + generation, start-up included

``steady``: the same model, engine settings and prompts (real generation prompts of the plan)
on every side, retries off, all cores:

  pipeline   the engine pool behind Ray Data, on half the prompts and on all of them (one pool);
             the difference is its steady-state rate (per-pass costs cancel)
  plain      one in-process ``VLLMEngine.complete`` call: the same schema and per-request seeds
  limit      plain ``vllm.LLM.chat``, no schema, one seed for all: the physical limit here
  one-by-one one request per call, as AnyClassifier does (on a subset: it is slow)

``end-to-end``: ``anyclf-ray generate`` of an ``n_record_to_generate`` spec (the README's demo
settings), once with the engine pool (one start for the tree's three passes and the generation)
and once with an engine started for every pass, as before the pool; a throwaway start first
warms vLLM's compile cache so both sides start warm.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

import pyarrow as pa


def spec_for(args, **fields):
    from anyclf_ray.core import loading

    raw = {
        "instruction": "classify a text's sentiment",
        "labels": [{"id": "0", "desc": "negative sentiment"}, {"id": "1", "desc": "positive sentiment"}],
        "model": {"name": args.model, "dtype": args.dtype, "enforce_eager": args.enforce_eager},
        "engine": {"device": "cpu", "batch_size": args.batch_size},
        "sampling": {"max_tokens": args.max_tokens, "max_retries": 0, "examples_per_request": args.examples_per_request,
                     "max_text_chars": args.max_text_chars, "temperature": 0.6, "repetition_penalty": 1.05},
        **fields,
    }
    return loading.parse(raw)


def requests_for(spec) -> pa.Table:
    from anyclf_ray.sources import plan

    rows = plan.full_tree(spec).to_pylist()
    for row in rows:
        row.update(source_type="online product reviews", topic="customer service",
                   subtopic=f"subtopic number {row['subtopic_index']}")
    return plan.generation_requests(spec, pa.Table.from_pylist(rows, schema=plan.TREE_SCHEMA))


def prompts_of(requests: pa.Table, sampling):
    from anyclf_ray.llm import engine, prompts

    return [
        engine.Prompt(r["prompt"], prompts.items_schema(r["item_key"], r["n_items"], r["max_chars"]),
                      engine.request_seed(sampling.seed, r["request_id"], 0), r["max_tokens"])
        for r in requests.to_pylist()
    ]


def pooled(spec, requests: pa.Table) -> list[dict]:
    """The pool on the first half of the prompts, then on all of them; one start for both."""
    import ray

    from anyclf_ray import pipeline
    from anyclf_ray.llm import engine

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    with pipeline.start_engines(spec) as engines:
        for name, subset in (("half", requests.slice(0, requests.num_rows // 2)), ("all", requests)):
            started = time.perf_counter()
            answered = engines.answer_table(subset, name)
            runs.append({"tokens": engine.usage(answered).tokens_out, "s": time.perf_counter() - started,
                         "parsed": int(pa.compute.sum(answered["ok"]).as_py()), "prompts": subset.num_rows})
        threads = engines.engine.threads
    ray.shutdown()
    return runs, threads


def in_process(spec, requests: pa.Table, loop_prompts: int, threads: int) -> dict:
    """Plain (schema, per-request seeds), the limit (no schema, one seed) and one at a time."""
    from anyclf_ray.llm import engine

    placed = spec.engine.model_copy(update={"threads": threads})
    os.environ.update(engine.engine_env(placed))  # the settings a replica gets, all cores
    from vllm import SamplingParams

    llm = engine.VLLMEngine(spec.model, placed, spec.sampling)
    asked = prompts_of(requests, spec.sampling)
    figures = {}
    started = time.perf_counter()
    figures["plain_tokens"] = sum(c.tokens_out for c in llm.complete(asked))
    figures["plain_s"] = time.perf_counter() - started

    s = spec.sampling
    free = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                          repetition_penalty=s.repetition_penalty)
    started = time.perf_counter()
    outputs = llm.llm.chat([[{"role": "user", "content": p.text}] for p in asked], free, use_tqdm=False)
    figures["limit_s"] = time.perf_counter() - started
    figures["limit_tokens"] = sum(len(o.outputs[0].token_ids) for o in outputs)

    started = time.perf_counter()
    figures["loop_tokens"] = sum(llm.complete([p])[0].tokens_out for p in asked[:loop_prompts])
    figures["loop_s"] = time.perf_counter() - started
    del llm
    gc.collect()
    return figures


def steady(args) -> None:
    n_leaves = max(1, args.prompts // 2)  # 2 labels, one request per leaf
    spec = spec_for(args, n_source_type=1, n_topic=1, n_subtopic=n_leaves,
                    sample_per_subtopic=args.examples_per_request)
    requests = requests_for(spec)
    (half, full), threads = pooled(spec, requests)
    base = in_process(spec, requests, args.loop_prompts, threads)
    rate = {side: base[f"{side}_tokens"] / base[f"{side}_s"] for side in ("plain", "limit", "loop")}
    marginal = (full["tokens"] - half["tokens"]) / (full["s"] - half["s"])
    print(f"model {args.model} ({args.dtype}), {requests.num_rows} prompts, batch {args.batch_size}, "
          f"max_tokens {args.max_tokens}, {threads} thread(s)")
    for side, title in (("limit", "limit: LLM.chat, no schema, one seed"), ("plain", "plain: VLLMEngine.complete"),
                        ("loop", f"one request at a time ({args.loop_prompts:>3})")):
        print(f"  {title:<36} {rate[side]:8.1f} tok/s  ({base[f'{side}_tokens']} tokens in {base[f'{side}_s']:.1f} s)")
    for run in (half, full):
        print(f"  pool pass, {run['prompts']:>4} prompts            {run['tokens'] / run['s']:8.1f} tok/s  "
              f"({run['tokens']} tokens in {run['s']:.1f} s; {run['parsed']} parsed)")
    print(f"  pool steady state (difference)      {marginal:8.1f} tok/s")
    print(f"  pipeline / limit (no schema, one seed)  {marginal / rate['limit']:5.2f}  (goal >= 0.70)")
    print(f"  pipeline / plain (same work)            {marginal / rate['plain']:5.2f}")
    print(f"  pipeline / one at a time                {marginal / rate['loop']:5.2f}x")


def end_to_end(args) -> None:
    import ray

    from anyclf_ray import pipeline
    from anyclf_ray.core import runtime
    from anyclf_ray.llm import pool

    class EnginePerPass(pool.EnginePool):
        """Before the pool: every pass starts replicas of its own. Each start's figures are kept
        here, since every pool counts only its own."""

        starts: list = []  # EngineFigures

        def answer(self, requests, name, batch_size=None, total=None):
            self.close()
            self.start()
            EnginePerPass.starts.append(self.figures())
            return super().answer(requests, name, batch_size, total)

    def per_pass_engines(spec, factory=None):
        engine = runtime.resolve_engine(spec.engine)
        return EnginePerPass(engine, spec.sampling, pool.vllm_factory(spec.model, engine, spec.sampling))

    spec = spec_for(args, n_record_to_generate=args.rows, dedup={"enabled": False}, train={"enabled": False})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    pipeline.start_engines(spec).close()  # warm vLLM's compile cache for both sides
    print(f"warm-up start: {time.perf_counter() - started:.1f} s")
    results = {}
    for side in ("engine per pass", "engine pool"):
        folder = tempfile.mkdtemp(prefix="anyclf-bench-")
        run_spec = spec.model_copy(update={"output": spec.output.model_copy(update={"path": folder})})
        pooled_start = pipeline.start_engines
        if side == "engine per pass":
            pipeline.start_engines = per_pass_engines
        started = time.perf_counter()
        found = pipeline.run(run_spec, only="generate")["generate"]
        results[side] = (time.perf_counter() - started, found)
        pipeline.start_engines = pooled_start
        shutil.rmtree(folder)
    ray.shutdown()
    print(f"{args.model} ({args.dtype}), generate of n_record_to_generate={args.rows}, tree + generation, "
          f"start-up included:")
    for side, (seconds, found) in results.items():
        report = found.report
        starts = EnginePerPass.starts if side == "engine per pass" else [report.engine]
        count, starting = sum(s.starts for s in starts), sum(s.start_seconds for s in starts)
        print(f"  {side:16s} {seconds:7.1f} s  {report.rows.written} rows, {report.llm.tokens_out} tokens out, "
              f"{report.llm.requests} requests, engine starts {count} ({starting:.1f} s starting, "
              f"{starting / count:.1f} s each)")
    ratio = results["engine per pass"][0] / results["engine pool"][0]
    print(f"  engine pool speed-up end to end: {ratio:.2f}x  (goal >= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["steady", "end-to-end"])
    parser.add_argument("--model", default=None, help="default: tiny-random (steady), SmolLM2 (end-to-end)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--loop-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-text-chars", type=int, default=None)
    parser.add_argument("--examples-per-request", type=int, default=None)
    args = parser.parse_args()
    smol = args.mode == "end-to-end"
    defaults = {"model": "builtin:smollm2-135m-instruct" if smol else "builtin:tiny-random",
                "dtype": "float32" if smol else "auto", "max_tokens": 384 if smol else 256,
                "examples_per_request": 3 if smol else 2, "max_text_chars": None if smol else 200}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    (end_to_end if smol else steady)(args)


if __name__ == "__main__":
    main()
