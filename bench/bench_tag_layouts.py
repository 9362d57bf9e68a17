"""Three layouts of the tag table's model rows, and what ``top TAG`` and ``show TRACK`` cost on each.

    .venv/bin/python -m bench.bench_tag_layouts --layout rowgroup [--tracks 1000000] [--tags 100]
    .venv/bin/python -m bench.bench_tag_layouts --layout track
    .venv/bin/python -m bench.bench_tag_layouts --layout partition

Writes ``--tracks`` x ``--tags`` model rows (blocks of ``--per-file`` tracks, uniform random scores, as the
tag job's tasks would) into a fresh Iceberg tag table under ``--folder``, commits them as one snapshot
(``tag_table.commit``), then times ``tags.top`` and ``tags.show`` twice each in this process. Layouts:
``rowgroup`` (one file per block, one row group per tag: the tag job's), ``track`` (one file per block,
track-major, row groups of 4,096 tracks: the tag job's before), ``partition`` (the table partitioned by
``identity(tag)``, one file per block and tag). Results: docs/BENCHMARKS.md, "tag at scale".
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyiceberg.transforms import IdentityTransform

from musiclib.core import storage
from musiclib.tag import tag_table, tags


def rows(ids: pa.Array, names: pa.Array, tag_index: np.ndarray, scores: np.ndarray) -> pa.Table:
    """Model rows: ``ids[i]`` with tag ``names[tag_index[i]]`` and ``scores[i]``."""
    n = len(ids)
    constant = {"source": "model", "model_id": "m", "probe_run_id": "p", "tagged_at": "2026-12-08"}
    return (
        pa.table(
            {
                "track_id": ids,
                "tag": names.take(tag_index),
                "score": scores,
                "predicted": scores > 0.9,
                "reason": pa.nulls(n, pa.string()),
                **{c: pa.repeat(pa.scalar(v), n) for c, v in constant.items()},
            }
        )
        .select(tags.SCHEMA.names)
        .cast(tags.SCHEMA)
    )


def write_block(
    layout: str, folder: str, block: int, ids: pa.Array, names: pa.Array, scores: np.ndarray
) -> list[str]:
    """One block's files in ``layout``; ``scores`` is tracks x tags."""
    n, n_tags = scores.shape
    if layout == "partition":
        uris = [storage.join(folder, f"model-{block:05d}-{k:03d}.parquet") for k in range(n_tags)]
        for k, uri in enumerate(uris):
            storage.write_parquet(rows(ids, names, np.full(n, k), scores[:, k]), uri)
        return uris
    uri = storage.join(folder, f"model-{block:05d}.parquet")
    if layout == "rowgroup":
        parts = (rows(ids, names, np.full(n, k), scores[:, k]) for k in range(n_tags))
    else:
        parts = (
            rows(
                ids.take(np.repeat(np.arange(i, min(i + 4096, n)), n_tags)),
                names,
                np.tile(np.arange(n_tags), min(4096, n - i)),
                scores[i : i + 4096].ravel(),
            )
            for i in range(0, n, 4096)
        )
    storage.write_parquet_parts(parts, tags.SCHEMA, uri)
    return [uri]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("rowgroup", "track", "partition"), default="rowgroup")
    parser.add_argument("--tracks", type=int, default=1_000_000)
    parser.add_argument("--tags", type=int, default=100)
    parser.add_argument("--per-file", type=int, default=10_000)
    parser.add_argument("--folder", default="/tmp/bench_tag_layouts")
    args = parser.parse_args()
    root = Path(args.folder) / args.layout
    shutil.rmtree(root, ignore_errors=True)
    table = tag_table.open_table(tag_table.Where(str(root)), create_with=tags.SCHEMA)
    if args.layout == "partition":
        with table.update_spec() as spec:
            spec.add_field("tag", IdentityTransform(), "tag")
    names = pa.array(sorted(f"tag{k:03d}" for k in range(args.tags)))
    folder = storage.join(tag_table.run_dir(table, "layout"), "model")
    began, files = time.perf_counter(), []
    for block, start in enumerate(range(0, args.tracks, args.per_file)):
        ids = pa.array([f"t{i:07d}" for i in range(start, min(start + args.per_file, args.tracks))])
        scores = np.random.default_rng(block).random((len(ids), args.tags), dtype=np.float32)
        files += write_block(args.layout, folder, block, ids, names, scores)
    print(f"{args.layout}: wrote {len(files)} files in {time.perf_counter() - began:.0f} s", flush=True)
    began = time.perf_counter()
    tag_table.commit(table, "layout", files, {})
    print(f"{args.layout}: commit {time.perf_counter() - began:.1f} s", flush=True)
    tag, track = names[len(names) // 2].as_py(), f"t{args.tracks // 2:07d}"
    for name, call in (("top", lambda: tags.top(table, tag)), ("show", lambda: tags.show(table, track))):
        for _ in range(2):
            began = time.perf_counter()
            call()
            print(f"{args.layout}: {name} {time.perf_counter() - began:.2f} s", flush=True)


if __name__ == "__main__":
    main()
