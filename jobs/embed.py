"""embed: Ray Data backfill of track embeddings across the catalog.

    python jobs/embed.py --root data/demo [--model-id ID] [--only-new true] [--batch-size 16] ...

Streams the catalog's rows (``track_id``, ``audio_uri``) → decodes each track into up to ``max_chunks``
int16 chunks in CPU tasks → runs the encoder on an actor pool (one GPU per actor when the cluster has
GPUs) → writes Parquet shards in the embeddings schema → publishes them as a new version of
``<root>/embeddings/<model_id>/`` (``storage.publish``: manifest last, then ``_latest``).

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
import datetime as _dt
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.checkpoint import CheckpointConfig

from musiclib import audio, catalog, embedding, embeddings, models, progress, storage
from musiclib.config import DEFAULT_ROOT, ConfigError, Layout, as_dict, parse
from musiclib.ray_env import ray_session, read_parquet, retry_transient_storage

PENDING = "_pending.json"
CHECKPOINTS = "_checkpoints"


@dataclass
class EmbedConfig:
    """Embed every catalog track with an exported encoder and publish the embeddings."""

    root: str = DEFAULT_ROOT
    catalog: str = ""  # default: <root>/catalog/tracks.parquet
    model_id: str = ""  # default: the latest exported model under <root>/models
    only_new: bool = True  # embed only tracks absent from the latest embeddings; false: recompute all
    max_chunks: int = 64  # chunks of 2.7 s per track, spread evenly over it
    batch_size: int = 16  # tracks per encoder call
    decode_batches: int = 4  # encoder batches per decode task: fewer, larger tasks, less per-task bookkeeping
    chunk_batch: int = 64  # chunks per encoder forward
    decode_cpus: float = 1.0  # CPUs per decode task
    decode_tasks: int = 0  # most decode tasks submitted at once; 0: twice what the CPUs beside the actors run
    actors: int = 0  # most encoder actors; 0: one per GPU, or half the CPUs on a cluster without GPUs
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    shard_rows: int = 10000  # fewest rows per output Parquet file
    validate_catalog: bool = True  # check every row before Ray starts; false: bad rows become error rows
    allowed_prefixes: list[str] = field(default_factory=list)  # audio only under these; empty: anywhere
    task_retries: int = 3  # decode tasks retried after storage errors that outlast the decoder's own retries
    ray_address: str = ""  # empty: RAY_ADDRESS inside a submitted job, else a new local Ray

    @property
    def catalog_uri(self) -> str:
        return self.catalog or Layout(self.root).catalog

    def validate(self) -> None:
        """Fail fast, before Ray starts: bad numbers, unreachable storage, a missing catalog or model."""
        for name in ("max_chunks", "batch_size", "decode_batches", "chunk_batch", "shard_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.decode_tasks < 0:
            raise ConfigError(f"--decode-tasks must not be negative (0: automatic), got {self.decode_tasks}")
        if self.task_retries < 0:
            raise ConfigError(f"--task-retries must not be negative, got {self.task_retries}")
        if self.actors < 0:
            raise ConfigError(f"--actors must not be negative (0: automatic), got {self.actors}")
        if self.decode_cpus <= 0 or self.cpus_per_actor < 0:
            raise ConfigError("--decode-cpus must be positive and --cpus-per-actor not negative")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must not be negative, got {self.gpus_per_actor}")
        try:
            if not storage.exists(self.catalog_uri):
                raise ConfigError(f"catalog not found: {self.catalog_uri}")
            if self.validate_catalog:
                catalog.validate(self.catalog_uri)
            models_root = Layout(self.root).models
            model_id = self.model_id or models.latest_model(models_root)
            if not storage.exists(storage.join(models_root, model_id, "encoder.safetensors")):
                raise ConfigError(f"no exported model {model_id!r} under {models_root}")
        except storage.StorageError as exc:
            raise ConfigError(str(exc)) from exc


# --------------------------------------------------------------------------- Ray


class EncoderActor:
    """Holds the encoder on its device and embeds batches of decoded tracks."""

    def __init__(self, models_root: str, model_id: str, chunk_batch: int, device: str):
        self.encoder, _ = models.load_encoder(models_root, model_id, device)
        self.model_id = model_id
        self.chunk_batch = chunk_batch
        self.device = device

    def __call__(self, decoded: pa.Table) -> pa.Table:
        return embedding.embed_batch(self.encoder, decoded, self.model_id, self.chunk_batch, self.device)


def encoder_resources(cfg: EmbedConfig, cluster: dict[str, float]) -> tuple[float, int]:
    """GPUs per encoder actor and the most actors, from the config or, where it says 0 / None, the cluster.

    With GPUs: up to one actor per GPU, added as the backlog grows. Without: the encoder shares the CPUs
    with decoding and its forward pass costs more than decoding there, so a fixed pool holding half the
    CPUs starts at once (autoscaling from one actor, on a small node whose CPUs the decoders held, kept
    requesting a second actor that never started; measured in docs/BENCHMARKS.md).
    """
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if cfg.actors:
        return gpus, cfg.actors
    if gpus > 0:
        return gpus, max(1, int(cluster.get("GPU", 0) // gpus))
    return gpus, max(1, int(cluster.get("CPU", 1) / 2 // max(cfg.cpus_per_actor, 1.0)))


def decode_tasks(cfg: EmbedConfig, cluster: dict[str, float], actors: int) -> int:
    """The most decode tasks in flight: ``--decode-tasks``, or twice what the CPUs beside the encoder
    actors can run, so a free CPU always has a task queued.

    Without a cap Ray Data (with the reservation off, ``data_context``) submits every decode task of the
    catalog at once; each waits in the raylet's queue and is tracked by the driver and the GCS until it
    runs, so memory grew with the catalog (docs/BENCHMARKS.md, load). On an autoscaling cluster, whose
    CPUs at start are not its CPUs later, set it.
    """
    if cfg.decode_tasks:
        return cfg.decode_tasks
    free = cluster.get("CPU", 1) - actors * cfg.cpus_per_actor
    return max(2, 2 * int(free // cfg.decode_cpus))


def build_pipeline(cfg: EmbedConfig, model_id: str, skip: np.ndarray) -> ray.data.Dataset:
    """Catalog rows → skip ``skip`` ids → decode (CPU tasks) → encode (actor pool), lazily and streaming.

    A decode task that meets storage it cannot reach (``audio.TransientError``, after the decoder's own
    backoff) is retried ``task_retries`` times (``data_context``); then the job fails, and the next run
    resumes from what was written. Blocks of ``decode_batches * batch_size`` tracks are the unit of work:
    a catalog row group of a million rows becomes many decode tasks, and the re-blocking between decode
    and encode keeps them separate operators (Ray would otherwise fuse the decoding into the encoder
    actors, starving the accelerator). Ray keeps some bookkeeping per task and block (driver, stats
    actor, GCS) until the run ends, so the blocks are a few encoder batches rather than one
    (docs/BENCHMARKS.md, load).
    """
    fs, path = storage.arrow_filesystem(cfg.catalog_uri)
    rows = read_parquet(path, fs, ["track_id", "audio_uri"])
    if len(skip):
        rows = rows.map_batches(embedding.drop_written, fn_kwargs={"written": skip}, batch_format="pyarrow")
    gpus, actors = encoder_resources(cfg, ray.cluster_resources())
    block = cfg.decode_batches * cfg.batch_size
    decoded = rows.repartition(target_num_rows_per_block=block).map_batches(
        embedding.decode_batch,
        fn_kwargs={
            "base_dir": catalog.base_dir(cfg.catalog_uri),
            "max_chunks": cfg.max_chunks,
            "allowed_prefixes": cfg.allowed_prefixes or None,
        },
        batch_size=block,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=decode_tasks(cfg, ray.cluster_resources(), actors)),
        num_cpus=cfg.decode_cpus,
    )
    return decoded.repartition(target_num_rows_per_block=block).map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "models_root": Layout(cfg.root).models,
            "model_id": model_id,
            "chunk_batch": cfg.chunk_batch,
            "device": "cuda" if gpus > 0 else "cpu",
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

    - Map tasks that fail with ``audio.TransientError`` are run again, up to ``task_retries`` times
      (``ray_env.retry_transient_storage``).
    - Job-level checkpointing keyed by ``track_id``. The checkpoint is kept after success: it is deleted
      only once the version is published, so a run killed between the last write and the publish does
      not write its tracks a second time.
    - No per-operator resource reservation. Ray Data would reserve an equal share of the CPUs for each
      running operator, the Parquet writer included, which sits idle until the end; on a small node that
      holds decoding to one task at a time while CPUs stay free. Without it nothing bounds the tasks Ray
      Data submits, so decoding gets an explicit cap (``decode_tasks``).
    """
    fs, path = storage.arrow_filesystem(checkpoint_dir)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.checkpoint_config, ctx.op_resource_reservation_enabled
    ctx.checkpoint_config = CheckpointConfig(
        id_column="track_id", checkpoint_path=path, delete_checkpoint_on_success=False, override_filesystem=fs
    )
    ctx.op_resource_reservation_enabled = False
    try:
        with retry_transient_storage(task_retries):
            yield
    finally:
        ctx.checkpoint_config, ctx.op_resource_reservation_enabled = previous


