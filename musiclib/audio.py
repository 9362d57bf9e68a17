"""The audio decoder: PyAV (bundled FFmpeg) to mono float32, torchaudio to the model rate, windows by seeking.

Reads WAV, FLAC, OGG/Vorbis, Opus, MP3 and AAC/M4A from any storage URI (S3 objects are read by range,
so a window of an hours-long file never downloads the whole file). Every failure is an ``AudioError``
whose ``reason`` (``missing``, ``empty``, ``corrupt``, ``truncated``, ``unsupported``, ``too_short``,
``too_long``, ``silent``) jobs record per track before going on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchaudio.functional as AF

from musiclib import storage

SAMPLE_RATE = 22050
CHUNK_SECONDS = 2.7
CHUNK_SAMPLES = 59535  # 2.7 s at 22050 Hz, the SampleCNN input
SILENCE_PEAK = 1e-4  # -80 dBFS: quieter than this everywhere is silence, not music
MAX_FULL_DECODE_S = 3600.0  # a full decode longer than this is refused; read windows instead
_MARGIN_S = 0.05  # extra audio decoded around a window so resampling has no edge effects inside it

REASONS = ("missing", "empty", "corrupt", "truncated", "unsupported", "too_short", "too_long", "silent")


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


# --------------------------------------------------------------------------- opening


def _open(source: Source) -> av.container.InputContainer:
    """Open a container from a URI, bytes or a binary file object, mapping failures to AudioError."""
    name = source if isinstance(source, str) else "<buffer>"
    if isinstance(source, str):
        scheme, path = storage.split_uri(source)
        try:
            fs, p = storage.filesystem(source)
            size = fs.size(p)
        except FileNotFoundError as exc:
            raise AudioError("missing", f"object not found: {source}") from exc
        except Exception as exc:
            raise AudioError("missing", f"cannot read {source}: {type(exc).__name__}: {exc}") from exc
        if size == 0:
            raise AudioError("empty", f"zero-length object: {source}")
        target = path if scheme == "file" else storage.open_input(source)
    elif isinstance(source, bytes):
        if not source:
            raise AudioError("empty", "zero-length buffer")
        target = io.BytesIO(source)
    else:
        target = source
    try:
        container = av.open(target, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        raise AudioError("corrupt", f"{name}: not a readable audio file ({exc})") from exc
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


def info(source: Source) -> AudioInfo:
    """Header facts (duration, rate, channels, codec) without decoding."""
    with _open(source) as container:
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
        of = f" of the {total:.1f} s in its header" if total else ""
        raise AudioError("truncated", f"{name}: decoding stopped at {pos / sr:.1f} s{of} ({exc})") from exc
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
) -> np.ndarray:
    """Decode to mono float32 at ``sr``: the whole track, or ``duration_s`` seconds from ``offset_s`` by seeking."""
    name = source if isinstance(source, str) else "<buffer>"
    with _open(source) as container:
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
    container: av.container.InputContainer, name: str, sr: int, offset_s: float, duration_s: float | None
) -> np.ndarray:
    """Decode and resample ``duration_s`` seconds (to the end when None) from ``offset_s``."""
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
    if len(y) < n_out:
        raise AudioError(
            "truncated", f"{name}: window at {offset_s:.2f} s ends {(n_out - len(y)) / sr:.2f} s early"
        )
    return y[:n_out]


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
) -> tuple[np.ndarray, float]:
    """Up to ``max_chunks`` chunks of a track spread evenly over it, and the track's duration in seconds.

    A track that fits in ``max_chunks`` chunks (plus half again) is decoded whole; a longer one is read
    window by window, seeking, so an hours-long file costs ``max_chunks`` chunk decodes, not hours.
    """
    name = source if isinstance(source, str) else "<buffer>"
    with _open(source) as container:
        header = _info(container)
        long_track = (
            header.duration_s is not None and header.duration_s * sr > 1.5 * max_chunks * chunk_samples
        )
        if not long_track:
            if header.duration_s is not None and header.duration_s > MAX_FULL_DECODE_S:
                raise AudioError("too_long", f"{name}: over the full-decode cap")
            x = _read(container, name, sr, 0.0, None)
            check_signal(x, name, chunk_samples)
            if header.duration_s is not None and len(x) < 0.9 * header.duration_s * sr - sr:
                raise AudioError(
                    "truncated",
                    f"{name}: decoded {len(x) / sr:.1f} s of the {header.duration_s:.1f} s in its header",
                )
            return chunk(x, chunk_samples, max_chunks), len(x) / sr
        starts = chunk_starts(int(header.duration_s * sr), chunk_samples, max_chunks)
        chunks = read_windows_open(container, name, [s / sr for s in starts], chunk_samples / sr, sr)
        check_signal(chunks.reshape(-1), name, chunk_samples)
        return chunks, float(header.duration_s)


def read_windows_open(
    container: av.container.InputContainer, name: str, starts_s: Sequence[float], duration_s: float, sr: int
) -> np.ndarray:
    """Windows of ``duration_s`` at each start from an open container, as ``[n, samples]``."""
    return np.stack([_read(container, name, sr, s, duration_s) for s in starts_s])


def read_windows(
    source: Source, starts_s: Sequence[float], duration_s: float, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Windows of ``duration_s`` at each start, read by seeking, as ``[n, samples]`` float32."""
    name = source if isinstance(source, str) else "<buffer>"
    with _open(source) as container:
        return read_windows_open(container, name, starts_s, duration_s, sr)


