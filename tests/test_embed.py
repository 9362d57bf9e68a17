"""The embed job: every track exactly once, the right reasons for bad ones, the encoder's numbers, resume."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import embed as job
from musiclib import audio, catalog
from musiclib.core import progress, ray_env, storage, versions
from musiclib.core.config import ConfigError, Layout
from musiclib.datasets import demo
from musiclib.embed import chunking, embedder, iceberg_table, logmel
from musiclib.embed import table as embeddings_table
from musiclib.train import models

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


def make_root(root: str, n_good: int = 8, faults: bool = True) -> str:
    """The demo catalog (short tracks in mixed formats, plus one track per decoder fault) and a narrow encoder."""
    demo.make_catalog(root, n_tracks=n_good, faults=faults, min_seconds=3.0, max_seconds=9.0, workers=1)
    return models.export_random_encoder(Layout(root).models, models.EncoderConfig(width=0.25))


def config(root: str, **overrides) -> job.EmbedConfig:
    return job.EmbedConfig(root=root, batch_size=3, shard_rows=1, **overrides)


def check_complete(root: str, model_id: str) -> pa.Table:
    """The latest embeddings hold every catalog track exactly once with the reason the catalog expects."""
    out = embeddings_table.read(Layout(root).embeddings, model_id)
    cat = catalog.read(Layout(root).catalog, columns=["track_id", "fault"])
    ids = out.column("track_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate tracks"
    assert sorted(ids) == sorted(cat.column("track_id").to_pylist())
    expected = dict(zip(cat.column("track_id").to_pylist(), cat.column("fault").to_pylist()))
    got = dict(zip(ids, out.column("error").to_pylist()))
    assert got == expected
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert out.schema == embeddings_table.schema(128, 2 * logmel.LogMelConfig().n_mels)
    return out.sort_by("track_id")


def reference(root: str, model_id: str) -> dict[str, np.ndarray]:
    """Direct encoder call on each good track's chunks, averaged in float64."""
    encoder, _ = models.load_encoder(Layout(root).models, model_id)
    base = catalog.base_dir(Layout(root).catalog)
    cat = catalog.read(Layout(root).catalog, columns=["track_id", "audio_uri", "fault"]).to_pylist()
    ref = {}
    with torch.inference_mode():
        for row in cat:
            if row["fault"] is None:
                chunks, _ = audio.load_chunks(storage.resolve(base, row["audio_uri"]))
                x = torch.from_numpy(audio.from_int16(audio.to_int16(chunks)))
                ref[row["track_id"]] = encoder(x).double().mean(0).numpy()
    return ref


def check_iceberg(root: str, model_id: str, catalog_uri: str = "") -> int:
    """The Iceberg table lists exactly the current version's files (those with rows) and holds the rows
    musiclib's reader returns; returns its current snapshot id."""
    table = iceberg_table.open_table(root, catalog_uri)
    manifest = versions.read_latest_manifest(embeddings_table.dataset_uri(Layout(root).embeddings, model_id))
    want = {u for u, f in zip(manifest.file_uris(), manifest.files, strict=True) if f.rows}
    assert set(iceberg_table.registered(table, model_id)) == want
    assert table.current_snapshot().summary[iceberg_table.VERSION] == manifest.version
    rows = embeddings_table.read(Layout(root).embeddings, model_id).sort_by("track_id").to_pylist()
    assert iceberg_table.read(table, model_id).sort_by("track_id").to_pylist() == rows
    return table.current_snapshot().snapshot_id


def assert_logmel_is_the_floor(root: str, out: pa.Table, max_chunks: int = 64) -> None:
    """The ``logmel`` column equals the study's log-mel floor (``logmel.embed_rows``) on the same tracks."""
    cat = catalog.read(Layout(root).catalog, columns=["track_id", "audio_uri"])
    floor = logmel.embed_rows(cat, catalog.base_dir(Layout(root).catalog), max_chunks)
    want = dict(zip(floor["track_id"].to_pylist(), floor["embedding"].to_pylist(), strict=True))
    assert sum(v is not None for v in want.values()) >= 4
    for row in out.to_pylist():
        if want[row["track_id"]] is None:
            assert row["logmel"] is None and row["error"] is not None
        else:
            np.testing.assert_allclose(row["logmel"], want[row["track_id"]], rtol=1e-5, atol=1e-5)


