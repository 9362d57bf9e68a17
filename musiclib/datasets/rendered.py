"""The rendered benchmark corpus: real scores arranged for General MIDI instruments and rendered by FluidSynth.

A track is made in four steps, all seeded by ``(seed, track index)``:

1. ``sample_tracks`` picks a source collection (its style tag) with long-tailed weights and a few
   candidate works from music21's bundled corpus (Bach chorales, Essen and O'Neill's folk tunes, Ryan's
   fiddle tunes, Palestrina, Monteverdi madrigals, classical string quartets, trecento songs); the first
   candidate that parses with one written meter is used (``load_score``).
2. ``arrange`` writes a MIDI file: each part on its own channel with a sampled GM program (families and
   programs long-tailed), a transposition, a tempo (with drift and sometimes a step change), mixing
   levels, reverb and chorus sends, the score looped to the track's length; a single-line tune may
   be doubled an octave below, and folk collections often get a generated drum part.
3. ``midi_tags`` derives the tags from what the MIDI file holds: instruments and families played,
   ensemble size, meter, mode, tempo class, register, texture, drums, reverb; plus the style.
4. ``synthesize`` renders the MIDI with the ``fluidsynth`` program and a GM soundfont; the audio is
   trimmed to the track's length, faded, levelled and stored as Opus.

``make_catalog`` does this in a process pool and writes ``<root>/catalog/tracks.parquet`` with
``audio/<id>.opus`` and ``midi/<id>.mid`` beside it. Splits are dealt per work, so arrangements of one
score never straddle train and test. The same arguments give the same MIDI bytes and the same audio.
Counts and rates: ``docs/CORPUS.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import multiprocessing
import re
import subprocess
import tempfile
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mido
import numpy as np
import pyarrow as pa
import soundfile

from musiclib import catalog
from musiclib.core import progress, storage
from musiclib.core.config import DEFAULT_ROOT, Layout, check
from musiclib.datasets import system_packages
from musiclib.datasets.audio_files import encode
from musiclib.datasets.demo import SPLIT_SHARES

SR = 24000  # FluidSynth's output rate: one Opus accepts (the decoder resamples to 22,050 Hz)
SOUNDFONTS = {  # path: the Debian package that holds it
    "/usr/share/sounds/sf2/FluidR3_GM.sf2": "fluid-soundfont-gm",  # 142 MB, the corpus's
    "/usr/share/sounds/sf2/TimGM6mb.sf2": "timgm6mb-soundfont",  # 6 MB, the tests'
}
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
TICKS = 480  # MIDI ticks per quarter note
DRUMS = 9  # the GM percussion channel
BITRATE = 48_000  # mono Opus


@dataclasses.dataclass(frozen=True)
class Collection:
    """Where a style's works are in music21's corpus, how often it is drawn, and its chance of drums."""

    folders: tuple[str, ...]
    suffixes: tuple[str, ...]
    weight: float
    p_drums: float = 0.0
    exclude: tuple[str, ...] = ()


COLLECTIONS = {  # style tag: collection
    "essen_folk": Collection(("essenFolksong",), (".abc",), 0.30, p_drums=0.3),
    "bach_chorale": Collection(("bach",), (".mxl", ".xml"), 0.20, p_drums=0.05),
    "oneills_irish": Collection(("oneills1850",), (".abc",), 0.16, p_drums=0.3),
    "ryans_fiddle": Collection(("ryansMammoth",), (".abc",), 0.14, p_drums=0.3),
    "palestrina": Collection(("palestrina",), (".krn",), 0.09),
    "monteverdi_madrigal": Collection(("monteverdi",), (".mxl",), 0.05),
    "string_quartet": Collection(("haydn", "mozart", "beethoven"), (".mxl",), 0.04, exclude=("k545",)),
    "trecento": Collection(("trecento",), (".mxl", ".xml"), 0.02),
}

# GM families (tag: weight) and the programs drawn in each (program: tag), most likely first (Zipf, 1 / rank^1.5).
FAMILY_WEIGHTS = {
    "piano_family": 0.26,
    "strings_family": 0.18,
    "organ_family": 0.10,
    "reed_family": 0.10,
    "pipe_family": 0.09,
    "guitar_family": 0.07,
    "brass_family": 0.06,
    "ensemble_family": 0.05,
    "chromatic_percussion_family": 0.03,
    "ethnic_family": 0.015,
    "bass_family": 0.01,
    "synth_lead_family": 0.006,
    "synth_pad_family": 0.006,
}
PROGRAMS = {
    "piano_family": {0: "acoustic_grand_piano", 6: "harpsichord", 4: "electric_piano", 1: "bright_piano"},
    "strings_family": {
        40: "violin",
        42: "cello",
        41: "viola",
        46: "harp",
        45: "pizzicato_strings",
        43: "contrabass",
    },
    "organ_family": {19: "church_organ", 21: "accordion", 16: "drawbar_organ", 22: "harmonica"},
    "reed_family": {
        71: "clarinet",
        68: "oboe",
        70: "bassoon",
        65: "alto_sax",
        66: "tenor_sax",
        64: "soprano_sax",
    },
    "pipe_family": {73: "flute", 74: "recorder", 72: "piccolo", 75: "pan_flute", 78: "whistle"},
    "guitar_family": {24: "nylon_guitar", 25: "steel_guitar", 26: "jazz_guitar", 27: "clean_electric_guitar"},
    "brass_family": {56: "trumpet", 60: "french_horn", 57: "trombone", 58: "tuba", 61: "brass_section"},
    "ensemble_family": {48: "string_ensemble", 52: "choir_aahs", 50: "synth_strings"},
    "chromatic_percussion_family": {
        11: "vibraphone",
        12: "marimba",
        8: "celesta",
        9: "glockenspiel",
        13: "xylophone",
    },
    "ethnic_family": {110: "fiddle", 105: "banjo", 109: "bagpipe", 104: "sitar"},
    "bass_family": {32: "acoustic_bass", 33: "electric_bass", 35: "fretless_bass"},
    "synth_lead_family": {80: "square_lead", 81: "saw_lead"},
    "synth_pad_family": {89: "warm_pad", 88: "new_age_pad"},
}
INSTRUMENT = {program: name for family in PROGRAMS.values() for program, name in family.items()}
FAMILY = {program: family for family, programs in PROGRAMS.items() for program in programs}
ENSEMBLE = {1: "solo", 2: "duo", 3: "trio", 4: "quartet"}  # more players: "large_ensemble"
TEMPO_CLASSES = ((76.0, "slow"), (120.0, "moderate"), (math.inf, "fast"))  # beats per minute below each
REGISTERS = ((58.0, "register_low"), (70.0, "register_high"))  # mean MIDI pitch below / above
REVERB_TAG_SEND = 90  # a reverb send (CC 91) at or above this makes a track "reverb"
MAX_PARTS = 8
DRUM_KITS = (0, 8, 40, 48)  # standard, room, brush, orchestra
TAGS: tuple[str, ...] = (
    *COLLECTIONS,
    *FAMILY_WEIGHTS,
    *INSTRUMENT.values(),
    *ENSEMBLE.values(),
    "large_ensemble",
    *(name for _, name in TEMPO_CLASSES),
    *(name for _, name in REGISTERS),
    "major",
    "minor",
    "monophonic",
    "homophonic",
    "polyphonic",
    "drums",
    "reverb",
)  # plus one "meter_<n>_<d>" tag per meter found


@dataclasses.dataclass
class BenchCorpusConfig:
    """Write a benchmark corpus: tracks rendered from scores (``rendered``) or Debian game soundtracks."""

    root: str = "data/bench-rendered"
    kind: str = "rendered"  # rendered | soundtracks
    n_tracks: int = 2000  # rendered only
    seconds: float = 30.0  # rendered: each track's length; soundtracks: the shortest file kept
    seed: int = 0  # rendered: the scores, instruments and splits drawn
    workers: int = 2  # processes rendering; does not change the result
    soundfont: str = SOUNDFONT  # rendered: the General MIDI soundfont FluidSynth plays
    styles: list[str] = dataclasses.field(
        default_factory=list
    )  # rendered: only these collections (empty: all)

    def validate(self) -> None:
        problems = []
        if unknown := sorted(set(self.styles) - set(COLLECTIONS)):
            problems.append(f"--styles: unknown {', '.join(unknown)}; known: {', '.join(COLLECTIONS)}")
        if self.kind not in ("rendered", "soundtracks"):
            problems.append(f"--kind must be rendered or soundtracks, got {self.kind!r}")
        if self.n_tracks < 1:
            problems.append(f"--n-tracks must be at least 1, got {self.n_tracks}")
        if not 1 <= self.seconds <= 600:
            problems.append(f"--seconds must be in [1, 600], got {self.seconds}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if self.soundfont not in SOUNDFONTS and not Path(self.soundfont).is_file():
            problems.append(f"--soundfont {self.soundfont!r} is not a file")
        check("bench corpus", problems)


@dataclasses.dataclass(frozen=True)
class TrackSpec:
    """A track before its score is read: the style, candidate works in order, and its length."""

    index: int
    seed: int
    style: str
    candidates: tuple[str, ...]
    seconds: float

    @property
    def track_id(self) -> str:
        return f"r{self.index + 1:05d}"

    @property
    def audio_path(self) -> str:
        return f"audio/{self.track_id}.opus"

    @property
    def midi_path(self) -> str:
        return f"midi/{self.track_id}.mid"


@dataclasses.dataclass(frozen=True)
class Score:
    """What a track needs from a score: notes per part, its one meter, its key, its length."""

    ref: str
    parts: tuple[
        tuple[tuple[float, float, int], ...], ...
    ]  # per part: (onset, length in quarters, MIDI pitch)
    meter: tuple[int, int]
    length: float  # quarter notes from the start to the last release
    tonic: int  # pitch class
    mode: str  # major | minor (music21's key analysis)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# --------------------------------------------------------------------------- scores


def corpus_dir() -> Path:
    """music21's bundled corpus folder (part of the installed package: nothing is downloaded)."""
    from music21 import common

    return Path(common.getCorpusFilePath())


