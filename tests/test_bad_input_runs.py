"""The bad inputs of test_bad_input.py that need a run: label names in quotes, braces, emoji, CJK
and Arabic through a real multi-label run on vLLM (the judge's budget, the card, the figures,
``datasets``); a prompt that overflows the context at run time on vLLM; a check whose method
could not judge its rows, through the CLI (a judge behind the engine seam that fails)."""

from __future__ import annotations

import functools
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import OptionJudge, read_parts, tiny_raw, write_generated, write_spec

from anyclf_ray import cli, pipeline
from anyclf_ray.core import cards, config, loading
from anyclf_ray.core.results import PlannedRows, Unchecked
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.filters import label_check
from anyclf_ray.sources import plan
from anyclf_ray.sources.generate import Generate

pytestmark = pytest.mark.slow

# Ray pickles classes by reference; this module is not importable in Ray's workers, so ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

HARD = [{"id": "quote", "desc": 'says "hi" {in} braces'}, {"id": "emoji", "desc": "😀 emoji 中文 عربي"},
        {"id": "slash", "desc": "back\\slash and a $5 price"}]


# Texts of the user's to annotate in the same run (issue 28): the judge's questions name the hard labels too.
ANNOTATED = {f"u{i:02d}": f"customer message number {i} about a refund" for i in range(12)}


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory, local_ray, tiny_model):
    folder = tmp_path_factory.mktemp("runs")
    pq.write_table(pa.table({"id": list(ANNOTATED), "text": list(ANNOTATED.values())}), folder / "texts.parquet")
    raw = {k: v for k, v in tiny_raw(folder, "hard").items() if k not in config.SIZE_FIELDS}
    spec = loading.parse({**raw, "languages": ["en"], "labels": HARD, "n_record_to_generate": 24,
                         "multi_label": {"enabled": True, "min_rows": 2},
                         "label_check": {"enabled": True, "action": "flag"},  # the multi-label default: llm
                         "annotate": {"enabled": True, "path": str(folder / "texts.parquet"), "id_column": "id"},
                         "dedup": {"enabled": False}, "train": {"enabled": False}, "diversity": {"enabled": True}})
    return spec, RunLocation(spec.output, "hard"), pipeline.run(spec)


def test_every_judgement_is_answered_whatever_the_names(hard_run):
    """Issue 26's input: the judge's answers were cut at 61 tokens where 87 were needed, and the
    stage said "flagged 0 of 6 rows". A judgement is now read from the log-probabilities of its
    option letters on real vLLM: one token, whatever the names (issue 28)."""
    spec, location, found = hard_run
    checked = found["label_check"]
    judge = checked.report.methods["llm"]
    assert spec.label_check.methods == ["llm"] and checked.status == "complete"
    rows = 24 + found["annotate"].rows.output  # generated and annotated rows
    assert checked.rows.input == rows and judge.unanswered == 0
    assert judge.checked == rows and judge.usage.failed == 0 and judge.usage.requests == rows * 3
    assert judge.calibration == ["batch"] and set(judge.prior) == {label["id"] for label in HARD}
    assert 0 < min(judge.prior.values()) and max(judge.prior.values()) < 1
    assert judge.usage.tokens_out == rows * 3  # one token a question
    judged = read_parts(location, "label_check/data")["judged_labels"].to_pylist()
    assert len(judged) == rows and all(isinstance(labels, list) for labels in judged)


def test_real_vllm_annotates_every_text_once_in_a_mixed_run(hard_run):
    """The user's 12 texts, labelled on the tiny model beside the generation, on one engine start:
    its labels are noise (often no label, or all three: no set the run allows, so removed), but
    every text is asked, answered and accounted for, by its own id."""
    spec, location, found = hard_run
    annotated = found["annotate"].report
    assert found["annotate"].status == "complete" and annotated.engine.starts == 1
    assert (annotated.rows.expected, annotated.rows.lost, annotated.llm.requests) == (12, 0, 12 * 3 + 3 * 3)
    assert annotated.calibration == ["content_free"] * 3  # 12 questions a label, below min_batch
    kept = read_parts(location, "annotate/data").to_pylist() if annotated.rows.written else []
    removed = read_parts(location, "annotate/removed").to_pylist() if annotated.rows.removed else []
    assert sorted(row["id"] for row in kept + removed) == sorted(ANNOTATED)
    assert len(kept) == annotated.rows.written and {row["reason"] for row in removed} <= {"no_allowed_set"}
    for row in kept:
        assert row["text"] == ANNOTATED[row["id"]] and row["origin"] == "annotated"
        assert len(row["probabilities"]) == 3 and 0.5 <= row["confidence"] <= 1
        assert row["labels"] == [label["id"] for label, p in zip(HARD, row["probabilities"]) if p > 0.5]
    origins = read_parts(location, "label_check/data")["origin"].to_pylist()
    assert origins.count("annotated") == annotated.rows.written and origins.count("generated") == 24


