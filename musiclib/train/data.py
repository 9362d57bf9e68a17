"""The data pretraining reads: a worker's share of the shards in memory, and batches of views cut from it.

``load_training_data`` keeps a worker's block of the usable tracks as int16 audio with their multi-hot
labels (``labels.LabelPlan``), so sampling a window is a slice, never a decode. ``sample_batch`` composes a
batch (``compose_batch``: a share ``b_s`` of labeled clips) and cuts each clip's two views
(``view_starts``: adjacent chunks or independent crops); ``batches`` samples them on a background thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from musiclib import audio
from musiclib.catalog import label_matrix
from musiclib.train.labels import LabelPlan
from musiclib.train.shards import SHARD_SCHEMA, read_shard_columns


@dataclass
class TrainingData:
    """A worker's share of the training audio in memory: int16 samples, segments and multi-hot labels."""

    samples: np.ndarray  # all tracks' int16 audio, concatenated
    offsets: np.ndarray  # [n + 1] start of each track in ``samples``
    segments: np.ndarray  # [n] segment length of each track
    labels: np.ndarray  # [n, V] float32 multi-hot; all zeros for an unlabeled track
    # [n] each track's index among all usable tracks, the same on every worker (a queue of past views
    # tells a track's own views by it); None: 0 to n - 1
    tracks: np.ndarray | None = None
    # [V] each tag's weight in Dice targets with --idf, from every worker's labels (LabelPlan.tag_weights)
    idf: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.tracks is None:
            self.tracks = np.arange(len(self.segments))
        if self.idf is None:
            self.idf = np.ones(self.labels.shape[1])

    @cached_property
    def labeled(self) -> np.ndarray:
        return np.flatnonzero(self.labels.sum(axis=1) > 0)

    @cached_property
    def unlabeled(self) -> np.ndarray:
        return np.flatnonzero(self.labels.sum(axis=1) == 0)

    def __len__(self) -> int:
        return len(self.segments)


def load_training_data(shard_uris: list[str], plan: LabelPlan, rank: int = 0, world: int = 1) -> TrainingData:
    """Load worker ``rank``'s share: a contiguous block of ``1/world`` of the usable tracks.

    Blocks are cut over usable tracks (not shards), so workers get equal shares however the bad tracks
    fall, and each worker reads the audio of only the shards its block touches.
    """
    usable = [
        (uri, row)
        for uri in shard_uris
        for row, error in enumerate(read_shard_columns([uri], ["error"]).column("error").to_pylist())
        if not error
    ]
    mine = np.array_split(np.arange(len(usable)), world)[rank]
    if len(mine) == 0:
        raise ValueError(
            f"worker {rank} of {world}: only {len(usable)} usable training track(s) in the shards"
        )
    rows_by_shard: dict[str, list[int]] = {}
    for i in mine:
        uri, row = usable[i]
        rows_by_shard.setdefault(uri, []).append(row)
    table = pa.concat_tables(
        read_shard_columns([uri], list(SHARD_SCHEMA.names)).take(rows) for uri, rows in rows_by_shard.items()
    )
    chunks = [np.frombuffer(b, dtype="<i2") for b in table.column("audio").to_pylist()]
    kept = [plan.kept.get(tid, []) for tid in table.column("track_id").to_pylist()]
    return TrainingData(
        samples=np.concatenate(chunks).astype(np.int16),
        offsets=np.concatenate([[0], np.cumsum([len(c) for c in chunks])]),
        segments=np.asarray(table.column("segment_samples").to_pylist(), np.int64),
        labels=label_matrix(kept, plan.vocabulary).astype(np.float32),
        tracks=mine,  # the table's rows follow ``mine``: shards in order, rows in order within each
        idf=plan.tag_weights(idf=True),
    )


