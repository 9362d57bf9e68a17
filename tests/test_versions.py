"""Versioned datasets on local disk and on S3 (SeaweedFS): publish, manifests, ``_latest``, leases."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musiclib.core import storage, versions


def _write_part(dataset: str, version: str, name: str, n: int) -> str:
    uri = storage.join(versions.version_uri(dataset, version), name)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"i": list(range(n))}), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return uri


def test_publish_commits_a_version_and_moves_latest(root):
    ds = storage.join(root, "ds")
    assert versions.latest_version(ds) is None
    files = [_write_part(ds, "v1", "part-0.parquet", 3), _write_part(ds, "v1", "part-1.parquet", 4)]
    m = versions.publish(ds, "v1", files, [3, 4], config={"lr": 0.1})
    assert versions.latest_version(ds) == "v1" and m.rows == 7
    read = versions.read_latest_manifest(ds)
    assert read.config == {"lr": 0.1} and read.code_version == versions.code_version()
    assert [f.path for f in read.files] == ["v1/part-0.parquet", "v1/part-1.parquet"]
    assert versions.verify(read) == []
    assert versions.committed_versions(ds) == ["v1"]


def test_publish_same_run_id_is_idempotent(root):
    ds = storage.join(root, "ds")
    files = [_write_part(ds, "run-a", "p.parquet", 5)]
    first = versions.publish(ds, "run-a", files, [5])
    again = versions.publish(ds, "run-a", files, [5])
    assert again.created_at == first.created_at and versions.committed_versions(ds) == ["run-a"]
    _write_part(ds, "run-a", "p.parquet", 6)  # different data under a committed id
    with pytest.raises(storage.StorageError, match="already committed"):
        versions.publish(ds, "run-a", files, [6])


def test_crash_between_data_and_manifest_leaves_old_version_readable(root):
    ds = storage.join(root, "ds")
    versions.publish(ds, "v1", [_write_part(ds, "v1", "p.parquet", 2)], [2])
    _write_part(ds, "v2", "p.parquet", 9)  # the job dies here: data written, no manifest
    assert versions.latest_version(ds) == "v1"
    assert versions.read_manifest(ds, "v2") is None
    assert versions.committed_versions(ds) == ["v1"]
    with pytest.raises(storage.StorageError, match="uncommitted"):
        versions.set_latest(ds, "v2")


def test_verify_finds_changed_and_missing_files(root):
    ds = storage.join(root, "ds")
    uri = _write_part(ds, "v1", "p.parquet", 2)
    m = versions.publish(ds, "v1", [uri], [2])
    storage.write_bytes(uri, b"tampered")
    assert "checksum" in versions.verify(m)[0]
    storage.delete(uri)
    assert "missing" in versions.verify(m)[0]


def test_publish_rejects_files_outside_the_dataset(root):
    ds = storage.join(root, "ds")
    stray = storage.join(root, "elsewhere.parquet")
    storage.write_bytes(stray, b"x")
    with pytest.raises(storage.StorageError, match="not under"):
        versions.publish(ds, "v1", [stray], [1])
    with pytest.raises(storage.StorageError, match="bad version"):
        versions.publish(ds, "_bad", [], [])


def test_lease_excludes_a_second_writer_and_is_released(root):
    ds = storage.join(root, "ds")
    with versions.lease(ds):
        with pytest.raises(versions.LeaseHeld, match="being written by another run"):
            with versions.lease(ds, wait_s=0.3):
                pass
    with versions.lease(ds):  # released on exit
        pass
    assert not storage.exists(storage.join(ds, versions.LEASE))


def test_lease_of_a_dead_run_is_taken_over(root, monkeypatch):
    """A killed run leaves its lease: expired, or (same host) held by a process that is gone."""
    import socket
    import time

    ds = storage.join(root, "ds")
    uri = storage.join(ds, versions.LEASE)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_pid = {"token": "x", "host": socket.gethostname(), "pid": gone.pid, "expires_at": time.time() + 600}
    storage.write_bytes(uri, json.dumps(dead_pid).encode())
    monkeypatch.setattr(versions, "DEAD_RUN_GRACE_S", 0.5)
    start = time.monotonic()
    with versions.lease(ds):
        assert json.loads(storage.read_bytes(uri))["pid"] == os.getpid()
    assert time.monotonic() - start >= 0.5  # the dead driver's Ray workers get time to stop
    expired = {"token": "y", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}
    storage.write_bytes(uri, json.dumps(expired).encode())
    with versions.lease(ds):
        pass
    alive = {"token": "z", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 600}
    storage.write_bytes(uri, json.dumps(alive).encode())
    with pytest.raises(versions.LeaseHeld, match="host elsewhere"):
        with versions.lease(ds):
            pass


def test_lease_is_renewed_while_held(tmp_path):

    ds = str(tmp_path / "ds")
    with versions.lease(ds, ttl_s=0.4):
        first = json.loads(storage.read_bytes(storage.join(ds, versions.LEASE)))["expires_at"]
        time.sleep(0.5)
        body = json.loads(storage.read_bytes(storage.join(ds, versions.LEASE)))
        assert body["expires_at"] > first and body["pid"] == os.getpid()


@pytest.mark.slow
def test_a_lease_is_renewed_again_after_storage_was_unreachable(s3_server, s3_root, monkeypatch, capsys):
    """An S3 outage fails some renewals (botocore's connection errors, which are not ``OSError``); the
    heartbeat says so and renews the lease once storage is back, so a run that outlives an outage keeps it."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # each renewal fails at once while S3 is away
    ds = s3_root + "/ds"
    with versions.lease(ds, ttl_s=2.0):
        s3_server.stop()
        time.sleep(1.5)  # three beats
        s3_server.start()
        back, renewed = time.time(), False
        for _ in range(50):
            body = json.loads(storage.read_bytes(storage.join(ds, versions.LEASE)))
            if renewed := body["expires_at"] > back + 1.0:
                break
            time.sleep(0.2)
        assert renewed, "the lease was not renewed after the outage"
        versions.check_lease(ds)
    assert "could not renew the lease" in capsys.readouterr().out


def test_a_run_whose_lease_was_taken_over_cannot_publish(tmp_path):
    """A lease another run took over (this one paused past its TTL): publish and set_latest refuse."""

    ds = str(tmp_path / "ds")
    uri = storage.join(ds, versions.LEASE)
    data = storage.join(versions.version_uri(ds, "v1"), "a.parquet")
    rows = storage.write_parquet(pa.table({"x": [1]}), data)
    with versions.lease(ds, ttl_s=60):
        versions.publish(ds, "v0", [data], [rows], move_latest=False)  # held: publishes
        other = {"token": "other", "host": "elsewhere", "pid": 1, "expires_at": 1e12}
        storage.write_bytes(uri, json.dumps(other).encode())
        with pytest.raises(versions.LeaseLost, match="another run took it over"):
            versions.publish(ds, "v1", [data], [rows])
        with pytest.raises(versions.LeaseLost):
            versions.set_latest(ds, "v0")
    assert versions.committed_versions(ds) == ["v0"] and versions.latest_version(ds) is None
    assert json.loads(storage.read_bytes(uri))["token"] == "other"  # the new holder's lease is left alone


def test_an_expired_lease_nobody_took_is_renewed_before_a_publish(tmp_path, monkeypatch):

    ds = str(tmp_path / "ds")
    uri = storage.join(ds, versions.LEASE)
    data = storage.join(versions.version_uri(ds, "v1"), "a.parquet")
    rows = storage.write_parquet(pa.table({"x": [1]}), data)
    with versions.lease(ds, ttl_s=60):
        held = versions._HELD[storage.normalize_uri(ds)]
        with held.lock:  # as if paused past the TTL: the lease on storage has expired, still ours
            expired = {**json.loads(held.body), "expires_at": 0.0}
            held.body = json.dumps(expired).encode()
            storage.write_bytes(uri, held.body)
        versions.publish(ds, "v1", [data], [rows])
        assert json.loads(storage.read_bytes(uri))["expires_at"] > 1e9
    assert versions.latest_version(ds) == "v1"


def test_latest_never_moves_backwards(root):
    ds = storage.join(root, "ds")
    versions.publish(ds, "old", [_write_part(ds, "old", "p.parquet", 1)], [1], move_latest=False)
    versions.publish(ds, "new", [_write_part(ds, "new", "p.parquet", 2)], [2])
    assert versions.latest_version(ds) == "new"
    assert not versions.set_latest(ds, "old")  # e.g. an older run's "already complete" repair
    assert versions.latest_version(ds) == "new"
    assert versions.set_latest(ds, "new")


def test_make_current_finishes_a_commit_but_never_goes_back(root):
    ds = storage.join(root, "ds")
    versions.publish(ds, "v1", [_write_part(ds, "v1", "p.parquet", 1)], [1], move_latest=False)
    assert "is the current version" in versions.make_current(ds, "v1")
    assert versions.latest_version(ds) == "v1"
    versions.publish(ds, "v2", [_write_part(ds, "v2", "p.parquet", 2)], [2])
    assert "stays on the newer version v2" in versions.make_current(ds, "v1")