# --------------------------------------------------------------------------- versions


def begin_version(dataset: str, only_new: bool) -> tuple[str, bool]:
    """The version this run writes, and whether it is already committed.

    The unfinished version of a killed run in the same mode is resumed; one that was committed but
    whose run died before moving ``_latest`` is made current here (nothing left to embed); otherwise a
    new version starts. Called under the dataset's lease, so no other run changes the marker meanwhile.
    """
    marker = storage.join(dataset, PENDING)
    if storage.exists(marker):
        pending = storage.read_json(marker)
        if storage.read_manifest(dataset, pending["version"]) is not None:
            done = storage.make_current(dataset, pending["version"])
            print(f"version {pending['version']} was committed by a run that died before finishing: {done}")
            return pending["version"], True
        if pending["only_new"] == only_new:
            print(f"resuming unfinished version {pending['version']}")
            return pending["version"], False
    version = f"v{timestamp()}-{uuid.uuid4().hex[:6]}"
    storage.write_json(marker, {"version": version, "only_new": only_new})
    return version, False


def timestamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class CarryOver:
    """What an incremental version keeps of the latest one (see ``carry_over``)."""

    kept: list[storage.FileEntry]  # files kept as they are
    skip: np.ndarray  # sorted ids not to embed again
    retried: set[tuple[str, str]]  # (track_id, error) of the rows left out to be tried again


