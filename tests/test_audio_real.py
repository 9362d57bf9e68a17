"""Long tracks from real encoders: their headers overshoot the audio (Opus pre-skip, MP3 and AAC padding).

``max_chunks=4`` puts the window-by-window path at tracks over 1.5 * 4 * 2.7 s = 16.2 s, so files of
15-32 s cover both paths, as 4.3-minute tracks do with the embed job's 64 chunks.
"""

from __future__ import annotations

import numpy as np
import pytest

from musiclib import audio
from musiclib.core import storage
from musiclib.datasets import audio_files
from musiclib.train import shards

MAX_CHUNKS = 4
LONG_S = 1.5 * MAX_CHUNKS * audio.CHUNK_SECONDS
ENCODED = [
    ("opus", 48000),
    ("opus", 24000),
    ("mp3", 44100),
    ("mp3", 48000),
    ("mp3", 22050),
    ("m4a", 44100),
    ("ogg", 44100),
]


def _music(sr: int, seconds: float) -> np.ndarray:
    """Two partials under a slow tremolo, loud to the last sample (a faded tail would hide a bad window)."""
    t = np.arange(round(seconds * sr)) / sr
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t) ** 2
    return (0.25 * env * (np.sin(2 * np.pi * 330 * t) + np.sin(2 * np.pi * 523 * t))).astype(np.float32)


@pytest.mark.parametrize("seconds", [15.0, 16.9, 31.7])
@pytest.mark.parametrize("ext,sr", ENCODED)
def test_real_encoders_give_every_chunk_of_a_long_track(ext, sr, seconds):
    data = audio_files.encode(_music(sr, seconds), sr, ext)
    header = audio.info(data).duration_s
    full = audio.load(data)
    if ext == "opus":  # the premise: the header counts audio that does not decode
        assert header * audio.SAMPLE_RATE > len(full)
    chunks, duration = audio.load_chunks(data, max_chunks=MAX_CHUNKS)
    assert duration == pytest.approx(seconds, abs=0.1)
    if header <= LONG_S:  # decoded whole
        np.testing.assert_array_equal(chunks, audio.chunk(full, max_chunks=MAX_CHUNKS))
        return
    # windows where the header puts them, the last ending where the audio does: each equals a full decode's span
    starts = audio.chunk_starts(int(header * audio.SAMPLE_RATE), max_chunks=MAX_CHUNKS)
    assert chunks.shape == (MAX_CHUNKS, audio.CHUNK_SAMPLES)
    for c, s in zip(chunks, np.minimum(starts, len(full) - audio.CHUNK_SAMPLES), strict=True):
        np.testing.assert_allclose(c, full[s : s + audio.CHUNK_SAMPLES], atol=1e-4)


def test_long_opus_track_from_s3(s3_root):
    uri = storage.join(s3_root, "long.opus")
    storage.write_bytes(uri, audio_files.encode(_music(48000, 31.7), 48000, "opus"))
    chunks, _ = audio.load_chunks(uri, max_chunks=MAX_CHUNKS)
    assert chunks.shape == (MAX_CHUNKS, audio.CHUNK_SAMPLES) and np.abs(chunks[-1]).max() > 0.1


@pytest.mark.parametrize("seconds", [15.0, 31.7])
@pytest.mark.parametrize("ext", ["flac", "mp3"])  # their headers give the length, so a cut shows
def test_a_file_cut_in_the_middle_is_still_truncated(ext, seconds):
    data = audio_files.encode(_music(44100, seconds), 44100, ext)
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load_chunks(data[: len(data) // 2], max_chunks=MAX_CHUNKS)


def test_a_window_past_the_audio_moves_back_only_within_the_slack():
    sr = audio.SAMPLE_RATE
    data = audio_files.encode(_music(sr, 10.0), sr, "flac")
    full = audio.load(data)
    window = audio.read_windows(data, [7.5], 3.0, slack_s=0.5)[0]  # 0.5 s past the end: moved back
    np.testing.assert_allclose(window, full[-3 * sr :], atol=1e-6)
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.read_windows(data, [7.5], 3.0, slack_s=0.4)
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.read_windows(data, [7.5], 3.0)


def test_a_bad_last_packet_keeps_the_audio_before_it():
    """A real Ogg Vorbis file can end in a packet FFmpeg rejects after all its audio has decoded."""
    sr = 44100
    good = audio_files.encode(_music(sr, 31.7), sr, "ogg")
    bad = audio_files.spoil_ogg_packet(good)
    full, kept = audio.load(good), audio.load(bad)
    assert 0 < len(full) - len(kept) < 0.1 * audio.SAMPLE_RATE  # only the last packet is lost
    edge = round(0.05 * audio.SAMPLE_RATE)  # resampling sees a different end within its filter's reach
    np.testing.assert_allclose(kept[:-edge], full[: len(kept) - edge], atol=1e-4)
    for path_max_chunks in (64, MAX_CHUNKS):  # decoded whole, and window by window
        chunks, _ = audio.load_chunks(bad, max_chunks=path_max_chunks)
        assert np.abs(chunks[-1]).max() > 0.1
    pcm, _ = shards.decode_for_training(bad, max_seconds=10.0, segment_seconds=2.0)
    assert len(pcm) == 5 * 2 * audio.SAMPLE_RATE


def test_a_bad_packet_in_the_middle_is_truncated():
    sr = 44100
    bad = audio_files.spoil_ogg_packet(audio_files.encode(_music(sr, 31.7), sr, "ogg"), page=4)
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load_chunks(bad)
