"""The benchmark corpora: the rendered one is deterministic per seed, its tags are true of its MIDI and
score, its tags are long-tailed; soundtracks are deduplicated by content; missing system packages are
named with the command that installs them."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import mido
import numpy as np
import pytest

from jobs import make_bench_corpus
from musiclib import audio, catalog
from musiclib.core.config import ConfigError
from musiclib.datasets import rendered, soundtracks, system_packages
from musiclib.datasets.audio_files import encode

SMALL_SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
STYLES = "essen_folk,bach_chorale,oneills_irish,ryans_fiddle"  # the quickest to parse
needs_fluidsynth = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not Path(SMALL_SOUNDFONT).exists(),
    reason="needs fluidsynth and timgm6mb-soundfont: make system-deps",
)


def _build(root: Path, seed: int, n_tracks: int = 4) -> list[dict]:
    rendered.make_catalog(
        str(root), n_tracks, seed, seconds=4.0, workers=1, soundfont=SMALL_SOUNDFONT, styles=STYLES.split(",")
    )
    return catalog.read(str(root / "catalog" / "tracks.parquet")).to_pylist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A 4-track corpus of 4 s tracks made by the job, seed 3."""
    if shutil.which("fluidsynth") is None or not Path(SMALL_SOUNDFONT).exists():
        pytest.skip("needs fluidsynth and timgm6mb-soundfont: make system-deps")
    root = tmp_path_factory.mktemp("bench")
    argv = ["--root", str(root), "--n-tracks", "4", "--seconds", "4", "--seed", "3", "--workers", "1"]
    make_bench_corpus.main([*argv, "--soundfont", SMALL_SOUNDFONT, "--styles", STYLES])
    return root, catalog.read(str(root / "catalog" / "tracks.parquet")).to_pylist()


@needs_fluidsynth
def test_same_seed_same_corpus_other_seed_another(corpus, tmp_path):
    root, rows = corpus
    again = _build(tmp_path / "again", seed=3)
    assert again == rows
    for row in rows:
        for column in ("midi_uri", "audio_uri"):
            first = (root / "catalog" / row[column]).read_bytes()
            assert (tmp_path / "again" / "catalog" / row[column]).read_bytes() == first, (
                row["track_id"],
                column,
            )
    other = _build(tmp_path / "other", seed=4)
    assert [r["score"] for r in other] != [r["score"] for r in rows]
    assert [(r["tags"], r["split"]) for r in other] != [(r["tags"], r["split"]) for r in rows]


@needs_fluidsynth
def test_job_validates_and_skips_a_finished_corpus(corpus, capsys):
    root, rows = corpus
    assert catalog.validate(str(root / "catalog" / "tracks.parquet")) == len(rows) == 4
    assert {r["split"] for r in rows} <= set(catalog.SPLITS)
    make_bench_corpus.main(
        ["--root", str(root), "--n-tracks", "4", "--seconds", "4", "--seed", "3", "--workers", "1"]
        + ["--soundfont", SMALL_SOUNDFONT, "--styles", STYLES]
    )
    assert "skipping generation" in capsys.readouterr().out


@needs_fluidsynth
def test_a_run_cut_short_resumes_without_rendering_again(corpus):
    root, rows = corpus
    audio_files = sorted((root / "catalog" / "audio").iterdir())
    stamps = [p.stat().st_mtime_ns for p in audio_files]
    (root / "catalog" / "tracks.parquet").unlink()  # as if killed before the catalog was written
    assert _build(root, seed=3) == rows
    assert [p.stat().st_mtime_ns for p in audio_files] == stamps


def _played(midi: mido.MidiFile) -> dict[int, int]:
    """channel: program, for every channel with a sounding note (read independently of midi_tags)."""
    programs, played = {}, {}
    for track in midi.tracks:
        for msg in track:
            if msg.type == "program_change":
                programs[msg.channel] = msg.program
            if msg.type == "note_on" and msg.velocity > 0:
                played.setdefault(msg.channel, programs.get(msg.channel, 0))
    return played


