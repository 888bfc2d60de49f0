"""The label check (three methods) and the diversity report, on hand-written rows.

The embedder is the real all-MiniLM-L6-v2 on Ray actors; the llm method's engine is a fake
judge behind the engine seam (it reads the text and answers by cue words), so which rows each
method fails is known. The llm method on real vLLM runs in test_generate.py (tiny model) and
test_models.py (SmolLM2). A check by crossfit and similarity alone runs on the cluster; its
verdicts are compared with the in-process ``label_check.check`` on the same embeddings.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import sys

import datasets
import numpy as np
import pytest
import ray
from conftest import BreakingJudge, OptionJudge, read_parts, tiny_raw, write_generated, write_spec

from anyclf_ray import cli, pipeline
from anyclf_ray.core import config, embed, loading, runtime
from anyclf_ray.core.ids import hash64
from anyclf_ray.core.results import Relabelled
from anyclf_ray.filters import label_check
from anyclf_ray.llm import engine
from anyclf_ray.reports import diversity

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

POSITIVE = ["I loved this {}, it made my week", "What a wonderful {}, I am delighted",
            "The {} was excellent, highly recommended", "Fantastic {}, everyone was happy with it"]
NEGATIVE = ["I hated this {}, it ruined my week", "What a terrible {}, I am furious",
            "The {} was awful, avoid it", "Dreadful {}, everyone was unhappy with it"]
THINGS = ["movie", "phone", "hotel", "meal", "book", "laptop"]
CLEAN = [
    (f"{label}{i:02d}", label, "en", template.format(thing), f"topic {i % 3}")
    for label, templates in (("pos", POSITIVE), ("neg", NEGATIVE))
    for i, (template, thing) in enumerate((t, x) for t in templates for x in THINGS)
]
# Texts that plainly say the other label.
FLIPPED = [
    ("x1", "neg", "en", "I loved this concert, it made my week", "topic 0"),
    ("x2", "neg", "en", "What a wonderful garden, I am delighted", "topic 1"),
    ("x3", "pos", "en", "I hated this concert, it ruined my week", "topic 0"),
    ("x4", "pos", "en", "What a terrible garden, I am furious", "topic 2"),
]
FLIPPED_IDS = {row[0] for row in FLIPPED}
OPTIONS = ["negative sentiment", "positive sentiment"]  # the judge reads descriptions, not ids
CUES = re.compile(r"loved|wonderful|excellent|fantastic", re.I)


def cue_weights(text: str, options: list[str], prompt: str) -> list[float]:
    """The judge's weights: 0.9 on positive for a text with a positive cue word, else on negative."""
    assert options == OPTIONS
    return [0.1, 0.9] if CUES.search(text) else [0.9, 0.1]


CueJudge = functools.partial(OptionJudge, cue_weights)


def check_spec(output, run_id: str, **fields) -> config.JobSpec:
    return loading.parse(tiny_raw(
        output, run_id, train={"base_model": "builtin:all-minilm-l6-v2"},
        label_check={"enabled": True, "methods": ["llm", "crossfit", "similarity"], **fields},
        diversity={"enabled": True}))


@pytest.fixture(scope="module")
def checked(tmp_path_factory, local_ray):
    spec = check_spec(tmp_path_factory.mktemp("check") / "runs", "checked")
    location = write_generated(spec, CLEAN + FLIPPED)
    return spec, location, pipeline.run(spec, only="label_check", engine_factory=CueJudge)["label_check"]


@pytest.mark.slow
def test_every_method_fails_the_flipped_rows(checked):
    _, _, found = checked
    flipped = {"neg": 2, "pos": 2}
    methods = found.report.methods
    assert methods["llm"].failed_by_label == flipped
    assert methods["llm"].usage.requests == 52 and methods["llm"].unanswered == 0
    assert methods["crossfit"].failed_by_label == flipped
    assert (methods["crossfit"].checked, methods["crossfit"].folds, methods["crossfit"].threshold,
            methods["crossfit"].failed) == (52, 5, 0.5, 4)
    assert methods["llm"].checked == methods["similarity"].checked == 52
    assert found.status == "complete"
    assert methods["similarity"].failed >= 4  # descriptions are a weaker signal, see below
    assert {"label": "neg", "judged": "pos", "rows": 2} in methods["llm"].judged


