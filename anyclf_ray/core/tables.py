"""User tables: the texts and labels a user hands in, read as they were written.

In: a path (a Parquet, CSV or JSONL file, a folder of Parquet files, or a local ``datasets``
folder; local or ``s3://``), the option that named it (for the one-line error) and the columns
that matter. Out: Arrow tables whose text column is a string column with null where a text is
missing, and whose label column holds each label value as the text the user wrote.

File formats retype what users write: pyarrow's CSV reader turns a column of ``true``/``false``
into booleans, ``010`` into 10 and ``NA`` into null; JSON has booleans and numbers of its own; a
``datasets`` ``ClassLabel`` column stores integers. Labels are compared with the spec's label
ids as text, so they are read as text (a JSON ``true`` as ``true``, a number as its digits, a
class label as its name). A missing text (a null, a missing JSON key, a CSV cell such as
``NA`` or empty) stays null: it is never turned into the string ``"None"``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from anyclf_ray.core import storage
from anyclf_ray.core.loading import ConfigError

FORMATS = ("parquet", "csv", "jsonl", "json")
# The cells pandas reads as missing (pyarrow's list lacks the last two): a text cell holding one
# of them has no text.
NULL_MARKERS = (*pacsv.ConvertOptions().null_values, "None", "<NA>")
# Bytes of a JSONL file read to learn its keys before any cluster time.
PEEK_BYTES = 1 << 20


def input_format(path: str, field: str) -> str:
    """``parquet``, ``csv``, ``jsonl`` or ``json`` from ``path``'s extension (none: a Parquet folder)."""
    suffix = storage.extension(path) or "parquet"
    if suffix not in FORMATS:
        raise ConfigError(f"{field}: {path}: use Parquet, CSV or JSONL (.parquet, .csv, .jsonl), a Parquet folder "
                          "or a local `datasets` folder")
    return suffix


def located(path: str, field: str) -> tuple[pafs.FileSystem, str, pafs.FileType]:
    """The filesystem, resolved path and kind of ``path``; ConfigError if nothing is there."""
    filesystem, resolved = storage.resolve(path)
    try:
        kind = filesystem.get_file_info(resolved).type
    except OSError as error:
        raise ConfigError(f"{field}: cannot reach {path} ({str(error).splitlines()[0]})") from None
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"{field}: {path}: no such file or folder")
    return filesystem, resolved, kind


