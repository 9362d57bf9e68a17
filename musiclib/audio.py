"""The audio decoder: PyAV (bundled FFmpeg) to mono float32, torchaudio to the model rate, windows by seeking.

Reads WAV, FLAC, OGG/Vorbis, Opus, MP3 and AAC/M4A from any storage URI (S3 objects are read by range,
so a window of an hours-long file never downloads the whole file). Every failure that belongs to a track
is an ``AudioError`` whose ``reason`` jobs record per track before going on:

- ``missing``: no object at the URI; ``forbidden``: access denied, or outside the allowed prefixes;
  ``bad_uri``: not a URI musiclib reads (null, ``http://``, ``s3:///key``, ``file://otherhost/...``);
  ``bad_id``: a catalog row whose ``track_id`` is null or not a string (set by the embed job's decoding);
- ``empty``, ``corrupt``, ``truncated`` (the audio stops more than a chunk before its header says),
  ``unsupported`` (no audio stream, or not an audio container: playlists and other demuxers that read
  further files are refused), ``too_short``, ``too_long``, ``silent``.

A storage failure that may pass (unreachable endpoint, timeout, 5xx, throttling) is retried, then raised
as ``storage.TransientError``: not the track's fault, so jobs let the task fail and Ray run it again.
"""

from __future__ import annotations

import errno
import io
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import av
import numpy as np
import torch
import torchaudio.functional as AF

from musiclib.core import storage

SAMPLE_RATE = 22050
CHUNK_SECONDS = 2.7
CHUNK_SAMPLES = 59535  # 2.7 s at 22050 Hz, the SampleCNN input
SILENCE_PEAK = 1e-4  # -80 dBFS: quieter than this everywhere is silence, not music
MAX_FULL_DECODE_S = 3600.0  # a full decode longer than this is refused; read windows instead
# A decode error this close to the header's end keeps what decoded: encoders pad their last packet, and
# some files end in a packet FFmpeg rejects after all their audio has decoded. Further out: ``truncated``.
END_TOLERANCE_S = CHUNK_SECONDS
_MARGIN_S = 0.05  # extra audio decoded around a window so resampling has no edge effects inside it
RETRY_ATTEMPTS = 4  # tries of a storage call that fails transiently before storage.TransientError
RETRY_BACKOFF_S = 0.5  # wait after the first failed try, doubling after each: 3.5 s in all by default
# FFmpeg demuxers allowed to open a source: audio containers only. Playlists (hls), concat scripts and
# other demuxers that open further files or URLs are refused before they read anything.
DEMUXERS = ("wav", "flac", "ogg", "mp3", "mov", "aac", "matroska", "aiff")

REASONS = (
    "missing",
    "forbidden",
    "bad_uri",
    "bad_id",
    "empty",
    "corrupt",
    "truncated",
    "unsupported",
    "too_short",
    "too_long",
    "silent",
)
RETRIED = ("missing",)  # reasons an incremental embed run tries again: the object may appear later


def count_reasons(errors: Iterable[str | None]) -> Counter[str]:
    """How many errors of each reason: the text before the first ``:`` of every non-empty error."""
    return Counter(str(e).split(":", 1)[0] for e in errors if e)


class AudioError(Exception):
    """A track that cannot give usable audio; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float | None  # from the container header; None when the format does not say
    sample_rate: int
    channels: int
    codec: str


Source = str | bytes | io.IOBase
T = TypeVar("T")


# --------------------------------------------------------------------------- opening


def locate(uri: object, base_dir: str | None = None) -> str:
    """A catalog's ``audio_uri`` as the absolute URI to open, relative paths resolved against ``base_dir``.

    Raises ``bad_uri`` for anything else: null, empty or not a string, a scheme other than local or S3,
    S3 without a bucket, and ``file://`` naming a host other than ``localhost`` (``storage.split_uri``).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise AudioError("bad_uri", f"empty or non-string URI: {uri!r}")
    try:
        return storage.normalize_uri(uri) if base_dir is None else storage.resolve(base_dir, uri)
    except storage.StorageError as exc:
        raise AudioError("bad_uri", str(exc)) from exc


