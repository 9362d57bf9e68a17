"""The decoder: every format, down-mix, resampling accuracy, seek windows, chunking and each error kind."""

from __future__ import annotations

import numpy as np
import pytest

from musiclib import audio, storage

FORMATS = [("wav", 44100), ("flac", 22050), ("ogg", 44100), ("opus", 48000), ("mp3", 44100), ("m4a", 32000)]


def _tone(sr: int, seconds: float = 6.0, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t) ** 2
    return np.stack([0.3 * env * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)]).astype(
        np.float32
    )


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


@pytest.mark.parametrize("ext,sr", FORMATS)
def test_decodes_every_format_to_mono_at_model_rate(ext, sr):
    data = audio.encode(_tone(sr), sr, ext)
    info = audio.info(data)
    assert info.sample_rate == sr and info.channels == 2
    y = audio.load(data)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) / audio.SAMPLE_RATE - 6.0) < 0.06  # AAC adds a frame of padding
    # the down-mix averages the 220 Hz and 440 Hz channels: both partials survive at half amplitude
    spec = np.abs(np.fft.rfft(y[: audio.SAMPLE_RATE * 4]))
    freqs = np.fft.rfftfreq(audio.SAMPLE_RATE * 4, 1 / audio.SAMPLE_RATE)
    for f in (220, 440):
        assert spec[np.argmin(np.abs(freqs - f))] > 0.2 * spec.max()


@pytest.mark.parametrize("orig_sr", [8000, 16000, 44100, 48000, 96000])
def test_resampling_keeps_a_sines_frequency_and_amplitude(sine, orig_sr):
    x = sine(1000.0, 2.0, orig_sr, amp=0.5)
    y = audio.resample(x, orig_sr, audio.SAMPLE_RATE)
    assert len(y) == pytest.approx(2.0 * audio.SAMPLE_RATE, abs=1)
    assert _peak_hz(y, audio.SAMPLE_RATE) == pytest.approx(1000.0, abs=1.0)
    mid = y[2000:-2000]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_resampling_removes_content_above_the_new_nyquist(sine):
    y = audio.resample(sine(15000.0, 1.0, 44100), 44100, audio.SAMPLE_RATE)  # 15 kHz > 11.025 kHz
    assert np.abs(y[1000:-1000]).max() < 0.01


@pytest.mark.parametrize("ext,sr", FORMATS)
def test_seek_window_equals_the_same_span_of_a_full_decode(ext, sr):
    data = audio.encode(_tone(sr), sr, ext)
    full = audio.load(data)
    for offset in (0.4, 2.0, 3.71):
        window = audio.load(data, offset_s=offset, duration_s=1.3)
        k0 = round(offset * audio.SAMPLE_RATE)
        assert len(window) == round(1.3 * audio.SAMPLE_RATE)
        np.testing.assert_allclose(window, full[k0 : k0 + len(window)], atol=1e-4)


def test_windows_read_from_s3_by_range(s3_root):
    data = audio.encode(_tone(44100, 8.0), 44100, "flac")
    uri = storage.join(s3_root, "audio", "a.flac")
    storage.write_bytes(uri, data)
    full = audio.load(data)
    win = audio.read_windows(uri, [1.0, 5.0], 2.7)
    assert win.shape == (2, audio.CHUNK_SAMPLES)
    np.testing.assert_allclose(win[1], full[5 * 22050 : 5 * 22050 + audio.CHUNK_SAMPLES], atol=1e-6)


def test_chunk_starts_consecutive_then_spread_evenly():
    c = 10
    np.testing.assert_array_equal(audio.chunk_starts(35, c, max_chunks=5), [0, 10, 20])
    spread = audio.chunk_starts(1000, c, max_chunks=5)
    assert len(spread) == 5 and spread[0] == 0 and spread[-1] == 990
    assert np.all(np.diff(spread) > c)  # no overlap, evenly spaced
    assert len(audio.chunk_starts(9, c)) == 0


def test_chunk_shapes_and_random_window():
    x = np.arange(100, dtype=np.float32)
    chunks = audio.chunk(x, 30, max_chunks=None)
    assert chunks.shape == (3, 30) and chunks[1, 0] == 30
    rng = np.random.default_rng(0)
    starts = {audio.random_window(100, 30, rng) for _ in range(500)}
    assert min(starts) == 0 and max(starts) == 70
    assert audio.random_window(20, 30, rng) == 0


def test_load_chunks_short_track_decodes_whole():
    sr = 22050
    data = audio.encode(_tone(sr, 9.0, 1), sr, "flac")
    chunks, duration = audio.load_chunks(data, max_chunks=64)
    assert chunks.shape == (3, audio.CHUNK_SAMPLES) and duration == pytest.approx(9.0)


def test_load_chunks_long_track_reads_spread_windows():
    sr = 22050
    data = audio.encode(_tone(sr, 40.0, 1), sr, "flac")
    chunks, duration = audio.load_chunks(data, max_chunks=4)  # 40 s > 1.5 * 4 * 2.7 s: windowed
    full = audio.load(data)
    starts = audio.chunk_starts(len(full), audio.CHUNK_SAMPLES, 4)
    assert chunks.shape == (4, audio.CHUNK_SAMPLES) and duration == pytest.approx(40.0)
    for c, s in zip(chunks, starts):
        np.testing.assert_allclose(c, full[s : s + audio.CHUNK_SAMPLES], atol=1e-6)


def test_int16_round_trip():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(audio.from_int16(audio.to_int16(x)), x, atol=1 / 32767)


# --------------------------------------------------------------------------- errors


def _reason(source) -> str:
    with pytest.raises(audio.AudioError) as err:
        audio.load_chunks(source)
    return err.value.reason


def test_error_kinds(tmp_path):
    good = audio.encode(_tone(22050, 6.0, 1), 22050, "flac")
    cases = {
        "missing": str(tmp_path / "nope.flac"),
        "empty": tmp_path / "empty.mp3",
        "corrupt": tmp_path / "corrupt.mp3",
        "truncated": tmp_path / "cut.flac",
        "silent": tmp_path / "silent.wav",
        "too_short": tmp_path / "short.wav",
    }
    cases["empty"].write_bytes(b"")
    cases["corrupt"].write_bytes(np.random.default_rng(0).bytes(4096))
    cases["truncated"].write_bytes(good[: len(good) * 4 // 10])
    cases["silent"].write_bytes(audio.encode(np.zeros(22050 * 4, np.float32), 22050, "wav"))
    cases["too_short"].write_bytes(audio.encode(_tone(22050, 0.8, 1), 22050, "wav"))
    for expected, source in cases.items():
        assert _reason(str(source)) == expected, expected


def test_missing_s3_object_is_reported(s3_root):
    assert _reason(storage.join(s3_root, "no", "such.flac")) == "missing"


def test_over_long_full_decode_is_refused_but_windows_work():
    sr = 8000
    data = audio.encode(np.full(sr * 30, 0.1, np.float32), sr, "wav")
    with pytest.raises(audio.AudioError, match="too_long"):
        audio.load(data, max_duration_s=10)
    assert len(audio.load(data, offset_s=20.0, duration_s=1.0)) == audio.SAMPLE_RATE


def test_window_past_the_end_is_truncated():
    data = audio.encode(_tone(22050, 3.0, 1), 22050, "wav")
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load(data, offset_s=2.5, duration_s=1.0)
