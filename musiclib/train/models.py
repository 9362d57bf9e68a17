"""The encoders (two families), the projection head (CLMR / SemiSupCon), and their safe export.

Two encoder families map a 2.7 s chunk (59,535 samples at 22,050 Hz) to one embedding:

- ``samplecnn``: SampleCNN on the raw waveform, the papers' encoder (512-d, ``512 * width`` when narrow);
- ``melcnn``: a log-mel front end (part of the model, so it runs on the training device after the
  waveform augmentations) and a small 2-D CNN over it, pooled over time by mean and max (BYOL-A's
  encoder shape): about a tenth of SampleCNN's arithmetic at the same width.

The projection head maps an embedding to the 128-d space where the contrastive loss lives; downstream jobs
use the encoder output, never the projection. Several training workers share BatchNorm statistics
(``sync_batchnorm``), so they compute what one process would on the global batch. Exported models are
safetensors plus a JSON card (family, front end, input scaling), so loading one never unpickles anything.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torchaudio
import torchaudio.functional as AF
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from musiclib import audio
from musiclib.audio import CHUNK_SAMPLES, INT16_SCALE, SAMPLE_RATE
from musiclib.core import storage, versions

CHANNELS = (128, 128, 128, 256, 256, 256, 256, 256, 256, 512)  # stem, then the nine blocks' outputs
MEL_CHANNELS = (64, 128, 256, 512)  # the log-mel CNN's four blocks at width 1
FAMILIES = ("samplecnn", "melcnn")
LOG_OFFSET = 1e-6  # log(mel power + LOG_OFFSET): silence stays finite


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an encoder: its ``family``; ``width`` scales every channel count (0.25 for CPU demos).

    The log-mel fields set the ``melcnn`` front end: ``n_mels`` bands from an ``n_fft``-point STFT every
    ``hop`` samples (power, centred, natural log of power + ``LOG_OFFSET``); SampleCNN ignores them.
    """

    width: float = 1.0
    proj_dim: int = 128
    sample_rate: int = SAMPLE_RATE
    chunk_samples: int = CHUNK_SAMPLES
    family: str = "samplecnn"
    n_mels: int = 64
    n_fft: int = 1024
    hop: int = 512

    def channels(self) -> list[int]:
        base = CHANNELS if self.family == "samplecnn" else MEL_CHANNELS
        return [max(8, round(c * self.width)) for c in base]

    @property
    def frames(self) -> int:
        """Log-mel frames of one chunk (centred STFT)."""
        return self.chunk_samples // self.hop + 1

    @property
    def embed_dim(self) -> int:
        if self.family == "samplecnn":
            return self.channels()[-1]
        bands = self.n_mels >> len(MEL_CHANNELS)  # each block halves the bands
        return 2 * self.channels()[-1] * bands  # mean and max over time of every (channel, band)

    def widest_activation(self) -> int:
        """Values in the largest activation of one chunk's forward: a stem, conv or front-end output."""
        ch = self.channels()
        if self.family == "melcnn":
            bands, frames = self.n_mels, self.frames
            widest = (self.n_fft // 2 + 1) * frames  # the power spectrogram
            for c_out in ch:  # a block's conv keeps the size, its pooling halves both sides
                widest = max(widest, c_out * bands * frames)
                bands, frames = bands // 2, frames // 2
            return widest
        length = (self.chunk_samples - 3) // 3 + 1  # the stem: kernel 3, stride 3, no padding
        widest = length * ch[0]
        for c_out in ch[1:]:  # a block's conv keeps the length, its max-pool divides it by 3
            widest = max(widest, length * c_out)
            length //= 3
        return widest

    def problems(self) -> list[str]:
        """What makes this architecture unbuildable, one line each (configs list them with their own)."""
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"--encoder {self.family!r} must be one of {', '.join(FAMILIES)}")
        if not 0.0 < self.width <= 4.0:
            problems.append(f"--width {self.width} must be in (0, 4]")
        if self.family == "melcnn":
            if self.n_mels < 1 << len(MEL_CHANNELS) or self.n_mels % (1 << len(MEL_CHANNELS)):
                problems.append(
                    f"--n-mels {self.n_mels} must be a positive multiple of {1 << len(MEL_CHANNELS)}"
                )
            if not 0 < self.hop <= self.n_fft or self.n_fft < 2 * self.n_mels:
                problems.append(
                    f"need 0 < --hop <= --n-fft and --n-fft >= 2 * --n-mels (got {self.hop}, {self.n_fft})"
                )
            elif self.frames < 1 << len(MEL_CHANNELS):
                problems.append(
                    f"--hop {self.hop} leaves fewer than {1 << len(MEL_CHANNELS)} frames per chunk"
                )
        return problems


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> list[nn.Module]:
    return [nn.Conv1d(c_in, c_out, 3, stride=stride, padding=padding), nn.BatchNorm1d(c_out), nn.ReLU()]