@functools.cache
def works(style: str) -> tuple[str, ...]:
    """The style's work references, sorted: ``folder/file.ext``, or ``folder/file.abc#N`` for tune N."""
    coll, root = COLLECTIONS[style], corpus_dir()
    refs: list[str] = []
    for folder in coll.folders:
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.suffix not in coll.suffixes or any(x in rel for x in coll.exclude):
                continue
            if path.suffix == ".abc":
                numbers = re.findall(r"^X:\s*(\d+)", path.read_text(errors="replace"), re.M)
                refs += [f"{rel}#{n}" for n in dict.fromkeys(numbers)]
            else:
                refs.append(rel)
    return tuple(refs)


def beat_quarters(meter: tuple[int, int]) -> float:
    """Quarter notes per beat: a dotted beat in compound meters (6/8, 9/8, 12/8), else the denominator."""
    num, den = meter
    return 4 / den * (3 if den >= 8 and num % 3 == 0 and num > 3 else 1)


@functools.lru_cache(maxsize=16)
def load_score(ref: str) -> Score | None:
    """Parse a work with music21; None when it has no notes, no written meter, or changes meter."""
    from music21 import corpus

    path, _, number = ref.partition("#")
    try:
        parsed = corpus.parse(str(corpus_dir() / path), number=int(number) if number else None)
    except Exception:  # music21 raises many kinds of errors on the corpus's odder files
        return None
    meters = {(ts.numerator, ts.denominator) for ts in parsed.recurse().getElementsByClass("TimeSignature")}
    if len(meters) != 1:
        return None
    parts = []
    for part in parsed.parts or [parsed]:
        notes = tuple(
            (float(n.offset), float(n.quarterLength), int(p.midi))
            for n in part.stripTies().flatten().notes
            if not n.duration.isGrace and n.quarterLength > 0
            for p in n.pitches
        )
        if notes:
            parts.append(notes)
    if sum(len(p) for p in parts) < 16:
        return None
    key = parsed.analyze("key")
    (meter,) = meters
    length = max(o + d for p in parts for o, d, _ in p)
    return Score(ref, tuple(parts[:MAX_PARTS]), meter, length, key.tonic.pitchClass, key.mode)


