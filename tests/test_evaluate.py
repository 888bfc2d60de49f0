"""Evaluation without a model: reading real labelled sets in every format, and the metrics."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from conftest import label_scheme

from anyclf_ray.core.config import EvalSetSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.labels import metrics
from anyclf_ray.training import evaluate

TABLE = pa.table({"body": ["great phone", "awful food", "fine hotel", "broken again"], "stars": [5, 1, 4, 1]})
LABEL_MAP = {"5": "pos", "4": "pos", "1": "neg"}


def write_as(fmt: str, folder) -> str:
    path = folder / f"real.{fmt}"
    if fmt == "parquet":
        pq.write_table(TABLE, path)
    elif fmt == "csv":
        pyarrow.csv.write_csv(TABLE, path)
    elif fmt == "jsonl":
        path.write_text("".join(f'{{"body": "{b}", "stars": {s}}}\n' for b, s in zip(*TABLE.to_pydict().values())))
    else:  # a `datasets` folder, as save_to_disk writes it
        path = folder / "real-dataset"
        datasets.DatasetDict({"test": datasets.Dataset(TABLE)}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "datasets"])
def test_every_format_reads_to_the_same_texts_and_labels(tmp_path, fmt):
    settings = EvalSetSpec(path=write_as(fmt, tmp_path), text_column="body", label_column="stars", label_map=LABEL_MAP)
    found = evaluate.load_eval_set(settings, label_scheme("neg", "pos"))
    assert found.texts == ["great phone", "awful food", "fine hotel", "broken again"]
    assert found.labels == ["pos", "neg", "pos", "neg"] and found.languages is None
    assert found.skipped == {"null_text": 0, "null_label": 0}


def test_metrics_per_language_split_the_rows_by_their_language():
    # en: pos→pos, neg→neg; fr: pos→neg, neg→neg, pos→pos (neg 0, pos 1)
    by_language = {("fr", None): metrics.confusion([1, 0, 1], [0, 0, 1], 2),
                   ("en", None): metrics.confusion([1, 0], [1, 0], 2)}
    found = evaluate.split_metrics(by_language, lambda tally: metrics.metrics(tally, ["neg", "pos"]))
    assert found["rows"] == 5 and found["accuracy"] == pytest.approx(4 / 5)
    assert found["confusion_matrix"]["rows_true_columns_predicted"] == [[2, 0], [1, 2]]
    languages = found["by_language"]
    assert list(languages) == ["en", "fr"]
    assert {code: (m["rows"], m["accuracy"]) for code, m in languages.items()} == {"en": (2, 1.0), "fr": (3, 2 / 3)}
    assert "confusion_matrix" not in languages["fr"] and languages["fr"]["per_class"]["pos"]["support"] == 2
    assert "by_origin" not in found  # rows of a run that does not annotate have no origin


def test_metrics_per_origin_add_up_over_languages():
    # generated: en pos→pos, fr neg→pos; annotated: en neg→neg, pos→neg (neg 0, pos 1)
    tallies = {("en", "generated"): metrics.confusion([1], [1], 2), ("fr", "generated"): metrics.confusion([0], [1], 2),
               ("en", "annotated"): metrics.confusion([0, 1], [0, 0], 2)}
    found = evaluate.split_metrics(tallies, lambda tally: metrics.metrics(tally, ["neg", "pos"]))
    assert found["rows"] == 4 and found["accuracy"] == pytest.approx(2 / 4)
    origins = found["by_origin"]
    assert {origin: (m["rows"], m["accuracy"]) for origin, m in origins.items()} == {
        "annotated": (2, 0.5), "generated": (2, 0.5)}
    assert list(origins) == ["annotated", "generated"] and "confusion_matrix" not in origins["annotated"]
    assert origins["annotated"]["per_class"]["pos"]["recall"] == 0.0
    assert {code: m["rows"] for code, m in found["by_language"].items()} == {"en": 3, "fr": 1}


def test_rows_without_a_language_have_no_per_language_figures():
    found = evaluate.split_metrics({(None, None): metrics.confusion([0, 1], [0, 0], 2)},
                                   lambda tally: metrics.metrics(tally, ["neg", "pos"]))
    assert "by_language" not in found and found["rows"] == 2
    assert found["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_a_language_column_the_set_lacks_is_refused(tmp_path):
    settings = EvalSetSpec(path=write_as("csv", tmp_path), text_column="body", label_column="stars",
                           label_map=LABEL_MAP, language_column="lang")
    with pytest.raises(ConfigError, match=r"^train.eval_set.language_column: .* has no column 'lang'"):
        evaluate.load_eval_set(settings, label_scheme("neg", "pos"))


def test_an_unreadable_kind_of_file_is_refused(tmp_path):
    (tmp_path / "real.xlsx").write_bytes(b"")
    with pytest.raises(ConfigError) as error:
        evaluate.load_eval_set(EvalSetSpec(path=str(tmp_path / "real.xlsx")), label_scheme("neg", "pos"))
    assert str(error.value) == (
        f"train.eval_set.path: {tmp_path / 'real.xlsx'}: use Parquet, CSV or JSONL (.parquet, .csv, .jsonl), a Parquet "
        "folder or a local `datasets` folder"
    )


def test_metrics_of_a_known_confusion():
    truth = [2, 2, 2, 0, 0, 1]  # pos pos pos neg neg neu
    predicted = [2, 2, 0, 0, 2, 1]  # pos pos neg neg pos neu
    result = metrics.metrics(metrics.confusion(truth, predicted, 3), ["neg", "neu", "pos"])
    assert result["rows"] == 6 and result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_class"]["pos"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                          "f1": pytest.approx(2 / 3), "support": 3}
    assert result["per_class"]["neu"]["f1"] == 1.0
    assert result["macro_f1"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert result["weighted_f1"] == pytest.approx((2 * 0.5 + 1 + 3 * 2 / 3) / 6)
    assert result["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 0, 1], [0, 1, 0], [1, 0, 2]]
    assert label_scheme("neg", "neu", "pos").split_png(result, "check")[:8] == b"\x89PNG\r\n\x1a\n"


def test_multi_label_eval_sets_give_lists_or_delimited_text(tmp_path):
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"text": ["rain vote", "goal", "nothing"], "tags": [["w", "p"], ["s"], []]}), lists)
    delimited = tmp_path / "delimited.csv"
    delimited.write_text('text,tags\n"rain vote","w, p"\ngoal,s\nnothing,\n')
    label_map = {"w": "rain", "p": "vote", "s": "goal"}
    for path, separator in ((lists, None), (delimited, ",")):
        settings = EvalSetSpec(path=str(path), text_column="text", label_column="tags", label_map=label_map,
                               label_separator=separator)
        found = evaluate.load_eval_set(settings, label_scheme("rain", "vote", "goal", multi=True))
        assert found.texts == ["rain vote", "goal", "nothing"] and found.labels == ["rain|vote", "goal", ""]
    without_separator = EvalSetSpec(path=str(delimited), text_column="text", label_column="tags", label_map=label_map)
    with pytest.raises(ConfigError, match=r"^train.eval_set.label_separator: 'tags' holds text, not lists"):
        evaluate.load_eval_set(without_separator, label_scheme("rain", "vote", "goal", multi=True))


def test_multi_label_metrics_of_known_sets():
    true = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    predicted = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    # Added up batch by batch, as training streams them.
    tally = metrics.set_tally(true[:2], predicted[:2]) + metrics.set_tally(true[2:], predicted[2:])
    result = metrics.set_metrics(tally, ["a", "b", "c"])
    # tp (2, 2, 0), fp (0, 0, 1), fn (0, 0, 1): micro-F1 8 / 10; c's F1 is 0
    assert result["micro_f1"] == pytest.approx(0.8) and result["macro_f1"] == pytest.approx(2 / 3)
    assert result["subset_accuracy"] == 0.5 and result["hamming_loss"] == pytest.approx(2 / 12)
    assert result["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["per_label"]["a"]["support"] == 2 and result["rows"] == 4
    result["per_label"] = {label: {**figures, "threshold": 0.5} for label, figures in result["per_label"].items()}
    assert label_scheme("a", "b", "c", multi=True).split_png(result, "check")[:8] == b"\x89PNG\r\n\x1a\n"


def test_thresholds_are_tuned_per_label_for_f1():
    true = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    # a: its rows score 0.3 and 0.35, the others at most 0.2, so the cut is 0.3 (nearest 0.5 of
    # the perfect ones); b: its row and one other score 0.1, so 0.1 (F1 2/3); c has no rows
    # (F1 0 everywhere), so 0.5 stays.
    scores = np.array([[0.3, 0.1, 0.0], [0.35, 0.0, 0.2], [0.2, 0.05, 0.0], [0.1, 0.1, 0.0]])
    counts = metrics.threshold_counts(true[:2], scores[:2]) + metrics.threshold_counts(true[2:], scores[2:])
    assert counts.shape == (len(metrics.THRESHOLDS), 3, 3)
    assert metrics.tuned_thresholds(counts).tolist() == [0.3, 0.1, 0.5]
