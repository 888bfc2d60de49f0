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
import textwrap
import warnings

import numpy as np

# Names longer than this are cut in ticks and legends; bar panels show this many bars at most.
NAME_CHARS, TOP_BARS = 32, 12
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


def _title(axes, title: str, width_inches: float) -> None:
    """``title`` wrapped to ``width_inches`` (a title wider than its figure is cut off)."""
    characters = max(16, int(width_inches * 9))
    axes.set_title("\n".join(textwrap.fill(line, characters) for line in shown(title).splitlines()))


def short(name: str, characters: int = NAME_CHARS) -> str:
    """``name`` cut to ``characters`` with an ellipsis: tick labels and legends stay readable."""
    return name if len(name) <= characters else name[: characters - 1].rstrip() + "…"


def heatmap(counts: np.ndarray, rows: list[str], columns: list[str], ylabel: str, xlabel: str, title: str) -> bytes:
    """``counts[i, j]`` for row ``rows[i]`` and column ``columns[j]``, each cell written in;
    the colour scale starts at 0, so the colour reads as the count's share of the largest."""
    plt = _pyplot()
    counts = np.asarray(counts)
    rows, columns = [short(r) for r in rows], [short(c) for c in columns]
    # Room for the names beside and below the cells (about 0.08 inch a character at this size).
    cells = max(2.5, 0.7 * len(columns))
    width = 1.0 + 0.08 * max(map(len, rows), default=0) + cells
    height = 1.6 + 0.5 * len(rows) + 0.06 * max(map(len, columns), default=0)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(counts, cmap="Blues", aspect="auto", vmin=0, vmax=max(float(counts.max(initial=0)), 1e-9))
    axes.set_xticks(range(len(columns)), [shown(c) for c in columns], rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), [shown(r) for r in rows])
    axes.set_xlabel(shown(xlabel))
    axes.set_ylabel(shown(ylabel))
    _title(axes, title, cells)
    for (i, j), value in np.ndenumerate(counts):
        # Dark text on the light half of the scale, white on the dark half.
        axes.text(j, i, f"{value:g}", ha="center", va="center", color="white" if image.norm(value) > 0.5 else "black")
    return _png(figure)


def bars(values: dict[str, dict[str, int]], title: str, xlabel: str, top: int = TOP_BARS) -> bytes:
    """A panel of horizontal bars per group, each bar a name and its count (``values[group]``),
    largest on top, the ``top`` largest shown (the panel's title says how many there are)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    groups = list(values)
    ranked = {group: sorted(values[group].items(), key=lambda item: (-item[1], item[0])) for group in groups}
    shown_bars = [max(1, min(top, len(ranked[group]))) for group in groups]
    figure, all_axes = plt.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": shown_bars},
                                    figsize=(8, 0.9 + sum(0.6 + 0.3 * n for n in shown_bars)))
    for axes, group in zip(all_axes[:, 0], groups):
        chosen = ranked[group][:top]
        axes.barh(range(len(chosen)), [count for _, count in chosen], color="tab:blue")
        axes.set_yticks(range(len(chosen)), [shown(short(name)) for name, _ in chosen], fontsize="small")
        axes.invert_yaxis()
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        more = f", the {len(chosen)} largest of {len(ranked[group])}" if len(ranked[group]) > len(chosen) else ""
        axes.set_title(shown(f"{group}{more}"), fontsize="medium", loc="left")
    figure.suptitle(shown(title))
    all_axes[-1, 0].set_xlabel(shown(xlabel))
    return _png(figure)


def scatter(points: np.ndarray, groups: list[str], title: str) -> bytes:
    """2-D ``points`` coloured by their ``groups``, with a legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    names = np.asarray(groups, dtype=object)
    for group in sorted(set(groups)):
        chosen = names == group
        axes.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, label=shown(short(group)))
    axes.legend(markerscale=2, fontsize="small")
    axes.set_xticks([])
    axes.set_yticks([])
    _title(axes, title, 6)
    return _png(figure)
