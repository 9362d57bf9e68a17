"""The study's hand-crafted floor: the mean and standard deviation of a track's log-mel spectrogram.

``LogMel`` is encoder-like (``config.embed_dim``; chunks ``[B, T]`` to ``[B, 2 * n_mels]``), so the embed
stage's own code runs it (``embedder.embed_batch``, which averages each track's chunk outputs). Per chunk
it gives each mel band's mean log-mel value and mean squared value over the chunk's frames; the embed
stage's average over a track's equal-length chunks makes them means over the track's frames, and
``moments_to_stats`` turns those two moments into the band's mean and standard deviation. The track is
what the encoders see too: up to ``max_chunks`` chunks of 2.7 s spread evenly over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torchaudio
from torch import nn

from musiclib.audio import SAMPLE_RATE
from musiclib.embed import embedder

LOG_OFFSET = 1e-6  # log(mel power + LOG_OFFSET): silence stays finite


@dataclass(frozen=True)
class LogMelConfig:
    """The spectrogram: ``n_mels`` bands from an ``n_fft``-point STFT every ``hop`` samples (power, centred)."""

    n_mels: int = 64
    n_fft: int = 1024
    hop: int = 512
    sample_rate: int = SAMPLE_RATE

    @property
    def embed_dim(self) -> int:
        return 2 * self.n_mels

    @property
    def model_id(self) -> str:
        """The id its embeddings are published under, as an encoder's model id."""
        return f"logmel-m{self.n_mels}-f{self.n_fft}-h{self.hop}"


class LogMel(nn.Module):
    """Chunks ``[B, T]`` to ``[B, 2 * n_mels]``: per band, the mean log-mel value and its mean square."""

    def __init__(self, config: LogMelConfig = LogMelConfig()):
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop, n_mels=config.n_mels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logmel = torch.log(self.mel(x).double() + LOG_OFFSET)  # [B, n_mels, frames], moments in float64
        return torch.cat([logmel.mean(-1), logmel.square().mean(-1)], dim=1).float()


def moments_to_stats(moments: np.ndarray) -> np.ndarray:
    """Per-track ``[mean, mean square]`` per band (the averaged ``LogMel`` outputs) to ``[mean, std]``."""
    n = moments.shape[1] // 2
    mean, square = moments[:, :n].astype(np.float64), moments[:, n:].astype(np.float64)
    return np.concatenate([mean, np.sqrt(np.maximum(square - mean**2, 0.0))], axis=1).astype(np.float32)


def embed_rows(
    rows: pa.Table, base_dir: str, max_chunks: int, config: LogMelConfig = LogMelConfig()
) -> pa.Table:
    """Catalog rows (``track_id``, ``audio_uri``) to embeddings-table rows of the log-mel floor.

    The embed stage's decode and average (``embedder.decode_batch``, ``embedder.embed_batch``) with
    ``LogMel`` as the encoder; a track that cannot be used keeps its reason and a null embedding.
    """
    decoded = embedder.decode_batch(rows, base_dir, max_chunks)
    table = embedder.embed_batch(LogMel(config), decoded, config.model_id)  # type: ignore[arg-type]
    ok = table.column("error").is_null().to_numpy(zero_copy_only=False)
    means = np.zeros((len(table), config.embed_dim), np.float32)
    if ok.any():
        values = table.column("embedding").filter(pa.array(ok)).combine_chunks().flatten()
        means[ok] = moments_to_stats(values.to_numpy(zero_copy_only=False).reshape(-1, config.embed_dim))
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(means.reshape(-1)), config.embed_dim, mask=pa.array(~ok)
    )
    return table.set_column(table.column_names.index("embedding"), "embedding", embedding)
