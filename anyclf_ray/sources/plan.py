"""The plan: stable ids, how many examples each leaf gets, and the LLM requests of every stage.

In: a ``JobSpec`` and the tree built so far. Out: Arrow tables of requests (one row per LLM call,
with its prompt) and the per-leaf sample counts. Pure functions: no Ray, no model.

A tree is shared by every language (``language`` null) or holds one tree per language
(``tree_languages``); either way a generation leaf is a (language, tree row) pair.

Ids are positional, so they do not depend on what the LLM wrote: a leaf is
``(language, label, source_type_index, topic_index, subtopic_index)`` and an example is a leaf
plus its sample index. Two runs of one spec give the same ids, and an edited tree keeps them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from anyclf_ray.core.config import JobSpec, language_name
from anyclf_ray.core.ids import stable_id
from anyclf_ray.core.tokens import answer_tokens
from anyclf_ray.labels import label_sets
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.llm import engine, prompts

TREE_SCHEMA = pa.schema(
    [
        ("language", pa.string()),  # null: a shared tree's node, read by every language
        ("label", pa.string()),
        ("label_name", pa.string()),
        ("source_type_index", pa.int32()),
        ("source_type", pa.string()),
        ("topic_index", pa.int32()),
        ("topic", pa.string()),
        ("subtopic_index", pa.int32()),
        ("subtopic", pa.string()),
    ]
)
TREE_LEVELS = ("source_type", "topic", "subtopic")
# What a generation request carries beside its prompt and rules: its leaf (with the ``labels``
# and ``label_names`` of its set: one label, or a multi-label run's set), its samples' place.
GENERATION_FIELDS = {"stage": pa.string(), **dict(zip(TREE_SCHEMA.names, TREE_SCHEMA.types)),
                     "labels": pa.list_(pa.string()), "label_names": pa.list_(pa.string()),
                     "leaf_id": pa.string(), "first_sample": pa.int32()}


def leaf_id(language: str, label: str, source_type_index: int, topic_index: int, subtopic_index: int) -> str:
    return stable_id("leaf", language, label, source_type_index, topic_index, subtopic_index)


def example_id(leaf: str, sample_index: int) -> str:
    return stable_id("example", leaf, sample_index)


def _request(stage: str, request_id: str, prompt: str, n_items: int, max_chars: int, max_tokens: int, **key) -> dict:
    return {
        "stage": stage,
        "request_id": request_id,
        "prompt": prompt,
        "item_key": prompts.ITEM_KEY[stage],
        "n_items": n_items,
        "max_chars": max_chars,
        "max_tokens": max_tokens,
        **key,
    }


# The fields that name a node of each tree level (after its language in a tree per language),
# and the template that expands it.
NODE_KEYS = {
    "source_type": (),
    "topic": ("label", "source_type_index"),
    "subtopic": ("label", "source_type_index", "topic_index"),
}
TEMPLATES = {"source_type": prompts.SOURCE_TYPE, "topic": prompts.TOPIC, "subtopic": prompts.SUBTOPIC}
SIZE_OF_LEVEL = {"source_type": "n_source_type", "topic": "n_topic", "subtopic": "n_subtopic"}


def node_keys(level: str, spec: JobSpec) -> tuple[str, ...]:
    """What names a node of ``level``; a shared tree's nodes keep the ids they had before trees
    per language existed, so its requests, and their seeds, are the same."""
    return ("language", *NODE_KEYS[level]) if spec.tree_languages == "per_language" else NODE_KEYS[level]


def tree_requests(level: str, spec: JobSpec, tree_rows: list[dict]) -> list[dict]:
    """One request per node of ``level`` whose parent has text: it asks for the node's children.

    ``tree_rows`` is the tree so far (``full_tree`` rows, filled level by level). A node of a
    per-language tree is asked in its language's words, for items written in it. A tree answer's
    token budget grows past ``sampling.max_tokens`` when ``n`` items of ``max_item_chars`` need
    more: tree passes are few and short, and a level cut off would cost its whole subtree.
    """
    keys, labels = node_keys(level, spec), scheme(spec)
    parent = TREE_LEVELS[TREE_LEVELS.index(level) - 1] if level != TREE_LEVELS[0] else None
    n = spec.sizes()[SIZE_OF_LEVEL[level]]
    max_chars = spec.sampling.max_item_chars
    max_tokens = max(spec.sampling.max_tokens, answer_tokens(n, prompts.ITEM_KEY[level], max_chars, spec.languages))
    nodes: dict[tuple, dict] = {}
    for row in tree_rows:
        if parent is None or row[parent] is not None:
            nodes.setdefault(tuple(row[k] for k in keys), row)
    return [
        _request(
            level,
            stable_id(level, *node),
            prompts.render(
                TEMPLATES[level], instruction=spec.instruction_by_language.get(row["language"], spec.instruction),
                labels=labels.labels_text(row["language"]), n=n, label=labels.label_text(row["label"], row["language"]),
                source_type=row["source_type"], topic=row["topic"],
                in_language=prompts.tree_language_rule(row["language"] and language_name(row["language"])),
            ),
            n,
            max_chars,
            max_tokens,
            names=True,
            **dict(zip(keys, node)),
        )
        for node, row in nodes.items()
    ]


def full_tree(spec: JobSpec) -> pa.Table:
    """Every planned leaf position with no text yet: the frame the LLM's answers fill in.

    Built column by column (no row dicts), so planning a 10M-row spec stays small."""
    sizes = spec.sizes()
    trees = spec.languages if spec.tree_languages == "per_language" else [None]
    shape = (len(trees), len(spec.labels), sizes["n_source_type"], sizes["n_topic"], sizes["n_subtopic"])
    # Each position's index at every level: level k's range, each value repeated for the levels below.
    tree, label, s, t, u = (np.tile(np.repeat(np.arange(n, dtype=np.int32), math.prod(shape[k + 1:])),
                                    math.prod(shape[:k])) for k, n in enumerate(shape))
    no_text = pa.nulls(len(tree), pa.string())
    return pa.table(
        {"language": pa.array(trees, pa.string()).take(tree),
         "label": pa.array([item.id for item in spec.labels]).take(label),
         "label_name": pa.array([item.desc for item in spec.labels]).take(label),
         "source_type_index": s, "source_type": no_text, "topic_index": t, "topic": no_text,
         "subtopic_index": u, "subtopic": no_text},
        schema=TREE_SCHEMA,
    )


# -- generation requests ---------------------------------------------------------------------


def on_leaf(spec: JobSpec, tree: pa.Table) -> np.ndarray:
    """``[language, tree row]``: whether the row is a leaf of that language. A shared row serves
    every language, a per-language row its own."""
    shared = tree.column("language").is_null().to_numpy(zero_copy_only=False)
    own = [pc.equal(tree.column("language"), code).fill_null(False).to_numpy(zero_copy_only=False)
           for code in spec.languages]
    return np.stack([shared | mine for mine in own])


def label_index(spec: JobSpec, tree: pa.Table) -> np.ndarray:
    """Each tree row's label as its position in ``spec.labels``."""
    return pc.index_in(tree.column("label"), pa.array([label.id for label in spec.labels])).to_numpy()


