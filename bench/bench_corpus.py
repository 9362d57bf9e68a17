"""Rendered bench corpus: where the time of one track goes, and the render rate per core.

    python -m bench.bench_corpus [--tracks 12] [--seconds 30] [--soundfont PATH] [--pyfluidsynth]
    python -m bench.bench_corpus --catalog data/bench-rendered/catalog/tracks.parquet   # its tags' shape
    python -m bench.bench_corpus --catalog ... --spectral   # and how far one spectral statistic gets

One process, tracks drawn as ``make bench-corpus`` draws them: parse (music21, no cache between
tracks), arrange (MIDI), render (the ``fluidsynth`` program, as the corpus does), encode (Opus). Times
are CPU seconds (this process and its children), so the rate, seconds of audio per second of one core,
holds on a loaded machine. With ``--pyfluidsynth`` (the ``pyfluidsynth`` module, which the project does
not need, importable: its folder on ``PYTHONPATH``) the same MIDI files are also rendered in
process through libfluidsynth's player, the soundfont loaded once, to compare with the program, which
loads it for every track. With ``--catalog`` it prints the shape of a catalog's tag distribution
instead: tracks per tag, the share of tag assignments held by the top fifth of tags, the median tag.
With ``--spectral`` also, for every tag on at least 20 tracks, the best ROC-AUC that one statistic of
a track's first 30 s reaches alone (RMS level, spectral centroid, roll-off, flatness, zero-crossing
rate): a tag that one of them separates is a tag the benchmark does not need an encoder for.
Results: ``docs/CORPUS.md``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from musiclib import audio, catalog
from musiclib.datasets import rendered
from musiclib.datasets.audio_files import encode
from musiclib.probe.metrics import roc_auc


def cpu_seconds() -> float:
    """User and system CPU time of this process and its finished children (the fluidsynth program):
    a per-core rate that other load on the machine does not change."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def render_in_process(midis: list[bytes], soundfont: str, seconds: float) -> float:
    """CPU seconds to render every MIDI file with one pyfluidsynth synth (soundfont loaded once, included)."""
    import fluidsynth

    start = cpu_seconds()
    synth = fluidsynth.Synth(samplerate=float(rendered.SR), **{"player.timing-source": "sample"})
    synth.sfload(soundfont)
    n = round(seconds * rendered.SR)
    with tempfile.TemporaryDirectory() as tmp:
        for k, midi in enumerate(midis):
            path = Path(tmp, f"{k}.mid")
            path.write_bytes(midi)
            synth.play_midi_file(str(path))
            samples = synth.get_samples(n)
            synth.play_midi_stop()
            synth.system_reset()
            assert np.abs(samples).max() > 0, "in-process render is silent"
    return cpu_seconds() - start


def tag_shape(uri: str) -> None:
    """Print tracks per tag and how long its tail is."""
    tags = catalog.read(uri, columns=["tags"]).column("tags").to_pylist()
    counts = Counter(t for row in tags for t in row)
    n = np.array(sorted(counts.values(), reverse=True))
    print(f"{len(tags)} tracks, {len(counts)} tags, {n.sum() / len(tags):.1f} tags per track")
    print(
        f"  top fifth of tags ({len(n) // 5}) hold {100 * n[: len(n) // 5].sum() / n.sum():.0f} % of tag assignments"
    )
    print(
        f"  largest tag on {100 * n[0] / len(tags):.0f} % of tracks, median tag on {100 * np.median(n) / len(tags):.1f} %"
    )
    for share in (0.01, 0.02, 0.05):
        print(f"  tags on under {100 * share:.0f} % of tracks: {(n < share * len(tags)).sum()}")
    print("  " + ", ".join(f"{t} {k}" for t, k in counts.most_common()))


