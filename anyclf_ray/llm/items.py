"""Valid items: what one item of an LLM answer (a tree node's name, an example's text) must be.

In: an item's text and its request's rules (``min_words``, ``echoes``, the prompt). Out: None
for a valid item, else the reason it is refused (``REASONS``). The engine's retry loop
(``engine.answer``) applies these checks and asks again for what is missing; the same checks
shape the JSON schema (``text_pattern``), so a constrained decoder cannot write JSON syntax into
a string in the first place, and an unconstrained engine is still held to them.
"""

from __future__ import annotations

import math
import re
import unicodedata

REASONS = ("json_syntax", "too_short", "echo", "repeated", "not_a_choice", "placeholder")

# JSON's structural characters and escapes, and control characters other than line breaks and
# tabs. Inside a string they mean the model lost track of the JSON around it
# (`source_type1},{`, `\u0000`): real examples of a text classifier do not need them.
REFUSED_CHARACTERS = r'{}\[\]"\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f'
JSON_SYNTAX = re.compile(f"[{REFUSED_CHARACTERS}]")
# Scripts written without spaces between words: a word per character (Chinese, Japanese kana),
# or a word per few characters (Thai, Lao, Myanmar, Khmer, Tibetan).
CHARACTER_SCRIPTS = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
SYLLABIC_SCRIPTS = r"\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"
CHARACTER_WORDS = re.compile(f"[{CHARACTER_SCRIPTS}]")
SYLLABIC_RUNS = re.compile(f"[{SYLLABIC_SCRIPTS}]")
# Spaces next to a character of those scripts separate no words: they are dropped in comparison.
UNSPACED_GAP = re.compile(f"(?<=[{CHARACTER_SCRIPTS}{SYLLABIC_SCRIPTS}]) +| +(?=[{CHARACTER_SCRIPTS}{SYLLABIC_SCRIPTS}])")
CHARS_PER_SYLLABIC_WORD = 3
WORD = re.compile(r"\w+")
# A tree item that names no topic: a URL, a file path, an identifier (``source_type1``,
# ``text_2``), or a placeholder word with a number (``item 3``, ``Topic2``): what a model
# writes when it fills the schema instead of answering.
URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)", re.IGNORECASE)
PATH = re.compile(r"^(?:~|\.{0,2})/|^\w:\\|^[^\s/]+(?:/[^\s/]+){2,}$|^\S+\.(?:json|txt|csv|md|html?|xml|py|pdf|docx?)$",
                  re.IGNORECASE)
IDENTIFIER = re.compile(r"^[^\W\d]\w*_\w*$")
PLACEHOLDER = re.compile(r"^(?:item|text|topic|subtopic|source[ _]?type|label|example|sample|category|keyword|"
                         r"placeholder|name|value|string)[ _-]?\d+$", re.IGNORECASE)
# Punctuation a model leaves around a fragment (``text2,``) before it is judged.
TRAILING = " ,;:.'`"


def text_pattern() -> str:
    """The regex a constrained decoder holds every free-text item to: no JSON syntax, and a
    first character that is not a space."""
    return rf"^[^{REFUSED_CHARACTERS}\s][^{REFUSED_CHARACTERS}]*$"


def normalise(text: str) -> str:
    """The form items are compared in (exact dedup, repeats, echoes): NFKC (full-width forms as
    ASCII), case-folded (a no-op for scripts without case), runs of whitespace as one space, and
    none beside Chinese, Japanese, Thai and the other scripts written without spaces."""
    return UNSPACED_GAP.sub("", " ".join(unicodedata.normalize("NFKC", text).casefold().split()))


def word_count(text: str) -> int:
    """Words in ``text``, counting scripts without spaces by characters."""
    characters = len(CHARACTER_WORDS.findall(text))
    syllabic = len(SYLLABIC_RUNS.findall(text))
    rest = SYLLABIC_RUNS.sub(" ", CHARACTER_WORDS.sub(" ", text))
    return characters + math.ceil(syllabic / CHARS_PER_SYLLABIC_WORD) + len(WORD.findall(rest))


def _words(text: str) -> set[str]:
    return set(WORD.findall(normalise(text)))


def is_placeholder(item: str) -> bool:
    """Whether a tree item is a URL, a file path, an identifier or a numbered placeholder."""
    bare = item.strip(TRAILING)
    return any(pattern.search(bare) for pattern in (URL, PATH, IDENTIFIER, PLACEHOLDER))


def problem(item: str, min_words: int, echoes: list[str], prompt: str, names: bool = False) -> str | None:
    """Why ``item`` is refused, or None. ``echoes`` are the request's own words (label name,
    topic, subtopic, source type): an item made only of them, or copied out of the prompt, says
    nothing new. ``names``: the item names a tree node, so ``is_placeholder`` refuses it too."""
    if JSON_SYNTAX.search(item):
        return "json_syntax"
    if names and is_placeholder(item):
        return "placeholder"
    if word_count(item) < min_words:
        return "too_short"
    if echoes:
        folded = normalise(item)
        echoed = set().union(*(_words(echo) for echo in echoes))
        if folded in normalise(prompt) or _words(item) <= echoed:
            return "echo"
    return None