def assert_matches_reference(out: pa.Table, ref: dict[str, np.ndarray]) -> None:
    for row in out.to_pylist():
        if row["error"] is None:
            np.testing.assert_allclose(row["embedding"], ref[row["track_id"]], rtol=1e-4, atol=1e-5)
            assert row["n_chunks"] >= 1 and row["duration_s"] > 2.7
        else:
            assert row["embedding"] is None


# --------------------------------------------------------------------------- pure pieces


def test_decode_and_embed_batch_match_the_encoder(tmp_path):
    root = str(tmp_path)
    model_id = make_root(root)
    table, summary = embedder.embed_catalog(
        Layout(root).catalog, models.load_encoder(Layout(root).models, model_id)[0], model_id, batch_size=5
    )
    cat = catalog.read(Layout(root).catalog, columns=["track_id", "fault"])
    assert table.column("track_id").to_pylist() == cat.column("track_id").to_pylist()
    assert table.column("error").to_pylist() == cat.column("fault").to_pylist()
    assert_matches_reference(table, reference(root, model_id))
    assert_logmel_is_the_floor(root, table)
    assert summary.tracks == len(cat) and sum(summary.errors.values()) == 6
    assert summary.errors["missing"] == 1 and "6 (corrupt=1, empty=1" in str(summary)


