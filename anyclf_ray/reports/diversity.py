"""Diversity report: how varied the rows a run keeps are, per label, with plots.

In: the committed shards of the last data stage before it. They stream through Ray Data
tasks, one block at a time, each reading only the columns below and returning its rows per
leaf and its bottom-k sample; the driver adds those up and merges the samples, so it holds
counts and at most ``sample_rows`` rows a label, never a column of every row. The sample is a
bottom-k sample (a reservoir sample that merges): each label's ``sample_rows`` rows whose
hash of ``seed`` and row id is smallest, so it is the same however the rows are split into
shards and blocks, and in every run.

A multi-label run's figures are per label too, each over the rows holding it (a row of two
labels counts in both).

A report stage (``Stage.report_only``): it writes figures only, so the stage after it reads
the same rows. Out, under ``<run>/diversity/``:

- ``manifest.json``: per label, ``rows`` (every row holding it, counted exactly), and over
  its sample (``sampled_rows`` of them): ``distinct_1`` and ``distinct_2`` (distinct word
  n-grams over all n-grams), ``compression_ratio`` (raw over gzip-compressed size of the
  texts: higher is more repetitive) and ``mean_pairwise_cosine`` of their embeddings; and the
  spread of all its rows over topics and subtopics;
- ``rows_per_subtopic.parquet``: rows per (label, language, source type, topic, subtopic);
- ``label_language.png``, ``topics.png`` (rows per topic, per label) and ``embeddings.png``
  (a 2-D PCA map of the sampled rows' embeddings, coloured by label).
"""

from __future__ import annotations

import functools
import gzip
import heapq
import json
import logging
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from anyclf_ray.core import embed, plots, runtime
from anyclf_ray.core.cards import code
from anyclf_ray.core.config import DiversitySpec
from anyclf_ray.core.ids import stable_id
from anyclf_ray.core.results import (
    CountTable,
    DiversityReport,
    EmbeddingsUse,
    LabelDiversity,
    Rows,
    StageResult,
    added,
    counts,
    rows_by,
)
from anyclf_ray.core.stage import Context, Input, Outcome, Stage
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.core.text import WORD, normalise
from anyclf_ray.labels.scheme import LabelScheme, scheme

log = logging.getLogger(__name__)

# The columns read ("label": the run's label columns, a row once for each label it holds).
COLUMNS = ["id", "text", "label", "language", "source_type", "topic", "subtopic"]
# A leaf of the rows' counts, and the table of rows per leaf.
LEAF = ["label", "language", "source_type", "topic", "subtopic"]
LEAF_SCHEMA = pa.schema([*(pa.field(column, pa.string()) for column in LEAF), pa.field("rows", pa.int64())])
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


# A sampled row: its rank (``ranks``), id and text; a label's sample is its rows of smallest rank.
Sampled = tuple[str, str, str]


def ranks(ids: list[str], seed: int) -> list[str]:
    """Each row id's rank in the bottom-k samples: 16 hex characters of a hash of ``seed`` and
    the id (the smaller ranks are sampled), the same on any machine."""
    return [stable_id(seed, row_id) for row_id in ids]


def bottom_k(rows: Iterable[Sampled], k: int) -> list[Sampled]:
    """The ``k`` rows of smallest rank, in rank order: two samples' rows in, their merged sample out."""
    return heapq.nsmallest(k, rows)


def tally_block(batch: pa.Table, labels: LabelScheme, per_label: int, seed: int) -> dict[str, list]:
    """Ray Data function: a block of rows (``COLUMNS``, the run's label columns for ``label``) →
    one row: its number of rows (``rows``), its rows per ``LEAF`` (``leaves``, a count table as
    JSON) and its bottom-k sample (``sample``, JSON: per label, up to ``per_label`` ``Sampled``
    rows)."""
    batch = batch.append_column("rank", pa.array(ranks(batch["id"].to_pylist(), seed), pa.string()))
    rows = labels.per_label(batch)
    sample = {}
    for label in pc.unique(rows["label"]).to_pylist():
        own = rows.filter(pc.equal(rows["label"], label)).sort_by("rank").slice(0, per_label)
        sample[label] = list(zip(own["rank"].to_pylist(), own["id"].to_pylist(), own["text"].to_pylist()))
    return {"rows": [batch.num_rows], "leaves": [json.dumps(counts(rows, LEAF))], "sample": [json.dumps(sample)]}


