"""Benchmark of the embed job: tracks/s against the plain loop and the decode floor, and peak memory by catalog size.

    python -m bench.bench_embed --root /tmp/bench_embed --distinct 100 --sizes 1000,10000

One run, on the same files and model: (1) the decode-only floor (``decode_batch`` in one process), (2) the
plain single-process loop (decode, chunk, forward: ``embedder.embed_catalog``; on the GPU when there is one,
as the job's actors), (3) the Ray Data job (``jobs/embed.py``'s ``run`` on a local Ray, once cold and then
warm), each as tracks/s and as ratios; the plain loop and the warm job are timed ``repeats`` times and the
fastest run of each counts. Then the job on each catalog size with the summed proportional set size (PSS) of
the driver and every process it started (Ray's GCS, raylet, workers), sampled every 0.25 s, to show memory
does not grow with the catalog; the sampler costs CPU, so those runs are not used for the throughput ratio.
Bigger catalogs reuse the ``distinct`` demo audio files under new track ids.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch

from jobs import embed as job
from musiclib import catalog
from musiclib.core import storage
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import ray_session
from musiclib.datasets import demo
from musiclib.embed import chunking, embedder
from musiclib.train import models


@dataclass
class BenchConfig:
    """Sizes and model of the embed benchmark."""

    root: str = "/tmp/bench_embed"
    distinct: int = 100  # distinct demo audio files
    seconds: float = 6.0  # length of each demo track
    sizes: tuple[int, ...] = (1000, 10000)  # catalog sizes for the memory runs
    throughput_tracks: int = 1000  # catalog size for the throughput comparison
    width: float = 0.25  # SampleCNN width (1.0 is the full model)
    batch_size: int = 16
    actors: int = 0  # as the job: 0 = automatic
    repeats: int = 2  # timed runs of the plain loop and of the warm Ray job; the fastest of each counts


def make_audio(cfg: BenchConfig) -> pa.Table:
    """The demo catalog of ``distinct`` tracks (made once), with absolute audio URIs."""
    base = storage.join(cfg.root, "audio")
    uri = Layout(base).catalog
    if not storage.exists(uri):
        demo.make_catalog(base, n_tracks=cfg.distinct, min_seconds=cfg.seconds, max_seconds=cfg.seconds)
    table = catalog.read(uri, columns=["track_id", "audio_uri", "duration_s", "tags", "split"])
    folder = catalog.base_dir(uri)
    uris = [storage.resolve(folder, u) for u in table.column("audio_uri").to_pylist()]
    return table.set_column(1, "audio_uri", pa.array(uris))


def make_root(cfg: BenchConfig, audio: pa.Table, n: int) -> str:
    """A root whose catalog holds ``n`` tracks cycling over the distinct files, and the benchmark's model."""
    root = storage.join(cfg.root, f"catalog-{n}")
    reps = audio.take([i % len(audio) for i in range(n)])
    table = reps.set_column(0, "track_id", pa.array([f"t{i:08d}" for i in range(n)]))
    catalog.write(table, Layout(root).catalog)
    storage.delete(Layout(root).embeddings, recursive=True)
    models.export_random_encoder(Layout(root).models, models.EncoderConfig(width=cfg.width))
    return root


def process_label(pid: int) -> str:
    """A short name for a Ray process: its title for workers (``ray::EncoderActor``), else its program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    if len(argv) > 2 and argv[1] == "-m":  # a module run as a program: python -m jobs.embed
        return argv[2]
    scripts = [a for a in argv[1:] if a.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else argv[0])


def smaps_rollup(pid: int) -> dict[str, int]:
    """The memory totals of one process (``Pss``, ``Pss_Anon``, ...) from /proc, in bytes."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}


