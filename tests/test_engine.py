"""The engine seam and the pool, driven by a fake engine: retries, failures, reuse, early stop.

The fake answers in microseconds, so the retry logic is tested without Ray and the pool on an
embedded Ray in seconds. The same paths run on real vLLM in test_generate.py.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest
import ray
from conftest import read_parts, tiny_raw

from anyclf_ray import pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.core.results import LanguageRows, PassCounts, PlannedRows, Usage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import normalise, word_count
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import engine, items, judgement, pool
from anyclf_ray.sources import generate, parts, plan

# Ray pickles classes by reference; this module is not importable in Ray's workers, so ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeEngine:
    """An ``engine.Engine`` that answers at once: schema-valid items, except that each prompt's
    first ``fail_first`` attempts (all of them with ``always_fail``, or when the prompt holds
    ``fail_on``) come back cut off."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False, delay: float = 0.0, fail_on: str | None = None):
        self.fail_first, self.always_fail, self.delay, self.fail_on = fail_first, always_fail, delay, fail_on
        self.attempts: collections.Counter = collections.Counter()
        self.calls = 0

    def complete(self, prompts: list[engine.Prompt]) -> list[engine.Completion]:
        self.calls += 1
        time.sleep(self.delay)
        out = []
        for prompt in prompts:
            self.attempts[prompt.text] += 1
            if prompt.options:  # a judgement: every option alike
                out.append(engine.Completion("A", "stop", 7, 1, (0.0,) * len(prompt.options)))
                continue
            key = next(iter(prompt.schema["items"]["properties"]))
            failing = self.always_fail or (self.fail_on is not None and self.fail_on in prompt.text)
            if failing or self.attempts[prompt.text] <= self.fail_first:
                out.append(engine.Completion(f'[{{"{key}": "cut', "length", 7, prompt.max_tokens))
            else:
                items = [{key: f"Item {i} of a fake answer, which the test engine wrote with seed {prompt.seed}"}
                         for i in range(prompt.schema["minItems"])]
                out.append(engine.Completion(json.dumps(items), "stop", 7, 3 * len(items)))
        return out


class HeldEngine:
    """An ``engine.Engine`` around ``inner()`` that logs every prompt it answered to ``answered``
    (its process and seed, a line each), and whose first call number ``hold_call`` on any
    replica holds: it writes the replica's pid and the held prompts' seeds to ``marker`` and
    waits to be killed (``kill_held_replica``). Only one call ever holds, so a replacement answers."""

    def __init__(self, inner, marker: Path, answered: Path, hold_call: int = 2):
        self.inner, self.marker, self.answered, self.hold_call = inner(), marker, answered, hold_call
        self.calls = 0

    def complete(self, prompts: list[engine.Prompt]) -> list[engine.Completion]:
        self.calls += 1
        if self.calls == self.hold_call and self._claim(prompts):
            time.sleep(120)
            raise RuntimeError("the held call was never killed")
        found = self.inner.complete(prompts)
        with open(self.answered, "a") as log:  # one short append: atomic beside other replicas'
            log.write("".join(f"{os.getpid()} {prompt.seed}\n" for prompt in prompts))
        return found

    def _claim(self, prompts: list[engine.Prompt]) -> bool:
        try:
            marker = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(marker, " ".join(map(str, [os.getpid(), *(prompt.seed for prompt in prompts)])).encode())
        os.close(marker)
        return True


def kill_held_replica(marker: Path, timeout: float = 300) -> tuple[int, set[int]]:
    """Wait until a ``HeldEngine`` holds a call, then kill its replica's process -9; its pid and
    the seeds of the prompts it held."""
    deadline = time.time() + timeout
    while not (marker.exists() and marker.read_text()):
        if time.time() > deadline:
            pytest.fail(f"no replica held a call within {timeout} s")
        time.sleep(0.1)
    pid, *held = map(int, marker.read_text().split())
    replica = psutil.Process(pid)
    assert "Replica" in " ".join(replica.cmdline())  # an engine actor, nothing else
    replica.send_signal(signal.SIGKILL)
    return pid, set(held)


def answered_seeds(answered: Path, killed: int) -> tuple[set[int], set[int]]:
    """The seeds a ``HeldEngine`` answered on the replicas that lived, and on the killed one
    (lost with it when its call had not returned)."""
    lines = [tuple(map(int, line.split())) for line in answered.read_text().splitlines()]
    return {seed for pid, seed in lines if pid != killed}, {seed for pid, seed in lines if pid == killed}


