"""The tag job's scoring pipeline alone on one local Ray: its peak memory on small and large embedding files.

    .venv/bin/python -m bench.bench_tag_memory [--repo PATH] [--sizes 1x1000,10x10000]
    .venv/bin/python -m bench.bench_tag_memory --rss      # one block in one process

For each size (FILES x ROWS: embedding files of ROWS tracks, random ``--dim``-d embeddings, a random probe
set of ``--tags`` tags), a fresh process starts a local Ray (``--num-cpus``, as the load bench's two nodes
have) and runs ``jobs/tag.py``'s ``score_with_ray`` from ``--repo`` (default: this checkout) at that
checkout's defaults (the process runs this file as a script, ``jobs`` and ``musiclib`` from ``--repo`` on
its ``PYTHONPATH``), sampling the summed PSS of the process and all its descendants (the driver, Ray's
daemons and workers; ``bench_embed.PeakMemory``). It prints the peak, every process at the peak, and
every process once the pipeline is done. Comparing two checkouts shows whether the pipeline's memory grows
with the files it reads. ``--rss`` scores and writes one block of ROWS tracks (the last size) in this
process, in ``--batch-size`` slices, and prints the RSS before, after, and after Arrow's pool hands its
unused memory back. Results: docs/BENCHMARKS.md, "load, seventh session".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

BENCH = Path(__file__).resolve().parent


def files_of(folder: str, n_files: int, rows: int, dim: int) -> list[str]:
    """``n_files`` Parquet files of ``rows`` tracks each (track_id, embedding, error), made once per size."""
    from musiclib.core import storage

    rng = np.random.default_rng(0)
    uris = []
    for i in range(n_files):
        uri = os.path.join(folder, f"{n_files}x{rows}-d{dim}", f"part-{i:03d}.parquet")
        if not os.path.exists(uri):
            values = pa.array(rng.normal(size=rows * dim).astype(np.float32))
            table = pa.table(
                {
                    "track_id": [f"bench-{i * rows + j:08d}" for j in range(rows)],
                    "embedding": pa.ListArray.from_arrays(
                        np.arange(0, rows * dim + 1, dim, dtype=np.int32), values
                    ),
                    "error": pa.nulls(rows, pa.string()),
                }
            )
            storage.write_parquet(table, uri)
        uris.append(uri)
    return uris


def probe_set_of(dim: int, n_tags: int):
    """A random logistic-regression probe set (standardised, thresholds 0.5)."""
    from musiclib.probe.probes import Normalizer, ProbeSet

    rng = np.random.default_rng(1)
    return ProbeSet(
        tags=[f"tag{k:02d}" for k in range(n_tags)],
        weights=rng.normal(size=(dim, n_tags)).astype(np.float32),
        biases=np.zeros(n_tags, np.float32),
        norm=Normalizer(np.zeros(dim, np.float32), np.ones(dim, np.float32)),
        thresholds=np.full(n_tags, 0.5, np.float32),
        model_id="bench-model",
    )


def pipeline(args: argparse.Namespace, n_files: int, rows: int) -> None:
    """One size, in this (fresh) process: ``score_with_ray`` of ``--repo`` under a memory sampler."""
    import ray
    from bench_embed import PeakMemory, format_pss, ray_pss  # beside this file: the script's folder

    from jobs import tag as tag_job  # from --repo: the process's PYTHONPATH
    from musiclib.tag.tags import Inputs, TagConfig

    uris = files_of(args.folder, n_files, rows, args.dim)
    probe_set = probe_set_of(args.dim, args.tags)
    probe_uri = os.path.join(args.folder, "probe_set.safetensors")
    probe_set.save(probe_uri)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    inputs = Inputs("bench-probes", probe_uri, probe_set, uris, "v1")
    out = os.path.join(args.folder, f"out-{os.getpid()}")
    began = time.perf_counter()
    with PeakMemory(interval=0.2) as peak:
        tag_job.score_with_ray(TagConfig(root=args.folder), inputs, out, "2026-01-01T00:00:00", frozenset())
    print(
        f"{args.repo}: {n_files} x {rows}: {time.perf_counter() - began:.1f} s, peak {peak.peak / 2**20:,.0f} MiB"
    )
    print(format_pss(peak.at_peak))
    time.sleep(2)
    print("after the pipeline:")
    print(format_pss(ray_pss()), flush=True)
    ray.shutdown()


def rss(args: argparse.Namespace, rows: int) -> None:
    """One block of ``rows`` tracks scored and written in this process: RSS before, after, after release."""
    from musiclib.core import storage
    from musiclib.tag import tags

    def mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    block = storage.read_parquet(files_of(args.folder, 1, rows, args.dim))
    probe_set = probe_set_of(args.dim, args.tags)
    before = mib()
    tags.write_model_rows(
        block, probe_set, "p", "t", os.path.join(args.folder, "rss"), batch_size=args.batch_size
    )
    after = mib()
    pa.default_memory_pool().release_unused()
    print(
        f"{rows} tracks, slices of {args.batch_size} ({pa.default_memory_pool().backend_name} pool): RSS "
        f"{after - before:+.0f} MiB after scoring and writing, {mib() - before:+.0f} MiB after release_unused"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(BENCH.parent))
    parser.add_argument("--sizes", default="1x1000,10x10000")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--tags", type=int, default=17)
    parser.add_argument("--num-cpus", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--folder", default="/tmp/bench_tag_memory")
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process: one size
    args = parser.parse_args()
    args.repo = str(Path(args.repo).resolve())
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    if args.rss:
        rss(args, sizes[-1][1])
    elif args.one:
        pipeline(args, *(int(v) for v in args.one.split("x")))
    else:
        for n_files, rows in sizes:  # a fresh process (and Ray) per size
            argv = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--repo",
                args.repo,
                "--one",
                f"{n_files}x{rows}",
            ]
            env = {
                **os.environ,
                "PYTHONPATH": args.repo,
            }  # the driver and a local Ray's workers import from it
            subprocess.run(argv, cwd=args.repo, env=env, check=True)


if __name__ == "__main__":
    main()