# --------------------------------------------------------------------------- compact transport


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 (half the bytes of float32 in object stores and between tasks)."""
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def from_int16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 32767.0


# --------------------------------------------------------------------------- encoding (demo data, tests)

FORMATS = {  # extension: (container, codec, sample format)
    "wav": ("wav", "pcm_s16le", "s16"),
    "flac": ("flac", "flac", "s16"),
    "ogg": ("ogg", "libvorbis", "fltp"),  # FFmpeg in PyAV lacks libvorbis: written with libsndfile
    "opus": ("ogg", "libopus", "flt"),
    "mp3": ("mp3", "libmp3lame", "fltp"),
    "m4a": ("mp4", "aac", "fltp"),
}


OPUS_RATES = (48000, 24000, 16000, 12000, 8000)


def encode(x: np.ndarray, sr: int, ext: str, bitrate: int = 128_000) -> bytes:
    """Encode float audio ``[samples]`` or ``[channels, samples]`` as format ``ext`` (see FORMATS).

    FFmpeg's output is bit-exact (same audio, same bytes); Ogg Vorbis comes from libsndfile, whose Ogg
    stream serial number is random, so only its decoded samples repeat.
    """
    container_format, codec, sample_fmt = FORMATS[ext]
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if codec == "libvorbis":
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, np.clip(x, -1.0, 1.0).T, sr, format="OGG", subtype="VORBIS")
        return buf.getvalue()
    layout = "mono" if x.shape[0] == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format, options={"fflags": "+bitexact"}) as out:
        if codec == "libopus" and sr not in OPUS_RATES:
            raise ValueError(f"Opus encodes at {OPUS_RATES} Hz, not {sr}")
        stream = out.add_stream(codec, rate=sr, layout=layout)
        if ext not in ("wav", "flac"):
            stream.bit_rate = bitrate
        if codec == "libmp3lame":
            stream.codec_context.options = {"compression_level": "7"}  # LAME -q7: twice as fast, same bitrate
        planar = sample_fmt.endswith("p")
        data = np.clip(x, -1.0, 1.0)
        if sample_fmt.startswith("s16"):
            data = to_int16(data)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(data if planar else data.T.reshape(1, -1)), format=sample_fmt, layout=layout
        )
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
