"""Training shards: the catalog's train split decoded and resampled once, before pretraining starts.

Each shard is a Parquet file of 22,050 Hz mono int16 audio (``SHARD_SCHEMA``), committed as its own
version of the ``<root>/shards`` dataset (``prepare_shard``), so an interrupted preparation resumes by
skipping the tracks already in committed shards (``plan_shards``) and training never waits on decoding.
A track that cannot be used is kept as a row with its reason, so a re-run does not retry it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from musiclib import audio
from musiclib.core import storage, versions

SHARD_SCHEMA = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("audio", pa.binary()),  # int16 little-endian samples at 22,050 Hz; empty for a bad track
        pa.field("segment_samples", pa.int64()),  # audio is whole segments of this length (views stay inside)
        pa.field("error", pa.string()),  # null for a good track, else "<reason>: <message>"
    ]
)


def decode_for_training(uri: str, max_seconds: float, segment_seconds: float) -> tuple[np.ndarray, int]:
    """A track as int16 samples and its segment length.

    A track up to ``max_seconds`` long is decoded whole (one segment). A longer one is read as evenly spread
    segments of ``segment_seconds``, by seeking, so an hours-long file costs a few window decodes.
    """
    header = audio.info(uri)
    if header.duration_s is None or header.duration_s <= max_seconds:
        x = audio.load(uri)
        audio.check_signal(x, uri, audio.CHUNK_SAMPLES)
        return audio.to_int16(x), len(x)
    n = max(1, int(max_seconds // segment_seconds))
    last = max(0.0, header.duration_s - segment_seconds - 1.0)  # keep clear of a header that overstates
    windows = audio.read_windows(uri, list(np.linspace(0.0, last, n)), segment_seconds)
    audio.check_signal(windows.reshape(-1), uri, audio.CHUNK_SAMPLES)
    return audio.to_int16(windows.reshape(-1)), windows.shape[1]


def training_tags(tags: Any) -> list[str]:
    """A catalog row's tags as strings, without nulls and empty strings (Ray Data may hand a numpy array)."""
    return [str(t) for t in (tags if tags is not None else []) if t is not None and str(t) != ""]


def shard_version(track_ids: list[str]) -> str:
    """A shard's version id, from its tracks: the same tracks always give the same shard."""
    return versions.digest_version("part", sorted(track_ids), length=16)


def prepare_shard(
    tracks: dict[str, list], shards_uri: str, base_dir: str, max_seconds: float, segment_seconds: float
) -> dict[str, Any]:
    """Decode a group of catalog rows into one shard and commit it; return a summary of what happened.

    ``tracks`` has the catalog columns ``track_id``, ``audio_uri`` and ``tags``. A track that cannot be
    used is kept as a row with its reason (so a re-run does not retry it) and counted, never fatal;
    storage that stays unreachable (``storage.TransientError``) fails the task instead, so it is retried.
    """
    rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for tid, uri, tags in zip(tracks["track_id"], tracks["audio_uri"], tracks["tags"], strict=True):
        try:
            x, segment = decode_for_training(audio.locate(uri, base_dir), max_seconds, segment_seconds)
            data, error = x.astype("<i2").tobytes(), None
        except audio.AudioError as exc:
            data, segment, error = b"", 0, str(exc)
        except storage.TransientError:  # storage down: fail the task (Ray retries it), record nothing
            raise
        except Exception as exc:  # anything else a broken file or object store throws: record it, go on
            data, segment, error = b"", 0, f"corrupt: {type(exc).__name__}: {exc}"
        tags = training_tags(tags)
        for name, value in zip(SHARD_SCHEMA.names, (str(tid), tags, data, segment, error), strict=True):
            rows[name].append(value)
    version = shard_version(rows["track_id"])
    file_uri = storage.join(versions.version_uri(shards_uri, version), "shard.parquet")
    storage.write_parquet(pa.table(rows, schema=SHARD_SCHEMA), file_uri, compression="snappy")
    bad = audio.count_reasons(rows["error"])
    versions.publish(
        shards_uri,
        version,
        [file_uri],
        [len(rows["track_id"])],
        config={
            "sample_rate": audio.SAMPLE_RATE,
            "max_seconds": max_seconds,
            "segment_seconds": segment_seconds,
        },
        extra={"ok": len(rows["track_id"]) - sum(bad.values()), "bad": dict(bad)},
        move_latest=False,
    )
    return {"version": version, "tracks": len(rows["track_id"]), "bad": sum(bad.values())}


def committed_shards(shards_uri: str) -> list[str]:
    """URIs of every committed shard file (uncommitted leftovers of a killed run are ignored)."""
    uris = []
    for version in versions.committed_versions(shards_uri):
        manifest = versions.read_manifest(shards_uri, version)
        if manifest is not None:
            uris += manifest.file_uris()
    return uris


def read_shard_columns(uris: list[str], columns: list[str]) -> pa.Table:
    """Some columns of the given shards as one table (column projection: metadata reads skip the audio)."""
    return storage.read_parquet(uris, columns, SHARD_SCHEMA)


def plan_shards(train: pa.Table, done: set[str], shard_tracks: int) -> list[dict[str, list]]:
    """Groups of catalog rows still to prepare (tracks already in committed shards are skipped)."""
    todo = [
        row
        for row in train.select(["track_id", "audio_uri", "tags"]).to_pylist()
        if row["track_id"] not in done
    ]
    groups = [todo[i : i + shard_tracks] for i in range(0, len(todo), shard_tracks)]
    return [{k: [r[k] for r in g] for k in ("track_id", "audio_uri", "tags")} for g in groups]


def shard_report(uris: list[str]) -> dict[str, Any]:
    """Track counts of committed shards: usable tracks, and bad ones by reason."""
    errors = read_shard_columns(uris, ["error"]).column("error").to_pylist()
    bad = audio.count_reasons(errors)
    return {
        "shards": len(uris),
        "tracks": len(errors),
        "usable": len(errors) - sum(bad.values()),
        "bad": dict(bad),
    }
