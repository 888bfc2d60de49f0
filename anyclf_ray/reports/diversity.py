"""Diversity report: how varied the rows a run keeps are, per label, with plots.

A multi-label run's figures are per label too, each over the rows holding it (a row of two
labels counts in both).

A report stage (``Stage.report_only``): it reads the rows of the last data stage before it and
writes figures only, so the stage after it reads the same rows. Out, under ``<run>/diversity/``:

- ``manifest.json``: per label, ``rows``, ``distinct_1`` and ``distinct_2`` (distinct word
  n-grams over all n-grams), ``compression_ratio`` (raw over gzip-compressed size of the label's
  texts: higher is more repetitive), ``mean_pairwise_cosine`` of the embeddings of up to
  ``sample_rows`` rows, and the spread of rows over topics and subtopics;
- ``rows_per_subtopic.parquet``: rows per (label, language, source type, topic, subtopic);
- ``label_language.png``, ``topics.png`` (rows per topic, per label) and ``embeddings.png``
  (a 2-D PCA map of the sampled rows' embeddings, coloured by label).
"""

from __future__ import annotations

import gzip
import logging
import time

import numpy as np
import pyarrow as pa

from anyclf_ray.core import embed, plots, runtime
from anyclf_ray.core.cards import code
from anyclf_ray.core.config import DiversitySpec
from anyclf_ray.core.results import DiversityReport, EmbeddingsUse, LabelDiversity, Rows, StageResult, counts
from anyclf_ray.core.stage import Context, Input, Outcome, Stage, read_rows
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import WORD, normalise
from anyclf_ray.labels.scheme import scheme

log = logging.getLogger(__name__)

