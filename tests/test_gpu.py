"""The CUDA paths: bf16 autocast in the training step, the encoder on the GPU, and the pretrain and embed jobs
with a GPU (Ray Train's NCCL group and device placement, Ray Data's GPU encoder actors).

Skipped without a CUDA device, as on CI; run them on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch import nn

from musiclib import audio, catalog
from musiclib.core import ray_env
from musiclib.core.config import Layout
from musiclib.datasets import demo
from musiclib.embed import chunking, embedder
from musiclib.embed import table as embeddings_table
from musiclib.train import models
from musiclib.train.augment import OneFilter, PitchShift, apply_filters, transpose
from musiclib.train.data import Batch
from musiclib.train.pretraining import PretrainConfig, ProjectionQueue, build, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = (
        torch.as_tensor(a, dtype=torch.float64).flatten(),
        torch.as_tensor(b, dtype=torch.float64).flatten(),
    )
    return float(a @ b / (a.norm() * b.norm()))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def _one_step(cfg: PretrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """One SGD step (lr 1: the update is the gradient) from the seeded weights on a fixed batch: the step's
    stats, the update and the dtype of the first convolution's output."""
    generator = torch.Generator().manual_seed(0)
    views = 0.1 * torch.randn(2 * cfg.batch_size, audio.CHUNK_SAMPLES, generator=generator)
    labels = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [1, 0], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.float32
    )
    model = build(cfg, device)[0]
    before = [p.detach().clone() for p in model.parameters()]
    dtypes: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, o: dtypes.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = train_step(
        model, nn.Identity(), optimizer, Batch(views, labels, torch.arange(len(labels))), cfg, device
    )
    update = torch.cat([(b - p.detach()).flatten().cpu() for b, p in zip(before, model.parameters())])
    return stats.cpu(), update, dtypes[0]


