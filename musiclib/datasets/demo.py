"""The demo catalog: procedurally synthesised music whose tags can be heard, in a mix of audio formats.

A track is made in two steps. ``sample_tracks`` draws its description, cheaply and seeded: instruments,
mode, tempo, meter, texture and effects (its true tags), its split, whether it is labeled, and its file
format, sample rate and channels. ``render`` synthesises that description with numpy at 22050 Hz: a
chord progression in a major or minor key, a melody on the lead instrument, accompaniment in each other
instrument's idiom, a bass line and a drum kit, all accented by the meter. Tags follow a long tail: a
few (drums, major, piano) are on about half the tracks, a few (bell, flute, reverb, lofi) on about 5 %.

``make_catalog`` renders and encodes the tracks in a process pool and writes them through
``musiclib.core.storage``, so the root may be a local folder or ``s3://bucket/prefix``. With ``faults=True`` it
adds one track per decoder failure; its ``fault`` column names the reason ``musiclib.audio`` reports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa

from musiclib import catalog
from musiclib.core import storage
from musiclib.core.config import DEFAULT_ROOT, Layout, check
from musiclib.datasets.audio_files import encode

SR = 22050  # synthesis rate; 44100 Hz files are upsampled from it
FORMATS = ("flac", "ogg", "mp3", "wav")
SAMPLE_RATES = (22050, 44100)
SPLIT_SHARES = (("train", 0.70), ("valid", 0.15), ("test", 0.15))

# Melodic instruments: (weight as the lead, which plays the melody; chance to join as accompaniment).
INSTRUMENTS = {
    "piano": (0.37, 0.22),
    "guitar": (0.24, 0.10),
    "organ": (0.14, 0.06),
    "strings": (0.14, 0.05),
    "flute": (0.06, 0.0),
    "bell": (0.05, 0.0),
}
# Tags drawn independently, and families of exclusive tags (the untagged rest is the ordinary case).
INDEPENDENT = {"drums": 0.55, "bass": 0.45, "reverb": 0.07, "lofi": 0.04}
FAMILIES = {
    "mode": {"major": 0.55, "minor": 0.45},
    "tempo": {"slow": 0.25, "fast": 0.18},
    "meter": {"three_four": 0.20},
    "texture": {"sparse": 0.20, "dense": 0.20},
}
TAGS: tuple[str, ...] = (*INSTRUMENTS, *INDEPENDENT, *itertools.chain(*FAMILIES.values()))

# One fault per decoder failure: (reason, file format, seconds).
FAULTS = (
    ("corrupt", "mp3", 10.0),
    ("empty", "ogg", 10.0),
    ("missing", "flac", 10.0),
    ("truncated", "flac", 10.0),
    ("silent", "wav", 10.0),
    ("too_short", "wav", 0.8),
)


@dataclasses.dataclass
class DemoCatalogConfig:
    """Generate the demo catalog (synthesised music, tags on a fraction of tracks, optional faulty files)."""

    root: str = DEFAULT_ROOT
    n_tracks: int = 300  # tracks generated
    seed: int = 0  # the tracks' tags, audio and splits
    faults: bool = False  # add one track per decoder failure (corrupt, empty, missing, ...)
    labeled_fraction: float = 0.5  # share of the tracks whose tags are kept as labels
    workers: int = 2  # processes synthesising and encoding; does not change the result

    def validate(self) -> None:
        problems = []
        if self.n_tracks < 1:
            problems.append(f"--n-tracks must be at least 1, got {self.n_tracks}")
        if not 0 <= self.labeled_fraction <= 1:
            problems.append(f"--labeled-fraction must be in [0, 1], got {self.labeled_fraction}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if importlib.util.find_spec("soundfile") is None:  # found before minutes of synthesis, not after
            problems.append(
                "its Ogg Vorbis files need soundfile, of the demo extra: pip install 'musiclib-tagger[demo]'"
            )
        check("demo catalog", problems)


@dataclasses.dataclass(frozen=True)
class TrackSpec:
    """What to synthesise and how to store it; ``render`` turns it into the same samples every time."""

    index: int
    seed: int
    lead: str
    tags: tuple[str, ...]
    split: str
    labeled: bool
    fmt: str
    sample_rate: int
    channels: int
    duration_s: float
    fault: str | None = None

    @property
    def track_id(self) -> str:
        return f"t{self.index + 1:05d}"

    @property
    def audio_path(self) -> str:
        return f"audio/{self.track_id}.{self.fmt}"


# --------------------------------------------------------------------------- descriptions


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream per purpose and track, so adding faults changes no other track."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _draw_tags(rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """The lead instrument and the true tags of one track."""
    names = list(INSTRUMENTS)
    weights = np.array([w for w, _ in INSTRUMENTS.values()])
    lead = names[rng.choice(len(names), p=weights / weights.sum())]
    tags = {lead} | {n for n, (_, p) in INSTRUMENTS.items() if rng.random() < p}
    tags |= {t for t, p in INDEPENDENT.items() if rng.random() < p}
    for family in FAMILIES.values():
        u, edge = rng.random(), 0.0
        for tag, p in family.items():
            edge += p
            if u < edge:
                tags.add(tag)
                break
    return lead, tuple(t for t in TAGS if t in tags)


def sample_tracks(
    n_tracks: int,
    seed: int = 0,
    labeled_fraction: float = 0.5,
    min_seconds: float = 6.0,
    max_seconds: float = 14.0,
) -> list[TrackSpec]:
    """Describe ``n_tracks`` tracks without synthesising them (cheap: tests check tag statistics on it).

    Splits and labels are exact shares dealt by seeded permutations; formats, sample rates and channels
    cycle through every combination in a seeded order, so every format appears once there are 4 tracks.
    """
    rng = _rng(seed, 0)
    drawn = [_draw_tags(rng) for _ in range(n_tracks)]
    seconds = np.round(rng.uniform(min_seconds, max_seconds, n_tracks) * SR) / SR
    split_of = np.empty(n_tracks, dtype=object)
    order, start = rng.permutation(n_tracks), 0
    for name, share in SPLIT_SHARES:
        stop = n_tracks if name == SPLIT_SHARES[-1][0] else start + round(share * n_tracks)
        split_of[order[start:stop]] = name
        start = stop
    labeled = np.zeros(n_tracks, dtype=bool)
    labeled[rng.permutation(n_tracks)[: round(labeled_fraction * n_tracks)]] = True
    combos = list(itertools.product((1, 2), SAMPLE_RATES, FORMATS))
    combo_of = rng.permutation(n_tracks) % len(combos)
    specs = []
    for i, (lead, tags) in enumerate(drawn):
        channels, rate, fmt = combos[combo_of[i]]
        specs.append(
            TrackSpec(
                index=i,
                seed=seed,
                lead=lead,
                tags=tags,
                split=str(split_of[i]),
                labeled=bool(labeled[i]),
                fmt=fmt,
                sample_rate=rate,
                channels=channels,
                duration_s=float(seconds[i]),
            )
        )
    return specs


def fault_tracks(first_index: int, seed: int = 0) -> list[TrackSpec]:
    """One labeled training track per entry of ``FAULTS``, numbered from ``first_index``.

    They are labeled and in the train split so that every job, training included, meets them.
    """
    rng = _rng(seed, 1)
    specs = []
    for k, (reason, fmt, seconds) in enumerate(FAULTS):
        lead, tags = _draw_tags(rng)
        specs.append(
            TrackSpec(
                index=first_index + k,
                seed=seed,
                lead=lead,
                tags=tags,
                split="train",
                labeled=True,
                fmt=fmt,
                sample_rate=SAMPLE_RATES[k % 2],
                channels=1 + k % 2,
                duration_s=seconds,
                fault=reason,
            )
        )
    return specs


# --------------------------------------------------------------------------- instrument voices


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _partials(freqs: np.ndarray, amps: np.ndarray, decays_s: np.ndarray, n: int) -> np.ndarray:
    """A sum of exponentially decaying sines; partials near or above Nyquist are dropped.

    Each partial is the imaginary part of a phasor that turns and shrinks by one fixed step per sample:
    a cumulative product, several times cheaper than evaluating sin and exp at every sample.
    """
    keep = freqs < 0.45 * SR
    phasors = np.ones((int(keep.sum()), n), complex)
    phasors[:, 1:] = np.exp(-1 / (decays_s[keep, None] * SR) + 2j * np.pi * freqs[keep, None] / SR)
    return amps[keep] @ np.cumprod(phasors, axis=1).imag


def _harmonics(f: float, amps: np.ndarray, n: int, vibrato_hz: float, depth: float) -> np.ndarray:
    """Harmonics ``k = 1, 2, ...`` of a tone at ``f`` Hz with vibrato fading in over 0.3 s, up to Nyquist.

    The k-th harmonic is the k-th power of the fundamental's phasor, so the vibrato stays in tune.
    """
    t = np.arange(n) / SR
    inst = f * (1 + depth * np.minimum(t / 0.3, 1) * np.sin(2 * np.pi * vibrato_hz * t))
    z = np.exp(2j * np.pi * np.cumsum(inst) / SR)
    zk, out = z.copy(), amps[0] * z.imag
    for k, a in enumerate(amps[1:], start=2):
        if k * f >= 0.45 * SR:
            break
        zk *= z
        out += a * zk.imag
    return out


def _envelope(n_on: int, attack_s: float, release_s: float) -> np.ndarray:
    """Linear attack, sustain for ``n_on`` samples, then a linear release."""
    n_rel = int(release_s * SR)
    env = np.ones(n_on + n_rel)
    n_att = min(n_on, max(1, int(attack_s * SR)))
    env[:n_att] = np.linspace(0, 1, n_att)
    env[n_on:] = np.linspace(1, 0, n_rel)
    return env


def _piano(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Hammered string: slightly stretched partials, the higher ones dying faster."""
    f, k = _hz(midi), np.arange(1, 11)
    freqs = f * k * np.sqrt(1 + 3e-4 * k**2)
    decays = 2.0 * np.sqrt(262 / f) / k**0.8
    env = _envelope(n_on, 0.003, 0.15)
    return _partials(freqs, 1 / k**1.1, decays, len(env)) * env


