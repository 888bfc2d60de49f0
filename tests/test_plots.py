"""Figures a reader reads right (issue 31): labels named by their descriptions, topics named,
cell counts legible on any shade, titles whole. Drawn for real, inspected before rendering."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import label_scheme

from anyclf_ray.core import plots


@pytest.fixture()
def drawn(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_png", lambda figure: figures.append(figure) or b"png")
    return figures


def test_bars_name_each_topic_largest_first_and_say_how_many_are_left_out(drawn):
    topics = {f"topic {i:02d}": 30 - i for i in range(plots.TOP_BARS + 3)}
    plots.bars({"negative (neg)": {"hotels": 1, "kitchen appliances": 5}, "positive (pos)": topics}, "rows", "rows")
    (figure,) = drawn
    first, second = figure.axes
    assert [tick.get_text() for tick in first.get_yticklabels()] == ["kitchen appliances", "hotels"]
    assert first.get_title(loc="left") == "negative (neg)"
    assert [tick.get_text() for tick in second.get_yticklabels()] == [f"topic {i:02d}" for i in range(plots.TOP_BARS)]
    assert second.get_title(loc="left") == f"positive (pos), the {plots.TOP_BARS} largest of {plots.TOP_BARS + 3}"


def test_heatmap_counts_are_dark_on_light_cells_and_light_on_dark_ones(drawn):
    plots.heatmap(np.array([[6], [11], [2]]), ["a", "b", "c"], ["en"], "label", "language", "rows")
    (figure,) = drawn
    colours = {text.get_text(): text.get_color() for text in figure.axes[0].texts}
    # The scale starts at 0: 6 of 11 is past the middle, 2 of 11 is not.
    assert colours == {"6": "white", "11": "white", "2": "black"}


def test_a_long_title_is_wrapped_and_long_names_are_cut(drawn):
    title = "held_out\naccuracy 0.800, macro_f1 0.762, weighted_f1 0.781"
    long_name = "a label description far longer than any tick label should be"
    plots.heatmap(np.eye(2), [long_name, "b"], [long_name, "b"], "true", "predicted", title)
    (figure,) = drawn
    axes = figure.axes[0]
    assert all(len(line) <= 2.5 * 9 for line in axes.get_title().splitlines())
    assert axes.get_title().replace("\n", " ").replace("  ", " ") == title.replace("\n", " ")
    name = axes.get_yticklabels()[0].get_text()
    assert len(name) <= plots.NAME_CHARS and name.endswith("…") and long_name.startswith(name[:-1])


def test_labels_are_shown_by_description_with_their_id():
    labels = label_scheme("neg", "pos")
    assert [labels.shown(label) for label in labels.ids] == ["the neg kind (neg)", "the pos kind (pos)"]
