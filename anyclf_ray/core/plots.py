"""PNG figures for manifests and cards: a count heatmap, grouped bars and a 2-D scatter.

In: plain arrays and their names (label ids and descriptions as users wrote them: any Unicode,
quotes, backslashes, ``$``). Out: PNG bytes, ready for ``RunLocation.write_bytes``. Matplotlib
runs headless (Agg), so the figures render on any cluster node. Names are drawn as written
(``shown``: a ``$`` never starts TeX math), in DejaVu Sans with the Noto families as fallback
for other scripts where the node has them (``fonts-noto-core``, ``fonts-noto-cjk``);
``missing_glyphs`` names the characters no font on the node can draw.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np

# Fonts tried in order for each character; those not installed are skipped.
FONTS = ("DejaVu Sans", "Noto Sans", "Noto Sans CJK JP", "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Thai",
         "Noto Sans Devanagari", "Noto Color Emoji")


@functools.cache
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    matplotlib.rcParams["font.family"] = [name for name in FONTS if name in installed] or ["DejaVu Sans"]
    return plt


def shown(name: object) -> str:
    """``name`` as matplotlib draws it verbatim: ``$`` escaped, so no pair of them is TeX math."""
    return str(name).replace("$", r"\$")


def missing_glyphs(names: list[str]) -> str:
    """The characters of ``names`` that no installed font of ``FONTS`` can draw, in order."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    _pyplot()
    covered: set[int] = set()
    for family in _pyplot().rcParams["font.family"]:
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        covered |= set(FT2Font(path).get_charmap())
    wanted = dict.fromkeys(ch for name in names for ch in str(name) if not ch.isspace())
    return "".join(ch for ch in wanted if ord(ch) not in covered)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a glyph no font has is reported once, by missing_glyphs
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def heatmap(counts: np.ndarray, rows: list[str], columns: list[str], ylabel: str, xlabel: str, title: str) -> bytes:
    """``counts[i, j]`` for row ``rows[i]`` and column ``columns[j]``, each cell written in."""
    plt = _pyplot()
    counts = np.asarray(counts)
    figure, axes = plt.subplots(figsize=(max(4.0, 2 + 0.6 * len(columns)), max(3.0, 1.5 + 0.5 * len(rows))))
    axes.imshow(counts, cmap="Blues", aspect="auto")
    axes.set_xticks(range(len(columns)), [shown(c) for c in columns], rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), [shown(r) for r in rows])
    axes.set_xlabel(shown(xlabel))
    axes.set_ylabel(shown(ylabel))
    axes.set_title(shown(title))
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
        axes.set_ylabel(shown(group))
        axes.set_xticks([])
    all_axes[0, 0].set_title(shown(title))
    all_axes[-1, 0].set_xlabel(shown(xlabel))
    return _png(figure)


def scatter(points: np.ndarray, groups: list[str], title: str) -> bytes:
    """2-D ``points`` coloured by their ``groups``, with a legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    names = np.asarray(groups, dtype=object)
    for group in sorted(set(groups)):
        chosen = names == group
        axes.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, label=shown(group))
    axes.legend(markerscale=2, fontsize="small")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(shown(title))
    return _png(figure)