def compose_batch(
    data: TrainingData, n_clips: int, b_s: float, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Track indices of a batch, and how many of them (the first) are labeled clips: ``round(b_s * n_clips)``.

    Without labeled tracks (``p_s = 0``) every clip is unlabeled. Without unlabeled tracks (every track
    labeled, ``p_s = 1``) the unlabeled share is drawn from all tracks with their labels hidden, so ``b_s``
    still sets the mix: filling it with labeled clips would train on labels alone. Clips are distinct
    within each share while its pool is large enough.
    """
    n_lab = round(b_s * n_clips) if len(data.labeled) else 0
    unlabeled = data.unlabeled if len(data.unlabeled) else np.arange(len(data))

    def draw(pool: np.ndarray, k: int) -> np.ndarray:
        return rng.choice(pool, size=k, replace=k > len(pool)) if k else np.zeros(0, np.int64)

    return np.concatenate([draw(data.labeled, n_lab), draw(unlabeled, n_clips - n_lab)]), n_lab


def view_starts(n_samples: int, segment: int, mode: str, rng: np.random.Generator) -> tuple[int, int]:
    """Start samples of a clip's two views inside one random segment of a track.

    ``adjacent``: two adjacent non-overlapping chunks of a random 5.4 s window (SemiSupCon); ``crops``: two
    independent random crops (CLMR). A segment too short for two adjacent chunks falls back to crops.
    """
    chunk = audio.CHUNK_SAMPLES
    base = int(rng.integers(0, n_samples // segment)) * segment
    if mode == "adjacent" and segment >= 2 * chunk:
        first = base + audio.random_window(segment, 2 * chunk, rng)
        return first, first + chunk
    return base + audio.random_window(segment, chunk, rng), base + audio.random_window(segment, chunk, rng)


@dataclass
class Batch:
    """Views ``[2B, T]`` (all first views, then all second views), the clips' labels ``[B, V]`` and their
    tracks ``[B]`` (``TrainingData.tracks``)."""

    views: torch.Tensor
    labels: torch.Tensor
    tracks: torch.Tensor

    @property
    def n_clips(self) -> int:
        return self.labels.shape[0]


def sample_batch(data: TrainingData, n_clips: int, b_s: float, mode: str, rng: np.random.Generator) -> Batch:
    """Compose a batch and cut its views from memory (a slice per view, no decoding)."""
    idx, n_lab = compose_batch(data, n_clips, b_s, rng)
    chunk = audio.CHUNK_SAMPLES
    views = np.empty((2, n_clips, chunk), np.int16)
    for k, i in enumerate(idx):
        lo, hi = data.offsets[i], data.offsets[i + 1]
        a, b = view_starts(int(hi - lo), int(data.segments[i]), mode, rng)
        views[0, k] = data.samples[lo + a : lo + a + chunk]
        views[1, k] = data.samples[lo + b : lo + b + chunk]
    x = torch.from_numpy(views.reshape(2 * n_clips, chunk)).float().div_(audio.INT16_SCALE)
    labels = data.labels[idx]
    labels[n_lab:] = 0.0  # the unlabeled share: a labeled track drawn there contributes its audio only
    return Batch(views=x, labels=torch.from_numpy(labels), tracks=torch.from_numpy(data.tracks[idx]))


def batches(
    data: TrainingData, n_clips: int, b_s: float, mode: str, seed: list[int], depth: int, pin: bool = False
) -> Iterator[Batch]:
    """An endless stream of batches sampled by a background thread, ``depth`` ahead of the consumer."""
    q: queue.Queue[Batch] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            batch = sample_batch(data, n_clips, b_s, mode, rng)
            if pin:
                batch = Batch(batch.views.pin_memory(), batch.labels.pin_memory(), batch.tracks.pin_memory())
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    q.put(batch, timeout=0.1)
                    break

    thread = threading.Thread(target=produce, daemon=True, name="batch-sampler")
    thread.start()
    try:
        while True:
            yield q.get()
    finally:
        stop.set()
        thread.join(timeout=5)
