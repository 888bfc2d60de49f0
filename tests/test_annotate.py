"""Annotation (issue 28): the user's own texts labelled by a calibrated judgement, as a source.

On an embedded Ray with a judge behind the engine seam whose log-probabilities are known (it
leans to the first option, as small models do), so every label, probability and confidence is
exact; a real-vLLM run annotates a small corpus in test_models.py. Bad inputs are refused before
Ray starts.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from conftest import BreakingJudge, OptionJudge, annotate_raw, read_parts, texts_file, tiny_raw, write_spec
from test_engine import FakeEngine

from anyclf_ray import cli, pipeline
from anyclf_ray.core import loading
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.llm import engine
from anyclf_ray.sources import annotate
from anyclf_ray.training import train

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CUES = re.compile(r"loved|wonderful|excellent|fantastic", re.I)
POSITIVE = ["I loved this {}", "What a wonderful {}", "The {} was excellent", "Fantastic {}, truly"]
NEGATIVE = ["I hated this {}", "What a terrible {}", "The {} was awful", "Dreadful {}, truly"]
THINGS = ["movie", "phone", "hotel", "meal", "book", "laptop"]
CORPUS = [(f"r{i:03d}", template.format(thing), label)
          for i, (template, thing, label) in enumerate(
              (t, x, label) for label, templates in (("pos", POSITIVE), ("neg", NEGATIVE))
              for t in templates for x in THINGS)]


def leaning(text, options, prompt):
    """0.6 on the first option for a positive text (wrong, read raw), 0.9 for a negative one."""
    return [0.6, 0.4] if CUES.search(text or "") else [0.9, 0.1]


Judge = functools.partial(OptionJudge, leaning)


def corpus(path, rows=CORPUS, **columns) -> str:
    return texts_file(path, rows, **columns)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, local_ray):
    tmp_path = tmp_path_factory.mktemp("annotate")
    spec = loading.parse(annotate_raw(tmp_path, "a", corpus(tmp_path / "texts.parquet")))
    return spec, RunLocation(spec.output, "a"), pipeline.run(spec, only="annotate", engine_factory=Judge)["annotate"]


@pytest.mark.slow
def test_every_text_is_labelled_once_by_its_calibrated_judgement(annotated):
    spec, location, found = annotated
    rows = read_parts(location, "annotate/data").sort_by("id")
    assert rows.schema == annotate.scheme(spec).row_schema
    assert rows["id"].to_pylist() == sorted(row[0] for row in CORPUS)
    truth = {row_id: label for row_id, _, label in CORPUS}
    assert rows["label"].to_pylist() == [truth[row_id] for row_id in rows["id"].to_pylist()]  # read raw: all neg
    assert set(rows["origin"].to_pylist()) == {"annotated"} and set(rows["model"].to_pylist()) == {spec.model.name}
    # The prior over 24 texts of each label: 0.75 on neg. Positive texts: 0.4/0.25 against 0.6/0.75.
    by_label = {row["label"]: (row["probabilities"], row["confidence"]) for row in rows.to_pylist()}
    assert by_label["pos"][0] == pytest.approx([1 / 3, 2 / 3]) and by_label["pos"][1] == pytest.approx(2 / 3)
    assert by_label["neg"][0] == pytest.approx([3 / 4, 1 / 4]) and by_label["neg"][1] == pytest.approx(3 / 4)
    report = found.report
    assert found.status == "complete" and found.rows.output == 48
    assert (report.rows.expected, report.rows.written, report.rows.removed, report.rows.lost) == (48, 48, 0, 0)
    assert report.calibration == ["batch"] and report.prior == {"neg": 0.75, "pos": 0.25}
    assert {row["label"]: row["rows"] for row in report.counts.by_label} == {"neg": 24, "pos": 24}
    assert report.llm.requests == 48 and report.llm.tokens_out == 48 and report.engine.starts == 1
    assert location.read_json(annotate.PRIOR_FILE)["calibration"] == ["batch"]
    card = location.read_bytes("README.md").decode()
    assert "config_name: annotated" in card and "### Annotated texts" in card
    assert str(Path(spec.annotate.path).parent) not in card  # the corpus's and the run's folder


@pytest.mark.slow
def test_a_finished_annotation_is_skipped_and_status_says_where_it_got(annotated):
    spec, location, found = annotated
    again = pipeline.run(spec, only="annotate", engine_factory=Judge)["annotate"]
    assert again == found  # committed: nothing asked, nothing rewritten
    status = location.read_json("status.json")
    assert status["stage"] == "annotate" and status["state"] == "finished"


@pytest.mark.slow
def test_a_judgement_below_min_confidence_is_removed_as_abstained(tmp_path, local_ray):
    spec = loading.parse(annotate_raw(tmp_path, "abstain", corpus(tmp_path / "texts.parquet"),
                                      judge={"min_confidence": 0.7}))
    found = pipeline.run(spec, only="annotate", engine_factory=Judge)["annotate"]
    location = RunLocation(spec.output, "abstain")
    removed = read_parts(location, "annotate/removed")
    assert (found.report.rows.written, found.report.rows.removed) == (24, 24)
    assert set(removed["reason"].to_pylist()) == {"low_confidence"} and set(removed["label"].to_pylist()) == {"pos"}
    assert found.report.removed == {"low_confidence": 24, "no_allowed_set": 0}


@pytest.mark.slow
def test_a_repeated_text_without_ids_is_one_row_counted_as_a_duplicate(tmp_path, local_ray):
    """Without id_column a text's id is its hash: the same text twice (in one block and in another
    file's) is one row, asked once and counted as a duplicate, never "lost"."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    corpus(folder / "a.parquet", CORPUS[:30] + [CORPUS[0]])
    corpus(folder / "b.parquet", CORPUS[30:] + [CORPUS[5]])
    spec = loading.parse(annotate_raw(tmp_path, "repeated", str(folder), id_column=None))
    found = pipeline.run(spec, only="annotate", engine_factory=Judge)["annotate"]
    assert found.status == "complete"
    assert found.report.rows.model_dump() == {"expected": 50, "duplicates": 2, "written": 48, "removed": 0, "lost": 0}
    rows = read_parts(RunLocation(spec.output, "repeated"), "annotate/data")
    assert sorted(rows["text"].to_pylist()) == sorted(row[1] for row in CORPUS)


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_questions_no_part_answered(tmp_path, local_ray):
    """A driver killed mid-pass leaves some answer parts committed and no rows nor manifest: the
    re-run asks exactly the other questions, and every text lands once."""
    raw = annotate_raw(tmp_path, "resume", corpus(tmp_path / "texts.parquet"))
    raw["engine"]["batch_size"], raw["output"]["commit_rows"] = 4, 8  # parts of 8 questions
    spec = loading.parse(raw)
    pipeline.run(spec, only="annotate", engine_factory=Judge)
    location = RunLocation(spec.output, "resume")
    committed = annotate.parts.committed(location, annotate.ANSWERS)
    assert len(committed) == 6  # 48 questions, 8 a part
    lost = sorted(committed)[::2]  # the parts a kill would not have let land
    for path in [*lost, annotate.Annotate(spec).manifest_path]:
        (Path(location.path()) / path).unlink()
    shutil.rmtree(Path(location.path()) / "annotate" / "data")
    lost_questions = sum(committed[path].rows for path in lost)

    found = pipeline.run(spec, only="annotate", engine_factory=Judge)["annotate"]
    assert found.report.engine.passes["annotate"].requests == lost_questions == 24  # those only
    assert found.report.llm.requests == 48 and found.report.rows.lost == 0
    ids = read_parts(location, "annotate/data")["id"].to_pylist()
    assert sorted(ids) == sorted(row[0] for row in CORPUS)  # every text once
    asked = [rid for part in annotate.parts.committed(location, annotate.ANSWERS).values()
             for rid in part.request_ids.tolist()]
    assert len(asked) == len(set(asked)) == 48


