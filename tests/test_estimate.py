"""The plan report: requests, rows and tokens of a spec, with no LLM time (no Ray, no model)."""

from __future__ import annotations

import json
import time

import psutil
from conftest import tiny_raw, write_spec

from anyclf_ray import cli
from anyclf_ray.core import config, loading
from anyclf_ray.sources import estimate


def test_the_plan_counts_what_the_run_will_ask_and_write(tmp_path):
    found = estimate.estimate(loading.parse(tiny_raw(tmp_path, "planned")))
    # 2 labels x 2 source types x 2 topics x 2 subtopics, 2 languages, 3 samples at 2 a request.
    assert found["requests"] == {"source_type": 1, "topic": 4, "subtopic": 8, "generate": 64, "total": 77}
    assert found["leaves"] == 32
    assert found["rows"] == {"total": 96, "by_label": {"neg": 48, "pos": 48}, "by_language": {"en": 48, "fr": 48}}
    assert found["tokens"]["out_budget"] == 64 * 256 + 13 * 256  # every answer at its budget (max_tokens)
    assert found["tokens"]["in"] > 77 * 100 and "time" not in found


def test_a_tree_per_language_multiplies_the_tree_requests(tmp_path):
    found = estimate.estimate(loading.parse(tiny_raw(tmp_path, "per", tree_languages="per_language")))
    assert found["requests"] == {"source_type": 2, "topic": 8, "subtopic": 16, "generate": 64, "total": 90}


def test_a_million_row_plan_is_exact_and_timed(tmp_path):
    raw = {k: v for k, v in tiny_raw(tmp_path, "million").items() if k not in config.SIZE_FIELDS}
    labels = [{"id": f"l{i}", "desc": f"topic number {i}"} for i in range(20)]
    spec = loading.parse({**raw, "labels": labels, "n_record_to_generate": 1_000_000, "engine": {"replicas": 4}})
    started = time.perf_counter()
    found = estimate.estimate(spec, tokens_per_second=500)
    assert time.perf_counter() - started < 60
    assert found["rows"]["total"] == 1_000_000 and set(found["rows"]["by_language"].values()) == {500_000}
    assert max(found["rows"]["by_label"].values()) - min(found["rows"]["by_label"].values()) <= 1
    assert found["requests"]["generate"] >= 1_000_000 / spec.sampling.examples_per_request
    hours = found["tokens"]["out_budget"] / (500 * 4) / 3600
    assert found["time"] == {"tokens_per_second_per_replica": 500, "replicas": 4, "hours_at_budget": round(hours, 2)}
    assert psutil.Process().memory_info().rss < 4 * 2**30


def test_plan_command_prints_the_plan_or_refuses_a_bad_spec(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.yaml", tiny_raw(tmp_path, "cli"))
    assert cli.main(["plan", "--config", str(path), "--tokens-per-second", "100"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["requests"]["total"] == 77 and printed["time"]["replicas"] == 1
    assert cli.main(["plan", "--config", str(path), "--set", "languages=[en,xx]"]) == cli.EXIT_BAD_INPUT
    assert "languages" in capsys.readouterr().err

