"""The language check on real texts in several languages and scripts (written here)."""

from __future__ import annotations

import pytest
from conftest import read_parts, tiny_raw, write_generated

from anyclf_ray import pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.filters import language_check

# (id, label, requested language, text): the x rows are not in the language asked for.
ROWS = [
    ("en1", "pos", "en", "The hotel staff were friendly and the room was spotless."),
    ("en2", "neg", "en", "My order arrived two weeks late and the box was crushed."),
    ("fr1", "pos", "fr", "Le personnel de l'hôtel était charmant et la chambre impeccable."),
    ("fr2", "neg", "fr", "Ma commande est arrivée avec deux semaines de retard."),
    ("zh1", "pos", "zh", "酒店的员工非常友好，房间也很干净。"),
    ("zh2", "neg", "zh", "我的订单晚到了两个星期，盒子也被压坏了。"),
    ("ja1", "pos", "ja", "ホテルのスタッフはとても親切で、部屋もきれいでした。"),
    ("ru1", "neg", "ru", "Мой заказ пришёл на две недели позже, коробка была помята."),
    ("ar1", "pos", "ar", "كان موظفو الفندق ودودين وكانت الغرفة نظيفة للغاية."),
    ("x1", "pos", "fr", "The staff at the hotel were lovely and the room was clean."),  # English for French
    ("x2", "neg", "zh", "Ma commande est arrivée cassée et personne ne répond."),  # French for Chinese
    ("x3", "pos", "ja", "酒店的员工非常友好，房间也很干净，我们会再来。"),  # Chinese for Japanese
]
WRONG = {"x1": "en", "x2": "fr", "x3": "zh"}


def spec_for(tmp_path, run_id: str, **fields) -> config.JobSpec:
    return loading.parse(tiny_raw(tmp_path, run_id, languages=["en", "fr", "zh", "ja", "ru", "ar"],
                                 language_check={"enabled": True, **fields}))


def test_the_decision_on_a_table_needs_no_ray(tmp_path):
    """``decide`` alone, on the rows as a table: the detector's verdicts and the counts the base adds up."""
    import pyarrow as pa

    spec = spec_for(tmp_path, "decide")
    rows = pa.table({"id": [r[0] for r in ROWS], "language": [r[2] for r in ROWS], "text": [r[3] for r in ROWS]})
    found = language_check.LanguageCheck(spec).decide(None, rows, None)  # type: ignore[arg-type]  # no context used
    assert {r["id"]: (r["reason"], r["detected_language"]) for r in found.removed.to_pylist()} == {
        i: ("wrong_language", language) for i, language in WRONG.items()}
    kept = found.kept
    assert kept.num_rows == 9 and kept["detected_language"].to_pylist() == kept["language"].to_pylist()
    assert {"language": "fr", "detected_language": "en", "rows": 1} in found.counts["requested_by_detected"]


# Tests that run the stage take the session's embedded Ray (a Ray started by the pipeline itself
# would be one the other modules' fixtures do not know of).


@pytest.mark.slow
def test_texts_in_other_languages_are_removed_with_what_was_detected(tmp_path, local_ray):
    spec = spec_for(tmp_path, "langs")
    location = write_generated(spec, ROWS)
    found = pipeline.run(spec, only="language_check")["language_check"]
    removed = {row["id"]: row for row in read_parts(location, "language_check/removed").to_pylist()}
    assert {i: (r["reason"], r["detected_language"]) for i, r in removed.items()} == {
        i: ("wrong_language", language) for i, language in WRONG.items()}
    kept = read_parts(location, "language_check/data")
    assert kept.num_rows == 9 and kept["detected_language"].to_pylist() == kept["language"].to_pylist()
    assert found.report.removed.by_reason == {"wrong_language": 3, "low_confidence": 0}
    assert {"language": "fr", "detected_language": "en", "rows": 1} in found.report.requested_by_detected
    assert location.read_bytes(found.report.figure)[:4] == b"\x89PNG"
    # Read shard by shard: the driver never holds the run. Part 0 holds the x rows, so part 1's
    # removed side is empty and left out; every output shard holds rows of one input shard.
    assert len(found.shards.data) == 2 and len(found.shards.removed) == 1
    assert (found.rows.input, found.rows.output) == (12, 9)  # added up over the parts
    assert {row.language: row.input for row in found.report.languages} == {
        "ar": 1, "en": 2, "fr": 3, "ja": 2, "ru": 1, "zh": 3}
    inputs = [set(location.read_table(f"data/part-{p}.parquet")["id"].to_pylist()) for p in range(2)]
    for shard in found.shards.data + found.shards.removed:
        assert any(set(location.read_table(shard)["id"].to_pylist()) <= ids for ids in inputs)


