"""The AnyClassifier prompts and the JSON schemas that constrain their answers.

In: the job's instruction, labels and one tree node. Out: a chat prompt and a JSON schema
asking for exactly ``n`` items. The wording follows the seed design (source type, topic,
subtopic, generate); the fixes over the original are that the label's name (not its id) is
what the model reads, the subtopic reaches the generation prompt, and the language is asked for.
"""

from __future__ import annotations

import json

SOURCE_TYPE = (
    "I am building a document classifier to {instruction} with labels {labels}. "
    "Suggest {n} source type of information for efficient data acquisition.{in_language}\n"
    'Output JSON array. Each item contains key "source_type".'
)

TOPIC = (
    "I am building a document classifier to {instruction} with labels {labels}. "
    "I would like to collect collectively exhaustive taxonomy or topic for the label: "
    "{label} from {source_type}.\n\n"
    "<instruction>\n"
    "- Suggest {n} taxonomies or topics to further expand on this label.{in_language}\n"
    '- Output JSON array. Each item contains key "item"\n'
    "</instruction>"
)

SUBTOPIC = (
    "I am building document classifier to {instruction} with labels {labels}. "
    "I would like to collect collectively exhaustive subtopic under {topic} from {source_type}.\n\n"
    "<instruction>\n"
    "- Suggest {n} subtopic or keywords.{in_language}\n"
    '- Output JSON array. Each item contains key "item"\n'
    "</instruction>"
)

# What every generation prompt asks of its examples, after what it says of their labels.
_EXAMPLE_RULES = (
    "- Characteristics:\n"
    "  Topic: {topic}.\n"
    "  Subtopic: {subtopic}.\n"
    "  Source type: {source_type}\n"
    "- Generate {n} example.\n"
    "- {language_rule}\n"
    "- The example shall have a realistic length, and cannot be too short.\n"
    '- Output JSON array. Each item contains key "text"\n'
    "</instruction>"
)

GENERATE = (
    "I am building document classifier to {instruction} with labels {labels}. "
    "I would like to collect samples for the label: {label}.\n\n"
    "<instruction>\n"
    "- Generate realistic examples for a classification model that will predict label {label}.\n"
) + _EXAMPLE_RULES

# A multi-label run's generation prompt: the set's labels to express, the others to avoid.
GENERATE_MULTI = (
    "I am building a multi-label document classifier to {instruction} with labels {labels}. "
    "A text may carry several labels at once.\n\n"
    "<instruction>\n"
    "- Generate realistic examples for a classification model.\n"
    "{label_rules}"
) + _EXAMPLE_RULES


def label_set_rules(wanted: list[str], others: list[str]) -> str:
    """The multi-label prompt's lines on labels: express each of ``wanted``, none of ``others``."""
    lines = ""
    if wanted:
        listed = json.dumps(wanted, ensure_ascii=False)
        lines += f"- Each example must clearly express every one of these labels: {listed}.\n"
    if others:
        lines += f"- Each example must express none of these labels: {json.dumps(others, ensure_ascii=False)}.\n"
    return lines


# The key each kind of answer puts its items under, as in the seed prompts.
ITEM_KEY = {"source_type": "source_type", "topic": "item", "subtopic": "item", "generate": "text"}


def language_rule(language: str, translated: bool) -> str:
    """The generation prompt's language line: plain when the prompt is written in that language,
    insistent when an English prompt asks for another language (small models drift to English)."""
    if translated or language == "English":
        return f"Write every example in {language}."
    return f"Write every example in {language} only, never in English, although these instructions are in English."


def tree_language_rule(language: str | None) -> str:
    """The tree prompts' language sentence: none for a shared tree, else its items' language."""
    return f" Write every item in {language}." if language else ""


def render(template: str, **fields: object) -> str:
    """Fill ``template``; values are inserted verbatim (braces in user text stay as they are)."""
    return template.format_map(fields)