def spectral_statistics(x: np.ndarray, sr: int = 22050) -> dict[str, float]:
    """Track-level means of frame statistics (2,048-sample Hann frames, hop 1,024)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 2048)[::1024] * np.hanning(2048)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12
    freqs = np.fft.rfftfreq(2048, 1 / sr)
    cumulative = np.cumsum(power, axis=1)
    rolloff = freqs[np.argmax(cumulative >= 0.85 * cumulative[:, -1:], axis=1)]
    return {
        "rms": float(np.sqrt(np.mean(x**2))),
        "centroid": float(np.mean(power @ freqs / power.sum(axis=1))),
        "rolloff": float(np.mean(rolloff)),
        "flatness": float(np.mean(np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1))),
        "zcr": float(np.mean(np.abs(np.diff(np.sign(x))) > 0)),
    }


def spectral_check(uri: str) -> None:
    """Best single-statistic ROC-AUC per tag (either direction), the hardest a linear probe should beat."""
    table = catalog.read(uri, columns=["audio_uri", "tags"]).to_pylist()
    base = catalog.base_dir(uri)
    stats = [
        spectral_statistics(audio.load(audio.locate(r["audio_uri"], base), duration_s=30)) for r in table
    ]
    names = list(stats[0])
    values = np.array([[s[n] for n in names] for s in stats])
    counts = Counter(t for r in table for t in r["tags"])
    best = {}
    for tag, n in counts.items():
        if n < 20 or n > len(table) - 20:
            continue
        y = np.array([tag in r["tags"] for r in table])
        aucs = [roc_auc(y, values[:, k]) for k in range(len(names))]
        k = int(np.argmax([max(a, 1 - a) for a in aucs]))
        best[tag] = (max(aucs[k], 1 - aucs[k]), names[k])
    ordered = sorted(best.items(), key=lambda kv: -kv[1][0])
    print(f"best single-statistic ROC-AUC, {len(best)} tags on >= 20 tracks:")
    print("  " + ", ".join(f"{t} {auc:.2f} ({name})" for t, (auc, name) in ordered))
    aucs = np.array([auc for auc, _ in best.values()])
    print(
        f"  median {np.median(aucs):.2f}; tags above 0.9: {(aucs > 0.9).sum()}, above 0.8: {(aucs > 0.8).sum()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracks", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--soundfont", default=rendered.SOUNDFONT)
    parser.add_argument(
        "--pyfluidsynth", action="store_true", help="also render with pyfluidsynth, in process"
    )
    parser.add_argument("--catalog", default="", help="print this catalog's tag distribution instead")
    parser.add_argument("--spectral", action="store_true", help="with --catalog: single-statistic AUCs")
    args = parser.parse_args()
    if args.catalog:
        tag_shape(args.catalog)
        if args.spectral:
            spectral_check(args.catalog)
        return

    stages = dict.fromkeys(("parse", "arrange", "render", "encode"), 0.0)
    midis = []
    for spec in rendered.sample_tracks(args.tracks, args.seed, args.seconds):
        t0 = cpu_seconds()
        score = rendered.first_score(spec)
        t1 = cpu_seconds()
        midi = rendered.midi_bytes(rendered.arrange(score, spec))
        t2 = cpu_seconds()
        x = rendered.synthesize(midi, args.soundfont, args.seconds, np.random.default_rng(0))
        t3 = cpu_seconds()
        encode(x, rendered.SR, "opus", bitrate=rendered.BITRATE)
        t4 = cpu_seconds()
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[name] += dt
        midis.append(midi)
    audio_s = args.tracks * args.seconds
    total = sum(stages.values())
    print(f"{args.tracks} tracks of {args.seconds:.0f} s, {Path(args.soundfont).name}, one process")
    for name, seconds in stages.items():
        print(f"  {name:8s} {seconds / args.tracks:6.3f} s/track  {100 * seconds / total:4.0f} %")
    print(f"  all      {total / args.tracks:6.3f} s/track: {audio_s / total:.0f} s of audio per core-second")
    print(f"  fluidsynth program: {audio_s / stages['render']:.0f} s of audio per core-second")
    if args.pyfluidsynth:
        seconds = render_in_process(midis, args.soundfont, args.seconds)
        print(f"  pyfluidsynth in process: {audio_s / seconds:.0f} s of audio per core-second")


if __name__ == "__main__":
    main()
