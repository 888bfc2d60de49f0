"""Error-driven rounds (``rounds:``): weak spots measured exactly on planted confusions, the
targeted requests they make, the dev-leak guard, the stopping rule, bad settings refused in one
line, and, on the fake engine, a run whose round is killed mid-pass and resumed."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import time

import pyarrow as pa
import pytest
import ray
from conftest import read_parts, tiny_raw, write_generated
from test_engine import FakeEngine

from anyclf_ray import pipeline, publish
from anyclf_ray.core import loading
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import WeakSpotsReport
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.rounds import leak, stages, targeted, weak_spots
from anyclf_ray.training import train

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LABELS = ["a", "b", "c"]


def held(rows: list[tuple]) -> pa.Table:
    """Scored held-out rows from (text, label, topic, scores)."""
    return pa.table({"id": [f"r{i}" for i in range(len(rows))], "text": [r[0] for r in rows],
                     "label": [r[1] for r in rows], "language": ["en"] * len(rows),
                     "source_type": ["review"] * len(rows), "topic": [r[2] for r in rows],
                     "subtopic": ["s"] * len(rows), "scores": [r[3] for r in rows]})


PLANTED = held([
    ("a right", "a", "t1", [0.8, 0.1, 0.1]),
    ("a right too", "a", "t1", [0.7, 0.2, 0.1]),
    ("a said b", "a", "t1", [0.3, 0.6, 0.1]),
    ("a said b badly", "a", "t1", [0.1, 0.8, 0.1]),
    ("b right", "b", "t2", [0.05, 0.9, 0.05]),
    ("b right too", "b", "t2", [0.2, 0.7, 0.1]),
    ("c said a", "c", "t3", [0.5, 0.1, 0.4]),
    ("c right", "c", "t3", [0.1, 0.2, 0.7]),
])
DEV = pa.table({"text": ["real a", "real b read as c", "real c"], "label": ["a", "b", "c"],
                "language": ["en", "en", "en"],
                "scores": [[0.9, 0.05, 0.05], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8]]})


def by_kind(spots: pa.Table, kind: str) -> list[dict]:
    return sorted((row for row in spots.to_pylist() if row["kind"] == kind), key=lambda row: row["rank"])


def test_weak_spots_are_exact_on_a_planted_confusion():
    spots = weak_spots.measure(PLANTED, DEV, LABELS, 0)
    confusions = by_kind(spots, "confusion")
    assert [(s["label"], s["predicted"], s["errors"]) for s in confusions] == [("a", "b", 2), ("c", "a", 1)]
    assert confusions[0]["topic"] == "t1" and confusions[0]["text"] == "a said b badly"  # lowest margin
    assert confusions[0]["mean_margin"] == pytest.approx(((0.3 - 0.6) + (0.1 - 0.8)) / 2)
    assert confusions[1]["mean_margin"] == pytest.approx(0.4 - 0.5)
    leaves = by_kind(spots, "leaf")
    # t1 and t3 both miss half their rows; t1's mean margin is the lower one.
    assert [(s["topic"], s["rows"], s["errors"], s["error_rate"]) for s in leaves] == [
        ("t1", 4, 2, 0.5), ("t3", 2, 1, 0.5), ("t2", 2, 0, 0.0)]
    assert leaves[0]["mean_margin"] == pytest.approx(((0.8 - 0.1) + (0.7 - 0.2) + (0.3 - 0.6) + (0.1 - 0.8)) / 4)
    assert leaves[0]["predicted"] == "b" and leaves[2]["predicted"] is None
    dev = by_kind(spots, "dev_error")
    assert [(s["text"], s["label"], s["predicted"]) for s in dev] == [("real b read as c", "b", "c")]
    assert dev[0]["mean_margin"] == pytest.approx(0.3 - 0.6)
    assert set(spots["round"].to_pylist()) == {0}
    figures = weak_spots.figures(PLANTED, LABELS)
    assert figures["confusion_matrix"]["rows_true_columns_predicted"] == [[2, 2, 0], [0, 2, 0], [1, 0, 1]]
    assert figures["accuracy"] == pytest.approx(5 / 8)


def spec_of(tmp_path, **rounds):
    return loading.parse(tiny_raw(tmp_path, "r", languages=["en"],
                                  rounds={"enabled": True, "rows_per_round": 25, **rounds}))


def test_targeted_requests_share_the_round_among_the_weak_spots(tmp_path):
    spec = spec_of(tmp_path)  # 2 rows a request: 13 requests, the last asking 1 row
    spots = weak_spots.measure(PLANTED, DEV, LABELS, 0)
    spec = loading.parse({**json.loads(spec.model_dump_json()), "labels": [
        {"id": label, "desc": f"the {label} kind"} for label in LABELS]})
    found = targeted.requests(spec, spots, 1)
    assert found.num_rows == math.ceil(25 / 2) and sum(found["n_items"].to_pylist()) == 25
    assert len(set(found["request_id"].to_pylist())) == found.num_rows
    assert targeted.requests(spec, spots, 1).equals(found)  # stable: a resume asks the same
    # 13 requests, 5/4/4 by true label (the label balance holds); within a label evenly by the
    # kinds it has: a: the a→b confusion and its erring leaf t1; b: the dev error and, with no
    # erring leaf, its lowest-margin leaf t2; c: the c→a confusion and its erring leaf t3.
    allocated = [(spot["kind"], spot["label"], spot.get("topic"), n) for spot, n in targeted.allocate(spec, spots)]
    assert allocated == [("confusion", "a", "t1", 3), ("leaf", "a", "t1", 2), ("dev_error", "b", None, 2),
                         ("leaf", "b", "t2", 2), ("confusion", "c", "t3", 2), ("leaf", "c", "t3", 2)]
    prompts = found["prompt"].to_pylist()
    assert any("real b read as c" in p and "the b kind" in p and "the c kind" in p for p in prompts)
    assert any("took texts of the label: the a kind for the b kind" in p and "Topic: t1" in p for p in prompts)


def test_the_leak_index_finds_exact_and_near_copies():
    index = leak.DevIndex(["The parcel arrived broken and nobody answered my calls."])
    assert index.similarity("  the PARCEL arrived broken and nobody answered my calls. ") == (True, 1.0)
    copy, near = index.similarity("The parcel arrived broken and nobody answered my calls, sadly.")
    assert not copy and near >= 0.6
    assert index.similarity("A lovely day at the beach with friends.")[1] < 0.2


def report(round_: int, dev: float | None, held_out: float) -> WeakSpotsReport:
    return WeakSpotsReport(round=round_, model=f"rounds/{round_}/model", file="f", metric="macro_f1",
                           measured_on="held_out", value=held_out if dev is None else dev,
                           held_out={"macro_f1": held_out}, dev_set=None if dev is None else {"macro_f1": dev},
                           spots={})


def test_rounds_stop_on_min_gain_and_max_rounds(tmp_path):
    settings = spec_of(tmp_path, min_gain=0.02, max_rounds=3).rounds
    assert stages.stop(settings, [report(0, 0.5, 0.9)]) is None  # round 1 always runs
    assert stages.stop(settings, [report(0, 0.5, 0.9), report(1, 0.53, 0.1)]) is None  # the dev set decides
    reason = stages.stop(settings, [report(0, 0.5, 0.9), report(1, 0.53, 0.1), report(2, 0.54, 0.99)])
    assert reason and "gained +0.0100 macro_f1, less than min_gain 0.02" in reason
    assert stages.stop(settings, [report(0, None, 0.5), report(1, None, 0.51)])  # no dev set: held-out
    assert "max_rounds 3" in stages.stop(settings, [report(k, 0.1 * k, 0) for k in range(4)])


def test_the_best_round_has_the_highest_metric_and_the_earliest_on_a_tie():
    assert stages.best([report(0, 0.5, 0.9), report(1, 0.6, 0.1), report(2, 0.55, 0.99)], "macro_f1").round == 1
    assert stages.best([report(0, 0.5, 0.9), report(1, 0.6, 0.1), report(2, 0.6, 0.3)], "macro_f1").round == 1
    assert stages.best([report(0, None, 0.7), report(1, None, 0.69)], "macro_f1").model == "rounds/0/model"
    # Compared by the metric asked for now, not the one a round was measured by.
    accuracy = report(1, 0.6, 0.1).model_copy(update={"dev_set": {"macro_f1": 0.6, "accuracy": 0.9}})
    assert stages.best([report(0, 0.7, 0.1).model_copy(update={"dev_set": {"macro_f1": 0.7, "accuracy": 0.8}}),
                        accuracy], "accuracy").round == 1


@pytest.mark.parametrize(("rounds", "message"), [
    ({"max_rounds": 0}, r"^rounds.max_rounds: "),
    ({"rows_per_round": 0}, r"^rounds.rows_per_round: "),
    ({"min_gain": -2}, r"^rounds.min_gain: "),
    ({"min_gain": 5}, r"^rounds.min_gain: "),  # metrics lie in [0, 1]
    ({"metric": "f1"}, r"^rounds.metric: "),
    ({"leak_similarity": 0}, r"^rounds.leak_similarity: "),
    ({"dev_set": {"path": "x.csv", "colour": 1}}, r"^rounds.dev_set.colour: "),
])
def test_bad_rounds_settings_are_refused_in_one_line(tmp_path, rounds, message):
    with pytest.raises(ConfigError, match=message) as caught:
        spec_of(tmp_path, **rounds)
    assert "\n" not in str(caught.value)


def test_rounds_without_training_are_refused(tmp_path):
    raw = tiny_raw(tmp_path, "r", rounds={"enabled": True}, train={"enabled": False})
    with pytest.raises(ConfigError, match=r"^rounds.enabled: rounds are driven by the trained classifier"):
        loading.parse(raw)


def test_a_missing_dev_set_is_refused_before_any_work(tmp_path):
    spec = spec_of(tmp_path, dev_set={"path": str(tmp_path / "missing.csv")})
    with pytest.raises(ConfigError, match=r"^rounds.dev_set.path: "):
        pipeline.run(spec, engine_factory=FakeEngine)


def dev_file(tmp_path) -> str:
    path = tmp_path / "dev.csv"
    path.write_text("text,label\nThe parcel arrived broken and nobody answered my calls.,neg\n"
                    "What a wonderful stay: the staff could not have been kinder.,pos\n")
    return str(path)


@pytest.mark.slow
def test_the_leak_guard_removes_a_planted_copy_of_a_dev_text(tmp_path, local_ray):
    spec = spec_of(tmp_path, dev_set={"path": dev_file(tmp_path)})
    location = write_generated(spec, [
        ("1", "neg", "en", "the parcel arrived broken and nobody answered my calls."),  # an exact copy
        ("2", "pos", "en", "What a wonderful stay: the staff could not have been kinder!!"),  # a near one
        ("3", "neg", "en", "The parcel came late but the courier was polite about it."),
        ("4", "pos", "en", "Lovely food, friendly people, we will be back next summer."),
    ])
    found = pipeline.run(spec, only="dev_leak")["dev_leak"]
    assert (found.report.exact, found.report.near, found.report.dev_texts) == (1, 1, 2)
    assert found.report.removed.by_reason == {"dev_leak": 2} and found.rows.output == 2
    assert sorted(read_parts(location, "dev_leak/data")["id"].to_pylist()) == ["3", "4"]
    removed = read_parts(location, "dev_leak/removed")
    assert sorted(removed["id"].to_pylist()) == ["1", "2"] and set(removed["reason"].to_pylist()) == {"dev_leak"}


class RoundEngine(FakeEngine):
    """``FakeEngine``, whose answers to a dev-error request nearly copy the dev text (which the
    leak guard must remove), and which dies at its ``die_at``-th call of a round's pass."""

    def __init__(self, die_at: int | None = None):
        super().__init__()
        self.die_at, self.round_calls = die_at, 0

    def complete(self, prompts):
        if any("A classifier" in p.text for p in prompts):
            self.round_calls += 1
            if self.round_calls == self.die_at:
                time.sleep(3)  # time for the parts answered so far to be written
                raise RuntimeError("the round dies here")
        out = super().complete(prompts)
        for i, prompt in enumerate(prompts):
            if "<example>\n" in prompt.text and not prompt.options:
                example = prompt.text.split("<example>\n")[1].split("\n</example>")[0]
                items = [{"text": f"{example} Indeed {n}."} for n in range(prompt.schema["minItems"])]
                out[i] = dataclasses.replace(out[i], text=json.dumps(items))
        return out


