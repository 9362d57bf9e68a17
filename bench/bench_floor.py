"""What the log-mel statistics cost the embed job beside the encoder: seconds per 1,000 chunks of 2.7 s.

    python -m bench.bench_floor --chunks 256 --width 0.25 --threads 1 --repeats 5

The embed job's actors run the encoder and then the log-mel floor (``logmel.LogMel``) on the same int16
chunks through ``chunking.forward_chunks``, at the encoder's chunk batch (``embedder.chunks_per_forward``).
This times each on the same random chunks, in one process, with BatchNorm folded as the job runs it:
SampleCNN and the log-mel CNN at ``--width``, and the floor at each encoder's chunk batch, the two timed in
turn ``--repeats`` times (the fastest of each counts). ``--threads``
1 is an encoder actor with one CPU (Ray sets one thread per CPU of a task). On CUDA when there is a GPU,
else on the CPU. Prints one JSON line per module, then the floor's share of each encoder's pass.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from bench.bench_encoder import timed_pass
from musiclib import audio
from musiclib.core.config import parse
from musiclib.embed import embedder, logmel
from musiclib.train import models


@dataclass
class BenchConfig:
    """Work and models of the floor's benchmark."""

    chunks: int = 256  # 2.7 s chunks per timed pass
    width: float = 0.25
    threads: int = 1  # torch threads (0: torch's default)
    repeats: int = 5  # timed passes per module, the encoder's and the floor's in turn; the fastest counts


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse(BenchConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    chunks = (np.random.default_rng(0).standard_normal((cfg.chunks, audio.CHUNK_SAMPLES)) * 3000).astype(
        np.int16
    )
    floor = logmel.LogMel().to(device)
    results = []
    for family in models.FAMILIES:
        config = models.EncoderConfig(family=family, width=cfg.width)
        encoder = models.fold_batchnorm(models.build_encoder(config).eval().to(device))
        chunk_batch = embedder.chunks_per_forward(0, device.type == "cuda", config)
        pair = {f"{family} width {cfg.width}": encoder, "logmel floor": floor}
        for module in pair.values():
            timed_pass(module, chunks[: 2 * chunk_batch], chunk_batch, device)  # warm-up
        best = dict.fromkeys(pair, float("inf"))
        for _ in range(cfg.repeats):  # in turn, so a busy moment of the machine falls on both alike
            for name, module in pair.items():
                best[name] = min(best[name], timed_pass(module, chunks, chunk_batch, device))
        for name, s in best.items():
            result = {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(),
                "module": name,
                "chunk_batch": chunk_batch,
                "s_per_1000_chunks": 1000 * s / len(chunks),
            }
            print(json.dumps(result), flush=True)
            results.append(result)
        encoder_s, floor_s = (r["s_per_1000_chunks"] for r in results[-2:])
        print(
            json.dumps({"encoder": family, "floor_share_of_pass": floor_s / (encoder_s + floor_s)}),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
