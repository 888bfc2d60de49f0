"""Bad input modelled on public bug reports in this field's tools: each gets one line before any
cluster time, or the right result. No engine and no Ray here: everything is refused or read on
the driver (the same inputs through a trained model and real vLLM are in test_train.py,
test_generate.py and test_multi_label.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, annotate_raw, label_scheme, texts_file, tiny_raw, write_generated, write_spec

from anyclf_ray import cli, pipeline
from anyclf_ray.core import cards, config, loading, plots
from anyclf_ray.core.config import EvalSetSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.results import GenerationReport, StageResult
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import budgets, engine, items, judgement
from anyclf_ray.sources import estimate
from anyclf_ray.sources.generate import Generate
from anyclf_ray.training.evaluate import load_eval_set


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def plan_cli(tmp_path, raw: dict, capsys) -> tuple[int, str]:
    code = cli.main(["plan", "--json", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    return code, capsys.readouterr()


# -- 1. a missing text is never the string "None" ----------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "datasets"])
def test_eval_rows_without_a_text_or_label_are_skipped_and_counted(tmp_path, fmt):
    texts = ["great phone", None, "awful food", "fine hotel"]
    labels = ["pos", "pos", None, "neg"]
    path = tmp_path / f"real.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": texts, "label": labels}), path)
    elif fmt == "csv":  # NA is a missing text, as pandas reads it; an empty label cell is a missing label
        path.write_text("text,label\ngreat phone,pos\nNA,pos\nawful food,\nfine hotel,neg\n")
    elif fmt == "jsonl":  # a line without the text key, and one whose label is null
        path.write_text('{"text": "great phone", "label": "pos"}\n{"label": "pos"}\n'
                        '{"text": "awful food", "label": null}\n{"text": "fine hotel", "label": "neg"}\n')
    else:
        path = tmp_path / "real-dataset"
        datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(path))
    found = load_eval_set(EvalSetSpec(path=str(path)), label_scheme("neg", "pos"))
    assert found.texts == ["great phone", "fine hotel"] and found.labels == ["pos", "neg"]
    assert found.skipped == {"null_text": 1, "null_label": 1}
    assert "None" not in found.texts


def test_a_csv_cell_none_is_a_missing_text_as_pandas_reads_it(tmp_path):
    path = tmp_path / "real.csv"
    path.write_text("text,label\nNone,pos\n<NA>,neg\nfine,neg\n")
    found = load_eval_set(EvalSetSpec(path=str(path)), label_scheme("neg", "pos"))
    assert found.texts == ["fine"] and found.skipped == {"null_text": 2, "null_label": 0}


def test_an_eval_set_with_no_usable_row_is_refused(tmp_path):
    path = tmp_path / "real.csv"
    path.write_text("text,label\nNA,pos\n,neg\n")
    with pytest.raises(ConfigError, match=r"^train.eval_set.path: .* has no row with both a text and a label$"):
        load_eval_set(EvalSetSpec(path=str(path)), label_scheme("neg", "pos"))


# -- 2. label values compared as the text the user wrote ----------------------------------------


def spec_yaml(tmp_path, labels: str, train: str = "{base_model: builtin:all-minilm-l6-v2}") -> config.JobSpec:
    """A spec file whose labels (and train section) are YAML as a user would write them."""
    import yaml

    base = {k: v for k, v in tiny_raw(tmp_path, "yaml").items() if k not in ("labels", "train")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base) + f"labels: {labels}\ntrain: {train}\n")
    return loading.load(path)


def test_yaml_keeps_yes_and_no_as_written_so_a_label_map_matches_the_file(tmp_path):
    # YAML 1.1 reads yes/no as booleans: this label_map was {True: refund, False: other}.
    (tmp_path / "real.csv").write_text("text,wants_refund\nmoney back please,yes\nnice shop,no\n")
    spec = spec_yaml(tmp_path, "[{id: refund, desc: asks for a refund}, {id: other, desc: anything else}]",
                     f"{{base_model: builtin:all-minilm-l6-v2, eval_set: {{path: {tmp_path / 'real.csv'}, "
                     "label_column: wants_refund, label_map: {yes: refund, no: other}}}")
    assert spec.train.eval_set.label_map == {"yes": "refund", "no": "other"}
    assert load_eval_set(spec.train.eval_set, scheme(spec)).labels == ["refund", "other"]


@pytest.mark.parametrize("ids, values", [
    (["true", "false"], ["true", "false"]),  # pyarrow's CSV reader made these booleans ('False')
    (["010", "0x1F"], ["010", "0x1F"]),  # YAML 1.1 read these as 8 and 31; CSV as 10 and text
    (["no", "on"], ["no", "on"]),  # the Norway problem: YAML 1.1 booleans
])
def test_label_ids_as_written_match_a_csv_as_written(tmp_path, ids, values):
    spec = spec_yaml(tmp_path, f"[{{id: {ids[0]}, desc: first kind}}, {{id: {ids[1]}, desc: second kind}}]")
    assert [label.id for label in spec.labels] == ids
    (tmp_path / "real.csv").write_text(f"text,label\none text,{values[0]}\nanother text,{values[1]}\n")
    assert load_eval_set(EvalSetSpec(path=str(tmp_path / "real.csv")), label_scheme(*ids)).labels == ids


def test_typed_label_values_read_as_their_text_in_every_format(tmp_path):
    # JSON booleans and numbers keep their spelling; a Parquet boolean reads as JSON spells it;
    # a datasets ClassLabel reads as its name, not its index.
    (tmp_path / "real.jsonl").write_text('{"text": "a", "label": true}\n{"text": "b", "label": 1.50}\n'
                                         '{"text": "c", "label": "x"}\n')
    found = load_eval_set(EvalSetSpec(path=str(tmp_path / "real.jsonl")), label_scheme("true", "1.50", "x"))
    assert found.labels == ["true", "1.50", "x"]
    pq.write_table(pa.table({"text": ["a", "b"], "label": [True, False]}), tmp_path / "real.parquet")
    found = load_eval_set(EvalSetSpec(path=str(tmp_path / "real.parquet")), label_scheme("true", "false"))
    assert found.labels == ["true", "false"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=features)
    dataset.save_to_disk(str(tmp_path / "ds"))
    assert load_eval_set(EvalSetSpec(path=str(tmp_path / "ds")), label_scheme("neg", "pos")).labels == ["pos", "neg"]


def test_overrides_keep_values_as_written_too(tmp_path):
    raw = tiny_raw(tmp_path, "set")
    spec = loading.load(write_spec(tmp_path / "spec.yaml", raw), ["run_id=2024", "train.eval_set.path=x.csv",
                                                               "train.eval_set.label_map={yes: refund}"])
    assert spec.run_id == "2024" and spec.train.eval_set.label_map == {"yes": "refund"}
    with pytest.raises(ConfigError, match=r"^--set 'languages=\[en': not valid YAML"):
        loading.load(write_spec(tmp_path / "spec.yaml", raw), ["languages=[en"])


# -- 3. a prompt longer than the model's context ------------------------------------------------


LONG_INSTRUCTION = "classify the sentiment of a customer's message " * 1300  # about 13k tokens


def test_plan_refuses_a_prompt_over_the_context_naming_the_field(tmp_path, capsys):
    code, out = plan_cli(tmp_path, tiny_raw(tmp_path, "long", instruction=LONG_INSTRUCTION), capsys)
    assert code == cli.EXIT_BAD_INPUT and not out.out
    assert re.fullmatch(r"anyclf-ray: error: instruction: the tree/source_type prompt takes [\d,]+ tokens and its "
                        r"answer up to 256, over model.max_model_len 2,048; shorten instruction or raise "
                        r"model.max_model_len\n", out.err)


def test_run_refuses_a_long_label_description_before_ray_starts(tmp_path, capsys, no_cluster):
    labels = [{"id": "neg", "desc": "negative " * 900}, {"id": "pos", "desc": "positive sentiment"}]
    path = write_spec(tmp_path / "spec.yaml", tiny_raw(tmp_path, "d", labels=labels))
    code = cli.main(["generate", "--config", str(path)])
    assert code == cli.EXIT_BAD_INPUT
    assert one_line(capsys).startswith("anyclf-ray: error: labels[0].desc: the tree/source_type prompt takes ")
    assert not (tmp_path / "d").exists()


def test_the_judge_prompt_is_checked_with_the_texts_it_will_read(tmp_path):
    raw = tiny_raw(tmp_path, "judge", label_check={"enabled": True, "methods": ["llm"]},
                   sampling={"max_tokens": 256, "examples_per_request": 1, "max_text_chars": 700})
    spec = loading.parse(raw)
    found = budgets.check(spec, pipeline.longest_requests(pipeline.stages(spec)))
    assert found["label_check/llm"] > found["tree/topic"]  # the judged text is in its prompt
    assert budgets.blame(spec, "label_check/llm") == "sampling.max_text_chars"
    assert budgets.blame(spec, "generate") == "sampling.max_tokens"


def test_a_model_without_a_local_tokenizer_is_estimated_from_characters(tmp_path):
    spec = loading.parse(tiny_raw(tmp_path, "hub", instruction=LONG_INSTRUCTION, model={"name": "someone/unseen-7b"}))
    with pytest.raises(ConfigError, match=r"^instruction: the tree/source_type prompt takes"):
        budgets.check(spec, pipeline.longest_requests(pipeline.stages(spec)))


class LongPromptEngine:
    """Behind the engine seam: a prompt holding ``LONG`` does not fit, as VLLMEngine reports it."""

    def __init__(self):
        self.asked = 0

    def complete(self, prompts_: list[engine.Prompt]) -> list[engine.Completion]:
        out = []
        for prompt in prompts_:
            self.asked += 1
            if "LONG" in prompt.text:
                out.append(engine.Completion("", engine.PROMPT_TOO_LONG, 5000, 0))
            else:
                out.append(engine.Completion(json.dumps([{"text": "a fine answer of five words"}]), "stop", 10, 8))
        return out


def test_a_prompt_that_overflows_at_run_time_is_one_failed_request_not_retried():
    requests = engine.requests_table([{"request_id": f"r{i}", "prompt": "LONG" if i == 1 else f"short {i}",
                                       "item_key": "text", "n_items": 1, "max_chars": 60, "max_tokens": 64}
                                      for i in range(3)])
    fake = LongPromptEngine()
    answered = engine.answer(fake, requests, config.SamplingSpec(max_retries=3)).to_pylist()
    assert [r["ok"] for r in answered] == [True, False, True]
    assert answered[1]["attempts"] == 1 and fake.asked == 3  # never asked again
    assert answered[1]["error"] == ("the prompt's 5000 tokens and its answer budget of 64 do not fit the model's "
                                    "context (model.max_model_len)")
    assert answered[1]["tokens_in"] == 0  # nothing was sent


# -- 4. sizes that cannot be planned ------------------------------------------------------------


def sized(tmp_path, n, languages=("en", "fr"), **fields) -> dict:
    raw = {k: v for k, v in tiny_raw(tmp_path, "sized", languages=list(languages), **fields).items()
           if k not in config.SIZE_FIELDS}
    return {**raw, "n_record_to_generate": n}


@pytest.mark.parametrize("n, message", [
    (1_000_000_000_000, "n_record_to_generate: 1,000,000,000,000 rows is more than the 1,000,000,000 one run plans; "
                        "split the job into several runs (each with its own run_id and sampling.seed)"),
    ("1e14", "n_record_to_generate: '1e14' is not a whole number; write it in digits, such as 100000000000000"),
    (900_000_000, "n_record_to_generate: 900,000,000 rows need a tree of 3,691,476 leaves, more than the 2,000,000 one "
                  "run expands; split the job into runs of at most 400,000,000 rows"),
])
def test_sizes_beyond_a_plan_are_refused_in_one_line(tmp_path, n, message):
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        loading.parse(sized(tmp_path, n))
    assert str(error.value) == message and time.perf_counter() - started < 1


def test_explicit_sizes_beyond_a_plan_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^n_subtopic: the tree would hold 2,500,000 leaves, more than the 2,000"):
        loading.parse(tiny_raw(tmp_path, "big", n_source_type=50, n_topic=50, n_subtopic=500))


@pytest.mark.parametrize("n, message", [
    (1, "labels: label 'pos' gets no row of the plan; raise n_record_to_generate"),
    (4, "labels: label 'neg' gets 2 planned row(s), 1 left to train on after train.test_size 0.2, and training needs "
        "2; raise n_record_to_generate or lower train.test_size"),
])
def test_a_plan_that_starves_a_label_is_refused_before_ray(tmp_path, capsys, n, message):
    code, out = plan_cli(tmp_path, sized(tmp_path, n, languages=["en"]), capsys)
    assert code == cli.EXIT_BAD_INPUT and out.err == f"anyclf-ray: error: {message}\n"
    code = cli.main(["run", "--config", str(write_spec(tmp_path / "spec.yaml", sized(tmp_path, n, languages=["en"])))])
    assert code == cli.EXIT_BAD_INPUT and one_line(capsys) == f"anyclf-ray: error: {message}"
    assert not (tmp_path / "sized").exists()


def test_without_training_a_label_needs_a_row_only(tmp_path):
    spec = loading.parse(sized(tmp_path, 2, languages=["en"], train={"enabled": False}))
    assert estimate.estimate(spec)["rows"]["by_label"] == {"neg": 1, "pos": 1}  # the plan report is JSON


# -- 5. answer budgets from the longest valid answer --------------------------------------------


HARD_LABELS = [{"id": "q", "desc": 'says "hello" {in} braces'}, {"id": "e", "desc": "😀 emoji 中文 عربي"},
               {"id": "b", "desc": "back\\slash | pipe"}]


def test_judge_questions_keep_hard_names_and_need_one_token(tmp_path):
    """Issue 26 cut the judge's JSON answers short on names like these; a judgement (issue 28)
    reads one token, the option letters', whose ids are distinct in the model's tokenizer."""
    from anyclf_ray.filters import label_check

    spec = loading.parse(tiny_raw(tmp_path, "hard", labels=HARD_LABELS, multi_label={"enabled": True},
                                 label_check={"enabled": True}, **{k: None for k in config.SIZE_FIELDS},
                                 n_record_to_generate=60))
    questions = label_check.judge_questions(label_check.scheme(spec), pa.table({"id": ["1"], "text": ["some text"]}))
    assert [question.kind for question in questions] == [0, 1, 2]
    for question, label in zip(questions, HARD_LABELS):
        assert f"express the label {json.dumps(label['desc'], ensure_ascii=False)}?" in question.prompt
        assert question.prompt.count("some text") == 1 and "A. yes\nB. no" in question.prompt
    request = judgement.request(questions[0])
    assert (request["max_tokens"], request["options"], request["temperature"]) == (1, ["A", "B"], 0.0)
    tokenizer = budgets.tokenizer("builtin:tiny-random")
    assert len(set(engine.option_ids(tokenizer, tuple(judgement.LETTERS)))) == 26
    with pytest.raises(ValueError, match="do not start with distinct tokens"):
        engine.option_ids(tokenizer, ("yes", "yes please"))


# -- 6. defaults and names that agree -----------------------------------------------------------


def test_a_multi_label_run_defaults_to_the_llm_judge(tmp_path, capsys):
    raw = sized(tmp_path, 60, languages=["en"], multi_label={"enabled": True}, label_check={"enabled": True})
    assert loading.parse(raw).label_check.methods == ["llm"]
    assert loading.parse(sized(tmp_path, 60, label_check={"enabled": True})).label_check.methods == ["crossfit"]
    code, out = plan_cli(tmp_path, raw, capsys)
    assert code == 0 and json.loads(out.out)["checks"]["label_check"] == {"methods": ["llm"], "action": "remove"}


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"schema_version": 1, "stage": "gen', r"is not a manifest this anyclf-ray can read \(Unterminated string"),
    (b"", r"is not a manifest this anyclf-ray can read \(Expecting value"),
    (b'{"schema_version": "1"}', r"was written by another anyclf-ray \(manifest schema '1', this one reads 1\)"),
])
def test_a_cut_or_foreign_manifest_is_refused_in_one_line(raw, message):
    from anyclf_ray.core import results

    with pytest.raises(ConfigError, match=f"^run_id: runs/x/manifest.json {message}"):
        results.read(raw, GenerationReport, "runs/x/manifest.json")


def test_every_stage_has_its_command():
    commands = {stage: command for command, (_, stage) in cli.COMMANDS.items() if stage}
    assert set(commands) == {cls.name for cls in pipeline.STAGES}
    assert all(cls(loading.parse(tiny_raw("runs", "x"))).command == commands[cls.name] for cls in pipeline.STAGES)


def test_the_missing_stage_message_names_the_command(tmp_path, capsys):
    raw = tiny_raw(tmp_path, "nothing", label_check={"enabled": True})
    code = cli.main(["dedup", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    assert code == cli.EXIT_BAD_INPUT
    assert one_line(capsys).endswith("run `anyclf-ray label-check` (or `anyclf-ray run`) first")


@pytest.mark.parametrize("also, message", [
    (["zz"], "language_check.also_detect: unknown language code 'zz'"),
    (["ay"], "language_check.also_detect: the language check cannot detect 'ay'"),  # ISO, but not lingua's
])
def test_every_section_is_checked_whichever_command_runs(tmp_path, capsys, also, message):
    raw = tiny_raw(tmp_path, "lang", language_check={"enabled": True, "also_detect": also})
    assert cli.main(["generate", "--config", str(write_spec(tmp_path / "spec.yaml", raw))]) == cli.EXIT_BAD_INPUT
    assert one_line(capsys).startswith(f"anyclf-ray: error: {message}")


# -- 7. an unreachable model id is refused at once ----------------------------------------------


@pytest.mark.parametrize("offline", ["1", "0"])
def test_an_unreachable_hub_embedder_is_refused_quickly_in_one_line(tmp_path, offline):
    # Two languages default dedup and training to a multilingual hub model this machine lacks.
    raw = tiny_raw(tmp_path, "hub")
    del raw["dedup"], raw["train"]
    path = write_spec(tmp_path / "spec.yaml", raw)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "anyclf_ray.cli", "dedup", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**_env(), "HF_HUB_OFFLINE": offline})
    assert done.returncode == cli.EXIT_BAD_INPUT
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("anyclf-ray: error: dedup.model: 'sentence-transformers/paraphrase-multilingual")
    assert time.perf_counter() - started < 30  # was 47 s of HTTP retries


def _env() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}


# -- 9. names render intact ---------------------------------------------------------------------


WRITTEN = ['a | b', 'x`y', 'line one\nline two', '<b>bold</b> & *stars* _u_', 'costs $5 and $10', "back\\slash",
           "中文 标签", "😀"]


def test_the_cards_show_names_as_written():
    for value in WRITTEN:
        cell, inline = cards.text(value), cards.code(value)
        assert "\n" not in cell + inline and not re.search(r"(?<!\\)\|", cell)
        assert "|" not in inline.replace("&#124;", "")
        assert "<b>" not in cell  # HTML is shown, not rendered (a code span shows it as written)
    assert cards.text('a | b') == "a \\| b" and cards.code("plain id") == "`plain id`"
    assert cards.code("x`y") == "<code>x`y</code>" and cards.text("l1\nl2") == "l1<br>l2"


def test_a_dataset_card_with_hard_names_keeps_its_table_and_header(tmp_path):
    labels = [{"id": "a|b", "desc": 'quote " and\nnewline'}, {"id": "c", "desc": "costs $5 | 中文"}]
    spec = loading.parse(tiny_raw(tmp_path, "card", labels=labels))
    result = StageResult[GenerationReport].model_validate({
        "run_id": "card", "stage": "generate", "finished_at": "2026-01-01T00:00:00+00:00", "fingerprint": "f",
        "inputs": [], "settings": {}, "output": str(tmp_path), "rows": {"output": 2},
        "report": {"sizes": spec.sizes(), "versions": {}, "plan": {},
                   "rows": {"expected": 2, "written": 2, "missing": 0}, "languages": [],
                   "counts": {"by_label": [{"label": "a|b", "rows": 1}, {"label": "c", "rows": 1}]},
                   "failures": {}, "llm": {}, "engine": {}}})
    card = cards.dataset_card(spec, "card", [(Generate(spec), result)], scheme(spec).columns_text)
    header = card.split("---")[1]
    import yaml

    assert yaml.safe_load(header)["configs"][0]["config_name"] == "default"
    table = [line for line in card.splitlines() if line.startswith("| ")]
    assert table[1:] == ["| <code>a&#124;b</code> | quote \" and<br>newline | 1 |", "| `c` | costs $5 \\| 中文 | 1 |"]


def test_plots_draw_names_verbatim(monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_png", lambda figure: drawn.append(figure) or b"png")
    plots.heatmap(np.eye(len(WRITTEN)), WRITTEN, WRITTEN, "label", "label", "rows")
    plots.scatter(np.zeros((len(WRITTEN), 2)), WRITTEN, "map")
    heat, scatter = drawn
    ticks = [tick.get_text() for tick in heat.axes[0].get_yticklabels()]
    assert [tick.replace("\\$", "$") for tick in ticks] == WRITTEN
    legend = [text.get_text() for text in scatter.axes[0].get_legend().get_texts()]
    assert sorted(t.replace("\\$", "$") for t in legend) == sorted(WRITTEN)
    assert plots.missing_glyphs(["plain ascii", "$5"]) == ""


# -- the tree's placeholders --------------------------------------------------------------------


@pytest.mark.parametrize("item", ["source_type1", "text2,", "./subfolder/text01.json,", "https://www.example.com/a",
                                  "www.example.org", "item 3", "Topic2", "customer_reviews", "C:/docs/report", "a/b/c",
                                  "source-type1", "text", "Topic"])
def test_placeholders_are_no_tree_items(item):
    assert items.problem(item, 0, [], "", names=True) == "placeholder"
    assert items.problem(item, 0, [], "", names=False) != "placeholder"  # an example's text may hold a URL


@pytest.mark.parametrize("item", ["COVID-19 vaccines", "MP3 players", "G20 summit", "AC/DC concerts", "TCP/IP",
                                  "24/7 support", "Node.js tutorials", "Q&A forums", "iPhone 12 reviews"])
def test_real_topics_are_tree_items(item):
    assert items.problem(item, 0, [], "", names=True) is None


# -- no traceback for bad input, whatever the command -------------------------------------------


@pytest.mark.parametrize("command", [*cli.COMMANDS, "plan"])
def test_every_command_answers_malformed_input_in_one_line(tmp_path, capsys, command):
    for content, expected in ((b"instruction: [unclosed", "not valid YAML"), (b"- a\n- b\n", "must be a mapping"),
                              (b"\xff\xfe\x00binary", "not UTF-8 text"), (b"labels: 3\n", "instruction: is required")):
        (tmp_path / "spec.yaml").write_bytes(content)
        assert cli.main([command, "--config", str(tmp_path / "spec.yaml")]) == cli.EXIT_BAD_INPUT
        line = one_line(capsys)
        assert line.startswith("anyclf-ray: error: ") and expected in line, line


def test_predict_answers_malformed_input_in_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_head.pkl").write_bytes(b"")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "texts.csv").write_text("body\nhello\n")
    for path, column, expected in ((tmp_path / "corrupt.parquet", "text", "--input: cannot read"),
                                   (tmp_path / "empty.jsonl", "text", "--text-column: "),
                                   (tmp_path / "texts.csv", "text", "--text-column: "),
                                   (tmp_path / "missing.csv", "text", "--input: "),
                                   (tmp_path / "texts.xlsx", "text", "--input: ")):
        code = cli.main(["predict", "--model", str(model), "--input", str(path), "--output", str(tmp_path / "out"),
                         "--text-column", column])
        assert code == cli.EXIT_BAD_INPUT, path
        assert one_line(capsys).startswith(f"anyclf-ray: error: {expected}")


def test_an_address_nobody_answers_is_refused_at_once(tmp_path, capsys, ray_down):
    raw = tiny_raw(tmp_path, "addr")
    write_generated(loading.parse(raw), [("1", "neg", "en", "text")])
    started = time.perf_counter()
    code = cli.main(["dedup", "--config", str(write_spec(tmp_path / "spec.yaml", raw)), "--address", "127.0.0.1:9"])
    assert code == cli.EXIT_BAD_INPUT and time.perf_counter() - started < 30  # Ray alone retries for minutes
    assert one_line(capsys).startswith("anyclf-ray: error: --address: no Ray cluster answers at ")


def test_something_else_at_the_address_is_not_taken_for_a_cluster(tmp_path, capsys, ray_down):
    """A web server, not a Ray GCS, at the address: refused in one line, as the user typed it."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's log is not the command's output
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    raw = tiny_raw(tmp_path, "web")
    write_generated(loading.parse(raw), [("1", "neg", "en", "text")])
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        code = cli.main(["dedup", "--config", str(write_spec(tmp_path / "spec.yaml", raw)), "--address", address])
    finally:
        server.shutdown()
    assert code == cli.EXIT_BAD_INPUT
    assert one_line(capsys) == (f"anyclf-ray: error: --address: something answers at {address}, but not a Ray "
                                "cluster's GCS; start one (`ray start --head`), fix the address, or leave it out for "
                                "an embedded Ray")


