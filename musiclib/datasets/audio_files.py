"""Audio files from samples, in every format the decoder reads (the demo catalog, tests, benchmarks).

``encode`` writes with PyAV's FFmpeg encoders, bit-exact, and Ogg Vorbis with libsndfile (PyAV's FFmpeg
has no Vorbis encoder). The decoder, ``musiclib.audio``, only decodes.
"""

from __future__ import annotations

import io

import av
import numpy as np

from musiclib import audio

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
            data = audio.to_int16(data)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(data if planar else data.T.reshape(1, -1)), format=sample_fmt, layout=layout
        )
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _ogg_crc(page: bytes) -> int:
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, unreflected, initial value 0 (RFC 3533)."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def spoil_ogg_packet(data: bytes, page: int = -1) -> bytes:
    """An Ogg Vorbis file whose ``page``-th page ends in a packet the decoder rejects, its checksum valid.

    The packet's first bit is set (a Vorbis audio packet starts with 0), so the demuxer delivers it and
    FFmpeg's decoder refuses it, as with real files that end in a bad packet after all their audio.
    """
    out = bytearray(data)
    starts = [i for i in range(len(out) - 3) if out[i : i + 4] == b"OggS"]
    start = starts[page]
    n_segments = out[start + 26]
    lacing = out[start + 27 : start + 27 + n_segments]
    body = start + 27 + n_segments
    ends, size = [], 0
    for value in lacing:
        size += value
        if value < 255:
            ends.append(size)
    out[body + (ends[-2] if len(ends) > 1 else 0)] |= 1
    end = starts[starts.index(start) + 1] if start != starts[-1] else len(out)
    out[start + 22 : start + 26] = b"\0\0\0\0"
    out[start + 22 : start + 26] = _ogg_crc(bytes(out[start:end])).to_bytes(4, "little")
    return bytes(out)