@pytest.mark.slow
def test_removed_rows_name_the_first_method_that_failed_them(checked):
    _, location, found = checked
    removed = read_parts(location, "label_check/removed").to_pylist()
    kept = read_parts(location, "label_check/data")
    by_id = {row["id"]: row for row in removed}
    assert {"x1", "x2", "x3", "x4"} <= set(by_id)
    assert all(by_id[i]["reason"] == "label_mismatch" and by_id[i]["judged_label"] != by_id[i]["label"]
               for i in ("x1", "x2", "x3", "x4"))
    others = [row for row in removed if row["id"] not in FLIPPED_IDS]
    assert all(row["reason"] == "nearer_another_label" and row["label_check_failed"] == ["similarity"]
               for row in others)  # the only method that fails clean rows here
    assert kept.num_rows + len(removed) == 52 == found.rows.input
    assert found.rows.output == kept.num_rows
    assert found.report.removed.by_reason == {
        "label_mismatch": 4, "low_confidence": 0, "low_own_probability": 0, "nearer_another_label": len(others)}
    assert not any(kept["label_check_failed"].to_pylist())
    assert kept.column_names[-5:] == ["judged_label", "judge_confidence", "own_probability", "nearest_label",
                                      "label_check_failed"]


@pytest.mark.slow
def test_similarity_fails_exactly_the_rows_nearer_another_description(checked):
    _, location, found = checked
    rows = [row for folder in ("removed", "data") for row in read_parts(location, f"label_check/{folder}").to_pylist()]
    nearer_other = sorted(r["id"] for r in rows if r["nearest_label"] != r["label"])
    assert found.report.methods["similarity"].failed == len(nearer_other)
    assert sorted(r["id"] for r in rows if "similarity" in r["label_check_failed"]) == nearer_other


@pytest.mark.slow
def test_card_offers_the_checked_rows_and_counts_per_method(checked):
    _, location, found = checked
    card = location.read_bytes("README.md").decode()
    assert "config_name: label_checked" in card and "### Label check (remove)" in card
    assert "| label | rows | failed llm | failed crossfit | failed similarity | kept |" in card
    loaded = datasets.load_dataset(location.uri(), "label_checked", split="train")
    assert loaded.num_rows == found.rows.output


