"""The tag job and the tag table's queries at scale: synthetic embeddings, a hundred tags, 100k to 1M tracks.

    .venv/bin/python -m bench.bench_tag_scale --sizes 100000,1000000 [--tags 100] [--repo PATH]

For each size, a root under ``--folder`` (made once, then reused) holds a catalog of that many tracks (the
first ``--labeled`` with one to three human labels of the train split, as few as a real catalog has), their
random ``--dim``-d embeddings in files of ``--per-file`` tracks (the embed job's shards, published as one
version, as ``bench_load``'s catalogs are after their embed job) and a random probe set of ``--tags`` tags
published as a probe run. The tag job of ``--repo`` (default: this checkout) then runs in a fresh process
on a fresh local Ray (``--num-cpus``), which prints its own wall time and its peak RSS
(``VmHWM``: the driver alone, not Ray's daemons or workers, which are other processes);
``--skip-validate`` leaves out the driver's ``catalog.validate`` (the catalog is valid), to see the rest.
Then, each in a fresh process, ``python -m musiclib.tag.tags top TAG`` end to end (imports included), and
in one process, after its imports and the table's opening, ``top``, ``show`` and a one-tag ``sql``, each
``--repeats`` times (``--job-only``: the tag job alone, for an older checkout). The machine's load average
is printed at each step. Results: docs/BENCHMARKS.md, "tag at scale".
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

BENCH = Path(__file__).resolve().parent
MODEL = "bench-model"
PROBE_RUN = "tune-bench"

DRIVER = """
import re, sys, time
def peak():  # VmHWM: this process's own peak RSS (getrusage's maxrss keeps the parent's across fork and exec)
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read())[1]) / 1024
began = time.perf_counter()
from jobs import tag
from musiclib import catalog
imported = peak()
if sys.argv[1] == "--skip-validate":  # the bench's catalog is valid: the job's own memory, without the check
    catalog.validate = lambda *args, **kwargs: 0
tag.main(sys.argv[2:])
wall = time.perf_counter() - began
print(f"DRIVER {wall:.1f} s, peak RSS {peak():.0f} MiB ({imported:.0f} MiB after imports)")
"""

QUERIES = """
import sys, time
from musiclib.tag import tag_table, tags
root, tag, track, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
began = time.perf_counter()
table = tag_table.require_table(tag_table.Where(root))
print(f"open {time.perf_counter() - began:.2f} s")
query = f"SELECT count(*) AS n, avg(score) AS mean FROM tags WHERE tag = '{tag}' AND predicted"
for name, call in (
    ("top", lambda: tags.top(table, tag)),
    ("top, new only", lambda: tags.top(table, tag, new=True)),
    ("show", lambda: tags.show(table, track)),
    ("sql one tag", lambda: tag_table.sql(table, query)),
):
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        rows = call()
        times.append(time.perf_counter() - began)
    print(f"{name}: {', '.join(f'{t:.2f}' for t in times)} s ({len(rows)} rows)")
