"""The embeddings' Iceberg table without Ray: it follows each model's current version exactly once (a crash
between the version commit and the Iceberg commit is caught up, a re-run commits nothing), a run that
lost its lease registers nothing, two models' writers both land, the tag table shares its catalog, and
the README's query runs without musiclib; local files and S3."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from musiclib.core import storage, versions
from musiclib.embed import iceberg_table
from musiclib.embed import table as embeddings_table
from musiclib.tag import tag_table, tags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def lib(request, tmp_path) -> tuple[str, str]:
    """A root on local files (its default catalog) or on the S3 test server (a SQLite catalog it names)."""
    if request.param == "s3":
        return request.getfixturevalue("s3_root") + "/lib", f"sqlite:///{tmp_path}/iceberg.db"
    return str(tmp_path / "root"), ""


def rows(model_id: str, ids: list[str], dim: int = 4, failed: str = "") -> pa.Table:
    """Embeddings rows of ``model_id``: vector ``i`` is ``i`` everywhere; track ``failed`` has an error."""
    errors = ["truncated" if t == failed else None for t in ids]
    decoded = pa.table(
        {"track_id": ids, "n_chunks": pa.array([1] * len(ids), pa.int32()), "duration_s": [3.0] * len(ids),
         "error": pa.array(errors, pa.string())},
    )  # fmt: skip
    values = np.arange(len(ids), dtype=np.float32)[:, None]
    return embeddings_table.from_decoded(
        decoded, model_id, np.repeat(values, dim, 1), np.repeat(values, 2, 1)
    )


def publish(
    root: str, model_id: str, version: str, parts: dict[str, pa.Table], carried=()
) -> versions.Manifest:
    """Write ``parts`` into a version of the model's embeddings and commit it with the ``carried`` entries."""
    dataset = embeddings_table.dataset_uri(storage.join(root, "embeddings"), model_id)
    uris = [storage.join(versions.version_uri(dataset, version), name) for name in parts]
    counts = [storage.write_parquet(t, u) for t, u in zip(parts.values(), uris, strict=True)]
    return versions.publish(dataset, version, uris, counts, carried=list(carried))


def check_in_step(root: str, model_id: str, catalog_uri: str = "") -> iceberg_table.Table:
    """The table's files of the model are its current version's (those with rows), and its rows are what
    musiclib's reader returns."""
    table = iceberg_table.open_table(root, catalog_uri)
    manifest = versions.read_latest_manifest(
        embeddings_table.dataset_uri(storage.join(root, "embeddings"), model_id)
    )
    assert set(iceberg_table.registered(table, model_id)) == {
        u for u, f in zip(manifest.file_uris(), manifest.files, strict=True) if f.rows
    }
    want = embeddings_table.read(storage.join(root, "embeddings"), model_id).sort_by("track_id").to_pylist()
    assert iceberg_table.read(table, model_id).sort_by("track_id").to_pylist() == want
    return table


def test_the_table_follows_the_current_version_exactly_once(lib):
    lib_root, catalog_uri = lib
    embeddings = storage.join(lib_root, "embeddings")
    first = publish(
        lib_root,
        "m-a",
        "v1",
        {"x.parquet": rows("m-a", ["a", "b"]), "y.parquet": rows("m-a", ["c"], failed="c")},
    )
    table = iceberg_table.open_table(lib_root, catalog_uri, create=True)
    snapshot = iceberg_table.register(table, embeddings, "m-a")
    assert (
        snapshot.summary[iceberg_table.VERSION] == "v1" and snapshot.summary[iceberg_table.MODEL_ID] == "m-a"
    )
    check_in_step(lib_root, "m-a", catalog_uri)
    assert iceberg_table.register(table, embeddings, "m-a") is None  # a re-run commits nothing
    assert table.current_snapshot().snapshot_id == snapshot.snapshot_id

    # an incremental version keeps x, drops y, adds z and a file without rows; its run dies before the
    # Iceberg commit: the table still says v1 until the next run registers v2
    publish(lib_root, "m-a", "v2", {"z.parquet": rows("m-a", ["c", "d"]), "empty.parquet": rows("m-a", [])},
            carried=first.files[:1])  # fmt: skip
    lagging = iceberg_table.open_table(lib_root, catalog_uri)
    assert {p.rsplit("/", 1)[-1] for p in iceberg_table.registered(lagging, "m-a")} == {
        "x.parquet",
        "y.parquet",
    }
    snapshot = iceberg_table.register(lagging, embeddings, "m-a")
    assert snapshot.summary[iceberg_table.VERSION] == "v2"
    assert (snapshot.summary["added-data-files"], snapshot.summary["deleted-data-files"]) == ("1", "1")
    check_in_step(lib_root, "m-a", catalog_uri)
    assert iceberg_table.register(lagging, embeddings, "m-a") is None

    # another model, of another width, in the same table: each model reads only its own rows
    publish(lib_root, "m-b", "v1", {"w.parquet": rows("m-b", ["a", "e"], dim=8)})
    iceberg_table.register(table, embeddings, "m-b")
    check_in_step(lib_root, "m-a", catalog_uri)
    check_in_step(lib_root, "m-b", catalog_uri)
    assert sorted(set(iceberg_table.read(table, "m-b")["model_id"].to_pylist())) == ["m-b"]