@pytest.mark.slow
def test_dedup_and_the_report_read_what_the_check_kept(checked):
    spec, location, found = checked
    dedup = pipeline.run(spec, only="dedup")["dedup"]
    assert [ref.stage for ref in dedup.inputs] == ["label_check"] and dedup.rows.input == found.rows.output
    report = pipeline.run(spec, only="diversity")["diversity"]
    assert [ref.stage for ref in report.inputs] == ["dedup"] and report.rows.input == dedup.rows.output
    assert report.report.embeddings.reused  # the check embedded every row with the same model
    for path in report.report.figures.values():
        assert location.read_bytes(path)[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(f.rows for f in report.report.by_label.values()) == dedup.rows.output
    assert report.report.by_label["pos"].topics == 3
    assert "### Diversity of the `dedup` rows" in location.read_bytes("README.md").decode()
    # A report setting redoes no work: training's fingerprint does not see it.
    other = spec.model_copy(update={"diversity": spec.diversity.model_copy(update={"sample_rows": 7})})
    fingerprints = [pipeline.chain(pipeline.stages(s))[0] for s in (spec, other)]
    assert fingerprints[0]["train"] == fingerprints[1]["train"]
    assert fingerprints[0]["diversity"] != fingerprints[1]["diversity"]


# -- crossfit and similarity on the cluster -----------------------------------------------------

# More of the same: 12 things, 48 rows a label, and the four flipped rows.
MORE_THINGS = [*THINGS, "album", "car", "chair", "game", "show", "camera"]
BIGGER = [
    (f"{label}{i:02d}", label, "en", template.format(thing), f"topic {i % 3}")
    for label, templates in (("pos", POSITIVE), ("neg", NEGATIVE))
    for i, (template, thing) in enumerate((t, x) for t in templates for x in MORE_THINGS)
] + FLIPPED


def on_the_cluster(output, run_id: str, rows: list[tuple], **fields) -> tuple:
    """The stage's check by crossfit and similarity of ``rows``, and the in-process reference
    (``label_check.check``) on the input and the embeddings the stage wrote: both kept and removed
    rows, by id, and both report fields."""
    spec = check_spec(output, run_id, methods=["crossfit", "similarity"], **fields)
    location = write_generated(spec, rows)
    found = pipeline.run(spec, only="label_check")["label_check"]
    stored = read_parts(location, "label_check/embeddings")
    by_id = dict(zip(stored["id"].to_pylist(), np.stack(stored["embedding"].to_numpy(zero_copy_only=False))))
    settings = spec.label_check
    placement = runtime.resolve_placement(settings, "label_check")
    by_text = {row[3]: by_id[row[0]] for row in rows}

    def stored_vectors(texts: list[str]) -> np.ndarray:  # the rows' stored vectors, then the descriptions'
        descs = embed.embed(texts[len(rows):], settings.model or spec.train.base_model, placement, settings.batch_size)
        return np.concatenate([np.stack([by_text[text] for text in texts[: len(rows)]]), descs])

    kept, removed, fields, _ = label_check.check(spec, read_parts(location).sort_by("id"), None, stored_vectors)
    cluster = {folder: read_parts(location, f"label_check/{folder}").sort_by("id").to_pylist()
               for folder in ("data", "removed")}
    return found, cluster, {"data": kept.to_pylist(), "removed": removed.to_pylist()}, fields


@pytest.mark.slow
def test_below_the_sample_limit_the_cluster_gives_the_in_process_verdicts(tmp_path, local_ray):
    found, cluster, reference, fields = on_the_cluster(tmp_path, "below", CLEAN + FLIPPED)
    assert cluster == reference  # every column of every row, probabilities included
    assert found.report.methods == fields["methods"] and found.report.flagged == fields["flagged"]
    crossfit = found.report.methods["crossfit"]
    assert (crossfit.checked, crossfit.sampled, crossfit.folds, crossfit.failed_by_label) == (
        52, 52, 5, {"neg": 2, "pos": 2})
    assert {row["id"] for row in cluster["removed"] if "crossfit" in row["label_check_failed"]} == FLIPPED_IDS
    assert len(cluster["data"]) + len(cluster["removed"]) == 52 == found.rows.input
    assert found.embeddings.rows == 52 and found.status == "complete"


@pytest.mark.slow
def test_a_bounded_sample_scores_every_row_out_of_sample(tmp_path, local_ray):
    found, cluster, reference, fields = on_the_cluster(tmp_path, "sampled", BIGGER, sample_per_label=8)
    assert found.report.methods == fields["methods"]
    # A row outside the sample is scored in its block, not with every row of its fold: the
    # same probability to a float32 step, and every other column the same.
    for folder in ("data", "removed"):
        probabilities = [[row.pop("own_probability") for row in found_rows]
                         for found_rows in (cluster[folder], reference[folder])]
        assert cluster[folder] == reference[folder]
        assert probabilities[0] == pytest.approx(probabilities[1], rel=1e-6)
    crossfit = found.report.methods["crossfit"]
    assert (crossfit.checked, crossfit.sampled, crossfit.folds) == (100, 16, 5)
    rows = cluster["data"] + cluster["removed"]
    assert len(rows) == 100 == found.rows.input and found.rows.output == len(cluster["data"]) == 92
    assert all(0 <= p <= 1 for p in probabilities[0])  # every row judged: no NaN
    # Heads fitted on 16 rows fail the four flipped rows and four clean ones.
    failed = {row["id"] for row in rows if "crossfit" in row["label_check_failed"]}
    assert failed == FLIPPED_IDS | {"neg46", "pos04", "pos09", "pos10"}
    assert found.report.removed.by_reason["low_own_probability"] == 8 == crossfit.failed


def test_the_sample_is_the_lowest_hashes_of_each_label_drawn_part_by_part():
    ids = [row[0] for row in BIGGER]
    keys = [row[1] for row in BIGGER]
    chosen = label_check.sampled(ids, keys, 8, seed=3)
    rank = hash64(ids, "label-check-sample-3")
    expected = {i for label in ("neg", "pos")
                for _, i in sorted((r, i) for r, i, k in zip(rank, ids, keys) if k == label)[:8]}
    assert {i for i, c in zip(ids, chosen) if c} == expected and chosen.sum() == 16
    assert (label_check.sampled(ids, keys, 8, seed=3) == chosen).all()  # the same in another run
    parts = [(ids[:37], keys[:37]), (ids[37:], keys[37:])]  # as the stage draws it: the sample of samples
    pooled = [(i, k) for part_ids, part_keys in parts
              for i, k, c in zip(part_ids, part_keys, label_check.sampled(part_ids, part_keys, 8, 3)) if c]
    again = label_check.sampled([i for i, _ in pooled], [k for _, k in pooled], 8, 3)
    assert {i for (i, _), c in zip(pooled, again) if c} == expected
    assert label_check.sampled(ids, keys, 100, 3).all()  # a label below the limit: every row


def test_rows_outside_the_sample_are_scored_by_the_head_of_their_fold():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(-1, 0.3, (30, 4)), rng.normal(1, 0.3, (30, 4))])
    y = np.array([0] * 30 + [1] * 30)
    ids = [f"r{i:02d}" for i in range(60)]
    chosen = label_check.sampled(ids, [str(c) for c in y], 10, seed=0)
    held_out, heads = label_check.own_probabilities(vectors[chosen], y[chosen], folds=5, seed=0)
    sample = dict(zip(np.asarray(ids, object)[chosen], held_out))
    probability = label_check.own_label_probabilities(heads, sample, ids, vectors, y, seed=0)
    fold = label_check.folds_of(ids, 5, seed=0)
    for i in np.flatnonzero(~chosen):
        own = heads[fold[i]].predict_proba(vectors[i : i + 1])[0, y[i]]
        assert probability[i] == pytest.approx(own, rel=1e-12)
    assert (probability[chosen] == held_out).all() and (probability > 0.5).all()


