"""bf16 autocast against fp32 in pretraining, on a GPU: step time, the loss curve of the same run in each, and
how far one step's gradients agree.

    python -m bench.bench_precision --root data/demo --steps 300

Needs CUDA and the training shards of ``--root`` (the pretrain job writes them). Both runs start from the
same seeded weights and draw the same batches and augmentations (pitch shift off, to keep them short).
Prints the training step time without augmentation, the two loss curves (every 20 steps) and the cosine
between the bf16 and fp32 gradients of one batch, at initialisation and for each trained model.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from musiclib.core.config import Layout, parse
from musiclib.train.data import load_training_data, sample_batch
from musiclib.train.labels import plan_labels
from musiclib.train.pretraining import PretrainConfig, build, fit, global_loss, train_step
from musiclib.train.shards import committed_shards


@dataclass
class BenchConfig:
    """Data, model and length of the precision comparison."""

    root: str = "data/demo"
    steps: int = 300
    width: float = 1.0
    batch_size: int = 96


def step_seconds(cfg: PretrainConfig, batch, device: torch.device, repeats: int = 10) -> float:
    """Mean time of ``train_step`` without augmentation, after three warm-up steps."""
    model, optimizer, _ = build(cfg, device)
    for i in range(3 + repeats):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        train_step(model, nn.Identity(), optimizer, batch, cfg, device)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def gradient_cosine(model: nn.Module, cfg: PretrainConfig, batch, device: torch.device) -> float:
    """Cosine between the gradients of one batch's loss under bf16 autocast and in fp32 (TF32 off)."""
    grads = []
    for bf16 in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            z = model(batch.views.to(device))
        global_loss(z.float(), batch.labels.to(device), cfg.tau, cfg.label_threshold, cfg.weighted)[
            0
        ].backward()
        grads.append(torch.cat([p.grad.detach().flatten().double() for p in model.parameters()]))
    return float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))


def main(argv: list[str] | None = None) -> dict:
    bench = parse(BenchConfig, argv)
    device = torch.device("cuda")
    uris = committed_shards(Layout(bench.root).shards)
    data = load_training_data(uris, plan_labels(uris, 1.0, 0))
    cfg = PretrainConfig(
        width=bench.width,
        num_workers=1,
        batch_size=bench.batch_size,
        p_pitch=0.0,
        steps=bench.steps,
        log_every=20,
        checkpoint_every=bench.steps,
    )
    batch = sample_batch(data, cfg.batch_size, cfg.b_s, cfg.views, np.random.default_rng(0))
    result: dict = {
        "step_s": {p: step_seconds(replace(cfg, precision=p), batch, device) for p in ("bf16", "fp32")}
    }
    trained = {}
    for precision in ("bf16", "fp32"):
        run = replace(cfg, precision=precision)
        model, optimizer, augment = build(run, device)
        curve: list[tuple[int, float]] = []
        fit(
            model,
            optimizer,
            augment,
            data,
            run,
            device,
            0,
            lambda s, m, _, curve=curve: curve.append((s, round(m["loss"], 4))),
        )
        result[f"loss_{precision}"] = curve
        trained[precision] = model
    torch.backends.cudnn.allow_tf32 = False
    other = sample_batch(data, cfg.batch_size, cfg.b_s, cfg.views, np.random.default_rng(1))
    result["grad_cosine"] = {"init": gradient_cosine(build(cfg, device)[0], cfg, other, device)}
    for precision, model in trained.items():
        result["grad_cosine"][f"trained_{precision}"] = gradient_cosine(model, cfg, other, device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