"""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def tag_names(n_tags: int) -> list[str]:
    return [f"tag{k:03d}" for k in range(n_tags)]


def make_root(root: str, args: argparse.Namespace, n: int) -> None:
    """A catalog of ``n`` tracks, their random embeddings in files of ``--per-file``, a random probe set."""
    from musiclib import catalog
    from musiclib.core import storage, versions
    from musiclib.core.config import Layout
    from musiclib.embed import table as embeddings_table
    from musiclib.probe.probes import Normalizer, ProbeSet

    layout = Layout(root)
    rng = np.random.default_rng(0)
    names = tag_names(args.tags)
    ids = [f"t{i:07d}" for i in range(n)]
    labeled = min(args.labeled, n)
    weights = 1 / np.arange(1, args.tags + 1)
    labels = [
        sorted(set(rng.choice(names, size=rng.integers(1, 4), p=weights / weights.sum())))
        for _ in range(labeled)
    ]
    cat = pa.table(
        {
            "track_id": ids,
            "audio_uri": [f"audio/{t}.wav" for t in ids],
            "duration_s": np.full(n, 30.0),
            "tags": labels + [[]] * (n - labeled),
            "split": ["train"] * labeled + [None] * (n - labeled),
        },
        schema=catalog.SCHEMA,
    )
    catalog.write(cat, layout.catalog)
    dataset = embeddings_table.dataset_uri(layout.embeddings, MODEL)
    uris, rows = [], []
    for start in range(0, n, args.per_file):
        part = ids[start : start + args.per_file]
        decoded = pa.table(
            {
                "track_id": part,
                "n_chunks": np.full(len(part), 4, np.int32),
                "duration_s": np.full(len(part), 30.0),
                "error": pa.nulls(len(part), pa.string()),
            }
        )
        vectors = rng.normal(size=(len(part), args.dim)).astype(np.float32)
        uris.append(
            storage.join(versions.version_uri(dataset, "v1"), f"part-{start // args.per_file:05d}.parquet")
        )
        rows.append(
            storage.write_parquet(embeddings_table.from_decoded(decoded, MODEL, vectors, None), uris[-1])
        )
    versions.publish(dataset, "v1", uris, rows)
    versions.publish(layout.models, MODEL, [], [])
    probe_set = ProbeSet(
        tags=names,
        weights=(rng.normal(size=(args.dim, args.tags)) * 1.5 / np.sqrt(args.dim)).astype(np.float32),
        biases=np.zeros(args.tags, np.float32),
        norm=Normalizer(np.zeros(args.dim, np.float32), np.ones(args.dim, np.float32)),
        thresholds=np.full(args.tags, 0.9, np.float32),
        model_id=MODEL,
        config={"probe_run_id": PROBE_RUN},
    )
    uri = storage.join(versions.version_uri(layout.probes, PROBE_RUN), "probe_set.safetensors")
    probe_set.save(uri)
    versions.publish(layout.probes, PROBE_RUN, [uri], [args.tags])


def run(argv: list[str], env: dict[str, str], log: Path, check: bool = True) -> str:
    """A child process's output (also written to ``log``); fails the bench when the child fails and ``check``
    (else a failure that is not Ray's start-up timing out)."""
    out = subprocess.run(argv, cwd=env["PYTHONPATH"], env=env, capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0 and (check or "timed out during startup" not in out.stderr):
        raise SystemExit(f"{argv[:4]} failed (exit {out.returncode}); see {log}\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--tags", type=int, default=100)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--per-file", type=int, default=10000)
    parser.add_argument("--labeled", type=int, default=2000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repo", default=str(BENCH.parent))
    parser.add_argument("--folder", default="/tmp/bench_tag_scale")
    parser.add_argument("--job-only", action="store_true", help="the tag job alone (an older --repo's)")
    parser.add_argument("--skip-validate", action="store_true", help="without catalog.validate in the driver")
    args = parser.parse_args()
    repo = str(Path(args.repo).resolve())
    env = {**os.environ, "PYTHONPATH": repo}
    print(f"START {uptime()}; repo {repo}; {args}", flush=True)
    tag = tag_names(args.tags)[args.tags // 2]
    for n in (int(s) for s in args.sizes.split(",")):
        base = Path(args.folder) / f"{n}x{args.tags}"
        root = str(base / "root")
        if not (base / "root" / "probes").exists():
            began = time.perf_counter()
            make_root(root, args, n)
            print(f"made {root} in {time.perf_counter() - began:.0f} s", flush=True)
        shutil.rmtree(base / "root" / "tags", ignore_errors=True)  # a fresh tag table each time
        print(f"{n}: tag job starts; {uptime()}", flush=True)
        job = ["--root", root, "--num-cpus", str(args.num_cpus)]
        for attempt in range(1, 4):  # a loaded machine's raylet may miss Ray's 30 s start-up deadline
            driver = [sys.executable, "-c", DRIVER, "--skip-validate" if args.skip_validate else "--validate"]
            out = run([*driver, *job], env, base / "tag.log", check=attempt == 3)
            if "DRIVER" in out:
                break
            print(f"{n}: Ray did not start (attempt {attempt}); {uptime()}", flush=True)
        print(f"TAG {n} x {args.tags}: {out.strip().splitlines()[-1]}; {uptime()}", flush=True)
        if args.job_only:
            continue
        cli = [sys.executable, "-m", "musiclib.tag.tags", "top", tag, "--root", root]
        walls = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            run(cli, env, base / "top.log")
            walls.append(time.perf_counter() - began)
        print(
            f"TOP {n} x {args.tags}: `tags top {tag}` end to end {', '.join(f'{w:.2f}' for w in walls)} s",
            flush=True,
        )
        track = f"t{n // 2:07d}"
        out = run(
            [sys.executable, "-c", QUERIES, root, tag, track, str(args.repeats)], env, base / "queries.log"
        )
        for line in out.strip().splitlines():
            print(f"QUERY {n} x {args.tags}: {line}", flush=True)
        print(f"{n}: done; {uptime()}", flush=True)


if __name__ == "__main__":
    main()