@pytest.mark.slow
def test_a_round_killed_mid_pass_resumes_and_writes_every_row_once(tmp_path, local_ray):
    raw = tiny_raw(tmp_path, "rounds", languages=["en"], dedup={"enabled": False},
                   train={"num_iterations": 0, "test_size": 0.5},
                   rounds={"enabled": True, "rows_per_round": 24, "max_rounds": 2, "min_gain": 1.0,
                           "dev_set": {"path": dev_file(tmp_path)}})
    raw["output"]["commit_rows"] = 4  # a part every 2 requests
    spec = loading.parse(raw)
    with pytest.raises(Exception, match="the round dies here"):
        pipeline.run(spec, engine_factory=functools.partial(RoundEngine, die_at=4))
    location = RunLocation(spec.output, "rounds")
    assert location.exists("rounds/0/weak_spots.parquet") and not location.exists("rounds/1/targeted/manifest.json")
    before = len(location.list("rounds/1/targeted/data"))
    assert before >= 1

    found = pipeline.run(spec, engine_factory=RoundEngine)
    first = found["rounds/1/targeted"]
    asked = first.report.engine.passes["targeted"].requests
    assert first.report.rows.written == first.report.rows.expected == 24
    rows = read_parts(location, "rounds/1/targeted/data")
    assert len(rows["id"].to_pylist()) == len(set(rows["id"].to_pylist())) == 24  # every row once
    assert asked == 12 - 2 * before  # the requests no committed part held, 2 a part
    # The dev-error rows copy a dev text nearly: the leak guard of round 1 removes them all.
    leaked = found["rounds/1/dev_leak"].report
    assert leaked.near == first.report.by_kind["dev_error"] > 0
    assert found["rounds/1/train"].rows.input == found["dev_leak"].rows.output + 24 - leaked.near
    # min_gain 1.0: round 1 cannot gain that much, so round 2 never starts.
    assert "rounds/2/targeted" not in found and not location.exists("rounds/2")
    spots = location.read_table("rounds/1/weak_spots.parquet")
    assert set(spots["kind"].to_pylist()) >= {"leaf"} and set(spots["round"].to_pylist()) == {1}
    assert location.exists("rounds/1/model/model_head.pkl") and location.exists("rounds/1/eval/metrics.json")
    card = location.read_bytes("README.md").decode()
    assert "**Round 0**" in card and "**Round 1**" in card and "Round 1 added 24 rows" in card
    # The best round's model is the one published.
    measured = [found[f"rounds/{k}/weak_spots"].report for k in (0, 1)]
    best = measured[1] if measured[1].value > measured[0].value else measured[0]
    assert (measured[1].best_round, measured[1].best_model) == (best.round, best.model)
    assert f"best round so far {best.round}" in card
    uploads = publish.publication(location, with_model=True).model
    assert uploads and all(upload.source.startswith(f"{best.model}/") for upload in uploads)
    held = stages.held_out_rows(location, found["train"].shards.data or found["dev_leak"].shards.data, 0.5)
    assert all(train.draws([row_id])[0] < 0.5 for row_id in held["id"].to_pylist())


