"""The storage layer on local disk and on S3 (SeaweedFS): URIs, object I/O, atomic and conditional writes."""

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

from musiclib.core import storage


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
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    s = storage.s3_settings()
    assert s["endpoint_url"] == "http://127.0.0.1:9" and s["region"] == "eu-west-1"
    assert s["max_attempts"] == storage.S3_MAX_ATTEMPTS and s["retry_mode"] == "standard"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert storage.s3_settings()["max_attempts"] == 2
    assert storage.filesystem("s3://b/k")[0].config_kwargs["retries"]["total_max_attempts"] == 2
    fs, path = storage.arrow_filesystem("s3://bucket/key")
    assert path == "bucket/key" and fs.region == "eu-west-1"
    assert "secret-value" not in repr(fs) and "secret-value" not in str(storage.filesystem("s3://b/k")[0])


def test_arrow_s3_keeps_its_retries_when_pickled(monkeypatch):
    """A Ray task gets the filesystem pickled: it must still retry a refused connection, not give up at once."""
    import pickle

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    timings = {}
    for attempts in (1, 5):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))
        fs = pickle.loads(pickle.dumps(storage.arrow_filesystem("s3://bucket/key")[0]))
        start = time.perf_counter()
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):
            fs.get_file_info("bucket/key")
        timings[attempts] = time.perf_counter() - start
    assert timings[1] < 0.5 < timings[5], timings  # AWS's standard backoff: random, up to 15 s


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
    script = (
        "import sys; from musiclib.core import storage; storage.write_bytes(sys.argv[1], b'x' * (128 << 20))"
    )
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


def test_arrow_filesystem_reads_what_fsspec_wrote(root):
    uri = storage.join(root, "p.parquet")
    storage.write_parquet(pa.table({"i": list(range(4))}), uri)
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


def test_parquet_parts_become_row_groups_of_one_file(root):
    schema = pa.schema([("i", pa.int64())])
    uri = storage.join(root, "parts.parquet")
    made = []

    def parts():
        for start in (0, 3, 6):
            made.append(start)
            yield pa.table({"i": list(range(start, start + 3))}, schema=schema)

    assert storage.write_parquet_parts(parts(), schema, uri) == 9 and made == [0, 3, 6]
    fs, path = storage.arrow_filesystem(uri)
    meta = pq.read_metadata(path, filesystem=fs)
    assert meta.num_row_groups == 3 and meta.num_rows == 9
    assert pq.read_table(path, filesystem=fs)["i"].to_pylist() == list(range(9))
    assert storage.write_parquet_parts([], schema, uri) == 0 and storage.parquet_rows(uri) == 0


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
