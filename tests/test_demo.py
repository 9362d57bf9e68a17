"""The demo catalog generator: layout, formats, decodable audio, tag statistics, labels, faults, S3, CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs import make_demo_catalog as job
from musiclib import audio, catalog
from musiclib.core import storage
from musiclib.datasets import demo

REPO = Path(__file__).resolve().parents[1]

SMALL = {"n_tracks": 24, "seed": 3, "min_seconds": 4.0, "max_seconds": 6.0}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, list[dict]]:
    """24 tracks of 4-6 s plus the six fault tracks, made by a pool of two workers; (catalog URI, rows)."""
    uri = demo.make_catalog(str(tmp_path_factory.mktemp("demo")), faults=True, workers=2, **SMALL)
    return uri, catalog.read(uri).to_pylist()


def _path(uri: str, row: dict) -> str:
    return storage.resolve(catalog.base_dir(uri), row["audio_uri"])


def test_catalog_validates_with_relative_uris_and_true_tags(small):
    uri, rows = small
    assert uri.endswith("catalog/tracks.parquet")
    assert catalog.validate(uri, vocabulary=set(demo.TAGS)) == 24 + len(demo.FAULTS)
    for row in rows:
        assert row["audio_uri"] == f"audio/{row['track_id']}.{row['audio_uri'].rsplit('.', 1)[1]}"
        assert row["true_tags"] and set(row["true_tags"]) <= set(demo.TAGS)
        assert row["duration_s"] > 0 and row["split"] in catalog.SPLITS


def test_files_mix_formats_rates_and_channels(small):
    uri, rows = small
    good = [r for r in rows if r["fault"] is None]
    assert {r["audio_uri"].rsplit(".", 1)[1] for r in good} == set(demo.FORMATS)
    infos = [audio.info(_path(uri, r)) for r in good]
    assert {i.sample_rate for i in infos} == set(demo.SAMPLE_RATES)
    assert {i.channels for i in infos} == {1, 2}


def test_audio_decodes_to_music_of_the_catalog_duration(small):
    uri, rows = small
    for row in rows:
        if row["fault"] is None:
            x = audio.load(_path(uri, row))
            assert len(x) / audio.SAMPLE_RATE == pytest.approx(row["duration_s"], abs=0.05), row
            assert np.sqrt(np.mean(x**2)) > 0.02, row


def test_each_fault_is_reported_by_the_decoder(small):
    uri, rows = small
    faults = {r["fault"]: r for r in rows if r["fault"] is not None}
    assert sorted(faults) == sorted(reason for reason, _, _ in demo.FAULTS)
    for reason, row in faults.items():
        with pytest.raises(audio.AudioError) as err:
            audio.load_chunks(_path(uri, row))
        assert err.value.reason == reason, (row["audio_uri"], str(err.value))


def test_labels_on_the_labeled_fraction_only(small):
    _, rows = small
    good = [r for r in rows if r["fault"] is None]
    labeled = [r for r in good if r["tags"]]
    assert len(labeled) == 12
    assert all(r["tags"] == r["true_tags"] for r in labeled)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_exact_label_and_split_shares(fraction):
    specs = demo.sample_tracks(200, seed=1, labeled_fraction=fraction)
    assert sum(s.labeled for s in specs) == round(fraction * 200)
    assert Counter(s.split for s in specs) == {"train": 140, "valid": 30, "test": 30}


def test_tags_follow_a_long_tail():
    specs = demo.sample_tracks(4000, seed=1)
    counts = Counter(t for s in specs for t in s.tags)
    shares = sorted((counts[t] / len(specs) for t in demo.TAGS), reverse=True)
    assert all(0.4 <= s <= 0.62 for s in shares[:3]), shares
    assert all(0.025 <= s <= 0.09 for s in shares[-4:]), shares
    assert all(len(s.tags) >= 2 and s.lead in s.tags for s in specs)


def test_same_seed_same_catalog_and_faults_change_no_other_track(tmp_path):
    kwargs = {"n_tracks": 6, "seed": 7, "min_seconds": 1.0, "max_seconds": 1.5, "workers": 1}
    a = demo.make_catalog(str(tmp_path / "a"), **kwargs)
    b = demo.make_catalog(str(tmp_path / "b"), faults=True, **kwargs)
    rows_a, rows_b = catalog.read(a).to_pylist(), catalog.read(b).to_pylist()
    assert rows_b[:6] == rows_a
    for row in rows_a:
        np.testing.assert_array_equal(audio.load(_path(a, row)), audio.load(_path(b, row)))
    assert demo.sample_tracks(6, seed=8) != demo.sample_tracks(6, seed=7)


def test_render_gives_the_same_samples_in_another_process():
    """A spec renders to the same samples in a fresh interpreter with another hash seed (no state of this
    process, set iteration order or global random stream enters the audio)."""
    spec = demo.sample_tracks(6, seed=7, min_seconds=1.0, max_seconds=1.5)[0]
    script = (
        "import hashlib; from musiclib.datasets import demo; "
        "spec = demo.sample_tracks(6, seed=7, min_seconds=1.0, max_seconds=1.5)[0]; "
        "print(hashlib.sha256(demo.render(spec).tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(demo.render(spec).tobytes()).hexdigest()


def test_make_catalog_on_s3(s3_root):
    uri = demo.make_catalog(s3_root + "/demo", n_tracks=4, min_seconds=3.0, max_seconds=3.0, workers=1)
    assert uri == s3_root + "/demo/catalog/tracks.parquet"
    assert catalog.validate(uri) == 4
    rows = catalog.read(uri).to_pylist()
    chunks, seconds = audio.load_chunks(_path(uri, rows[0]))
    assert chunks.shape == (1, audio.CHUNK_SAMPLES) and seconds == pytest.approx(3.0, abs=0.03)


def test_cli_generates_once_per_config(tmp_path, capsys):
    args = ["--root", str(tmp_path), "--n-tracks", "4", "--workers", "1"]
    uri = job.main(args)
    assert "4 tracks (2 labeled, 0 faulty)" in capsys.readouterr().out
    assert storage.read_json(str(tmp_path / "catalog" / "_demo.json"))["n_tracks"] == 4
    job.main(args)
    assert "skipping generation" in capsys.readouterr().out
    job.main([*args, "--faults", "true"])
    out = capsys.readouterr().out
    assert "skipping" not in out and "10 tracks (8 labeled, 6 faulty)" in out
    assert catalog.validate(uri) == 10
