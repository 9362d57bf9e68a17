"""A track as chunks: rows decoded to int16 chunks, a module run over every chunk, outputs averaged back.

The embed stage's pieces below the encoder, kept Ray-free so the embed job, the log-mel floor and tests
call them directly:

1. ``decode_batch``: catalog rows (``track_id``, ``audio_uri``) to up to N chunks per track as int16
   (``DECODED_SCHEMA``; half the bytes of float32 between tasks), or the reason the track cannot be used;
   a bad row (null or non-string id or URI) is a reason too, never a failed job. Storage that stays
   unreachable raises ``storage.TransientError``, so Ray retries the task.
2. ``decoded_chunks``: the chunks of a decoded batch's usable tracks as one array, and how many each has.
3. ``forward_chunks``: a module (an encoder, the log-mel floor) on those chunks in fixed-size forwards.
4. ``track_means``: the outputs averaged per track.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from musiclib import audio
from musiclib.core import storage

DECODED_SCHEMA = pa.schema(
    [
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("chunks", pa.large_list(pa.int16())),  # n_chunks * CHUNK_SAMPLES samples, row-major
        pa.field("n_chunks", pa.int32()),
        pa.field("duration_s", pa.float64()),
        pa.field("error", pa.string()),
    ]
)


# --------------------------------------------------------------------------- decoding


def decode_track(
    uri: object,
    max_chunks: int = 64,
    base_dir: str | None = None,
    allowed_prefixes: Sequence[str] | None = None,
) -> tuple[np.ndarray | None, float | None, str | None]:
    """One track to ``(int16 chunks [n, CHUNK_SAMPLES], duration_s, None)`` or ``(None, None, reason)``.

    ``uri`` is a catalog's ``audio_uri``, relative ones resolved against ``base_dir``; with
    ``allowed_prefixes`` only URIs under them are read (``audio.load_chunks``). Every way a track can be
    unusable becomes a reason from ``audio.REASONS``: the decoder's own ``AudioError`` (``bad_uri`` for
    a row that names no readable URI) and anything else it throws (``corrupt``), so one bad file never
    stops a job over millions. Only ``storage.TransientError`` (storage unreachable after retries)
    propagates: it says nothing about the track, and the task is retried.
    """
    try:
        source = audio.locate(uri, base_dir)
        chunks, duration = audio.load_chunks(source, max_chunks=max_chunks, allowed_prefixes=allowed_prefixes)
    except storage.TransientError:
        raise
    except audio.AudioError as exc:
        return None, None, exc.reason
    except Exception:  # whatever else a broken file makes FFmpeg, numpy or torch throw
        return None, None, "corrupt"
    if len(chunks) == 0:
        return None, None, "too_short"
    return audio.to_int16(chunks), duration, None


def decode_batch(
    rows: pa.Table, base_dir: str, max_chunks: int = 64, allowed_prefixes: Sequence[str] | None = None
) -> pa.Table:
    """Catalog rows to ``DECODED_SCHEMA`` rows, one per input row, in the same order (see ``decode_track``).

    Relative ``audio_uri`` values are resolved against the catalog's folder ``base_dir``. A row whose
    ``track_id`` is null or not a string is not decoded: it gets ``bad_id``, with the id as a string
    (empty for null), so a catalog too big to validate first still cannot fail the job.
    """
    ids = rows.column("track_id").to_pylist()
    uris = rows.column("audio_uri").to_pylist()
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for track_id, uri in zip(ids, uris, strict=True):
        if isinstance(track_id, str):
            chunks, duration, error = decode_track(uri, max_chunks, base_dir, allowed_prefixes)
        else:
            chunks, duration, error = None, None, "bad_id"
            track_id = "" if track_id is None else str(track_id)
        out["track_id"].append(track_id)
        out["chunks"].append(None if chunks is None else chunks.reshape(-1))
        out["n_chunks"].append(0 if chunks is None else len(chunks))
        out["duration_s"].append(duration)
        out["error"].append(error)
    return pa.table(out, schema=DECODED_SCHEMA)


def decoded_chunks(decoded: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ok, chunks, n_chunks)`` of ``DECODED_SCHEMA`` rows: which rows have no error, the int16 chunks of
    those rows in order (``[sum(n_chunks), CHUNK_SAMPLES]``), and each such row's number of chunks."""
    ok = ~decoded.column("error").is_valid().to_numpy(zero_copy_only=False)
    n_chunks = decoded.column("n_chunks").to_numpy(zero_copy_only=False).astype(np.int64)[ok]
    flat = decoded.column("chunks").filter(pa.array(ok)).combine_chunks()
    samples = flat.flatten().to_numpy(zero_copy_only=False) if len(flat) else np.zeros(0, np.int16)
    return ok, samples.reshape(-1, audio.CHUNK_SAMPLES), n_chunks


# --------------------------------------------------------------------------- the forward pass and the average


def forward_chunks(
    encoder: nn.Module, chunks: np.ndarray, chunk_batch: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Outputs of int16 chunks ``[n, samples]`` as float32 ``[n, dim]``, ``chunk_batch`` chunks per forward.

    ``encoder`` is an encoder or the log-mel floor (``logmel.LogMel``): any module with ``config.embed_dim``.
    Fixed-size forward batches keep the accelerator's memory bounded whatever the tracks' lengths. The
    chunks travel as int16 (half the bytes of float32) and become float on the device; on CUDA from
    pinned memory, asynchronously, and the outputs come back in one copy at the end, so the host never
    waits on the device between batches.
    """
    device = torch.device(device)
    if len(chunks) == 0:
        return np.zeros((0, encoder.config.embed_dim), np.float32)
    host = torch.empty(chunks.shape, dtype=torch.int16, pin_memory=device.type == "cuda")
    host.numpy()[...] = chunks  # a writable copy: Arrow's buffers are read-only
    outputs = []
    with torch.inference_mode():
        for lo in range(0, len(host), chunk_batch):
            x = host[lo : lo + chunk_batch].to(device, non_blocking=True).float() / audio.INT16_SCALE
            outputs.append(encoder(x).float())
        return torch.cat(outputs).cpu().numpy()


def track_means(outputs: np.ndarray, n_chunks: np.ndarray) -> np.ndarray:
    """Per-chunk outputs ``[sum(n_chunks), dim]`` of consecutive tracks to each track's mean ``[tracks, dim]``
    (``n_chunks`` rows each, in order)."""
    if len(n_chunks) == 0:
        return np.zeros((0, outputs.shape[1]), outputs.dtype)
    starts = np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
    return np.add.reduceat(outputs, starts, axis=0) / n_chunks[:, None]
