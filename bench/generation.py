"""Generation throughput: the Ray Data pipeline against plain vLLM, side by side in one run.

    python bench/generation.py --model builtin:tiny-random --prompts 512
    python bench/generation.py --model builtin:smollm2-135m-instruct --dtype float32 --prompts 96

Same model, engine settings, prompts (real generation prompts of the plan) and per-request
sampling on every side; retries are off so every side does the same work:

  pipeline   Ray Data + one vLLM replica actor (llm.generate), run on half the prompts and on
             all of them; the difference is its steady-state rate (fixed start-up costs cancel)
  plain      one vllm.LLM.chat call over all prompts, engine already loaded
  one-by-one one LLM.chat call per prompt, as AnyClassifier does (on a subset: it is slow)

Prints tokens/s of each and the ratios the spine issue asks for.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import pyarrow as pa


def spec_for(args):
    from anyclf_ray import config

    n_leaves = max(1, args.prompts // 2)  # 2 labels, one request per leaf
    return config.parse(
        {
            "instruction": "classify a text's sentiment",
            "labels": [{"id": "0", "desc": "negative sentiment"}, {"id": "1", "desc": "positive sentiment"}],
            "n_source_type": 1,
            "n_topic": 1,
            "n_subtopic": n_leaves,
            "sample_per_subtopic": args.examples_per_request,
            "model": {"name": args.model, "dtype": args.dtype, "enforce_eager": args.enforce_eager},
            "engine": {
                "device": "cpu",
                "cpus_per_replica": args.cpus,
                "batch_size": args.batch_size,
                "max_tokens": args.max_tokens,
                "max_retries": 0,
                "examples_per_request": args.examples_per_request,
                "max_text_chars": args.max_text_chars,
            },
        }
    )


def requests_for(spec) -> list[dict]:
    from anyclf_ray import plan

    rows = plan.full_tree(spec).to_pylist()
    for row in rows:
        row.update(
            source_type="online product reviews",
            topic="customer service",
            subtopic=f"subtopic number {row['subtopic_index']}",
        )
    return plan.generation_requests(spec, pa.Table.from_pylist(rows, schema=plan.TREE_SCHEMA))


def tokens_of(outputs) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def plain_and_one_by_one(spec, requests, loop_prompts: int) -> dict:
    from anyclf_ray import llm

    os.environ.update(llm.engine_env(spec.engine))  # the same CPU settings the actor gets
    # A throwaway start fills the compile cache, so both sides below start warm.
    llm.StructuredGenerator(spec.model, spec.engine)
    gc.collect()
    started = time.perf_counter()
    generator = llm.StructuredGenerator(spec.model, spec.engine)
    load = time.perf_counter() - started

    started = time.perf_counter()
    outputs = generator.llm.chat(
        [llm.conversation(r) for r in requests], [generator.sampling_params(r, 0) for r in requests], use_tqdm=False
    )
    plain_seconds = time.perf_counter() - started
    plain_tokens = tokens_of(outputs)

    started = time.perf_counter()
    loop_tokens = 0
    for request in requests[:loop_prompts]:
        loop_tokens += tokens_of(
            generator.llm.chat([llm.conversation(request)], [generator.sampling_params(request, 0)], use_tqdm=False)
        )
    loop_seconds = time.perf_counter() - started
    del generator, outputs
    gc.collect()
    return {
        "load_s": load,
        "plain_tokens": plain_tokens,
        "plain_s": plain_seconds,
        "loop_tokens": loop_tokens,
        "loop_s": loop_seconds,
    }


def pipeline(spec, requests) -> list[dict]:
    """Run the pipeline on the first half of the prompts, then on all of them, in one Ray session.

    The difference between the two runs cancels every fixed cost (Ray, worker start, imports,
    engine load), so tokens/time of the difference is the pipeline's steady-state rate.
    """
    import ray

    from anyclf_ray import llm

    ray.init(num_cpus=spec.engine.cpus_per_replica, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    for subset in (requests[: len(requests) // 2], requests):
        started = time.perf_counter()
        dataset = llm.generate(llm.requests_dataset(subset, spec.engine), spec.model, spec.engine)
        results = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
        runs.append({"tokens": llm.usage(results)["tokens_out"], "s": time.perf_counter() - started,
                     "parsed": int(pa.compute.sum(results["ok"]).as_py()), "prompts": len(subset)})
    ray.shutdown()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-random")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--loop-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-text-chars", type=int, default=200)
    parser.add_argument("--examples-per-request", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    args = parser.parse_args()

    spec = spec_for(args)
    requests = requests_for(spec)
    base = plain_and_one_by_one(spec, requests, args.loop_prompts)
    piped = pipeline(spec, requests)

    half, full = piped
    plain_tps = base["plain_tokens"] / base["plain_s"]
    loop_tps = base["loop_tokens"] / base["loop_s"]
    marginal_tps = (full["tokens"] - half["tokens"]) / (full["s"] - half["s"])
    print(f"model {args.model} ({args.dtype}), {len(requests)} prompts, batch {args.batch_size}, "
          f"max_tokens {args.max_tokens}, {args.cpus:g} CPU(s)")
    print(f"  plain LLM.chat, all prompts       {plain_tps:8.1f} tok/s  ({base['plain_tokens']} tokens in "
          f"{base['plain_s']:.1f} s; engine load {base['load_s']:.1f} s not counted)")
    print(f"  one request at a time ({args.loop_prompts:>3})      {loop_tps:8.1f} tok/s  "
          f"({base['loop_tokens']} tokens in {base['loop_s']:.1f} s)")
    for run in piped:
        print(f"  pipeline end to end, {run['prompts']:>4} prompts {run['tokens'] / run['s']:8.1f} tok/s  "
              f"({run['tokens']} tokens in {run['s']:.1f} s incl. worker start and engine load; "
              f"{run['parsed']} parsed)")
    print(f"  pipeline steady state (difference) {marginal_tps:7.1f} tok/s")
    print(f"  (a) pipeline / plain vLLM, steady state   {marginal_tps / plain_tps:5.2f}   (goal >= 0.90)")
    print(f"  (b) pipeline / one at a time              {marginal_tps / loop_tps:5.2f}x  (goal >= 5x)")


if __name__ == "__main__":
    main()