def requests(n: int, n_items: int = 2, name: str = "") -> pa.Table:
    return engine.requests_table(
        [{"request_id": f"r{i}", "prompt": f"prompt {name}{i}", "item_key": "text", "n_items": n_items,
          "max_chars": 50, "max_tokens": 64} for i in range(n)]
    )


SAMPLING = config.SamplingSpec(max_retries=2, max_tokens=64)


# -- the retry logic, no Ray -------------------------------------------------------------------


def test_an_answer_that_fails_once_is_retried_then_succeeds():
    fake = FakeEngine(fail_first=1)
    answered = engine.answer(fake, requests(3), SAMPLING).to_pylist()
    assert [r["ok"] for r in answered] == [True] * 3
    assert [r["attempts"] for r in answered] == [2] * 3
    assert fake.calls == 2  # the retries of a batch go to the engine as one batch
    # Each attempt has its own seed, so the answer kept is the second attempt's.
    assert answered[0]["items"][0] == (
        f"Item 0 of a fake answer, which the test engine wrote with seed {engine.request_seed(SAMPLING.seed, 'r0', 1)}")
    assert answered[0]["tokens_out"] == 64 + 6 and answered[0]["tokens_in"] == 14  # both attempts counted
    assert answered[0]["error"] is None and answered[0]["last_output"] is None


def test_answers_that_always_fail_are_reported_after_max_retries():
    fake = FakeEngine(always_fail=True)
    answered = engine.answer(fake, requests(2), SAMPLING).to_pylist()
    assert [(r["ok"], r["attempts"], r["items"]) for r in answered] == [(False, 3, None)] * 2
    assert answered[0]["error"].endswith("(cut off at max_tokens)") and answered[0]["last_output"] == '[{"text": "cut'
    assert engine.usage(pa.Table.from_pylist(answered)) == Usage(
        requests=2, failed=2, tokens_in=42, tokens_out=384, refused=dict.fromkeys(items.REASONS, 0))


def test_no_retries_means_one_attempt():
    answered = engine.answer(FakeEngine(fail_first=1), requests(1), config.SamplingSpec(max_retries=0))
    assert answered["attempts"].to_pylist() == [1] and answered["ok"].to_pylist() == [False]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[{"text": "a"}, {"text": "b"', "not valid JSON"),
        ('{"text": "a"}', "not a JSON array"),
        ('[{"text": "a"}]', "1 items, 2 asked for"),
        ('[{"text": "a"}, {"other": "b"}]', "an item has no text under 'text'"),
        ('[{"text": "a"}, {"text": " ,, "}]', "an item has no text under 'text'"),
    ],
)
def test_parse_items_rejects_bad_answers(text, error):
    with pytest.raises(ValueError, match=error):
        engine.parse_items(text, "text", 2)


def test_parse_items_keeps_order_and_strips():
    assert engine.parse_items(json.dumps([{"text": " one "}, {"text": "two"}]), "text", 2) == ["one", "two"]


class ScriptedEngine:
    """An ``engine.Engine`` whose n-th answer to every prompt is ``script[n]`` (a list of items)."""

    def __init__(self, *script: list[str]):
        self.script, self.schemas = script, []
        self.attempts: collections.Counter = collections.Counter()

    def complete(self, prompts: list[engine.Prompt]) -> list[engine.Completion]:
        out = []
        for prompt in prompts:
            self.schemas.append(prompt.schema)
            found = self.script[self.attempts[prompt.text]]
            self.attempts[prompt.text] += 1
            out.append(engine.Completion(json.dumps([{"text": t} for t in found]), "stop", 5, 5))
        return out


GOOD = ["a reader wrote this long review", "another reader wrote a second review", "a third person says something else"]
ECHO_REQUEST = {"request_id": "e", "prompt": "Generate examples for label positive. Topic: acting quality.",
                "item_key": "text", "n_items": 3, "max_chars": 80, "max_tokens": 64, "min_words": 4,
                "echoes": ["positive", "acting quality", "movie reviews"]}