@pytest.mark.parametrize("family", ["samplecnn", "melcnn"])
def test_train_step_on_cuda_is_the_cpu_step_in_fp32_and_runs_bf16_autocast_by_default(monkeypatch, family):
    """``--precision fp32`` on CUDA computes the CPU's step (TF32 off); the default runs the convolutions in
    bf16 (the log-mel front end stays in float32), whose loss stays within a few percent. Its update is not
    compared: at initialisation the embeddings differ by less than bf16 resolves (docs/BENCHMARKS.md, GPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = PretrainConfig(encoder=family, width=0.25, num_workers=1, batch_size=8, p_pitch=0.0)
    cpu_stats, cpu_update, cpu_dtype = _one_step(cfg, CPU)
    fp32_stats, fp32_update, fp32_dtype = _one_step(replace(cfg, precision="fp32"), CUDA)
    bf16_stats, _, bf16_dtype = _one_step(cfg, CUDA)
    assert cpu_dtype == fp32_dtype == torch.float32 and bf16_dtype == torch.bfloat16
    torch.testing.assert_close(fp32_stats, cpu_stats, rtol=1e-4, atol=1e-4)
    assert cosine(fp32_update, cpu_update) > 0.9999
    torch.testing.assert_close(bf16_stats[0], cpu_stats[0], rtol=3e-2, atol=0.0)  # the loss
    torch.testing.assert_close(bf16_stats[[2, 4]], cpu_stats[[2, 4]])  # labeled and unlabeled counts


@pytest.mark.parametrize("family", ["samplecnn", "melcnn"])
def test_encoder_outputs_on_the_gpu_match_the_cpu(family):
    """``forward_chunks`` (what the embed job's actors run) gives the CPU's embeddings on CUDA."""
    torch.manual_seed(0)
    encoder = models.build_encoder(models.EncoderConfig(family=family, width=1.0)).eval()
    chunks = (np.random.default_rng(0).standard_normal((10, audio.CHUNK_SAMPLES)) * 3000).astype(np.int16)
    on_cpu = chunking.forward_chunks(encoder, chunks, chunk_batch=4)
    on_gpu = chunking.forward_chunks(encoder.to(CUDA), chunks, chunk_batch=4, device=CUDA)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    assert row_cosines(on_gpu, on_cpu).min() > 0.9999


def test_the_augmentations_on_the_gpu_match_the_cpu():
    """The batched filters and pitch shift (the chain's costly parts) give the CPU's views on CUDA."""
    torch.manual_seed(0)
    x = 0.1 * torch.randn(24, audio.CHUNK_SAMPLES)
    shifts = PitchShift(4.0, p=1.0).shifts
    chosen = [shifts[i % len(shifts)] for i in range(len(x))]
    on_gpu = transpose(x.to(CUDA), chosen).cpu()
    assert row_cosines(on_gpu.numpy(), transpose(x, chosen).numpy()).min() > 0.9999
    draw = OneFilter((200.0, 4000.0), (200.0, 2400.0), (150.0, 7500.0), p=1.0).draw(len(x))
    on_gpu = apply_filters(x.to(CUDA), draw).cpu()
    assert row_cosines(on_gpu.numpy(), apply_filters(x, draw).numpy()).min() > 0.9999


@pytest.mark.parametrize("family", ["samplecnn", "melcnn"])
def test_the_augmentation_chain_and_the_step_never_wait_for_the_gpu(family):
    """Every per-view decision is drawn on the host and the step's statistics are masked sums, so the CPU
    queues the next batch's chain and step while the GPU still runs this one: torch raises on any
    synchronising call in them (the log-mel views' augmentations and the queue included)."""
    spec = {"p_mix": 1.0, "p_crop": 1.0, "p_freq_mask": 1.0, "p_time_mask": 1.0, "queue": 32}
    cfg = PretrainConfig(
        encoder=family,
        width=0.25,
        num_workers=1,
        batch_size=8,
        p_chain=1.0,
        p_filter=1.0,
        p_pitch=1.0,
        **spec,
    )
    model, optimizer, chain = build(cfg, CUDA)
    queue = ProjectionQueue(cfg.queue, cfg.encoder_config().proj_dim, 2, CUDA)
    batch = Batch(
        0.1 * torch.randn(16, audio.CHUNK_SAMPLES).pin_memory(),
        torch.ones(8, 2).pin_memory(),
        torch.arange(8).pin_memory(),
    )
    train_step(model, chain, optimizer, batch, cfg, CUDA, queue)  # builds FFT plans, kernels, Adam state
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, chain, optimizer, batch, cfg, CUDA, queue)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
def test_pretrain_and_embed_jobs_train_and_embed_on_the_gpu(tmp_path):
    """The pretrain job on one GPU worker (NCCL group of one), then the embed job, whose encoder actors take
    the GPU; every track is embedded once, and as the CPU embeds it."""
    import ray

    from jobs import embed as embed_job
    from jobs import pretrain as pretrain_job

    root = str(tmp_path)
    demo.make_catalog(root, n_tracks=24, min_seconds=6.0, max_seconds=8.0)
    argv = ["--root", root, "--width", "0.25", "--num-workers", "1", "--device", "gpu", "--batch-size", "8"]
    argv += ["--steps", "4", "--log-every", "2", "--checkpoint-every", "2", "--p-pitch", "0"]
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    try:
        assert ray.cluster_resources().get("GPU", 0) >= 1
        model_id = pretrain_job.main(argv)
        cfg = embed_job.EmbedConfig(root=root, batch_size=4)
        device = ray_env.cluster_device(cfg.device)
        assert device.gpu and embedder.encoder_resources(cfg, device, ray.cluster_resources()) == (1.0, 1)
        summary = embed_job.run(cfg).result
    finally:
        ray.shutdown()
    layout = Layout(root)
    out = embeddings_table.read(layout.embeddings, model_id)
    ids = out.column("track_id").to_pylist()
    assert sorted(ids) == sorted(
        catalog.read(layout.catalog, columns=["track_id"]).column("track_id").to_pylist()
    )
    assert len(set(ids)) == len(ids) == summary.tracks
    encoder, _ = models.load_encoder(layout.models, model_id)
    reference, _ = embedder.embed_catalog(layout.catalog, encoder, model_id)
    ok = pc.invert(out.column("error").is_valid())
    got = out.filter(ok).sort_by("track_id")
    want = reference.filter(pc.invert(reference.column("error").is_valid())).sort_by("track_id")
    assert got.column("track_id").equals(want.column("track_id")) and len(got) > 0
    assert row_cosines(vectors(got), vectors(want)).min() > 0.9999
