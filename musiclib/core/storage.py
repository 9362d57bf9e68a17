"""One storage layer for local paths and S3: URIs, filesystems, object I/O and atomic writes.

Every path in musiclib is a URI: a plain path or ``file://...`` on the embedded default, ``s3://bucket/key``
on a cluster. S3 settings come only from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``), so one job runs
unchanged against AWS, MinIO or a moto server. Credentials are never logged or written anywhere.
Versioned datasets and their leases are built on these objects in ``musiclib.core.versions``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMES = ("", "file", "s3")


class StorageError(RuntimeError):
    """A URI is malformed, an object is missing, or storage cannot be reached."""


class NotFound(StorageError):
    """The object does not exist (as opposed to storage that cannot be reached)."""


class TransientError(RuntimeError):
    """Storage kept failing in a way that may pass (unreachable, timeout, 5xx, throttling), after retries.

    Not a ``StorageError`` and not an ``audio.AudioError``: nothing is wrong with the object or the track,
    so it gets no reason; the task fails and Ray retries it. Its message starts with ``TRANSIENT``, which
    Ray Data's retry setting matches (``ray_env.retry_transient_storage``).
    """


TRANSIENT = "transient storage failure"


# --------------------------------------------------------------------------- URIs


def split_uri(uri: str) -> tuple[str, str]:
    """Return ``(scheme, path)``: scheme is ``"file"`` or ``"s3"``; path is absolute local or ``bucket/key``."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty or non-string URI: {uri!r}")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter is not a scheme
        scheme = ""
    if scheme not in SCHEMES:
        raise StorageError(
            f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://"
        )
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI without a bucket: {uri!r}")
        return "s3", (parsed.netloc + parsed.path).rstrip("/")
    if scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise StorageError(f"file URI names another host {parsed.netloc!r}: {uri!r}")
    path = parsed.path if scheme == "file" else uri
    return "file", os.path.abspath(os.path.expanduser(path))


def normalize_uri(uri: str) -> str:
    """Canonical form: ``s3://bucket/key`` or an absolute local path."""
    scheme, path = split_uri(uri)
    return f"s3://{path}" if scheme == "s3" else path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (local paths use the OS separator)."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        return "s3://" + posixpath.join(path, *[p.strip("/") for p in parts])
    return os.path.join(path, *parts)


def resolve(base_dir: str, uri: str) -> str:
    """Resolve ``uri`` against ``base_dir`` when it is relative (catalogs may hold relative audio paths)."""
    parsed = urlparse(uri)
    if parsed.scheme and len(parsed.scheme) > 1 or os.path.isabs(uri):
        return normalize_uri(uri)
    return join(base_dir, uri)


def parent(uri: str) -> str:
    scheme, path = split_uri(uri)
    return ("s3://" + posixpath.dirname(path)) if scheme == "s3" else os.path.dirname(path)


# --------------------------------------------------------------------------- filesystems


S3_MAX_ATTEMPTS = 6  # tries of one S3 request, both clients, unless AWS_MAX_ATTEMPTS says otherwise


def s3_settings() -> dict[str, Any]:
    """Non-secret S3 settings from the standard AWS variables: endpoint, region and retries.

    Credentials are not read here: boto3 and the AWS SDK inside pyarrow each find them on the node that
    uses them (environment, profile, instance or pod role). Filesystem objects are pickled into Ray
    tasks and actors; with credentials inside, a secret would travel in every task and a session token
    could not refresh there.

    Retries: both clients try each request ``AWS_MAX_ATTEMPTS`` times (default ``S3_MAX_ATTEMPTS``) with
    AWS's standard exponential backoff, which is random (botocore's ``AWS_RETRY_MODE`` may choose another
    mode). The default rides out an endpoint gone for several seconds (a restart, a failover), where the
    clients' own defaults gave up within a second or two and failed the job (docs/RELIABILITY.md).
    """
    env = os.environ
    return {
        "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        "max_attempts": int(env.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
        "retry_mode": env.get("AWS_RETRY_MODE") or "standard",
    }


