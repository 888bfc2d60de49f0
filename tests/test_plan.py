"""The plan: prompts, ids, exact sample allocation and answer parsing (no model, no Ray)."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from conftest import tiny_raw

from anyclf_ray.core import config, loading
from anyclf_ray.llm import prompts
from anyclf_ray.sources import generate, plan


def filled_tree(spec: config.JobSpec) -> pa.Table:
    rows = plan.full_tree(spec).to_pylist()
    for row in rows:
        row.update(source_type=f"S{row['source_type_index']}", topic=f"T{row['topic_index']}{row['language'] or ''}",
                   subtopic=f"U{row['subtopic_index']}")
    return pa.Table.from_pylist(rows, schema=plan.TREE_SCHEMA)


@pytest.fixture
def spec(tmp_path) -> config.JobSpec:
    return loading.parse(tiny_raw(tmp_path, "p1"))


def test_tree_requests_fill_the_seed_prompts(spec):
    rows = filled_tree(spec).to_pylist()
    (source,) = plan.tree_requests("source_type", spec, rows)
    assert source["n_items"] == 2 and source["item_key"] == "source_type"
    assert '["negative sentiment", "positive sentiment"]' in source["prompt"]
    topics = plan.tree_requests("topic", spec, rows)
    assert len(topics) == 2 * 2  # labels x source types
    assert {(r["label"], r["source_type_index"]) for r in topics} == {("neg", 0), ("neg", 1), ("pos", 0), ("pos", 1)}
    neg = next(r for r in topics if r["label"] == "neg" and r["source_type_index"] == 1)
    assert "for the label: negative sentiment from S1" in neg["prompt"]
    subtopics = plan.tree_requests("subtopic", spec, rows)
    assert len(subtopics) == 2 * 2 * 2
    assert all("{" not in r["prompt"].replace('{"', "") for r in topics + subtopics)


def test_failed_parents_have_no_children_requests(spec):
    rows = plan.full_tree(spec).to_pylist()  # no source types yet: as if that level failed
    assert plan.tree_requests("topic", spec, rows) == []


def test_a_tree_per_language_is_asked_for_in_each_language(tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "per", tree_languages="per_language",
                                 instruction_by_language={"fr": "classer le sentiment d'un texte"}))
    tree = filled_tree(spec)
    assert tree.num_rows == 2 * 2 * 8 and set(tree["language"].to_pylist()) == {"en", "fr"}
    sources = {r["language"]: r["prompt"] for r in plan.tree_requests("source_type", spec, tree.to_pylist())}
    assert "Write every item in English." in sources["en"] and "Write every item in French." in sources["fr"]
    assert "classer le sentiment d'un texte" in sources["fr"]
    assert len(plan.tree_requests("subtopic", spec, tree.to_pylist())) == 2 * 2 * 2 * 2  # languages x labels x 2 x 2
    requests = plan.generation_requests(spec, tree).to_pylist()
    assert len({(r["leaf_id"], r["first_sample"]) for r in requests}) == len(requests) == 2 * 2 * 8 * 2
    assert {(r["language"], r["topic"][2:]) for r in requests} == {("en", "en"), ("fr", "fr")}  # its own tree
    shared = loading.parse(tiny_raw(tmp_path, "shared"))
    (source,) = plan.tree_requests("source_type", shared, filled_tree(shared).to_pylist())
    assert "Write every item" not in source["prompt"] and "language" not in source
    assert source["request_id"] == plan.stable_id("source_type")  # a shared tree's ids (and seeds) as before


def test_generation_prompt_names_the_label_not_its_id(spec):
    requests = plan.generation_requests(spec, filled_tree(spec)).to_pylist()
    first = requests[0]
    assert "predict label negative sentiment" in first["prompt"]
    assert "predict label neg." not in first["prompt"]
    assert "{label}" not in first["prompt"] and "{n}" not in first["prompt"]
    assert "Subtopic: U0." in first["prompt"] and "Source type: S0" in first["prompt"]
    assert "Write every example in English." in first["prompt"]
    assert any("Write every example in French only, never in English" in r["prompt"] for r in requests)


def test_translated_descriptions_and_instruction_reach_their_language(tmp_path):
    raw = tiny_raw(tmp_path, "fr", instruction_by_language={"fr": "classer le sentiment d'un texte"})
    raw["labels"][0]["desc_by_language"] = {"fr": "sentiment négatif"}
    spec = loading.parse(raw)
    french = [r for r in plan.generation_requests(spec, filled_tree(spec)).to_pylist() if r["language"] == "fr"]
    negative = next(r["prompt"] for r in french if r["label"] == "neg")
    assert "classer le sentiment d'un texte" in negative and "predict label sentiment négatif" in negative
    assert "Write every example in French.\n" in negative  # a translated prompt needs no insisting
    raw["labels"][1]["desc_by_language"] = {"de": "positiv"}
    with pytest.raises(loading.ConfigError, match=r"^labels\[1\].desc_by_language: 'de' is not in languages"):
        loading.parse(raw)


def test_generation_requests_cover_every_sample_exactly_once(spec):
    requests = plan.generation_requests(spec, filled_tree(spec)).to_pylist()
    samples = Counter()
    for request in requests:
        assert request["n_items"] <= spec.sampling.examples_per_request
        for k in range(request["n_items"]):
            samples[(request["leaf_id"], request["first_sample"] + k)] += 1
    assert len(samples) == 2 * 2 * 8 * 3  # languages x labels x leaves x samples
    assert set(samples.values()) == {1}
    assert len({r["request_id"] for r in requests}) == len(requests)


def test_incomplete_leaves_are_skipped(spec):
    tree = filled_tree(spec).to_pylist()
    tree[0]["subtopic"] = None
    requests = plan.generation_requests(spec, pa.Table.from_pylist(tree, schema=plan.TREE_SCHEMA)).to_pylist()
    leaf = plan.leaf_id("en", "neg", 0, 0, 0)
    assert not any(r["leaf_id"] == leaf for r in requests)


@pytest.mark.parametrize("tree_languages", ["shared", "per_language"])
@pytest.mark.parametrize("n_records", [1, 7, 25, 97, 1000])
def test_record_count_is_exact_and_balanced(tmp_path, n_records, tree_languages):
    raw = tiny_raw(tmp_path, "p2", tree_languages=tree_languages)
    raw = {k: v for k, v in raw.items() if k not in config.SIZE_FIELDS}
    spec = loading.parse({**raw, "n_record_to_generate": n_records})
    tree = filled_tree(spec)
    counts = plan.samples_per_leaf(spec, tree).tolist()
    assert sum(map(sum, counts)) == n_records == sum(plan.expected_rows(spec, tree).values())
    per_group = Counter()
    for lang, per_row in zip(spec.languages, counts):
        for label, n in zip(tree.column("label").to_pylist(), per_row):
            per_group[(lang, label)] += n
    assert max(per_group.values()) - min(per_group.values()) <= 1


def test_ids_are_stable_and_distinct():
    assert plan.leaf_id("en", "neg", 0, 1, 2) == plan.leaf_id("en", "neg", 0, 1, 2)
    ids = {plan.example_id(plan.leaf_id(lang, label, s, t, u), k)
           for lang in ("en", "fr") for label in ("0", "1") for s in range(3) for t in range(3)
           for u in range(3) for k in range(4)}
    assert len(ids) == 2 * 2 * 27 * 4
    assert plan.example_id(plan.leaf_id("en", "neg", 0, 0, 0), 0) == "1fd1a6a4a6a9b0f4"  # pinned: ids never drift


def test_schema_asks_for_exactly_n_items():
    schema = prompts.items_schema("text", 3, 50)
    assert schema["minItems"] == schema["maxItems"] == 3
    assert schema["items"]["properties"]["text"] == {"type": "string", "minLength": 1, "maxLength": 50}


def test_leaves_take_turns_by_language_and_count_their_requests(spec):
    leaves = plan.leaf_table(spec, filled_tree(spec))
    assert leaves.column("language").to_pylist()[:4] == ["en", "fr", "en", "fr"]
    assert plan.request_count(spec, leaves) == plan.render_requests(spec, leaves).num_rows == 2 * 2 * 8 * 2
    planned = plan.generation_requests(spec, filled_tree(spec))
    assert plan.render_requests(spec, leaves.slice(0, 0)).schema == planned.schema


def test_parts_commit_by_rows_and_sooner_by_time(spec):
    rows_bound = spec.output.commit_rows // spec.sampling.examples_per_request  # 24 rows, 2 per request
    assert generate.requests_per_part(spec, None, replicas=1) == rows_bound == 12
    assert generate.requests_per_part(spec, 10.0, replicas=1) == 12  # commit_rows is a hard cap
    big = spec.model_copy(update={"output": spec.output.model_copy(update={"commit_rows": 2000})})
    # 120 s at 100 tokens/s is 12,000 tokens: 46 answers of max_tokens 256 (all at their budget).
    assert generate.requests_per_part(big, 100.0, replicas=1) == 46
    assert generate.requests_per_part(big, 10.0, replicas=1) == generate.PART_FLOOR  # not below the floor...
    assert generate.requests_per_part(big, 10.0, replicas=3) == 3 * generate.PART_FLOOR  # ...per replica
    assert generate.requests_per_part(big, None, replicas=1) == 1000
