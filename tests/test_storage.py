"""The storage layer on local disk and on S3 over HTTP (moto): URIs, atomic writes, versioned publish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musiclib import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root") + "/store"


def test_uri_parsing():
    assert storage.split_uri("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert storage.split_uri("file:///tmp/x") == ("file", "/tmp/x")
    assert storage.split_uri("rel/path")[1] == os.path.abspath("rel/path")
    assert storage.join("s3://b/p", "x", "y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.resolve("s3://b/cat", "audio/a.flac") == "s3://b/cat/audio/a.flac"
    assert storage.resolve("s3://b/cat", "s3://other/a.flac") == "s3://other/a.flac"
    assert storage.resolve("/data/cat", "/abs/a.flac") == "/abs/a.flac"
    for bad in ["", "gs://bucket/x", "s3://", "http://host/x"]:
        with pytest.raises(storage.StorageError):
            storage.split_uri(bad)


def test_s3_settings_come_from_standard_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    s = storage.s3_settings()
    assert s["endpoint_url"] == "http://127.0.0.1:9" and s["region"] == "eu-west-1"
    fs, path = storage.arrow_filesystem("s3://bucket/key")
    assert path == "bucket/key" and fs.region == "eu-west-1"
    assert "secret-value" not in repr(fs) and "secret-value" not in str(storage.filesystem("s3://b/k")[0])


def test_pickled_filesystems_hold_no_credentials(s3_root):
    """Filesystems travel to Ray workers pickled: the secret must stay on the node, yet S3 must work."""
    import pickle

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    uri = storage.join(s3_root, "p", "x.bin")
    storage.write_bytes(uri, b"ok")
    fsspec_fs, _ = storage.filesystem(uri)
    arrow_fs, path = storage.arrow_filesystem(uri)
    for fs in (fsspec_fs, arrow_fs):
        blob = pickle.dumps(fs)
        assert secret.encode() not in blob and os.environ["AWS_ACCESS_KEY_ID"].encode() not in blob
    with pickle.loads(pickle.dumps(arrow_fs)).open_input_stream(path) as f:
        assert f.read() == b"ok"
    assert pickle.loads(pickle.dumps(fsspec_fs)).cat_file(storage.split_uri(uri)[1]) == b"ok"


def test_file_uri_naming_another_host_is_refused():
    assert storage.split_uri("file://localhost/tmp/x") == ("file", "/tmp/x")
    with pytest.raises(storage.StorageError, match="another host"):
        storage.split_uri("file://fileserver/share/a.wav")


def test_bytes_json_list_delete(root):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_json(storage.join(root, "a", "y.json"), {"k": 1})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.read_json(storage.join(root, "a", "y.json")) == {"k": 1}
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(root, "a"))] == ["x.bin", "y.json"]
    assert storage.list_files(storage.join(root, "absent")) == []
    storage.delete(storage.join(root, "a"), recursive=True)
    assert not storage.exists(storage.join(root, "a", "x.bin"))
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(storage.join(root, "a", "x.bin"))


def test_local_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "t.bin"
    storage.write_bytes(str(target), b"old")
    storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["t.bin"]


def test_a_write_killed_midway_leaves_readers_the_old_content(tmp_path):
    """SIGKILL a process in the middle of a large write while this one reads the object in a loop: every
    read, and the object after the kill, is the old content (a write in place would show a partial one)."""
    target = tmp_path / "t.bin"
    storage.write_bytes(str(target), b"old")
    script = "import sys; from musiclib import storage; storage.write_bytes(sys.argv[1], b'x' * (128 << 20))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=env)
    reads = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            reads.append(target.read_bytes()[:8])
            started = target.stat().st_size != 3 or any(
                p.name != "t.bin" and p.stat().st_size > 0 for p in tmp_path.iterdir()
            )
            if started:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the write ended before it could be killed"
    reads.append(target.read_bytes())
    assert set(reads) == {b"old"}


def _write_part(dataset: str, version: str, name: str, n: int) -> str:
    uri = storage.join(storage.version_uri(dataset, version), name)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"i": list(range(n))}), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return uri


def test_publish_commits_a_version_and_moves_latest(root):
    ds = storage.join(root, "ds")
    assert storage.latest_version(ds) is None
    files = [_write_part(ds, "v1", "part-0.parquet", 3), _write_part(ds, "v1", "part-1.parquet", 4)]
    m = storage.publish(ds, "v1", files, [3, 4], config={"lr": 0.1})
    assert storage.latest_version(ds) == "v1" and m.rows == 7
    read = storage.read_latest_manifest(ds)
    assert read.config == {"lr": 0.1} and read.code_version == storage.code_version()
    assert [f.path for f in read.files] == ["v1/part-0.parquet", "v1/part-1.parquet"]
    assert storage.verify(read) == []
    assert storage.committed_versions(ds) == ["v1"]


def test_publish_same_run_id_is_idempotent(root):
    ds = storage.join(root, "ds")
    files = [_write_part(ds, "run-a", "p.parquet", 5)]
    first = storage.publish(ds, "run-a", files, [5])
    again = storage.publish(ds, "run-a", files, [5])
    assert again.created_at == first.created_at and storage.committed_versions(ds) == ["run-a"]
    _write_part(ds, "run-a", "p.parquet", 6)  # different data under a committed id
    with pytest.raises(storage.StorageError, match="already committed"):
        storage.publish(ds, "run-a", files, [6])


def test_crash_between_data_and_manifest_leaves_old_version_readable(root):
    ds = storage.join(root, "ds")
    storage.publish(ds, "v1", [_write_part(ds, "v1", "p.parquet", 2)], [2])
    _write_part(ds, "v2", "p.parquet", 9)  # the job dies here: data written, no manifest
    assert storage.latest_version(ds) == "v1"
    assert storage.read_manifest(ds, "v2") is None
    assert storage.committed_versions(ds) == ["v1"]
    with pytest.raises(storage.StorageError, match="uncommitted"):
        storage.set_latest(ds, "v2")


def test_verify_finds_changed_and_missing_files(root):
    ds = storage.join(root, "ds")
    uri = _write_part(ds, "v1", "p.parquet", 2)
    m = storage.publish(ds, "v1", [uri], [2])
    storage.write_bytes(uri, b"tampered")
    assert "checksum" in storage.verify(m)[0]
    storage.delete(uri)
    assert "missing" in storage.verify(m)[0]


def test_publish_rejects_files_outside_the_dataset(root):
    ds = storage.join(root, "ds")
    stray = storage.join(root, "elsewhere.parquet")
    storage.write_bytes(stray, b"x")
    with pytest.raises(storage.StorageError, match="not under"):
        storage.publish(ds, "v1", [stray], [1])
    with pytest.raises(storage.StorageError, match="bad version"):
        storage.publish(ds, "_bad", [], [])


def test_arrow_filesystem_reads_what_fsspec_wrote(root):
    uri = _write_part(storage.join(root, "ds"), "v1", "p.parquet", 4)
    fs, path = storage.arrow_filesystem(uri)
    assert pq.read_table(path, filesystem=fs).num_rows == 4


def test_parquet_files_read_as_one_table(root):
    schema = pa.schema([("id", pa.string()), ("x", pa.float64())])
    uris = [storage.join(root, "t", f"part-{i}.parquet") for i in range(2)]
    for i, uri in enumerate(uris):
        table = pa.table({"id": [f"a{i}", f"b{i}"], "x": [float(i), i + 0.5]}, schema=schema)
        assert storage.write_parquet(table, uri) == 2
    both = storage.read_parquet(uris, ["id"])
    assert both.column_names == ["id"] and sorted(both["id"].to_pylist()) == ["a0", "a1", "b0", "b1"]
    assert storage.read_parquet([], ["x"], schema).schema == pa.schema([("x", pa.float64())])
    with pytest.raises(storage.StorageError, match="no Parquet files"):
        storage.read_parquet([])


def test_unreachable_s3_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError, match="cannot reach"):
        storage.exists("s3://bucket/key")


def test_create_only_writes_once(root):
    uri = storage.join(root, "c", "once.json")
    assert storage.create_only(uri, b"first")
    assert not storage.create_only(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_replace_if_unchanged_is_compare_and_swap(root):
    uri = storage.join(root, "c", "cas.json")
    storage.write_bytes(uri, b"a")
    assert not storage.replace_if_unchanged(uri, b"stale", b"b")
    assert storage.read_bytes(uri) == b"a"
    assert storage.replace_if_unchanged(uri, b"a", b"b")
    assert storage.read_bytes(uri) == b"b"
    assert not storage.replace_if_unchanged(storage.join(root, "c", "absent"), b"a", b"b")


def test_concurrent_create_only_has_one_winner(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    uri = str(tmp_path / "race.json")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.create_only(uri, str(i).encode()), range(32)))
    assert sum(won) == 1 and storage.read_bytes(uri) == str(won.index(True)).encode()


def test_a_local_swap_never_leaves_the_object_missing(tmp_path):
    """A renewal must not open a window in which ``create_only`` (a new run taking the lease) succeeds."""
    uri = str(tmp_path / "_lease.json")
    assert storage.create_only(uri, b"0")
    stop = threading.Event()
    stolen = []

    def contend() -> None:
        while not stop.is_set():
            if storage.create_only(uri, b"thief"):
                stolen.append(True)
                return

    thief = threading.Thread(target=contend)
    thief.start()
    try:
        for i in range(300):
            assert storage.replace_if_unchanged(uri, str(i).encode(), str(i + 1).encode())
    finally:
        stop.set()
        thief.join()
    assert not stolen and storage.read_bytes(uri) == b"300"


def test_lease_excludes_a_second_writer_and_is_released(root):
    ds = storage.join(root, "ds")
    with storage.lease(ds):
        with pytest.raises(storage.LeaseHeld, match="being written by another run"):
            with storage.lease(ds, wait_s=0.3):
                pass
    with storage.lease(ds):  # released on exit
        pass
    assert not storage.exists(storage.join(ds, storage.LEASE))


def test_lease_of_a_dead_run_is_taken_over(root, monkeypatch):
    """A killed run leaves its lease: expired, or (same host) held by a process that is gone."""
    import json
    import socket
    import subprocess
    import time

    ds = storage.join(root, "ds")
    uri = storage.join(ds, storage.LEASE)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_pid = {"token": "x", "host": socket.gethostname(), "pid": gone.pid, "expires_at": time.time() + 600}
    storage.write_bytes(uri, json.dumps(dead_pid).encode())
    monkeypatch.setattr(storage, "DEAD_RUN_GRACE_S", 0.5)
    start = time.monotonic()
    with storage.lease(ds):
        assert json.loads(storage.read_bytes(uri))["pid"] == os.getpid()
    assert time.monotonic() - start >= 0.5  # the dead driver's Ray workers get time to stop
    expired = {"token": "y", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}
    storage.write_bytes(uri, json.dumps(expired).encode())
    with storage.lease(ds):
        pass
    alive = {"token": "z", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 600}
    storage.write_bytes(uri, json.dumps(alive).encode())
    with pytest.raises(storage.LeaseHeld, match="host elsewhere"):
        with storage.lease(ds):
            pass


def test_lease_is_renewed_while_held(tmp_path):
    import json
    import time

    ds = str(tmp_path / "ds")
    with storage.lease(ds, ttl_s=0.4):
        first = json.loads(storage.read_bytes(storage.join(ds, storage.LEASE)))["expires_at"]
        time.sleep(0.5)
        body = json.loads(storage.read_bytes(storage.join(ds, storage.LEASE)))
        assert body["expires_at"] > first and body["pid"] == os.getpid()


def test_a_run_whose_lease_was_taken_over_cannot_publish(tmp_path):
    """A lease another run took over (this one paused past its TTL): publish and set_latest refuse."""
    import json

    ds = str(tmp_path / "ds")
    uri = storage.join(ds, storage.LEASE)
    data = storage.join(storage.version_uri(ds, "v1"), "a.parquet")
    rows = storage.write_parquet(pa.table({"x": [1]}), data)
    with storage.lease(ds, ttl_s=60):
        storage.publish(ds, "v0", [data], [rows], move_latest=False)  # held: publishes
        other = {"token": "other", "host": "elsewhere", "pid": 1, "expires_at": 1e12}
        storage.write_bytes(uri, json.dumps(other).encode())
        with pytest.raises(storage.LeaseLost, match="another run took it over"):
            storage.publish(ds, "v1", [data], [rows])
        with pytest.raises(storage.LeaseLost):
            storage.set_latest(ds, "v0")
    assert storage.committed_versions(ds) == ["v0"] and storage.latest_version(ds) is None
    assert json.loads(storage.read_bytes(uri))["token"] == "other"  # the new holder's lease is left alone


def test_an_expired_lease_nobody_took_is_renewed_before_a_publish(tmp_path, monkeypatch):
    import json

    ds = str(tmp_path / "ds")
    uri = storage.join(ds, storage.LEASE)
    data = storage.join(storage.version_uri(ds, "v1"), "a.parquet")
    rows = storage.write_parquet(pa.table({"x": [1]}), data)
    with storage.lease(ds, ttl_s=60):
        held = storage._HELD[storage.normalize_uri(ds)]
        with held.lock:  # as if paused past the TTL: the lease on storage has expired, still ours
            expired = {**json.loads(held.body), "expires_at": 0.0}
            held.body = json.dumps(expired).encode()
            storage.write_bytes(uri, held.body)
        storage.publish(ds, "v1", [data], [rows])
        assert json.loads(storage.read_bytes(uri))["expires_at"] > 1e9
    assert storage.latest_version(ds) == "v1"


def test_latest_never_moves_backwards(root):
    ds = storage.join(root, "ds")
    storage.publish(ds, "old", [_write_part(ds, "old", "p.parquet", 1)], [1], move_latest=False)
    storage.publish(ds, "new", [_write_part(ds, "new", "p.parquet", 2)], [2])
    assert storage.latest_version(ds) == "new"
    assert not storage.set_latest(ds, "old")  # e.g. an older run's "already complete" repair
    assert storage.latest_version(ds) == "new"
    assert storage.set_latest(ds, "new")


def test_make_current_finishes_a_commit_but_never_goes_back(root):
    ds = storage.join(root, "ds")
    storage.publish(ds, "v1", [_write_part(ds, "v1", "p.parquet", 1)], [1], move_latest=False)
    assert "is the current version" in storage.make_current(ds, "v1")
    assert storage.latest_version(ds) == "v1"
    storage.publish(ds, "v2", [_write_part(ds, "v2", "p.parquet", 2)], [2])
    assert "stays on the newer version v2" in storage.make_current(ds, "v1")