def first_score(spec: TrackSpec) -> Score:
    """The first usable candidate work of a track."""
    for ref in spec.candidates:
        if (score := load_score(ref)) is not None:
            return score
    raise ValueError(f"track {spec.track_id}: none of its {len(spec.candidates)} candidate works is usable")


def sample_tracks(
    n_tracks: int, seed: int = 0, seconds: float = 30.0, styles: Sequence[str] | None = None
) -> list[TrackSpec]:
    """Describe ``n_tracks`` tracks: a style drawn by ``COLLECTIONS`` weight and 6 candidate works each."""
    names = list(styles or COLLECTIONS)
    unknown = sorted(set(names) - set(COLLECTIONS))
    if unknown:
        raise ValueError(f"unknown style(s) {', '.join(unknown)}; known: {', '.join(COLLECTIONS)}")
    weights = np.array([COLLECTIONS[s].weight for s in names])
    specs = []
    for i in range(n_tracks):
        rng = _rng(seed, 0, i)
        style = names[rng.choice(len(names), p=weights / weights.sum())]
        pool = works(style)
        picks = rng.choice(len(pool), size=min(6, len(pool)), replace=False)
        specs.append(TrackSpec(i, seed, style, tuple(pool[k] for k in picks), seconds))
    return specs


def split_of(ref: str, seed: int) -> str:
    """A work's split, drawn once per work (every arrangement of a score lands in the same split)."""
    u = _rng(seed, 1, zlib.crc32(ref.encode())).random()
    edges = np.cumsum([share for _, share in SPLIT_SHARES])
    return SPLIT_SHARES[int(np.searchsorted(edges, u, side="right"))][0]


