"""The decoder: every format, down-mix, resampling accuracy, seek windows, chunking and each error kind."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections import Counter

import av
import numpy as np
import pyarrow as pa
import pytest

from musiclib import audio
from musiclib.core import storage
from musiclib.datasets import audio_files
from musiclib.embed import chunking

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
    data = audio_files.encode(_tone(sr), sr, ext)
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
    data = audio_files.encode(_tone(sr), sr, ext)
    full = audio.load(data)
    for offset in (0.4, 2.0, 3.71):
        window = audio.load(data, offset_s=offset, duration_s=1.3)
        k0 = round(offset * audio.SAMPLE_RATE)
        assert len(window) == round(1.3 * audio.SAMPLE_RATE)
        np.testing.assert_allclose(window, full[k0 : k0 + len(window)], atol=1e-4)


def test_windows_read_from_s3_by_range(s3_root):
    data = audio_files.encode(_tone(44100, 8.0), 44100, "flac")
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
    data = audio_files.encode(_tone(sr, 9.0, 1), sr, "flac")
    chunks, duration = audio.load_chunks(data, max_chunks=64)
    assert chunks.shape == (3, audio.CHUNK_SAMPLES) and duration == pytest.approx(9.0)


def test_load_chunks_long_track_reads_spread_windows():
    sr = 22050
    data = audio_files.encode(_tone(sr, 40.0, 1), sr, "flac")
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
    good = audio_files.encode(_tone(22050, 6.0, 1), 22050, "flac")
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
    cases["silent"].write_bytes(audio_files.encode(np.zeros(22050 * 4, np.float32), 22050, "wav"))
    cases["too_short"].write_bytes(audio_files.encode(_tone(22050, 0.8, 1), 22050, "wav"))
    for expected, source in cases.items():
        assert _reason(str(source)) == expected, expected


def test_over_long_full_decode_is_refused_but_windows_work():
    sr = 8000
    data = audio_files.encode(np.full(sr * 30, 0.1, np.float32), sr, "wav")
    with pytest.raises(audio.AudioError, match="too_long"):
        audio.load(data, max_duration_s=10)
    assert len(audio.load(data, offset_s=20.0, duration_s=1.0)) == audio.SAMPLE_RATE


def test_window_past_the_end_is_truncated():
    data = audio_files.encode(_tone(22050, 3.0, 1), 22050, "wav")
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load(data, offset_s=2.5, duration_s=1.0)


# --------------------------------------------------------------------------- storage failures


@pytest.fixture
def fast_retries(monkeypatch):
    """No botocore retries inside a call (``AWS_MAX_ATTEMPTS``) and a short backoff between ours."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(audio, "RETRY_BACKOFF_S", 0.02)