def test_a_ray_client_address_is_refused_in_one_line(tmp_path, capsys, ray_down):
    raw = tiny_raw(tmp_path, "client")
    write_generated(loading.parse(raw), [("1", "neg", "en", "text")])
    code = cli.main(["dedup", "--config", str(write_spec(tmp_path / "spec.yaml", raw)), "--address",
                     "ray://127.0.0.1:10001"])
    assert code == cli.EXIT_BAD_INPUT
    assert one_line(capsys).startswith("anyclf-ray: error: --address: ray://127.0.0.1:10001 is a Ray Client address")


def test_plan_checks_every_stage_as_the_run_would(tmp_path, capsys):
    raw = tiny_raw(tmp_path, "plan-eval", train={"eval_set": {"path": str(tmp_path / "missing.csv")}})
    code = cli.main(["plan", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    assert code == cli.EXIT_BAD_INPUT and "train.eval_set" in one_line(capsys)


def test_an_oversized_tree_is_refused_naming_the_size_that_made_it(tmp_path):
    raw = tiny_raw(tmp_path, "big", n_source_type=100_000, n_topic=100_000)
    with pytest.raises(ConfigError, match=r"^n_source_type: 240,000,000,000 rows is more than"):
        loading.parse(raw)


def test_malformed_yaml_says_where(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text("instruction: x\nlabels: [{id: a, desc: b]\n")
    assert cli.main(["plan", "--config", str(tmp_path / "spec.yaml")]) == cli.EXIT_BAD_INPUT
    assert "not valid YAML at line 2, column " in one_line(capsys)


# -- 7. corpora to annotate (issue 28) ---------------------------------------------------------------


TEXTS = [("r1", "a fine day"), ("r2", "a bad day"), ("r3", "a day")]


@pytest.mark.parametrize(("write", "settings", "message"), [
    (lambda path: texts_file(path, TEXTS), {"text_column": "body"},
     r"^annotate.text_column: .*texts.parquet has no column 'body'; it has \['rid', 'review'\]$"),
    (lambda path: texts_file(path, []), {}, r"^annotate.path: .*texts.parquet holds no rows; give a corpus of texts$"),
    (lambda path: texts_file(path, TEXTS, review=["fine", None, " "]), {},
     r"^annotate.text_column: 2 of the 3 rows of .* have no text in 'review' \(null, missing or blank\); "),
    (lambda path: str(path.parent / "nowhere.parquet"), {}, r"^annotate.path: .*nowhere.parquet: no such file"),
    (lambda path: texts_file(path, TEXTS[:2], lang=["en", "xx"]), {"language_column": "lang"},
     r"^annotate.language_column: .* has language 'xx', not among languages \['en'\]"),
    (lambda path: texts_file(path, [("r1", "a fine day"), ("r1", "a bad day"), ("r2", "a day")]), {},
     r"^annotate.id_column: 1 of the 3 values of 'rid' in .* repeat an earlier one; give every text an id of its own"),
    (lambda path: texts_file(path, TEXTS, rid=["r1", None, "r3"]), {},
     r"^annotate.id_column: 1 of the 3 rows of .* have no id in 'rid'; fill them, or leave id_column unset"),
])
def test_bad_corpora_are_refused_in_one_line_before_ray_starts(tmp_path, capsys, no_cluster, write, settings, message):
    raw = annotate_raw(tmp_path, "bad", write(tmp_path / "texts.parquet"), **settings)
    code = cli.main(["annotate", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and len(err) == 1, err
    assert re.match(message, err[0].removeprefix("anyclf-ray: error: ")), err[0]
    assert not (tmp_path / "runs" / "bad" / "annotate").exists()


def test_ctrl_c_ends_in_one_line_with_the_shells_code(tmp_path, capsys, monkeypatch):
    """A run interrupted by Ctrl-C says how to resume, in one line, and exits 130, not a traceback."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    spec = write_spec(tmp_path / "spec.yaml", tiny_raw(tmp_path / "runs", "ctrl-c"))
    assert cli.main(["run", "--config", str(spec)]) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["anyclf-ray: interrupted; committed parts are kept, run the same command to resume"]