def test_the_card_and_datasets_keep_the_names(hard_run):
    spec, location, found = hard_run
    card = location.read_bytes("README.md").decode()
    for label in spec.labels:
        assert f"| {cards.code(label.id)} | {cards.text(label.desc)} |" in card
    checked = datasets.load_dataset(location.uri(), "label_checked", split="train")
    assert checked.num_rows == found["label_check"].rows.output
    assert datasets.load_dataset(location.uri(), "annotated", split="train").num_rows == found["annotate"].rows.output
    rows = read_parts(location)
    assert {name for names in rows["label_names"].to_pylist() for name in names} <= {label["desc"] for label in HARD}


def test_the_figures_are_drawn_with_the_names(hard_run):
    _, location, found = hard_run
    for path in found["diversity"].report.figures.values():
        assert location.read_bytes(path)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prompt_over_the_context_at_run_time_is_one_failed_request(tmp_path, local_ray, tiny_model, capsys):
    """A tree given by hand (``tree_path``) whose one topic makes its leaf's prompts longer than
    the model's context: those requests fail, counted and reported; the run goes on (exit 3)."""
    raw = tiny_raw(tmp_path, "probe", languages=["en"], train={"enabled": False}, dedup={"enabled": False})
    spec = loading.parse(raw)
    tree = plan.full_tree(spec).to_pylist()
    for i, row in enumerate(tree):
        row.update(source_type=f"forum {row['source_type_index']}", topic=f"topic {row['topic_index']}",
                   subtopic=f"angle {row['subtopic_index']} of {i}")
    tree[0]["topic"] = "a very long topic " * 700  # about 12k characters: over 2,048 tokens
    pq.write_table(pa.Table.from_pylist(tree, schema=plan.TREE_SCHEMA), tmp_path / "tree.parquet")
    raw["tree_path"] = str(tmp_path / "tree.parquet")
    code = cli.main(["generate", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    assert code == cli.EXIT_INCOMPLETE
    location = RunLocation(spec.output, "probe")
    failures = read_parts(location, "failures").to_pylist()
    # The first tree row's leaf only: 3 rows, asked 2 a request.
    assert len(failures) == 2
    assert {(f["source_type_index"], f["topic_index"], f["subtopic_index"]) for f in failures} == {(0, 0, 0)}
    assert all(f["attempts"] == 1 and "do not fit the model's context (model.max_model_len)" in f["error"]
               for f in failures)
    found = Generate(spec).read(location)
    assert found.report.rows == PlannedRows(expected=48, written=45, missing=3) and found.status == "incomplete"
    assert "generate incomplete: 45 of 48 rows" in capsys.readouterr().out


def silent_on_fifths(text: str, options: list[str], prompt: str) -> list[float] | None:
    """A judge that gives no log-probabilities for a fifth of the texts."""
    return None if int(text.split("number ")[1].split()[0]) % 5 == 0 else [0.9, 0.1]


def test_a_method_that_judged_too_few_rows_leaves_the_stage_incomplete(tmp_path, local_ray, monkeypatch, capsys):
    raw = tiny_raw(tmp_path, "silent", label_check={"enabled": True, "methods": ["llm"], "action": "flag"},
                   sampling={"max_retries": 0})
    spec = loading.parse(raw)
    write_generated(spec, [(f"r{i}", "neg", "en", f"review number {i} of a hotel") for i in range(20)])
    monkeypatch.setattr(pipeline, "vllm_factory", lambda *settings: functools.partial(OptionJudge, silent_on_fifths))
    code = cli.main(["label-check", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    assert code == cli.EXIT_INCOMPLETE
    out = capsys.readouterr().out
    assert ("label_check incomplete: flagged 0 of 20 rows (0 by llm), removed none; "
            "llm checked only 16 of 20 rows") in out
    found = label_check.LabelCheck(spec).read(RunLocation(spec.output, "silent"))
    assert found.status == "incomplete" and found.report.unchecked == [Unchecked(method="llm", checked=16, rows=20)]
    card = RunLocation(spec.output, "silent").read_bytes("README.md").decode()
    assert "llm checked only 16 of 20 rows" in card
    assert label_check.LabelCheck(spec).retries(found)  # --retry-failures asks again


def test_crossfit_that_cannot_fold_leaves_the_stage_incomplete(tmp_path, local_ray):
    raw = tiny_raw(tmp_path, "fold", label_check={"enabled": True, "methods": ["crossfit"]},
                   train={"base_model": "builtin:all-minilm-l6-v2", "enabled": False})
    spec = loading.parse(raw)
    write_generated(spec, [("a", "neg", "en", "a bad hotel"), ("b", "neg", "en", "an awful meal"),
                           ("c", "pos", "en", "a lovely day")])
    found = pipeline.run(spec, only="label_check")["label_check"]
    assert found.status == "incomplete" and found.report.methods["crossfit"].checked == 0
    # Unjudged rows are kept, and the stage says it could not judge them.
    assert found.rows.output == found.rows.input == 3