@needs_fluidsynth
def test_every_tag_is_true_of_the_midi_the_score_and_the_audio(corpus):
    from music21 import corpus as m21corpus

    root, rows = corpus
    for row in rows:
        tags = set(row["tags"])
        midi = mido.MidiFile(file=io.BytesIO((root / "catalog" / row["midi_uri"]).read_bytes()))
        played = _played(midi)
        melodic = {p for ch, p in played.items() if ch != rendered.DRUMS}
        # an instrument or family tag exactly when a channel plays that program
        assert {t for t in tags if t in rendered.INSTRUMENT.values()} == {
            rendered.INSTRUMENT[p] for p in melodic
        }
        assert {t for t in tags if t in rendered.FAMILY_WEIGHTS} == {rendered.FAMILY[p] for p in melodic}
        assert ("drums" in tags) == (rendered.DRUMS in played)
        assert rendered.ENSEMBLE.get(len(played), "large_ensemble") in tags
        # the meter tag is the score's written meter, and the MIDI's
        path, _, number = row["score"].partition("#")
        score = m21corpus.parse(str(rendered.corpus_dir() / path), number=int(number) if number else None)
        (ts,) = {(t.numerator, t.denominator) for t in score.recurse().getElementsByClass("TimeSignature")}
        assert [t for t in tags if t.startswith("meter_")] == [f"meter_{ts[0]}_{ts[1]}"]
        written = next(m for m in midi.tracks[0] if m.type == "time_signature")
        assert (written.numerator, written.denominator) == ts
        assert row["style"] in tags and row["score"] in rendered.works(row["style"])
        assert all(t in rendered.TAGS or t.startswith("meter_") for t in tags)
        assert len(tags & {"major", "minor"}) == 1 and len(tags & {"slow", "moderate", "fast"}) == 1
        x = audio.load(str(root / "catalog" / row["audio_uri"]))
        assert abs(len(x) / audio.SAMPLE_RATE - 4.0) < 0.1
        assert np.abs(x).max() > 0.1


def test_midi_tags_of_a_hand_written_file():
    """6/8 at 90 quarter notes a minute is 60 dotted beats a minute: slow; a flute an octave above
    middle C, a wet reverb send, drums: a duo."""
    conductor = mido.MidiTrack(
        [
            mido.MetaMessage("time_signature", numerator=6, denominator=8),
            mido.MetaMessage("key_signature", key="Em"),
            mido.MetaMessage("set_tempo", tempo=round(6e7 / 90)),
        ]
    )
    flute = mido.MidiTrack(
        [
            mido.Message("program_change", channel=0, program=73),
            mido.Message("control_change", channel=0, control=91, value=100),
        ]
    )
    for k in range(8):
        flute += [
            mido.Message("note_on", channel=0, note=72 + k % 3, velocity=90, time=0),
            mido.Message("note_off", channel=0, note=72 + k % 3, time=240),
        ]
    drums = mido.MidiTrack(
        [
            mido.Message("note_on", channel=9, note=36, velocity=90),
            mido.Message("note_off", channel=9, note=36, time=60),
        ]
    )
    midi = mido.MidiFile(type=1, ticks_per_beat=480, tracks=[conductor, flute, drums])
    assert rendered.midi_tags(midi, "essen_folk") == sorted(
        ["essen_folk", "meter_6_8", "minor", "flute", "pipe_family", "drums", "duo", "slow"]
        + ["register_high", "monophonic", "reverb"]
    )


def test_texture_from_notes():
    line = [(0, 480, 0, 60), (480, 960, 0, 62)]
    chords = [(t, t + 480, ch, 60 + ch) for t in (0, 480, 960) for ch in range(3)]
    lines = [(0, 960, 0, 60), (240, 600, 1, 67), (600, 960, 1, 65), (960, 1200, 0, 59)]
    assert rendered.texture(line) == "monophonic"
    assert rendered.texture(chords) == "homophonic"
    assert rendered.texture(lines) == "polyphonic"