# --------------------------------------------------------------------------- arrangement


def draw_programs(n_parts: int, rng: np.random.Generator) -> list[int]:
    """GM programs for ``n_parts`` parts: a third of tracks keep one family (a consort), the rest mix."""
    families = list(FAMILY_WEIGHTS)
    fw = np.array(list(FAMILY_WEIGHTS.values()))
    consort = rng.random() < 1 / 3
    family = families[rng.choice(len(families), p=fw / fw.sum())]
    programs = []
    for _ in range(n_parts):
        if not consort:
            family = families[rng.choice(len(families), p=fw / fw.sum())]
        options = list(PROGRAMS[family])
        zipf = np.arange(1, len(options) + 1) ** -1.5
        programs.append(options[rng.choice(len(options), p=zipf / zipf.sum())])
    return programs


def _key_name(tonic: int, mode: str) -> str:
    names = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
    minor = ("Cm", "C#m", "Dm", "Ebm", "Em", "Fm", "F#m", "Gm", "G#m", "Am", "Bbm", "Bm")
    return (minor if mode == "minor" else names)[tonic % 12]


def _tempo_map(
    bpm: float, bar_q: float, seconds: float, rng: np.random.Generator
) -> tuple[list[float], float]:
    """Quarter notes per minute of each bar (a slow drift, sometimes one step change) and the track's
    length in quarter notes."""
    step_bar = int(rng.integers(4, 16)) if rng.random() < 0.15 else -1
    step = float(np.exp(rng.uniform(-0.3, 0.3)))
    qpms, elapsed, drift = [], 0.0, 0.0
    while True:
        drift = float(np.clip(drift + rng.normal(0, 0.015), -0.1, 0.1))
        qpm = bpm * np.exp(drift) * (step if 0 <= step_bar <= len(qpms) else 1.0)
        bar_s = bar_q * 60 / qpm
        if elapsed + bar_s >= seconds:
            qpms.append(qpm)
            return qpms, len(qpms[:-1]) * bar_q + (seconds - elapsed) / bar_s * bar_q
        qpms.append(qpm)
        elapsed += bar_s


