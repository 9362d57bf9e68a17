"""SampleCNN raw-waveform encoder and projection head (CLMR / SemiSupCon), and their safe export.

The encoder maps 59,535 samples (2.7 s at 22,050 Hz) to a 512-d embedding (``512 * width`` for narrow
variants); the projection head maps it to the 128-d space where the contrastive loss lives. Downstream
jobs use the encoder output, never the projection. Several training workers share BatchNorm statistics
(``sync_batchnorm``), so they compute what one process would on the global batch. Exported models are
safetensors plus a JSON card, so loading one never unpickles anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from musiclib.audio import CHUNK_SAMPLES, SAMPLE_RATE
from musiclib.core import storage, versions

CHANNELS = (128, 128, 128, 256, 256, 256, 256, 256, 256, 512)  # stem, then the nine blocks' outputs


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a SampleCNN; ``width`` scales every channel count (0.25 for CPU demos)."""

    width: float = 1.0
    proj_dim: int = 128
    sample_rate: int = SAMPLE_RATE
    chunk_samples: int = CHUNK_SAMPLES

    def channels(self) -> list[int]:
        return [max(8, round(c * self.width)) for c in CHANNELS]

    @property
    def embed_dim(self) -> int:
        return self.channels()[-1]

    def widest_activation(self) -> int:
        """Values in the largest activation of one chunk's forward: the stem's or a block's conv output."""
        ch = self.channels()
        length = (self.chunk_samples - 3) // 3 + 1  # the stem: kernel 3, stride 3, no padding
        widest = length * ch[0]
        for c_out in ch[1:]:  # a block's conv keeps the length, its max-pool divides it by 3
            widest = max(widest, length * c_out)
            length //= 3
        return widest


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
    """Encoder plus projection head, as trained by pretraining."""

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.config = config
        self.encoder = SampleCNN(config)
        self.projector = ProjectionHead(config.embed_dim, config.proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fold_batchnorm(encoder: SampleCNN) -> SampleCNN:
    """An inference copy of ``encoder``: each BatchNorm folded into the convolution before it, in eval mode.

    In eval mode BatchNorm is a per-channel affine map, so it can live in the convolution's weights and
    bias; the copy computes the same function (up to rounding) with one elementwise pass per layer fewer,
    a large share of the encoder's time on a GPU (docs/BENCHMARKS.md, embed). For embedding only: the
    copy has no BatchNorm left to train. ``encoder`` itself is unchanged.
    """
    folded = copy.deepcopy(encoder).eval()
    layers = list(folded.net)
    for i, (conv, bn) in enumerate(zip(layers, layers[1:])):
        if isinstance(conv, nn.Conv1d) and isinstance(bn, nn.BatchNorm1d):
            layers[i], layers[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    folded.net = nn.Sequential(*layers)
    return folded


# --------------------------------------------------------------------------- synchronised BatchNorm


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch of every worker, on any device (torch's SyncBatchNorm is GPU-only).

    In training with several workers, each worker's count and per-channel mean and variance are gathered in
    one collective (``torch.distributed.nn``: gradients flow back to every worker) and merged as torch's CUDA
    SyncBatchNorm merges them, so each worker normalises exactly as one process would on the whole batch, and
    the running statistics follow the global batch too. One collective per layer, not two: each is a point
    where every worker waits for the slowest (docs/BENCHMARKS.md, pretrain). The normalisation is one fused
    ``x * scale + shift``, as BatchNorm's CPU kernel does it. With one worker, or in eval mode, it is
    ``BatchNorm1d``. Affine and tracking running statistics, as SampleCNN's; parameters and buffers are
    BatchNorm1d's, so state dicts load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
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


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm1d computing global-batch statistics across workers.

    On CUDA this is ``torch.nn.SyncBatchNorm`` (fused kernels, NCCL); elsewhere ``SyncBatchNorm1d``, since
    torch's refuses CPU tensors. Either keeps BatchNorm's state dict keys, so a checkpoint loads into the
    plain model. Convert before moving the model to ``device`` and before building its optimizer: the
    CPU conversion makes new parameters (on the CPU).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm1d):
        sync = SyncBatchNorm1d(module.num_features, module.eps, module.momentum)
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


def export_encoder(encoder: SampleCNN, models_root: str, card: dict[str, Any] | None = None) -> str:
    """Write ``<models_root>/<model_id>/{encoder.safetensors,card.json}``, publish it as the latest version of
    the models dataset (``versions.publish``, as every output) and return the model id.

    The id is ``samplecnn-w<width>-<digest of the weights>``: the same weights always get the same id, and
    exporting weights already exported keeps the first export (its card included).
    The card holds the architecture, the code version and whatever the caller adds (data, labels, metrics).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    model_id = f"samplecnn-w{encoder.config.width:g}-{_weights_digest(state)}"
    if versions.read_manifest(models_root, model_id) is not None:  # these weights are exported: keep that
        versions.set_latest(models_root, model_id)
        return model_id
    root = storage.join(models_root, model_id)
    storage.write_bytes(storage.join(root, "encoder.safetensors"), st_save(state))
    full_card = {
        "model_id": model_id,
        "architecture": "SampleCNN",
        "config": asdict(encoder.config),
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


def export_random_encoder(models_root: str, width: float, seed: int = 0) -> str:
    """Export a randomly initialised encoder (seeded) as the latest model; return its id.

    The untrained baseline every trained encoder must beat, and a small model for tests and benchmarks.
    The global torch random state is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = SampleCNN(EncoderConfig(width=width))
    return export_encoder(encoder, models_root, {"note": f"random initialisation, seed {seed}"})


def load_encoder(
    models_root: str, model_id: str, device: str | torch.device = "cpu"
) -> tuple[SampleCNN, dict]:
    """Load an exported encoder in eval mode and its card; safetensors only, nothing is unpickled."""
    card = load_card(models_root, model_id)
    state = st_load(_model_file(models_root, model_id, "encoder.safetensors"))
    encoder = SampleCNN(EncoderConfig(**card["config"]))
    encoder.load_state_dict(state)
    return encoder.to(device).eval(), card


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
