"""The hand-made floor: the mean and standard deviation of each log-mel band over a track.

``LogMel`` is encoder-like (``config.embed_dim``; chunks ``[B, T]`` to ``[B, 2 * n_mels]``), so the embed
stage's own forward pass runs it (``chunking.forward_chunks``). Per chunk it gives each mel band's mean
log-mel value and mean squared value over the chunk's frames; the average over a track's equal-length
chunks (``chunking.track_means``) makes them means over the track's frames, and ``moments_to_stats`` turns
those two moments into the band's mean and standard deviation (``track_stats``). The embed stage
computes them beside every encoder's output, from the same decoded chunks (the embeddings table's
``logmel`` column); ``embed_rows`` gives them as the embeddings of their own (the study's floor). The
track is what the encoders see too: up to ``max_chunks`` chunks of 2.7 s spread evenly over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torchaudio
from torch import nn

from musiclib.audio import SAMPLE_RATE
from musiclib.embed import chunking
from musiclib.embed import table as embeddings_table

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


def track_stats(
    floor: LogMel,
    samples: np.ndarray,
    n_chunks: np.ndarray,
    chunk_batch: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The statistics ``[tracks, 2 * n_mels]`` of consecutive tracks' int16 chunks ``samples`` (``n_chunks``
    each, as ``chunking.decoded_chunks`` gives them): per chunk the moments, per track their mean, then
    each band's mean and standard deviation."""
    moments = chunking.forward_chunks(floor, samples, chunk_batch, device)
    return moments_to_stats(chunking.track_means(moments, n_chunks))


def embed_rows(
    rows: pa.Table, base_dir: str, max_chunks: int, config: LogMelConfig = LogMelConfig()
) -> pa.Table:
    """Catalog rows (``track_id``, ``audio_uri``) to embeddings-table rows of the log-mel floor.

    The embed stage's decode (``chunking.decode_batch``) and statistics (``track_stats``, what the embed
    job's ``logmel`` column holds), with the statistics as the embedding and no ``logmel`` column of their
    own; a track that cannot be used keeps its reason and a null embedding.
    """
    decoded = chunking.decode_batch(rows, base_dir, max_chunks)
    ok, samples, n_chunks = chunking.decoded_chunks(decoded)
    stats = np.zeros((len(decoded), config.embed_dim), np.float32)
    stats[ok] = track_stats(LogMel(config), samples, n_chunks)
    return embeddings_table.from_decoded(decoded, config.model_id, stats)