class SampleCNN(nn.Module):
    """Stem conv (stride 3), nine [conv, BN, ReLU, max-pool 3] blocks, a last conv; flattened to the embedding."""

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.config = config
        ch = config.channels()
        layers = _conv_bn_relu(1, ch[0], stride=3, padding=0)
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [*_conv_bn_relu(c_in, c_out), nn.MaxPool1d(3)]
        layers += _conv_bn_relu(ch[-1], ch[-1])
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` or ``[B, 1, T]`` waveforms to ``[B, embed_dim]`` embeddings."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.net(x).flatten(1)


class LogMel(nn.Module):
    """Waveforms ``[B, T]`` to log-mel spectrograms ``[B, n_mels, frames]``, always in float32.

    torchaudio's ``MelSpectrogram`` (power, centred, HTK mel scale, no filter normalisation) and a natural
    log of power + ``LOG_OFFSET``. Autocast is off inside: an STFT in bf16 loses the quiet bands.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop, n_mels=config.n_mels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 or half up, float64 kept
            return torch.log(self.mel(x) + LOG_OFFSET)


def _conv2d_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class MelCNN(nn.Module):
    """Log-mel front end, BatchNorm per band, four [conv 3x3, BN, ReLU, max-pool 2x2] blocks, then every
    (channel, band) pooled over time by mean and max, concatenated (BYOL-A's pooling)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.frontend = LogMel(config)
        self.bands = nn.BatchNorm1d(config.n_mels)  # each band standardised by its own statistics
        ch = [1, *config.channels()]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [*_conv2d_bn_relu(c_in, c_out), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` waveforms to ``[B, embed_dim]`` embeddings."""
        return self.pool(self.features(self.frontend(x.reshape(x.shape[0], -1))))

    def features(self, spec: torch.Tensor) -> torch.Tensor:
        """Log-mel ``[B, n_mels, frames]`` to feature maps ``[B, C, bands, frames']``."""
        return self.net(self.bands(spec).unsqueeze(1))

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        """Feature maps ``[B, C, F, T]`` to ``[B, 2 * C * F]``: the mean and the max over time."""
        flat = maps.flatten(1, 2)
        return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)


Encoder = SampleCNN | MelCNN


def build_encoder(config: EncoderConfig) -> Encoder:
    """The encoder ``config.family`` names, with fresh weights from torch's generator."""
    return MelCNN(config) if config.family == "melcnn" else SampleCNN(config)