COLUMNS = ["id", "text", "label", "language", "source_type", "topic", "subtopic"]
# An annotated row comes from no tree leaf.
NO_TOPIC = "(no topic: annotated)"
FIGURES = {"label_language": "label by language", "topics": "rows per topic", "embeddings": "embeddings by label"}


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of ``texts`` (0 when there are none)."""
    grams = [
        tuple(words[i : i + n])
        for words in (WORD.findall(normalise(text)) for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def compression_ratio(texts: list[str]) -> float:
    raw = "\n".join(texts).encode()
    return len(raw) / len(gzip.compress(raw)) if raw else 0.0


def mean_pairwise_cosine(vectors: np.ndarray) -> float | None:
    """Mean cosine over distinct pairs of L2-normalised ``vectors`` (None for fewer than two)."""
    n = len(vectors)
    if n < 2:
        return None
    total = vectors.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))  # the sum over i != j of v_i . v_j


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def sample_ids(rows: pa.Table, per_label: int, seed: int) -> np.ndarray:
    """Row positions: up to ``per_label`` of each label, drawn reproducibly."""
    generator = np.random.default_rng(seed)
    labels = np.asarray(rows["label"].to_pylist(), dtype=object)
    chosen = []
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        if len(members) > per_label:
            members = np.sort(generator.choice(members, per_label, replace=False))
        chosen.append(members)
    return np.concatenate(chosen)


class Diversity(Stage[DiversityReport, None]):
    """The diversity report on the stage contract."""

    name = "diversity"
    section = "diversity"
    report_type = DiversityReport
    report_only = True

    @property
    def settings(self) -> DiversitySpec:
        return self.spec.diversity

    @property
    def embedder(self) -> str:
        return self.settings.model or self.spec.dedup.model

    def check(self, location: RunLocation) -> None:
        embed.check_model(self.embedder, "diversity.model" if self.settings.model else "dedup.model")

    def execute(self, ctx: Context, upstream: Input | None, checked: None) -> Outcome[DiversityReport]:
        assert upstream is not None
        settings, location, labels = self.settings, ctx.location, scheme(self.spec)
        read = read_rows(location, upstream.data, columns=[labels.key if c == "label" else c for c in COLUMNS])
        rows = labels.per_label(read)  # each label's figures read the rows holding it
        if not rows.num_rows:  # the stages before removed every row: nothing to measure or draw
            log.warning("diversity: %s kept no rows, so there is no figure", upstream.stage)
            none = LabelDiversity(rows=0, distinct_1=0.0, distinct_2=0.0, compression_ratio=0.0,
                                  mean_pairwise_cosine=None, sampled_rows=0, topics=0, subtopics=0,
                                  rows_per_topic={"min": 0, "median": 0.0, "max": 0})
            report = DiversityReport(embeddings=EmbeddingsUse(model=self.embedder, rows=0, reused=False),
                                     by_label={label: none for label in labels.ids}, figures={})
            return Outcome(report=report, rows=Rows(input=read.num_rows, output=read.num_rows),
                           output=location.uri(self.folder), timings={"embed": 0.0})
        started = time.perf_counter()
        sampled = rows.take(sample_ids(rows, settings.sample_rows, settings.seed))
        ids = sampled["id"].to_pylist()
        vectors = embed.kept_embeddings(location, ctx.finished, self.embedder, ids)
        reused = vectors is not None
        if vectors is None:
            placement = runtime.resolve_placement(settings, "diversity")
            vectors = embed.embed(sampled["text"].to_pylist(), self.embedder, placement, settings.batch_size)
        embed_seconds = time.perf_counter() - started

        row_labels = np.asarray(rows["label"].to_pylist(), dtype=object)
        sampled_labels = np.asarray(sampled["label"].to_pylist(), dtype=object)
        texts = np.asarray(rows["text"].to_pylist(), dtype=object)
        subtopics = counts(rows, ["label", "language", "source_type", "topic", "subtopic"])
        topics = counts(rows, ["label", "topic"])
        per_label = {}
        for label in labels.ids:
            own = texts[row_labels == label].tolist()
            topic_rows = [row["rows"] for row in topics if row["label"] == label]
            per_label[label] = LabelDiversity(
                rows=len(own), distinct_1=round(distinct_n(own, 1), 4), distinct_2=round(distinct_n(own, 2), 4),
                compression_ratio=round(compression_ratio(own), 4),
                mean_pairwise_cosine=mean_pairwise_cosine(vectors[sampled_labels == label]),
                sampled_rows=int((sampled_labels == label).sum()), topics=len(topic_rows),
                subtopics=sum(1 for row in subtopics if row["label"] == label),
                rows_per_topic={"min": min(topic_rows, default=0), "median": float(np.median(topic_rows or [0])),
                                "max": max(topic_rows, default=0)},
            )
        location.write_table(self.data_path("rows_per_subtopic.parquet"), pa.Table.from_pylist(subtopics))

        languages = self.spec.languages
        by_pair = {(row["label"], row["language"]): row["rows"] for row in counts(rows, ["label", "language"])}
        figures = {
            "label_language": plots.heatmap(
                np.asarray([[by_pair.get((label, language), 0) for language in languages] for label in labels.ids]),
                [labels.shown(label) for label in labels.ids], languages, "label", "language",
                "rows by label and language"),
            "topics": plots.bars(
                {labels.shown(label): {row["topic"] or NO_TOPIC: row["rows"] for row in topics if row["label"] == label}
                 for label in labels.ids}, "rows per topic, by label", "rows"),
            "embeddings": plots.scatter(pca_2d(vectors), [labels.shown(label) for label in sampled_labels.tolist()],
                                        f"{len(vectors)} rows' embeddings (PCA), by label"),
        }
        for name, png in figures.items():
            location.write_bytes(self.data_path(f"{name}.png"), png)
        report = DiversityReport(embeddings=EmbeddingsUse(model=self.embedder, rows=len(vectors), reused=reused),
                                 by_label=per_label, figures={name: self.data_path(f"{name}.png") for name in figures})
        return Outcome(report=report, rows=Rows(input=read.num_rows, output=read.num_rows),
                       output=location.uri(self.folder), timings={"embed": embed_seconds})

    def describe(self, result: StageResult[DiversityReport]) -> str:
        return f"diversity complete: {result.rows.input} rows of {result.inputs[0].stage} at {self.folder}/"

    def card_section(self, result: StageResult[DiversityReport]) -> str:
        found = result.report
        lines = "".join(
            f"| {code(label)} | {f.rows} | {f.distinct_1:.3f} | {f.distinct_2:.3f} | {f.compression_ratio:.2f} | "
            f"{'-' if f.mean_pairwise_cosine is None else format(f.mean_pairwise_cosine, '.3f')} | "
            f"{f.topics} | {f.subtopics} |\n"
            for label, f in found.by_label.items()
        )
        images = " ".join(f"![{FIGURES[name]}]({path})" for name, path in found.figures.items())
        return (
            f"### Diversity of the `{result.inputs[0].stage}` rows\n\n"
            "| label | rows | distinct-1 | distinct-2 | compression ratio | mean pairwise cosine | topics "
            "| subtopics |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"{lines}\n{images}"
        )