def items_schema(key: str, n: int, max_chars: int, pattern: str | None = None,
                 choices: list[str] | None = None) -> dict:
    """A JSON array of exactly ``n`` objects ``{key: string}``: one of ``choices`` if given, else
    a non-empty string of at most ``max_chars`` matching ``pattern`` (if any)."""
    if choices:
        value: dict = {"type": "string", "enum": list(choices)}
    else:
        value = {"type": "string", "minLength": 1, "maxLength": max_chars}
        if pattern:
            value["pattern"] = pattern
    return {
        "type": "array",
        "minItems": n,
        "maxItems": n,
        "items": {
            "type": "object",
            "properties": {key: value},
            "required": [key],
            "additionalProperties": False,
        },
    }


# Tokens a short answer's budget adds to its longest valid text: the end of the sequence.
ANSWER_SLACK = 4


def answer_budget(answer: object) -> int:
    """Tokens that always hold ``answer`` (a JSON value, the longest a schema allows) however the
    model spells it: every token is at least a byte, and a string may be written with ``\\u``
    escapes, so the bound is the byte length of its escaped JSON (no whitespace, as decoded)."""
    escaped = json.dumps(answer, ensure_ascii=True, separators=(",", ":"))
    return max(len(escaped), len(json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode())) + ANSWER_SLACK


# The judgements (``judgement.py``): the text first, so that the questions asked of one text
# share their prefix (vLLM's prefix cache), then lettered {options}; the answer's first token
# is read, never generated past.

# Which label does a text express (the label check's llm method, annotation).
JUDGE = (
    "I am building a document classifier to {instruction}.\n\n"
    "<text>\n{text}\n</text>\n\n"
    "Which of these labels does the text above express?\n{options}\n\n"
    "Answer with the letter of one label."
)

# Does a text express one label (a multi-label run: one question per label).
JUDGE_LABEL = (
    "I am building a multi-label document classifier to {instruction} with labels {labels}. "
    "A text may express several labels at once, or none of them.\n\n"
    "<text>\n{text}\n</text>\n\n"
    "Does the text above clearly express the label {label}?\n{options}\n\n"
    "Answer with the letter of one option."
)

# A multi-label run's prior (``pair_prior.py``): how often real texts carry two labels at once.
PAIR_PRIOR = (
    "I am building a multi-label document classifier to {instruction} with labels {labels}. "
    "A text may carry several labels at once.\n\n"
    "How often does a real text express both {first} and {second}?\n{options}\n\n"
    "Answer with the letter of one option."
)


# Error-driven rounds (``rounds/targeted.py``): a weak leaf asked again, harder; a confused pair
# (texts of {label} the classifier took for {other}); a misclassified real dev text's manner.
TARGETED_LEAF = (
    "I am building document classifier to {instruction} with labels {labels}. "
    "I would like to collect samples for the label: {label}. A classifier often gets texts of this kind "
    "wrong.\n\n"
    "<instruction>\n"
    "- Generate realistic examples that clearly carry label {label}, including ones harder than the usual.\n"
) + _EXAMPLE_RULES

TARGETED_CONFUSION = (
    "I am building document classifier to {instruction} with labels {labels}. "
    "A classifier took texts of the label: {label} for {other} when they were about this topic.\n\n"
    "<instruction>\n"
    "- Generate realistic examples that clearly carry label {label}, not {other}, while they share the topic "
    "that made the classifier say {other}.\n"
) + _EXAMPLE_RULES

TARGETED_DEV = (
    "I am building document classifier to {instruction} with labels {labels}. "
    "A classifier took this real text of the label: {label} for {other}:\n"
    "<example>\n{example}\n</example>\n\n"
    "<instruction>\n"
    "- Generate {n} new example in the manner of the one above (its kind of source, length and style), each "
    "clearly carrying label {label}.\n"
    "- Do not copy the example or any of its sentences.\n"
    "- {language_rule}\n"
    '- Output JSON array. Each item contains key "text"\n'
    "</instruction>"
)