def tallied(location: RunLocation, shards: list[str], labels: LabelScheme, per_label: int,
            seed: int) -> tuple[int, CountTable, dict[str, list[Sampled]]]:
    """The rows of ``shards``: their number, their rows per ``LEAF`` (a label's row once for each
    label it holds) and each label's bottom-k sample of up to ``per_label`` rows, in rank order.
    Ray Data tasks read the shards' ``COLUMNS`` block by block and tally each
    (``tally_block``); the driver adds up one block's answer at a time."""
    columns = [labels.key if column == "label" else column for column in COLUMNS]
    blocks = ray.data.read_parquet([location.path(shard) for shard in shards], filesystem=location.fs,
                                   columns=columns)
    tallies = blocks.map_batches(functools.partial(tally_block, labels=labels, per_label=per_label, seed=seed),
                                 batch_size=None, batch_format="pyarrow")
    rows = 0
    leaves: CountTable = []
    samples: dict[str, list[Sampled]] = {}
    for tally in tallies.iter_rows():
        rows += int(tally["rows"])
        leaves = added(leaves, json.loads(tally["leaves"]))
        for label, sample in json.loads(tally["sample"]).items():
            samples[label] = bottom_k([*samples.get(label, []), *map(tuple, sample)], per_label)
    return rows, leaves, samples


def summed(table: CountTable, keys: list[str]) -> CountTable:
    """A count table's rows added up per combination of its columns ``keys``."""
    return added([{**{key: row[key] for key in keys}, "rows": row["rows"]} for row in table])


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
        started = time.perf_counter()
        holding = [shard for shard in upstream.data if location.read_footer(shard).num_rows]
        total, leaves, samples = (tallied(location, holding, labels, settings.sample_rows, settings.seed)
                                 if holding else (0, [], {}))
        tally_seconds = time.perf_counter() - started
        if not leaves:  # the stages before removed every row: nothing to measure or draw
            log.warning("diversity: %s kept no rows, so there is no figure", upstream.stage)
            none = LabelDiversity(rows=0, distinct_1=0.0, distinct_2=0.0, compression_ratio=0.0,
                                  mean_pairwise_cosine=None, sampled_rows=0, topics=0, subtopics=0,
                                  rows_per_topic={"min": 0, "median": 0.0, "max": 0})
            report = DiversityReport(embeddings=EmbeddingsUse(model=self.embedder, rows=0, reused=False),
                                     by_label={label: none for label in labels.ids}, figures={})
            return Outcome(report=report, rows=Rows(input=total, output=total), output=location.uri(self.folder),
                           timings={"tally": tally_seconds, "embed": 0.0})
        started = time.perf_counter()
        # Each label's sample in id order, the labels in the run's order.
        sampled = [(label, row_id, text) for label in labels.ids
                   for _, row_id, text in sorted(samples.get(label, []), key=lambda row: row[1])]
        ids = [row_id for _, row_id, _ in sampled]
        vectors = embed.kept_embeddings(location, ctx.finished, self.embedder, ids)
        reused = vectors is not None
        if vectors is None:
            placement = runtime.resolve_placement(settings, "diversity")
            vectors = embed.embed([text for _, _, text in sampled], self.embedder, placement, settings.batch_size)
        embed_seconds = time.perf_counter() - started

        sampled_labels = np.asarray([label for label, _, _ in sampled], dtype=object)
        topics = summed(leaves, ["label", "topic"])
        rows = rows_by(leaves, "label")
        per_label = {}
        for label in labels.ids:
            own = [text for row_label, _, text in sampled if row_label == label]
            topic_rows = [row["rows"] for row in topics if row["label"] == label]
            per_label[label] = LabelDiversity(
                rows=rows.get(label, 0), distinct_1=round(distinct_n(own, 1), 4),
                distinct_2=round(distinct_n(own, 2), 4), compression_ratio=round(compression_ratio(own), 4),
                mean_pairwise_cosine=mean_pairwise_cosine(vectors[sampled_labels == label]), sampled_rows=len(own),
                topics=len(topic_rows), subtopics=sum(1 for row in leaves if row["label"] == label),
                rows_per_topic={"min": min(topic_rows, default=0), "median": float(np.median(topic_rows or [0])),
                                "max": max(topic_rows, default=0)},
            )
        location.write_table(self.data_path("rows_per_subtopic.parquet"), pa.Table.from_pylist(leaves, LEAF_SCHEMA))

        languages = self.spec.languages
        by_pair = {(row["label"], row["language"]): row["rows"] for row in summed(leaves, ["label", "language"])}
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
        return Outcome(report=report, rows=Rows(input=total, output=total), output=location.uri(self.folder),
                       timings={"tally": tally_seconds, "embed": embed_seconds})

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
