"""Catalog schema: validation errors, vocabulary counts, atomic writes and streaming reads."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from jobs import pretrain as pretrain_job
from jobs import suggest as suggest_job
from jobs import tag as tag_job
from jobs import tune as tune_job
from musiclib import catalog
from musiclib.core import config, iceberg, storage
from musiclib.core.config import ConfigError, Layout
from musiclib.tag.suggest import SuggestConfig


def _table(**overrides) -> pa.Table:
    cols = {
        "track_id": ["a", "b", "c", "d"],
        "audio_uri": ["audio/a.flac", "s3://bucket/b.mp3", "/abs/c.wav", "audio/d.ogg"],
        "tags": [["rock", "guitar"], ["rock"], [], ["flute", "rock"]],
        "split": ["train", "train", None, "test"],
        "artist": ["x", "y", "z", "w"],
    }
    cols.update(overrides)
    return pa.table(cols)


def test_valid_catalog_round_trips_with_metadata(tmp_path):
    uri = str(tmp_path / "cat" / "tracks.parquet")
    catalog.write(_table(), uri)
    assert catalog.validate(uri) == 4
    t = catalog.read(uri)
    assert t.column_names[:5] == catalog.SCHEMA.names and "artist" in t.column_names
    assert t.schema.field("duration_s").type == pa.float64()
    assert catalog.base_dir(uri) == str(tmp_path / "cat")


def test_validation_lists_every_problem():
    bad = _table(
        track_id=["a", "a", "", "d"],
        audio_uri=["audio/a.flac", "gs://x/y", "", "audio/d.ogg"],
        split=["train", "training", None, "test"],
    )
    with pytest.raises(catalog.CatalogError) as err:
        catalog.validate(bad)
    msg = str(err.value)
    assert "duplicate track_id 'a'" in msg and "empty track_id" in msg
    assert "unsupported URI scheme 'gs'" in msg and "bad audio_uri ''" in msg
    assert "unknown split 'training'" in msg


def test_a_duplicate_id_in_another_file_is_found_with_its_row(tmp_path):
    """Ids are compared by hash over the whole catalog, then exactly: a repeat in a later file is named."""
    folder = tmp_path / "cat"
    folder.mkdir()

    def part(name: str, ids: list[str]) -> None:
        rows = {"track_id": ids, "audio_uri": [f"audio/{t}.flac" for t in ids], "tags": [["rock"]] * len(ids)}
        pq.write_table(pa.table({**rows, "split": ["train"] * len(ids)}), folder / name)

    part("a.parquet", [f"t{i}" for i in range(5)])
    part("b.parquet", ["t5", "t3"])
    with pytest.raises(catalog.CatalogError) as err:
        catalog.validate(str(folder))
    assert str(err.value).splitlines()[1:] == ["  row 6: duplicate track_id 't3'"]
    part("b.parquet", ["t5", "t6"])
    assert catalog.validate(str(folder)) == 7


def test_missing_columns_and_unknown_tags(tmp_path):
    with pytest.raises(catalog.CatalogError, match="lacks required column.*split"):
        catalog.validate(_table().drop_columns(["split"]))
    with pytest.raises(catalog.CatalogError, match="outside the vocabulary: flute"):
        catalog.validate(_table(), vocabulary={"rock", "guitar"})
    uri = str(tmp_path / "t.parquet")
    pq.write_table(_table().drop_columns(["tags"]), uri)
    with pytest.raises(catalog.CatalogError, match="lacks required column.*tags"):
        catalog.validate(uri)
    with pytest.raises(catalog.CatalogError, match="not found"):
        catalog.validate(str(tmp_path / "absent.parquet"))


def test_labeled_keeps_rows_with_a_tag():
    table = pa.table(
        {
            "track_id": ["a", "b", "c", "d"],
            "tags": pa.array([["x"], [], None, ["x", "y"]], pa.list_(pa.string())),
        }
    )
    assert catalog.labeled(table).column("track_id").to_pylist() == ["a", "d"]


def test_vocabulary_counts_head_and_tail():
    tags = [["rock"]] * 6 + [["rock", "jazz"]] * 3 + [["flute"], ["harp"], []]
    t = _table(
        track_id=[str(i) for i in range(12)],
        audio_uri=[f"a/{i}.wav" for i in range(12)],
        tags=tags,
        split=["train"] * 11 + ["test"],
        artist=["x"] * 12,
    )
    v = catalog.vocabulary(t, head_fraction=0.25)
    assert v.counts == {"rock": 9, "jazz": 3, "flute": 1, "harp": 1}
    assert v.head == ["rock"] and v.tail == ["jazz", "flute", "harp"]
    assert catalog.vocabulary(t, split="test").counts == {}


def test_folder_catalog_streams_in_batches_on_s3(s3_root):
    folder = storage.join(s3_root, "catalog")
    for part in range(3):
        ids = [f"t{part}-{i}" for i in range(50)]
        part_table = _table(
            track_id=ids,
            audio_uri=[f"audio/{i}.flac" for i in ids],
            tags=[["rock"]] * 50,
            split=["train"] * 50,
            artist=["x"] * 50,
        )
        catalog.write(part_table, storage.join(folder, f"part-{part}.parquet"))
    storage.write_bytes(storage.join(folder, "audio", "t0-0.flac"), b"not parquet")  # ignored
    batches = list(catalog.iter_batches(folder, columns=["track_id"], batch_size=40))
    assert sum(b.num_rows for b in batches) == 150 and max(b.num_rows for b in batches) <= 40
    assert catalog.validate(folder) == 150
    assert catalog.vocabulary(folder).counts == {"rock": 150}


def test_write_is_atomic(tmp_path):
    uri = str(tmp_path / "tracks.parquet")
    catalog.write(_table(), uri)
    catalog.write(_table(split=["valid"] * 4), uri)
    assert catalog.read(uri).column("split").to_pylist() == ["valid"] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["tracks.parquet"]


def test_odd_tags_wrong_types_and_empty_catalogs_are_problems(tmp_path):
    bad = _table(tags=[["rock", None], [""], ["a,b", "x|y"], ["line\nbreak", " pad"]])
    with pytest.raises(catalog.CatalogError) as err:
        catalog.validate(bad)
    msg = str(err.value)
    assert "None is not a string" in msg and "'' is empty" in msg and "'a,b' contains" in msg
    assert "'x|y' contains" in msg and "'line\\nbreak' contains" in msg and "surrounding whitespace" in msg
    with pytest.raises(catalog.CatalogError, match="column 'track_id' is int64, expected string"):
        catalog.validate(_table(track_id=[1, 2, 3, 4]))
    with pytest.raises(catalog.CatalogError, match="no tracks"):
        catalog.validate(_table().slice(0, 0))
    uri = str(tmp_path / "empty.parquet")
    catalog.write(_table().slice(0, 0), uri)
    with pytest.raises(catalog.CatalogError, match="no tracks"):
        catalog.validate(uri)
    assert catalog.bad_tag("rock") is None


def test_uris_a_job_cannot_read_are_problems():
    bad = _table(audio_uri=["http://host/a.mp3", "s3:///x.flac", "file://nas/share/c.wav", None])
    with pytest.raises(catalog.CatalogError) as err:
        catalog.validate(bad)
    msg = str(err.value)
    assert "unsupported URI scheme 'http'" in msg and "without a bucket" in msg
    assert "another host" in msg and "bad audio_uri None: empty" in msg


# --------------------------------------------------------------------------- catalog sources and versions


def _write_hive(table: pa.Table, folder: str) -> None:
    """``table`` as a Hive-partitioned export by ``split`` (``split=train/...``), the column only in paths."""
    fs, path = storage.arrow_filesystem(folder)
    pads.write_dataset(
        table, path, filesystem=fs, format="parquet", partitioning=["split"], partitioning_flavor="hive"
    )


def _by_id(table: pa.Table) -> list[dict]:
    return sorted(
        table.select(["track_id", "audio_uri", "tags", "split"]).to_pylist(), key=lambda r: r["track_id"]
    )


def test_a_hive_partitioned_folder_reads_as_one_catalog(root):
    """The partition column comes from the paths (null from the default partition); a writer's temporaries
    and markers are not read; the folder is where relative audio resolves."""
    folder = storage.join(root, "export")
    _write_hive(_table(), folder)
    storage.write_bytes(storage.join(folder, "_SUCCESS"), b"")
    catalog.write(_table(track_id=["a", "b", "x", "y"]), storage.join(folder, "_temporary", "0.parquet"))
    assert [p for p in storage.list_files(folder) if "=__HIVE_DEFAULT_PARTITION__" in p]
    assert catalog.validate(folder) == 4
    assert _by_id(catalog.read(folder)) == _by_id(_table())
    assert catalog.base_dir(folder) == folder
    assert catalog.vocabulary(folder).counts == {"rock": 2, "guitar": 1}
    assert len(catalog.files(folder)) == 3 and all(f.endswith(".parquet") for f in catalog.files(folder))
    first = catalog.version(folder)
    assert catalog.version(folder) == first
    extra = storage.join(folder, "split=valid", "extra.parquet")
    storage.write_bytes(extra, b"1")
    added = catalog.version(folder)
    time.sleep(0.05)  # past the file system's timestamp granularity
    storage.write_bytes(extra, b"2")  # same size: the ETag (local: the modification time) tells them apart
    assert len({first, added, catalog.version(folder)}) == 3


def test_version_changes_with_the_files_and_only_with_them(tmp_path):
    """Same files, same identity; a rewritten, touched, added or removed Parquet file gives a new one."""
    folder = str(tmp_path / "export")
    _write_hive(_table(), folder)
    first = catalog.version(folder)
    catalog.read(folder)
    (tmp_path / "export" / "_SUCCESS").write_bytes(b"")
    (tmp_path / "export" / "notes.txt").write_text("not a catalog file")
    assert catalog.version(folder) == first
    extra = str(tmp_path / "export" / "split=valid" / "more.parquet")
    os.makedirs(os.path.dirname(extra))
    pq.write_table(_table(track_id=["e", "f", "g", "h"]).drop_columns(["split"]), extra)
    added = catalog.version(folder)
    assert added != first and catalog.validate(folder) == 8
    os.utime(extra, ns=(1_000_000_000, 1_000_000_000))  # same bytes, another modification time
    assert catalog.version(folder) not in (first, added)
    os.remove(extra)
    assert catalog.version(folder) == first
    one = str(tmp_path / "tracks.parquet")
    catalog.write(_table(), one)
    assert catalog.version(one) == catalog.version(one) != first
    before = catalog.version(one)
    catalog.write(_table(split=["valid"] * 4), one)
    assert catalog.version(one) != before


def _iceberg_catalog(root: str):
    """The root's default Iceberg catalog (a SQLite file under it), as a team's own would hold its tables."""
    return iceberg.open_catalog("", root, storage.join(root, "tags", "warehouse"), create=True)


def test_an_iceberg_table_is_a_catalog_by_name(tmp_path):
    """``iceberg:<namespace>.<table>`` reads the table's current snapshot from the root's Iceberg catalog;
    its identity is the snapshot id, which a commit changes."""
    root = str(tmp_path / "root")
    found = _iceberg_catalog(root)
    found.create_namespace("team")
    table = found.create_table("team.tracks", schema=catalog.conform(_table()).schema)
    table.append(catalog.conform(_table()))
    cfg = config.absolute_uris(SuggestConfig(root=root, catalog="iceberg:team.tracks"))
    uri = Layout(cfg.root, cfg.catalog).catalog
    assert uri == f"iceberg:team.tracks@{root}"
    assert catalog.validate(uri) == 4 and _by_id(catalog.read(uri)) == _by_id(_table())
    first = table.current_snapshot().snapshot_id
    assert catalog.version(uri) == f"snapshot {first} of team.tracks" == catalog.version(uri)
    assert catalog.base_dir(uri) == storage.normalize_uri(table.location())
    assert catalog.files(uri) == sorted(
        storage.normalize_uri(t.file.file_path) for t in table.scan().plan_files()
    )
    table.append(catalog.conform(_table(track_id=["e", "f", "g", "h"])))
    assert catalog.version(uri) != f"snapshot {first} of team.tracks" and catalog.validate(uri) == 8
    with pytest.raises(catalog.CatalogError, match="is an Iceberg table: labels are written to one-file"):
        catalog.add_labels(uri, "rock", ["a"])


def test_a_catalog_that_cannot_be_read_is_one_line(tmp_path):
    root = str(tmp_path / "root")
    no_catalog = f"iceberg:team.tracks@{root}"
    found = _iceberg_catalog(root)
    found.create_namespace("team")
    partial = found.create_table("team.partial", schema=pa.schema([("track_id", pa.string())]))
    partial.append(pa.table({"track_id": ["a"]}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_bytes(b"")
    for uri, message in (
        (str(tmp_path / "absent.parquet"), "catalog not found"),
        (str(tmp_path / "absent"), "catalog not found"),
        (str(tmp_path / "empty"), "no Parquet files in catalog folder"),
        (f"iceberg:team.absent@{root}", "no table team.absent in the Iceberg catalog sqlite:///"),
        (f"iceberg:nobody.tracks@{root}", "no table nobody.tracks"),
        (f"iceberg:team.partial@{root}", "lacks required column\\(s\\): audio_uri, tags, split"),
        (f"iceberg:tracks@{root}", "name an Iceberg table as iceberg:<namespace>.<table>"),
        (no_catalog.replace("root", "other"), "no Iceberg catalog at sqlite:///.*set MUSICLIB_TAG_CATALOG"),
    ):
        with pytest.raises(catalog.CatalogError, match=message) as err:
            catalog.validate(uri)
        assert "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("job", [pretrain_job, tune_job, tag_job, suggest_job])
def test_every_job_refuses_a_missing_catalog_before_ray(tmp_path, job):
    root = str(tmp_path / "root")
    for given, message in (
        (str(tmp_path / "absent"), "catalog not found"),
        ("iceberg:team.tracks", "no Iceberg catalog at"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            job.main(["--root", root, "--catalog", given])
        assert "\n" not in str(err.value)