def judged(spec: config.JobSpec, rows: list[tuple], judge) -> tuple:
    """The label check's verdicts on hand-written rows, its judge behind the engine seam: no Ray."""
    table = read_parts(write_generated(spec, rows))
    return label_check.check(spec, table, lambda requests: engine.answer(judge(), requests, spec.sampling), None)


def silent_on_hotels(text, options, prompt):
    """``cue_weights``, but no answer at all about a hotel (a question that fails its retries)."""
    return None if "hotel" in text else cue_weights(text, options, prompt)


def silent_on_one_hotel(text, options, prompt):
    return None if "loved this hotel" in text else cue_weights(text, options, prompt)


@pytest.mark.slow
def test_the_judge_on_the_cluster_resumes_and_gives_the_in_process_verdicts(tmp_path, local_ray):
    """The llm method streams: its answers commit in parts of commit_rows as the pass runs; a
    pass that dies at its fourth engine call leaves three parts, and the re-run asks only the
    questions no part answered. The result, every column of every row, is the in-process
    check's on the same rows with the same judge (batch calibration over the whole pass)."""
    raw = tiny_raw(tmp_path, "streamed", label_check={"enabled": True, "methods": ["llm"], "action": "relabel"})
    raw["engine"]["batch_size"], raw["output"]["commit_rows"] = 8, 8
    spec = loading.parse(raw)
    location = write_generated(spec, CLEAN + FLIPPED)
    with pytest.raises(Exception, match="the pass dies here"):
        pipeline.run(spec, only="label_check", engine_factory=functools.partial(BreakingJudge, silent_on_one_hotel))
    # Parts of at most commit_rows questions landed while the pass ran: those of the calls the
    # driver took in before the fourth failed (the three, but fewer on a loaded machine).
    answers = label_check.parts.committed(location, "label_check/answers")
    asked = [len(part.request_ids) for part in answers.values()]  # a question that failed is in its part
    assert 1 <= len(asked) <= 3 and all(0 < n <= 8 for n in asked)
    assert not location.exists("label_check/manifest.json")

    Judge = functools.partial(OptionJudge, silent_on_one_hotel)
    found = pipeline.run(spec, only="label_check", engine_factory=Judge)["label_check"]
    llm = found.report.methods["llm"]
    assert llm.engine.passes["label_check/llm"].requests == 52 - sum(asked)  # those no part holds
    assert (llm.usage.requests, llm.usage.failed, llm.unanswered, llm.checked) == (52, 1, 1, 51)
    kept, removed, fields, _ = label_check.check(spec, read_parts(location).sort_by("id"), lambda requests: (
        engine.answer(Judge(), requests, spec.sampling)), None)
    for folder, reference in (("data", kept), ("removed", removed)):
        assert read_parts(location, f"label_check/{folder}").sort_by("id").to_pylist() == \
            reference.sort_by("id").to_pylist()
    llm.engine = None
    assert found.report.methods == fields["methods"] and found.report.relabelled == fields["relabelled"]
    assert found.report.relabelled.rows == 4 and found.status == "complete"

    # Other settings ask other questions: the answers committed for these are not reused.
    changed = loading.parse({**raw, "label_check": {**raw["label_check"], "judge": {"min_confidence": 0.2}}})
    again = pipeline.run(changed, only="label_check", engine_factory=Judge)["label_check"]
    assert again.report.methods["llm"].engine.passes["label_check/llm"].requests == 52


