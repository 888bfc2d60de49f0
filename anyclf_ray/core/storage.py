"""Where a run's artifacts live: a local folder or S3, through pyarrow's filesystems.

In: an ``OutputSpec`` and a run id. Out: a ``RunLocation`` that reads and writes files under
``<output.path>/<run_id>/``. Every write is atomic: on a local disk a file is written under
``_tmp/`` and renamed into place; on S3 an object only appears once its upload completes. So a
crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import threading
import time
import uuid
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from anyclf_ray.core.config import ConfigError, OutputSpec

log = logging.getLogger(__name__)

# Where a run's files are staged before their rename into place (local disks).
STAGING = "_tmp"


def _credentials() -> tuple[str | None, str | None, str | None]:
    """Access key, secret key and session token from the ``AWS_*`` variables."""
    get = os.environ.get
    return get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"), get("AWS_SESSION_TOKEN")


def s3_filesystem(endpoint_url: str | None, region: str) -> pafs.S3FileSystem:
    """An S3 filesystem whose credentials are read here, from ``AWS_*`` variables.

    Resolved on the driver, they travel with the pickled filesystem, so Ray workers on any node
    read and write with the driver's identity rather than whatever their own environment holds.
    """
    endpoint = urlparse(endpoint_url) if endpoint_url else None
    access_key, secret_key, session_token = _credentials()
    return pafs.S3FileSystem(
        access_key=access_key,
        secret_key=secret_key,
        session_token=session_token,
        region=region,
        scheme=endpoint.scheme if endpoint else "https",
        endpoint_override=endpoint.netloc if endpoint else None,
    )


def extension(path: str) -> str:
    """The lower-case extension of a path's last part, without the dot; "" if it has none."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or ``s3://`` URI given on the command line.

    S3 takes its endpoint from ``AWS_ENDPOINT_URL`` and its region from ``AWS_REGION`` (the AWS
    SDKs' own variables), and its credentials as ``s3_filesystem`` does.
    """
    if uri.startswith("s3://"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return s3_filesystem(os.environ.get("AWS_ENDPOINT_URL"), region), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def locate(run: str) -> RunLocation:
    """The ``RunLocation`` of a run folder given on the command line (``runs/<run_id>``, or
    ``s3://bucket/prefix/<run_id>`` with the endpoint and region as ``resolve`` takes them)."""
    parent, _, run_id = run.rstrip("/").rpartition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if run.startswith("s3://") else None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return RunLocation(OutputSpec(path=parent or ".", endpoint_url=endpoint, region=region), run_id)


# S3 answers that no retry can change.
REFUSALS = ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
# ... and answers that say what is not there: no retry changes these either.
FINAL = (*REFUSALS, "NoSuchKey", "NoSuchBucket", "does not exist")
# Seconds between tries of an S3 call that failed otherwise (a server restarting, a network
# blip): about two minutes in all, then the error stands.
S3_BACKOFF = (1, 2, 4, 8, 15, 30, 30, 30)

_retried = 0
_retried_lock = threading.Lock()


def retries() -> int:
    """S3 calls this process has tried again so far (``retrying``); a stage reports the
    difference over its run."""
    return _retried


def _count_retry() -> None:
    global _retried
    with _retried_lock:  # the driver retries from its progress thread too
        _retried += 1


def retrying(method):
    """A ``RunLocation`` method whose S3 calls are tried again with backoff (``S3_BACKOFF``),
    each retry counted (``retries``).

    Safe because every write is atomic: a failed upload leaves no object, and its retry writes
    the whole file again."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        for delay in (*S3_BACKOFF, None):
            try:
                return method(self, *args, **kwargs)
            except OSError as error:
                final = isinstance(error, FileNotFoundError) or any(code in str(error) for code in FINAL)
                if not self.bucket or delay is None or final:
                    raise
                log.warning("S3: %s failed (%s); trying again in %d s", method.__name__,
                            str(error).splitlines()[0], delay)
                _count_retry()
                time.sleep(delay)

    return call


class RunLocation:
    """The folder of one run; all paths given to its methods are relative to it. On S3, reads
    and writes are retried with backoff (``retrying``)."""

    def __init__(self, output: OutputSpec, run_id: str):
        self.output = output
        self.run_id = run_id
        self.bucket: str | None
        if output.is_s3:
            parsed = urlparse(output.path)
            self.bucket = parsed.netloc
            self.root = "/".join(p for p in (parsed.netloc, parsed.path.strip("/"), run_id) if p)
            self.fs = s3_filesystem(output.endpoint_url, output.region)
        else:
            self.bucket = None
            local = output.path.removeprefix("file://")
            self.root = os.path.join(os.path.abspath(os.path.expanduser(local)), run_id)
            self.fs = pafs.LocalFileSystem()

    # -- addresses ---------------------------------------------------------------------------

    def path(self, relative: str = "") -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def uri(self, relative: str = "") -> str:
        """The address a user (or ``datasets``) would use for ``relative``."""
        return ("s3://" if self.bucket else "") + self.path(relative)

    def storage_options(self) -> dict:
        """fsspec options for readers such as ``datasets.load_dataset(..., storage_options=)``."""
        if not self.bucket:
            return {}
        endpoint = self.output.endpoint_url
        key, secret, token = _credentials()
        return {
            "key": key,
            "secret": secret,
            "token": token,
            "client_kwargs": {"region_name": self.output.region, **({"endpoint_url": endpoint} if endpoint else {})},
        }

    # -- checks ------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """ConfigError naming ``output.path`` if the bucket is missing or refuses us."""
        if not self.bucket:
            return
        try:
            info = self.fs.get_file_info(self.bucket)
            if info.type == pafs.FileType.NotFound:
                raise ConfigError(f"output.path: bucket {self.bucket!r} does not exist; create it or fix the path")
            with self.fs.open_output_stream(self.path(f"{STAGING}/write-check")):  # not retried: fail fast
                pass
            self.fs.delete_file(self.path(f"{STAGING}/write-check"))
        except OSError as error:
            text = str(error)
            if any(code in text for code in REFUSALS):
                raise ConfigError(
                    f"output.path: S3 refused the credentials for bucket {self.bucket!r}; "
                    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a key that may write there"
                ) from None
            endpoint = self.output.endpoint_url or "AWS S3"
            raise ConfigError(f"output.path: cannot reach {endpoint} ({text.splitlines()[0]}); "
                              "check output.endpoint_url") from None

    # -- reading -----------------------------------------------------------------------------

    @retrying
    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    @retrying
    def list(self, folder: str, suffix: str = ".parquet") -> list[str]:
        """Relative paths of the files directly in ``folder`` ending in ``suffix``, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(folder), allow_not_found=True))
        names = [i.path.rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.File]
        return sorted(f"{folder}/{n}" for n in names if n.endswith(suffix))

    @retrying
    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_file(self.path(relative)) as stream:
            return stream.read()

    def read_json(self, relative: str) -> dict:
        return json.loads(self.read_bytes(relative))

    @retrying
    def read_table(self, relative: str, columns: builtins.list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(relative), columns=columns, filesystem=self.fs)

    @retrying
    def read_footer(self, relative: str) -> pq.FileMetaData:
        """A Parquet file's footer: schema, row count, key-value metadata (reads nothing else)."""
        with self.fs.open_input_file(self.path(relative)) as stream:
            return pq.ParquetFile(stream).metadata

    def read_metadata(self, relative: str) -> dict[str, str]:
        """The key-value metadata in a Parquet file's footer."""
        raw = self.read_footer(relative).metadata or {}
        return {k.decode(): v.decode() for k, v in raw.items()}

    # -- writing -----------------------------------------------------------------------------

    @retrying
    def _atomic(self, relative: str, write) -> None:
        final = self.path(relative)
        if self.bucket:  # an S3 object is only visible once complete
            write(final)
            return
        staging = self.path(f"{STAGING}/{uuid.uuid4().hex}-{relative.replace('/', '_')}")
        self.fs.create_dir(self.path(STAGING))
        self.fs.create_dir(final.rsplit("/", 1)[0])
        write(staging)
        self.fs.move(staging, final)

    def write_bytes(self, relative: str, data: bytes) -> None:
        def write(path: str) -> None:
            with self.fs.open_output_stream(path) as stream:
                stream.write(data)

        self._atomic(relative, write)

    def write_json(self, relative: str, value: object) -> None:
        self.write_bytes(relative, json.dumps(value, indent=2, ensure_ascii=False).encode())

    def write_table(self, relative: str, table: pa.Table) -> None:
        self._atomic(relative, lambda path: pq.write_table(table, path, filesystem=self.fs))

    def write_shards(self, folder: str, table: pa.Table, rows_per_shard: int, first: int = 0) -> builtins.list[str]:
        """``table`` as ``folder/part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows,
        numbered from ``first``."""
        paths = []
        for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard), start=first):
            paths.append(f"{folder}/part-{index:05d}.parquet")
            self.write_table(paths[-1], table.slice(start, rows_per_shard))
        return paths

    @retrying
    def delete(self, relative: str) -> None:
        """Remove the folder ``relative`` and everything under it, or the file, if it exists."""
        found = self.fs.get_file_info(self.path(relative)).type
        if found == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(relative))
        elif found == pafs.FileType.File:
            self.fs.delete_file(self.path(relative))