def test_refused_items_are_counted_and_only_the_missing_ones_asked_again():
    fake = ScriptedEngine(
        [GOOD[0], 'source_type1},{"text', "positive acting quality movie"],
        ["too short", GOOD[0].upper(), GOOD[1]],  # the upper-cased copy repeats a kept item
        [GOOD[2], "Topic: acting quality.", GOOD[1]],
    )
    answered = engine.answer(fake, engine.requests_table([ECHO_REQUEST]), SAMPLING).to_pylist()[0]
    assert answered["ok"] and answered["attempts"] == 3
    assert answered["items"] == [GOOD[0], GOOD[1], GOOD[2]]
    assert answered["rejected"] == ["json_syntax", "echo", "too_short", "repeated"]
    assert fake.schemas[0]["items"]["properties"]["text"]["pattern"] == items.text_pattern()
    short = ScriptedEngine(*[["x y"] * 3] * 3)
    usage = engine.usage(engine.answer(short, engine.requests_table([ECHO_REQUEST]), SAMPLING))
    assert usage.failed == 1 and usage.refused["too_short"] == 9


def test_plain_recipe_takes_items_as_they_come():
    plain = SAMPLING.model_copy(update={"valid_items": False})
    fake = ScriptedEngine(['source_type1},{"text', "x", "x"])
    answered = engine.answer(fake, engine.requests_table([ECHO_REQUEST]), plain).to_pylist()[0]
    assert answered["ok"] and answered["items"] == ['source_type1},{"text', "x", "x"] and answered["rejected"] == []
    assert "pattern" not in fake.schemas[0]["items"]["properties"]["text"]


def test_choice_answers_must_be_one_of_the_choices():
    request = {**ECHO_REQUEST, "n_items": 1, "item_key": "text", "choices": ["pos", "neg", "none"]}
    fake = ScriptedEngine(["maybe"], ["neg"])
    answered = engine.answer(fake, engine.requests_table([request]), SAMPLING).to_pylist()[0]
    assert answered["items"] == ["neg"] and answered["rejected"] == ["not_a_choice"]
    assert fake.schemas[0]["items"]["properties"]["text"] == {"type": "string", "enum": ["pos", "neg", "none"]}


class RawEngine:
    """An ``engine.Engine`` whose n-th answer to every prompt is the n-th of ``outputs``, verbatim."""

    def __init__(self, *outputs: str):
        self.outputs, self.schemas, self.calls = outputs, [], 0

    def complete(self, prompts: list[engine.Prompt]) -> list[engine.Completion]:
        self.schemas += [prompt.schema for prompt in prompts]
        self.calls += 1
        return [engine.Completion(self.outputs[self.calls - 1], "stop", 5, 5) for _ in prompts]


CHOICE = judgement.request(judgement.Question("c", "Which one?\nA. rain\nB. sport\nC. vote", 3))


class LogprobEngine:
    """An ``engine.Engine`` whose n-th answer to every prompt has the n-th of ``logprobs``."""

    def __init__(self, *logprobs: tuple[float, ...] | None):
        self.logprobs, self.prompts = logprobs, []

    def complete(self, prompts: list[engine.Prompt]) -> list[engine.Completion]:
        self.prompts += prompts
        found = self.logprobs[len(self.prompts) - 1]
        return [engine.Completion("A", "stop", 5, 1, found) for _ in prompts]


def test_a_choice_reads_each_options_log_probability_from_one_token():
    fake = LogprobEngine((-2.0, -0.5, -3.0))
    answered = engine.answer(fake, engine.requests_table([CHOICE]), SAMPLING).to_pylist()[0]
    assert answered["ok"] and answered["option_logprobs"] == [-2.0, -0.5, -3.0] and answered["items"] == ["B"]
    asked = fake.prompts[0]
    assert (asked.options, asked.max_tokens, asked.temperature, asked.schema) == (("A", "B", "C"), 1, 0.0, {})
    probabilities = judgement.probabilities([answered["option_logprobs"]], 3)[0]
    assert probabilities == pytest.approx(np.exp([-2.0, -0.5, -3.0]) / np.exp([-2.0, -0.5, -3.0]).sum(), abs=1e-15)


def test_a_choice_without_log_probabilities_is_retried_then_reported():
    fake = LogprobEngine(None, (-1.0, -2.0), (float("-inf"),) * 3)
    answered = engine.answer(fake, engine.requests_table([CHOICE]), SAMPLING).to_pylist()[0]
    assert not answered["ok"] and answered["option_logprobs"] is None and answered["attempts"] == 3
    assert answered["error"] == "every option has probability 0"
    assert len({prompt.seed for prompt in fake.prompts}) == 3  # a new seed each attempt, as for items


