"""One storage layer for local paths and S3: URIs, filesystems, atomic writes and versioned datasets.

Every path in musiclib is a URI: a plain path or ``file://...`` on the embedded default, ``s3://bucket/key``
on a cluster. S3 settings come only from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``), so one job runs
unchanged against AWS, MinIO or a moto server. Credentials are never logged or written anywhere.

A *dataset* is a folder of versions. A version's data files are written first; its manifest
(``_manifests/<version>.json``: files, row counts, checksums, config, code version) is written last, and
only versions with a manifest exist for readers. ``_latest`` points at the newest complete version and
moves only after that version's manifest is in place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMES = ("", "file", "s3")
MANIFEST_DIR = "_manifests"
LATEST = "_latest"


class StorageError(RuntimeError):
    """A URI is malformed, an object is missing, or storage cannot be reached."""


class NotFound(StorageError):
    """The object does not exist (as opposed to storage that cannot be reached)."""


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


def s3_settings() -> dict[str, Any]:
    """Non-secret S3 settings from the standard AWS variables: endpoint and region.

    Credentials are not read here: boto3 and the AWS SDK inside pyarrow each find them on the node that
    uses them (environment, profile, instance or pod role). Filesystem objects are pickled into Ray
    tasks and actors; with credentials inside, a secret would travel in every task and a session token
    could not refresh there.
    """
    env = os.environ
    return {
        "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
    }


def _credentials_fingerprint() -> str:
    """A digest of the credential variables, so that a change of credentials gives a new client."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()


@lru_cache(maxsize=8)
def _fsspec_s3(endpoint_url: str | None, region: str | None, _credentials: str) -> fsspec.AbstractFileSystem:
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    return fsspec.filesystem(
        "s3", client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False
    )


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it, for Python I/O on any URI."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        s = s3_settings()
        return _fsspec_s3(s["endpoint_url"], s["region"], _credentials_fingerprint()), path
    return fsspec.filesystem("file"), path


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
    return pafs.S3FileSystem(**kwargs), path


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
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    write_bytes(uri, sink.getvalue().to_pybytes())
    return len(table)