def test_flag_keeps_every_row_and_marks_the_failures(tmp_path):
    spec = check_spec(tmp_path, "flagged", methods=["llm"], action="flag")
    kept, removed, fields, _ = judged(spec, CLEAN + FLIPPED, CueJudge)
    assert (kept.num_rows, removed.num_rows, fields["flagged"]) == (52, 0, 4)
    assert {row["id"] for row in kept.to_pylist() if row["label_check_failed"]} == FLIPPED_IDS


def test_relabel_gives_the_judged_label(tmp_path):
    spec = check_spec(tmp_path, "relabelled", methods=["llm"], action="relabel")
    kept, removed, fields, _ = judged(spec, CLEAN + FLIPPED, CueJudge)
    assert (kept.num_rows, removed.num_rows) == (52, 0)
    assert fields["relabelled"] == Relabelled(rows=4, by_reason={"label_mismatch": 4})
    by_id = {row["id"]: row for row in kept.to_pylist()}
    for row_id, label, *_ in FLIPPED:
        other = {"neg": "pos", "pos": "neg"}[label]
        assert (by_id[row_id]["label"], by_id[row_id]["label_name"], by_id[row_id]["relabelled_from"]) == (
            other, f"{'positive' if other == 'pos' else 'negative'} sentiment", label)
    assert not any(row["relabelled_from"] for row_id, row in by_id.items() if row_id not in FLIPPED_IDS)
    assert collections.Counter(kept["label"].to_pylist()) == {"neg": 26, "pos": 26}


def test_a_check_that_fails_nothing_says_so(tmp_path):
    spec = check_spec(tmp_path, "clean", methods=["llm"])
    kept, removed, fields, _ = judged(spec, CLEAN, CueJudge)
    assert (kept.num_rows, removed.num_rows, fields["flagged"], fields["unchecked"]) == (48, 0, 0, [])
    assert fields["methods"]["llm"].failed == 0 and fields["methods"]["llm"].failed_by_label == {}


def biased_weights(text: str, options: list[str], prompt: str) -> list[float]:
    """A judge that leans to the first option, as small models do: wrong on every positive text
    when read raw (0.6 on negative), right once its prior is divided out."""
    return [0.6, 0.4] if CUES.search(text) else [0.9, 0.1]


@pytest.mark.parametrize(("calibration", "prior", "positive", "negative"), [
    ("none", {"neg": 0.5, "pos": 0.5}, 0.6, 0.9),  # positive texts: 0.6 on the wrong label
    # The mean over 24 texts of each kind: 0.75 on negative. Positive: 0.4/0.25 against 0.6/0.75.
    ("batch", {"neg": 0.75, "pos": 0.25}, 2 / 3, 3 / 4),
    # N/A, "" and [MASK] have no cue: 0.9 on negative. A negative text then reads as a blank: 1/2.
    ("content_free", {"neg": 0.9, "pos": 0.1}, 6 / 7, 1 / 2),
])
def test_calibration_divides_the_judges_prior_out(tmp_path, calibration, prior, positive, negative):
    spec = check_spec(tmp_path, calibration, methods=["llm"], action="flag", judge={"calibration": calibration})
    kept, _, fields, _ = judged(spec, CLEAN, functools.partial(OptionJudge, biased_weights))
    llm = fields["methods"]["llm"]
    assert (llm.calibration, llm.prior, llm.usage.requests) == (
        [calibration], prior, 48 + 3 * (calibration == "content_free"))
    rows = kept.to_pylist()
    judged_positive = [row["judged_label"] == "pos" for row in rows if row["label"] == "pos"]
    assert sum(judged_positive) == (0 if calibration == "none" else 24)
    assert all(row["judged_label"] == "neg" for row in rows if row["label"] == "neg")
    confidence = {row["label"]: set() for row in rows}
    for row in rows:
        confidence[row["label"]].add(round(row["judge_confidence"], 6))
    own = {"pos": positive, "neg": negative}
    assert confidence == {label: {round(np.float32(value).item(), 6)} for label, value in own.items()}


