"""Load test of the embed and tag jobs on a two-node local Ray cluster against a real S3 server.

    python -m bench.bench_load --sizes 1000,100000

One run: a SeaweedFS S3 server on 127.0.0.1 (``cluster/s3server.py``) holds ``distinct`` demo tracks and,
for each size, a catalog that references them under new track ids (``bench_embed.make_audio`` and
``make_root``: only the first ``distinct`` rows keep the demo's labels, as few labels as a real catalog
has) and the same random narrow encoder. The plain single-process loop (``embedder.embed_catalog``) is
timed on the first ``plain_tracks`` rows of the catalog, from S3, before the cluster starts. Then the
two-node cluster of ``tests/test_cluster.py`` (``cluster/local.py``: head 4 CPUs, worker 2 CPUs, token
auth) starts and, for each size, the bench submits ``make submit JOB=embed``, fits a probe set on the
labeled distinct tracks the way the tune job refits its final one (``fewshot.prepare`` and
``fewshot.final_probe_set``) and publishes it as a probe run, then submits ``make submit JOB=tag``.
Each job is checked: every catalog id exactly once in the embeddings (rows, distinct ids, the id set,
no error rows) and in the tag table (one model row per track and tag, the id set, no untagged tracks).
While each job runs, the summed PSS of every process of the cluster (both ``ray start --block`` nodes
and their descendants: GCS, raylets, dashboard, workers, the job's driver) is sampled every ``sample_s``;
the S3 server and the ``ray job submit`` client are not Ray processes and are not counted. The job's
rate is its own (its start to its publish, from the driver's ``embed:`` line), with the sampler
running; the submit wall time (runtime env upload, driver start) is printed beside it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.bench_embed import BenchConfig as EmbedBenchConfig
from bench.bench_embed import PeakMemory, format_pss, make_audio, make_root, ray_pss, ray_pss_bytes
from cluster import local
from cluster.s3server import SeaweedS3
from musiclib import catalog
from musiclib.core import storage, versions
from musiclib.core.config import Layout, parse
from musiclib.embed import embedder
from musiclib.embed import table as embeddings_table
from musiclib.probe import fewshot
from musiclib.tag import tag_table, tags
from musiclib.train import models

SUMMARY = re.compile(r"embed: (\d+) tracks, .* in ([\d.]+) s: ([\d.]+) tracks/s")


@dataclass
class LoadConfig:
    """Sizes, model and job options of the load test."""

    folder: str = "/tmp/bench_load"  # the S3 server's data and log (a fresh bucket per run)
    sizes: tuple[int, ...] = (1000, 100000)  # catalog sizes, run in this order on the same cluster
    distinct: int = 200  # distinct demo audio files the catalogs cycle over
    seconds: float = 3.0  # length of each demo track
    width: float = 0.0625  # SampleCNN width: the narrowest encoder
    plain_tracks: int = 1000  # catalog rows the plain single-process loop is timed on
    repeats: int = 1  # timed runs of the plain loop; the fastest counts
    embed_args: str = "--actors 1"  # options of jobs/embed.py (ARGS of make submit)
    tag_args: str = ""  # options of jobs/tag.py
    catalog_uri: str = (
        ""  # the Iceberg catalog of the tag tables (load_<run>.tags_<size>); empty: SQLite in folder
    )
    probe: str = "logreg"  # probe kind of the fitted probe set (C = 1, standardised)
    sample_s: float = 0.5  # memory sampling period
    job_timeout_s: float = 7200.0  # most seconds one submitted job may take
    settle_s: float = 0.0  # seconds between the embed job's end and the tag job (idle workers may exit)


@dataclass
class JobRun:
    """One submitted job: its wall time through ``make submit``, peak PSS, and the driver's output."""

    wall_s: float
    peak_bytes: int
    at_peak: dict[str, tuple[int, int, int, int]]  # PSS by process at the peak (bench_embed.ray_pss)
    output: str


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def submit(cluster: local.LocalCluster, job: str, root: str, args: str, cfg: LoadConfig) -> JobRun:
    """``make submit JOB=job`` with the cluster's PSS sampled meanwhile; fails the bench if the job fails."""
    start = time.perf_counter()
    with PeakMemory(cluster.node_pids, cfg.sample_s) as memory:
        out = local.make(
            "submit", cluster.submit_env, timeout=cfg.job_timeout_s, JOB=job, ROOT=root, ARGS=args
        )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{job} on {root} failed (exit {out.returncode})")
    return JobRun(wall, memory.peak, memory.at_peak, out.stdout + out.stderr)


def catalog_ids(root: str) -> pa.Array:
    return catalog.read(Layout(root).catalog, columns=["track_id"]).column("track_id").combine_chunks()