def read_parquet(
    uris: list[str], columns: list[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table:
    """Parquet files (URIs on one filesystem) as one table, reading only ``columns``.

    No files give an empty table of ``schema`` when one is given.
    """
    if not uris:
        if schema is None:
            raise StorageError("no Parquet files to read")
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    fs, _ = arrow_filesystem(uris[0])
    paths = [split_uri(u)[1] for u in uris]
    return pq.ParquetDataset(paths, filesystem=fs, schema=schema).read(columns=columns)


def parquet_rows(uri: str) -> int:
    """Rows of a Parquet file, from its footer (the data is not read)."""
    fs, path = arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f).num_rows


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


# --------------------------------------------------------------------------- code version


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<sha256 of musiclib's sources>``: identical code gives an identical id anywhere."""
    from musiclib import __version__

    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


# --------------------------------------------------------------------------- leases

LEASE = "_lease.json"
LEASE_TTL_S = 120.0  # a lease not renewed for this long belongs to a dead run and may be taken over
DEAD_RUN_GRACE_S = 5.0  # a killed driver's Ray workers outlive it by a few seconds: let them stop first


class LeaseHeld(StorageError):
    """Another run is writing the same dataset."""


class LeaseLost(StorageError):
    """This run's lease expired and another run took it over: this run must not publish."""


@dataclass
class _Held:
    """A lease this process holds: the body last written (renewals change it), guarded by ``lock``."""

    uri: str
    token: str
    ttl_s: float
    body: bytes
    lost: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_HELD: dict[str, _Held] = {}  # dataset URI -> this process's lease on it


def check_lease(dataset: str) -> None:
    """Raise ``LeaseLost`` when this process leased ``dataset`` and another run has taken the lease over.

    A run paused (SIGSTOP, a suspended VM, a long GC or network stall) past its lease's TTL loses it to the
    next run, and its heartbeat may not have run yet when it resumes. ``publish`` and ``set_latest`` call
    this first, so such a run fails instead of committing over the new holder's work. It reads the lease
    object; a lease still ours but expired is renewed (compare-and-swap) before it is relied on. Datasets
    this process holds no lease on pass unchecked.
    """
    held = _HELD.get(normalize_uri(dataset))
    if held is None:
        return
    with held.lock:
        if not held.lost:
            try:
                current = read_bytes(held.uri)
            except NotFound:
                current = b""
            if current != held.body:
                held.lost = True
            elif json.loads(current)["expires_at"] < time.time():
                fresh = _lease_body(held.token, held.ttl_s)
                if replace_if_unchanged(held.uri, current, fresh):
                    held.body = fresh
                else:
                    held.lost = True
    if held.lost:
        raise LeaseLost(
            f"lost the lease on {dataset}: this run went {held.ttl_s:.0f} s without renewing it (paused or "
            f"cut off from storage) and another run took it over; nothing more of this run is published. "
            f"That run writes the dataset now."
        )


def _lease_body(token: str, ttl_s: float) -> bytes:
    now = time.time()
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    return json.dumps({"token": token, **owner, "renewed_at": now, "expires_at": now + ttl_s}).encode()


def _lease_is_dead(holder: dict[str, Any]) -> bool:
    """Expired, or held by a process of this host that no longer exists (a killed run, restarted)."""
    if holder.get("expires_at", 0) < time.time():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


@contextlib.contextmanager
def lease(dataset: str, ttl_s: float = LEASE_TTL_S, wait_s: float = 0.0) -> Iterator[None]:
    """Hold ``<dataset>/_lease.json`` while writing a dataset: one writer at a time, across machines.

    Taken with a create-only write; renewed by a background thread every ``ttl_s / 4``; released on exit.
    A run that finds a live lease waits up to ``wait_s`` seconds, then raises ``LeaseHeld`` naming the
    holder. A lease left by a dead run (not renewed for ``ttl_s``, or whose process on this host is
    gone, after ``DEAD_RUN_GRACE_S`` for the Ray workers it leaves behind) is taken over with a
    compare-and-swap, so of two runs restarted together only one gets it. A holder that was paused past
    ``ttl_s`` and lost its lease that way cannot publish when it resumes: its heartbeat stops renewing,
    and ``publish`` and ``set_latest`` raise ``LeaseLost`` (``check_lease``).
    """
    uri = join(normalize_uri(dataset), LEASE)
    token = uuid.uuid4().hex
    body = _lease_body(token, ttl_s)
    deadline = time.monotonic() + wait_s
    while not create_only(uri, body):
        try:
            current = read_bytes(uri)
        except NotFound:  # released between our write and our read: try again
            continue
        holder = json.loads(current)
        if _lease_is_dead(holder):
            if holder.get("expires_at", 0) >= time.time():  # its process is gone, maybe not its workers
                time.sleep(DEAD_RUN_GRACE_S)
            if replace_if_unchanged(uri, current, body):
                break
            continue
        if time.monotonic() >= deadline:
            until = _dt.datetime.fromtimestamp(holder["expires_at"], _dt.UTC).isoformat(timespec="seconds")
            raise LeaseHeld(
                f"{dataset} is being written by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}; its lease runs until {until} unless renewed). Wait for it to "
                f"finish, or, if that run is dead, run again after {until}."
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    key = normalize_uri(dataset)
    held = _HELD[key] = _Held(uri, token, ttl_s, body)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 4):
            with held.lock:
                if held.lost:
                    return
                fresh = _lease_body(token, ttl_s)
                try:
                    if not replace_if_unchanged(uri, held.body, fresh):
                        held.lost = True
                        print(
                            f"warning: lost the lease on {dataset}; another run may be writing it", flush=True
                        )
                        return
                except (OSError, StorageError) as exc:  # storage unreachable: try again at the next beat
                    print(
                        f"warning: could not renew the lease on {dataset}: {type(exc).__name__}", flush=True
                    )
                    continue
                held.body = fresh

    beat = threading.Thread(target=renew, name=f"lease {dataset}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        _HELD.pop(key, None)
        with contextlib.suppress(StorageError, OSError):
            if read_bytes(uri) == held.body:
                delete(uri)


# --------------------------------------------------------------------------- versioned datasets


@dataclass
class FileEntry:
    path: str  # relative to the dataset root
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """What a committed version holds. Written last; its presence is the commit."""

    dataset: str
    version: str
    files: list[FileEntry]
    config: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def file_uris(self) -> list[str]:
        return [join(self.dataset, f.path) for f in self.files]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        files = [FileEntry(**f) for f in obj.pop("files")]
        return cls(files=files, **obj)


def utc_now() -> _dt.datetime:
    """The current time in UTC: every timestamp a job records (manifests, version ids, tag rows)."""
    return _dt.datetime.now(_dt.UTC)


def new_version() -> str:
    """A fresh version id, ``v<UTC time>-<random>``: ordered by time, unique across concurrent runs."""
    return f"v{utc_now().strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def digest_version(prefix: str, inputs: Any, length: int = 10) -> str:
    """``<prefix>-<sha256 of the inputs as JSON>``: the version id of a result fully set by its inputs,
    so the same inputs name the same version and a re-run finds it complete."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:length]}"


def manifest_uri(dataset: str, version: str) -> str:
    return join(dataset, MANIFEST_DIR, f"{version}.json")


def version_uri(dataset: str, version: str) -> str:
    """Folder where a version's data files live (relative paths in the manifest start here)."""
    return join(dataset, version)


def _check_version(version: str) -> None:
    if not version or "/" in version or version.startswith(("_", ".")):
        raise StorageError(f"bad version id {version!r}: use letters, digits, '-', '_' and '.'")


def read_manifest(dataset: str, version: str) -> Manifest | None:
    """The committed manifest of a version, or None when that version was never committed."""
    uri = manifest_uri(dataset, version)
    if not exists(uri):
        return None
    return Manifest.from_json(read_json(uri))


def publish(
    dataset: str,
    version: str,
    files: list[str],
    rows: list[int],
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    move_latest: bool = True,
    carried: list[FileEntry] | None = None,
) -> Manifest:
    """Commit a version whose data files are already written: checksum them, write the manifest, move latest.

    ``files`` are URIs under the dataset root. ``carried`` are entries of an earlier committed manifest
    that the new version keeps as they are (not read again: an incremental version of millions of rows
    checksums only its new files). Publishing a version that is already committed with the same files
    is a no-op that returns the existing manifest (idempotent re-runs).
    """
    _check_version(version)
    dataset = normalize_uri(dataset)
    existing = read_manifest(dataset, version)
    entries = list(carried or [])
    root_path = split_uri(dataset)[1]
    for uri, n in zip(files, rows, strict=True):
        path = split_uri(uri)[1]
        if not path.startswith(root_path + "/") and not path.startswith(root_path + os.sep):
            raise StorageError(f"{uri} is not under dataset {dataset}")
        rel = path[len(root_path) + 1 :].replace(os.sep, "/")
        fs, p = filesystem(uri)
        entries.append(FileEntry(path=rel, rows=int(n), sha256=file_checksum(uri), bytes=int(fs.size(p))))
    check_lease(dataset)  # after the checksums (the slow part), before the commit
    if existing is not None:
        if sorted(e.sha256 for e in existing.files) == sorted(e.sha256 for e in entries):
            if move_latest:
                set_latest(dataset, version)
            return existing
        raise StorageError(f"version {version} of {dataset} is already committed with different data")
    manifest = Manifest(
        dataset=dataset,
        version=version,
        files=entries,
        config=config or {},
        code_version=code_version(),
        created_at=utc_now().isoformat(timespec="microseconds"),
        extra=extra or {},
    )
    body = asdict(manifest)
    write_json(manifest_uri(dataset, version), body)
    if move_latest:
        set_latest(dataset, version)
    return manifest


def set_latest(dataset: str, version: str) -> bool:
    """Point ``_latest`` at a committed version, unless it points at a newer one: True when it points there.

    Versions are ordered by their manifests' commit times, so ``_latest`` never moves backwards: a
    repaired or re-run older version does not hide a newer one. The pointer moves by compare-and-swap,
    so of two concurrent publishers the newer version wins whatever the order of their writes.
    """
    check_lease(dataset)
    new = read_manifest(dataset, version)
    if new is None:
        raise StorageError(f"cannot point latest at uncommitted version {version} of {dataset}")
    uri = join(dataset, LATEST)
    body = json.dumps({"version": version}).encode()
    while True:
        try:
            current_body = read_bytes(uri)
        except NotFound:
            if create_only(uri, body):
                return True
            continue
        current = read_manifest(dataset, json.loads(current_body)["version"])
        if current is not None and (current.created_at, current.version) >= (new.created_at, version):
            return current.version == version
        if replace_if_unchanged(uri, current_body, body):
            return True


def make_current(dataset: str, version: str) -> str:
    """``set_latest`` for a version found already committed; says where ``_latest`` points afterwards.

    The one "already complete" path of every job: a run that died between its manifest and the pointer
    is finished here, and an older version re-run leaves a newer ``_latest`` where it is.
    """
    if set_latest(dataset, version):
        return f"it is the current version of {dataset}"
    return f"{dataset}/_latest stays on the newer version {latest_version(dataset)}"


def already_complete(dataset: str, version: str, job: str) -> Manifest | None:
    """The manifest of ``version`` when it is committed, made current (``make_current``); else None.

    The one "already complete, nothing to do" path of every job: a re-run with the same inputs finds its
    version here and writes nothing.
    """
    manifest = read_manifest(dataset, version)
    if manifest is not None:
        print(f"{job}: version {version} of {dataset} is already complete; {make_current(dataset, version)}")
    return manifest


def latest_version(dataset: str) -> str | None:
    """The version ``_latest`` points at, or None for a dataset with no committed version."""
    uri = join(dataset, LATEST)
    if not exists(uri):
        return None
    return read_json(uri)["version"]


def committed_versions(dataset: str) -> list[str]:
    return sorted(Path(u).stem for u in list_files(join(dataset, MANIFEST_DIR), ".json"))


def read_latest_manifest(dataset: str) -> Manifest:
    version = latest_version(dataset)
    if version is None:
        raise StorageError(f"no committed version under {dataset}")
    manifest = read_manifest(dataset, version)
    if manifest is None:
        raise StorageError(f"{dataset}/_latest points at {version}, which has no manifest")
    return manifest


def verify(manifest: Manifest) -> list[str]:
    """Problems with a committed version's files (missing or changed); empty when intact."""
    problems = []
    for entry, uri in zip(manifest.files, manifest.file_uris(), strict=True):
        if not exists(uri):
            problems.append(f"missing: {uri}")
        elif file_checksum(uri) != entry.sha256:
            problems.append(f"checksum mismatch: {uri}")
    return problems