def _guitar(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Plucked string by Karplus-Strong: a noise burst circulating in a delay line averaging neighbours.

    Each pass through the line filters it by ``loop`` (a circular two-tap average with loss), so pass
    ``r`` is the burst filtered by ``loop ** r``: every pass at once, by FFT, with no Python loop.
    """
    period = max(2, round(SR / _hz(midi)))
    env = _envelope(n_on, 0.001, 0.1)
    burst = np.convolve(rng.uniform(-1, 1, period), [0.5, 0.5], mode="same")  # a softer pick
    loop = 0.498 * (1 + np.exp(-2j * np.pi * np.arange(period // 2 + 1) / period))
    passes = np.arange(math.ceil(len(env) / period))[:, None]
    out = np.fft.irfft(np.fft.rfft(burst) * loop**passes, n=period, axis=1).reshape(-1)
    return out[: len(env)] * env


def _organ(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Drawbar organ: steady harmonics (with a sub-octave) and a rotary-speaker tremolo."""
    env = _envelope(n_on, 0.015, 0.08)
    ratios = np.array([0.5, 1, 2, 3, 4, 6, 8])
    amps = np.array([0.4, 1, 0.7, 0.35, 0.3, 0.15, 0.1])
    tone = _partials(_hz(midi) * ratios, amps, np.full(7, 1e9), len(env))
    return tone * (1 + 0.12 * np.sin(2 * np.pi * 6.5 * np.arange(len(env)) / SR)) * env


def _strings(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Bowed string: a sawtooth-like spectrum with slow attack and vibrato."""
    env = _envelope(n_on, 0.12, 0.25)
    return _harmonics(_hz(midi), 1 / np.arange(1, 13) ** 1.2, len(env), 5.5, 0.006) * env


def _flute(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Flute: nearly a sine, with vibrato and breath noise."""
    env = _envelope(n_on, 0.06, 0.1)
    tone = _harmonics(_hz(midi), np.array([1, 0.25, 0.08]), len(env), 5.0, 0.005)
    return (tone + 0.06 * rng.standard_normal(len(env))) * env


def _bell(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Bell by FM synthesis: an inharmonic modulator ratio (1.4) and a bright strike that mellows."""
    n = n_on + int(1.5 * SR)
    t = np.arange(n) / SR
    fc = _hz(midi)
    tone = np.sin(2 * np.pi * fc * t + 3.0 * np.exp(-t / 0.5) * np.sin(2 * np.pi * 1.4 * fc * t))
    return tone * np.exp(-t / 1.2) * np.minimum(t / 0.002, 1)


def _bass(midi: int, n_on: int, rng: np.random.Generator) -> np.ndarray:
    """Electric bass: a few low harmonics with a plucked decay."""
    k = np.arange(1, 5)
    env = _envelope(n_on, 0.005, 0.05)
    decays = np.array([1.0, 0.5, 0.3, 0.2])
    return _partials(_hz(midi) * k, np.array([1, 0.45, 0.2, 0.1]), decays, len(env)) * env


VOICES = {
    "piano": _piano,
    "guitar": _guitar,
    "organ": _organ,
    "strings": _strings,
    "flute": _flute,
    "bell": _bell,
    "bass": _bass,
}


def _drum_kit(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Kick (a falling sine), snare (noise and a tone) and closed hi-hat (high-passed noise)."""
    t = np.arange(int(0.35 * SR)) / SR
    kick = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-t / 0.04)) / SR) * np.exp(-t / 0.12)
    t = t[: int(0.25 * SR)]
    snare = 0.6 * rng.standard_normal(len(t)) * np.exp(-t / 0.07)
    snare += 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.05)
    t = t[: int(0.08 * SR)]
    hat = 0.35 * np.diff(rng.standard_normal(len(t) + 1)) * np.exp(-t / 0.018)
    return {"kick": kick, "snare": snare, "hat": hat}