def is_datasets_folder(filesystem: pafs.FileSystem, resolved: str, kind: pafs.FileType) -> bool:
    if kind != pafs.FileType.Directory or not isinstance(filesystem, pafs.LocalFileSystem):
        return False
    return any(filesystem.get_file_info(f"{resolved}/{name}").type == pafs.FileType.File
               for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def as_text(value: object) -> str | None:
    """A scalar as the text a user wrote it: JSON's spelling for booleans, digits for numbers."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _class_names(features: dict, column: str) -> list[str] | None:
    """The names of a ``datasets`` ClassLabel column (or of a sequence of them), else None."""
    feature = features.get(column)
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) holds its ClassLabel
    return getattr(feature, "names", None)


def label_values(table: pa.Table, column: str, features: dict | None = None) -> list:
    """``column`` as Python values, label by label as text (lists stay lists); a class label of
    a ``datasets`` folder (``features``, from ``read``) becomes its name."""
    names = _class_names(features or {}, column)
    values = table[column].to_pylist()

    def one(value):
        if value is None:
            return None
        return names[value] if names is not None and isinstance(value, int) else as_text(value)

    return [[one(v) for v in value] if isinstance(value, list) else one(value) for value in values]


def text_values(table: pa.Table, column: str) -> list[str | None]:
    """``column`` as texts, null where missing (never ``"None"``)."""
    return [as_text(value) for value in table[column].to_pylist()]


def _read_csv(stream, columns: list[str]) -> pa.Table:
    # Every named column as text as written (no booleans, no numbers, no nulls); then a text
    # cell holding a missing-value marker becomes null, as pandas reads it.
    options = pacsv.ConvertOptions(column_types={column: pa.string() for column in columns},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    return pacsv.read_csv(stream, convert_options=options)


def _read_jsonl(stream) -> pa.Table:
    # Line by line: pyarrow's JSON reader refuses a column that mixes types (labels 1 and "x"),
    # and would spell numbers its own way; here each number keeps the digits it was written with.
    rows = []
    for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
        if line.strip():
            value = json.loads(line, parse_int=str, parse_float=str)
            if not isinstance(value, dict):
                raise ValueError(f"line {number} is not a JSON object")
            rows.append(value)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({key: pa.array([_json_text(row.get(key)) for row in rows]) for key in keys})


def _json_text(value: object) -> object:
    """A JSON value as text (lists as lists of text), so a column may mix types as JSON allows."""
    if isinstance(value, list):
        return [_json_text(v) for v in value]
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else as_text(value)


def read(path: str, field: str, text_columns: Sequence[str] = (),
         label_columns: Sequence[str] = ()) -> tuple[pa.Table, dict]:
    """The whole table at ``path`` on this process (eval sets, not corpora), and the
    ``datasets`` features of a ``datasets`` folder (else empty). ``text_columns`` and
    ``label_columns`` are read as text where the format allows it (``text_values`` and
    ``label_values`` finish the job). ConfigError naming ``field`` when it cannot be read."""
    filesystem, resolved, kind = located(path, field)
    try:
        if is_datasets_folder(filesystem, resolved, kind):
            return _read_datasets_folder(resolved)
        fmt = input_format(resolved, field)
        if kind == pafs.FileType.Directory:
            if fmt != "parquet":
                raise ConfigError(f"{field}: {path} is a folder; give a file, a folder of Parquet files "
                                  "or a `datasets` folder")
            return pq.read_table(resolved, filesystem=filesystem), {}
        with filesystem.open_input_file(resolved) as stream:
            if fmt == "csv":
                table = _read_csv(stream, [*text_columns, *label_columns])
                for column in text_columns:
                    if column in table.column_names:
                        values = pa.array([None if v in NULL_MARKERS else v for v in table[column].to_pylist()],
                                          pa.string())
                        table = table.set_column(table.column_names.index(column), column, values)
                return table, {}
            if fmt in ("jsonl", "json"):
                return _read_jsonl(stream), {}
            return pq.read_table(stream), {}
    except (pa.ArrowInvalid, OSError, ValueError, UnicodeDecodeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{field}: cannot read {path} ({str(error).splitlines()[0]})") from None


def _read_datasets_folder(path: str) -> tuple[pa.Table, dict]:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
    return loaded.data.table, dict(loaded.features)


def columns(path: str, field: str) -> list[str]:
    """The column names of the input at ``path``, from its metadata: a Parquet footer, a CSV
    header, the keys of a JSONL file's first lines, a ``datasets`` folder's features. Reads no
    rows beyond those."""
    filesystem, resolved, kind = located(path, field)
    if is_datasets_folder(filesystem, resolved, kind):
        return list(_read_datasets_folder(resolved)[1])
    fmt = input_format(resolved, field)
    try:
        if kind == pafs.FileType.Directory:
            found = pq.ParquetDataset(resolved, filesystem=filesystem).schema
            return list(found.names)
        with filesystem.open_input_file(resolved) as stream:
            if fmt == "csv":
                return list(pacsv.open_csv(stream).schema.names) if stream.size() else []
            if fmt in ("jsonl", "json"):
                lines = stream.read(PEEK_BYTES).decode("utf-8", errors="ignore").splitlines()
                whole = lines if stream.size() <= PEEK_BYTES else lines[:-1]  # the last may be cut
                rows = [json.loads(line) for line in whole if line.strip()]
                return list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))
            return list(pq.ParquetFile(stream).schema_arrow.names)
    except (pa.ArrowInvalid, OSError, ValueError) as error:
        raise ConfigError(f"{field}: cannot read {path} ({str(error).splitlines()[0]})") from None


def metadata_size(path: str, field: str, text_column: str) -> tuple[int | None, int]:
    """Rows and bytes of the text column at ``path`` from metadata alone: a Parquet file's or
    folder's footers (rows; the column's uncompressed bytes); for other formats, None rows and
    the files' bytes. Reads no row."""
    filesystem, resolved, kind = located(path, field)
    if not is_datasets_folder(filesystem, resolved, kind) and input_format(resolved, field) == "parquet":
        files = pq.ParquetDataset(resolved, filesystem=filesystem).files if kind == pafs.FileType.Directory \
            else [resolved]
        rows = size = 0
        for file in files:
            with filesystem.open_input_file(file) as stream:
                footer = pq.ParquetFile(stream).metadata
            column = footer.schema.to_arrow_schema().get_field_index(text_column)
            rows += footer.num_rows
            size += sum(footer.row_group(g).column(column).total_uncompressed_size
                        for g in range(footer.num_row_groups)) if column >= 0 else 0
        return rows, size
    selector = pafs.FileSelector(resolved, recursive=True) if kind == pafs.FileType.Directory else None
    infos = filesystem.get_file_info(selector) if selector else [filesystem.get_file_info(resolved)]
    return None, sum(info.size or 0 for info in infos if info.type == pafs.FileType.File)


