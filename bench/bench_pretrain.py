"""Pretraining step throughput: the Ray Train job against a plain single-process loop, in one run.

    python -m bench.bench_pretrain --root data/demo --width 0.25 --num-workers 2 --batch-size 16 --steps 40

Both sides run ``musiclib.train.pretraining.fit`` on the same model, global batch and training shards; the plain
loop gets as many torch threads as the Ray job has CPUs in total. Each side trains ``--steps`` steps and is
timed over the second half (the first half warms up). Prints clips/s of both, their ratio and the share
of step time spent waiting for a batch, as one JSON line at the end.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from jobs import pretrain as job
from musiclib.core import ray_env
from musiclib.core.config import Layout, parse
from musiclib.core.ray_env import ray_session
from musiclib.train.data import load_training_data
from musiclib.train.labels import plan_labels
from musiclib.train.pretraining import PretrainConfig, build, fit
from musiclib.train.shards import committed_shards


def plain_loop(cfg: PretrainConfig) -> dict[str, float]:
    """The single-process baseline: same data, model and ``fit``; no Ray, no DDP."""
    torch.set_num_threads(cfg.num_workers * cfg.cpus_per_worker)
    device = torch.device("cuda" if cfg.device == "gpu" else "cpu")  # the device the Ray run chose
    uris = committed_shards(Layout(cfg.root).shards)
    data = load_training_data(uris, plan_labels(uris, cfg.p_s, cfg.seed))
    model, optimizer, augment = build(cfg, device)
    windows: list[dict[str, float]] = []
    fit(model, optimizer, augment, data, cfg, device, 0, lambda step, m, due: windows.append(m))
    return windows[-1]


def main(argv: list[str]) -> dict[str, float]:
    cfg = parse(PretrainConfig, argv)
    run = f"bench-{int(time.time())}"
    cfg = PretrainConfig(
        **{**vars(cfg), "run_name": run, "log_every": cfg.steps // 2, "checkpoint_every": cfg.steps}
    )
    # the dashboard serves the State API that Ray Train's placement-group cleaner polls (ray_env.ray_session)
    with ray_session(num_cpus=cfg.num_workers * cfg.cpus_per_worker + 1, include_dashboard=True):
        cfg = dataclasses.replace(cfg, device=ray_env.cluster_device(cfg.device).name)
        job.prepare_shards(cfg, Layout(cfg.root))
        ray_metrics = job.train(cfg, Layout(cfg.root)).metrics
    plain = plain_loop(cfg)
    result = {
        "ray_clips_per_s": ray_metrics["clips_per_s"],
        "plain_clips_per_s": plain["clips_per_s"],
        "ratio": ray_metrics["clips_per_s"] / plain["clips_per_s"],
        "ray_data_wait": ray_metrics["data_wait"],
        "plain_data_wait": plain["data_wait"],
        "workers": cfg.num_workers,
        "batch_size": cfg.batch_size,
        "width": cfg.width,
        "measured_steps": cfg.steps - cfg.steps // 2,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