def carry_over(dataset: str, only_new: bool, out_dir: str) -> CarryOver:
    """What an incremental version keeps of the latest one: its files, the ids to skip, the rows retried.

    Rows whose error may since have gone away (``audio.RETRIED``: an object that was missing) are not
    kept: a file holding any is copied into ``out_dir`` without them, so those tracks are embedded again
    and every track still appears exactly once.
    """
    none = CarryOver([], np.array([], dtype=object), set())
    if not only_new or storage.latest_version(dataset) is None:
        return none
    kept, ids, retried = [], [], set()
    for entry in storage.read_latest_manifest(dataset).files:
        uri = storage.join(dataset, entry.path)
        rows = storage.read_parquet([uri], ["track_id", "error"])
        retry = pc.fill_null(pc.is_in(rows["error"], pa.array(audio.RETRIED)), False)
        if pc.any(retry).as_py():
            rest = storage.read_parquet([uri]).filter(pc.invert(retry))
            storage.write_parquet(rest, storage.join(out_dir, "carried-" + entry.path.replace("/", "-")))
            again = rows.filter(retry)
            retried |= set(zip(again["track_id"].to_pylist(), again["error"].to_pylist()))
        else:
            kept.append(entry)
        ids.append(rows.filter(pc.invert(retry))["track_id"].to_numpy(zero_copy_only=False))
    if retried:
        print(f"{len(retried)} track(s) whose audio was {'/'.join(audio.RETRIED)} are tried again")
    return CarryOver(kept, np.sort(np.concatenate(ids)), retried)