def check_embeddings(root: str, model_id: str, ids: pa.Array) -> str:
    """Every catalog id exactly once in the latest embeddings, none with an error; raises otherwise."""
    dataset = embeddings_table.dataset_uri(Layout(root).embeddings, model_id)
    manifest = versions.read_latest_manifest(dataset)
    table = storage.read_parquet(manifest.file_uris(), ["track_id", "error"])
    got = table.column("track_id").combine_chunks()
    distinct = pc.count_distinct(got).as_py()
    errors = len(table) - pc.sum(pc.is_null(table.column("error")).cast("int64")).as_py()
    same = set(got.to_pylist()) == set(ids.to_pylist())
    line = (
        f"embeddings: {len(table)} rows, {distinct} distinct ids, catalog {len(ids)} ids, "
        f"same id set {same}, error rows {errors}, manifest rows {manifest.rows} in {len(manifest.files)} files"
    )
    if not (len(table) == distinct == len(ids) == manifest.rows and same and errors == 0):
        raise SystemExit(f"EXACTLY-ONCE FAILED {line}")
    return line


def publish_probe_set(root: str, model_id: str, distinct: int, probe: str) -> tuple[str, int]:
    """Fit a probe set on the labeled rows among the first ``distinct`` catalog rows (the only labeled ones),
    as the tune job refits its final probe set, and publish it as a probe run; returns (run id, tags)."""
    layout = Layout(root)
    cat = catalog.read(layout.catalog, columns=["track_id", "tags", "split"]).slice(0, distinct)
    dataset = embeddings_table.dataset_uri(layout.embeddings, model_id)
    emb = storage.read_parquet(
        versions.read_latest_manifest(dataset).file_uris(), ["track_id", "embedding", "error"]
    )
    emb = emb.filter(pc.is_in(emb.column("track_id"), cat.column("track_id")))
    data = fewshot.prepare(cat, emb, model_id)
    probe_set = fewshot.final_probe_set(data, {"probe": probe, "norm": "standardize", "C": 1.0})
    run_id = f"load-{uuid.uuid4().hex[:8]}"
    probe_set.config = {**probe_set.config, "probe_run_id": run_id}
    uri = storage.join(versions.version_uri(layout.probes, run_id), "probe_set.safetensors")
    probe_set.save(uri)
    versions.publish(layout.probes, run_id, [uri], [len(probe_set.tags)])
    return run_id, len(probe_set.tags)


def check_tags(where: tag_table.Where, ids: pa.Array, n_tags: int) -> str:
    """One model row per catalog track and tag in the current tag snapshot, no untagged track; raises otherwise."""
    table = tag_table.require_table(where)
    rows = tag_table.read(table, columns=("track_id", "tag", "source"))
    model = rows.filter(pc.equal(rows.column("source"), "model"))
    got = model.column("track_id").combine_chunks()
    pairs = pc.count_distinct(pc.binary_join_element_wise(got, model.column("tag"), "\x00")).as_py()
    distinct = pc.count_distinct(got).as_py()
    same = set(got.to_pylist()) == set(ids.to_pylist())
    untagged = len(tags.read_errors(table))
    line = (
        f"tags: {len(model)} model rows ({n_tags} tags x {len(ids)} tracks = {n_tags * len(ids)}), "
        f"{pairs} distinct (track, tag), {distinct} distinct ids, same id set {same}, "
        f"{len(rows) - len(model) - untagged} human rows, untagged tracks {untagged}"
    )
    if not (len(model) == pairs == n_tags * len(ids) and distinct == len(ids) and same and untagged == 0):
        raise SystemExit(f"EXACTLY-ONCE FAILED {line}")
    return line


def job_rate(output: str) -> tuple[int, float, float]:
    """(tracks, seconds, tracks/s) from the embed driver's summary line."""
    match = SUMMARY.search(output)
    if match is None:
        raise SystemExit(f"no summary line in the embed job's output:\n{output[-3000:]}")
    return int(match[1]), float(match[2]), float(match[3])