def _point_s3_at(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dummy")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_endpoint_is_transient_after_retries(monkeypatch, fast_retries):
    _point_s3_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(storage.TransientError, match=f"failed {audio.RETRY_ATTEMPTS} times"):
        audio.load_chunks("s3://bucket/track.flac")
    assert time.perf_counter() - start >= 0.02 * (2 ** (audio.RETRY_ATTEMPTS - 1) - 1)  # every backoff waited
    assert not issubclass(storage.TransientError, audio.AudioError)  # no per-track reason: the task fails
    with pytest.raises(storage.TransientError):
        chunking.decode_track("s3://bucket/track.flac")
    with pytest.raises(storage.TransientError):
        chunking.decode_batch(pa.table({"track_id": ["a"], "audio_uri": ["s3://bucket/track.flac"]}), "/")


class _S3Errors(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers each key with the status its name starts with (``403-…``, ``503-…``);
    ``ok-get-500-…`` answers HEAD with an object and every GET with 500. Requests are counted per path."""

    counts: Counter[str]

    def _answer(self, body: bool) -> None:
        self.counts[self.path] += 1
        key = self.path.rsplit("/", 1)[-1]
        if key.startswith("ok-") and self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            self.send_header("ETag", '"0"')
            self.end_headers()
            return
        status = 500 if key.startswith("ok-") else int(key.split("-")[0])
        code = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}[status]
        xml = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if body:
            self.wfile.write(xml)

    def do_HEAD(self):  # noqa: N802 (http.server's names)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def s3_errors(monkeypatch, fast_retries):
    """A real HTTP endpoint that fails the way S3 does; yields its per-path request counts."""
    _S3Errors.counts = Counter()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _S3Errors)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _point_s3_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield _S3Errors.counts
    server.shutdown()
    server.server_close()


def test_denied_object_is_forbidden_at_once(s3_errors):
    assert _reason("s3://bucket/403-denied.flac") == "forbidden"
    assert s3_errors["/bucket/403-denied.flac"] == 1  # not retried
    assert chunking.decode_track("s3://bucket/403-denied.flac") == (None, None, "forbidden")


def test_throttled_or_failing_storage_is_retried_then_transient(s3_errors):
    with pytest.raises(storage.TransientError, match="SlowDown|Service Unavailable|503"):
        audio.load_chunks("s3://bucket/503-busy.flac")
    assert s3_errors["/bucket/503-busy.flac"] == audio.RETRY_ATTEMPTS
    with pytest.raises(storage.TransientError):  # the object exists, but reading it keeps failing
        audio.load_chunks("s3://bucket/ok-get-500.flac")


def test_missing_s3_object_is_reported(s3_root):
    assert _reason(storage.join(s3_root, "no", "such.flac")) == "missing"
    assert "missing" in audio.RETRIED


# --------------------------------------------------------------------------- bad catalog rows


def test_bad_catalog_rows_become_error_rows(tmp_path):
    good = tmp_path / "good.flac"
    good.write_bytes(audio_files.encode(_tone(22050, 6.0, 1), 22050, "flac"))
    rows = pa.table(
        {
            "track_id": ["ok", "http", "no-bucket", "null", "empty", "host", None, "missing"],
            "audio_uri": [
                "good.flac",  # relative to the catalog's folder
                "http://example.com/a.mp3",
                "s3:///key.mp3",
                None,
                " ",
                f"file://otherhost{good}",
                "good.flac",
                "nope.flac",
            ],
        }
    )
    out = chunking.decode_batch(rows, str(tmp_path), max_chunks=4)
    assert out.column("track_id").to_pylist() == [
        "ok",
        "http",
        "no-bucket",
        "null",
        "empty",
        "host",
        "",
        "missing",
    ]
    assert out.column("error").to_pylist() == [
        None, "bad_uri", "bad_uri", "bad_uri", "bad_uri", "bad_uri", "bad_id", "missing"
    ]  # fmt: skip
    assert out.column("n_chunks").to_pylist()[0] == 2
    assert chunking.decode_track(f"file://localhost{good}")[2] is None
    numbers = chunking.decode_batch(pa.table({"track_id": [7], "audio_uri": [8]}), str(tmp_path))
    assert numbers.to_pylist()[0] | {"chunks": None} == {
        "track_id": "7", "chunks": None, "n_chunks": 0, "duration_s": None, "error": "bad_id"
    }  # fmt: skip
    numbers = chunking.decode_batch(pa.table({"track_id": ["t"], "audio_uri": [8]}), str(tmp_path))
    assert numbers.column("error").to_pylist() == ["bad_uri"]


# --------------------------------------------------------------------------- what a source may read


def test_playlists_and_concat_scripts_are_refused_unread(tmp_path):
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(audio_files.encode(_tone(22050, 3.0, 1), 22050, "mp3"))
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n#EXTINF:3.0,\n{secret}\n#EXT-X-ENDLIST\n"
    )
    concat = tmp_path / "list.ffconcat"
    concat.write_text(f"ffconcat version 1.0\nfile '{secret.name}'\n")
    for script in (playlist, concat):  # FFmpeg left to itself follows both to the other file
        with av.open(str(script), options={"safe": "0"} if script == concat else {}) as container:
            assert sum(f.samples for f in container.decode(audio=0)) > 0
        assert _reason(str(script)) == "unsupported"
        assert _reason(script.read_bytes()) in ("unsupported", "corrupt")  # from memory: nothing probed


def test_allowed_prefixes_confine_local_paths(tmp_path):
    music, private = tmp_path / "music", tmp_path / "private"
    music.mkdir()
    private.mkdir()
    data = audio_files.encode(_tone(22050, 6.0, 1), 22050, "flac")
    (music / "a.flac").write_bytes(data)
    (private / "b.flac").write_bytes(data)
    (music / "link.flac").symlink_to(private / "b.flac")
    allowed = (str(music),)
    chunks, _ = audio.load_chunks(str(music / "a.flac"), allowed_prefixes=allowed)
    assert len(chunks) == 2
    for outside in (
        private / "b.flac",
        music / "link.flac",
        f"{music}/../private/b.flac",
        tmp_path / "nope.flac",
    ):
        with pytest.raises(audio.AudioError) as err:
            audio.load_chunks(str(outside), allowed_prefixes=allowed)
        assert err.value.reason == "forbidden", outside
    assert audio.load_chunks(str(private / "b.flac"))[0].shape == chunks.shape  # None: no restriction
    rows = pa.table({"track_id": ["a", "b"], "audio_uri": ["music/a.flac", "private/b.flac"]})
    out = chunking.decode_batch(rows, str(tmp_path), allowed_prefixes=allowed)
    assert out.column("error").to_pylist() == [None, "forbidden"]


def test_allowed_prefixes_confine_s3_keys(s3_root):
    data = audio_files.encode(_tone(22050, 6.0, 1), 22050, "flac")
    for key in ("music/a.flac", "musicx/b.flac"):
        storage.write_bytes(storage.join(s3_root, key), data)
    allowed = (storage.join(s3_root, "music"),)
    assert len(audio.load_chunks(storage.join(s3_root, "music/a.flac"), allowed_prefixes=allowed)[0]) == 2
    with pytest.raises(audio.AudioError, match="forbidden"):
        audio.load_chunks(storage.join(s3_root, "musicx/b.flac"), allowed_prefixes=allowed)