# --------------------------------------------------------------------------- the job


def run(cfg: EmbedConfig) -> embedding.Summary:
    """Embed the catalog (or its new tracks), publish the version, and return the summary of the version's new rows.

    The whole run holds the dataset's lease, taken before Ray starts: a second run of the same model
    fails at once, naming the run that holds it, instead of writing into the same version. Ray is
    started (or joined, ``--ray-address``) only when there is something to embed.
    """
    start = time.perf_counter()
    layout = Layout(cfg.root)
    model_id = cfg.model_id or models.latest_model(layout.models)
    dataset = embeddings.dataset_uri(layout.embeddings, model_id)
    with storage.lease(dataset):
        version, committed = begin_version(dataset, cfg.only_new)
        out_dir = storage.version_uri(dataset, version)
        checkpoint_dir = storage.join(dataset, CHECKPOINTS, version)
        new: list[str] = []
        if not committed:
            with ray_session(cfg.ray_address):
                new = write_version(cfg, model_id, dataset, version, out_dir, checkpoint_dir)
        storage.delete(checkpoint_dir, recursive=True)
        storage.delete(storage.join(dataset, PENDING))
    return embedding.summarize(new, time.perf_counter() - start)


def write_version(
    cfg: EmbedConfig, model_id: str, dataset: str, version: str, out_dir: str, checkpoint_dir: str
) -> list[str]:
    """Run the pipeline into ``out_dir`` and publish the version; return the URIs of the files it embedded."""
    carried = carry_over(dataset, cfg.only_new, out_dir)
    fs, out_path = storage.arrow_filesystem(out_dir)
    with data_context(checkpoint_dir, cfg.task_retries):
        ds = build_pipeline(cfg, model_id, carried.skip)
        ds.write_parquet(out_path, filesystem=fs, min_rows_per_file=cfg.shard_rows)
    files = storage.list_files(out_dir, ".parquet")
    embedded = [u for u in files if not u.rsplit("/", 1)[-1].startswith("carried-")]
    if carried.kept and not embedded:
        print(f"{dataset} is up to date: every catalog track has an embedding; nothing published")
    elif carried.retried and unchanged(embedded, carried.retried):
        storage.delete(out_dir, recursive=True)
        print(f"{dataset} is up to date: {len(carried.retried)} track(s) still {'/'.join(audio.RETRIED)}")
        return []
    else:
        config = {**as_dict(cfg), "model_id": model_id, "catalog": cfg.catalog_uri}
        manifest = storage.publish(
            dataset,
            version,
            files,
            [storage.parquet_rows(u) for u in files],
            config=config,
            carried=carried.kept,
        )
        print(f"published {dataset} version {version}: {manifest.rows} rows in {len(manifest.files)} files")
    return embedded


def unchanged(embedded: list[str], retried: set[tuple[str, str]]) -> bool:
    """Whether the tracks embedded again gave exactly the errors they had (nothing to publish)."""
    rows = storage.read_parquet(embedded, ["track_id", "error"]) if embedded else None
    return rows is not None and set(zip(rows["track_id"].to_pylist(), rows["error"].to_pylist())) == retried


def main(argv: list[str] | None = None) -> None:
    cfg = parse(EmbedConfig, argv)
    started = progress.start("embed")
    done = run(cfg)
    print(f"embed: {done}")  # the rate line bench/bench_load.py reads
    dataset = embeddings.dataset_uri(
        Layout(cfg.root).embeddings, cfg.model_id or models.latest_model(Layout(cfg.root).models)
    )
    latest = storage.read_latest_manifest(dataset)
    failed = sum(done.errors.values())
    progress.summary(
        "embed",
        cfg.root,
        started,
        read=f"{done.tracks} catalog tracks to embed, {done.audio_s / 3600:.2f} h of audio",
        wrote=f"{done.tracks - failed} embeddings at {done.tracks / max(done.wall_s, 1e-9):.1f} tracks/s; "
        f"version {latest.version} holds {latest.rows} tracks",
        skipped=done.errors,
        outputs={"version": storage.version_uri(dataset, latest.version)},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