def ray_pss(roots: Sequence[int] = ()) -> dict[str, tuple[int, int, int, int]]:
    """PSS of ``roots`` (default: this process) and all their descendants (Ray's daemons and workers),
    from /proc, summed by process label as (anonymous, file-backed, shared memory) bytes and a count of
    processes. Shared memory is mostly the object store, mapped by the raylet and every worker."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    usage: dict[str, tuple[int, int, int, int]] = {}
    todo = list(roots) or [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            fields = smaps_rollup(pid)
        except (OSError, ValueError):
            continue
        part = (fields.get("Pss_Anon", 0), fields.get("Pss_File", 0), fields.get("Pss_Shmem", 0), 1)
        label = process_label(pid)
        usage[label] = tuple(a + b for a, b in zip(usage.get(label, (0, 0, 0, 0)), part))
    return usage


def ray_pss_bytes(roots: Sequence[int] = ()) -> int:
    """Summed PSS of ``roots`` and all their descendants (``ray_pss``)."""
    return sum(sum(part[:3]) for part in ray_pss(roots).values())


def format_pss(usage: dict[str, tuple[int, int, int, int]]) -> str:
    """One line per process label, largest first: processes, total, anonymous, file and shared-memory MiB."""
    rows = sorted(usage.items(), key=lambda kv: -sum(kv[1][:3]))
    return "\n".join(
        f"  {label[:60]:<60} x{p[3]:<3} {sum(p[:3]) / 2**20:6.0f} MiB (anon {p[0] / 2**20:.0f}, "
        f"file {p[1] / 2**20:.0f}, shmem {p[2] / 2**20:.0f})"
        for label, p in rows
    )


class PeakMemory:
    """Samples ``ray_pss(roots)`` every ``interval`` s in a thread while in a ``with`` block; ``peak`` is
    the largest summed sample and ``at_peak`` its breakdown by process."""

    def __init__(self, roots: Sequence[int] = (), interval: float = 0.25):
        self.roots = list(roots)
        self.interval = interval

    def __enter__(self) -> PeakMemory:
        self.peak, self.at_peak = 0, {}
        self._take()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        usage = ray_pss(self.roots)
        total = sum(sum(part[:3]) for part in usage.values())
        if total > self.peak:
            self.peak, self.at_peak = total, usage

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def decode_floor(catalog_uri: str, batch_size: int) -> float:
    """Tracks/s of decoding alone, in one process: what no embedding loop on one core can beat."""
    start = time.perf_counter()
    n = 0
    base = catalog.base_dir(catalog_uri)
    for batch in catalog.iter_batches(catalog_uri, columns=["track_id", "audio_uri"], batch_size=batch_size):
        n += len(chunking.decode_batch(pa.Table.from_batches([batch]), base))
    return n / (time.perf_counter() - start)


def run_job(root: str, cfg: BenchConfig) -> embedder.Summary:
    """The Ray job on a root, from a clean embeddings folder."""
    storage.delete(Layout(root).embeddings, recursive=True)
    return job.run(job.EmbedConfig(root=root, batch_size=cfg.batch_size, actors=cfg.actors)).result


def fastest(runs: list[embedder.Summary]) -> embedder.Summary:
    """The run with the shortest wall time (as ``timeit`` does: slower runs measure interference)."""
    return min(runs, key=lambda s: s.wall_s)


def main(argv: list[str] | None = None) -> None:
    cfg = parse(BenchConfig, argv)
    print(f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, config {cfg}")
    audio = make_audio(cfg)
    roots = {n: make_root(cfg, audio, n) for n in sorted({cfg.throughput_tracks, *cfg.sizes})}
    small = roots[cfg.throughput_tracks]
    catalog_uri = Layout(small).catalog
    model_id = models.model_id_or_latest(Layout(small).models)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the job's encoder actors run
    encoder = models.fold_batchnorm(
        models.load_encoder(Layout(small).models, model_id, device)[0]
    )  # as the actors
    print(f"encoder on {device}")

    floor = decode_floor(catalog_uri, cfg.batch_size)
    print(f"decode-only floor (1 process): {floor:.1f} tracks/s")
    plain = fastest(
        [
            embedder.embed_catalog(catalog_uri, encoder, model_id, batch_size=cfg.batch_size, device=device)[
                1
            ]
            for _ in range(cfg.repeats)
        ]
    )
    plain_rate = plain.tracks / plain.wall_s
    print(f"plain loop (fastest of {cfg.repeats}): {plain}")
    with ray_session():
        print(f"ray job, cold (starts the workers, loads the model): {run_job(small, cfg)}")
        ray_summary = fastest([run_job(small, cfg) for _ in range(cfg.repeats)])
        ray_rate = ray_summary.tracks / ray_summary.wall_s
        print(f"ray job, warm (fastest of {cfg.repeats}): {ray_summary}")
        print(
            f"RATIOS ray/plain {ray_rate / plain_rate:.2f}x, ray/decode-floor {ray_rate / floor:.2f}x, "
            f"plain/decode-floor {plain_rate / floor:.2f}x"
        )
        for n in cfg.sizes:
            with PeakMemory() as memory:
                summary = run_job(roots[n], cfg)
            ratio = summary.tracks / summary.wall_s / plain_rate
            print(
                f"MEMORY {n} tracks: peak PSS of all Ray processes {memory.peak / 2**20:.0f} MiB; {summary}; "
                f"ray/plain {ratio:.2f}x with the memory sampler running"
            )


if __name__ == "__main__":
    main()