def test_a_judgement_below_min_confidence_abstains(tmp_path):
    spec = check_spec(tmp_path, "abstain", methods=["llm"], judge={"min_confidence": 0.7})
    kept, removed, fields, _ = judged(spec, CLEAN, functools.partial(OptionJudge, biased_weights))
    # Positive texts are judged right, with 2/3 (below 0.7): they abstain; negative ones, 3/4.
    assert (kept.num_rows, removed.num_rows) == (24, 24)
    assert set(kept["label"].to_pylist()) == {"neg"} and set(removed["reason"].to_pylist()) == {"low_confidence"}
    assert set(removed["judged_label"].to_pylist()) == {"pos"}  # abstained, though right
    assert fields["methods"]["llm"].abstained == fields["methods"]["llm"].failed == 24


def test_an_unanswered_judgement_is_counted_and_fails_no_row(tmp_path):
    spec = check_spec(tmp_path, "unanswered", methods=["llm"], action="flag")
    kept, _, fields, _ = judged(spec, CLEAN + FLIPPED, functools.partial(OptionJudge, silent_on_hotels))
    hotels = [row for row in kept.to_pylist() if "hotel" in row["text"]]
    llm = fields["methods"]["llm"]
    assert llm.unanswered == len(hotels) > 0 and llm.checked == 52 - len(hotels)
    assert llm.usage.failed == len(hotels) and llm.usage.requests == 52
    assert all(row["judged_label"] is None and row["judge_confidence"] is None and not row["label_check_failed"]
               for row in hotels)


# -- multi-label rows: one boolean per label -------------------------------------------------------

SET_LABELS = [{"id": "rain", "desc": "weather"}, {"id": "vote", "desc": "politics"}, {"id": "goal", "desc": "sport"}]
SET_CUES = {"weather": re.compile(r"rain|storm", re.I), "politics": re.compile(r"vote|senate|election", re.I),
            "sport": re.compile(r"goal|match", re.I)}
SET_ROWS = [
    ("m1", ["rain"], "en", "Heavy rain fell all day on the coast."),
    ("m2", ["vote"], "en", "The senate passed the budget."),
    ("m3", ["goal"], "en", "A late goal won the derby."),
    ("m4", ["rain", "goal"], "en", "Heavy rain stopped the game before half time, with no goal."),
    ("m5", ["rain", "vote"], "en", "Storms delayed the election count."),
    ("x1", ["rain", "vote"], "en", "Heavy rain flooded the streets."),  # politics missing: relabel to rain
    ("x2", ["goal"], "en", "The senate watched the match."),  # politics extra: relabel to vote|goal
    ("x3", ["vote"], "en", "Rain hit the match and the election."),  # all three: no such set, removed
    ("x4", ["rain"], "en", "The shop opens at nine."),  # none: not allowed here, removed
]


def set_weights(text: str, options: list[str], prompt: str) -> list[float]:
    """A multi-label judge's weights on yes and no: 0.9 on yes when the label's cue words appear."""
    label = json.loads(prompt.split("express the label ")[1].split("?")[0])
    assert options == ["yes", "no"]
    return [0.9, 0.1] if SET_CUES[label].search(text) else [0.1, 0.9]


FlagJudge = functools.partial(OptionJudge, set_weights)