def _confine(uri: str, allowed_prefixes: Sequence[str] | None) -> str:
    """``uri`` (a local path with symlinks and ``..`` resolved), or ``forbidden`` when it lies outside
    every one of ``allowed_prefixes`` (local folders or ``s3://bucket/prefix``; None allows everything)."""
    scheme, path = storage.split_uri(uri)
    if scheme == "file":
        path = uri = os.path.realpath(path)
    if allowed_prefixes is None:
        return uri
    for prefix in allowed_prefixes:
        p_scheme, p_path = storage.split_uri(prefix)
        if p_scheme == "file":
            p_path = os.path.realpath(p_path)
        if p_scheme == scheme and os.path.commonpath([path, p_path]) == p_path:
            return uri
    raise AudioError("forbidden", f"{uri} is outside the allowed prefixes")


def _storage_call(uri: str, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` on storage: retried with exponential backoff while it fails in a way that may pass.

    Not found is ``missing``, access denied ``forbidden`` (S3's 404 and 403 arrive as ``FileNotFoundError``
    and ``PermissionError``), a path the filesystem cannot take ``bad_uri``; anything else (refused
    connections, timeouts, 5xx, throttling) is tried ``RETRY_ATTEMPTS`` times, then raised as
    ``storage.TransientError``. These tries come on top of botocore's own inside each S3 call
    (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``).
    """
    attempt = 0
    while True:
        try:
            return fn(*args)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise AudioError("missing", f"object not found: {uri}") from exc
        except PermissionError as exc:
            raise AudioError("forbidden", f"access denied: {uri}") from exc
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
                raise AudioError("bad_uri", f"{uri}: {exc}") from exc
            failure: Exception = exc
        except Exception as exc:  # botocore and aiohttp errors that s3fs passes on as they are
            if isinstance(exc, storage.StorageError) and isinstance(exc.__cause__, FileNotFoundError):
                raise AudioError("missing", f"object not found: {uri}") from exc  # storage.open_input's
            failure = exc
        attempt += 1
        if attempt == RETRY_ATTEMPTS:
            raise storage.TransientError(
                f"{storage.TRANSIENT}: {uri}: failed {attempt} times: {type(failure).__name__}: {failure}"
            ) from failure
        time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))


class _StorageFile(io.RawIOBase):
    """An object-store file as PyAV reads it: each read and seek goes through ``_storage_call``."""

    def __init__(self, uri: str):
        self.uri = uri
        self.f = _storage_call(uri, storage.open_input, uri)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return _storage_call(self.uri, self.f.read, n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return _storage_call(self.uri, self.f.seek, offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        super().close()


def _open(source: Source, allowed_prefixes: Sequence[str] | None = None) -> av.container.InputContainer:
    """Open a container from a URI, bytes or a binary file object, mapping failures to AudioError.

    FFmpeg may use only the demuxers in ``DEMUXERS`` and, for a local path, only the ``file`` protocol
    (none at all for bytes and file objects), so no source can make it read another file or URL.
    """
    name = source if isinstance(source, str) else "<buffer>"
    options = {"format_whitelist": ",".join(DEMUXERS), "protocol_whitelist": ""}
    if isinstance(source, str):
        uri = _confine(locate(source), allowed_prefixes)
        scheme, path = storage.split_uri(uri)
        fs, p = storage.filesystem(uri)
        if _storage_call(uri, fs.size, p) == 0:
            raise AudioError("empty", f"zero-length object: {source}")
        if scheme == "file":
            target, options["protocol_whitelist"] = path, "file"
        else:
            target = _StorageFile(uri)
    elif isinstance(source, bytes):
        if not source:
            raise AudioError("empty", "zero-length buffer")
        target = io.BytesIO(source)
    else:
        target = source
    try:
        container = av.open(target, mode="r", options=options, metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        raise AudioError("corrupt", f"{name}: not a readable audio file ({exc})") from exc
    except av.error.ArgumentError as exc:  # FFmpeg's answer to a demuxer off the whitelist
        raise AudioError(
            "unsupported", f"{name}: not one of the audio containers {DEMUXERS} ({exc})"
        ) from exc
    except av.error.PermissionError as exc:
        raise AudioError("forbidden", f"{name}: cannot open ({exc})") from exc
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AudioError("corrupt", f"{name}: cannot open ({type(exc).__name__}: {exc})") from exc
    if not container.streams.audio:
        container.close()
        raise AudioError("unsupported", f"{name}: no audio stream")
    return container


def _info(container: av.container.InputContainer) -> AudioInfo:
    stream = container.streams.audio[0]
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    ctx = stream.codec_context
    return AudioInfo(duration, int(ctx.sample_rate or stream.rate or 0), int(ctx.channels or 0), ctx.name)


def info(source: Source, allowed_prefixes: Sequence[str] | None = None) -> AudioInfo:
    """Header facts (duration, rate, channels, codec) without decoding."""
    with _open(source, allowed_prefixes) as container:
        return _info(container)


# --------------------------------------------------------------------------- decoding


def _frame_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as mono float32 (channels averaged)."""
    x = frame.to_ndarray()
    if x.dtype.kind in "iu":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    n_ch = len(frame.layout.channels)
    x = x.reshape(n_ch, -1) if frame.format.is_planar else x.reshape(-1, n_ch).T
    return x.mean(axis=0, dtype=np.float32)


def _decode_native(
    container: av.container.InputContainer, start_s: float, stop_s: float | None, name: str
) -> tuple[np.ndarray, int]:
    """Decode ``[start_s, stop_s)`` at the native rate, down-mixed to mono; returns samples and native rate.

    From the start, samples are counted as decoded (no trust in timestamps). Past the start, the
    container seeks to shortly before ``start_s`` and frame timestamps (relative to the stream's first
    audible sample) place the window; where they cannot be trusted (missing, or the seek landed past
    the window) it decodes from the start instead, which is slower but exact.
    """
    stream = container.streams.audio[0]
    sr = int(stream.codec_context.sample_rate or stream.rate)
    if sr <= 0:
        raise AudioError("unsupported", f"{name}: unknown sample rate")
    start_idx = round(start_s * sr)
    stop_idx = None if stop_s is None else round(stop_s * sr)
    seeking = start_idx > 0
    if seeking:
        try:
            container.seek(int(max(0.0, start_s - 0.5) / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError:
            seeking = False
            container.seek(0, stream=stream)
    origin = stream.start_time or 0  # e.g. an MP3's encoder delay: the first audible sample's timestamp
    pieces: list[np.ndarray] = []
    pos = 0  # native sample index of the next decoded sample
    first = True
    try:
        for frame in container.decode(stream):
            if seeking and first:
                if frame.pts is None or frame.pts < origin:
                    return _decode_native_from_start(container, start_idx, stop_idx, sr, name)
                pos = round((frame.pts - origin) * stream.time_base * sr)
                if pos > start_idx:
                    return _decode_native_from_start(container, start_idx, stop_idx, sr, name)
            first = False
            x = _frame_mono(frame)
            lo, hi = pos, pos + len(x)
            pos = hi
            if hi <= start_idx:
                continue
            x = x[max(0, start_idx - lo) :]
            if stop_idx is not None:
                x = x[: max(0, stop_idx - max(lo, start_idx))]
            pieces.append(x)
            if stop_idx is not None and hi >= stop_idx:
                break
    except av.error.FFmpegError as exc:
        if pos == 0:
            raise AudioError("corrupt", f"{name}: no decodable audio ({exc})") from exc
        total = _info(container).duration_s
        if total is None or pos < (total - END_TOLERANCE_S) * sr:
            of = f" of the {total:.1f} s in its header" if total else ""
            raise AudioError(
                "truncated", f"{name}: decoding stopped at {pos / sr:.1f} s{of} ({exc})"
            ) from exc
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), sr


def _decode_native_from_start(
    container: av.container.InputContainer, start_idx: int, stop_idx: int | None, sr: int, name: str
) -> tuple[np.ndarray, int]:
    """Fallback for containers whose timestamps cannot place a seek: decode from 0, counting samples."""
    container.seek(0, stream=container.streams.audio[0])
    x, _ = _decode_native(container, 0.0, None if stop_idx is None else stop_idx / sr, name)
    return x[start_idx:], sr


def resample(x: np.ndarray, orig_sr: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with torchaudio (windowed sinc), float32 in and out."""
    if orig_sr == sr or len(x) == 0:
        return x.astype(np.float32, copy=False)
    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), orig_sr, sr)
    return y.numpy()


def _aligned_span(start_s: float, n_out: int, orig_sr: int, sr: int) -> tuple[int, int, int]:
    """Native start index, native length and output offset of a window, aligned to the resampling phase.

    Resampling a segment that starts at a native index divisible by ``orig_sr / gcd`` gives the same
    output samples as resampling the whole track, away from the segment's edges. The window is padded
    by a margin on both sides and cut back after resampling, so the edges fall outside it.
    """
    g = math.gcd(orig_sr, sr)
    step_in, step_out = orig_sr // g, sr // g
    k0 = round(start_s * sr)
    margin_out = math.ceil(_MARGIN_S * sr)
    m = max(0, (k0 - margin_out) // step_out)
    native_start = m * step_in
    n_native = math.ceil((k0 + n_out + margin_out - m * step_out) * orig_sr / sr)
    return native_start, n_native, k0 - m * step_out


def load(
    source: Source,
    sr: int = SAMPLE_RATE,
    offset_s: float = 0.0,
    duration_s: float | None = None,
    max_duration_s: float = MAX_FULL_DECODE_S,
    allowed_prefixes: Sequence[str] | None = None,
) -> np.ndarray:
    """Decode to mono float32 at ``sr``: the whole track, or ``duration_s`` seconds from ``offset_s`` by seeking.

    ``allowed_prefixes`` (local folders or ``s3://bucket/prefix``), when given, confines a URI source to
    them: anything else is ``forbidden`` (the same for every function here that opens a source).
    """
    name = source if isinstance(source, str) else "<buffer>"
    with _open(source, allowed_prefixes) as container:
        header = _info(container)
        if (
            duration_s is None
            and header.duration_s is not None
            and header.duration_s - offset_s > max_duration_s
        ):
            raise AudioError(
                "too_long",
                f"{name}: {header.duration_s:.0f} s is over the {max_duration_s:.0f} s full-decode cap",
            )
        return _read(container, name, sr, offset_s, duration_s)


def _read(
    container: av.container.InputContainer,
    name: str,
    sr: int,
    offset_s: float,
    duration_s: float | None,
    slack_s: float = 0.0,
) -> np.ndarray:
    """Decode and resample ``duration_s`` seconds (to the end when None) from ``offset_s``.

    A window that would end at most ``slack_s`` past the audio that decodes is moved back to end there.
    """
    stream = container.streams.audio[0]
    orig_sr = int(stream.codec_context.sample_rate or stream.rate)
    if offset_s == 0 and duration_s is None:
        x, _ = _decode_native(container, 0.0, None, name)
        return resample(x, orig_sr, sr)
    n_out = None if duration_s is None else round(duration_s * sr)
    native_start, n_native, cut = _aligned_span(offset_s, n_out or 0, orig_sr, sr)
    stop_s = None if n_out is None else (native_start + n_native) / orig_sr
    x, _ = _decode_native(container, native_start / orig_sr, stop_s, name)
    y = resample(x, orig_sr, sr)[cut:]
    if n_out is None:
        return y
    short = n_out - len(y)
    if short <= 0:
        return y[:n_out]
    if short <= slack_s * sr and short <= round(offset_s * sr):
        return _read(container, name, sr, offset_s - short / sr, duration_s)
    raise AudioError("truncated", f"{name}: window at {offset_s:.2f} s ends {short / sr:.2f} s early")


# --------------------------------------------------------------------------- chunks


def chunk_starts(n_samples: int, chunk: int = CHUNK_SAMPLES, max_chunks: int | None = 64) -> np.ndarray:
    """Start indices of consecutive chunks; with more than ``max_chunks``, that many spread evenly."""
    n_full = n_samples // chunk
    if max_chunks is None or n_full <= max_chunks:
        return np.arange(n_full, dtype=np.int64) * chunk
    return np.round(np.linspace(0, n_samples - chunk, max_chunks)).astype(np.int64)


def chunk(x: np.ndarray, chunk: int = CHUNK_SAMPLES, max_chunks: int | None = 64) -> np.ndarray:
    """Cut a waveform into ``[n, chunk]`` chunks (see ``chunk_starts``); a tail shorter than a chunk is dropped."""
    starts = chunk_starts(len(x), chunk, max_chunks)
    if len(starts) == 0:
        return np.zeros((0, chunk), dtype=x.dtype)
    return np.stack([x[s : s + chunk] for s in starts])


def random_window(n_samples: int, length: int, rng: np.random.Generator) -> int:
    """A uniformly random start for a window of ``length`` inside ``n_samples`` (0 when it does not fit)."""
    return int(rng.integers(0, n_samples - length + 1)) if n_samples > length else 0


def check_signal(x: np.ndarray, name: str, min_samples: int) -> None:
    """Raise for audio a model cannot use: shorter than ``min_samples`` or silent throughout."""
    if len(x) == 0:
        raise AudioError("empty", f"{name}: no audio samples decoded")
    if len(x) < min_samples:
        raise AudioError("too_short", f"{name}: {len(x)} samples, under the {min_samples} needed")
    if not np.isfinite(x).all():
        raise AudioError("corrupt", f"{name}: non-finite samples")
    if float(np.abs(x).max()) < SILENCE_PEAK:
        raise AudioError("silent", f"{name}: silent throughout (peak under {SILENCE_PEAK:g})")


def load_chunks(
    source: Source,
    max_chunks: int = 64,
    sr: int = SAMPLE_RATE,
    chunk_samples: int = CHUNK_SAMPLES,
    allowed_prefixes: Sequence[str] | None = None,
) -> tuple[np.ndarray, float]:
    """Up to ``max_chunks`` chunks of a track spread evenly over it, and the track's duration in seconds.

    A track that fits in ``max_chunks`` chunks (plus half again) is decoded whole; a longer one is read
    window by window, seeking, so an hours-long file costs ``max_chunks`` chunk decodes, not hours.
    Encoders pad (Opus pre-skip, MP3 and AAC priming and padding), so a header's duration may overshoot
    the audio that decodes: the last window ends where the audio does, and a track is ``truncated``
    only when its audio stops more than a chunk before the header's end, in either path.
    """
    name = source if isinstance(source, str) else "<buffer>"
    with _open(source, allowed_prefixes) as container:
        header = _info(container)
        long_track = (
            header.duration_s is not None and header.duration_s * sr > 1.5 * max_chunks * chunk_samples
        )
        if not long_track:
            if header.duration_s is not None and header.duration_s > MAX_FULL_DECODE_S:
                raise AudioError("too_long", f"{name}: over the full-decode cap")
            x = _read(container, name, sr, 0.0, None)
            check_signal(x, name, chunk_samples)
            if header.duration_s is not None and len(x) < header.duration_s * sr - chunk_samples:
                raise AudioError(
                    "truncated",
                    f"{name}: decoded {len(x) / sr:.1f} s of the {header.duration_s:.1f} s in its header",
                )
            return chunk(x, chunk_samples, max_chunks), len(x) / sr
        starts = chunk_starts(int(header.duration_s * sr), chunk_samples, max_chunks)
        window_s = chunk_samples / sr
        chunks = read_windows_open(container, name, [s / sr for s in starts], window_s, sr, slack_s=window_s)
        check_signal(chunks.reshape(-1), name, chunk_samples)
        return chunks, float(header.duration_s)


def read_windows_open(
    container: av.container.InputContainer,
    name: str,
    starts_s: Sequence[float],
    duration_s: float,
    sr: int,
    slack_s: float = 0.0,
) -> np.ndarray:
    """Windows of ``duration_s`` at each start from an open container, as ``[n, samples]``.

    A window ending at most ``slack_s`` past the audio that decodes is moved back to end there; one
    ending further out is ``truncated``.
    """
    return np.stack([_read(container, name, sr, s, duration_s, slack_s) for s in starts_s])


def read_windows(
    source: Source,
    starts_s: Sequence[float],
    duration_s: float,
    sr: int = SAMPLE_RATE,
    slack_s: float = 0.0,
    allowed_prefixes: Sequence[str] | None = None,
) -> np.ndarray:
    """Windows of ``duration_s`` at each start, read by seeking, as ``[n, samples]`` float32 (see ``read_windows_open``)."""
    name = source if isinstance(source, str) else "<buffer>"
    with _open(source, allowed_prefixes) as container:
        return read_windows_open(container, name, starts_s, duration_s, sr, slack_s)


# --------------------------------------------------------------------------- compact transport


INT16_SCALE = 32767.0  # full scale of int16 audio: to_int16(1.0)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 (half the bytes of float32 in object stores and between tasks)."""
    return np.clip(np.round(x * INT16_SCALE), -32768, 32767).astype(np.int16)


def from_int16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / INT16_SCALE
