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