def set_check_spec(output, run_id: str, **fields) -> config.JobSpec:
    raw = {k: v for k, v in tiny_raw(output, run_id).items() if k not in config.SIZE_FIELDS}
    return loading.parse({**raw, "labels": SET_LABELS, "n_record_to_generate": 20, "train": {"enabled": False},
                         "multi_label": {"enabled": True, "max_labels": 2, "min_rows": 1},
                         # 9 rows: batch calibration asked to estimate the prior from them.
                         "label_check": {"enabled": True, "methods": ["llm"], "judge": {"min_batch": 2}, **fields}})


@pytest.mark.slow
@pytest.mark.parametrize("action", ["remove", "relabel"])
def test_label_sets_are_judged_label_by_label(tmp_path, local_ray, action):
    spec = set_check_spec(tmp_path, f"sets-{action}", action=action)
    location = write_generated(spec, SET_ROWS)
    found = pipeline.run(spec, only="label_check", engine_factory=FlagJudge)["label_check"]
    llm = found.report.methods["llm"]
    assert llm.failed == 4 and llm.unanswered == 0 and llm.usage.requests == 9 * 3  # a question per label
    assert llm.calibration == ["batch"] and llm.abstained == 0
    # The prior divided out: each label's mean p(yes) over the 9 rows, 0.9 on its cued rows.
    cued = {label: sum(bool(SET_CUES[desc].search(text)) for *_, text in SET_ROWS)
            for label, desc in (("rain", "weather"), ("vote", "politics"), ("goal", "sport"))}
    assert llm.prior == {label: round((0.9 * n + 0.1 * (9 - n)) / 9, 4) for label, n in cued.items()}
    assert llm.missing_by_label == {"rain": 1, "vote": 1}
    assert llm.extra_by_label == {"rain": 1, "vote": 1, "goal": 1}
    kept = {row["id"]: row for row in read_parts(location, "label_check/data").to_pylist()}
    removed = {row["id"]: row["reason"] for row in read_parts(location, "label_check/removed").to_pylist()}
    assert kept["m4"]["judged_labels"] == ["rain", "goal"] and not kept["m4"]["label_check_failed"]
    card = location.read_bytes("README.md").decode()
    assert "| `vote` | 1 | 1 |" in card
    if action == "remove":
        assert removed == {"x1": "label_missing", "x2": "label_extra", "x3": "label_extra", "x4": "label_missing"}
        assert found.report.removed.by_reason == {"label_missing": 2, "label_extra": 2, "low_confidence": 0,
                                                  "low_own_probability": 0, "nearer_another_label": 0}
        assert sorted(kept) == ["m1", "m2", "m3", "m4", "m5"]
        return
    assert removed == {"x3": "label_extra", "x4": "label_missing"}
    assert found.report.relabelled == Relabelled(rows=2, by_reason={"label_missing": 1, "label_extra": 1})
    relabelled = {row_id: (row["labels"], row["label_names"], row["label_set"], row["relabelled_from"])
                  for row_id, row in kept.items() if row["relabelled_from"] is not None}
    assert relabelled == {"x1": (["rain"], ["weather"], "rain", "rain|vote"),
                          "x2": (["vote", "goal"], ["politics", "sport"], "vote|goal", "goal")}
    assert {row["label_set"]: row["rows"] for row in found.report.kept_by_label} == {
        "rain": 2, "vote": 1, "goal": 1, "rain|goal": 1, "rain|vote": 1, "vote|goal": 1}
    assert label_check.LabelCheck(spec).describe(found).endswith("relabelled 2")


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"methods": []}, "label_check.methods: list each method once"),
     ({"methods": ["llm", "llm"]}, "label_check.methods: list each method once"),
     ({"methods": ["vibes"]}, "label_check.methods[0]: Input should be 'llm', 'crossfit' or 'similarity'"),
     ({"threshold": 1.5}, "label_check.threshold: Input should be less than 1"),
     ({"model": "not a model!"}, "label_check.model: 'not a model!' is neither a local folder nor a hub id"),
     ({"action": "relabel"}, "label_check.action: relabel takes the llm judge's labels; set methods: [llm]")],
)
def test_bad_label_check_settings_fail_in_config(tmp_path, fields, message):
    with pytest.raises(loading.ConfigError, match=re.escape(message)):
        check_spec(tmp_path, "bad", **fields)