def test_tags_are_long_tailed():
    """Style and instrument tags over 2,000 drawn tracks: a few head tags on many, most on few."""
    specs = rendered.sample_tracks(2000, seed=0)
    counts = Counter(s.style for s in specs)
    rng = np.random.default_rng(0)
    for s in specs:  # folk collections are single lines; the rest mostly four or five parts
        n_parts = 1 if s.style in ("essen_folk", "oneills_irish", "ryans_fiddle") else int(rng.integers(2, 6))
        programs = rendered.draw_programs(n_parts, rng)
        counts.update({rendered.INSTRUMENT[p] for p in programs} | {rendered.FAMILY[p] for p in programs})
    n = np.array(sorted(counts.values(), reverse=True))
    assert len(n) >= 60
    head = n[: len(n) // 5]
    assert head.sum() >= 0.55 * n.sum()  # the top fifth of tags holds most tag assignments
    assert np.median(n) <= n[0] / 8  # the typical tag is on far fewer tracks than the largest
    assert (n < 0.01 * len(specs)).sum() >= len(n) // 6  # a sixth of tags on under 1 % of tracks


def test_bad_config_is_one_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="--kind must be rendered or soundtracks, got 'midi'"):
        make_bench_corpus.main(["--root", str(tmp_path / "x"), "--kind", "midi"])
    with pytest.raises(ConfigError, match="unknown jazz"):
        make_bench_corpus.main(["--root", str(tmp_path / "x"), "--styles", "jazz"])
    assert not (tmp_path / "x").exists()


def test_soundtracks_deduplicated_by_content_and_split_per_tag(tmp_path):
    t = np.arange(int(2.0 * 22050)) / 22050
    song = encode(0.3 * np.sin(2 * np.pi * 220 * t), 22050, "ogg")
    other = encode(0.3 * np.sin(2 * np.pi * 330 * t), 22050, "mp3")
    short = encode(0.3 * np.sin(2 * np.pi * 440 * t[:5000]), 22050, "wav")
    files = {}
    for name, data in {
        "a/1.ogg": song,
        "a/copy.ogg": song,
        "b/1.ogg": song,
        "b/2.mp3": other,
        "b/3.wav": short,
    }.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        files.setdefault(name[0], []).append(path)
    files["b"].append(tmp_path / "b" / "bad.ogg")
    (tmp_path / "b" / "bad.ogg").write_bytes(b"not audio at all" * 100)
    rows, skipped = soundtracks.collect(files, min_seconds=1.0)
    assert [(r["tags"], Path(r["source_path"]).name) for r in rows] == [(["a"], "1.ogg"), (["b"], "2.mp3")]
    assert len({r["sha256"] for r in rows}) == len(rows)
    assert skipped == Counter(duplicate=2, too_short=1, corrupt=1)
    many = [{"soundtrack": tag} for tag in "aaaaaaaaaabbbbbbbbbbbbbbbbbbbb"]
    soundtracks.deal_splits(many, seed=0)
    splits = Counter((r["soundtrack"], r["split"]) for r in many)
    assert splits == Counter(
        {("a", "train"): 7, ("a", "valid"): 2, ("a", "test"): 1}
        | {("b", "train"): 14, ("b", "valid"): 3, ("b", "test"): 3}
    )
    again = [{"soundtrack": r["soundtrack"]} for r in many]
    soundtracks.deal_splits(again, seed=0)
    assert again == many


def test_missing_system_package_is_named_with_the_command():
    assert system_packages.missing(["coreutils", "musiclib-no-such-package"]) == ["musiclib-no-such-package"]
    assert system_packages.require(["coreutils"], install=False) == []
    with pytest.raises(system_packages.SystemPackageError) as info:
        system_packages.require(["coreutils", "musiclib-no-such-package"], install=False)
    message = str(info.value)
    assert (
        "musiclib-no-such-package" in message and "apt-get install" in message and "coreutils" not in message
    )
    with pytest.raises(SystemExit) as exit_info:  # as root: apt cannot find it; else: needs root
        system_packages.main(["musiclib-no-such-package"])
    text = str(exit_info.value)
    assert text.startswith("error: ") and "musiclib-no-such-package" in text and "apt-get install" in text