@pytest.mark.parametrize(
    ("text", "words"),
    [("Great movie, loved it!", 4), ("这部电影很好看", 7), ("この映画は最高でした", 10),
     ("ภาพยนตร์เรื่องนี้ดีมาก", 8), ("정말 재미있는 영화였어요", 3), ("", 0)],
)
def test_words_are_counted_in_scripts_without_spaces(text, words):
    assert word_count(text) == words


@pytest.mark.parametrize(
    ("one", "other"),
    [("Great  movie,\nloved it!", "great movie, LOVED it!"), ("ＡＢＣ　１２３ is fine", "abc 123 is fine"),
     ("这部 电影 很好看", "这部电影很好看"), ("這部電影，很好看", "這部電影,很好看"),
     ("この映画は 最高", "この映画は最高"),
     ("ภาพยนตร์ เรื่องนี้", "ภาพยนตร์เรื่องนี้"), ("ΟΔΟΣ", "οδος"), ("Straße", "STRASSE"), ("정말 재미있는", "정말 재미있는")],
)
def test_texts_that_differ_only_in_form_normalise_alike(one, other):
    assert normalise(one) == normalise(other)
    assert normalise("정말 재미있는") != normalise("정말재미있는")  # Korean separates words by spaces


def test_text_pattern_refuses_json_syntax_and_a_leading_space():
    import re

    pattern = re.compile(items.text_pattern())
    assert pattern.match("It's fine: 3/5, would (maybe) watch again!")
    assert not any(pattern.match(t) for t in ['a},{"b', "a [1]", ' leading space', 'say "hi"', "back\\slash"])


def test_request_seeds_differ_per_attempt():
    seeds = {engine.request_seed(0, "r", attempt) for attempt in range(5)}
    assert len(seeds) == 5
    assert engine.request_seed(0, "r", 0) == engine.request_seed(0, "r", 0)