def test_plan_reports_the_upper_bound_of_all_rounds(tmp_path):
    from anyclf_ray.sources import estimate

    dev = dev_file(tmp_path)
    with open(dev, "a") as lines:  # a row without a text and one without a label: skipped, and said so
        lines.write(",neg\nThe room was fine.,\n")
    spec = loading.parse(tiny_raw(tmp_path, "r", languages=["en"], label_check={"enabled": True, "methods": ["llm"]},
                                  rounds={"enabled": True, "rows_per_round": 25, "max_rounds": 3,
                                          "dev_set": {"path": dev}}))
    found = estimate.estimate(spec)
    bound = found["rounds"]
    assert bound["rows"] == 75 and bound["generate_requests"] == 3 * 13  # 2 rows a request
    assert bound["tokens"]["out_budget"] == 39 * spec.sampling.max_tokens and bound["tokens"]["in"] > 0
    assert bound["label_check_requests"] == (48 + 25) + (48 + 50) + (48 + 75)  # every row judged again each round
    assert bound["dev_set"] == {"texts": 2, "null_text": 1, "null_label": 1}
    shown = estimate.table(found)
    assert "rounds (at most 3, first attempts)" in shown
    assert re.search(r"dev set null text +1\n", shown) and re.search(r"dev set texts +2\n", shown)