class ProjectionHead(nn.Module):
    """Linear (no bias), ReLU, Linear (no bias): the space the contrastive loss compares in."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, out_dim, bias=False)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ContrastiveModel(nn.Module):
    """Encoder plus projection head, as trained by pretraining.

    ``spec_augment`` (a ``melcnn`` encoder only) augments each view's log-mel spectrogram between the front
    end and the convolutions, in training mode; it holds no weights, so it is not part of the export.
    """

    def __init__(self, config: EncoderConfig = EncoderConfig(), spec_augment: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.projector = ProjectionHead(config.embed_dim, config.proj_dim)
        self.spec_augment = spec_augment if isinstance(self.encoder, MelCNN) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec_augment is None or not self.training:
            return self.projector(self.encoder(x))
        encoder = self.encoder
        spec = self.spec_augment(encoder.frontend(x))
        return self.projector(encoder.pool(encoder.features(spec)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fold_batchnorm(encoder: Encoder) -> Encoder:
    """An inference copy of ``encoder``: each BatchNorm folded into the convolution before it, in eval mode.

    In eval mode BatchNorm is a per-channel affine map, so it can live in the convolution's weights and
    bias; the copy computes the same function (up to rounding) with one elementwise pass per layer fewer,
    a large share of the encoder's time on a GPU (docs/BENCHMARKS.md, embed). For embedding only: the
    copy has no BatchNorm left to train. ``encoder`` itself is unchanged.
    """
    folded = copy.deepcopy(encoder).eval()
    layers = list(folded.net)
    for i, (conv, bn) in enumerate(zip(layers, layers[1:])):
        if isinstance(conv, nn.Conv1d | nn.Conv2d) and isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d):
            layers[i], layers[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    folded.net = nn.Sequential(*layers)
    return folded


# --------------------------------------------------------------------------- synchronised BatchNorm


class GlobalBatchNorm:
    """BatchNorm over the global batch of every worker, on any device (torch's SyncBatchNorm is GPU-only).

    In training with several workers, each worker's count and per-channel mean and variance are gathered in
    one collective (``torch.distributed.nn``: gradients flow back to every worker) and merged as torch's CUDA
    SyncBatchNorm merges them, so each worker normalises exactly as one process would on the whole batch, and
    the running statistics follow the global batch too. One collective per layer, not two: each is a point
    where every worker waits for the slowest (docs/BENCHMARKS.md, pretrain). The normalisation is one fused
    ``x * scale + shift``, as BatchNorm's CPU kernel does it. With one worker, or in eval mode, it is the
    BatchNorm it is mixed into (``SyncBatchNorm1d``, ``SyncBatchNorm2d``). Affine and tracking running
    statistics, as the encoders'; parameters and buffers are BatchNorm's, so state dicts load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)  # type: ignore[misc]
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_var, local_mean = torch.var_mean(x, dims, correction=0)
        count = x.new_tensor([x.numel() / x.shape[1]])
        stats = torch.stack(dist_nn.all_gather(torch.cat([count, local_mean, local_var])))  # [world, 1 + 2C]
        counts, means, variances = stats[:, :1], stats[:, 1 : 1 + x.shape[1]], stats[:, 1 + x.shape[1] :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (counts * (variances + (means - mean).square())).sum(0) / n
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * n / (n - 1), momentum)  # unbiased, as BatchNorm keeps it
        return torch.addcmul(shift.view(shape), x, scale.view(shape))


class SyncBatchNorm1d(GlobalBatchNorm, nn.BatchNorm1d):
    """``BatchNorm1d`` over the global batch (``GlobalBatchNorm``)."""


class SyncBatchNorm2d(GlobalBatchNorm, nn.BatchNorm2d):
    """``BatchNorm2d`` over the global batch (``GlobalBatchNorm``)."""


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm computing global-batch statistics across workers.

    On CUDA this is ``torch.nn.SyncBatchNorm`` (fused kernels, NCCL); elsewhere ``SyncBatchNorm1d`` and
    ``SyncBatchNorm2d``, since torch's refuses CPU tensors. Either keeps BatchNorm's state dict keys, so a checkpoint loads into the
    plain model. Convert before moving the model to ``device`` and before building its optimizer: the
    CPU conversion makes new parameters (on the CPU).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        kind = SyncBatchNorm1d if isinstance(module, nn.BatchNorm1d) else SyncBatchNorm2d
        sync = kind(module.num_features, module.eps, module.momentum)
        sync.load_state_dict(module.state_dict())
        return sync
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child, device))
    return module