def test_a_run_that_lost_its_lease_registers_nothing(tmp_path):
    root = str(tmp_path)
    publish(root, "m", "v1", {"x.parquet": rows("m", ["a"])})
    table = iceberg_table.open_table(root, create=True)
    dataset = embeddings_table.dataset_uri(storage.join(root, "embeddings"), "m")
    with versions.lease(dataset):
        storage.write_bytes(storage.join(dataset, versions.LEASE), b'{"token": "another run"}')
        with pytest.raises(versions.LeaseLost):
            iceberg_table.register(table, storage.join(root, "embeddings"), "m")
    assert iceberg_table.open_table(root).current_snapshot() is None


def test_two_models_registered_at_once_both_land(tmp_path, commit_at_once):
    """Both writers plan on the same snapshot and commit together: one wins, the other plans again on the
    winner's snapshot, and neither model's files are lost."""
    root = str(tmp_path)
    for model_id in ("m-a", "m-b"):
        publish(root, model_id, "v1", {"x.parquet": rows(model_id, ["a", "b"])})
    iceberg_table.open_table(root, create=True)
    done = {}

    def writer(model_id: str) -> Callable[[], None]:
        def register() -> None:
            table = iceberg_table.open_table(root)
            done[model_id] = iceberg_table.register(table, storage.join(root, "embeddings"), model_id)

        return register

    calls = commit_at_once({m: writer(m) for m in ("m-a", "m-b")})
    assert set(done) == {"m-a", "m-b"} and len(calls) >= 3  # a conflict happened and was retried
    check_in_step(root, "m-a")
    check_in_step(root, "m-b")


def readme_query() -> str:
    """The Python block of the README's section on the embeddings' Iceberg table."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The embeddings as an Iceberg table") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_query_runs_without_musiclib(tmp_path):
    root = str(tmp_path / "data" / "demo")
    publish(root, "m-a", "v1", {"x.parquet": rows("m-a", ["a", "b", "c"], failed="b")})
    publish(root, "m-a", "v2", {"y.parquet": rows("m-a", ["a", "b", "c", "d"], failed="b")})
    iceberg_table.register(
        iceberg_table.open_table(root, create=True), storage.join(root, "embeddings"), "m-a"
    )
    script = (
        readme_query().replace("MODEL_ID", "m-a") + "\nimport sys\nassert 'musiclib' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "4"]  # usable tracks of the current version, and its width


def test_the_tag_table_shares_the_catalog(tmp_path):
    """The embed job's table first, then the tag job's, in the root's one catalog: each reads only its own."""
    root = str(tmp_path)
    publish(root, "m-a", "v1", {"x.parquet": rows("m-a", ["a", "b"])})
    iceberg_table.register(
        iceberg_table.open_table(root, create=True), storage.join(root, "embeddings"), "m-a"
    )
    where = tag_table.Where(root)
    table = tag_table.open_table(where, create_with=tags.SCHEMA)
    uri = storage.join(tag_table.run_dir(table, "r"), "part-0.parquet")
    storage.write_parquet(tags.SCHEMA.empty_table(), uri)
    tag_table.commit(table, "r", [uri], {})
    assert [r.run_id for r in tag_table.runs(tag_table.require_table(where))] == ["r"]
    check_in_step(root, "m-a")
