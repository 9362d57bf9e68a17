"""The Iceberg tag table without Ray: a killed commit leaves the previous snapshot current, concurrent
writers both land (optimistic commits, retried; two processes through a PostgreSQL catalog), DuckDB reads
what pyiceberg wrote; local files, S3 with a SQLite catalog named explicitly, and S3 with PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog

from musiclib.core import storage
from musiclib.tag import tag_table, tags
from musiclib.tag.tag_table import Where

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3", pytest.param("s3-postgresql", marks=pytest.mark.slow)])
def where(request, tmp_path) -> Where:
    """The tag table of a root on local files (its default SQLite catalog), on the S3 test server with a
    SQLite catalog named explicitly (one machine), or on S3 with a shared catalog in PostgreSQL."""
    if request.param == "local":
        return Where(str(tmp_path / "root"))
    root = request.getfixturevalue("s3_root") + "/lib"
    if request.param == "s3":
        return Where(root, f"sqlite:///{tmp_path}/catalog/iceberg.db")
    return Where(root, request.getfixturevalue("postgres_catalog"))


def rows(run_id: str, n_tracks: int) -> pa.Table:
    """Model rows of ``n_tracks`` tracks and two tags, scores ``i / 10``, labeled with the run."""
    n = 2 * n_tracks
    return pa.table(
        {
            "track_id": [f"t{i // 2:03d}" for i in range(n)],
            "tag": ["a", "b"] * n_tracks,
            "score": pa.array([i / 10 for i in range(n)], pa.float32()),
            "source": ["model"] * n,
            "predicted": [i % 3 == 0 for i in range(n)],
            "model_id": ["m"] * n,
            "probe_run_id": [run_id] * n,
            "tagged_at": ["2026-01-01T00:00:00"] * n,
            "reason": [None] * n,
        },
        schema=tags.SCHEMA,
    )


def write_and_commit(where: Where, run_id: str, table: pa.Table) -> tag_table.Run:
    """What the tag job does after scoring: write the run's data file, then commit it as one snapshot."""
    iceberg = tag_table.open_table(where, create_with=tags.SCHEMA)
    uri = storage.join(tag_table.run_dir(iceberg, run_id), "model", "part-0.parquet")
    storage.write_parquet(table, uri)
    return tag_table.commit(iceberg, run_id, [uri], {"probe-run-id": run_id})


KILLED_COMMIT = """
import os, signal, sys
from pyiceberg.catalog.sql import SqlCatalog
from test_tag_table import rows, write_and_commit
from musiclib.tag.tag_table import Where

def killed(*args, **kwargs):  # the data files and Iceberg metadata are written; the catalog never moves
    os.kill(os.getpid(), signal.SIGKILL)

SqlCatalog.commit_table = killed
write_and_commit(Where(sys.argv[1], sys.argv[2]), "b", rows("b", 7))
"""


