"""Versioned datasets on the storage layer: versions, manifests, the ``_latest`` pointer and leases.

A *dataset* is a folder of versions. A version's data files are written first; its manifest
(``_manifests/<version>.json``: files, row counts, checksums, config, code version) is written last, and
only versions with a manifest exist for readers. ``_latest`` points at the newest complete version and
moves only after that version's manifest is in place. One run at a time writes a dataset: it holds the
dataset's lease (``_lease.json``), and a run that lost its lease cannot publish.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from musiclib.core import storage

MANIFEST_DIR = "_manifests"
LATEST = "_latest"


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


class LeaseHeld(storage.StorageError):
    """Another run is writing the same dataset."""


class LeaseLost(storage.StorageError):
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
    held = _HELD.get(storage.normalize_uri(dataset))
    if held is None:
        return
    with held.lock:
        if not held.lost:
            try:
                current = storage.read_bytes(held.uri)
            except storage.NotFound:
                current = b""
            if current != held.body:
                held.lost = True
            elif json.loads(current)["expires_at"] < time.time():
                fresh = _lease_body(held.token, held.ttl_s)
                if storage.replace_if_unchanged(held.uri, current, fresh):
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
    uri = storage.join(storage.normalize_uri(dataset), LEASE)
    token = uuid.uuid4().hex
    body = _lease_body(token, ttl_s)
    deadline = time.monotonic() + wait_s
    while not storage.create_only(uri, body):
        try:
            current = storage.read_bytes(uri)
        except storage.NotFound:  # released between our write and our read: try again
            continue
        holder = json.loads(current)
        if _lease_is_dead(holder):
            if holder.get("expires_at", 0) >= time.time():  # its process is gone, maybe not its workers
                time.sleep(DEAD_RUN_GRACE_S)
            if storage.replace_if_unchanged(uri, current, body):
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
    key = storage.normalize_uri(dataset)
    held = _HELD[key] = _Held(uri, token, ttl_s, body)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 4):
            with held.lock:
                if held.lost:
                    return
                fresh = _lease_body(token, ttl_s)
                try:
                    if not storage.replace_if_unchanged(uri, held.body, fresh):
                        held.lost = True
                        print(
                            f"warning: lost the lease on {dataset}; another run may be writing it", flush=True
                        )
                        return
                except Exception as exc:  # unreachable; botocore's errors are not OSError
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
        with contextlib.suppress(Exception):  # best effort: an unreleased lease expires after its TTL
            if storage.read_bytes(uri) == held.body:
                storage.delete(uri)


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
        return [storage.join(self.dataset, f.path) for f in self.files]

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
    return storage.join(dataset, MANIFEST_DIR, f"{version}.json")


def version_uri(dataset: str, version: str) -> str:
    """Folder where a version's data files live (relative paths in the manifest start here)."""
    return storage.join(dataset, version)


def _check_version(version: str) -> None:
    if not version or "/" in version or version.startswith(("_", ".")):
        raise storage.StorageError(f"bad version id {version!r}: use letters, digits, '-', '_' and '.'")


def read_manifest(dataset: str, version: str) -> Manifest | None:
    """The committed manifest of a version, or None when that version was never committed."""
    uri = manifest_uri(dataset, version)
    if not storage.exists(uri):
        return None
    return Manifest.from_json(storage.read_json(uri))


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
    dataset = storage.normalize_uri(dataset)
    existing = read_manifest(dataset, version)
    entries = list(carried or [])
    root_path = storage.split_uri(dataset)[1]
    for uri, n in zip(files, rows, strict=True):
        path = storage.split_uri(uri)[1]
        if not path.startswith(root_path + "/") and not path.startswith(root_path + os.sep):
            raise storage.StorageError(f"{uri} is not under dataset {dataset}")
        rel = path[len(root_path) + 1 :].replace(os.sep, "/")
        fs, p = storage.filesystem(uri)
        checksum = storage.file_checksum(uri)
        entries.append(FileEntry(path=rel, rows=int(n), sha256=checksum, bytes=int(fs.size(p))))
    check_lease(dataset)  # after the checksums (the slow part), before the commit
    if existing is not None:
        if sorted(e.sha256 for e in existing.files) == sorted(e.sha256 for e in entries):
            if move_latest:
                set_latest(dataset, version)
            return existing
        raise storage.StorageError(f"version {version} of {dataset} is already committed with different data")
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
    storage.write_json(manifest_uri(dataset, version), body)
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
        raise storage.StorageError(f"cannot point latest at uncommitted version {version} of {dataset}")
    uri = storage.join(dataset, LATEST)
    body = json.dumps({"version": version}).encode()
    while True:
        try:
            current_body = storage.read_bytes(uri)
        except storage.NotFound:
            if storage.create_only(uri, body):
                return True
            continue
        current = read_manifest(dataset, json.loads(current_body)["version"])
        if current is not None and (current.created_at, current.version) >= (new.created_at, version):
            return current.version == version
        if storage.replace_if_unchanged(uri, current_body, body):
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
    uri = storage.join(dataset, LATEST)
    if not storage.exists(uri):
        return None
    return storage.read_json(uri)["version"]


def committed_versions(dataset: str) -> list[str]:
    return sorted(Path(u).stem for u in storage.list_files(storage.join(dataset, MANIFEST_DIR), ".json"))


def read_latest_manifest(dataset: str) -> Manifest:
    version = latest_version(dataset)
    if version is None:
        raise storage.StorageError(f"no committed version under {dataset}")
    manifest = read_manifest(dataset, version)
    if manifest is None:
        raise storage.StorageError(f"{dataset}/_latest points at {version}, which has no manifest")
    return manifest


def verify(manifest: Manifest) -> list[str]:
    """Problems with a committed version's files (missing or changed); empty when intact."""
    problems = []
    for entry, uri in zip(manifest.files, manifest.file_uris(), strict=True):
        if not storage.exists(uri):
            problems.append(f"missing: {uri}")
        elif storage.file_checksum(uri) != entry.sha256:
            problems.append(f"checksum mismatch: {uri}")
    return problems
