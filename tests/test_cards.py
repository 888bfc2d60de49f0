"""The cards name no path of the machine that ran the job: they are published (no Ray, no model)."""

from __future__ import annotations

from conftest import tiny_raw

from anyclf_ray.core import cards, loading
from anyclf_ray.core.results import AnnotationReport, DedupReport, GenerationReport, StageResult
from anyclf_ray.core.storage import RunLocation
from anyclf_ray.filters.dedup import Dedup
from anyclf_ray.sources.annotate import Annotate
from anyclf_ray.sources.generate import Generate


def local_model(folder, marker: str) -> str:
    folder.mkdir(parents=True)
    (folder / marker).write_text("{}")
    return str(folder)


def test_cards_name_folders_relative_to_the_run_and_local_models_by_name(tmp_path):
    llm = local_model(tmp_path / "models" / "my-llm", "config.json")
    embedder = local_model(tmp_path / "models" / "my-embedder", "modules.json")
    texts = tmp_path / "texts.csv"
    texts.write_text("text\nfine\n")
    spec = loading.parse(tiny_raw(tmp_path / "runs", "local", model={"name": llm}, dedup={"model": embedder},
                                  train={"base_model": embedder}, annotate={"enabled": True, "path": str(texts)}))
    location = RunLocation(spec.output, "local")  # results as the stages commit them, their outputs absolute
    common = {"run_id": "local", "finished_at": "2026-01-01T00:00:00+00:00", "fingerprint": "f", "settings": {}}
    generated = StageResult[GenerationReport].model_validate({
        **common, "stage": "generate", "inputs": [], "output": location.uri(), "rows": {"output": 2},
        "report": {"sizes": spec.sizes(), "versions": {}, "plan": {}, "languages": [], "failures": {}, "llm": {},
                   "engine": {}, "rows": {"expected": 2, "written": 2, "missing": 0}, "counts": {"by_label": []}}})
    annotated = StageResult[AnnotationReport].model_validate({
        **common, "stage": "annotate", "inputs": [], "output": location.uri("annotate"), "rows": {"output": 1},
        "report": {"input": str(texts), "rows": {"expected": 1, "written": 1, "removed": 0, "lost": 0},
                   "counts": {"by_label": []}, "removed": {}, "calibration": ["batch"], "prior": {"neg": 0.5},
                   "failures": {}, "llm": {}, "engine": {}}})
    deduplicated = StageResult[DedupReport].model_validate({
        **common, "stage": "dedup", "inputs": [generated.ref, annotated.ref], "output": location.uri("dedup"),
        "rows": {"input": 3, "output": 2},
        "report": {"removed": {"by_reason": {"exact": 1}, "by_label_reason": [], "by_language_reason": []},
                   "languages": [], "kept_by_label": [],
                   "conflicts": {"policy": "drop", "pairs": 0, "rows_removed": 0}}})
    finished = [(Generate(spec), generated), (Annotate(spec), annotated), (Dedup(spec), deduplicated)]
    card = cards.dataset_card(spec, "local", finished, "`label`")
    model_card = cards.model_card(spec, "local", "dedup", {"train_rows": 2, "pairs": 4},
                                  {"held_out": {"rows": 1, "accuracy": 1.0}}, "a logistic regression", "")
    for text in (card, model_card):
        assert str(tmp_path) not in text
    assert "- `deduplicated` config: dedup complete: kept 2 of 3 rows in dedup/ (removed 1 exact) at cosine 0.92 " \
           "with `my-embedder`" in card
    assert "texts of `texts.csv`" in card and "written by an LLM (`my-llm`)" in card
    assert "base_model: my-embedder" in model_card and "written by `my-llm`" in model_card
    # A run that annotates says its texts come from two origins, and which columns say which.
    assert "and the user's own texts labelled by that LLM's calibrated judgement (`origin: annotated`)" in card
    assert "`origin`, `probabilities` and `confidence` (annotated rows)" in card
    assert "every annotated text's label is a language model's" in card
    alone = cards.dataset_card(spec, "local", [(Annotate(spec), annotated)], "`label`")
    assert "Text-classification data made with anyclf-ray: the user's own texts labelled" in alone
    assert "Tree sizes" not in alone and "see `failures/`" not in alone  # no tree, nothing failed
    assert cards.shown("s3://bucket/texts.csv") == "s3://bucket/texts.csv"
    assert cards.shown("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