def test_forward_chunks_is_independent_of_chunk_batch():
    torch.manual_seed(1)
    encoder = models.SampleCNN(models.EncoderConfig(width=0.25)).eval()
    chunks = audio.to_int16(np.random.default_rng(0).uniform(-0.5, 0.5, (5, audio.CHUNK_SAMPLES)))
    a = chunking.forward_chunks(encoder, chunks, chunk_batch=2)
    b = chunking.forward_chunks(encoder, chunks, chunk_batch=64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (5, 128) and a.dtype == np.float32


def test_drop_written_is_an_anti_join():
    rows = pa.table({"track_id": ["d", "a", "x", "b", "z"], "audio_uri": ["u"] * 5})
    written = np.sort(np.array(["a", "b", "c", "z"], dtype=object))
    assert embedder.drop_written(rows, written).column("track_id").to_pylist() == ["d", "x"]
    assert embedder.drop_written(rows, np.array([], dtype=object)).num_rows == 5
    odd = pa.table({"track_id": pa.array([7, None, 8]), "audio_uri": ["u"] * 3})  # unvalidated catalog
    kept = embedder.drop_written(odd, np.sort(np.array(["", "7"], dtype=object)))
    assert kept.column("track_id").to_pylist() == [8]


def test_config_fails_fast(tmp_path):
    from musiclib.core.config import ConfigError, parse

    with pytest.raises(ConfigError, match="batch-size must not be negative"):
        parse(job.EmbedConfig, ["--root", str(tmp_path), "--batch-size", "-1"])
    with pytest.raises(ConfigError, match="catalog not found"):
        parse(job.EmbedConfig, ["--root", str(tmp_path)])
    make_root(str(tmp_path), n_good=1, faults=False)
    with pytest.raises(ConfigError, match="no exported model"):
        parse(job.EmbedConfig, ["--root", str(tmp_path), "--model-id", "nope"])
    assert parse(job.EmbedConfig, ["--root", str(tmp_path)]).model_id == ""
    with pytest.raises(ConfigError, match="actors"):
        parse(job.EmbedConfig, ["--root", str(tmp_path), "--actors", "-1"])


def test_config_validates_the_catalog_before_ray_starts(tmp_path):
    from musiclib.core.config import ConfigError, parse

    root = str(tmp_path)
    make_root(root, n_good=2, faults=False)
    table = catalog.read(Layout(root).catalog)
    bad = table.set_column(1, "audio_uri", pa.array(["http://host/a.mp3", "s3:///x.flac"]))
    catalog.write(bad, Layout(root).catalog)
    with pytest.raises(ConfigError) as err:
        parse(job.EmbedConfig, ["--root", root])
    assert "unsupported URI scheme 'http'" in str(err.value) and "without a bucket" in str(err.value)
    assert parse(job.EmbedConfig, ["--root", root, "--validate-catalog", "false"]).validate_catalog is False


def test_a_second_run_fails_clearly_while_one_is_writing(tmp_path):
    root = str(tmp_path)
    model_id = make_root(root, n_good=1, faults=False)
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    with versions.lease(dataset):
        with pytest.raises(versions.LeaseHeld, match="being written by another run"):
            job.run(config(root))
    assert not storage.exists(storage.join(dataset, embedder.PENDING))


def test_a_committed_version_whose_run_died_is_made_current(tmp_path):
    """A crash between the manifest and the ``_latest`` move: the re-run finishes the move, embeds nothing."""
    root = str(tmp_path)
    model_id = make_root(root, n_good=1, faults=False)
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    rows = embeddings_table.schema(128).empty_table()
    embeddings_table.publish_table(Layout(root).embeddings, model_id, "v1", rows)
    part = storage.join(versions.version_uri(dataset, "v2"), "part-00000.parquet")
    versions.publish(dataset, "v2", [part], [storage.write_parquet(rows, part)], move_latest=False)
    storage.write_json(storage.join(dataset, embedder.PENDING), {"version": "v2", "only_new": True})
    assert job.run(config(root)).result.tracks == 0
    assert versions.latest_version(dataset) == "v2"
    assert not storage.exists(storage.join(dataset, embedder.PENDING))


def test_a_version_committed_before_a_crash_is_registered_by_the_next_run(tmp_path):
    """A crash between the version commit and the Iceberg commit: the next run registers the version
    (here one that finds it committed, so without Ray), and registering again commits nothing."""
    root = str(tmp_path)
    model_id = make_root(root, n_good=1, faults=False)
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    rows = embedding_rows(["a", "b"], [None, "truncated"], model_id=model_id)
    embeddings_table.publish_table(Layout(root).embeddings, model_id, "v1", rows)
    storage.write_json(storage.join(dataset, embedder.PENDING), {"version": "v1", "only_new": True})
    assert iceberg_table.open_table(root) is None
    assert "registered in musiclib.embeddings" in job.run(config(root)).record["wrote"]
    snapshot = check_iceberg(root, model_id)
    assert job.register(config(root), model_id) == "musiclib.embeddings already holds it"
    assert check_iceberg(root, model_id) == snapshot


def test_begin_version_resumes_an_unfinished_run_of_the_same_mode(tmp_path):
    dataset = str(tmp_path / "ds")
    first, committed = embedder.begin_version(dataset, only_new=True)
    assert not committed and storage.read_json(storage.join(dataset, embedder.PENDING))["version"] == first
    assert embedder.begin_version(dataset, only_new=True) == (first, False)
    recompute, _ = embedder.begin_version(dataset, only_new=False)  # another mode: a new version
    assert recompute != first
    embedder.end_version(dataset, recompute)
    assert not storage.exists(storage.join(dataset, embedder.PENDING))
    assert embedder.begin_version(dataset, only_new=False)[0] not in (first, recompute)


def embedding_rows(
    ids: list[str], errors: list[str | None], logmel: bool = True, model_id: str = "m"
) -> pa.Table:
    """Rows of the embeddings table: vectors of ones where there is no error (without the ``logmel``
    column, as written before the embed stage computed it, for ``logmel=False``)."""
    decoded = pa.table(
        {"track_id": ids, "n_chunks": [1] * len(ids), "duration_s": [3.0] * len(ids), "error": errors},
        schema=pa.schema([("track_id", pa.string()), ("n_chunks", pa.int32()), ("duration_s", pa.float64()),
                          ("error", pa.string())]),
    )  # fmt: skip
    stats = np.ones((len(ids), 2)) if logmel else None
    return embeddings_table.from_decoded(decoded, model_id, np.ones((len(ids), 4)), stats)


def test_commit_version_publishes_only_what_changed(tmp_path):
    """An incremental version keeps clean files, retries ``missing`` rows, and publishes only news."""
    dataset = str(tmp_path / "ds")
    clean, gone = (
        storage.join(versions.version_uri(dataset, "v1"), f"{n}.parquet") for n in ("clean", "gone")
    )
    rows = [
        storage.write_parquet(embedding_rows(["a", "b"], [None, None]), clean),
        storage.write_parquet(embedding_rows(["c", "d"], [None, "missing"]), gone),
    ]
    versions.publish(dataset, "v1", [clean, gone], rows)

    def attempt(version: str, error: str | None) -> tuple[embedder.CarryOver, list[str]]:
        out_dir = versions.version_uri(dataset, version)
        carried = embedder.carry_over(dataset, True, out_dir)
        storage.write_parquet(embedding_rows(["d"], [error]), storage.join(out_dir, "part-0.parquet"))
        return carried, embedder.commit_version(dataset, version, carried, {"try": version})

    carried, embedded = attempt("v2", "missing")  # the audio is still missing: nothing to publish
    assert [e.path for e in carried.kept] == ["v1/clean.parquet"] and list(carried.skip) == ["a", "b", "c"]
    assert carried.retried == {("d", "missing")} and embedded == []
    assert versions.latest_version(dataset) == "v1"
    assert not storage.exists(versions.version_uri(dataset, "v2"))

    carried, embedded = attempt("v3", None)  # the audio appeared: d is embedded, the rest carried
    assert embedded == [storage.join(versions.version_uri(dataset, "v3"), "part-0.parquet")]
    latest = versions.read_latest_manifest(dataset)
    table = storage.read_parquet(latest.file_uris())
    assert latest.version == "v3" and latest.config == {"try": "v3"}
    assert sorted(zip(table["track_id"].to_pylist(), table["error"].to_pylist())) == [
        ("a", None),
        ("b", None),
        ("c", None),
        ("d", None),
    ]


def test_a_version_without_logmel_is_embedded_again_whole(tmp_path, capsys):
    """A version written before the embed stage computed the log-mel statistics stays readable, offers the
    learned embedding alone, and is never mixed into a version with them: an incremental run keeps none
    of it."""
    dataset = str(tmp_path / "ds")
    old = storage.join(versions.version_uri(dataset, "v1"), "old.parquet")
    versions.publish(
        dataset, "v1", [old], [storage.write_parquet(embedding_rows(["a", "b"], [None, None], False), old)]
    )
    assert embeddings_table.offered([old]) == ("embedding",)
    assert embeddings_table.matrix(storage.read_parquet([old])).shape == (2, 4)
    with pytest.raises(
        ConfigError, match="no logmel column .*'fused' needs: run embed with --only-new false"
    ):
        embeddings_table.matrix(storage.read_parquet([old]), "fused")
    carried = embedder.carry_over(dataset, True, versions.version_uri(dataset, "v2"))
    assert (
        carried.kept == []
        and len(carried.skip) == 0
        and "every track is embedded again" in capsys.readouterr().out
    )
    new = storage.join(versions.version_uri(dataset, "v2"), "new.parquet")
    versions.publish(
        dataset, "v2", [new], [storage.write_parquet(embedding_rows(["a", "b"], [None, "corrupt"]), new)]
    )
    assert embeddings_table.offered([new]) == embeddings_table.REPRESENTATIONS
    carried = embedder.carry_over(dataset, True, versions.version_uri(dataset, "v3"))
    assert [e.path for e in carried.kept] == ["v2/new.parquet"] and list(carried.skip) == ["a", "b"]


def test_encoder_resources_follow_the_device_unless_configured():
    auto = job.EmbedConfig()

    def resources(cfg: job.EmbedConfig, now: dict, most: dict | None = None) -> tuple[float, int]:
        return embedder.encoder_resources(cfg, ray_env.choose_device(cfg.device, now, most or {}), now)

    assert resources(auto, {"CPU": 16.0, "GPU": 4.0}) == (1.0, 4)
    assert resources(auto, {"CPU": 4.0}, {"CPU": 64.0, "GPU": 3.0}) == (1.0, 3)  # GPU nodes to scale to
    assert resources(auto, {"CPU": 4.0}) == (0.0, 2)
    assert resources(auto, {"CPU": 1.0}) == (0.0, 1)
    assert resources(job.EmbedConfig(device="cpu"), {"CPU": 16.0, "GPU": 4.0}) == (0.0, 8)
    assert resources(job.EmbedConfig(cpus_per_actor=4), {"CPU": 16.0}) == (0.0, 2)
    assert resources(job.EmbedConfig(gpus_per_actor=0.5), {"CPU": 8.0, "GPU": 2.0}) == (0.5, 4)
    assert resources(job.EmbedConfig(actors=3, gpus_per_actor=0), {"CPU": 8.0, "GPU": 2.0}) == (0.0, 3)


def test_the_device_is_a_stated_decision():
    """A cluster whose GPU groups start at zero nodes gets a GPU request, not a silent CPU run."""
    scaled = ray_env.choose_device("auto", {"CPU": 8.0}, {"CPU": 72.0, "GPU": 4.0})
    assert scaled.gpu and scaled.gpus == 4.0 and "autoscaler can start up to 4" in scaled.reason
    present = ray_env.choose_device("auto", {"CPU": 8.0, "GPU": 2.0}, {})
    assert present.gpu and present.gpus == 2.0
    fallback = ray_env.choose_device("auto", {"CPU": 8.0}, {"CPU": 72.0})
    assert not fallback.gpu and "CPU fallback" in fallback.reason
    assert not ray_env.choose_device("cpu", {"CPU": 8.0, "GPU": 2.0}, {}).gpu
    assert ray_env.choose_device("gpu", {"CPU": 8.0}, {"GPU": 1.0}).gpu
    with pytest.raises(ConfigError, match="--device gpu: the cluster has no GPU"):
        ray_env.choose_device("gpu", {"CPU": 8.0}, {})
    with pytest.raises(ConfigError, match="--device must be one of auto, cpu, gpu"):
        job.EmbedConfig(device="cuda").validate()
    with pytest.raises(ConfigError, match="--device cpu with --gpus-per-actor"):
        job.EmbedConfig(device="cpu", gpus_per_actor=1.0).validate()


def test_tracks_per_task_fill_a_block_of_the_longer_tracks():
    chunk_bytes = audio.CHUNK_SAMPLES * 2
    block = 128 * 2**20

    def per_task(seconds, todo=10**6, slots=8.0, max_chunks=64, block=block):
        return embedder.tracks_per_task(np.asarray(seconds, float), todo, max_chunks, block, slots)

    assert per_task([600.0] * 100) == block // (64 * chunk_bytes)  # full length: max_chunks each
    assert per_task([np.nan] * 100) == per_task([600.0] * 100)  # unknown counts as full length
    assert per_task([120.0] * 100) == block // (44 * chunk_bytes)  # 44 whole chunks each
    assert per_task([30.0] * 100) == embedder.MAX_TRACKS_PER_TASK  # 11 chunks each: the cap
    assert per_task([3.0] * 100) == embedder.MAX_TRACKS_PER_TASK  # one chunk each: the cap
    assert per_task([1.0] * 100) == embedder.MAX_TRACKS_PER_TASK  # shorter than a chunk: counted as one
    assert per_task([3.0] * 98 + [600.0] * 2) == per_task([600.0])  # the 99th percentile decides
    assert per_task([600.0] * 100, max_chunks=2) == embedder.MAX_TRACKS_PER_TASK
    assert per_task([600.0], block=block // 4) == embedder.MIN_TRACKS_PER_TASK  # a small block: the floor
    assert per_task([3.0] * 100, todo=100, slots=2.0) == 13  # four tasks per CPU: ceil(100 / 8)
    assert per_task([3.0] * 100, todo=0) == 1
    assert per_task([], todo=5, slots=1.0) == 2


def test_chunks_per_forward_follow_the_device_and_width_unless_configured():
    narrow, full = models.EncoderConfig(width=0.0625), models.EncoderConfig(width=1.0)
    assert embedder.chunks_per_forward(0, True, full) == embedder.chunks_per_forward(0, True, narrow) == 64
    assert embedder.chunks_per_forward(0, False, full) == 1  # 128 channels x 19,845 steps: 9.7 MiB a chunk
    assert embedder.chunks_per_forward(0, False, narrow) == embedder.CPU_FORWARD_BYTES // (4 * 8 * 19845)
    assert embedder.chunks_per_forward(8, False, full) == 8


def test_widest_activation_is_what_the_encoder_computes():
    config = models.EncoderConfig(width=0.125)
    encoder = models.SampleCNN(config).eval()
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel())) for m in encoder.net]
    with torch.inference_mode():
        encoder(torch.zeros(1, audio.CHUNK_SAMPLES))
    for h in hooks:
        h.remove()
    assert config.widest_activation() == max(sizes)