def _credentials_fingerprint() -> str:
    """A digest of the credential variables, so that a change of credentials gives a new client."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()


@lru_cache(maxsize=8)
def _fsspec_s3(
    endpoint_url: str | None, region: str | None, max_attempts: int, retry_mode: str, _credentials: str
) -> fsspec.AbstractFileSystem:
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    return fsspec.filesystem(
        "s3",
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"total_max_attempts": max_attempts, "mode": retry_mode}},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it, for Python I/O on any URI."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        s = s3_settings()
        fs = _fsspec_s3(
            s["endpoint_url"], s["region"], s["max_attempts"], s["retry_mode"], _credentials_fingerprint()
        )
        return fs, path
    return fsspec.filesystem("file"), path


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, ``max_attempts`` tries per request, also after pickling into a Ray task or
    actor (pyarrow's own pickle drops the retry strategy, and the copy would fall back to 3 tries)."""

    def __init__(self, max_attempts: int, **kwargs: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self._args = (max_attempts, kwargs)

    def __reduce__(self) -> tuple[Any, tuple[int, dict[str, Any]]]:
        return _retrying_s3, self._args


def _retrying_s3(max_attempts: int, kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **kwargs)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Parquet and Ray Data (credentials: see ``s3_settings``)."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    s = s3_settings()
    kwargs: dict[str, Any] = {"region": s["region"] or "us-east-1"}
    if s["endpoint_url"]:
        parsed = urlparse(s["endpoint_url"])
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return RetryingS3FileSystem(s["max_attempts"], **kwargs), path


# --------------------------------------------------------------------------- object I/O


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except Exception as exc:  # network, permissions
        raise StorageError(f"cannot reach {uri}: {type(exc).__name__}: {exc}") from exc


def open_input(uri: str, block_size: int = 1 << 20):
    """Open an object for reading with seek support (S3 reads ranges, never the whole object up front)."""
    fs, path = filesystem(uri)
    try:
        if fs.protocol == "file" or "file" in fs.protocol:
            return open(path, "rb")
        return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    except FileNotFoundError as exc:
        raise NotFound(f"object not found: {uri}") from exc


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise NotFound(f"object not found: {uri}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically: readers see the old content or the new, never a partial one.

    Locally the bytes go to a temporary sibling that is renamed over the target; an S3 PUT is atomic.
    """
    scheme, path = split_uri(uri)
    if scheme == "s3":
        fs, _ = filesystem(uri)
        try:
            fs.pipe_file(path, data)
        except PermissionError as exc:
            raise _denied(uri, exc) from exc
        return
    os.replace(_write_temporary(path, data), path)


def _denied(uri: str, exc: PermissionError) -> StorageError:
    """S3 refused a write (HTTP 403): s3fs says only "Access Denied.", so name the object."""
    return StorageError(
        f"permission denied writing {uri}: {exc} (the credentials in use may not write there)"
    )


def _write_temporary(path: str, data: bytes) -> str:
    """Write ``data`` durably to a new temporary sibling of a local ``path``; return its path."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _precondition_failed(exc: OSError) -> bool:
    """Whether an S3 error is a failed conditional write (HTTP 412).

    s3fs raises ``FileExistsError`` only when the error names its condition (AWS, moto); SeaweedFS's
    does not, so the S3 error code on the botocore cause decides.
    """
    response = getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return isinstance(exc, FileExistsError) or code in ("PreconditionFailed", "412")


def create_only(uri: str, data: bytes) -> bool:
    """Write an object only where none exists: True when written, False when the key was taken.

    Atomic against concurrent writers: locally a complete temporary file is hard-linked to the target
    (``link`` fails when the target exists, like ``O_EXCL``); on S3 a PUT with ``If-None-Match: *``,
    which AWS S3, MinIO and SeaweedFS refuse with 412 when the key exists.
    """
    scheme, path = split_uri(uri)
    if scheme == "s3":
        fs, _ = filesystem(uri)
        try:
            fs.pipe_file(path, data, mode="create")
        except PermissionError as exc:
            raise _denied(uri, exc) from exc
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True
    tmp = _write_temporary(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def replace_if_unchanged(uri: str, expected: bytes, data: bytes) -> bool:
    """Overwrite an object only while it still holds ``expected``: True when replaced.

    Compare-and-swap for small control objects (leases). On S3 the PUT carries ``If-Match`` with the
    ETag read alongside the content. Locally the read and the replace happen under an exclusive
    ``flock`` of the folder, which every local compare-and-swap takes, and the new content replaces the
    old by a rename: the object never disappears, so a ``create_only`` contender cannot slip in between.
    """
    scheme, path = split_uri(uri)
    if scheme == "s3":
        fs, _ = filesystem(uri)
        try:
            info = fs.info(path)
            if fs.cat_file(path) != expected:
                return False
            fs.pipe_file(path, data, IfMatch=info["ETag"])
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                if f.read() != expected:
                    return False
        except FileNotFoundError:
            return False
        os.replace(_write_temporary(path, data), path)
        return True
    finally:
        os.close(folder)  # releases the lock


def write_parquet(table: pa.Table, uri: str, compression: str = "zstd") -> int:
    """Write a table as one Parquet file, atomically (``write_bytes``); returns its row count."""
    return write_parquet_parts([table], table.schema, uri, compression)


def write_parquet_parts(
    parts: Iterable[pa.Table], schema: pa.Schema, uri: str, compression: str = "zstd"
) -> int:
    """Write tables made one at a time as the row groups of one Parquet file, atomically; returns its rows.

    Only the compressed file is held while the parts are made, never all of them uncompressed.
    """
    sink, rows = pa.BufferOutputStream(), 0
    with pq.ParquetWriter(sink, schema, compression=compression) as writer:
        for part in parts:
            writer.write_table(part)
            rows += len(part)
    write_bytes(uri, sink.getvalue().to_pybytes())
    return rows


def read_parquet(
    uris: list[str],
    columns: list[str] | None = None,
    schema: pa.Schema | None = None,
    filters: pc.Expression | None = None,
) -> pa.Table:
    """Parquet files (URIs on one filesystem) as one table, reading only ``columns`` (and, with
    ``filters``, only the matching rows, skipping the row groups whose statistics rule them out).

    No files give an empty table of ``schema`` when one is given.
    """
    if not uris:
        if schema is None:
            raise StorageError("no Parquet files to read")
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    fs, _ = arrow_filesystem(uris[0])
    paths = [split_uri(u)[1] for u in uris]
    return pq.ParquetDataset(paths, filesystem=fs, schema=schema, filters=filters).read(columns=columns)


def parquet_rows(uri: str) -> int:
    """Rows of a Parquet file, from its footer (the data is not read)."""
    fs, path = arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f).num_rows


def parquet_schema(uri: str) -> pa.Schema:
    """The schema of a Parquet file, from its footer (the data is not read)."""
    fs, path = arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_schema(f)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def makedirs(uri: str) -> None:
    scheme, path = split_uri(uri)
    if scheme == "file":
        Path(path).mkdir(parents=True, exist_ok=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly or recursively under a prefix, as URIs, sorted (empty when the prefix is absent)."""
    fs, path = filesystem(uri)
    scheme, _ = split_uri(uri)
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return []
    prefix = "s3://" if scheme == "s3" else ""
    return sorted(prefix + p for p in found if p.endswith(suffix))


def file_versions(uri: str, suffix: str = "") -> list[tuple[str, int, str]]:
    """``(uri, size, version)`` of the file ``uri``, or of each file under the folder ``uri`` whose name ends
    in ``suffix``, sorted; the version is the S3 ETag, or the local modification time. Under a folder, names
    starting with ``.`` or ``_`` (a writer's temporaries, ``_SUCCESS``) are left out. ``NotFound`` when
    nothing is at ``uri``: what a reader of a file or folder of files needs to know that it changed."""
    fs, path = filesystem(uri)
    scheme, _ = split_uri(uri)
    prefix = "s3://" if scheme == "s3" else ""
    try:
        if not fs.exists(path):
            raise NotFound(f"not found: {uri}")
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            base = path.rstrip("/") + "/"
            infos = [
                i
                for p, i in found.items()
                if p.endswith(suffix) and not any(c[:1] in (".", "_") for c in p[len(base) :].split("/"))
            ]
        else:
            infos = [fs.info(path)]
    except NotFound:
        raise
    except Exception as exc:  # network, permissions
        raise StorageError(f"cannot list {uri}: {type(exc).__name__}: {exc}") from exc
    return sorted((prefix + i["name"], int(i["size"]), str(i.get("ETag") or i.get("mtime"))) for i in infos)


def delete(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def file_checksum(uri: str) -> str:
    """sha256 of an object's bytes, streamed."""
    h = hashlib.sha256()
    with open_input(uri) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
