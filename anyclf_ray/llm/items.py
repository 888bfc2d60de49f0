"""Valid items: what one item of an LLM answer (a tree node's name, an example's text) must be.

In: an item's text and its request's rules (``min_words``, ``echoes``, the prompt). Out: None
for a valid item, else the reason it is refused (``REASONS``). The engine's retry loop
(``engine.answer``) applies these checks and asks again for what is missing; the same checks
shape the JSON schema (``text_pattern``), so a constrained decoder cannot write JSON syntax into
a string in the first place, and an unconstrained engine is still held to them.
"""

from __future__ import annotations

import re

from anyclf_ray.core.text import normalise, word_count, words

REASONS = ("json_syntax", "too_short", "echo", "repeated", "not_a_choice", "placeholder")

# JSON's structural characters and escapes, and control characters other than line breaks and
# tabs. Inside a string they mean the model lost track of the JSON around it
# (`source_type1},{`, `\u0000`): real examples of a text classifier do not need them.
REFUSED_CHARACTERS = r'{}\[\]"\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f'
JSON_SYNTAX = re.compile(f"[{REFUSED_CHARACTERS}]")
# A tree item that names no topic: a URL, a file path, an identifier (``source_type1``,
# ``text_2``), or a placeholder word, alone or with a number (``text``, ``item 3``,
# ``source-type1``): what a model
# writes when it fills the schema instead of answering.
URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)", re.IGNORECASE)
PATH = re.compile(r"^(?:~|\.{0,2})/|^\w:\\|^[^\s/]+(?:/[^\s/]+){2,}$|^\S+\.(?:json|txt|csv|md|html?|xml|py|pdf|docx?)$",
                  re.IGNORECASE)
IDENTIFIER = re.compile(r"^[^\W\d]\w*_\w*$")
PLACEHOLDER = re.compile(r"^(?:item|text|topic|subtopic|source[ _-]?type|label|example|sample|category|keyword|"
                         r"placeholder|name|value|string)(?:[ _-]?\d+)?$", re.IGNORECASE)
# Punctuation a model leaves around a fragment (``text2,``) before it is judged.
TRAILING = " ,;:.'`"


def text_pattern() -> str:
    """The regex a constrained decoder holds every free-text item to: no JSON syntax, and a
    first character that is not a space."""
    return rf"^[^{REFUSED_CHARACTERS}\s][^{REFUSED_CHARACTERS}]*$"


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
        echoed = set().union(*(words(echo) for echo in echoes))
        if folded in normalise(prompt) or words(item) <= echoed:
            return "echo"
    return None