def main(argv: list[str] | None = None) -> None:
    cfg = parse(LoadConfig, argv)
    print(f"START {uptime()}")
    print(f"cores {os.cpu_count()}, config {cfg}", flush=True)
    with SeaweedS3(cfg.folder) as server, local.aws_env(server):
        bucket = f"load-{uuid.uuid4().hex[:8]}"
        server.client().create_bucket(Bucket=bucket)
        bench = EmbedBenchConfig(
            root=f"s3://{bucket}", distinct=cfg.distinct, seconds=cfg.seconds, width=cfg.width
        )
        audio = make_audio(bench)
        roots = {n: make_root(bench, audio, n) for n in sorted({cfg.plain_tracks, *cfg.sizes})}
        for n, root in roots.items():  # only the distinct files' own rows keep their labels
            table = catalog.read(Layout(root).catalog)
            keep = pa.array(np.arange(n) < cfg.distinct)
            empty = pa.array([[]] * n, table.schema.field("tags").type)
            table = table.set_column(
                table.schema.get_field_index("tags"), "tags", pc.if_else(keep, table["tags"], empty)
            )
            split = table.schema.get_field_index("split")
            table = table.set_column(
                split, "split", pc.if_else(keep, table["split"], pa.nulls(n, pa.string()))
            )
            catalog.write(table, Layout(root).catalog)
        # the same weights in every root
        model_id = models.model_id_or_latest(Layout(roots[cfg.plain_tracks]).models)
        assert all(models.model_id_or_latest(Layout(r).models) == model_id for r in roots.values())
        print(f"catalogs on {server.endpoint}: {', '.join(roots.values())}; model {model_id}", flush=True)

        small = Layout(roots[cfg.plain_tracks]).catalog
        encoder = models.fold_batchnorm(
            models.load_encoder(Layout(roots[cfg.plain_tracks]).models, model_id)[0]
        )
        runs = [embedder.embed_catalog(small, encoder, model_id)[1] for _ in range(cfg.repeats)]
        plain = min(runs, key=lambda s: s.wall_s)
        plain_rate = plain.tracks / plain.wall_s
        print(
            f"PLAIN loop, {cfg.plain_tracks} tracks from S3, 1 process (fastest of {cfg.repeats}): {plain}",
            flush=True,
        )

        with local.start(server) as cluster:
            idle = ray_pss_bytes(cluster.node_pids)
            print(f"cluster up: PSS of its idle processes {idle / 2**20:.0f} MiB; {uptime()}", flush=True)
            results = {}
            for n in cfg.sizes:
                root = roots[n]
                ids = catalog_ids(root)
                emb = submit(cluster, "embed", root, cfg.embed_args, cfg)
                tracks, seconds, rate = job_rate(emb.output)
                print(
                    f"EMBED {n}: {tracks} tracks in {seconds:.1f} s = {rate:.1f} tracks/s (job), "
                    f"{emb.wall_s:.1f} s through make submit; ray/plain {rate / plain_rate:.2f}x; "
                    f"peak PSS {emb.peak_bytes / 2**20:.0f} MiB; {uptime()}",
                    flush=True,
                )
                print(f"embed {n}: PSS by process at the peak\n{format_pss(emb.at_peak)}", flush=True)
                print(f"CHECK {n} {check_embeddings(root, model_id, ids)}", flush=True)
                run_id, n_tags = publish_probe_set(root, model_id, cfg.distinct, cfg.probe)
                time.sleep(cfg.settle_s)
                before = format_pss(ray_pss(cluster.node_pids))
                print(f"before tag {n}, after {cfg.settle_s:g} s: PSS by process\n{before}", flush=True)
                catalog_uri = cfg.catalog_uri or f"sqlite:///{os.path.abspath(cfg.folder)}/iceberg.db"
                where = tag_table.Where(root, catalog_uri, f"load_{bucket.removeprefix('load-')}.tags_{n}")
                tag_args = f"{cfg.tag_args} --catalog-uri {where.catalog_uri} --table {where.table}"
                tag = submit(cluster, "tag", root, tag_args, cfg)
                print(
                    f"TAG {n}: probe run {run_id} ({n_tags} tags), {tag.wall_s:.1f} s through make submit "
                    f"= {n / tag.wall_s:.1f} tracks/s; peak PSS {tag.peak_bytes / 2**20:.0f} MiB; {uptime()}",
                    flush=True,
                )
                print(f"tag {n}: PSS by process at the peak\n{format_pss(tag.at_peak)}", flush=True)
                print(f"CHECK {n} {check_tags(where, ids, n_tags)}", flush=True)
                results[n] = (rate, emb.peak_bytes, tag.peak_bytes, tag.wall_s)

    first = cfg.sizes[0]
    for n, (rate, emb_peak, tag_peak, tag_wall) in results.items():
        print(
            f"RESULT {n} tracks: embed {rate:.1f} tracks/s = {rate / plain_rate:.2f}x the plain loop "
            f"({plain_rate:.1f} tracks/s); embed peak PSS {emb_peak / 2**20:.0f} MiB "
            f"({emb_peak / results[first][1] - 1:+.1%} vs {first}); tag {tag_wall:.1f} s, peak PSS "
            f"{tag_peak / 2**20:.0f} MiB ({tag_peak / results[first][2] - 1:+.1%} vs {first})"
        )
    print(f"END {uptime()}")


if __name__ == "__main__":
    main()
