"""SemiSupCon pretraining without Ray: config, labels, batches of views, the step, the loop, checkpoints.

Read top to bottom:
1. ``PretrainConfig``: every knob, checked by ``validate()`` before a cluster is busy.
2. Labels and batches: ``p_s`` picks which labeled tracks keep their tags; a batch holds a fraction
   ``b_s`` of labeled clips; each clip gives two views (adjacent chunks or independent crops).
3. The step: augment, encode, gather projections from every worker (gradients flow back through the
   gather), SemiSupCon loss over the global batch, Adam.
4. ``fit``: the loop both the Ray Train job and the plain single-process benchmark run, with a background
   batch sampler so the accelerator never waits on numpy, and checkpoints of plain tensors and values.

Training data comes from the shards of ``musiclib.train.shards``; the cross-worker gather is ``musiclib.train.gather``.
The shard reader keeps a worker's share of the audio in memory as int16, so sampling a window is a slice,
never a decode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from musiclib import audio
from musiclib.core import storage, versions
from musiclib.core.config import DEFAULT_ROOT, ConfigError, RayConfig, check
from musiclib.probe.fewshot import label_matrix
from musiclib.train.augment import AugmentConfig, SpecAugment, ViewAugment
from musiclib.train.gather import distributed, gather, gather_constant
from musiclib.train.losses import semisupcon_anchor_losses, target_matrix
from musiclib.train.models import ContrastiveModel, EncoderConfig, sync_batchnorm
from musiclib.train.shards import SHARD_SCHEMA, read_shard_columns

VIEW_MODES = ("adjacent", "crops")
PRECISIONS = ("bf16", "fp32")
CHECKPOINT_FILE = "state.pt"


# --------------------------------------------------------------------------- config


@dataclass
class PretrainConfig(AugmentConfig, RayConfig):
    """SemiSupCon pretraining of an encoder on the catalog's train split (augmentation fields inherited)."""

    root: str = DEFAULT_ROOT
    run_name: str = "pretrain"
    encoder: str = "samplecnn"  # "samplecnn" (raw waveform, the papers') or "melcnn" (log-mel CNN)
    width: float = 1.0  # channel multiplier of the encoder; 0.25 trains on CPU in minutes
    n_mels: int = 64  # melcnn: log-mel bands
    n_fft: int = 1024  # melcnn: STFT size
    hop: int = 512  # melcnn: samples between two log-mel frames
    num_workers: int = 2
    # elastic below num_workers: a run that loses workers (a node) goes on with as few as this; 0: fixed size
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: int = 1
    batch_size: int = 96  # clips per step over all workers; each clip gives two views
    steps: int = 10000
    minutes: float = 0.0  # also stop after this many minutes of training (0: no time budget)
    lr: float = 1e-4
    warmup: int = 0  # linear warm-up steps
    cosine: bool = False  # cosine decay to zero after the warm-up
    tau: float = 0.1
    label_threshold: int = 1  # two labeled clips are positives when they share at least this many tags
    weighted: bool = False  # Dice-weighted positives instead of the threshold
    b_s: float = 0.5  # fraction of labeled clips in a batch
    p_s: float = 1.0  # fraction of the catalog's labeled tracks whose labels are used
    # "adjacent": two adjacent 2.7 s chunks of a random 5.4 s window; "crops": two independent random crops
    views: str = "adjacent"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_failures: int = 3  # failed workers, and storage lost by the controller, retried (-1: no limit)
    log_every: int = 20
    seed: int = 0
    shard_tracks: int = 32  # tracks per preparation shard
    max_track_seconds: float = 30.0  # longer tracks keep evenly spread segments totalling about this
    segment_seconds: float = 10.0  # length of each segment read from a long track
    prefetch: int = 4  # batches sampled ahead by the background thread
    sync_bn: bool = True  # BatchNorm statistics of the global batch when there are several workers (CLMR)
    precision: str = "bf16"  # on CUDA: "bf16" runs the model under bf16 autocast, "fp32" does not; CPU: fp32

    def validate(self) -> None:
        """Fail in seconds with a clear message, before Ray or any decoding starts."""
        problems = RayConfig.problems(self)
        if not self.root:
            problems.append("--root is empty")
        problems += self.encoder_config().problems()
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            problems.append("--num-workers and --cpus-per-worker must be >= 1")
        sizes = self.world_sizes()
        if not 0 <= self.min_workers <= self.num_workers:
            problems.append(
                f"--min-workers {self.min_workers} must be in [0, --num-workers {self.num_workers}]"
            )
        elif self.num_workers >= 1 and any(self.batch_size < 2 * n or self.batch_size % n for n in sizes):
            lcm = math.lcm(*sizes)
            problems.append(
                f"--batch-size {self.batch_size} must be a multiple of every worker count the run may have "
                f"({', '.join(map(str, sizes))}) with at least 2 clips per worker; the smallest that is: "
                f"{lcm * math.ceil(2 * self.num_workers / lcm)}"
            )
        if self.steps < 1 or self.lr <= 0 or self.tau <= 0 or self.minutes < 0:
            problems.append("--steps must be >= 1, --lr and --tau > 0, --minutes >= 0")
        if not 0 <= self.warmup < self.steps:
            problems.append(f"--warmup {self.warmup} must be in [0, steps)")
        if self.label_threshold < 1:
            problems.append("--label-threshold must be >= 1")
        if not (0.0 <= self.b_s <= 1.0 and 0.0 <= self.p_s <= 1.0):
            problems.append(f"--b-s {self.b_s} and --p-s {self.p_s} must be in [0, 1]")
        if self.views not in VIEW_MODES:
            problems.append(f"--views {self.views!r} must be one of {VIEW_MODES}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r} must be one of {PRECISIONS}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            problems.append("--checkpoint-every, --keep-checkpoints and --log-every must be >= 1")
        if self.max_failures < -1:
            problems.append("--max-failures must be >= -1")
        if self.shard_tracks < 1 or self.prefetch < 1:
            problems.append("--shard-tracks and --prefetch must be >= 1")
        if self.segment_seconds < 2 * audio.CHUNK_SECONDS or self.max_track_seconds < self.segment_seconds:
            problems.append(
                f"need 2 * {audio.CHUNK_SECONDS} <= --segment-seconds <= --max-track-seconds "
                f"(got {self.segment_seconds}, {self.max_track_seconds})"
            )
        try:
            AugmentConfig.validate(self)
        except ValueError as exc:
            problems.append(str(exc))
        check("pretrain", problems)

    def world_sizes(self) -> range:
        """The worker counts the run may have: ``num_workers``, or any down to ``min_workers`` (elastic)."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(
            width=self.width, family=self.encoder, n_mels=self.n_mels, n_fft=self.n_fft, hop=self.hop
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values only (tuples become lists), safe in a ``weights_only`` checkpoint and a JSON card."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# The fields a resumed run may change: how long it trains, how it logs, checkpoints, retries and feeds the
# step, how few workers it may go on with, and where the run lives. Every other field changes what a step
# computes (``num_workers`` sets the per-worker batch, the BatchNorm statistics without ``sync_bn`` and the
# batch streams; ``use_gpu`` the precision), so resuming with another value would train a model no config
# describes. With ``--cosine``, more ``--steps`` stretch the decay to the new end from the resumed step.
RESUMABLE_FIELDS = frozenset(
    {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "prefetch", "min_workers"}
    | {"cpus_per_worker", "root", "run_name", "ray_address", "num_cpus"}
)


def _option(field: str) -> str:
    """A config field as its command-line option: ``log_every`` is ``--log-every``."""
    return "--" + field.replace("_", "-")


def resume_conflicts(saved: dict[str, Any], cfg: PretrainConfig) -> list[str]:
    """One line per field outside ``RESUMABLE_FIELDS`` whose value differs from the saved config's."""
    current = cfg.as_dict()
    lines = []
    for name in sorted((saved.keys() | current.keys()) - RESUMABLE_FIELDS):
        if name in saved and name in current and saved[name] == current[name]:
            continue
        was = repr(saved[name]) if name in saved else "not recorded"
        now = repr(current[name]) if name in current else "not a field any more"
        lines.append(f"{_option(name)}: {was} in the checkpoint, {now} now")
    return lines


# --------------------------------------------------------------------------- labels


def _unit_hash(seed: int, key: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64


def select_labels(track_ids: list[str], tags: list[list[str]], p_s: float, seed: int) -> dict[str, list[str]]:
    """Tags kept for training: exactly ``round(p_s * n_labeled)`` labeled tracks keep theirs.

    The choice is a seeded hash order, so every worker computes the same subset without talking, and a
    smaller ``p_s`` keeps a subset of what a larger one keeps (label budgets are nested).
    """
    labeled = sorted((_unit_hash(seed, t), t) for t, g in zip(track_ids, tags, strict=True) if g)
    kept = {t for _, t in labeled[: round(p_s * len(labeled))]}
    return {t: sorted(set(g)) if t in kept else [] for t, g in zip(track_ids, tags, strict=True)}


@dataclass
class LabelPlan:
    """Which tracks keep which tags, the tag vocabulary, and the counts a model card reports."""

    kept: dict[str, list[str]]
    vocabulary: list[str]
    labeled_in_catalog: int

    @property
    def labeled_used(self) -> int:
        return sum(1 for g in self.kept.values() if g)


def plan_labels(shard_uris: list[str], p_s: float, seed: int) -> LabelPlan:
    """The label plan over every usable track in the shards (reads only the small metadata columns)."""
    meta = read_shard_columns(shard_uris, ["track_id", "tags", "error"]).to_pydict()
    usable = [
        (t, g or []) for t, g, e in zip(meta["track_id"], meta["tags"], meta["error"], strict=True) if not e
    ]
    kept = select_labels([t for t, _ in usable], [g for _, g in usable], p_s, seed)
    vocabulary = sorted({tag for g in kept.values() for tag in g})
    return LabelPlan(kept, vocabulary, labeled_in_catalog=sum(1 for _, g in usable if g))


POSITIVES_WARNING = 0.5  # above this mean label target, labels barely tell labeled clips apart


def positive_share(plan: LabelPlan, threshold: int, weighted: bool, max_tracks: int = 2000) -> float | None:
    """The mean label target ``P_ij`` between two distinct labeled tracks the plan keeps (``target_matrix``):
    the share of labeled pairs that count as positives, or their mean Dice weight. Near 1, almost every
    pair of labeled clips is a positive and the labels add little contrast (dense multi-label catalogs at
    ``--label-threshold 1``). On a seeded sample of ``max_tracks``; None with fewer than two labeled tracks."""
    labeled = sorted(t for t, tags in plan.kept.items() if tags)
    if len(labeled) < 2:
        return None
    if len(labeled) > max_tracks:
        labeled = sorted(np.random.default_rng(0).choice(labeled, max_tracks, replace=False).tolist())
    labels = torch.from_numpy(label_matrix([plan.kept[t] for t in labeled], plan.vocabulary))
    targets = target_matrix(torch.arange(len(labeled)), labels, threshold, weighted)
    return float(targets.sum()) / (len(labeled) * (len(labeled) - 1))


def label_facts(plan: LabelPlan, cfg: PretrainConfig) -> dict[str, Any]:
    """What a model card records of the labels pretraining used, with their mean target (``positive_share``)."""
    return {
        "p_s": cfg.p_s,
        "b_s": cfg.b_s,
        "labeled_tracks_in_catalog": plan.labeled_in_catalog,
        "labeled_tracks_used": plan.labeled_used,
        "tags_used": len(plan.vocabulary),
        "positives": "Dice-weighted" if cfg.weighted else f"--label-threshold {cfg.label_threshold}",
        "mean_label_target": positive_share(plan, cfg.label_threshold, cfg.weighted),
    }


def describe_labels(facts: dict[str, Any]) -> str:
    """One line on the labels pretraining uses (``label_facts``), with a hint when most pairs are positives."""
    line = (
        f"labels: {facts['labeled_tracks_used']} of {facts['labeled_tracks_in_catalog']} labeled tracks used "
        f"(p_s {facts['p_s']}), {facts['tags_used']} tags"
    )
    share = facts["mean_label_target"]
    if share is None:
        return line
    line += f"; mean target between two labeled tracks {share:.0%} ({facts['positives']})"
    if share > POSITIVES_WARNING:
        line += (
            ": most labeled pairs are positives, so the labels separate few clips "
            "(--weighted true or a higher --label-threshold lower this; docs/STUDY.md)"
        )
    return line


# --------------------------------------------------------------------------- training data and batches


@dataclass
class TrainingData:
    """A worker's share of the training audio in memory: int16 samples, segments and multi-hot labels."""

    samples: np.ndarray  # all tracks' int16 audio, concatenated
    offsets: np.ndarray  # [n + 1] start of each track in ``samples``
    segments: np.ndarray  # [n] segment length of each track
    labels: np.ndarray  # [n, V] float32 multi-hot; all zeros for an unlabeled track

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
    """Views ``[2B, T]`` (all first views, then all second views) and the clips' labels ``[B, V]``."""

    views: torch.Tensor
    labels: torch.Tensor

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
    return Batch(views=x, labels=torch.from_numpy(labels))


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
                batch = Batch(batch.views.pin_memory(), batch.labels.pin_memory())
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


# --------------------------------------------------------------------------- the step


def global_loss(
    z: torch.Tensor, labels: torch.Tensor, tau: float, threshold: int, weighted: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SemiSupCon over the global batch for this worker's anchors.

    ``z`` ``[2B, d]`` holds this worker's views (first views, then second views) and ``labels`` ``[B, V]``
    its clips' labels. Returns the mean loss of the local anchors (what this worker backpropagates: with
    DDP averaging gradients, the update is that of the global mean), the per-anchor losses, and which
    anchors are labeled. The mean over workers of the returned loss is the loss of the global batch.
    """
    rank, _ = distributed()
    n_views, n_clips = z.shape[0], labels.shape[0]
    clip_ids = torch.arange(n_clips, device=z.device).repeat(2) + rank * n_clips
    view_labels = labels.repeat(2, 1)
    z_all = gather(z)
    targets = target_matrix(gather_constant(clip_ids), gather_constant(view_labels), threshold, weighted)
    anchors = torch.arange(n_views, device=z.device) + rank * n_views
    per_anchor = semisupcon_anchor_losses(z_all, targets, tau, anchors)
    return per_anchor.mean(), per_anchor.detach(), view_labels.sum(dim=1) > 0


def train_step(
    model: nn.Module,
    augment: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: PretrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """One optimisation step; returns ``[loss, labeled sum, labeled count, unlabeled sum, unlabeled count]``.

    The sums are detached, for logging, and are all-reduced across workers by the caller when it logs.
    On CUDA with ``precision="bf16"`` the model runs under bf16 autocast; the loss is always float32.
    """
    x = augment(batch.views.to(device, non_blocking=True))
    labels = batch.labels.to(device, non_blocking=True)
    with torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.precision == "bf16"
    ):
        z = model(x)
    loss, per_anchor, is_labeled = global_loss(z.float(), labels, cfg.tau, cfg.label_threshold, cfg.weighted)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    labeled = is_labeled.float()  # masks, not indexing: the step never waits for the GPU
    unlabeled = 1.0 - labeled
    return torch.stack(
        [loss.detach(), per_anchor @ labeled, labeled.sum(), per_anchor @ unlabeled, unlabeled.sum()]
    )


def learning_rate(step: int, cfg: PretrainConfig, trained_s: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to zero at the end of training:
    at ``steps``, or with a time budget (``minutes``) at whichever comes first, steps or training time."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.cosine:
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.minutes:
        progress = max(progress, trained_s / (60.0 * cfg.minutes))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- checkpoints


def build(
    cfg: PretrainConfig, device: torch.device
) -> tuple[ContrastiveModel, torch.optim.Optimizer, ViewAugment]:
    """Model, Adam and the augmentation chain, seeded so every worker starts from the same weights.

    With several workers and ``sync_bn``, BatchNorm normalises over the global batch, so N workers compute
    the step one process would on the whole batch.
    """
    torch.manual_seed(cfg.seed)
    spec_augment = SpecAugment(cfg.augment_config())
    model = ContrastiveModel(cfg.encoder_config(), spec_augment if spec_augment.enabled() else None)
    if cfg.sync_bn and distributed()[1] > 1:
        model = sync_batchnorm(model, device)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return model, optimizer, ViewAugment(cfg.augment_config()).to(device)


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: PretrainConfig, trained_s: float = 0.0
) -> dict:
    """Everything a resume needs, as tensors and plain values only (safe for ``weights_only`` loading):
    weights, optimizer, the step and the seconds trained so far (a time budget spans resumes)."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "trained_s": float(trained_s),
        "config": cfg.as_dict(),
        "code_version": versions.code_version(),
    }


def save_checkpoint(state: dict, directory: str) -> None:
    """Write ``state`` into a local checkpoint directory."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(directory, CHECKPOINT_FILE), buffer.getvalue())


def load_checkpoint(directory: str) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; only tensors and plain values are unpickled."""
    return torch.load(
        io.BytesIO(storage.read_bytes(storage.join(directory, CHECKPOINT_FILE))), weights_only=True
    )


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest checkpoint folder of the Ray Train run at ``run_uri`` (Ray names them by time), or None."""
    files = storage.list_files(run_uri, suffix="/" + CHECKPOINT_FILE)
    return storage.parent(files[-1]) if files else None


def check_resume(cfg: PretrainConfig, run_uri: str) -> None:
    """Refuse to resume the run at ``run_uri`` with a config that changes what training computes.

    Reads the config saved in the run's newest checkpoint, without Ray, so a mistaken re-run fails before
    any worker starts. A run without a checkpoint starts from scratch and takes any config.
    """
    directory = latest_checkpoint(run_uri)
    if directory is None:
        return
    conflicts = resume_conflicts(load_checkpoint(directory)["config"], cfg)
    if conflicts:
        raise ConfigError(
            f"run {cfg.run_name!r} ({run_uri}) has a checkpoint trained with another config:\n  "
            + "\n  ".join(conflicts)
            + f"\nonly {', '.join(_option(f) for f in sorted(RESUMABLE_FIELDS))} may change when resuming; "
            "pass the checkpoint's values or start a new run with another --run-name"
        )


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> tuple[int, float]:
    """Load model and optimizer state; return the step to continue from and the seconds trained so far."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state.get("trained_s", 0.0))


# --------------------------------------------------------------------------- the loop

Report = Callable[[int, dict[str, float], bool], None]


def seed_augmentations(seed: list[int]) -> None:
    """Seed torch's generator, which every augmentation draws from."""
    torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))