# --------------------------------------------------------------------------- export


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class Preprocessing:
    """What a track goes through before the encoder, as the embed job does it: the card's ``preprocessing``,
    complete enough to redo it anywhere (``load_encoder`` returns it).

    The audio is decoded (FFmpeg through PyAV; integer samples divided by their type's maximum), down-mixed
    to mono by averaging the channels and resampled to ``sample_rate`` (``resampler``). It is then rounded
    to int16 and back: ``clip(round(x * int16_scale), -32768, 32767) / int16_scale``, as the embed job ships
    it. It is cut into chunks of ``chunk_samples``: consecutive from the start, a tail shorter than a chunk
    dropped; a track with more than ``max_chunks`` full chunks gives ``max_chunks`` of them starting at
    ``round(linspace(0, samples - chunk_samples, max_chunks))``. The encoder maps each float32 chunk
    ``[chunks, chunk_samples]`` to an embedding, and the track's embedding is their mean (``track``). A
    ``melcnn`` computes its log-mel ``frontend`` inside the model, from those chunks.
    """

    sample_rate: int = SAMPLE_RATE
    chunk_samples: int = CHUNK_SAMPLES
    max_chunks: int = 64  # the embed job's default (--max-chunks)
    channels: str = "mean"
    resampler: dict[str, Any] = field(default_factory=dict)
    int16_scale: float = INT16_SCALE
    track: str = "mean"
    frontend: dict[str, Any] | None = None

    @classmethod
    def of(cls, config: EncoderConfig) -> Preprocessing:
        """The preprocessing of an encoder of ``config``, read from the modules that do it."""
        defaults = inspect.signature(AF.resample).parameters
        resampler = {"function": "torchaudio.functional.resample"} | {
            name: defaults[name].default for name in ("resampling_method", "lowpass_filter_width", "rolloff")
        }
        frontend = None
        if config.family == "melcnn":
            mel = LogMel(config).mel
            spec, scale = mel.spectrogram, mel.mel_scale
            frontend = {
                "transform": "torchaudio.transforms.MelSpectrogram, inside the model",
                "n_fft": spec.n_fft,
                "win_length": spec.win_length,
                "hop_length": spec.hop_length,
                "window": "hann (periodic)",
                "center": spec.center,
                "pad_mode": spec.pad_mode,
                "power": spec.power,
                "n_mels": scale.n_mels,
                "f_min": scale.f_min,
                "f_max": scale.f_max,
                "mel_scale": scale.mel_scale,
                "mel_norm": scale.norm,
                "log": f"natural log of (power + {LOG_OFFSET:g})",
                "then": "a BatchNorm per band (its statistics are in the weights)",
            }
        return cls(config.sample_rate, config.chunk_samples, resampler=resampler, frontend=frontend)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Preprocessing:
        """The card's preprocessing; a card written before it was recorded gets its encoder's (the same)."""
        recorded = card.get("preprocessing") or {}
        if "sample_rate" not in recorded:
            return cls.of(EncoderConfig(**card["config"]))
        return cls(**{k: v for k, v in recorded.items() if k in {f.name for f in fields(cls)}})

    def chunks(self, waveform: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Float audio ``[samples]`` or ``[channels, samples]`` at ``sample_rate`` to the encoder's input."""
        x = np.asarray(waveform, dtype=np.float32)
        mono = x.mean(axis=0) if x.ndim == 2 else x
        x = audio.resample(mono, sample_rate, self.sample_rate)
        return self._input(audio.chunk(x, self.chunk_samples, self.max_chunks))

    def load(self, source: audio.Source) -> torch.Tensor:
        """An audio file (path, URI or bytes) to the encoder's input, decoded as the embed job decodes it
        (``audio.load_chunks``: long files are read window by window)."""
        chunks, _ = audio.load_chunks(source, self.max_chunks, self.sample_rate, self.chunk_samples)
        return self._input(chunks)

    def _input(self, chunks: np.ndarray) -> torch.Tensor:
        rounded = np.clip(np.round(chunks * self.int16_scale), -32768, 32767)
        return torch.from_numpy((rounded / self.int16_scale).astype(np.float32))


ARCHITECTURES = {"samplecnn": "SampleCNN", "melcnn": "MelCNN"}


def export_encoder(encoder: Encoder, models_root: str, card: dict[str, Any] | None = None) -> str:
    """Write ``<models_root>/<model_id>/{encoder.safetensors,card.json}``, publish it as the latest version of
    the models dataset (``versions.publish``, as every output) and return the model id.

    The id is ``<family>-w<width>-<digest of the weights>``: the same weights always get the same id, and
    exporting weights already exported keeps the first export (its card included). The card holds the
    architecture, its preprocessing, the code version and whatever the caller adds (data, labels, metrics).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    config = encoder.config
    model_id = f"{config.family}-w{config.width:g}-{_weights_digest(state)}"
    if versions.read_manifest(models_root, model_id) is not None:  # these weights are exported: keep that
        versions.set_latest(models_root, model_id)
        return model_id
    root = storage.join(models_root, model_id)
    storage.write_bytes(storage.join(root, "encoder.safetensors"), st_save(state))
    full_card = {
        "model_id": model_id,
        "architecture": ARCHITECTURES[config.family],
        "config": asdict(config),
        "preprocessing": asdict(Preprocessing.of(config)),
        "parameters": count_parameters(encoder),
        "code_version": versions.code_version(),
        **(card or {}),
    }
    storage.write_bytes(
        storage.join(root, "card.json"), json.dumps(full_card, indent=2, default=str).encode()
    )
    files = [storage.join(root, name) for name in ("encoder.safetensors", "card.json")]
    versions.publish(models_root, model_id, files, [0, 0], config=full_card)
    return model_id


def export_random_encoder(models_root: str, config: EncoderConfig, seed: int = 0) -> str:
    """Export a randomly initialised encoder (seeded) as the latest model; return its id.

    The untrained baseline every trained encoder must beat (the weights pretraining with ``seed`` starts
    from), and a small model for tests and benchmarks. The global torch random state is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = build_encoder(config)
    return export_encoder(encoder, models_root, {"note": f"random initialisation, seed {seed}"})


def load_encoder(
    uri: str, model_id: str = "", device: str | torch.device = "cpu"
) -> tuple[Encoder, Preprocessing]:
    """An exported encoder in eval mode and its preprocessing; safetensors only, nothing is unpickled.

    ``uri`` is a model's folder (``<root>/models/<model_id>``, local or S3), or a models root with
    ``model_id`` (empty: the latest model exported there).
    """
    uri = storage.normalize_uri(uri)
    if not model_id and storage.exists(storage.join(uri, "card.json")):
        models_root, model_id = storage.parent(uri), uri.rsplit("/", 1)[-1]
    else:
        models_root, model_id = uri, model_id_or_latest(uri, model_id)
    card = load_card(models_root, model_id)
    state = st_load(_model_file(models_root, model_id, "encoder.safetensors"))
    encoder = build_encoder(EncoderConfig(**card["config"]))
    encoder.load_state_dict(state)
    return encoder.to(device).eval(), Preprocessing.from_card(card)


def load_card(models_root: str, model_id: str) -> dict:
    """An exported encoder's card (``config`` holds its ``EncoderConfig``), without its weights."""
    return json.loads(_model_file(models_root, model_id, "card.json"))


def _model_file(models_root: str, model_id: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(models_root, model_id, name))
    except storage.StorageError as exc:
        raise storage.StorageError(f"no exported model {model_id!r} under {models_root}: {exc}") from exc


def model_id_or_latest(models_root: str, model_id: str = "") -> str:
    """``model_id``, or when empty the latest exported model; a clear error when nothing was exported yet."""
    model_id = model_id or versions.latest_version(models_root) or ""
    if not model_id:
        raise storage.StorageError(
            f"no exported model under {models_root}: run pretrain first or pass --model-id"
        )
    return model_id
