"""The plan report: requests, rows and tokens of a spec, with no LLM time (no Ray, no model)."""

from __future__ import annotations

import json

from conftest import plan_in_fresh_process, tiny_raw, write_spec

from anyclf_ray import cli
from anyclf_ray.core import config, loading
from anyclf_ray.sources import estimate


def test_the_plan_counts_what_the_run_will_ask_and_write(tmp_path):
    found = estimate.estimate(loading.parse(tiny_raw(tmp_path, "planned")))
    # 2 labels x 2 source types x 2 topics x 2 subtopics, 2 languages, 3 samples at 2 a request.
    assert found["requests"] == {"source_type": 1, "topic": 4, "subtopic": 8, "generate": 64, "total": 77}
    assert found["leaves"] == 32
    assert found["rows"] == {"total": 96, "by_label": {"neg": 48, "pos": 48}, "label_sets": 2, "by_set_size": {"1": 96},
                             "by_language": {"en": 48, "fr": 48}}
    assert found["tokens"]["out_budget"] == 64 * 256 + 13 * 256  # every answer at its budget (max_tokens)
    assert found["tokens"]["in"] > 77 * 100 and "time" not in found


def test_a_tree_per_language_multiplies_the_tree_requests(tmp_path):
    found = estimate.estimate(loading.parse(tiny_raw(tmp_path, "per", tree_languages="per_language")))
    assert found["requests"] == {"source_type": 2, "topic": 8, "subtopic": 16, "generate": 64, "total": 90}


def test_a_million_row_plan_is_exact_and_timed(tmp_path):
    raw = {k: v for k, v in tiny_raw(tmp_path, "million").items() if k not in config.SIZE_FIELDS}
    labels = [{"id": f"l{i}", "desc": f"topic number {i}"} for i in range(20)]
    # A hub model this machine lacks: the prompts are estimated, and no tokenizer is loaded.
    raw = {**raw, "labels": labels, "n_record_to_generate": 1_000_000, "engine": {"replicas": 4},
           "model": {"name": "Qwen/Qwen2.5-7B-Instruct"}}
    found, took = plan_in_fresh_process(write_spec(tmp_path / "million.yaml", raw), "--tokens-per-second", "500")
    # By hand: a 12 x 13 x 13 tree per label (2,028 leaves) in each of 2 languages, 40 groups of
    # 25,000 rows: 12 rows a leaf and one more on 664 leaves of each group; at 2 rows a request,
    # 6 requests a leaf and 7 on those 664. Every answer at max_tokens (256).
    assert found["sizes"] == {"n_source_type": 12, "n_topic": 13, "n_subtopic": 13, "sample_per_subtopic": 13}
    assert found["leaves"] == 2 * 20 * 2_028
    assert found["rows"] == {"total": 1_000_000, "by_label": {f"l{i}": 50_000 for i in range(20)}, "label_sets": 20,
                             "by_set_size": {"1": 1_000_000}, "by_language": {"en": 500_000, "fr": 500_000}}
    generate = 40 * (664 * 7 + (2_028 - 664) * 6)
    assert found["requests"] == {"source_type": 1, "topic": 20 * 12, "subtopic": 20 * 12 * 13, "generate": generate,
                                 "total": 1 + 240 + 3_120 + generate}
    assert found["tokens"]["out_budget"] == 256 * (1 + 240 + 3_120 + generate)
    hours = found["tokens"]["out_budget"] / (500 * 4) / 3600
    assert found["time"] == {"tokens_per_second_per_replica": 500, "replicas": 4, "hours_at_budget": round(hours, 2)}
    # Measured on this 2-core machine: 0.12 s past the imports, 18 MiB above them. The imports' own
    # size depends on the machine (CI's ran 30 MiB larger), so only the plan's growth is bounded:
    # a row or a leaf held per item would take hundreds of MiB here (bench/plan.py prints the peaks).
    assert took["seconds"] < 2.0 and took["peak_mib"] - took["imports_mib"] < 64


def test_plan_command_prints_the_plan_or_refuses_a_bad_spec(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.yaml", tiny_raw(tmp_path, "cli"))
    assert cli.main(["plan", "--json", "--config", str(path), "--tokens-per-second", "100"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["requests"]["total"] == 77 and printed["time"]["replicas"] == 1
    assert cli.main(["plan", "--config", str(path), "--set", "languages=[en,xx]"]) == cli.EXIT_BAD_INPUT
    assert "languages" in capsys.readouterr().err



def test_plan_command_prints_a_table_by_default(tmp_path, capsys):
    raw = tiny_raw(tmp_path, "table", engine={"replicas": 2})
    path = write_spec(tmp_path / "spec.yaml", raw)
    assert cli.main(["plan", "--config", str(path), "--tokens-per-second", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    budget = (64 + 13) * 256  # as in the JSON: every answer at max_tokens
    assert lines[0] == "96 rows on 32 leaves; tree sizes n_source_type=2, n_topic=2, n_subtopic=2, " \
                       "sample_per_subtopic=3 (shared tree)"
    figures = {tuple(line.split()[:-1]): line.split()[-1] for line in lines if line.startswith("  ")}
    assert [figures[("label", label)] for label in ("neg", "pos")] == ["48", "48"]
    assert [figures[("language", language)] for language in ("en", "fr")] == ["48", "48"]
    assert [figures[(name,)] for name in ("source_type", "topic", "subtopic", "generate", "total")] == [
        "1", "4", "8", "64", "77"]
    assert figures[("answer", "budget")] == f"{budget:,}" and ("longest", "prompt,", "generate") in figures
    assert "time at 2 tokens/s a replica, 2 replica(s)" in lines
    assert figures[("hours", "for", "the", "answer", "budget")] == f"{budget / (2 * 2) / 3600:.2f}" == "1.37"
    assert figures[("dedup", "threshold")] == "0.92"
    # The values end in one column.
    assert len({len(line) for line in lines if line.startswith("  ") and not line[-1].isalpha()}) == 1
    assert cli.main(["plan", "--config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "time: give --tokens-per-second, a replica's decode rate, for the hours")
