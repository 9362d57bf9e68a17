"""embed: Ray Data backfill of track embeddings across the catalog.

    python -m jobs.embed --root data/demo [--model-id ID] [--only-new true] [--catalog-uri URI] ...

Streams the catalog's rows (``track_id``, ``audio_uri``) → decodes each track into up to ``max_chunks``
int16 chunks in CPU tasks → runs the encoder on an actor pool (one GPU per actor when the cluster has
GPUs; beside each track's embedding, the log-mel statistics of the same chunks) → writes Parquet shards
in the embeddings schema → publishes them as a new version of
``<root>/embeddings/<model_id>/`` (``versions.publish``: manifest last, then ``_latest``) → registers the
current version's files in the Iceberg table ``musiclib.embeddings`` of ``--catalog-uri`` (the tag table's
catalog), so any engine reads the current embeddings without musiclib (``iceberg_table``).

Resume. A run records its version in ``_pending.json`` and writes with Ray Data job-level checkpointing
keyed by ``track_id``, so a killed run started again continues the same version: tracks already written
are filtered out at read time, and a shard whose write was cut short is removed, never duplicated.
By default (``--only-new true``) a run embeds only the catalog tracks absent from the latest committed
embeddings (an anti-join on ``track_id``) and publishes them together with the latest version's files,
so re-running a finished job recomputes nothing and publishes nothing. ``--only-new false`` recomputes
every track into a new version (a new encoder export gets its own model id, so this is rarely needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.checkpoint import CheckpointConfig

from musiclib import catalog
from musiclib.core import lifecycle, progress, ray_env, storage, versions
from musiclib.core.config import Layout, as_dict, parse
from musiclib.core.iceberg import masked
from musiclib.core.ray_env import Device, ray_session, retry_transient_storage
from musiclib.embed import chunking, embedder, iceberg_table, logmel
from musiclib.embed import table as embeddings_table
from musiclib.embed.embedder import EmbedConfig
from musiclib.train import models

# --------------------------------------------------------------------------- Ray


class EncoderActor:
    """Holds the encoder, BatchNorm folded (``models.fold_batchnorm``), and the log-mel floor on its
    device, and embeds decoded tracks (the embedding and the log-mel statistics of the same chunks)."""

    def __init__(self, models_root: str, model_id: str, chunk_batch: int, device: str, counter: Any):
        self.encoder = models.fold_batchnorm(models.load_encoder(models_root, model_id, device)[0])
        self.floor = logmel.LogMel().to(device)
        self.model_id = model_id
        self.chunk_batch = chunk_batch
        self.device = device
        self.counter = counter

    def __call__(self, decoded: pa.Table) -> pa.Table:
        out = embedder.embed_batch(
            self.encoder, decoded, self.model_id, self.chunk_batch, self.device, self.floor
        )
        failed = decoded.num_rows - pc.sum(pc.is_null(decoded.column("error"))).as_py()
        self.counter.add.remote({"tracks": decoded.num_rows, "errors": failed})
        return out


def build_pipeline(
    cfg: EmbedConfig, model_id: str, skip: np.ndarray, device: Device, counter: Any
) -> ray.data.Dataset:
    """Catalog rows → skip ``skip`` ids → decode (CPU tasks) → encode (actor pool), lazily and streaming;
    the encoder actors count the tracks they finish on ``counter`` (``progress.counting``).

    A decode task that meets storage it cannot reach (``storage.TransientError``, after the decoder's own
    backoff) is retried ``task_retries`` times (``data_context``); then the job fails, and the next run
    resumes from what was written. Blocks of ``batch_size`` tracks are the unit of work: a catalog row
    group of a million rows becomes many small decode tasks, and the re-blocking between decode and
    encode keeps them separate operators (Ray would otherwise fuse the decoding into the encoder actors,
    starving the accelerator).
    """
    rows = ray_env.read_parquet(catalog.files(cfg.tracks_uri), ["track_id", "audio_uri"])
    if len(skip):
        rows = rows.map_batches(embedder.drop_written, fn_kwargs={"written": skip}, batch_format="pyarrow")
    decoded = rows.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        chunking.decode_batch,
        fn_kwargs={
            "base_dir": catalog.base_dir(cfg.tracks_uri),
            "max_chunks": cfg.max_chunks,
            "allowed_prefixes": cfg.allowed_prefixes or None,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.decode_cpus,
    )
    gpus, actors = embedder.encoder_resources(cfg, device, ray.cluster_resources())
    return decoded.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "models_root": Layout(cfg.root).models,
            "model_id": model_id,
            "chunk_batch": cfg.chunk_batch,
            "device": "cuda" if gpus > 0 else "cpu",
            "counter": counter,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1 if gpus > 0 else actors, max_size=actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
    )


@contextlib.contextmanager
def data_context(checkpoint_dir: str, task_retries: int) -> Iterator[None]:
    """Ray Data settings for the datasets created and run inside the block; the previous ones after it.

    - Map tasks that fail with ``storage.TransientError`` are run again, up to ``task_retries`` times
      (``ray_env.retry_transient_storage``).
    - Job-level checkpointing keyed by ``track_id``. The checkpoint is kept after success: it is deleted
      only once the version is published, so a run killed between the last write and the publish does
      not write its tracks a second time.
    - Ray Data's first Parquet reader for the checkpoint too (``ray_env.read_parquet`` says why): a
      resumed run reads the checkpoint before it starts, and the second reader started a footer-reader
      process per checkpoint file there (docs/BENCHMARKS.md, load, fourth session).
    - No per-operator resource reservation. Ray Data would reserve an equal share of the CPUs for each
      running operator, the Parquet writer included, which sits idle until the end; on a small node that
      holds decoding to one task at a time while CPUs stay free. Nothing then caps the decode tasks Ray
      Data submits (the whole catalog's at once), and no cap may be added without the reservation: the
      re-blocking tasks before a capped decode operator hold the CPU slots its tasks wait for
      (docs/BENCHMARKS.md, load).
    """
    fs, path = storage.arrow_filesystem(checkpoint_dir)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.checkpoint_config, ctx.op_resource_reservation_enabled, ctx.use_datasource_v2
    ctx.checkpoint_config = CheckpointConfig(
        id_column="track_id", checkpoint_path=path, delete_checkpoint_on_success=False, override_filesystem=fs
    )
    ctx.op_resource_reservation_enabled = ctx.use_datasource_v2 = False
    try:
        with retry_transient_storage(task_retries):
            yield
    finally:
        ctx.checkpoint_config, ctx.op_resource_reservation_enabled, ctx.use_datasource_v2 = previous


# --------------------------------------------------------------------------- the job


def run(cfg: EmbedConfig) -> lifecycle.Summary[embedder.Summary]:
    """Embed the catalog (or its new tracks) and publish the version; the summary's result counts the
    version's new rows (``embedder.Summary``).

    The whole run holds the dataset's lease, taken before Ray starts: a second run of the same model
    fails at once, naming the run that holds it, instead of writing into the same version. Ray is
    started (or joined, ``--ray-address``) only when there is something to embed.
    """
    job = lifecycle.Job("embed", cfg.root)
    start = time.perf_counter()
    layout = Layout(cfg.root)
    model_id = models.model_id_or_latest(layout.models, cfg.model_id)
    dataset = embeddings_table.dataset_uri(layout.embeddings, model_id)
    with versions.lease(dataset):
        version, committed = embedder.begin_version(dataset, cfg.only_new)
        new: list[str] = []
        device = "none needed, nothing to embed"
        if not committed:
            with ray_session(cfg.ray_address, cfg.num_cpus):
                chosen = ray_env.cluster_device(cfg.device)
                device = chosen.reason
                print(f"embed: device {device}")
                new = write_version(cfg, model_id, dataset, version, chosen)
        embedder.end_version(dataset, version)
        registered = register(cfg, model_id)
    done = embedder.summarize(new, time.perf_counter() - start)
    print(f"embed: {done}")  # the rate line bench/bench_load.py reads
    latest = versions.read_latest_manifest(dataset)
    failed = sum(done.errors.values())
    return job.done(
        done,
        read=f"{done.tracks} catalog tracks to embed, {done.audio_s / 3600:.2f} h of audio",
        wrote=f"{done.tracks - failed} embeddings at {done.tracks / max(done.wall_s, 1e-9):.1f} tracks/s "
        f"(device {device}); version {latest.version} holds {latest.rows} tracks; {registered}",
        skipped=done.errors,
        outputs={
            "version": versions.version_uri(dataset, latest.version),
            "table": iceberg_table.describe(cfg.root, cfg.catalog_uri),
        },
    )


def register(cfg: EmbedConfig, model_id: str) -> str:
    """Register the current version's files in the Iceberg table ``musiclib.embeddings``; says what it did.

    Called under the lease after every run, whatever it published, so a run killed between its version
    commit and this one is caught up by the next (``iceberg_table.register``: a no-op when in step).
    """
    table = iceberg_table.open_table(cfg.root, cfg.catalog_uri, create=True)
    snapshot = iceberg_table.register(table, Layout(cfg.root).embeddings, model_id)
    if snapshot is None:
        return f"{iceberg_table.TABLE} already holds it"
    return f"registered in {iceberg_table.TABLE} (snapshot {snapshot.snapshot_id})"


def sized(cfg: EmbedConfig, model_id: str, skip: np.ndarray, device: Device) -> EmbedConfig:
    """The config with ``--batch-size 0`` and ``--chunk-batch 0`` made numbers for this catalog and cluster.

    Tracks per task come from the catalog's durations and Ray Data's block size target
    (``embedder.tracks_per_task``), chunks per forward from the encoder's device and width
    (``embedder.chunks_per_forward``); the version's card records the numbers used.
    """
    cluster = ray.cluster_resources()
    batch = cfg.batch_size
    if not batch:
        durations = catalog.durations(cfg.tracks_uri)
        block_bytes = ray.data.DataContext.get_current().target_max_block_size
        batch = embedder.tracks_per_task(
            durations, len(durations) - len(skip), cfg.max_chunks, block_bytes, cluster.get("CPU", 1)
        )
    gpus, _ = embedder.encoder_resources(cfg, device, cluster)
    encoder = models.EncoderConfig(**models.load_card(Layout(cfg.root).models, model_id)["config"])
    chunk_batch = embedder.chunks_per_forward(cfg.chunk_batch, gpus > 0, encoder)
    print(f"embed: {batch} tracks per decode task and encoder call, {chunk_batch} chunks per forward")
    return dataclasses.replace(cfg, batch_size=batch, chunk_batch=chunk_batch)


def write_version(cfg: EmbedConfig, model_id: str, dataset: str, version: str, device: Device) -> list[str]:
    """Run the pipeline into the version's folder and commit it; return the URIs of the files it embedded."""
    out_dir = versions.version_uri(dataset, version)
    carried = embedder.carry_over(dataset, cfg.only_new, out_dir)
    cfg = sized(cfg, model_id, carried.skip, device)
    fs, out_path = storage.arrow_filesystem(out_dir)
    ids = catalog.read(cfg.tracks_uri, columns=["track_id"]).column("track_id").to_numpy(zero_copy_only=False)
    total = int((~np.isin(ids, carried.skip)).sum())
    with (
        data_context(embedder.checkpoint_uri(dataset, version), cfg.task_retries),
        progress.counting("embed", total, "tracks", "tracks") as counter,
    ):
        ds = build_pipeline(cfg, model_id, carried.skip, device, counter)
        ds.write_parquet(out_path, filesystem=fs, min_rows_per_file=cfg.shard_rows)
    config = {
        **as_dict(cfg),
        "model_id": model_id,
        "catalog": cfg.tracks_uri,
        "catalog_uri": masked(cfg.catalog_uri),
    }
    return embedder.commit_version(dataset, version, carried, config)


def main(argv: list[str] | None = None) -> embedder.Summary:
    return run(parse(EmbedConfig, argv)).result


if __name__ == "__main__":
    main()