# --------------------------------------------------------------------------- composition

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 11)  # harmonic minor: its raised 7th makes V major, as in common practice
PROGRESSIONS = {  # chords as scale degrees (0 = tonic), one per bar
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (1, 4, 0, 0)),
    "minor": ((0, 5, 3, 4), (0, 3, 4, 0), (0, 5, 0, 4), (0, 3, 5, 4)),
}
TEMPO_BPM = {"slow": (58, 78), "mid": (92, 124), "fast": (140, 172)}
ACCENTS = {3: (1.0, 0.5, 0.5), 4: (1.0, 0.5, 0.75, 0.5)}  # velocity by beat; off-beats get 0.45
HAT_STEP = {"sparse": 1.0, "normal": 0.5, "dense": 0.25}  # hi-hat every this many beats
MELODY_BEATS = {"sparse": (2.0, 3.0), "normal": (1.0, 1.0, 0.5, 2.0), "dense": (0.5, 0.25, 0.25)}
GAINS = {"piano": 0.5, "guitar": 0.5, "organ": 0.25, "strings": 0.3, "flute": 0.5, "bell": 0.4, "bass": 0.7}


def _family(tags: set[str], name: str, default: str) -> str:
    return next((t for t in FAMILIES[name] if t in tags), default)


def _events(spec: TrackSpec, rng: np.random.Generator, n_beats: int) -> dict[str, list[tuple]]:
    """Notes per part: melody, accompaniment and bass as ``(beat, beats, midi, velocity)``, drums as
    ``(beat, sound, velocity)``; beats count from the start of the track."""
    tags = set(spec.tags)
    meter = 3 if "three_four" in tags else 4
    texture = _family(tags, "texture", "normal")
    scale = MINOR if "minor" in tags else MAJOR
    root = int(rng.integers(55, 67))
    progression = PROGRESSIONS["minor" if "minor" in tags else "major"]
    progression = progression[rng.integers(len(progression))]

    def pitch(degree: int) -> int:
        return root + 12 * (degree // 7) + scale[degree % 7]

    def chord(beat: float) -> int:
        return progression[int(beat // meter) % len(progression)]

    def accent(beat: float) -> float:
        return ACCENTS[meter][int(beat) % meter] if beat == int(beat) else 0.45

    parts: dict[str, list[tuple]] = {name: [] for name in spec.tags if name in VOICES}
    # Melody on the lead: a random walk on the scale, drawn to chord tones on the beat.
    beat, degree = 0.0, 9
    while beat < n_beats:
        beats = float(rng.choice(MELODY_BEATS[texture]))
        degree = int(np.clip(degree + rng.choice((-2, -1, -1, 0, 1, 1, 2)), 5, 16))
        if beat == int(beat) and rng.random() < 0.6:
            tones = [chord(beat) + 7 + d for d in (-7, -5, -3, 0, 2, 4, 7)]
            degree = min(tones, key=lambda d: abs(d - degree))
        parts[spec.lead].append((beat, beats, pitch(degree), accent(beat)))
        beat += beats
    # Accompaniment in each other instrument's idiom: pads hold the bar; piano and guitar follow the meter.
    hits = {"sparse": (0,), "normal": (0, 2) if meter == 4 else (0, 1, 2), "dense": None}[texture]
    for name in [p for p in parts if p not in (spec.lead, "bass")]:
        for bar in range(0, n_beats, meter):
            triad = [pitch(chord(bar) + d) for d in (0, 2, 4)]
            if name in ("organ", "strings", "bell", "flute") or texture == "sparse":
                parts[name] += [(bar, meter, p, 1.0) for p in triad]
            elif hits is None:  # dense: arpeggios in eighths
                for j in range(2 * meter):
                    p = triad[j % 3] + 12 * (j % 6 >= 3)
                    parts[name].append((bar + j / 2, 0.5, p, accent(bar + j / 2)))
            else:  # strums, staggered a little
                for h, nxt in zip(hits, (*hits[1:], meter), strict=True):
                    strum = [(bar + h + 0.02 * i, nxt - h, p, accent(bar + h)) for i, p in enumerate(triad)]
                    parts[name] += strum
    if "bass" in parts:
        bass_hits = {3: (0, 2), 4: (0, 1, 2, 3)} if texture == "dense" else {3: (0,), 4: (0, 2)}
        for bar in range(0, n_beats, meter):
            for j, h in enumerate(bass_hits[meter]):
                p = pitch(chord(bar) + (4 if j % 2 else 0)) - 24
                parts["bass"].append((bar + h, 1.0, p, accent(bar + h)))
    if "drums" in tags:
        kick = (0, 2) if meter == 4 else (0,)
        snare = (1, 3) if meter == 4 else (1, 2)
        drums = []
        for bar in range(0, n_beats, meter):
            drums += [(bar + b, "kick", accent(bar + b)) for b in kick]
            drums += [(bar + b, "snare", 0.8 * accent(bar + b)) for b in snare]
            step = HAT_STEP[texture]
            drums += [(bar + s * step, "hat", accent(bar + s * step)) for s in range(int(meter / step))]
        parts["drums"] = drums
    return parts


# --------------------------------------------------------------------------- rendering


def _fft_size(n: int) -> int:
    """The power of two at or above ``n``: FFTs of awkward lengths can be many times slower."""
    return 1 << (n - 1).bit_length()


def _reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hall: convolution (by FFT) with exponentially decaying noise, about 2 s to -60 dB."""
    t = np.arange(int(1.6 * SR)) / SR
    ir = rng.standard_normal(len(t)) * np.exp(-t / 0.3)
    m = _fft_size(x.shape[1] + len(ir))
    wet = np.fft.irfft(np.fft.rfft(x, m) * np.fft.rfft(ir / np.sqrt((ir**2).sum()), m), m)
    return x + 0.5 * wet[:, : x.shape[1]]


def _lofi(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Old-tape sound: rolled off above 3 kHz, hiss and crackle, quantised to 6 bits."""
    m = _fft_size(x.shape[1])
    gain = 1 / np.sqrt(1 + (np.fft.rfftfreq(m, 1 / SR) / 3000) ** 8)  # a 4th-order Butterworth's
    y = np.fft.irfft(np.fft.rfft(x, m) * gain, m)[:, : x.shape[1]]
    y += 0.006 * rng.standard_normal(y.shape)
    crackle = rng.random(y.shape[1]) < 8 / SR
    y[:, crackle] += 0.15 * rng.choice((-1.0, 1.0), crackle.sum())
    return np.round(y * 32) / 32


def _upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited upsampling: zero-pad the spectrum (of the track padded with silence)."""
    m = _fft_size(x.shape[1])
    return np.fft.irfft(np.fft.rfft(x, m), factor * m)[:, : factor * x.shape[1]] * factor


def render(spec: TrackSpec) -> np.ndarray:
    """Synthesise a track: float32 ``[channels, samples]`` at ``spec.sample_rate``, identical for equal specs."""
    rng = _rng(spec.seed, 2, spec.index)
    tags = set(spec.tags)
    n = round(spec.duration_s * SR)
    bpm = rng.uniform(*TEMPO_BPM[_family(tags, "tempo", "mid")])
    beat_n = 60 / bpm * SR
    meter = 3 if "three_four" in tags else 4
    n_beats = meter * math.ceil(n / beat_n / meter)
    kit = _drum_kit(rng)
    cache: dict[tuple, np.ndarray] = {}
    mix = np.zeros((spec.channels, n))
    for name, notes in sorted(_events(spec, rng, n_beats).items()):
        part = np.zeros(n)
        for note in notes:
            start = round(note[0] * beat_n + rng.normal(0, 0.004 * SR))
            if not 0 <= start < n:
                continue
            if name == "drums":
                wave, vel = kit[note[1]], note[2]
            else:
                key = (name, note[2], round(note[1] * beat_n))
                if key not in cache:
                    cache[key] = VOICES[name](note[2], key[2], rng) * GAINS[name]
                wave, vel = cache[key], note[3]
            end = min(n, start + len(wave))
            part[start:end] += vel * rng.uniform(0.85, 1.0) * wave[: end - start]
        if name == spec.lead:
            part *= 1.5
        # Constant-sum panning: the stereo down-mix equals the mono mix.
        pan = 0.0 if spec.channels == 1 or name in ("bass", "drums") else rng.uniform(-0.6, 0.6)
        mix += np.array([[1 + pan], [1 - pan]])[: spec.channels] * part
    if "reverb" in tags:
        mix = _reverb(mix, rng)
    mix *= rng.uniform(0.4, 0.9) / max(np.abs(mix).max(), 1e-9)
    if "lofi" in tags:
        mix = _lofi(mix, rng)
    mix[:, -int(0.2 * SR) :] *= np.linspace(1, 0, int(0.2 * SR))  # no click at the end
    if spec.sample_rate != SR:
        mix = _upsample(mix, spec.sample_rate // SR)
    return np.clip(mix, -1, 1).astype(np.float32)


def file_bytes(spec: TrackSpec) -> bytes | None:
    """The bytes stored for a track (None: no object), damaged as its ``fault`` says."""
    if spec.fault == "missing":
        return None
    if spec.fault == "empty":
        return b""
    if spec.fault == "corrupt":
        return _rng(spec.seed, 3, spec.index).bytes(32768)
    if spec.fault == "silent":
        audio = np.zeros((spec.channels, round(spec.duration_s * spec.sample_rate)), np.float32)
    else:
        audio = render(spec)
    data = encode(audio, spec.sample_rate, spec.fmt)
    return data[: int(0.4 * len(data))] if spec.fault == "truncated" else data


# --------------------------------------------------------------------------- the catalog


def _write_track(spec: TrackSpec, uri: str) -> None:
    data = file_bytes(spec)
    if data is None:
        storage.delete(uri)  # a stale file from an earlier catalog must not hide the fault
    else:
        storage.write_bytes(uri, data)


def _table(specs: list[TrackSpec]) -> pa.Table:
    tags = pa.list_(pa.string())
    return pa.table(
        {
            "track_id": [s.track_id for s in specs],
            "audio_uri": [s.audio_path for s in specs],
            "duration_s": [s.duration_s for s in specs],
            "tags": pa.array([list(s.tags) if s.labeled else [] for s in specs], tags),
            "split": [s.split for s in specs],
            "true_tags": pa.array([list(s.tags) for s in specs], tags),
            "fault": pa.array([s.fault for s in specs], pa.string()),
        }
    )


def make_catalog(
    root: str,
    n_tracks: int = 300,
    seed: int = 0,
    faults: bool = False,
    labeled_fraction: float = 0.5,
    min_seconds: float = 6.0,
    max_seconds: float = 14.0,
    workers: int = 2,
) -> str:
    """Write the demo catalog under ``<root>/catalog`` and return its URI.

    Audio goes to ``<root>/catalog/audio/<track_id>.<ext>`` (FLAC, OGG/Vorbis, MP3, WAV at 22050 or
    44100 Hz, mono or stereo), the table to ``<root>/catalog/tracks.parquet`` with relative ``audio_uri``.
    ``tags`` holds the human labels of a ``labeled_fraction`` of tracks (empty lists elsewhere);
    ``true_tags`` holds every track's tags, for evaluation; ``fault`` is null except on fault tracks.
    The same arguments give the same rows and the same audio.
    """
    if n_tracks < 1 or workers < 1 or not 0 <= labeled_fraction <= 1 or not 0 < min_seconds <= max_seconds:
        raise ValueError(
            "need n_tracks >= 1, workers >= 1, 0 <= labeled_fraction <= 1, 0 < min_seconds <= max_seconds; "
            f"got {n_tracks}, {workers}, {labeled_fraction}, {min_seconds}, {max_seconds}"
        )
    specs = sample_tracks(n_tracks, seed, labeled_fraction, min_seconds, max_seconds)
    if faults:
        specs += fault_tracks(n_tracks, seed)
    uri = Layout(root).catalog
    folder = storage.parent(uri)
    uris = [storage.join(folder, s.audio_path) for s in specs]
    if workers == 1:
        list(map(_write_track, specs, uris))
    else:  # spawn: forking a process that runs threads (S3 clients, a Ray driver) can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_track, specs, uris))
    catalog.write(_table(specs), uri)
    return uri