def out_of_time(trained_s: float, cfg: PretrainConfig, world: int, device: torch.device) -> bool:
    """Whether the time budget (``minutes``) is spent. With several workers, by the slowest worker's clock
    (one all-reduce), so every worker stops at the same step."""
    if not cfg.minutes:
        return False
    if world > 1:
        clock = torch.tensor([trained_s], device=device)
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)
        trained_s = float(clock)
    return trained_s >= 60.0 * cfg.minutes


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    augment: nn.Module,
    data: TrainingData,
    cfg: PretrainConfig,
    device: torch.device,
    start_step: int = 0,
    report: Report | None = None,
    start_seconds: float = 0.0,
) -> dict[str, float]:
    """Train from ``start_step`` to ``cfg.steps`` (or until ``cfg.minutes`` of training, counted from
    ``start_seconds``); call ``report(step, metrics, checkpoint_due)`` every log and at the end.

    ``model`` may be wrapped in DDP. Metrics are averaged over the steps since the last report and over
    workers: total / labeled / unlabeled loss, learning rate, clips/s of the whole job, the share of step
    time this worker waited for a batch, and the seconds trained so far (``trained_s``: steps only, not
    reports or checkpoints). Returns the last metrics. Batches and augmentations are seeded from
    ``cfg.seed``, the worker's rank and ``start_step``: on CPU a run with no time budget is reproducible
    from its seed, and workers draw independent augmentations.
    """
    rank, world = distributed()
    n_clips = cfg.batch_size // world
    seed = [cfg.seed, rank, start_step]  # a resumed run draws new batches, not the first ones again
    seed_augmentations(seed)
    stream = batches(data, n_clips, cfg.b_s, cfg.views, seed, cfg.prefetch, pin=device.type == "cuda")
    model.train()
    sums = torch.zeros(5, device=device)
    wait = steps_done = 0
    trained_s = start_seconds
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(start_step, cfg.steps):
        t_wait = time.perf_counter()
        batch = next(stream)
        wait += time.perf_counter() - t_wait
        lr = learning_rate(step, cfg, trained_s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums += train_step(model, augment, optimizer, batch, cfg, device)
        steps_done += 1
        done = step + 1
        trained_s += time.perf_counter() - t_wait
        last = done == cfg.steps or out_of_time(trained_s, cfg, world, device)
        checkpoint_due = done % cfg.checkpoint_every == 0 or last
        if done % cfg.log_every == 0 or checkpoint_due:
            if world > 1:
                dist.all_reduce(sums)
            s = sums.tolist()
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": done,
                "loss": s[0] / (steps_done * world),
                "loss_labeled": s[1] / s[2] if s[2] else float("nan"),
                "loss_unlabeled": s[3] / s[4] if s[4] else float("nan"),
                "lr": lr,
                "clips_per_s": steps_done * cfg.batch_size / elapsed,
                "data_wait": wait / elapsed,
                "trained_s": trained_s,
            }
            if report is not None:
                report(done, metrics, checkpoint_due)
            sums.zero_()
            wait = steps_done = 0
            t0 = time.perf_counter()
        if last:
            break
    stream.close()
    return metrics


def progress_line(metrics: dict[str, float], total_steps: int) -> str:
    """One regular progress line for the logs."""
    m = metrics
    return (
        f"step {m['step']}/{total_steps} | loss {m['loss']:.4f} (labeled {m['loss_labeled']:.4f}, "
        f"unlabeled {m['loss_unlabeled']:.4f}) | lr {m['lr']:.2e} | {m['clips_per_s']:.1f} clips/s | "
        f"data wait {100 * m['data_wait']:.1f}%"
    )
