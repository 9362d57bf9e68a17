"""The augmentation chain's cost per batch, against the training step it feeds, and the batched noise, filters
and pitch shift against torch-audiomentations' one-example-at-a-time versions, on the same batch.

    python -m bench.bench_augment --batch-size 96 --width 1.0

On CUDA when there is a GPU, else on the CPU. Seconds per batch of ``2 * batch_size`` views (median of
``repeats`` after a warm-up): coloured noise with probability 1, one filter per view with probability 1
(``OneFilter``, and the four torch-audiomentations filters each applied to the views that chose it), the pitch
shift with probability 1, the default chain (``ViewAugment``), and one training step of the encoder on an
augmented batch (bf16 on CUDA, as pretraining runs it). Prints one JSON line at the end.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_audiomentations as ta
from torch import nn

from musiclib.audio import CHUNK_SAMPLES, SAMPLE_RATE
from musiclib.core.config import parse
from musiclib.train.augment import AugmentConfig, ColoredNoise, OneFilter, PitchShift, ViewAugment
from musiclib.train.data import Batch
from musiclib.train.pretraining import PretrainConfig, build, train_step


@dataclass
class BenchConfig:
    """Batch and model of the augmentation benchmark."""

    batch_size: int = 96  # clips; each gives two views
    width: float = 1.0  # SampleCNN width of the training step
    repeats: int = 5


def seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up, waiting for the GPU each time."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_example_filters(c: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """One of torch-audiomentations' four filters per view (probability 1), each on the views that chose it."""
    filters = [
        ta.BandPassFilter(*c.band_hz, p=1.0, output_type="dict"),
        ta.BandStopFilter(*c.band_hz, p=1.0, output_type="dict"),
        ta.HighPassFilter(*c.highpass_hz, p=1.0, output_type="dict"),
        ta.LowPassFilter(*c.lowpass_hz, p=1.0, output_type="dict"),
    ]

    def run(x: torch.Tensor) -> torch.Tensor:
        choice = torch.randint(len(filters), (x.shape[0],), device=x.device)
        out = x.clone()
        for k, f in enumerate(filters):
            views = torch.nonzero(choice == k).squeeze(1)
            if len(views):
                out[views] = f(x[views][:, None], sample_rate=SAMPLE_RATE).samples[:, 0]
        return out

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse(BenchConfig, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = 0.1 * torch.randn(2 * cfg.batch_size, CHUNK_SAMPLES, device=device)
    c = AugmentConfig()
    ours = OneFilter(c.band_hz, c.highpass_hz, c.lowpass_hz, p=1.0)
    theirs = per_example_filters(c)
    pitch = PitchShift(c.pitch_semitones, p=1.0)
    pitch_theirs = ta.PitchShift(
        -c.pitch_semitones, c.pitch_semitones, p=1.0, sample_rate=SAMPLE_RATE, output_type="dict"
    )
    noise = ColoredNoise(c.noise_snr_db, p=1.0)
    noise_theirs = ta.AddColoredNoise(*c.noise_snr_db, p=1.0, output_type="dict")
    chain = ViewAugment(c).to(device)
    train = PretrainConfig(width=cfg.width, num_workers=1, batch_size=cfg.batch_size)
    model, optimizer, _ = build(train, device)
    labels = torch.zeros(cfg.batch_size, 1)
    r = cfg.repeats
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "views": 2 * cfg.batch_size,
        "noise_batched_s": seconds(lambda: noise(x), r, device),
        "noise_per_example_s": seconds(lambda: noise_theirs(x[:, None], sample_rate=SAMPLE_RATE), r, device),
        "filter_batched_s": seconds(lambda: ours(x), r, device),
        "filter_per_example_s": seconds(lambda: theirs(x), r, device),
        "pitch_batched_s": seconds(lambda: pitch(x), r, device),
        "pitch_per_example_s": seconds(lambda: pitch_theirs(x[:, None], sample_rate=SAMPLE_RATE), r, device),
        "chain_s": seconds(lambda: chain(x), r, device),
        "train_step_s": seconds(
            lambda: train_step(model, nn.Identity(), optimizer, Batch(x, labels), train, device), r, device
        ),
    }
    result["noise_speedup"] = result["noise_per_example_s"] / result["noise_batched_s"]
    result["filter_speedup"] = result["filter_per_example_s"] / result["filter_batched_s"]
    result["pitch_speedup"] = result["pitch_per_example_s"] / result["pitch_batched_s"]
    result["chain_over_step"] = result["chain_s"] / result["train_step_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
