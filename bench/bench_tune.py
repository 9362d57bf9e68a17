"""Benchmark the tune job: the all-tags torch probe against a per-tag scikit-learn loop, and the default sweep.

    .venv/bin/python -m bench.bench_tune probe [--n-train 2000 --dim 512 --n-tags 50]
    .venv/bin/python -m bench.bench_tune sweep --root data/demo      # the demo catalog's embeddings
    .venv/bin/python -m bench.bench_tune sweep --n-tracks 300 --n-tags 16 --dim 128   # synthetic root
    .venv/bin/python -m bench.bench_tune startup [--repeats 3]

``probe`` fits both on the same standardised support set, in one process, and prints the speed ratio and
the macro AP of each on the same test tracks (targets: >= 10x, AP within 0.01). ``sweep`` runs the default
sweep, prints its wall time and the Tune overhead the job measured (targets: < 2 min, < 10 %), then runs
the same configurations as a plain loop in this process on one core, for the speed-up Tune buys.
``startup`` times, each in a fresh process, what a trial worker imports before its first trial and the
first linear-probe fit with the written-out Adam against one with ``torch.optim.Adam``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import threadpoolctl
import torch

from jobs import tune as tune_job
from musiclib import catalog
from musiclib.core.config import Layout, parse
from musiclib.datasets import tagged_embeddings
from musiclib.probe import fewshot, metrics, probes, sweep
from musiclib.train import models


def bench_probe(n_train: int, n_test: int, dim: int, n_tags: int, seed: int) -> None:
    """Per-tag scikit-learn logistic regression loop vs one torch linear layer for all tags."""
    torch.set_num_threads(1)
    cat, emb = tagged_embeddings.make(
        n_tracks=n_train + n_test, n_tags=n_tags, dim=dim, labeled_fraction=1.0, noise=8.0, seed=seed
    )
    x = np.array(emb["embedding"].to_pylist(), np.float32)
    y = catalog.label_matrix(cat["tags"].to_pylist(), [f"tag{j:02d}" for j in range(n_tags)])
    norm = probes.fit_normalizer("standardize", x[:n_train])
    z_train, z_test = norm(x[:n_train]), norm(x[n_train:])
    tags = [f"tag{j:02d}" for j in range(n_tags)]
    probes.fit_linear(z_train[:10], y[:10], epochs=1)  # torch's one-off start-up is not the probe's cost

    timings, aps = {}, {}
    for name, fit in (
        ("sklearn per-tag loop", lambda: probes.fit_logreg(z_train, y[:n_train], c=1.0)),
        ("torch all-tags", lambda: probes.fit_linear(z_train, y[:n_train])),
    ):
        start = time.perf_counter()
        w, b = fit()
        timings[name] = time.perf_counter() - start
        aps[name] = metrics.evaluate(y[n_train:], z_test @ w + b, tags).macro()["ap"]
    print(f"probe fit: {n_train} train tracks, {n_test} test, dim {dim}, {n_tags} tags, 1 thread")
    for name in timings:
        print(f"  {name:<22} {timings[name]:7.2f} s   macro AP {aps[name]:.4f}")
    sk, tt = timings["sklearn per-tag loop"], timings["torch all-tags"]
    print(
        f"  speed-up {sk / tt:.1f}x, macro AP difference {aps['torch all-tags'] - aps['sklearn per-tag loop']:+.4f}"
    )


def plain_loop(root: str) -> tuple[float, int]:
    """The default sweep's configurations run one after another in this process, without Ray: seconds, count."""
    cfg = parse(sweep.TuneConfig, ["--root", root])
    layout = Layout(root)
    data = sweep.load_data(cfg, layout, models.model_id_or_latest(layout.models))
    configs = sweep.configurations(cfg)
    torch.set_num_threads(1)
    start = time.perf_counter()
    with threadpoolctl.threadpool_limits(1):  # BLAS on one thread, as in Ray's workers (OMP_NUM_THREADS=1)
        for config in configs:
            fewshot.run_config(data, config, cfg.repetitions, cfg.seed)
    return time.perf_counter() - start, len(configs)


