"""The embed stage: decode tracks to int16 chunks, encode and average them per track, write the versions.

The pieces the embed job maps with Ray Data, kept Ray-free so tests and GPU machines call them directly:

1. ``chunking.decode_batch`` (its own module, below the encoder and the log-mel floor): catalog rows to up to
   N chunks per track as int16, or the reason the track cannot be used.
2. ``embed_batch``: the encoder on every chunk of a batch of decoded tracks, in fixed-size forward batches,
   averaged per track into one row of the embeddings table (``embeddings_table.schema``), with the log-mel
   statistics of the same chunks beside it (``logmel.track_stats``: no second decode).
3. ``drop_written``: the anti-join that skips tracks already embedded, by binary search in a sorted id array.
4. ``embed_catalog``: the plain single-process loop (decode, chunk, forward), the reference the tests compare
   the job against and the baseline the benchmark measures it by.
5. The version a run writes (``begin_version``, ``end_version``): a killed run resumes its unfinished
   version (``_pending.json``, Ray Data checkpoints), and an incremental one keeps the latest version's
   files (``carry_over``) and publishes only when it embedded something new (``commit_version``).

The rows it writes are the embeddings table's (``musiclib.embed.table``: schema, dataset, readers).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from musiclib import audio, catalog
from musiclib.core import storage, versions
from musiclib.core.config import DEFAULT_ROOT, Layout, RayConfig, check
from musiclib.core.iceberg import DEFAULT_CATALOG, catalog_problem, shared_catalog_problem
from musiclib.core.ray_env import DEVICES, Device
from musiclib.embed import chunking, logmel
from musiclib.embed import table as embeddings_table
from musiclib.train import models
from musiclib.train.models import EncoderConfig

# --------------------------------------------------------------------------- config


@dataclass
class EmbedConfig(RayConfig):
    """Embed every catalog track with an exported encoder and publish the embeddings."""

    root: str = DEFAULT_ROOT
    catalog: str = ""  # the track catalog (musiclib.catalog); empty: <root>/catalog/tracks.parquet
    model_id: str = ""  # default: the latest exported model under <root>/models
    only_new: bool = True  # embed only tracks absent from the latest embeddings; false: recompute all
    max_chunks: int = 64  # chunks of 2.7 s per track, spread evenly over it
    batch_size: int = 0  # tracks per decode task and encoder call; 0: sized from durations (tracks_per_task)
    chunk_batch: int = 0  # chunks per encoder forward; 0: 64 on a GPU, fewer on CPU (chunks_per_forward)
    decode_cpus: float = 1.0  # CPUs per decode task
    actors: int = 0  # most encoder actors; 0: one per GPU, or half the CPUs on a cluster without GPUs
    cpus_per_actor: float = 1.0  # CPUs per encoder actor
    device: str = "auto"  # auto: GPUs when the cluster has or can scale to them, else CPU; or cpu, gpu
    gpus_per_actor: float | None = None  # None: 1 on the GPU (--device), else 0
    shard_rows: int = 10000  # fewest rows per output Parquet file
    validate_catalog: bool = True  # check every row before Ray starts; false: bad rows become error rows
    allowed_prefixes: list[str] = field(default_factory=list)  # audio only under these; empty: anywhere
    task_retries: int = 3  # decode tasks retried after storage errors that outlast the decoder's own retries
    catalog_uri: str = DEFAULT_CATALOG  # Iceberg catalog of musiclib.embeddings (empty: the root's default)

    @property
    def tracks_uri(self) -> str:
        """The track catalog (``--catalog``, else the root's)."""
        return Layout(self.root, self.catalog).catalog

    def validate(self) -> None:
        """Fail fast, before Ray starts: bad numbers, unreachable storage, a missing catalog or model."""
        problems = RayConfig.problems(self)
        for name in ("max_chunks", "shard_rows"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_size", "chunk_batch"):
            if getattr(self, name) < 0:
                flag = name.replace("_", "-")
                problems.append(f"--{flag} must not be negative (0: automatic), got {getattr(self, name)}")
        if self.task_retries < 0:
            problems.append(f"--task-retries must not be negative, got {self.task_retries}")
        if self.actors < 0:
            problems.append(f"--actors must not be negative (0: automatic), got {self.actors}")
        if self.decode_cpus <= 0 or self.cpus_per_actor < 0:
            problems.append("--decode-cpus must be positive and --cpus-per-actor not negative")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append(f"--gpus-per-actor must not be negative, got {self.gpus_per_actor}")
        if self.device not in DEVICES:
            problems.append(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        elif self.device == "cpu" and self.gpus_per_actor:
            problems.append("--device cpu with --gpus-per-actor above 0: choose one")
        elif self.device == "gpu" and self.gpus_per_actor == 0:
            problems.append("--device gpu with --gpus-per-actor 0: choose one")
        if problem := catalog_problem(self.catalog_uri) or shared_catalog_problem(
            self.catalog_uri, self.root
        ):
            problems.append(problem)
        try:
            if self.validate_catalog:
                catalog.validate(self.tracks_uri)
            else:
                catalog.files(self.tracks_uri)
            models_root = Layout(self.root).models
            model_id = models.model_id_or_latest(models_root, self.model_id)
            if not storage.exists(storage.join(models_root, model_id, "encoder.safetensors")):
                problems.append(f"no exported model {model_id!r} under {models_root}")
        except (storage.StorageError, catalog.CatalogError) as exc:
            problems.append(str(exc))
        check("embed", problems)


def encoder_resources(cfg: EmbedConfig, device: Device, cluster: dict[str, float]) -> tuple[float, int]:
    """GPUs per encoder actor and the most actors, from the config or, where it says 0 / None, the device
    (``ray_env.choose_device``: the GPUs the cluster has or can scale to) and the ``cluster``'s CPUs.

    With GPUs: up to one actor per GPU, added as the backlog grows (the first actor's request is what
    starts a GPU node on a cluster that scales from zero). Without: the encoder shares the CPUs with
    decoding and its forward pass costs more than decoding there, so a fixed pool holding half the CPUs
    starts at once (autoscaling from one actor, on a small node whose CPUs the decoders held, kept
    requesting a second actor that never started; measured in docs/BENCHMARKS.md).
    """
    gpus = cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if device.gpu else 0.0
    if cfg.actors:
        return gpus, cfg.actors
    if gpus > 0:
        return gpus, max(1, int(device.gpus // gpus))
    return gpus, max(1, int(cluster.get("CPU", 1) / 2 // max(cfg.cpus_per_actor, 1.0)))


MIN_TRACKS_PER_TASK = 16  # full-length tracks: 16 of 64 chunks are about Ray Data's 128 MiB block target
MAX_TRACKS_PER_TASK = 64  # short clips: larger tasks cost each decode worker and encoder actor more memory
# than they save in bookkeeping (docs/BENCHMARKS.md, load, sixth session)


def tracks_per_task(durations: np.ndarray, todo: int, max_chunks: int, block_bytes: int, slots: float) -> int:
    """Tracks per decode task and encoder call, for ``--batch-size 0``: as many as a block allows.

    Every Ray task leaves bookkeeping that lasts as long as the job (the driver's, the workers' and the
    GCS's memory grow with the tasks run, not the tracks: docs/BENCHMARKS.md, load), so tasks are made
    as large as a block of ``block_bytes`` of int16 chunks holds for the catalog's longer tracks (the 99th
    percentile of the catalog's ``durations``; unknown ones count as ``max_chunks`` chunks), kept between
    ``MIN_TRACKS_PER_TASK`` and ``MAX_TRACKS_PER_TASK``. When the ``todo`` tracks to embed are too few to
    give each of ``slots`` CPUs four tasks, they are cut finer, so every decoder and encoder actor has work.
    """
    per_chunk = audio.CHUNK_SAMPLES * np.dtype(np.int16).itemsize
    chunks = np.floor(np.nan_to_num(durations, nan=np.inf) * audio.SAMPLE_RATE / audio.CHUNK_SAMPLES)
    longer = np.percentile(np.clip(chunks, 1, max_chunks), 99) if len(chunks) else max_chunks
    fits = int(block_bytes // (per_chunk * longer))
    tracks = min(max(fits, MIN_TRACKS_PER_TASK), MAX_TRACKS_PER_TASK)
    return max(1, min(tracks, -(-todo // max(int(4 * slots), 1))))


CPU_FORWARD_BYTES = 8 * 2**20  # the widest float32 activation of one CPU forward: about an L3 cache's share


def chunks_per_forward(chunk_batch: int, on_gpu: bool, encoder: EncoderConfig) -> int:
    """Chunks per encoder forward: ``chunk_batch``, or for 0 64 on a GPU and on CPU as many as keep the
    widest activation within ``CPU_FORWARD_BYTES``.

    On CPU a forward is fastest when its activations stay in cache: larger forwards were up to 3x slower
    per chunk, and hold more memory (docs/BENCHMARKS.md, embed); a GPU wants large batches to fill its cores.
    """
    if chunk_batch:
        return chunk_batch
    return 64 if on_gpu else max(1, CPU_FORWARD_BYTES // (4 * encoder.widest_activation()))


# --------------------------------------------------------------------------- the encoder


def embed_batch(
    encoder: models.Encoder,
    decoded: pa.Table,
    model_id: str,
    chunk_batch: int = 64,
    device: str | torch.device = "cpu",
    floor: logmel.LogMel | None = None,
) -> pa.Table:
    """Decoded rows to embeddings-table rows: the mean of each track's chunk embeddings and, from the same
    chunks, its log-mel statistics (``logmel.track_stats`` with ``floor``, default ``logmel.LogMel()``);
    both null when ``error`` is set.

    All chunks of the batch go through the encoder together (tracks are short compared with a forward
    batch), then each track's rows of the output are averaged; then the same through the floor.
    """
    floor = logmel.LogMel().to(device) if floor is None else floor
    ok, samples, n_chunks = chunking.decoded_chunks(decoded)
    means = np.zeros((len(decoded), encoder.config.embed_dim), np.float32)
    stats = np.zeros((len(decoded), floor.config.embed_dim), np.float32)
    if len(samples):
        means[ok] = chunking.track_means(
            chunking.forward_chunks(encoder, samples, chunk_batch, device), n_chunks
        )
        stats[ok] = logmel.track_stats(floor, samples, n_chunks, chunk_batch, device)
    return embeddings_table.from_decoded(decoded, model_id, means, stats)


# --------------------------------------------------------------------------- resume


def drop_written(rows: pa.Table, written: np.ndarray) -> pa.Table:
    """Rows whose ``track_id`` is not in the sorted array ``written``: an anti-join by binary search.

    O(rows * log(written)) per batch with no per-batch hash table, so skipping millions of embedded
    tracks costs each batch a few microseconds per row. Ids are compared as ``chunking.decode_batch``
    writes them (a null id as ``""``, a number as its string), so an unvalidated catalog cannot break the
    join.
    """
    if len(written) == 0 or len(rows) == 0:
        return rows
    ids = pc.fill_null(rows.column("track_id").cast(pa.string()), "").to_numpy(zero_copy_only=False)
    pos = np.minimum(np.searchsorted(written, ids), len(written) - 1)
    return rows.filter(pa.array(written[pos] != ids))


# --------------------------------------------------------------------------- summary


@dataclass
class Summary:
    """What a run embedded: tracks, audio hours, errors per reason, and the rates over the wall time."""

    tracks: int = 0
    audio_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    def add(self, table: pa.Table) -> None:
        """Count a table of embeddings rows (only ``duration_s`` and ``error`` are read)."""
        self.tracks += len(table)
        self.audio_s += float(
            np.nansum(table.column("duration_s").to_numpy(zero_copy_only=False).astype(float))
        )
        self.errors.update(audio.count_reasons(table.column("error").to_pylist()))

    def __str__(self) -> str:
        hours = self.audio_s / 3600
        wall = max(self.wall_s, 1e-9)
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{self.tracks} tracks, {hours:.2f} audio hours in {self.wall_s:.1f} s: "
            f"{self.tracks / wall:.1f} tracks/s, {hours / wall:.4f} audio-hours/s; "
            f"errors {sum(self.errors.values())} ({errors})"
        )


def summarize(files: list[str], wall_s: float) -> Summary:
    """The summary of embedding files, reading two small columns file by file."""
    summary = Summary(wall_s=wall_s)
    for uri in files:
        summary.add(storage.read_parquet([uri], ["duration_s", "error"]))
    return summary


# --------------------------------------------------------------------------- the plain loop


def iter_embedded(
    catalog_uri: str,
    encoder: models.Encoder,
    model_id: str,
    batch_size: int = 16,
    max_chunks: int = 64,
    chunk_batch: int = 0,
    device: str | torch.device = "cpu",
) -> Iterator[pa.Table]:
    """Embeddings rows of a catalog, ``batch_size`` tracks at a time, in one process: decode, chunk, forward
    (the encoder, then the log-mel floor on the same chunks).

    ``chunk_batch`` 0 picks what the job picks on the same device (``chunks_per_forward``).
    """
    base = catalog.base_dir(catalog_uri)
    chunk_batch = chunks_per_forward(chunk_batch, torch.device(device).type == "cuda", encoder.config)
    floor = logmel.LogMel().to(device)
    for batch in catalog.iter_batches(catalog_uri, columns=["track_id", "audio_uri"], batch_size=batch_size):
        decoded = chunking.decode_batch(pa.Table.from_batches([batch]), base, max_chunks)
        yield embed_batch(encoder, decoded, model_id, chunk_batch, device, floor)


def embed_catalog(
    catalog_uri: str, encoder: models.Encoder, model_id: str, **kwargs
) -> tuple[pa.Table, Summary]:
    """The whole catalog's embeddings as one table, and its summary (``kwargs`` as for ``iter_embedded``)."""
    start = time.perf_counter()
    tables = list(iter_embedded(catalog_uri, encoder, model_id, **kwargs))
    empty = embeddings_table.schema(encoder.config.embed_dim, logmel.LogMelConfig().embed_dim).empty_table()
    table = pa.concat_tables(tables) if tables else empty
    summary = Summary()
    summary.add(table)
    summary.wall_s = time.perf_counter() - start
    return table, summary


# --------------------------------------------------------------------------- versions of a run

PENDING = "_pending.json"  # the version an unfinished run writes, and its mode
CHECKPOINTS = "_checkpoints"  # Ray Data checkpoints of unfinished versions, one folder each


def begin_version(dataset: str, only_new: bool) -> tuple[str, bool]:
    """The version this run writes, and whether it is already committed.

    The unfinished version of a killed run in the same mode is resumed; one that was committed but
    whose run died before moving ``_latest`` is made current here (nothing left to embed); otherwise a
    new version starts. Called under the dataset's lease, so no other run changes the marker meanwhile.
    """
    marker = storage.join(dataset, PENDING)
    if storage.exists(marker):
        pending = storage.read_json(marker)
        if versions.already_complete(dataset, pending["version"], "embed") is not None:
            return pending["version"], True
        if pending["only_new"] == only_new:
            print(f"resuming unfinished version {pending['version']}")
            return pending["version"], False
    version = versions.new_version()
    storage.write_json(marker, {"version": version, "only_new": only_new})
    return version, False


def checkpoint_uri(dataset: str, version: str) -> str:
    """Where Ray Data checkpoints the tracks written so far into ``version``, so a killed run resumes."""
    return storage.join(dataset, CHECKPOINTS, version)


@dataclass
class CarryOver:
    """What an incremental version keeps of the latest one (see ``carry_over``)."""

    kept: list[versions.FileEntry]  # files kept as they are
    skip: np.ndarray  # sorted ids not to embed again
    retried: set[tuple[str, str]]  # (track_id, error) of the rows left out to be tried again


def carry_over(dataset: str, only_new: bool, out_dir: str) -> CarryOver:
    """What an incremental version keeps of the latest one: its files, the ids to skip, the rows retried.

    Rows whose error may since have gone away (``audio.RETRIED``: an object that was missing) are not
    kept: a file holding any is copied into ``out_dir`` without them, so those tracks are embedded again
    and every track still appears exactly once. A latest version without the ``logmel`` column (written
    before the embed stage computed it) keeps nothing: one version never mixes the two schemas.
    """
    none = CarryOver([], np.array([], dtype=object), set())
    if not only_new or versions.latest_version(dataset) is None:
        return none
    latest = versions.read_latest_manifest(dataset)
    if "fused" not in embeddings_table.offered(latest.file_uris()):
        print(f"{dataset}: the latest version has no logmel column; every track is embedded again")
        return none
    kept, ids, retried = [], [], set()
    for entry in latest.files:
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


def unchanged(embedded: list[str], retried: set[tuple[str, str]]) -> bool:
    """Whether the tracks embedded again gave exactly the errors they had (nothing to publish)."""
    rows = storage.read_parquet(embedded, ["track_id", "error"]) if embedded else None
    return rows is not None and set(zip(rows["track_id"].to_pylist(), rows["error"].to_pylist())) == retried


def commit_version(dataset: str, version: str, carried: CarryOver, config: dict[str, Any]) -> list[str]:
    """Publish the shards written into ``version`` with the files ``carried`` keeps; the URIs embedded anew.

    Nothing is published when nothing new was embedded, or when the tracks tried again gave the errors
    they had (their version folder is then removed): the latest version already says all of it.
    """
    out_dir = versions.version_uri(dataset, version)
    files = storage.list_files(out_dir, ".parquet")
    embedded = [u for u in files if not u.rsplit("/", 1)[-1].startswith("carried-")]
    if carried.kept and not embedded:
        print(f"{dataset} is up to date: every catalog track has an embedding; nothing published")
    elif carried.retried and unchanged(embedded, carried.retried):
        storage.delete(out_dir, recursive=True)
        print(f"{dataset} is up to date: {len(carried.retried)} track(s) still {'/'.join(audio.RETRIED)}")
        return []
    else:
        rows = [storage.parquet_rows(u) for u in files]
        manifest = versions.publish(dataset, version, files, rows, config=config, carried=carried.kept)
        print(f"published {dataset} version {version}: {manifest.rows} rows in {len(manifest.files)} files")
    return embedded


def end_version(dataset: str, version: str) -> None:
    """Forget an ended run's version: its checkpoint and the pending marker (after the publish, never before)."""
    storage.delete(checkpoint_uri(dataset, version), recursive=True)
    storage.delete(storage.join(dataset, PENDING))