@pytest.mark.slow
def test_answer_parts_land_while_the_pass_runs(tmp_path, local_ray):
    """A single-file corpus (one block as read) still commits a part per commit_rows questions as
    they are answered: a pass that dies at its fourth engine call leaves its first three parts."""
    raw = annotate_raw(tmp_path, "streamed", corpus(tmp_path / "texts.parquet"))
    raw["engine"]["batch_size"], raw["output"]["commit_rows"] = 8, 8
    spec = loading.parse(raw)
    with pytest.raises(Exception, match="the pass dies here"):
        pipeline.run(spec, only="annotate", engine_factory=functools.partial(BreakingJudge, leaning))
    location = RunLocation(spec.output, "streamed")
    committed = annotate.parts.committed(location, annotate.ANSWERS)
    assert sorted(part.rows for part in committed.values()) == [8, 8, 8]
    found = pipeline.run(spec, only="annotate", engine_factory=Judge)["annotate"]
    assert found.report.engine.passes["annotate"].requests == 24  # the questions no part answered
    ids = read_parts(location, "annotate/data")["id"].to_pylist()
    assert sorted(ids) == sorted(row[0] for row in CORPUS)  # every text once


class Mixed:
    """Generation's fake answers for item requests, ``Judge``'s for judgements."""

    def __init__(self):
        self.items, self.judge = FakeEngine(), Judge()

    def complete(self, prompts: list[engine.Prompt]) -> list[engine.Completion]:
        found = {}
        for engine_, mine in ((self.judge, [i for i, p in enumerate(prompts) if p.options]),
                              (self.items, [i for i, p in enumerate(prompts) if not p.options])):
            found |= dict(zip(mine, engine_.complete([prompts[i] for i in mine]) if mine else []))
        return [found[i] for i in range(len(prompts))]