def test_label_sets_are_checked_by_the_llm_judge_only(tmp_path):
    with pytest.raises(loading.ConfigError, match=re.escape(
            "label_check.methods: a multi-label run is checked by the llm judge only (crossfit and similarity read "
            "one label a row); set methods: [llm]")):
        set_check_spec(tmp_path, "bad", methods=["llm", "crossfit"])


def test_a_label_described_as_none_is_judged_as_any_other(tmp_path):
    # The judge's options are lettered: a label written "none" is an option like the others.
    spec = check_spec(tmp_path, "none", methods=["llm"], action="flag")
    spec = spec.model_copy(update={"labels": [config.Label(id="neg", desc="none"), spec.labels[1]]})
    kept, _, fields, _ = judged(spec, CLEAN, functools.partial(OptionJudge, lambda text, options, prompt: (
        [0.1, 0.9] if CUES.search(text) else [0.9, 0.1])))
    assert fields["flagged"] == 0 and "A. none\nB. positive sentiment" in label_check.judge_questions(
        label_check.scheme(spec), kept.slice(0, 1))[0].prompt


def test_more_labels_than_letters_are_refused_for_the_llm_check(tmp_path):
    labels = [{"id": f"l{i}", "desc": f"topic {i}"} for i in range(27)]
    raw = tiny_raw(tmp_path, "many", label_check={"enabled": True, "methods": ["llm"]}, labels=labels)
    with pytest.raises(loading.ConfigError, match="^label_check.methods: the llm judge letters its options A to Z, "
                                                  "and there are 27 labels; use crossfit or similarity$"):
        loading.parse(raw)


def test_an_unavailable_embedder_is_refused_before_any_work(tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "offline", label_check={"enabled": True},
                                 train={"base_model": "sentence-transformers/paraphrase-mpnet-base-v2"}))
    write_generated(spec, CLEAN)
    with pytest.raises(loading.ConfigError, match="^train.base_model: 'sentence-transformers/paraphrase-mpnet"):
        pipeline.run(spec, only="label_check")


# -- the methods' arithmetic ----------------------------------------------------------------------


def test_out_of_fold_probabilities_flag_a_planted_outlier():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(-1, 0.3, (20, 4)), rng.normal(1, 0.3, (20, 4))])
    y = np.array([0] * 20 + [1] * 20)
    y[3] = 1  # a class-0 point labelled 1
    probability, heads = label_check.own_probabilities(vectors, y, folds=5, seed=0)
    assert len(heads) == 5 and probability[3] < 0.5 and (np.delete(probability, 3) > 0.5).all()
    assert label_check.own_probabilities(vectors, np.array([0] * 39 + [1]), folds=5, seed=0)[1] == []  # 1 row: skipped


def test_nearest_labels_and_margins():
    labels = np.eye(3, dtype=np.float32)
    rows = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0, 0.5, 0.5]], dtype=np.float32)
    nearest, margin = label_check.nearest_labels(rows, labels, np.array([0, 0, 2]))
    assert nearest.tolist() == [0, 1, 1] and np.allclose(margin, [0.8, -0.6, 0.0])


def test_diversity_figures_against_their_definitions():
    assert diversity.distinct_n(["a b a", "a b"], 1) == 2 / 5
    assert diversity.distinct_n(["a b a", "a b"], 2) == 2 / 3
    assert diversity.distinct_n([], 2) == 0.0
    assert diversity.compression_ratio(["same text"] * 50) > 10 > diversity.compression_ratio(["one", "two"])
    vectors = np.random.default_rng(1).normal(size=(30, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = [vectors[i] @ vectors[j] for i in range(30) for j in range(30) if i != j]
    assert diversity.mean_pairwise_cosine(vectors) == pytest.approx(np.mean(pairs), abs=1e-9)
    assert diversity.mean_pairwise_cosine(vectors[:1]) is None
    assert diversity.pca_2d(vectors).shape == (30, 2)


def test_label_check_command_on_a_spec_that_turns_it_off(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.yaml", tiny_raw(tmp_path, "off"))
    assert cli.main(["label-check", "--config", str(path)]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == (
        "anyclf-ray: error: label_check.enabled: the label_check stage is off in this spec; "
        "set label_check.enabled: true")
