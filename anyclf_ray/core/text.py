"""Text as the pipeline compares and counts it: one normal form, words in every script.

In: a text. Out: its normal form (``normalise``: exact dedup, repeated items, echoes, reserved
names) and its word count (``word_count``, scripts without spaces counted by character).
"""

from __future__ import annotations

import math
import re
import unicodedata

# Scripts written without spaces between words: a word per character (Chinese, Japanese kana),
# or a word per few characters (Thai, Lao, Myanmar, Khmer, Tibetan).
CHARACTER_SCRIPTS = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
SYLLABIC_SCRIPTS = r"\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"
CHARACTER_WORDS = re.compile(f"[{CHARACTER_SCRIPTS}]")
SYLLABIC_RUNS = re.compile(f"[{SYLLABIC_SCRIPTS}]")
# Spaces next to a character of those scripts separate no words: they are dropped in comparison.
UNSPACED = f"[{CHARACTER_SCRIPTS}{SYLLABIC_SCRIPTS}]"
UNSPACED_GAP = re.compile(f"(?<={UNSPACED}) +| +(?={UNSPACED})")
CHARS_PER_SYLLABIC_WORD = 3
WORD = re.compile(r"\w+")


def normalise(text: str) -> str:
    """The form texts are compared in: NFKC (full-width forms as ASCII), case-folded (a no-op
    for scripts without case), runs of whitespace as one space, and none beside Chinese,
    Japanese, Thai and the other scripts written without spaces."""
    return UNSPACED_GAP.sub("", " ".join(unicodedata.normalize("NFKC", text).casefold().split()))


def word_count(text: str) -> int:
    """Words in ``text``, counting scripts without spaces by characters."""
    characters = len(CHARACTER_WORDS.findall(text))
    syllabic = len(SYLLABIC_RUNS.findall(text))
    rest = SYLLABIC_RUNS.sub(" ", CHARACTER_WORDS.sub(" ", text))
    return characters + math.ceil(syllabic / CHARS_PER_SYLLABIC_WORD) + len(WORD.findall(rest))


def words(text: str) -> set[str]:
    """The distinct words of ``text`` in normal form."""
    return set(WORD.findall(normalise(text)))