def bench_sweep(root: str | None, n_tracks: int, n_tags: int, dim: int, cores: int) -> None:
    """The default sweep (fresh run id) on ``root`` or a synthetic root, against the plain loop on one core."""
    if root is None:
        root = tempfile.mkdtemp(prefix="bench-tune-")
        tagged_embeddings.write_root(root, n_tracks=n_tracks, n_tags=n_tags, dim=dim)
        print(f"synthetic root {root}: {n_tracks} tracks, {n_tags} tags, {dim}-d embeddings")
    start = time.perf_counter()
    argv = ["--root", root, "--run-id", f"bench-{int(time.time())}", "--num-cpus", str(cores)]
    manifest = tune_job.main(argv)
    total = time.perf_counter() - start
    plain, n_configs = plain_loop(root)
    extra = manifest.extra
    print(f"default sweep on {root} ({n_configs} configurations), {cores} cores:")
    print(f"  plain loop, one process, one core: {plain:.1f} s")
    print(
        f"  Tune: {total:.1f} s end to end, fit {extra['wall_s']:.1f} s on {extra['slots']} slots "
        f"({plain / extra['wall_s']:.2f}x the plain loop; ideal {extra['slots']}x)"
    )
    print(f"  trial compute {extra['compute_s']:.1f} s, Tune overhead {extra['tune_overhead']:.1%}")
    print(
        f"  start-up until the first trial {extra['startup_s']:.1f} s, overhead after it {extra['steady_overhead']:.1%}"
    )


STARTUP_STEPS = {  # what a Tune trial worker imports, cumulatively, then the first fit
    "ray": "import ray",
    "+ ray.tune": "import ray, ray.tune",
    "+ torch": "import ray, ray.tune, torch",
    "+ sklearn.linear_model": "import ray, ray.tune, torch, sklearn.linear_model",
    "+ musiclib.probe.fewshot": "import ray, ray.tune, torch, sklearn.linear_model, musiclib.probe.fewshot",
}
FIRST_FIT = """
import time, numpy as np, torch
from musiclib.probe import probes
z, y = np.random.default_rng(0).normal(size=(40, 128)).astype(np.float32), np.eye(40, 16, dtype=bool)
start = time.perf_counter()
{fit}
print(time.perf_counter() - start)
"""
FITS = {
    "first fit_linear (written-out Adam)": "probes.fit_linear(z, y)",
    "first fit with torch.optim.Adam": (
        "layer = torch.nn.Linear(128, 16); opt = torch.optim.Adam(layer.parameters(), lr=0.05)\n"
        "for _ in range(50):\n"
        "    opt.zero_grad(); torch.nn.functional.binary_cross_entropy_with_logits("
        "layer(torch.from_numpy(z)), torch.from_numpy(y.astype(np.float32))).backward(); opt.step()"
    ),
}


def bench_startup(repeats: int) -> None:
    """Fresh-process costs of a trial worker: cumulative imports, then the first probe fit each way."""
    root = os.path.join(os.path.dirname(__file__), "..")
    print(f"fresh processes, fastest and slowest of {repeats}:")
    for name, code in STARTUP_STEPS.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
            times.append(time.perf_counter() - start)
        print(f"  {name:<36} {min(times):5.2f}-{max(times):5.2f} s (interpreter start included)")
    for name, fit in FITS.items():
        code = FIRST_FIT.format(fit=fit)
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code], check=True, cwd=root, capture_output=True, text=True
                ).stdout
            )
            for _ in range(repeats)
        ]
        print(f"  {name:<36} {min(times):5.2f}-{max(times):5.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["probe", "sweep", "startup"])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n-tags", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None, help="sweep: a project root (default: a synthetic one)")
    parser.add_argument("--n-tracks", type=int, default=300, help="sweep: synthetic catalog size")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="startup: fresh processes per step")
    args = parser.parse_args()
    if args.what == "probe":
        bench_probe(args.n_train, args.n_test, args.dim, args.n_tags, args.seed)
    elif args.what == "startup":
        bench_startup(args.repeats)
    else:
        bench_sweep(args.root, args.n_tracks, args.n_tags, args.dim, args.cores)


if __name__ == "__main__":
    main()
