"""The diversity report on hand-written multi-label rows: counts streamed, samples bounded.

The rows are tallied by Ray Data tasks block by block (embedded Ray); the embedder is the real
all-MiniLM-L6-v2 on Ray actors. The same rows are written as one shard and as four: every count
is exact and every sample-based figure the same, since a label's sample is its rows of smallest
hash of the seed and the id (a bottom-k sample), whatever the blocks.
"""

from __future__ import annotations

import collections

import pytest
from conftest import tiny_raw, write_generated

from anyclf_ray import pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.core.ids import stable_id
from anyclf_ray.labels.scheme import scheme
from anyclf_ray.reports import diversity
from anyclf_ray.sources.generate import Generate

WORDS = ["rain", "sun", "wind", "snow", "storm", "fog", "heat", "cold", "hail", "mist", "frost"]
SETS = [["neg"], ["pos"], ["neg", "pos"], ["neg"], []]  # a row of no label is in no label's figures
# (id, labels, language, text, topic): 60 rows, 36 holding neg, 24 holding pos, 12 neither.
ROWS = [(f"r{i:02d}", SETS[i % 5], ["en", "fr"][i % 2], f"{WORDS[i % 11]} then {WORDS[i % 7]} on day {i}",
         f"topic {i % 3}") for i in range(60)]
SAMPLE_ROWS = 7


def holding(label: str) -> list[tuple]:
    return [row for row in ROWS if label in row[1]]


def expected_sample(label: str, seed: int) -> list[str]:
    """The ids of ``label``'s bottom-k sample, computed here from the definition."""
    return sorted(sorted((row[0] for row in holding(label)), key=lambda row_id: stable_id(seed, row_id))[:SAMPLE_ROWS])


def expected_leaves() -> list[dict]:
    """Rows per (label, language, source type, topic, subtopic), a row once for each of its labels."""
    leaf = collections.Counter((label, row[2], "review", row[4], "s") for row in ROWS for label in row[1])
    return [{**dict(zip(diversity.LEAF, key)), "rows": n} for key, n in sorted(leaf.items())]


def diversity_spec(output, run_id: str, **settings) -> config.JobSpec:
    raw = {k: v for k, v in tiny_raw(output, run_id).items() if k not in config.SIZE_FIELDS}
    return loading.parse({**raw, "n_record_to_generate": 60, "multi_label": {"enabled": True, "min_rows": 1},
                          "dedup": {**raw["dedup"], "enabled": False}, "train": {"enabled": False},
                          "diversity": {"enabled": True, "sample_rows": SAMPLE_ROWS, **settings}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_ray):
    """The same rows as one shard and as four, each reported on."""
    output = tmp_path_factory.mktemp("runs")
    found = {}
    for parts in (1, 4):
        spec = diversity_spec(output, f"parts-{parts}")
        location = write_generated(spec, ROWS, parts=parts)
        found[parts] = spec, location, pipeline.run(spec, only="diversity")["diversity"]
    return found


def test_bottom_k_merges_samples_into_the_sample_of_their_union():
    rows = [(stable_id(0, i), str(i), "text") for i in range(50)]
    whole = diversity.bottom_k(rows, 5)
    assert whole == sorted(rows)[:5]
    assert diversity.bottom_k([*diversity.bottom_k(rows[:20], 5), *diversity.bottom_k(rows[20:], 5)], 5) == whole
    assert diversity.bottom_k(rows[:3], 5) == sorted(rows[:3])


@pytest.mark.slow
def test_counts_are_exact_and_the_sample_bounded_and_chosen_by_id_hash(runs):
    texts = {row[0]: row[3] for row in ROWS}
    found = {}
    for parts, (spec, location, _) in runs.items():
        shards = Generate(spec).read(location).shards.data
        for seed in (0, 1):
            found[parts, seed] = diversity.tallied(location, shards, scheme(spec), SAMPLE_ROWS, seed)
            rows, leaves, samples = found[parts, seed]
            assert rows == 60 and leaves == expected_leaves()
            assert {label: sum(row["rows"] for row in leaves if row["label"] == label) for label in ("neg", "pos")} \
                == {"neg": 36, "pos": 24}
            assert set(samples) == {"neg", "pos"}
            for label, sample in samples.items():
                assert len(sample) == SAMPLE_ROWS
                assert [rank for rank, _, _ in sample] == sorted(rank for rank, _, _ in sample)
                assert sorted(row_id for _, row_id, _ in sample) == expected_sample(label, seed)
                assert all(text == texts[row_id] for _, row_id, text in sample)
        again = diversity.tallied(location, shards, scheme(spec), SAMPLE_ROWS, 0)
        assert again == found[parts, 0]  # the same sample, row for row, in two runs
    assert found[1, 0] == found[4, 0] and found[1, 1] == found[4, 1]  # whatever the shards
    assert expected_sample("neg", 0) != expected_sample("neg", 1)  # the seed chooses the sample


@pytest.mark.slow
def test_one_shard_or_four_give_the_same_figures(runs):
    (_, one_location, one), (_, split_location, split) = runs[1], runs[4]
    assert len(Generate(runs[4][0]).read(split_location).shards.data) == 4
    assert one.rows.input == split.rows.input == 60
    assert one.report.by_label == split.report.by_label
    assert one.report.embeddings == split.report.embeddings
    assert one.report.embeddings.rows == 2 * SAMPLE_ROWS and not one.report.embeddings.reused
    assert (one_location.read_table("diversity/rows_per_subtopic.parquet").to_pylist()
            == split_location.read_table("diversity/rows_per_subtopic.parquet").to_pylist() == expected_leaves())
    texts = {row[0]: row[3] for row in ROWS}
    for label, figures in one.report.by_label.items():
        sample = [texts[row_id] for row_id in expected_sample(label, 0)]  # in id order
        assert figures.rows == len(holding(label)) and figures.sampled_rows == SAMPLE_ROWS
        assert figures.distinct_1 == round(diversity.distinct_n(sample, 1), 4)
        assert figures.distinct_2 == round(diversity.distinct_n(sample, 2), 4)
        assert figures.compression_ratio == round(diversity.compression_ratio(sample), 4)
        assert figures.mean_pairwise_cosine is not None and -1 <= figures.mean_pairwise_cosine <= 1
        topic_rows = collections.Counter(row[4] for row in holding(label))
        assert (figures.topics, figures.subtopics) == (3, 6)  # 3 topics x 2 languages, one subtopic
        assert figures.rows_per_topic == {"min": min(topic_rows.values()), "median": sorted(topic_rows.values())[1],
                                          "max": max(topic_rows.values())}
    for path in one.report.figures.values():
        assert one_location.read_bytes(path)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_run_of_no_rows_has_no_figure(tmp_path, local_ray):
    spec = diversity_spec(tmp_path, "empty")
    write_generated(spec, [])
    found = pipeline.run(spec, only="diversity")["diversity"]
    assert found.rows.input == 0 and found.report.figures == {} and found.report.embeddings.rows == 0
    assert {label: figures.rows for label, figures in found.report.by_label.items()} == {"neg": 0, "pos": 0}