@pytest.mark.slow
def test_a_mixed_run_trains_on_both_sources_and_scores_each(tmp_path, local_ray):
    raw = annotate_raw(tmp_path, "mixed", corpus(tmp_path / "texts.parquet"))
    raw["language_check"] = {"enabled": True}
    raw["train"] = {**raw["train"], "enabled": True, "num_iterations": 0}
    spec = loading.parse(raw)
    found = pipeline.run(spec, engine_factory=Mixed)
    generated, annotated_, checked = found["generate"], found["annotate"], found["language_check"]
    assert checked.rows.input == generated.report.rows.written + annotated_.report.rows.written
    assert [ref.stage for ref in checked.inputs] == ["generate", "annotate"]
    location = RunLocation(spec.output, "mixed")
    rows = read_parts(location, "language_check/data")
    origins = set(rows["origin"].to_pylist())
    assert origins <= {"generated", "annotated"} and "annotated" in origins
    assert generated.report.engine.starts == annotated_.report.engine.starts == 1  # one pool for both sources
    # Training reads both sources, counts its rows by origin, and scores the held-out rows of each.
    held_out = {origin: sum(train.is_held_out(row_id, spec.train.test_size) for row_id, o in
                            zip(rows["id"].to_pylist(), rows["origin"].to_pylist()) if o == origin)
                for origin in ("annotated", "generated")}
    data = found["train"].report.data
    assert data.train_rows_by_origin == {origin: rows["origin"].to_pylist().count(origin) - held_out[origin]
                                         for origin in ("annotated", "generated")}
    assert sum(data.train_rows_by_origin.values()) == data.train_rows
    metrics = json.loads(location.read_bytes("eval/metrics.json"))["held_out"]
    assert {origin: m["rows"] for origin, m in metrics["by_origin"].items()} == held_out
    card = location.read_bytes("model/README.md").decode()
    assert f"annotated {data.train_rows_by_origin['annotated']}" in card
    assert f"| held_out (annotated) | {held_out['annotated']} |" in card


def test_csv_and_jsonl_corpora_are_surveyed_as_written(tmp_path):
    (tmp_path / "texts.csv").write_text("rid,review\n1,fine\n2,NA\n")
    raw = annotate_raw(tmp_path, "csv", str(tmp_path / "texts.csv"))
    with pytest.raises(loading.ConfigError, match="1 of the 2 rows"):  # NA is a missing text, as pandas reads it
        annotate.survey(loading.parse(raw))
    (tmp_path / "texts.jsonl").write_text(json.dumps({"rid": 1, "review": "fine"}) + "\n"
                                          + json.dumps({"rid": 2, "review": "good"}) + "\n")
    raw = annotate_raw(tmp_path, "jsonl", str(tmp_path / "texts.jsonl"), max_rows=1)
    assert annotate.survey(loading.parse(raw)).rows == 1


def test_annotate_needs_a_path(tmp_path):
    raw = tiny_raw(tmp_path, "nopath", annotate={"enabled": True})
    with pytest.raises(loading.ConfigError, match="^annotate.path: name the texts to annotate"):
        loading.parse(raw)


def test_the_plan_counts_annotation_from_the_footers(tmp_path, capsys):
    from anyclf_ray.sources import estimate

    path = corpus(tmp_path / "texts.parquet")
    spec = loading.parse(annotate_raw(tmp_path, "plan", path, max_rows=40))
    whole = estimate.estimate(spec, prompt_tokens_per_second=1000)
    found = whole["annotate"]
    # The run's totals count annotation's questions and tokens beside generation's.
    alone = estimate.estimate(spec.model_copy(update={"annotate": spec.annotate.model_copy(update={"enabled": False})}))
    assert whole["requests"]["total"] == alone["requests"]["total"] + 40
    assert whole["tokens"] == {"in": alone["tokens"]["in"] + found["prompt_tokens"],
                               "out_budget": alone["tokens"]["out_budget"] + 40}
    footer = pq.ParquetFile(path).metadata.row_group(0).column(1).total_uncompressed_size
    assert (found["texts"], found["questions"], found["answer_tokens"]) == (40, 40, 40)
    assert found["text_bytes"] == footer * 40 // 48 and found["prompt_tokens"] > 40 * len("I loved this book") // 4
    assert found["hours_at_rate"] == round(found["prompt_tokens"] / 1000 / 3600, 2)
    (tmp_path / "texts.csv").write_text("rid,review\n1,fine\n")
    raw = annotate_raw(tmp_path, "plan", str(tmp_path / "texts.csv"))
    code = cli.main(["plan", "--json", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["annotate"]["texts"] is None and printed["annotate"]["text_bytes"] == 18
    assert printed["requests"]["annotate"] is None  # unknown until the run reads the rows