def test_catalog_durations_are_nan_where_unknown(tmp_path):
    uri = str(tmp_path / "c.parquet")
    rows = {"track_id": ["a", "b", "c"], "audio_uri": ["x"] * 3, "tags": [[]] * 3, "split": [None] * 3}
    storage.write_parquet(pa.table({**rows, "duration_s": pa.array([3, None, 7], pa.int32())}), uri)
    np.testing.assert_array_equal(catalog.durations(uri), [3.0, np.nan, 7.0])
    storage.write_parquet(pa.table({**rows, "duration_s": ["3", "4", "5"]}), uri)
    assert np.isnan(catalog.durations(uri)).all() and len(catalog.durations(uri)) == 3
    storage.write_parquet(pa.table(rows), uri)
    assert np.isnan(catalog.durations(uri)).all() and len(catalog.durations(uri)) == 3


# --------------------------------------------------------------------------- the Ray job


@pytest.mark.slow
def test_job_local_every_track_once_with_encoder_numbers(tmp_path, ray_local, capsys):
    root = str(tmp_path)
    model_id = make_root(root)
    summary = job.run(config(root)).result
    lines = [
        line for line in capsys.readouterr().out.splitlines() if re.match(r"embed: \d+/\d+ tracks", line)
    ]
    assert lines and lines[-1].startswith("embed: 14/14 tracks (100%)") and "errors 6" in lines[-1], lines
    out = check_complete(root, model_id)
    assert_matches_reference(out, reference(root, model_id))
    assert_logmel_is_the_floor(root, out)
    assert summary.tracks == 14 and summary.errors["truncated"] == 1
    manifest = versions.read_latest_manifest(embeddings_table.dataset_uri(Layout(root).embeddings, model_id))
    assert len(manifest.files) > 1 and manifest.config["model_id"] == model_id
    assert not storage.exists(storage.join(manifest.dataset, embedder.PENDING))


