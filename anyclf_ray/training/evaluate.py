"""Evaluation: the trained classifier on held-out synthetic rows and on an optional real set.

In: tallies per split and language, added up batch by batch as the rows stream past
(``train.py``; the label scheme makes them: a confusion matrix, or counts per label for label
sets); for the real set, its file and column settings (``train.eval_set``). Out: each split's
figures (``LabelScheme.metrics``: accuracy, macro- and weighted-F1, per-class figures and the
confusion matrix; for label sets micro- and macro-F1, subset accuracy, Hamming loss and
per-label figures with each label's threshold), by language where every row has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from anyclf_ray.core import tables
from anyclf_ray.core.config import EvalSetSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.labels.scheme import LabelScheme


@dataclasses.dataclass
class EvalSet:
    """A real labelled set, as the job's rows carry it: ``labels`` holds each row's label key
    (``LabelScheme.key``: a label id, or a set's ids joined); ``languages`` is None without
    ``language_column``; ``skipped`` counts the rows left out for a missing text or label
    (``null_text``, ``null_label``)."""

    texts: list[str]
    labels: list[str]
    languages: list[str | None] | None
    skipped: dict[str, int]


def load_eval_set(settings: EvalSetSpec, labels: LabelScheme, field: str = "train.eval_set") -> EvalSet:
    """The real set at ``settings.path`` (``tables.read``), its label values as job label ids
    through ``label_map``; rows without a text or a label are skipped and counted. ConfigError
    naming the field to fix (under ``field``: ``rounds.dev_set`` reads its set the same way)."""
    wanted = [("text_column", settings.text_column), ("label_column", settings.label_column)]
    if settings.language_column:
        wanted.append(("language_column", settings.language_column))
    other = [settings.language_column] if settings.language_column else []
    table, features = tables.read(settings.path, f"{field}.path", [settings.text_column],
                                  [settings.label_column, *other])
    for name, column in wanted:
        if column not in table.column_names:
            raise ConfigError(
                f"{field}.{name}: {settings.path} has no column {column!r}; it has {table.column_names}"
            )
    texts = tables.text_values(table, settings.text_column)
    raw_labels = labels.eval_labels(tables.label_values(table, settings.label_column, features), settings)
    languages = tables.text_values(table, settings.language_column) if settings.language_column else None
    keep = [text is not None and values is not None for text, values in zip(texts, raw_labels)]
    skipped = {"null_text": sum(text is None for text in texts),
               "null_label": sum(text is not None and values is None for text, values in zip(texts, raw_labels))}
    kept_raw = [values for values, kept in zip(raw_labels, keep) if values is not None and kept]
    mapped = [[settings.label_map.get(v, v) for v in values] for values in kept_raw]
    unknown = sorted({raw for raws, found in zip(kept_raw, mapped) for raw, label in zip(raws, found)
                      if label not in labels.position})
    if unknown:
        raise ConfigError(
            f"{field}.label_map: value {unknown[0]!r} of {settings.label_column!r} maps to no job label; "
            f"map it to one of {labels.ids}"
        )
    if not any(keep):
        raise ConfigError(f"{field}.path: {settings.path} has no row with both a text and a label")
    return EvalSet(
        texts=[text for text, kept in zip(texts, keep) if text is not None and kept],
        labels=[labels.key_of(found) for found in mapped],
        languages=[language for language, kept in zip(languages, keep) if kept] if languages else None,
        skipped=skipped,
    )


def split_metrics(tallies: dict[tuple[str | None, str | None], np.ndarray],
                  figures: Callable[[np.ndarray], dict]) -> dict:
    """A split's ``figures`` (``LabelScheme.metrics``) from its tallies by (language, origin)
    (None: rows without one), with ``by_language`` when every row has a language and
    ``by_origin`` when every row has an origin (a run that annotates), neither with a confusion
    matrix."""
    found = figures(np.sum(list(tallies.values()), axis=0))
    for name, position in (("by_language", 0), ("by_origin", 1)):
        groups: dict[str | None, np.ndarray] = {}
        for key, tally in tallies.items():
            groups[key[position]] = groups.get(key[position], 0) + tally
        if None not in groups:
            found[name] = {group: {k: v for k, v in figures(tally).items() if k != "confusion_matrix"}
                           for group, tally in sorted(groups.items())}
    return found
