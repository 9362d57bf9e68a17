"""The encoder's own rate, without decoding: hours of audio per second through ``chunking.forward_chunks``
(int16 chunks in, embeddings out, host-to-device copies included), in float32 and under bf16 autocast, with
BatchNorm as trained and folded into the convolutions (``models.fold_batchnorm``, what the embed job runs).

    python -m bench.bench_encoder --chunks 8192 --width 1.0

On CUDA when there is a GPU, else on the CPU. This is the "GPU rate" of the sizing rule in the README
(decode cores per GPU). Prints one JSON line per setting.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from musiclib import audio
from musiclib.core.config import parse
from musiclib.embed import chunking
from musiclib.train import models


@dataclass
class BenchConfig:
    """Work and model of the encoder benchmark."""

    chunks: int = 8192  # 2.7 s chunks per timed pass
    width: float = 1.0
    chunk_batches: tuple[int, ...] = (64, 256)  # forward batch sizes to try


def timed_pass(module: torch.nn.Module, chunks: np.ndarray, chunk_batch: int, device: torch.device) -> float:
    """Seconds of one pass of ``chunks`` through ``module`` as the embed job's actors run it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    chunking.forward_chunks(module, chunks, chunk_batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse(BenchConfig, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    trained = models.SampleCNN(models.EncoderConfig(width=cfg.width)).eval().to(device)
    encoders = {"batchnorm": trained, "folded": models.fold_batchnorm(trained)}
    rng = np.random.default_rng(0)
    chunks = (rng.standard_normal((cfg.chunks, audio.CHUNK_SAMPLES), np.float32) * 3000).astype(np.int16)
    results = []
    settings = itertools.product(encoders.items(), cfg.chunk_batches, (False, True))
    for (batchnorm, encoder), chunk_batch, bf16 in settings:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            chunking.forward_chunks(encoder, chunks[: 2 * chunk_batch], chunk_batch, device)  # warm-up
            seconds = timed_pass(encoder, chunks, chunk_batch, device)
        result = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "width": cfg.width,
            "batchnorm": batchnorm,
            "chunk_batch": chunk_batch,
            "dtype": "bf16" if bf16 else "fp32",
            "chunks_per_s": cfg.chunks / seconds,
            "audio_hours_per_s": cfg.chunks * audio.CHUNK_SECONDS / 3600 / seconds,
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