def test_engine_threads_reach_the_cpu_build():
    placed = config.EngineSpec(device="cpu", threads=2, cpus_per_replica=1)
    assert engine.engine_env(placed)["OMP_NUM_THREADS"] == "2"
    assert engine.engine_env(placed.model_copy(update={"threads": None}))["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in engine.engine_env(config.EngineSpec(device="cuda"))


def test_a_part_skips_the_empty_schemaless_blocks_ray_data_hands_over(tmp_path):
    # On a resume, a block of leaves whose requests were all committed reaches the sink empty.
    spec = loading.parse(tiny_raw(tmp_path, "sink"))
    tree = plan.full_tree(spec)
    for level in plan.TREE_LEVELS:
        tree = tree.set_column(tree.schema.get_field_index(level), level, pa.array([level] * tree.num_rows))
    answered = engine.answer(FakeEngine(), plan.generation_requests(spec, tree).slice(0, 5), spec.sampling)
    location = RunLocation(spec.output, "sink")
    rows_of = functools.partial(generate.examples_from, model_name=spec.model.name, labels=scheme(spec))
    sink = parts.PartSink(location, "", rows_of, requests_per_part=3)
    sink.write([pa.table({})], ctx=None)
    assert location.list("data") == []
    sink.write([pa.table({}), answered.slice(0, 2), pa.table({}), answered.slice(2)], ctx=None)
    # Parts of 3 and 2 requests, every example once.
    committed = [part.request_ids.tolist() for part in parts.committed(location).values()]
    assert sorted(map(len, committed)) == [2, 3]
    assert sorted(rid.decode() for part in committed for rid in part) == sorted(answered["request_id"].to_pylist())
    ids = read_parts(location)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == sum(answered["n_items"].to_pylist())


# -- the pool, on an embedded Ray ----------------------------------------------------------------


def fake_pool(replicas: int = 1, **fake) -> pool.EnginePool:
    placed = config.EngineSpec(device="cpu", replicas=replicas, cpus_per_replica=0.5, batch_size=8)
    return pool.EnginePool(placed, SAMPLING, functools.partial(FakeEngine, **fake))


@pytest.mark.slow
def test_one_pool_serves_every_pass_with_one_start_per_replica(local_ray):
    with fake_pool(replicas=2, fail_first=1) as engines:
        first = engines.answer_table(requests(5, name="one"), "pass/one")
        second = engines.answer_table(requests(40, name="two"), "pass/two")
        figures = engines.figures()
    assert first["ok"].to_pylist() == [True] * 5 and second["ok"].to_pylist() == [True] * 40
    assert sorted(second["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(40))
    assert (figures.starts, figures.restarts, figures.replicas) == (2, 0, 2)
    assert figures.passes == {"pass/one": PassCounts(requests=5, failed=0),
                              "pass/two": PassCounts(requests=40, failed=0)}
    assert set(first["attempts"].to_pylist()) == set(second["attempts"].to_pylist()) == {2}  # fail once, retried
    assert not [a for a in ray.util.list_named_actors() if a.startswith("anyclf-")]  # released


@pytest.mark.slow
def test_a_replica_killed_mid_pass_is_rebuilt_and_its_call_retried(local_ray, tmp_path):
    """One of two replicas is killed -9 while it holds a call: Ray rebuilds it, the call runs
    again on the replacement, and the pass answers every request once, losing none."""
    held = functools.partial(HeldEngine, functools.partial(FakeEngine, delay=0.05), tmp_path / "held",
                             tmp_path / "answered")
    placed = config.EngineSpec(device="cpu", replicas=2, cpus_per_replica=0.5, batch_size=4)
    with pool.EnginePool(placed, SAMPLING, held) as engines, ThreadPoolExecutor(1) as background:
        dataset = engines.answer(engines.requests_dataset(requests(40)), "pass", total=40)
        running = background.submit(engines.run_pass, "pass",
                                    lambda: pa.concat_tables(ray.get(dataset.to_arrow_refs())))
        killed, held = kill_held_replica(tmp_path / "held")
        table = running.result(timeout=120)
        figures = engines.figures()
    assert figures.restarts == 1 and figures.starts == 2 + 1
    assert figures.passes == {"pass": PassCounts(requests=40, failed=0)}
    assert sorted(table["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(40))
    assert table["ok"].to_pylist() == [True] * 40 and set(table["attempts"].to_pylist()) == {1}
    # The held call never reached its engine: a live one, the replacement, answered it.
    lived, lost = answered_seeds(tmp_path / "answered", killed)
    assert held and held <= lived
    assert lived | lost == {engine.request_seed(SAMPLING.seed, f"r{i}", 0) for i in range(40)}


@pytest.mark.slow
def test_a_pass_whose_first_answers_mostly_fail_stops_early(local_ray):
    with fake_pool(always_fail=True, delay=0.05) as engines:
        dataset = engines.answer(engines.requests_dataset(requests(400)), "generate", total=400)
        with pytest.raises(pool.EarlyStop, match=r"^generate: stopped early: (\d+) of the first \1 requests failed "
                                                 r"\(most often: not valid JSON .* \(cut off at max_tokens\)\)$"):
            engines.run_pass("generate", dataset.materialize)
        answered = engines.figures().passes["generate"].requests
    assert 64 <= answered < 400  # stopped, not run to the end


@pytest.mark.slow
def test_small_failing_passes_are_not_stopped(local_ray):
    with fake_pool(always_fail=True) as engines:
        dataset = engines.answer(engines.requests_dataset(requests(40)), "generate", total=40)
        answered = engines.run_pass("generate", lambda: pa.concat_tables(ray.get(dataset.to_arrow_refs())))
    assert answered.num_rows == 40 and not any(answered["ok"].to_pylist())


@pytest.mark.slow
def test_whole_run_on_a_fake_engine_counts_rows_and_starts(local_ray, tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "fake", dedup={"enabled": False}, train={"enabled": False}))
    done = pipeline.run(spec, engine_factory=functools.partial(FakeEngine, fail_first=1))["generate"].report
    assert done.rows == PlannedRows(expected=96, written=96, missing=0)
    assert done.engine.starts == 1 and set(done.engine.passes) == {
        "tree/source_type", "tree/topic", "tree/subtopic", "generate"}
    location = RunLocation(spec.output, "fake")
    rows = read_parts(location)
    assert sorted(rows["id"].to_pylist()) == sorted(
        plan.example_id(r["leaf_id"], r["sample_index"]) for r in rows.to_pylist())
    assert len(set(rows["id"].to_pylist())) == 96
    # Parts of at most output.commit_rows (24) rows, whatever engine.batch_size (256 here).
    sizes = [location.read_footer(path).num_rows for path in location.list("data")]
    assert sum(sizes) == 96 and max(sizes) <= 24 and len(sizes) >= 4
    status = location.read_json("status.json")
    assert status["state"] == "finished" and status["stage"] == "generate" and status["eta_seconds"] == 0
    assert status["rows"] == {"planned": 96, "done": 96, "committed_before": 0}
    assert status["requests"] == {"total": 64, "answered": 64, "failed": 0}  # 3 samples a leaf, 2 a request


@pytest.mark.slow
def test_retry_failures_asks_again_for_the_failed_requests_only(local_ray, tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "retry", language_check={"enabled": True}, dedup={"enabled": False},
                                 train={"enabled": False}))
    first = pipeline.run(spec, engine_factory=functools.partial(FakeEngine, fail_on="French"))
    location = RunLocation(spec.output, "retry")
    first_parts = location.list("data")
    generated = first["generate"]
    assert generated.status == "incomplete" and generated.report.rows.written == 48
    assert generated.report.failures.requests == 32 and first["language_check"].rows.input == 48
    assert pipeline.run(spec, only="generate", engine_factory=FakeEngine)["generate"] == generated  # kept as is

    again = pipeline.run(spec, engine_factory=FakeEngine, retry_failures=True)
    retried = again["generate"]
    assert retried.report.engine.passes == {"generate": PassCounts(requests=32, failed=0)}  # the failed ones, no more
    assert retried.status == "complete" and retried.report.rows.written == 96
    assert retried.report.failures.requests == 0 and retried.report.llm.requests == generated.report.llm.requests + 32
    assert set(first_parts) < set(location.list("data"))  # the first parts stay as they were
    ids = read_parts(location)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 96
    assert again["language_check"].rows.input == 96  # redone on the new input
    assert again["language_check"].inputs == [retried.ref]


@pytest.mark.slow
def test_a_pass_reports_its_progress_at_a_steady_interval(local_ray):
    reports = []
    with fake_pool(delay=0.05) as engines:
        dataset = engines.answer(engines.requests_dataset(requests(40)), "pass", batch_size=4)
        engines.run_pass("pass", dataset.materialize, report=reports.append, interval=0.2)
    answered = [report["requests"] for report in reports]
    assert len(reports) >= 4 and answered == sorted(answered)  # several reports, never going back
    assert reports[-1] == {"requests": 40, "failed": 0, "items": 40 * 2}  # the last one, at the end


# Twelve languages, the one whose every request fails listed first.
BULK_LANGUAGES = ["th", "en", "fr", "de", "es", "it", "pt", "nl", "pl", "ru", "zh", "ja"]


@pytest.mark.slow
@pytest.mark.parametrize("tree_languages", ["shared", "per_language"])
def test_one_failing_language_of_twelve_holds_up_none_of_the_others(local_ray, tmp_path, tree_languages):
    spec = loading.parse(tiny_raw(tmp_path, "bulk", languages=BULK_LANGUAGES, tree_languages=tree_languages,
                                 language_check={"enabled": True}, dedup={"enabled": False}, train={"enabled": False}))
    found = pipeline.run(spec, engine_factory=functools.partial(FakeEngine, fail_on="Thai"))
    generated = found["generate"].report
    # A per-language tree fails at Thai's source types (1 request); a shared tree at Thai's 32 generation requests.
    thai_failures = {"shared": 32, "per_language": 1}[tree_languages]
    assert generated.languages == [
        LanguageRows(language=language, expected=48, written=0 if language == "th" else 48,
                     missing=48 if language == "th" else 0, failed_requests=thai_failures if language == "th" else 0)
        for language in BULK_LANGUAGES
    ]
    assert found["generate"].status == "incomplete" and generated.rows.written == 11 * 48
    location = RunLocation(spec.output, "bulk")
    failures = pa.concat_tables([location.read_table(path) for path in generated.failures.files])
    assert set(failures["language"].to_pylist()) == {"th"} and sum(failures["rows_lost"].to_pylist()) == 48
    # The fake writes English, so the language check keeps English and removes the rest, counted per language.
    checked = found["language_check"].report
    assert [(row.language, row.input) for row in checked.languages] == [
        (language, 48) for language in sorted(BULK_LANGUAGES) if language != "th"]
    shares = {row.language: row.removed_share for row in checked.languages}
    assert shares.pop("en") == 0.0 and set(shares.values()) == {1.0}
    assert "| th | 48 | 0 | " in location.read_bytes("README.md").decode()
