"""Scale benchmark: a whole run at growing row counts, with the tiny model.

    python bench/scale.py                          # 2,000 and 10,000 rows
    python bench/scale.py --rows 10000 100000      # the scaling line to 100k (about 40 minutes on 2 cores)
    python bench/scale.py --rows 100000 --keep runs/scale   # keep the runs; run again to resume

Each size is a fresh process running ``pipeline.run`` (tree, generation, dedup, then training on
a sample of ``--train-rows`` rows with the held-out fifth of all rows evaluated; the language
and label checks off: this measures scale, and the tiny model's text is random) on an embedded
Ray with one engine replica on all cores. It prints per size: seconds per stage, rows written
per second, tokens out per second per replica, and the driver's peak RSS. A kept run resumed
skips its finished stages; their seconds are those of the run that did them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from anyclf_ray import pipeline
from anyclf_ray.core import config, loading
rows, folder, train_rows = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
spec = loading.parse({
    "instruction": "classify a text's sentiment",
    "labels": [{"id": "neg", "desc": "negative sentiment"}, {"id": "pos", "desc": "positive sentiment"}],
    # 2 labels x 5 x 5 x 5 leaves (62 tree requests), rows / 250 examples a leaf.
    "n_source_type": 5, "n_topic": 5, "n_subtopic": 5, "sample_per_subtopic": rows // 250, "languages": ["en"],
    "run_id": f"scale-{rows}", "model": {"name": "builtin:tiny-random", "dtype": "float32", "enforce_eager": True},
    # Short items and texts, as the tests ask of the random model: its JSON stays within max_tokens.
    "sampling": {"max_tokens": 256, "examples_per_request": 5, "max_text_chars": 60, "max_item_chars": 30},
    "output": {"path": folder},
    "language_check": {"enabled": False}, "label_check": {"enabled": False},
    "dedup": {"model": "builtin:all-minilm-l6-v2"}, "diversity": {"enabled": False},
    "train": {"base_model": "builtin:all-minilm-l6-v2", "max_rows": train_rows, "num_iterations": 1,
              "num_workers": 2, "max_seq_length": 64},
})
started = time.perf_counter()
found = pipeline.run(spec)
wall = time.perf_counter() - started
stages = {name: found[name].model_dump(mode="json") for name in ("generate", "dedup", "train")}
rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": rows, "wall": wall, **stages, "rss_mib": rss_mib}))
"""


def measure(rows: int, keep: str | None, train_rows: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", CHILD, str(rows), keep or folder, str(train_rows)],
                              capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000, 10_000])
    parser.add_argument("--train-rows", type=int, default=5_000, help="train.max_rows: the training sample")
    parser.add_argument("--keep", help="write the runs under this folder (run ids scale-ROWS) and keep them")
    args = parser.parse_args()
    print(f"{'rows':>8} {'written':>8} {'tree s':>7} {'generate s':>10} {'dedup s':>8} {'train s':>8} "
          f"{'trained on':>10} {'held out':>8} {'rows/s':>7} {'tok/s/replica':>13} {'driver RSS':>10}")
    for rows in args.rows:
        found = measure(rows, args.keep, args.train_rows)
        generated, trained = found["generate"], found["train"]
        timings, replicas = generated["timings_s"], generated["report"]["engine"]["replicas"]
        written, data = generated["report"]["rows"]["written"], trained["report"]["data"]
        print(f"{rows:>8,} {written:>8,} {timings['tree']:>7.1f} {timings['generate']:>10.1f} "
              f"{found['dedup']['timings_s']['total']:>8.1f} {trained['timings_s']['total']:>8.1f} "
              f"{data['train_rows']:>10,} {data['held_out_rows']:>8,} {written / timings['generate']:>7.1f} "
              f"{generated['report']['llm']['tokens_out'] / timings['generate'] / replicas:>13.0f} "
              f"{found['rss_mib']:>6.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