def leaf_groups(spec: JobSpec, tree: pa.Table) -> Iterator[tuple[np.ndarray, ...]]:
    """Every (language, tree row, set, samples) leaf of ``tree``, in groups (the label scheme's
    ``leaf_samples``), its sets weighed by the LLM's prior when the tree holds one."""
    return scheme(spec).leaf_samples(on_leaf(spec, tree), label_index(spec, tree), label_sets.prior(tree))


def samples_per_leaf(spec: JobSpec, tree: pa.Table) -> np.ndarray:
    """Examples wanted for each (language, tree row): ``counts[language, row]`` (0 off its leaves)."""
    counts = np.zeros((len(spec.languages), tree.num_rows), np.int32)
    for language, row, _, n_samples in leaf_groups(spec, tree):
        np.add.at(counts, (language, row), n_samples)
    return counts


def leaf_table(spec: JobSpec, tree: pa.Table) -> pa.Table:
    """One row per complete leaf to generate: the tree row, its ``language``, the ``labels`` and
    ``label_names`` of its set, and ``n_samples``.

    The languages take turns (a language's k-th leaf, then the next language's), so every
    language is under way from the start: the early-stop verdict on a pass's first answers is
    not one language's, and a run cut short holds some of every language.
    """
    lang, row, set_index, n_samples = (np.concatenate(column) for column in zip(*leaf_groups(spec, tree)))
    complete = np.ones(tree.num_rows, bool)
    for level in TREE_LEVELS:
        complete &= tree.column(level).is_valid().to_numpy(zero_copy_only=False)
    keep = complete[row]
    lang, row, set_index, n_samples = lang[keep], row[keep], set_index[keep], n_samples[keep]
    turn = np.concatenate([np.arange(n) for n in np.bincount(lang, minlength=len(spec.languages))])
    order = np.lexsort((lang, turn))
    lang, row, set_index, n_samples = lang[order], row[order], set_index[order], n_samples[order]
    leaves = tree.take(row).drop_columns(["language"])
    leaves = leaves.add_column(0, "language", pa.array(spec.languages).take(lang))
    labels = scheme(spec)
    sets = labels.sets(label_sets.prior(tree))
    for column, names in (("labels", labels.ids), ("label_names", labels.descs)):
        values = pa.array([[names[i] for i in members] for members in sets], pa.list_(pa.string()))
        leaves = leaves.append_column(column, values.take(pa.array(set_index)))
    return leaves.append_column("n_samples", pa.array(n_samples, pa.int32()))


