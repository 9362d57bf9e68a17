"""Catalog schema: validation errors, vocabulary counts, atomic writes and streaming reads."""

from __future__ import annotations

import pyarrow as pa
import pytest

from musiclib import catalog
from musiclib.core import storage


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


def test_missing_columns_and_unknown_tags(tmp_path):
    with pytest.raises(catalog.CatalogError, match="lacks required column.*split"):
        catalog.validate(_table().drop_columns(["split"]))
    with pytest.raises(catalog.CatalogError, match="outside the vocabulary: flute"):
        catalog.validate(_table(), vocabulary={"rock", "guitar"})
    uri = str(tmp_path / "t.parquet")
    import pyarrow.parquet as pq

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
