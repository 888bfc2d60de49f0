"""Token arithmetic of answer budgets: how many tokens a JSON answer of a given size can take.

In: item counts, keys and character limits, and the run's languages. Out: token counts, from a
cautious characters-per-token figure (no tokenizer needed: the spec is checked before any model
is loaded; ``llm.budgets`` counts prompts with the model's own tokenizer where it can).
"""

from __future__ import annotations

import math

# Characters per token when sizing an answer's token budget: a cautious figure for scripts
# written with spaces, and one character a token for scripts without them.
CHARS_PER_TOKEN = 3.0
DENSE_SCRIPT_LANGUAGES = {"zh", "ja", "ko", "th", "lo", "km", "my", "bo"}
# JSON around each item besides its text: {"<key>":""}, and the array's brackets.
ITEM_OVERHEAD_CHARS = 8
MIN_TEXT_CHARS = 20


def chars_per_token(languages: list[str]) -> float:
    return 1.0 if DENSE_SCRIPT_LANGUAGES & {code.lower()[:2] for code in languages} else CHARS_PER_TOKEN


def answer_tokens(n_items: int, key: str, max_chars: int, languages: list[str]) -> int:
    """Tokens that always hold a JSON array of ``n_items`` objects of at most ``max_chars``."""
    chars = n_items * (max_chars + len(key) + ITEM_OVERHEAD_CHARS) + 2
    return math.ceil(chars / chars_per_token(languages))
