"""make_demo_catalog: write the demo catalog of synthesised tracks with audible tags and few labels.

    python -m jobs.make_demo_catalog --root data/demo [--n-tracks 300] [--faults true] [--workers 2]

Writes ``<root>/catalog/tracks.parquet`` and its audio (``musiclib.datasets.demo.make_catalog``), validates it,
and prints the tag vocabulary of the labeled training tracks, head and tail. Idempotent: the config is
recorded in ``<root>/catalog/_demo.json`` after the catalog is written, and a run with the same config
finds it and skips generation (a run cut short left no record, so it generates again).
"""

from __future__ import annotations

import time
from collections import Counter

from musiclib import catalog
from musiclib.core import lifecycle, storage
from musiclib.core.config import Layout, as_dict, parse
from musiclib.datasets import demo
from musiclib.datasets.demo import DemoCatalogConfig


def run(cfg: DemoCatalogConfig) -> lifecycle.Summary[str]:
    """Write the demo catalog (unless one with this config is there) and validate it; the summary's result is
    its URI."""
    job = lifecycle.Job("demo-catalog", cfg.root)
    uri = Layout(cfg.root).catalog
    record_uri = storage.join(storage.parent(uri), "_demo.json")
    wanted = {k: v for k, v in as_dict(cfg).items() if k not in ("root", "workers")}

    if storage.exists(record_uri) and storage.read_json(record_uri) == wanted and storage.exists(uri):
        print(f"demo catalog already at {uri} with this config: skipping generation")
        seconds = 0.0
    else:
        start = time.perf_counter()
        demo.make_catalog(
            cfg.root,
            n_tracks=cfg.n_tracks,
            seed=cfg.seed,
            faults=cfg.faults,
            labeled_fraction=cfg.labeled_fraction,
            workers=cfg.workers,
        )
        seconds = time.perf_counter() - start
        storage.write_json(record_uri, wanted)

    n_rows = catalog.validate(uri, vocabulary=set(demo.TAGS))
    vocab = catalog.vocabulary(uri)
    print(f"tag vocabulary (label counts on labeled train tracks), {len(vocab.counts)} tags:")
    print("  head: " + ", ".join(f"{t} {vocab.counts[t]}" for t in vocab.head))
    print("  tail: " + ", ".join(f"{t} {vocab.counts[t]}" for t in vocab.tail))

    table = catalog.read(uri, columns=["tags", "split", "fault"]).to_pydict()
    labeled = sum(bool(tags) for tags in table["tags"])
    faulty = sum(f is not None for f in table["fault"])
    splits = Counter(table["split"])
    return job.done(
        uri,
        read="nothing: the tracks are synthesised" if seconds else f"{record_uri}: same config, reused",
        wrote=("" if seconds else "nothing; the catalog holds ")
        + f"{n_rows} tracks ({labeled} labeled, {faulty} faulty), "
        f"{'/'.join(catalog.SPLITS)} {'/'.join(str(splits[s]) for s in catalog.SPLITS)}",
        outputs={"catalog": uri},
    )


def main(argv: list[str] | None = None) -> str:
    return run(parse(DemoCatalogConfig, argv)).result


if __name__ == "__main__":
    main()