def test_a_killed_commit_leaves_the_previous_snapshot_current(where):
    a = write_and_commit(where, "a", rows("a", 5))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    argv = [sys.executable, "-c", KILLED_COMMIT, where.root, where.catalog_uri]
    proc = subprocess.run(argv, env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    table = tag_table.require_table(where)
    assert storage.list_files(tag_table.run_dir(table, "b"), ".parquet"), "killed before its data files"
    assert [r.run_id for r in tag_table.runs(table)] == ["a"] and tag_table.current_run(table) == a
    assert tag_table.read(table).sort_by("score").equals(rows("a", 5)) and tag_table.verify(table) == []
    b = write_and_commit(where, "b", rows("b", 7))  # the same run again: it lands
    assert b.parent_id == a.snapshot_id and tag_table.read(tag_table.require_table(where)).num_rows == 14


def test_concurrent_writers_both_land(where, commit_at_once):
    """Two writers plan their snapshot on the same current one and commit at once: one wins, the other's
    commit fails, is planned again on the winner's snapshot and lands after it."""
    write_and_commit(where, "first", rows("first", 3))
    done: dict[str, tag_table.Run] = {}

    def writer(run_id: str, n: int) -> Callable[[], None]:
        return lambda: done.__setitem__(run_id, write_and_commit(where, run_id, rows(run_id, n)))

    calls = commit_at_once({"x": writer("x", 4), "y": writer("y", 6)})
    assert set(done) == {"x", "y"} and len(calls) >= 3  # a conflict happened and was retried
    table = tag_table.require_table(where)
    history = tag_table.runs(table)
    assert [r.run_id for r in history][0] == "first" and {r.run_id for r in history[1:]} == {"x", "y"}
    assert history[2].parent_id == history[1].snapshot_id  # the loser committed on top of the winner
    last = history[2].run_id
    assert tag_table.read(table).sort_by("score").equals(rows(last, {"x": 4, "y": 6}[last]))


CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
from pyiceberg.table import Transaction
from test_tag_table import rows, write_and_commit
from musiclib.tag.tag_table import Where

root, catalog_uri, run_id, n, gate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
real = Transaction.commit_transaction
calls = []

def commit_together(self):  # the first commit waits until the other process has planned its own
    calls.append(1)
    if len(calls) == 1:
        (gate / run_id).touch()
        while len(list(gate.iterdir())) < 2:
            time.sleep(0.01)
    return real(self)

Transaction.commit_transaction = commit_together
run = write_and_commit(Where(root, catalog_uri), run_id, rows(run_id, n))
print(run.run_id, run.snapshot_id, run.parent_id, len(calls))
"""


@pytest.mark.slow
def test_two_processes_commit_through_postgresql_and_no_snapshot_is_lost(s3_root, postgres_catalog, tmp_path):
    """Two processes plan a snapshot of the same table (S3 data, PostgreSQL catalog) and commit at the same
    moment: PostgreSQL lets one move the table's metadata pointer, the other's commit fails, is planned
    again on the winner's snapshot and lands after it. Both snapshots are in the history."""
    where = Where(s3_root + "/lib", postgres_catalog)
    first = write_and_commit(where, "first", rows("first", 3))
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    writers = {
        run_id: subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_WRITER,
                where.root,
                where.catalog_uri,
                run_id,
                str(n),
                str(gate),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id, n in (("x", 4), ("y", 6))
    }
    printed = {}
    for run_id, proc in writers.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        printed[run_id] = out.split()
    attempts = sorted(int(p[3]) for p in printed.values())
    assert attempts[0] == 1 and attempts[1] >= 2  # one won at once; the other lost a commit and retried
    history = tag_table.runs(tag_table.require_table(where))
    assert [r.run_id for r in history][0] == "first" and {r.run_id for r in history[1:]} == {"x", "y"}
    assert len(history) == 3 and history[1].parent_id == first.snapshot_id
    assert history[2].parent_id == history[1].snapshot_id  # the loser committed on top of the winner
    assert {int(p[1]) for p in printed.values()} == {r.snapshot_id for r in history[1:]}
    last = history[2].run_id
    table = tag_table.require_table(where)
    assert tag_table.read(table).sort_by("score").equals(rows(last, {"x": 4, "y": 6}[last]))
    assert tag_table.verify(table) == []


def test_a_shared_catalog_keeps_each_roots_table_its_own(tmp_path):
    """Two roots in one catalog: the second root cannot take the first one's table of the same name (a run
    would replace its rows); with a table name of its own it gets one under its own warehouse."""
    shared = f"sqlite:///{tmp_path}/catalog/iceberg.db"
    write_and_commit(Where(str(tmp_path / "a"), shared), "a", rows("a", 3))
    with pytest.raises(storage.StorageError, match="belongs to another root") as err:
        write_and_commit(Where(str(tmp_path / "b"), shared), "b", rows("b", 4))
    assert "--table" in str(err.value)
    b = Where(str(tmp_path / "b"), shared, "b.tags")
    write_and_commit(b, "b", rows("b", 4))
    assert tag_table.require_table(b).location().startswith(b.warehouse + "/")
    assert [
        r.run_id for r in tag_table.runs(tag_table.require_table(Where(str(tmp_path / "a"), shared)))
    ] == ["a"]


def test_duckdb_reads_what_pyiceberg_wrote(where, capsys):
    write_and_commit(where, "a", rows("a", 5))
    write_and_commit(where, "b", rows("b", 7))
    query = "SELECT probe_run_id, count(*) AS n, round(sum(score), 4) AS s FROM tags GROUP BY 1"
    at = ["--root", where.root, "--catalog-uri", where.catalog_uri]
    tags.main(["sql", query, *at])
    tags.main(["sql", query, *at, "--run", "a"])  # time travel
    tags.main(["history", *at])
    out = capsys.readouterr().out.splitlines()
    expected = [rows(r, n).to_pandas()["score"].astype(float).sum() for r, n in (("b", 7), ("a", 5))]
    assert out[:2] == ["probe_run_id  n  s", f"b  14  {round(expected[0], 4):.3f}"]
    assert out[2:4] == ["probe_run_id  n  s", f"a  10  {round(expected[1], 4):.3f}"]
    assert out[4].split() == ["snapshot_id", "committed_at", "run_id", "probe_run_id", "rows"]
    assert [line.split()[2] for line in out[5:]] == ["a", "b"]
    if where.root.startswith("s3://"):
        return  # DuckDB reads S3 only through its httpfs extension, downloaded at run time
    # the README's query: DuckDB over the current snapshot's data files, listed by pyiceberg, no musiclib
    catalog_ = SqlCatalog("musiclib", uri=f"sqlite:///{where.root}/tags/iceberg.db")
    files = [t.file.file_path for t in catalog_.load_table("musiclib.tags").scan().plan_files()]
    got = duckdb.sql(f"SELECT * FROM read_parquet({files}) ORDER BY track_id, tag").to_arrow_table()
    assert got.cast(tags.SCHEMA).equals(
        rows("b", 7).sort_by([("track_id", "ascending"), ("tag", "ascending")])
    )