@pytest.mark.slow
def test_job_on_s3(s3_root, ray_local, tmp_path):
    """With the default sizes: one track per task here (10 tracks, 4 CPUs), recorded on the version's card."""
    model_id = make_root(s3_root, n_good=4)
    catalog_uri = f"sqlite:///{tmp_path}/iceberg.db"  # not the S3 root's default, under ~
    job.run(job.EmbedConfig(root=s3_root, shard_rows=1, catalog_uri=catalog_uri))
    out = check_complete(s3_root, model_id)
    assert_matches_reference(out, reference(s3_root, model_id))
    manifest = versions.read_latest_manifest(
        embeddings_table.dataset_uri(Layout(s3_root).embeddings, model_id)
    )
    assert (manifest.config["batch_size"], manifest.config["chunk_batch"]) == (1, 3)  # width 0.25
    check_iceberg(s3_root, model_id, catalog_uri)


@pytest.mark.slow
def test_only_new_refills_a_lost_shard_without_recomputing_the_rest(tmp_path, ray_local):
    root = str(tmp_path)
    model_id = make_root(root)
    job.run(config(root))
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    first = versions.read_latest_manifest(dataset)
    lost, kept = first.files[0], first.files[1:]
    storage.delete(storage.join(dataset, lost.path))
    versions.publish(
        dataset, "v0-lost-one", [storage.join(dataset, f.path) for f in kept], [f.rows for f in kept]
    )

    errors = {f.path: storage.read_parquet([storage.join(dataset, f.path)], ["error"]) for f in kept}
    retried = {p: t["error"].to_pylist().count("missing") for p, t in errors.items()}

    assert set(iceberg_table.registered(iceberg_table.open_table(root), model_id)) != set(
        versions.read_latest_manifest(dataset).file_uris()
    )  # a version committed by hand: the table lags until the next run
    summary = job.run(config(root, only_new=True)).result
    check_complete(root, model_id)
    snapshot = check_iceberg(root, model_id)
    final = versions.read_latest_manifest(dataset)
    untouched = {(f.path, f.sha256) for f in kept if not retried[f.path]}
    assert untouched and untouched <= {(f.path, f.sha256) for f in final.files}
    assert summary.tracks == lost.rows + sum(retried.values())  # missing audio is looked for again
    assert job.run(config(root, only_new=True)).result.tracks == 0
    assert versions.latest_version(dataset) == final.version
    assert check_iceberg(root, model_id) == snapshot  # nothing new: nothing registered


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_recompute(tmp_path, ray_local):
    root = str(tmp_path)
    model_id = make_root(root, n_good=24)
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "embed.py"),
        f"--root={root}",
        "--batch-size=2",
        "--shard-rows=1",
    ]
    log = open(tmp_path / "killed-run.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = storage.join(dataset, embedder.CHECKPOINTS)
    deadline = time.monotonic() + 480
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            committed = [u for u in storage.list_files(checkpoints, ".parquet") if ".pending." not in u]
            if len(committed) >= 2:
                break
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed-run.log").read_text()[-3000:]
    assert versions.latest_version(dataset) is None, "the run finished before it could be killed"
    version = storage.read_json(storage.join(dataset, embedder.PENDING))["version"]
    before = {u: storage.file_checksum(u) for u in storage.list_files(versions.version_uri(dataset, version))}
    assert before, "no shard was written before the kill"

    summary = job.run(config(root)).result
    out = check_complete(root, model_id)
    assert versions.latest_version(dataset) == version
    after = {u: storage.file_checksum(u) for u in storage.list_files(versions.version_uri(dataset, version))}
    survivors = {u for u in before if after.get(u) == before[u]}
    assert survivors, "every shard written before the kill was rewritten"
    assert len(out) == 30 and summary.tracks == 30


@pytest.mark.slow
def test_only_new_tries_missing_audio_again_once_it_appears(tmp_path, ray_local):
    root = str(tmp_path)
    model_id = make_root(root, n_good=3)
    job.run(config(root))
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    cat = catalog.read(Layout(root).catalog, columns=["track_id", "audio_uri", "fault"]).to_pylist()
    base = catalog.base_dir(Layout(root).catalog)
    lost = next(r for r in cat if r["fault"] == "missing")
    good = next(r for r in cat if r["fault"] is None)
    storage.write_bytes(
        storage.resolve(base, lost["audio_uri"]), storage.read_bytes(storage.resolve(base, good["audio_uri"]))
    )

    summary = job.run(config(root, only_new=True)).result
    assert summary.tracks == 1 and summary.errors == {}
    check_iceberg(root, model_id)  # the carried-* rewrite without the retried row, not the file it replaces
    out = embeddings_table.read(Layout(root).embeddings, model_id)
    ids = out["track_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(cat)
    errors = dict(zip(ids, out["error"].to_pylist()))
    assert errors[lost["track_id"]] is None
    assert {t: e for t, e in errors.items() if t != lost["track_id"]} == {
        r["track_id"]: r["fault"] for r in cat if r["track_id"] != lost["track_id"]
    }
    assert job.run(config(root, only_new=True)).result.tracks == 0
    assert versions.latest_version(dataset) is not None


@pytest.mark.slow
def test_progress_lines_come_from_the_stage_counters_while_it_runs(ray_local, monkeypatch):
    """A stage longer than the interval prints lines as it goes, from what its workers count."""
    import ray

    monkeypatch.setattr(progress, "INTERVAL_S", 0.2)
    out = io.StringIO()

    @ray.remote(num_cpus=1)
    def work(counter, n: int) -> None:
        for _ in range(n):
            time.sleep(0.3)
            counter.add.remote({"tracks": 1})

    with progress.counting("embed", 8, "tracks", "tracks", stream=out) as counter:
        ray.get([work.remote(counter, 4) for _ in range(2)])
    lines = out.getvalue().splitlines()
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert len(lines) >= 3 and done[0] < 8 and done == sorted(done) and done[-1] == 8, lines
    assert lines[-1].startswith("embed: 8/8 tracks (100%)")


@pytest.mark.slow
def test_a_lost_progress_counter_stops_the_lines_not_the_stage(ray_local):
    import ray

    @ray.remote(num_cpus=1)
    def work(counter) -> int:
        counter.add.remote({"tracks": 1})
        return 1

    out = io.StringIO()
    with progress.counting("embed", 4, "tracks", "tracks", stream=out) as counter:
        ray.kill(counter)
        assert ray.get([work.remote(counter) for _ in range(4)]) == [1] * 4
    assert out.getvalue() == ""