def scan(path: str, field: str, names: Sequence[str], batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """The columns ``names`` of the input at ``path``, a batch of at most ``batch_rows`` rows at a
    time, each column as text (``text_values``: null where missing), so the driver holds one batch
    of a corpus of any size. ConfigError naming ``field`` when it cannot be read."""
    filesystem, resolved, kind = located(path, field)

    def as_texts(table: pa.Table) -> pa.Table:
        return pa.table({name: pa.array(text_values(table, name) if name in table.column_names
                                        else [None] * table.num_rows, pa.string()) for name in names})

    try:
        if is_datasets_folder(filesystem, resolved, kind):
            for batch in _read_datasets_folder(resolved)[0].select(list(names)).to_batches(batch_rows):
                yield as_texts(pa.Table.from_batches([batch]))
            return
        fmt = input_format(resolved, field)
        if kind == pafs.FileType.Directory or fmt == "parquet":
            source = pq.ParquetDataset(resolved, filesystem=filesystem) if kind == pafs.FileType.Directory else None
            files = source.files if source is not None else [resolved]
            for file in files:
                with filesystem.open_input_file(file) as stream:
                    for batch in pq.ParquetFile(stream).iter_batches(batch_rows, columns=list(names)):
                        yield as_texts(pa.Table.from_batches([batch]))
            return
        with filesystem.open_input_file(resolved) as stream:
            if fmt == "csv":
                options = pacsv.ConvertOptions(column_types={name: pa.string() for name in names},
                                               include_columns=list(names), null_values=list(NULL_MARKERS),
                                               strings_can_be_null=True)
                for batch in pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                            convert_options=options):
                    yield as_texts(pa.Table.from_batches([batch]))
                return
            rows: list[dict] = []
            for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
                if line.strip():
                    value = json.loads(line, parse_int=str, parse_float=str)
                    if not isinstance(value, dict):
                        raise ValueError(f"line {number} is not a JSON object")
                    rows.append({name: _json_text(value.get(name)) for name in names})
                if len(rows) == batch_rows:
                    yield pa.Table.from_pylist(rows, schema=pa.schema({name: pa.string() for name in names}))
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=pa.schema({name: pa.string() for name in names}))
    except (pa.ArrowInvalid, OSError, ValueError, UnicodeDecodeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{field}: cannot read {path} ({str(error).splitlines()[0]})") from None


def dataset(path: str, field: str, text_column: str):
    """The input at ``path`` as a Ray Dataset, streamed (a corpus of any size), its text column
    read as text: a CSV cell holding a missing-value marker is a missing text, as ``read``
    reads it. Ray must be up; ``columns`` checks the input first."""
    import ray

    filesystem, resolved, kind = located(path, field)
    if is_datasets_folder(filesystem, resolved, kind):
        return ray.data.from_arrow(_read_datasets_folder(resolved)[0])  # memory-mapped, not copied
    fmt = input_format(resolved, field)
    if fmt == "csv":
        options = pacsv.ConvertOptions(column_types={text_column: pa.string()}, null_values=list(NULL_MARKERS),
                                       strings_can_be_null=True)
        return ray.data.read_csv(resolved, filesystem=filesystem, convert_options=options)
    if fmt == "parquet":
        return ray.data.read_parquet(resolved, filesystem=filesystem)
    return ray.data.read_json(resolved, filesystem=filesystem)