@pytest.mark.slow
def test_two_rounds_end_to_end_on_real_vllm(tmp_path, local_ray, tiny_model):
    """Two rounds on real vLLM (CPU build, the tiny model; the engines start once a round and are
    released before its training takes the cores): each round measures its weak spots, asks for
    its rows, checks them for dev leaks and trains on every row so far."""
    raw = tiny_raw(tmp_path, "real-rounds", languages=["en"], dedup={"enabled": False},
                   train={"num_iterations": 0, "test_size": 0.5},
                   rounds={"enabled": True, "rows_per_round": 12, "max_rounds": 2, "min_gain": -1.0,
                           "dev_set": {"path": dev_file(tmp_path)}})
    spec = loading.parse(raw)
    found = pipeline.run(spec)
    location = RunLocation(spec.output, "real-rounds")
    sources = found["generate"].report.rows.written
    for k in (1, 2):
        targeted_ = found[f"rounds/{k}/targeted"]
        assert targeted_.status == "complete" and targeted_.report.rows.written == 12
        assert targeted_.report.engine.starts == 1  # one start for the round's LLM requests
        rows = read_parts(location, f"rounds/{k}/targeted/data")
        assert rows.num_rows == len(set(rows["id"].to_pylist())) == 12 and set(rows["model"].to_pylist()) == {
            "builtin:tiny-random"}
        # the round's filters read every source's rows so far; training reads what its last filter kept
        sources += 12
        assert found[f"rounds/{k}/dev_leak"].rows.input == sources
        filters = [stage.name for stage in pipeline.stages(spec) if stage.name.startswith(f"rounds/{k}/")
                   and not stage.name.endswith(("/targeted", "/train", "/weak_spots"))]
        assert filters[0] == f"rounds/{k}/dev_leak"
        assert found[f"rounds/{k}/train"].rows.input == found[filters[-1]].rows.output
        assert location.exists(f"rounds/{k}/weak_spots.parquet") and location.exists(f"rounds/{k}/eval/metrics.json")
        # one scoring pass, split back: every held-out row and both dev texts, each scored once
        measured = found[f"rounds/{k - 1}/weak_spots"].report
        held = stages.held_out_rows(location, found["train"].shards.data or found["dev_leak"].shards.data, 0.5)
        assert (measured.held_out["rows"], measured.dev_set["rows"]) == (held.num_rows, 2)
    assert found["generate"].report.engine.starts == 1
    card = location.read_bytes("README.md").decode()
    assert "**Round 0**" in card and "**Round 1**" in card and "**Round 2**" in card