def arrange(score: Score, spec: TrackSpec) -> mido.MidiFile:
    """A GM arrangement of ``score`` for ``spec``: the MIDI file that is rendered and tagged."""
    rng = _rng(spec.seed, 2, spec.index)
    parts = [list(p) for p in score.parts]
    if len(parts) == 1 and rng.random() < 0.3:  # a second player doubles the tune an octave below
        parts.append([(o, d, p - 12) for o, d, p in parts[0]])
    transpose = int(rng.integers(-5, 7))
    programs = draw_programs(len(parts), rng)
    bpm = float(np.clip(rng.lognormal(np.log(96), 0.3), 44, 200))
    bar_q = score.meter[0] * 4 / score.meter[1]
    qpms, total_q = _tempo_map(bpm * beat_quarters(score.meter), bar_q, spec.seconds, rng)
    reverb = int(rng.integers(REVERB_TAG_SEND, 128)) if rng.random() < 0.2 else int(rng.integers(0, 60))
    first_bar = math.floor(min(o for p in parts for o, _, _ in p) / bar_q) * bar_q
    period = score.length - first_bar
    loops = math.ceil(total_q / period)

    def ticks(q: float) -> int:
        return round(q * TICKS)

    conductor = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name=score.ref),
            mido.MetaMessage("time_signature", numerator=score.meter[0], denominator=score.meter[1]),
            mido.MetaMessage("key_signature", key=_key_name(score.tonic + transpose, score.mode)),
        ]
    )
    events: list[tuple[int, int, mido.Message]] = [
        (ticks(b * bar_q), 0, mido.MetaMessage("set_tempo", tempo=round(6e7 / q))) for b, q in enumerate(qpms)
    ]
    conductor += _delta(events)
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS, tracks=[conductor])
    for channel, (notes, program) in enumerate(zip(parts, programs)):
        shift = transpose + 12 * (
            (transpose + min(p for _, _, p in notes) < 24) - (transpose + max(p for _, _, p in notes) > 100)
        )
        level = rng.uniform(0.55, 1.0)
        events = [
            (0, 0, mido.Message("program_change", channel=channel, program=program)),
            *_controls(channel, rng, reverb),
        ]
        for loop in range(loops):
            for onset, length, pitch in notes:
                start = loop * period + onset - first_bar
                if start >= total_q:
                    continue
                accent = 1.1 if (start % bar_q) < 1e-6 else 1.0
                velocity = int(np.clip(round(100 * level * accent + rng.normal(0, 6)), 20, 127))
                end = min(start + length, total_q)
                events += _note(
                    channel, pitch + shift, velocity, ticks(start), max(ticks(end) - 1, ticks(start) + 1)
                )
        midi.tracks.append(mido.MidiTrack(_delta(events)))
    if rng.random() < COLLECTIONS[spec.style].p_drums:
        midi.tracks.append(mido.MidiTrack(_delta(_drum_events(score.meter, total_q, rng, reverb))))
    return midi


def _note(channel: int, note: int, velocity: int, on: int, off: int) -> list[tuple[int, int, mido.Message]]:
    """A note as its two events: ``(tick, order, message)``, a note-off sorting before a note-on."""
    return [
        (on, 1, mido.Message("note_on", channel=channel, note=note, velocity=velocity)),
        (off, 0, mido.Message("note_off", channel=channel, note=note)),
    ]


def _controls(channel: int, rng: np.random.Generator, reverb: int) -> list[tuple[int, int, mido.Message]]:
    """Mixing: volume, reverb and chorus sends of one channel."""
    values = {7: int(rng.integers(70, 128)), 91: reverb, 93: int(rng.integers(0, 40))}
    return [
        (0, 0, mido.Message("control_change", channel=channel, control=c, value=v)) for c, v in values.items()
    ]


