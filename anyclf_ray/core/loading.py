"""Loading a job spec: YAML as written, ``--set`` overrides, and one-line errors.

In: a YAML file plus ``--set key=value`` overrides. Out: a validated ``config.JobSpec``, or a
``ConfigError`` whose one-line message names the field and the fix, before any cluster time.
``json_schema`` is the spec file's JSON Schema, for editors (``anyclf-ray schema``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from anyclf_ray.core.config import ConfigError, JobSpec


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if node.get(part) is None:  # absent, or YAML's bare "rounds:"
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


class AsWritten(yaml.SafeLoader):
    """YAML whose plain scalars stay the text the user wrote; only ``null``, ``~`` and empty
    values are read as null.

    YAML 1.1, which PyYAML follows, reads ``no`` as false, ``010`` as 8 and ``0x1F`` as 31, so a
    label id or a ``label_map`` key written that way would no longer match the labels in the
    user's files. Numbers and booleans of typed fields are read from that text by the spec's
    models (``"2"`` as 2, ``"true"`` or ``"yes"`` as true), so they lose nothing.
    """


AsWritten.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class AsWrittenSchema(GenerateJsonSchema):
    """JSON Schema of the spec as an editor reads the YAML (YAML 1.2 types): a text field takes
    any scalar, since ``AsWritten`` reads ``id: 0`` or ``run_id: 2024`` as the text written."""

    def str_schema(self, schema: core_schema.StringSchema) -> JsonSchemaValue:
        return {**super().str_schema(schema), "type": ["string", "number", "boolean"]}


def json_schema() -> dict:
    """The job spec file's JSON Schema, every field described, in draft 7 (what the YAML
    language server validates with). It checks names, types and bounds; the rules between fields
    are checked on load."""
    found = JobSpec.model_json_schema(schema_generator=AsWrittenSchema)
    return {"$schema": "http://json-schema.org/draft-07/schema#", **found, "title": "anyclf-ray job spec"}


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=AsWritten)  # noqa: S506 (a SafeLoader)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; values are read as YAML (lists, mappings), as written."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. engine.replicas=2")
        try:
            value = read_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: not valid YAML ({error.problem})") from None
        _set_dotted(raw, key.strip(), value)
    return raw


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    spec: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = spec.model_fields[part].annotation
        # list[Label] and EvalSetSpec | None: the model class among the type's arguments.
        spec = next(a for a in getattr(annotation, "__args__", ()) + (annotation,) if hasattr(a, "model_fields"))
    return list(spec.model_fields)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc, message = first["loc"], first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "remove it"
        return f"{_location(loc)}: unknown key; {fix}"
    if first["type"] == "missing":
        return f"{_location(loc)}: is required"
    if first["type"] == "model_type":  # a section that is not a mapping (YAML's bare "rounds:" is null)
        if first["input"] is None:
            return f"{_location(loc)}: is empty; give its fields under it, or {{}} for the defaults, or remove it"
        return f"{_location(loc)}: must be a mapping of its fields (key: value), not {first['input']!r}"
    if first["type"] == "int_parsing" and isinstance(first["input"], str):
        digits = _in_digits(first["input"])
        return f"{_location(loc)}: {first['input']!r} is not a whole number; write it in digits{digits}"
    # Whole-spec checks have no location; their messages start with the field they blame.
    return f"{_location(loc)}: {message}" if loc else message


def _in_digits(text: str) -> str:
    """``text`` (such as ``1e6``) as digits, for the fix: ", such as 1000000", or nothing."""
    try:
        value = float(text)
    except ValueError:
        return ""
    return f", such as {int(value)}" if value.is_integer() and abs(value) < 1e30 else ""


def parse(raw: dict) -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None


def load(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job spec file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where} ({getattr(error, 'problem', None) or error})"
                          ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; save the spec as UTF-8 YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: must be a mapping of fields, such as instruction: ...")
    return parse(apply_overrides(raw, list(overrides)))
