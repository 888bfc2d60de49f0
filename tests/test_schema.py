"""The job spec's JSON Schema (``anyclf-ray schema``): what editors validate and complete with."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml
from conftest import REPO

from anyclf_ray import cli
from anyclf_ray.core import loading

SCHEMA_FILE = REPO / "schema" / "anyclf-ray.schema.json"
MODELINE = "# yaml-language-server: $schema=../schema/anyclf-ray.schema.json\n"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = loading.json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def readme_spec() -> str:
    """The spec the README's "The job spec" section shows, every section written out."""
    section = (REPO / "README.md").read_text().split("\n## The job spec\n", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_the_committed_schema_is_what_the_command_prints(capsys):
    assert cli.main(["schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text(encoding="utf-8"), (
        "the spec changed: run `anyclf-ray schema > schema/anyclf-ray.schema.json`")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_every_example_validates_and_names_the_schema(example, validator):
    text = example.read_text(encoding="utf-8")
    assert text.startswith(MODELINE)  # the YAML language server's way to find the schema
    # Read as an editor reads it: typed YAML (id: 0 is a number there, text to the loader).
    assert [error.message for error in validator.iter_errors(yaml.safe_load(text))] == []


def test_the_readme_spec_validates(validator):
    text = readme_spec()
    assert [error.message for error in validator.iter_errors(yaml.safe_load(text))] == []
    assert loading.parse(loading.read_yaml(text)).instruction  # and loads


def test_every_field_is_described():
    schema = loading.json_schema()
    models = [schema, *schema["$defs"].values()]
    undescribed = [f"{model['title']}.{name}" for model in models
                   for name, field in model["properties"].items() if not field.get("description")]
    assert undescribed == [] and all(model.get("description") for model in models)


@pytest.mark.parametrize(("change", "message"), [
    (lambda raw: raw["engine"].update(replica=2), "Additional properties are not allowed ('replica' was unexpected)"),
    (lambda raw: raw["model"].update(dtype="fp8"), "'fp8' is not one of ['auto', 'float32', 'bfloat16', 'float16']"),
    (lambda raw: raw["sampling"].update(max_tokens=0), "0 is less than or equal to the minimum of 0"),
    (lambda raw: raw.pop("labels"), "'labels' is a required property"),
    (lambda raw: raw["labels"].append({"id": 2}), "'desc' is a required property"),
])
def test_what_the_loader_refuses_by_field_the_schema_refuses(validator, change, message):
    raw = yaml.safe_load(EXAMPLES[0].read_text(encoding="utf-8"))
    change(raw)
    assert [error.message for error in validator.iter_errors(json.loads(json.dumps(raw)))] == [message]
