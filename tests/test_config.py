"""The job spec: every bad input fails with one line naming the field and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, tiny_raw, write_spec

from anyclf_ray.core import config, loading
from anyclf_ray.core.loading import ConfigError


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        loading.parse(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def without(raw: dict, *keys: str) -> dict:
    return {k: v for k, v in raw.items() if k not in keys}


@pytest.fixture
def raw(tmp_path) -> dict:
    return tiny_raw(tmp_path, "r1")


def test_valid_spec_parses_with_defaults(raw):
    spec = loading.parse(raw)
    assert spec.labels[0].id == "neg"
    assert spec.sizes() == {"n_source_type": 2, "n_topic": 2, "n_subtopic": 2, "sample_per_subtopic": 3}
    assert spec.engine.replicas == 1 and spec.engine.device == "auto"
    assert spec.output.rows_per_shard == 24


def test_integer_label_ids_become_text(raw):
    raw["labels"] = [{"id": 0, "desc": "negative"}, {"id": 1, "desc": "positive"}]
    assert [label.id for label in loading.parse(raw).labels] == ["0", "1"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: without(r, "instruction"), "instruction: is required"),
        (lambda r: {**r, "instruction": "  "}, "instruction: must not be blank"),
        (lambda r: {**r, "labels": []}, "labels: needs at least one label"),
        (lambda r: without(r, "labels"), "labels: is required"),
        (lambda r: {**r, "labels": [{"id": "a", "desc": "x"}, {"id": "a", "desc": "y"}]},
         "labels: duplicate label id 'a'"),
        (lambda r: {**r, "labels": [{"id": "a", "desc": "x"}, {"id": "b", "desc": "x"}]},
         "labels: duplicate label desc 'x'"),
        (lambda r: {**r, "labels": [{"id": "a"}]}, "labels[0].desc: is required"),
        (lambda r: {**r, "n_topic": 0}, "n_topic: Input should be greater than 0"),
        (lambda r: {**r, "sample_per_subtopic": -2}, "sample_per_subtopic: Input should be greater than 0"),
        (lambda r: without(r, "n_subtopic"), "n_subtopic is missing; give n_record_to_generate or all of"),
        (lambda r: {**r, "n_record_to_generate": 100}, "n_record_to_generate and n_source_type are both set"),
        (lambda r: {**r, "n_record_to_generat": 100},
         "n_record_to_generat: unknown key; did you mean 'n_record_to_generate'?"),
        (lambda r: {**r, "engine": {"bach_size": 4}}, "engine.bach_size: unknown key; did you mean 'batch_size'?"),
        (lambda r: {**r, "labels": [{"id": "a", "desc": "x", "name": "y"}]}, "labels[0].name: unknown key"),
        (lambda r: {**r, "model": {"name": "./no/such/model"}},
         "model.name: model path './no/such/model' does not exist"),
        (lambda r: {**r, "model": {"name": "builtin:gpt-9"}}, "model.name: unknown built-in model 'gpt-9'"),
        (lambda r: {**r, "output": {"path": "gs://bucket/x"}}, "output.path: unsupported scheme gs://"),
        (lambda r: {**r, "output": {"path": "s3://"}}, "output.path: s3:// needs a bucket"),
        (lambda r: {**r, "languages": ["en", "xx"]}, "languages: unknown language code 'xx'"),
        (lambda r: {**r, "languages": []}, "languages: needs at least one language code"),
        (lambda r: {**r, "run_id": "../escape"}, "run_id: must be letters, digits"),
        (lambda r: {**r, "sampling": {"temperature": -1}},
         "sampling.temperature: Input should be greater than or equal to 0"),
        (lambda r: {**r, "engine": {"max_tokens": 64}},
         "engine: max_tokens moved to sampling.max_tokens; write it under sampling:"),
        (lambda r: {**r, "sampling": {"max_tokens": 256, "examples_per_request": 5, "max_text_chars": 1200}},
         "sampling.max_tokens: 256 tokens cannot hold 5 texts of up to 1200 characters (about 2021 tokens); raise "
         "max_tokens to 2021, lower examples_per_request or max_text_chars, or leave max_text_chars unset to "
         "derive it"),
        (lambda r: {**r, "sampling": {"max_tokens": 32, "examples_per_request": 5}},
         "sampling.max_tokens: 32 tokens leave 6 characters for each of 5 texts; raise max_tokens or lower "
         "examples_per_request"),
        (lambda r: {**r, "sampling": {"max_tokens": 4096}},
         "sampling.max_tokens: 4096 leaves no room for the prompt in model.max_model_len 2048; lower it or raise "
         "max_model_len"),
    ],
)
def test_bad_input_names_field_and_fix(raw, change, expected):
    assert error_of(change(raw)).startswith(expected)


def test_record_count_alone_derives_sizes(raw):
    spec = loading.parse({**without(raw, *config.SIZE_FIELDS), "n_record_to_generate": 100})
    sizes = spec.sizes()
    per_group = 100 / (2 * 2)
    assert sizes["n_source_type"] * sizes["n_topic"] * sizes["n_subtopic"] * sizes["sample_per_subtopic"] >= per_group


@pytest.mark.parametrize("n_records, groups", [(1, 1), (7, 2), (100, 4), (10_000, 6), (1_000_000, 10)])
def test_sizes_for_records_cover_the_target(n_records, groups):
    sizes = config.sizes_for_records(n_records, groups)
    leaves = sizes["n_source_type"] * sizes["n_topic"] * sizes["n_subtopic"]
    assert leaves * sizes["sample_per_subtopic"] * groups >= n_records
    assert leaves * groups <= max(n_records, groups) * 1.5  # leaves are not wasted: most get samples


def test_overrides_are_typed(tmp_path, raw):
    path = write_spec(tmp_path / "spec.yaml", raw)
    spec = loading.load(path, ["engine.replicas=2", "languages=[en, de]", "run_id=other", "model.enforce_eager=false"])
    assert spec.engine.replicas == 2
    assert spec.languages == ["en", "de"]
    assert spec.run_id == "other"
    assert spec.model.enforce_eager is False


def test_override_without_equals_is_refused(tmp_path, raw):
    path = write_spec(tmp_path / "spec.yaml", raw)
    with pytest.raises(ConfigError, match="write it as key=value"):
        loading.load(path, ["engine.replicas"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        loading.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("instruction: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        loading.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        loading.load(tmp_path / "list.yaml")


def test_fingerprint_ignores_placement_but_not_content(raw):
    base = loading.parse(raw).fingerprint()
    for unchanged in ({"engine": {"replicas": 4, "threads": 3, "batch_size": 7, "restarts": 0}},
                      {"output": {"path": "/elsewhere"}}, {"model": {**raw["model"], "enforce_eager": False}}):
        assert loading.parse({**raw, **unchanged}).fingerprint() == base, unchanged
    for changed in ({"sampling": {**raw["sampling"], "seed": 7}}, {"languages": ["en"]},
                    {"model": {**raw["model"], "max_model_len": 1024}}, {"tree_path": "tree.parquet"}):
        assert loading.parse({**raw, **changed}).fingerprint() != base, changed


def test_fingerprints_come_from_the_fields_marked_deciding(raw):
    spec = loading.parse(raw)
    assert set(config.decisive(spec)) == {
        "instruction", "instruction_by_language", "labels", "n_source_type", "n_topic", "n_subtopic",
        "sample_per_subtopic", "n_record_to_generate", "languages", "tree_languages", "model", "sampling", "tree_path",
        "multi_label",
    }
    assert set(config.decisive(spec)["model"]) == {"name", "dtype", "max_model_len"}
    assert set(config.decisive(spec.dedup)) == {"model", "threshold", "conflicts", "partition_size", "probes", "seed"}


def test_later_stages_chain_their_own_fingerprints(raw):
    from anyclf_ray import pipeline

    def chain(spec):
        return pipeline.chain(pipeline.stages(spec))[0]

    def retuned(section, **fields):
        return loading.parse({**raw, section: {**raw.get(section, {}), **fields}})

    base = chain(loading.parse(raw))
    moved = chain(retuned("dedup", threshold=0.8))
    assert moved["generate"] == base["generate"]  # the generated data stays valid
    assert moved["dedup"] != base["dedup"] and moved["train"] != base["train"]  # and the chain moves on
    # Where dedup runs does not change which rows it keeps.
    assert chain(retuned("dedup", replicas=4, batch_size=8)) == base
    assert chain(retuned("train", num_iterations=3))["dedup"] == base["dedup"]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"num_workrs": 2}, "train.num_workrs: unknown key; did you mean 'num_workers'?"),
        ({"eval_set": {"path": "x.csv", "txt_column": "a"}},
         "train.eval_set.txt_column: unknown key; did you mean 'text_column'?"),
        ({"test_size": 1}, "train.test_size: Input should be less than 1"),
        ({"base_model": "builtin:nope"},
         "train.base_model: unknown built-in model 'nope'; use one of builtin:all-minilm-l6-v2"),
    ],
)
def test_bad_train_settings_name_the_field(raw, train, message):
    with pytest.raises(ConfigError) as error:
        loading.parse({**raw, "train": train})
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("rounds", None, "rounds: is empty; give its fields under it, or {} for the defaults, or remove it"),
        ("train", True, "train: must be a mapping of its fields (key: value), not True"),
        ("dedup", "on", "dedup: must be a mapping of its fields (key: value), not 'on'"),
    ],
)
def test_a_section_that_is_not_a_mapping_names_the_fix(raw, section, value, message):
    for languages in (["en"], ["fr"]):  # a French run fills in multilingual embedders: not over a null section
        with pytest.raises(ConfigError) as error:
            loading.parse({**raw, "languages": languages, section: value})
        assert str(error.value) == message


def test_a_setting_given_with_set_fills_a_null_section(tmp_path, raw):
    path = write_spec(tmp_path / "spec.yaml", {**raw, "rounds": None})
    assert loading.load(path, ["rounds.enabled=true"]).rounds.enabled


def test_default_run_id_is_the_fingerprint(raw):
    spec = loading.parse({**raw, "run_id": None})
    assert spec.resolved_run_id() == f"run-{spec.fingerprint()}"


def test_cli_bad_input_exits_2_with_one_line(tmp_path, raw):
    path = write_spec(tmp_path / "spec.yaml", {**raw, "languages": ["en", "klingon"]})
    done = subprocess.run(
        [sys.executable, "-m", "anyclf_ray.cli", "generate", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "anyclf-ray: error: languages: unknown language code 'klingon'; use ISO 639-1 codes such as 'en', 'fr', 'zh'"
    ]
    assert not (tmp_path / "r1").exists()  # nothing written


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(example):
    spec = loading.load(example)
    assert spec.instruction and len(spec.labels) >= 2


def test_run_refuses_a_bad_eval_set_before_any_engine_starts(tmp_path, capsys, no_cluster):
    from anyclf_ray import cli

    raw = tiny_raw(tmp_path / "runs", "early", train={"base_model": "builtin:all-minilm-l6-v2",
                                                      "eval_set": {"path": str(tmp_path / "missing.csv")}})
    assert cli.main(["run", "--config", str(write_spec(tmp_path / "spec.yaml", raw))]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == (
        f"anyclf-ray: error: train.eval_set.path: {tmp_path / 'missing.csv'}: no such file or folder")
    assert not (tmp_path / "runs" / "early").exists()


def test_training_a_single_label_is_refused_before_any_engine_starts(tmp_path, capsys):
    from anyclf_ray import cli

    raw = tiny_raw(tmp_path / "runs", "one", labels=[{"id": "spam", "desc": "unsolicited advertising"}],
                   train={"base_model": "builtin:all-minilm-l6-v2"})
    assert cli.main(["run", "--config", str(write_spec(tmp_path / "spec.yaml", raw))]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == (
        "anyclf-ray: error: labels: training needs at least 2 labels and the spec has 1; "
        "add a label or set train.enabled: false"
    )


@pytest.mark.parametrize("engine", [{}, {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "replicas": 2}])
def test_a_spec_read_back_from_its_dump_is_the_same_spec(tmp_path, engine):
    # spec.json is a dump: every field is written, so checks of what was given read values, not keys.
    raw = tiny_raw(tmp_path, "dumped", engine=engine)
    if engine:
        raw["model"] = {"name": "served-model"}
    spec = loading.parse(raw)
    assert config.JobSpec.model_validate(spec.model_dump()) == spec
