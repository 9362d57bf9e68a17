"""SemiSupCon pretraining without Ray: config, the step, the loop, checkpoints.

Read top to bottom:
1. ``PretrainConfig``: every knob, checked by ``validate()`` before a cluster is busy.
2. The step: augment, encode, gather projections from every worker (gradients flow back through the
   gather), SemiSupCon loss over the global batch, Adam.
3. ``fit``: the loop both the Ray Train job and the plain single-process benchmark run, with a background
   batch sampler so the accelerator never waits on numpy, and checkpoints of plain tensors and values.

Which labeled tracks keep their tags (``p_s``) is ``musiclib.train.labels``; the training data in memory
and its batches of views (a share ``b_s`` of labeled clips, two views each) are ``musiclib.train.data``,
read from the shards of ``musiclib.train.shards``; the cross-worker gather is ``musiclib.train.gather``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from musiclib import audio
from musiclib.core import storage, tracking, versions
from musiclib.core.config import DEFAULT_ROOT, ConfigError, RayConfig, check
from musiclib.core.ray_env import DEVICES
from musiclib.train.augment import AugmentConfig, SpecAugment, ViewAugment
from musiclib.train.data import Batch, TrainingData, batches
from musiclib.train.gather import distributed, gather, gather_constant
from musiclib.train.losses import pair_targets, semisupcon_anchor_losses, target_matrix
from musiclib.train.models import ContrastiveModel, EncoderConfig, sync_batchnorm

VIEW_MODES = ("adjacent", "crops")
PRECISIONS = ("bf16", "fp32")
CHECKPOINT_FILE = "state.pt"


# --------------------------------------------------------------------------- config


@dataclass
class PretrainConfig(AugmentConfig, RayConfig):
    """SemiSupCon pretraining of an encoder on the catalog's train split (augmentation fields inherited)."""

    root: str = DEFAULT_ROOT
    catalog: str = ""  # the track catalog (musiclib.catalog); empty: <root>/catalog/tracks.parquet
    run_name: str = "pretrain"  # the Ray Train run's name under <root>/runs (a run resumes under its name)
    # "melcnn" (log-mel CNN: far ahead at CPU scale, docs/STUDY.md) or "samplecnn" (the papers' raw waveform)
    encoder: str = "melcnn"
    width: float = 1.0  # channel multiplier of the encoder; 0.25 trains on CPU in minutes
    n_mels: int = 64  # melcnn: log-mel bands
    n_fft: int = 1024  # melcnn: STFT size
    hop: int = 512  # melcnn: samples between two log-mel frames
    num_workers: int = 2  # DDP training workers
    # elastic below num_workers: a run that loses workers (a node) goes on with as few as this; 0: fixed size
    min_workers: int = 0
    device: str = "auto"  # auto: one GPU per worker when the cluster has or can scale to GPUs; cpu, gpu
    cpus_per_worker: int = 1  # CPUs of each worker (its torch threads)
    batch_size: int = 96  # clips per step over all workers; each clip gives two views
    steps: int = 10000  # training steps (each one global batch)
    minutes: float = 0.0  # also stop after this many minutes of training (0: no time budget)
    lr: float = 1e-4  # Adam learning rate
    warmup: int = 0  # linear warm-up steps
    cosine: bool = False  # cosine decay to zero after the warm-up
    tau: float = 0.1  # temperature of the contrastive loss
    queue: int = 0  # past projections every anchor also contrasts against (a MoCo-style queue; 0: none)
    label_threshold: int = 1  # two labeled clips are positives when they share at least this many tags
    weighted: bool = False  # Dice-weighted positives instead of the threshold
    idf: bool = False  # with --weighted: each tag counts log(labeled tracks / its tracks), rare tags most
    b_s: float = 0.5  # fraction of labeled clips in a batch
    p_s: float = 1.0  # fraction of the catalog's labeled tracks whose labels are used
    # "adjacent": two adjacent 2.7 s chunks of a random 5.4 s window; "crops": two independent random crops
    views: str = "adjacent"
    checkpoint_every: int = 500  # steps between two checkpoints
    keep_checkpoints: int = 2  # latest checkpoints kept
    max_failures: int = 3  # failed workers, and storage lost by the controller, retried (-1: no limit)
    log_every: int = 20  # steps between two progress lines
    seed: int = 0  # batches and augmentation draws (and the initial weights)
    shard_tracks: int = 32  # tracks per preparation shard
    max_track_seconds: float = 30.0  # longer tracks keep evenly spread segments totalling about this
    segment_seconds: float = 10.0  # length of each segment read from a long track
    prefetch: int = 4  # batches sampled ahead by the background thread
    sync_bn: bool = True  # BatchNorm statistics of the global batch when there are several workers (CLMR)
    precision: str = "bf16"  # on CUDA: "bf16" runs the model under bf16 autocast, "fp32" does not; CPU: fp32
    mlflow_uri: str = ""  # MLflow tracking: the config, metrics at every logged step, the card (empty: none)

    def validate(self) -> None:
        """Fail in seconds with a clear message, before Ray or any decoding starts."""
        problems = RayConfig.problems(self) + tracking.problems(self.mlflow_uri)
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
        if self.device not in DEVICES:
            problems.append(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.steps < 1 or self.lr <= 0 or self.tau <= 0 or self.minutes < 0:
            problems.append("--steps must be >= 1, --lr and --tau > 0, --minutes >= 0")
        if not 0 <= self.warmup < self.steps:
            problems.append(f"--warmup {self.warmup} must be in [0, steps)")
        if self.label_threshold < 1 or self.queue < 0:
            problems.append("--label-threshold must be >= 1 and --queue >= 0")
        if self.idf and not self.weighted:
            problems.append("--idf weighs tags in Dice targets: it needs --weighted true")
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
# batch streams; ``device`` the precision), so resuming with another value would train a model no config
# describes. With ``--cosine``, more ``--steps`` stretch the decay to the new end from the resumed step.
RESUMABLE_FIELDS = frozenset(
    {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "prefetch", "min_workers"}
    | {"cpus_per_worker", "root", "run_name", "ray_address", "num_cpus", "mlflow_uri"}
)


def _option(field: str) -> str:
    """A config field as its command-line option: ``log_every`` is ``--log-every``."""
    return "--" + field.replace("_", "-")


def resume_conflicts(saved: dict[str, Any], cfg: PretrainConfig) -> list[str]:
    """One line per field outside ``RESUMABLE_FIELDS`` whose value differs from the saved config's."""
    current = cfg.as_dict()
    lines = []
    for name in sorted((saved.keys() | current.keys()) - RESUMABLE_FIELDS):
        if name == "device" and current[name] == "auto":
            continue  # compared again once the job has chosen the device (jobs/pretrain.py)
        if name in saved and name in current and saved[name] == current[name]:
            continue
        was = repr(saved[name]) if name in saved else "not recorded"
        now = repr(current[name]) if name in current else "not a field any more"
        lines.append(f"{_option(name)}: {was} in the checkpoint, {now} now")
    return lines


# --------------------------------------------------------------------------- the step


class ProjectionQueue:
    """The last ``size`` projections of the global batch, without gradients, with their tracks and labels
    (first in, first out): more negatives, and positives, for a small batch. Every worker pushes the
    gathered global batch, so every worker holds the same queue. Not checkpointed: a resumed run starts
    with it empty."""

    def __init__(self, size: int, dim: int, n_tags: int, device: torch.device):
        self.z = torch.zeros(size, dim, device=device)
        self.tracks = torch.full((size,), -1, dtype=torch.long, device=device)
        self.labels = torch.zeros(size, n_tags, device=device)
        self.filled = self.next = 0

    def push(self, z: torch.Tensor, tracks: torch.Tensor, labels: torch.Tensor) -> None:
        rows = (self.next + torch.arange(len(z), device=z.device)) % len(self.z)
        self.z[rows], self.tracks[rows], self.labels[rows] = z.detach(), tracks, labels
        self.next = (self.next + len(z)) % len(self.z)
        self.filled = min(self.filled + len(z), len(self.z))


def global_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    threshold: int,
    weighted: bool,
    tracks: torch.Tensor | None = None,
    queue: ProjectionQueue | None = None,
    tag_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SemiSupCon over the global batch for this worker's anchors (and the ``queue``, when given).

    ``z`` ``[2B, d]`` holds this worker's views (first views, then second views), ``labels`` ``[B, V]`` its
    clips' labels and ``tracks`` ``[B]`` their tracks (needed with a queue); ``tag_weights`` ``[V]`` weigh
    the tags of Dice targets. Returns the mean loss of the
    local anchors (what this worker backpropagates: with DDP averaging gradients, the update is that of
    the global mean), the per-anchor losses, and which anchors are labeled. The mean over workers of the
    returned loss is the loss of the global batch. The global batch then joins the queue.
    """
    rank, _ = distributed()
    n_views, n_clips = z.shape[0], labels.shape[0]
    clip_ids = torch.arange(n_clips, device=z.device).repeat(2) + rank * n_clips
    view_labels = labels.repeat(2, 1)
    z_all, labels_all = gather(z), gather_constant(view_labels)
    targets = target_matrix(gather_constant(clip_ids), labels_all, threshold, weighted, tag_weights)
    anchors = torch.arange(n_views, device=z.device) + rank * n_views
    if queue is None or tracks is None:
        per_anchor = semisupcon_anchor_losses(z_all, targets, tau, anchors)
    else:
        tracks_all = gather_constant(tracks.repeat(2))
        q = slice(0, queue.filled)
        queue_targets = pair_targets(
            tracks_all[anchors],
            labels_all[anchors],
            queue.tracks[q],
            queue.labels[q],
            threshold,
            weighted,
            tag_weights,
        )
        per_anchor = semisupcon_anchor_losses(z_all, targets, tau, anchors, queue.z[q], queue_targets)
        queue.push(z_all, tracks_all, labels_all)
    return per_anchor.mean(), per_anchor.detach(), view_labels.sum(dim=1) > 0


def train_step(
    model: nn.Module,
    augment: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: PretrainConfig,
    device: torch.device,
    queue: ProjectionQueue | None = None,
    tag_weights: torch.Tensor | None = None,
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
    tracks = batch.tracks.to(device, non_blocking=True)
    loss, per_anchor, is_labeled = global_loss(
        z.float(), labels, cfg.tau, cfg.label_threshold, cfg.weighted, tracks, queue, tag_weights
    )
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
    if out_of_time(start_seconds, cfg, world, device):  # resumed after its time budget was spent
        return {}
    n_clips = cfg.batch_size // world
    seed = [cfg.seed, rank, start_step]  # a resumed run draws new batches, not the first ones again
    seed_augmentations(seed)
    stream = batches(data, n_clips, cfg.b_s, cfg.views, seed, cfg.prefetch, pin=device.type == "cuda")
    model.train()
    queue = None
    if cfg.queue:
        dim = cfg.encoder_config().proj_dim
        queue = ProjectionQueue(cfg.queue, dim, data.labels.shape[1], device)
    tag_weights = torch.from_numpy(data.idf).to(device) if cfg.idf else None
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
        sums += train_step(model, augment, optimizer, batch, cfg, device, queue, tag_weights)
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
