"""make_bench_corpus: write a labeled benchmark catalog that sounds like music.

    python -m jobs.make_bench_corpus --root data/bench-rendered [--kind rendered] [--n-tracks 2000] [--seed 0]
    python -m jobs.make_bench_corpus --root data/bench-soundtracks --kind soundtracks

``rendered``: real scores from music21's corpus arranged for GM instruments and rendered with FluidSynth
(``musiclib.datasets.rendered``); ``soundtracks``: recorded music from Debian game-soundtrack packages, one
tag per soundtrack (``musiclib.datasets.soundtracks``). Both write ``<root>/catalog/tracks.parquet`` with
audio under ``<root>/catalog/audio/``, validate it and print every tag's count. Idempotent like
``make_demo_catalog``: the config is recorded in ``<root>/catalog/_bench.json`` once the catalog is
written, and a run with the same config skips generation; a rendered run cut short resumes, re-rendering
only tracks whose files are not both stored. Missing Debian packages (FluidSynth, the soundfont, the
soundtracks) are installed with apt when run as root; otherwise the job stops naming the command to run.
"""

from __future__ import annotations

import time
from collections import Counter

from musiclib import catalog
from musiclib.core import lifecycle, storage
from musiclib.core.config import Layout, as_dict, parse
from musiclib.datasets import rendered, soundtracks
from musiclib.datasets.rendered import BenchCorpusConfig
from musiclib.datasets.system_packages import SystemPackageError


def run(cfg: BenchCorpusConfig) -> lifecycle.Summary[str]:
    """Write the bench corpus (unless one with this config is there) and validate it; the summary's result is
    its URI."""
    job = lifecycle.Job(f"bench-corpus-{cfg.kind}", cfg.root)
    uri = Layout(cfg.root).catalog
    record_uri = storage.join(storage.parent(uri), "_bench.json")
    wanted = {k: v for k, v in as_dict(cfg).items() if k not in ("root", "workers")}
    if cfg.kind == "soundtracks":
        wanted = {k: wanted[k] for k in ("kind", "seconds", "seed")}

    skipped: Counter[str] = Counter()
    if storage.exists(record_uri) and storage.read_json(record_uri) == wanted and storage.exists(uri):
        print(f"bench corpus already at {uri} with this config: skipping generation")
        seconds = 0.0
    else:
        start = time.perf_counter()
        try:
            if cfg.kind == "rendered":
                rendered.make_catalog(
                    cfg.root, cfg.n_tracks, cfg.seed, cfg.seconds, cfg.workers, cfg.soundfont, cfg.styles
                )
            else:
                skipped = soundtracks.make_catalog(cfg.root, cfg.seconds, cfg.seed)
        except SystemPackageError as exc:
            raise SystemExit(f"error: {exc}") from None
        seconds = time.perf_counter() - start
        storage.write_json(record_uri, wanted)

    n_rows = catalog.validate(uri)
    table = catalog.read(uri, columns=["tags", "split", "duration_s"]).to_pydict()
    counts = Counter(t for tags in table["tags"] for t in tags)
    splits = Counter(table["split"])
    hours = sum(table["duration_s"]) / 3600
    print(f"{len(counts)} tags, tracks per tag (all splits):")
    print("  " + ", ".join(f"{t} {n}" for t, n in counts.most_common()))
    return job.done(
        uri,
        read="music21's corpus" if cfg.kind == "rendered" else "Debian soundtrack packages",
        wrote=("" if seconds else "nothing; the catalog holds ")
        + f"{n_rows} tracks ({hours:.1f} h of audio, {len(counts)} tags), "
        f"{'/'.join(catalog.SPLITS)} {'/'.join(str(splits[s]) for s in catalog.SPLITS)}",
        skipped=skipped,
        outputs={"catalog": uri},
    )


def main(argv: list[str] | None = None) -> str:
    return run(parse(BenchCorpusConfig, argv)).result


if __name__ == "__main__":
    main()
