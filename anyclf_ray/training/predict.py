"""Batch prediction: a trained SetFit model over a table of any size, with Ray Data.

In: a model folder (``<run>/model``, local or ``s3://``), an input Parquet/CSV/JSONL file or
folder and its text column. Out: Parquet files under the output path with every input column
plus ``prediction`` (a label id), ``score`` (its probability) and ``scores`` (one probability per
label, in the order of the model's ``labels``), one output row per input row; a multi-label model
gives ``labels`` (the label ids whose score reaches the label's threshold, from the model's
``thresholds.json``) and ``scores`` instead. A row without a text (null, a missing JSONL key, a
CSV cell such as ``NA``) gets nulls there. Then ``_manifest.json`` (rows, rows without a text,
model, input), written last, so its presence means the output is whole.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from anyclf_ray.core import runtime, storage, tables
from anyclf_ray.core.config import ActorPlacement
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.labels.scheme import predictions
from anyclf_ray.training.train import THRESHOLDS_FILE

MANIFEST = "_manifest.json"  # Parquet readers skip files named with a leading underscore


def load_model(filesystem: pafs.FileSystem, root: str, device: str):
    """The SetFit model at ``root``; a remote one is fetched into a temporary folder, removed once loaded."""
    from setfit import SetFitModel

    if isinstance(filesystem, pafs.LocalFileSystem):
        return SetFitModel.from_pretrained(root, device=device)
    with tempfile.TemporaryDirectory(prefix="anyclf-model-") as folder:
        pafs.copy_files(root, folder, source_filesystem=filesystem)
        return SetFitModel.from_pretrained(folder, device=device)


def load_thresholds(filesystem: pafs.FileSystem, root: str, model) -> np.ndarray | None:
    """A multi-label model's threshold per label (0.5 where its folder gives none); None for a
    single-label model."""
    if not getattr(model.model_head, "multilabel_", False):
        return None
    path = f"{root}/{THRESHOLDS_FILE}"
    found = {}
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        with filesystem.open_input_stream(path) as stream:
            found = json.loads(stream.read())
    return np.array([found.get(label, 0.5) for label in model.labels])


class Predictor:
    """Ray Data callable class: a batch with ``text_column`` → the batch with predictions."""

    def __init__(self, model_location: tuple[pafs.FileSystem, str], text_column: str, device: str, threads: int):
        runtime.use_threads(device, threads)
        self.model = load_model(*model_location, device=device)
        self.labels = self.model.labels
        self.thresholds = load_thresholds(*model_location, self.model)
        self.text_column = text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = tables.text_values(batch, self.text_column)
        given = np.array([text is not None for text in texts], bool)  # a missing text gets no prediction
        scores = np.zeros((len(texts), len(self.labels)), np.float32)
        if given.any():
            chosen_texts = [text for text in texts if text is not None]
            scores[given] = np.asarray(self.model.predict_proba(chosen_texts, as_numpy=True), dtype=np.float32)
        for name, column in predictions(self.model.model_head, self.labels, scores, self.thresholds, ~given).items():
            batch = batch.append_column(name, column)
        return batch


class Paths(NamedTuple):
    """The command's paths, checked, each with the filesystem and path it resolved to."""

    model: str
    input: str
    output: str
    model_location: tuple[pafs.FileSystem, str]
    input_location: tuple[pafs.FileSystem, str]
    output_location: tuple[pafs.FileSystem, str]


def check(model_path: str, input_path: str, output_path: str, text_column: str) -> Paths:
    """ConfigError naming the argument unless the model and input can be used (the input has
    ``text_column``, read from its metadata) and the output is new."""
    model_fs, model_root = storage.resolve(model_path)
    if model_fs.get_file_info(f"{model_root}/model_head.pkl").type != pafs.FileType.File:
        raise ConfigError(f"--model: {model_path} is not a trained anyclf-ray/SetFit model folder (no model_head.pkl)")
    input_fs, input_root = storage.resolve(input_path)
    found = tables.columns(input_path, "--input")
    if text_column not in found:
        raise ConfigError(f"--text-column: {input_path} has no column {text_column!r}; it has {found}")
    output_fs, output_root = storage.resolve(output_path)
    if output_fs.get_file_info(output_root).type != pafs.FileType.NotFound:
        finished = output_fs.get_file_info(f"{output_root}/{MANIFEST}").type == pafs.FileType.File
        state = "already holds predictions" if finished else "exists (an unfinished prediction, or other files)"
        raise ConfigError(f"--output: {output_path} {state}; give a new path so no old rows mix in")
    return Paths(model_path, input_path, output_path, (model_fs, model_root), (input_fs, input_root),
                 (output_fs, output_root))


def written(output: tuple[pafs.FileSystem, str], text_column: str) -> dict[str, int]:
    """Rows written under ``output`` and, of them, the rows without a text, from the Parquet
    footers (their row counts and the text column's null counts): no row is read."""
    filesystem, root = output
    selector = pafs.FileSelector(root, allow_not_found=True)
    rows = missing = 0
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        with filesystem.open_input_file(info.path) as stream:
            footer = pq.ParquetFile(stream).metadata
        column = footer.schema.to_arrow_schema().get_field_index(text_column)
        rows += footer.num_rows
        missing += sum(footer.row_group(g).column(column).statistics.null_count for g in range(footer.num_row_groups))
    return {"rows": rows, "null_text": missing}


def predicted(dataset, model_location: tuple[pafs.FileSystem, str], text_column: str, placement: ActorPlacement,
              batch_size: int):
    """``dataset`` (Ray Data) with the predictions of the model at ``model_location``, computed
    by ``placement.replicas`` actors as the rows stream past (``Predictor``)."""
    return runtime.actor_map(dataset, Predictor, {"model_location": model_location, "text_column": text_column},
                             placement, batch_size, "pyarrow")


def predict(paths: Paths, text_column: str, placement: ActorPlacement, batch_size: int = 256) -> dict[str, int]:
    """Write predictions for every row of the checked input to the output; the rows written and,
    of them, those without a text (``null_text``: null predictions, never a guess at "None")."""
    found = predicted(tables.dataset(paths.input, "--input", text_column), paths.model_location, text_column,
                      placement, batch_size)
    output_fs, output_root = paths.output_location
    found.write_parquet(output_root, filesystem=output_fs)
    counts = written(paths.output_location, text_column)
    summary = {**counts, "model": paths.model, "input": paths.input, "text_column": text_column,
               "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    output_fs.create_dir(output_root)  # an input without rows writes no part, only this manifest
    with output_fs.open_output_stream(f"{output_root}/{MANIFEST}") as stream:
        stream.write(json.dumps(summary, indent=2).encode())
    return counts