@pytest.mark.slow
def test_parts_without_rows_are_passed_over(tmp_path, local_ray):
    """A generation part whose requests all failed holds no rows: 13 parts for 12 rows."""
    spec = spec_for(tmp_path, "empty-part")
    location = write_generated(spec, ROWS, parts=13)
    assert location.read_table("data/part-0.parquet").num_rows == 0
    found = pipeline.run(spec, only="language_check")["language_check"]
    assert (found.rows.input, found.rows.output) == (12, 9)
    assert len(found.shards.data) == 9 and len(found.shards.removed) == 3


@pytest.mark.slow
def test_a_high_confidence_bar_removes_uncertain_rows(tmp_path, local_ray):
    spec = spec_for(tmp_path, "strict", min_confidence=0.99)
    write_generated(spec, ROWS)
    found = pipeline.run(spec, only="language_check")["language_check"]
    assert found.report.removed.by_reason["wrong_language"] == 3
    assert found.report.removed.by_reason["low_confidence"] >= 1  # short Latin-script texts share words


def test_a_language_the_detector_does_not_know_fails_before_any_work(tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "unknown", languages=["en", "haw"], language_check={"enabled": True}))
    with pytest.raises(loading.ConfigError, match=r"^languages: the language check cannot detect 'haw'; remove it"):
        pipeline.run(spec, only="language_check")


def test_a_language_outside_the_run_is_named_when_the_detector_also_weighs_it():
    spanish = "El personal del hotel fue muy amable y la habitación estaba limpia y tranquila."
    detected, _ = language_check.detect([spanish], ["pt"], ("en", "es"))
    assert detected == ["es"]


def test_an_extra_language_the_detector_does_not_know_fails_before_any_work(tmp_path):
    spec = spec_for(tmp_path, "extra", also_detect=["es", "tlh"])
    with pytest.raises(loading.ConfigError,
                       match=r"^language_check.also_detect: the language check cannot detect 'tlh'"):
        pipeline.run(spec, only="language_check")


def test_detect_names_requested_codes_as_the_spec_writes_them():
    detected, confidence = language_check.detect(["Bonjour tout le monde, comment allez-vous ?"], ["fra"])
    assert detected == ["fra"] and confidence[0] > 0.5


@pytest.mark.slow
def test_an_english_only_embedder_on_other_languages_is_warned_about(tmp_path, caplog, local_ray):
    message = ("dedup.model: builtin:all-minilm-l6-v2 reads English only, but languages include fr; "
               "set a multilingual model such as sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2")
    spec = loading.parse(tiny_raw(tmp_path, "warned", languages=["en", "fr"], language_check={"enabled": True},
                                 dedup={"enabled": True}, train={"enabled": False}))
    assert spec.warnings() == [message]
    location = write_generated(spec, ROWS[:4])
    with caplog.at_level("WARNING"):
        found = pipeline.run(spec, only="language_check")["language_check"]
    assert found.warnings == [message] and f"warning: {message}" in caplog.text
    assert f"### Warnings\n\n- {message}" in location.read_bytes("README.md").decode()
    assert loading.parse(tiny_raw(tmp_path, "en", languages=["en"], dedup={"enabled": True})).warnings() == []
    assert loading.parse(tiny_raw(tmp_path, "off", languages=["fr"], dedup={"enabled": False},
                                 train={"enabled": False})).warnings() == []  # nothing embeds


def test_runs_in_other_languages_default_to_a_multilingual_embedder(tmp_path):
    raw = tiny_raw(tmp_path, "multi", languages=["fr", "zh"])
    del raw["dedup"], raw["train"]
    spec = loading.parse(raw)
    assert spec.dedup.model == spec.train.base_model == "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
    assert spec.warnings() == []
    english = loading.parse({**raw, "languages": ["en"]})
    assert english.dedup.model == "builtin:all-minilm-l6-v2"  # English runs keep the English defaults
    assert english.train.base_model == "sentence-transformers/paraphrase-mpnet-base-v2"
