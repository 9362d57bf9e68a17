"""Nearest-neighbour index candidates on clustered 512-d unit vectors: recall@10, latency, build, memory.

    python -m bench.bench_ann --n 100000 --candidates faiss-ivf,hnswlib,usearch
    python -m bench.bench_ann --n 1000000 --candidates faiss-ivf --params faiss-ivf=32,64

faiss-cpu is a project dependency; hnswlib and usearch, the candidates it was chosen over, are not:
``.venv/bin/pip install hnswlib==0.8.0 usearch==2.26.6`` to compare them again (a candidate that cannot
be imported is reported as failed and the others still run).

The vectors are a two-level mixture of clusters (``musiclib.datasets.clustered_vectors``); the queries are
``--queries`` more draws from the same mixture, not in the base. Ground truth is ``index.exact_search``
(blocked matrix products), whose own latency is measured at a few catalog sizes to set the size below
which the index is exact. Each candidate runs in its own process (peak memory is its own): it builds once
with ``--threads`` threads (wall and CPU seconds; faiss: build, then the safetensors round trip a
query tool does, timed apart), then for each search setting reports recall@10 against exact search, single
query latency (p50/p95 over ``--single`` queries, one at a time) and batch time per query. Memory: the
index's own (anonymous resident memory after the build less before it; the vectors are a mapped file)
and the process's peak resident set (which counts the mapped vectors it touched).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from musiclib.datasets import clustered_vectors
from musiclib.tag.index import build, exact_search, from_bytes, to_bytes

K = 10
SEARCH = {"faiss-ivf": [8, 16, 32, 64], "hnswlib": [32, 64, 128], "usearch": [32, 64, 128]}


def anon_mb() -> float:
    """Anonymous resident memory of this process now (MB): what it allocated, not the mapped vector file."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_candidate(name: str, x: np.ndarray, threads: int):
    """Build one candidate; returns ``search(queries, k, setting) -> rows``."""
    if name == "faiss-ivf":
        import faiss

        faiss.omp_set_num_threads(threads)
        built = build(x, kind="ivf")
        start = time.perf_counter()
        data = to_bytes(built)
        saved = time.perf_counter()
        index = from_bytes(data)  # what a query tool reads: the checked safetensors file
        print(
            f"index file {len(data) / 2**20:.0f} MB: to_bytes {saved - start:.1f} s, "
            f"from_bytes (checks, faiss lists) {time.perf_counter() - saved:.1f} s",
            file=sys.stderr,
        )
        del built, data

        def search(q, k, nprobe):
            index._index.nprobe = nprobe
            return index.search(q, k)[1]

        return search
    if name == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=x.shape[1])
        index.init_index(max_elements=len(x), M=16, ef_construction=100, random_seed=0)
        index.add_items(x, np.arange(len(x)), num_threads=threads)
        index.set_num_threads(threads)

        def search(q, k, ef):
            index.set_ef(ef)
            return index.knn_query(q, k=k)[0]

        return search
    if name == "usearch":
        from usearch.index import Index

        index = Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=128)
        index.add(np.arange(len(x)), x, threads=threads)

        def search(q, k, ef):
            index.expansion_search = ef
            return index.search(q, k, threads=threads).keys.reshape(len(q), k)

        return search
    raise SystemExit(f"unknown candidate {name!r}")


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def worker(args: argparse.Namespace) -> None:
    """One candidate in this process: build, then every search setting; one JSON line per setting."""
    x = np.load(args.data, mmap_mode="r")  # page cache, not this process's memory
    q = np.load(args.queries_file)
    truth = np.load(args.truth)
    base_mb = anon_mb()
    start, cpu = time.perf_counter(), time.process_time()
    search = build_candidate(args.worker, x, args.threads)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    after_mb = anon_mb()
    settings = [int(s) for s in args.params.split(",")] if args.params else SEARCH[args.worker]
    for setting in settings:
        found = search(q, K, setting)
        times = []
        for i in range(min(args.single, len(q))):
            t = time.perf_counter()
            search(q[i : i + 1], K, setting)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        search(q, K, setting)
        batch_s = time.perf_counter() - t
        record = {
            "candidate": args.worker,
            "setting": setting,
            "n": len(x),
            "recall@10": round(recall(found, truth), 4),
            "single_p50_ms": round(1e3 * float(np.percentile(times, 50)), 3),
            "single_p95_ms": round(1e3 * float(np.percentile(times, 95)), 3),
            "batch_ms_per_query": round(1e3 * batch_s / len(q), 3),
            "build_s": round(build_s, 1),
            "build_cpu_s": round(build_cpu_s, 1),
            "index_mb": round(after_mb - base_mb),
            "peak_mb": round(peak_mb()),
            "data_mb": round(x.nbytes / 2**20),
        }
        print(json.dumps(record), flush=True)


def exact_latency(x: np.ndarray, q: np.ndarray, sizes: list[int], single: int) -> list[dict]:
    """``exact_search`` at several catalog sizes (prefixes of ``x``): single-query p50/p95, batch per query."""
    out = []
    for n in sizes:
        base = x[:n]
        times = []
        for i in range(min(single, len(q))):
            t = time.perf_counter()
            exact_search(base, q[i : i + 1], K)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        exact_search(base, q, K)
        batch_s = time.perf_counter() - t
        out.append(
            {
                "candidate": "exact",
                "n": n,
                "single_p50_ms": round(1e3 * float(np.percentile(times, 50)), 2),
                "single_p95_ms": round(1e3 * float(np.percentile(times, 95)), 2),
                "batch_ms_per_query": round(1e3 * batch_s / len(q), 3),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--candidates", default="faiss-ivf,hnswlib,usearch")
    p.add_argument("--params", default="", help="search settings, e.g. faiss-ivf=32,64;hnswlib=64")
    p.add_argument("--exact-sizes", default="10000,50000,100000", help="catalog sizes for exact latency")
    p.add_argument("--cache", default="/tmp/bench_ann")
    p.add_argument("--out", default="", help="append the JSON records to this file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--truth", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache / f"n{args.n}-d{args.dim}-q{args.queries}"
    data, queries, truth = (Path(f"{stem}-{part}.npy") for part in ("base", "queries", "truth"))
    if not truth.exists():
        t = time.perf_counter()
        both = clustered_vectors.make(args.n + args.queries, args.dim, seed=0)
        np.save(data, both[: args.n])
        np.save(queries, both[args.n :])
        print(f"generated {args.n} + {args.queries} vectors in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        np.save(truth, exact_search(both[: args.n], both[args.n :], K)[1])
        print(f"exact ground truth in {time.perf_counter() - t:.1f} s", flush=True)
        del both
    records = []
    sizes = [int(s) for s in args.exact_sizes.split(",") if s and int(s) <= args.n]
    if sizes:
        x = np.load(data, mmap_mode="r")
        records += exact_latency(np.ascontiguousarray(x[: max(sizes)]), np.load(queries), sizes, args.single)
        for r in records:
            print(json.dumps(r), flush=True)
    params = dict(item.split("=", 1) for item in args.params.split(";") if item)
    for name in args.candidates.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--data",
            str(data),
            "--queries-file",
            str(queries),
        ]
        cmd += ["--truth", str(truth), "--threads", str(args.threads), "--single", str(args.single)]
        cmd += ["--params", params.get(name, "")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name} failed:\n{done.stderr[-2000:]}", flush=True)
            continue
        if done.stderr.strip():
            print(done.stderr.strip()[-2000:], flush=True)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                records.append(json.loads(line))
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps({**r, "threads": args.threads, "load": os.getloadavg()[0]}) + "\n")


if __name__ == "__main__":
    main()