def _drum_events(meter: tuple[int, int], total_q: float, rng: np.random.Generator, reverb: int) -> list:
    """A generated kit part in the meter: kick on the first (and middle) beat, snare on the others,
    hi-hat on every subdivision."""
    beat_q = beat_quarters(meter)
    n_beats = round(meter[0] * 4 / meter[1] / beat_q)
    sub_q = beat_q / (3 if beat_q == 1.5 else 2)
    level = rng.uniform(0.5, 0.9)
    events = [(0, 0, mido.Message("program_change", channel=DRUMS, program=int(rng.choice(DRUM_KITS))))]
    events += _controls(DRUMS, rng, reverb)
    bar_q, bar = n_beats * beat_q, 0.0
    while bar < total_q:
        hits = [(bar + k * sub_q, 42, 0.6) for k in range(round(bar_q / sub_q))]
        hits += [(bar + b * beat_q, 36 if b == 0 or 2 * b == n_beats else 38, 1.0) for b in range(n_beats)]
        for start, note, accent in hits:
            if start < total_q:
                velocity = int(np.clip(round(110 * level * accent + rng.normal(0, 5)), 20, 127))
                tick = round(start * TICKS)
                events += _note(DRUMS, note, velocity, tick, tick + TICKS // 8)
        bar += bar_q
    return events


def _delta(events: list[tuple[int, int, mido.Message]]) -> list[mido.Message]:
    """Absolute-tick events to delta times; at one tick, note-offs (order 0) come before note-ons."""
    out, now = [], 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
        out.append(message.copy(time=tick - now))
        now = tick
    return out


def midi_bytes(midi: mido.MidiFile) -> bytes:
    buf = io.BytesIO()
    midi.save(file=buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- tags


def midi_tags(midi: mido.MidiFile, style: str) -> list[str]:
    """The tags a listener can hear, read from the MIDI file alone (the style comes from the source)."""
    meter, key, tempos = None, None, []
    programs: dict[int, int] = {}
    played: dict[int, int] = {}  # channel: its program at its first note
    notes: list[tuple[int, int, int, int]] = []  # (start tick, end tick, channel, pitch)
    sends: list[int] = []
    for track in midi.tracks:
        tick, open_notes = 0, {}
        for msg in track:
            tick += msg.time
            if msg.type == "time_signature" and meter is None:
                meter = (msg.numerator, msg.denominator)
            elif msg.type == "key_signature" and key is None:
                key = msg.key
            elif msg.type == "set_tempo":
                tempos.append((tick, msg.tempo))
            elif msg.type == "program_change":
                programs[msg.channel] = msg.program
            elif msg.type == "control_change" and msg.control == 91:
                sends.append(msg.value)
            elif msg.type == "note_on" and msg.velocity > 0:
                played.setdefault(msg.channel, programs.get(msg.channel, 0))
                open_notes[(msg.channel, msg.note)] = tick
            elif msg.type in ("note_off", "note_on") and (msg.channel, msg.note) in open_notes:
                notes.append((open_notes.pop((msg.channel, msg.note)), tick, msg.channel, msg.note))
    if meter is None or key is None or not tempos or not notes:
        raise ValueError("MIDI file lacks a time signature, key signature, tempo or notes")
    tags = {style, f"meter_{meter[0]}_{meter[1]}", "minor" if key.endswith("m") else "major"}
    for channel, program in played.items():
        tags |= {"drums"} if channel == DRUMS else {INSTRUMENT[program], FAMILY[program]}
    tags.add(ENSEMBLE.get(len(played), "large_ensemble"))
    end = max(e for _, e, _, _ in notes)
    marks = [t for t, _ in tempos] + [end]
    qpm = sum((b - a) * 6e7 / tempo for (a, tempo), b in zip(tempos, marks[1:]) if b > a) / max(
        end - tempos[0][0], 1
    )
    bpm = qpm / beat_quarters(meter)
    tags.add(next(name for limit, name in TEMPO_CLASSES if bpm < limit))
    melodic = [n for n in notes if n[2] != DRUMS]
    mean_pitch = float(np.mean([p for *_, p in melodic]))
    if mean_pitch < REGISTERS[0][0]:
        tags.add(REGISTERS[0][1])
    elif mean_pitch > REGISTERS[1][0]:
        tags.add(REGISTERS[1][1])
    tags.add(texture(melodic))
    if sends and max(sends) >= REVERB_TAG_SEND:
        tags.add("reverb")
    return sorted(tags)


def texture(notes: list[tuple[int, int, int, int]]) -> str:
    """monophonic (one line, never two notes at once), homophonic (voices mostly move together: on
    average at least 60 % of the channels start a note at each onset, as in a chorale or a doubled tune)
    or polyphonic (independent lines). ``notes`` are ``(start, end, channel, pitch)``."""
    edges = sorted([(s, 1) for s, _, _, _ in notes] + [(e, -1) for _, e, _, _ in notes])
    if np.cumsum([d for _, d in edges]).max() <= 1:
        return "monophonic"
    per_onset = np.unique([s for s, _, _, _ in notes], return_counts=True)[1]
    channels = len({c for _, _, c, _ in notes})
    return "homophonic" if per_onset.mean() / channels >= 0.6 else "polyphonic"


# --------------------------------------------------------------------------- audio


def synthesize(midi: bytes, soundfont: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Render MIDI bytes with the ``fluidsynth`` program: mono float32 ``[seconds * SR]`` (the decoder
    down-mixes anyway), faded out at the end and levelled to a drawn peak; room size and damping are drawn."""
    with tempfile.TemporaryDirectory(prefix="musiclib-render-") as tmp:
        mid, wav = Path(tmp, "in.mid"), Path(tmp, "out.wav")
        mid.write_bytes(midi)
        settings = {
            "audio.file.format": "float",
            "synth.reverb.room-size": f"{rng.uniform(0.2, 0.9):.3f}",
            "synth.reverb.damp": f"{rng.uniform(0.0, 0.6):.3f}",
        }
        options = [arg for k, v in settings.items() for arg in ("-o", f"{k}={v}")]
        command = ["fluidsynth", "-ni", "-q", "-r", str(SR), *options, "-F", str(wav), soundfont, str(mid)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wav.exists():
            raise RuntimeError(f"fluidsynth failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        x = soundfile.read(wav, dtype="float32", always_2d=True)[0].mean(axis=1)
    n = round(seconds * SR)
    x = np.pad(x[:n], (0, max(0, n - len(x))))
    fade = min(n, SR // 2)
    x[n - fade :] *= np.linspace(1, 0, fade, dtype=np.float32)
    return (x * (rng.uniform(0.3, 0.95) / max(float(np.abs(x).max()), 1e-9))).astype(np.float32)


def make_track(spec: TrackSpec, folder: str, soundfont: str) -> dict:
    """Arrange, render and store one track (MIDI written last); return its catalog row.

    A track whose MIDI and audio are both stored is not rendered again: its row comes from its MIDI.
    """
    midi_uri, audio_uri = storage.join(folder, spec.midi_path), storage.join(folder, spec.audio_path)
    if storage.exists(midi_uri) and storage.exists(audio_uri):
        data = storage.read_bytes(midi_uri)
    else:
        score = first_score(spec)
        data = midi_bytes(arrange(score, spec))
        audio = synthesize(data, soundfont, spec.seconds, _rng(spec.seed, 3, spec.index))
        storage.write_bytes(audio_uri, encode(audio, SR, "opus", bitrate=BITRATE))
        storage.write_bytes(midi_uri, data)
    midi = mido.MidiFile(file=io.BytesIO(data))
    ref = next(m.name for m in midi.tracks[0] if m.type == "track_name")
    tags = midi_tags(midi, spec.style)
    programs = sorted(
        {m.program for t in midi.tracks[1:] for m in t if m.type == "program_change" and m.channel != DRUMS}
    )
    return {
        "track_id": spec.track_id,
        "audio_uri": spec.audio_path,
        "duration_s": spec.seconds,
        "tags": tags,
        "split": split_of(ref, spec.seed),
        "true_tags": tags,
        "style": spec.style,
        "score": ref,
        "midi_uri": spec.midi_path,
        "programs": programs,
    }


def _make_track(args: tuple[TrackSpec, str, str]) -> dict:
    return make_track(*args)


def make_catalog(
    root: str = DEFAULT_ROOT,
    n_tracks: int = 2000,
    seed: int = 0,
    seconds: float = 30.0,
    workers: int = 2,
    soundfont: str = SOUNDFONT,
    styles: Sequence[str] | None = None,
    install: bool = True,
) -> str:
    """Render the corpus under ``<root>/catalog`` (resuming tracks already stored) and return its URI.

    FluidSynth and a known soundfont's package are installed first when missing (``install``, as root).
    """
    system_packages.require(
        ["fluidsynth", *([SOUNDFONTS[soundfont]] if soundfont in SOUNDFONTS else [])], install=install
    )
    specs = sample_tracks(n_tracks, seed, seconds, styles)
    uri = Layout(root).catalog
    folder = storage.parent(uri)
    jobs = [(s, folder, soundfont) for s in specs]
    rows, started, throttle = [], time.monotonic(), progress.Throttle()
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(_make_track, jobs)
        else:  # spawn: forking a process that runs threads (S3 clients) can deadlock
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            results = pool.map(_make_track, jobs, chunksize=4)
        for row in results:
            rows.append(row)
            if throttle.due(final=len(rows) == len(jobs)):
                rate = len(rows) / max(time.monotonic() - started, 1e-9)
                print(
                    progress.progress_line("bench-corpus", len(rows), len(jobs), "tracks", rate), flush=True
                )
    rows.sort(key=lambda r: r["track_id"])
    table = pa.Table.from_pylist(rows)
    catalog.write(table, uri)
    return uri
