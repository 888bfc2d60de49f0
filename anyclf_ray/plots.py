"""PNG figures for manifests and cards: a count heatmap, grouped bars and a 2-D scatter.

In: plain arrays and their names. Out: PNG bytes, ready for ``RunLocation.write_bytes``.
Matplotlib runs headless (Agg), so the figures render on any cluster node.
"""

from __future__ import annotations

import io

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def heatmap(counts: np.ndarray, rows: list[str], columns: list[str], ylabel: str, xlabel: str, title: str) -> bytes:
    """``counts[i, j]`` for row ``rows[i]`` and column ``columns[j]``, each cell written in."""
    plt = _pyplot()
    counts = np.asarray(counts)
    figure, axes = plt.subplots(figsize=(max(4.0, 2 + 0.6 * len(columns)), max(3.0, 1.5 + 0.5 * len(rows))))
    axes.imshow(counts, cmap="Blues", aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    for (i, j), value in np.ndenumerate(counts):
        axes.text(j, i, f"{value:g}", ha="center", va="center", color="white" if value > counts.max() / 2 else "black")
    return _png(figure)


def bars(values: dict[str, list[int]], title: str, xlabel: str) -> bytes:
    """One row of horizontal bars per group (``values[group]``, largest first), e.g. rows per topic."""
    plt = _pyplot()
    groups = list(values)
    figure, all_axes = plt.subplots(len(groups), 1, figsize=(7, max(2.5, 1.6 * len(groups))), squeeze=False)
    for axes, group in zip(all_axes[:, 0], groups):
        heights = sorted(values[group], reverse=True)
        axes.bar(range(len(heights)), heights, width=0.9, color="tab:blue")
        axes.set_ylabel(group)
        axes.set_xticks([])
    all_axes[0, 0].set_title(title)
    all_axes[-1, 0].set_xlabel(xlabel)
    return _png(figure)


def scatter(points: np.ndarray, groups: list[str], title: str) -> bytes:
    """2-D ``points`` coloured by their ``groups``, with a legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    groups = np.asarray(groups, dtype=object)
    for group in sorted(set(groups)):
        chosen = groups == group
        axes.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, label=str(group))
    axes.legend(markerscale=2, fontsize="small")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title)
    return _png(figure)