def render_requests(spec: JobSpec, leaves: pa.Table) -> pa.Table:
    """The generation requests of ``leaves`` (``leaf_table`` rows): one per chunk of at most
    ``examples_per_request`` samples. Pure, so Ray Data can run it on blocks of leaves."""
    per_request, labels = spec.sampling.examples_per_request, scheme(spec)
    max_chars = spec.sampling.text_chars(spec.languages)
    requests = []
    for leaf in leaves.to_pylist():
        language, n_samples = leaf["language"], leaf.pop("n_samples")
        position = (leaf["source_type_index"], leaf["topic_index"], leaf["subtopic_index"])
        this_leaf = leaf_id(language, labels.leaf_key(leaf["labels"], leaf["label"]), *position)
        wanted = [labels.label_text(label, language) for label in leaf["labels"]]
        template, label_fields = labels.prompt(leaf["labels"], language)
        for first in range(0, n_samples, per_request):
            n = min(per_request, n_samples - first)
            prompt = prompts.render(
                template, instruction=spec.instruction_by_language.get(language, spec.instruction),
                labels=labels.labels_text(language), topic=leaf["topic"], subtopic=leaf["subtopic"],
                source_type=leaf["source_type"], n=n, **label_fields,
                language_rule=prompts.language_rule(language_name(language), language in spec.instruction_by_language),
            )
            requests.append(
                _request(
                    "generate", stable_id("generate", this_leaf, first), prompt, n, max_chars,
                    spec.sampling.max_tokens, leaf_id=this_leaf, first_sample=first,
                    min_words=spec.sampling.min_text_words, echoes=[*wanted, *(leaf[k] for k in TREE_LEVELS)], **leaf,
                )
            )
    return engine.requests_table(requests, GENERATION_FIELDS)


def generation_requests(spec: JobSpec, tree: pa.Table) -> pa.Table:
    """Every generation request of ``tree``, on the driver (tests, benches; a run renders them
    in Ray Data from ``leaf_table``)."""
    return render_requests(spec, leaf_table(spec, tree))


def request_count(spec: JobSpec, leaves: pa.Table) -> int:
    """How many requests ``render_requests`` makes of ``leaves``, without rendering them."""
    per_request = spec.sampling.examples_per_request
    return int(np.sum(-(-leaves.column("n_samples").to_numpy() // per_request)))


def expected_rows(spec: JobSpec, tree: pa.Table) -> dict[str, int]:
    """Planned rows per language."""
    return dict(zip(spec.languages, samples_per_leaf(spec, tree).sum(axis=1).tolist()))
