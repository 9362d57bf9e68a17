"""SampleCNN shapes and parameter count; export and safe load of an encoder."""

from __future__ import annotations

import json

import pytest
import torch

from musiclib.audio import CHUNK_SAMPLES
from musiclib.core import storage, versions
from musiclib.train import models


def test_samplecnn_matches_clmr_size_and_shapes():
    enc = models.SampleCNN()
    assert models.count_parameters(enc) == pytest.approx(2.37e6, rel=0.005)
    assert enc(torch.zeros(2, CHUNK_SAMPLES)).shape == (2, 512)
    head = models.ProjectionHead(512, 128)
    assert all(m.bias is None for m in head.net if isinstance(m, torch.nn.Linear))
    assert models.ContrastiveModel()(torch.zeros(3, 1, CHUNK_SAMPLES)).shape == (3, 128)


def test_narrow_variant():
    cfg = models.EncoderConfig(width=0.25)
    enc = models.SampleCNN(cfg)
    assert cfg.embed_dim == 128 and enc(torch.zeros(2, CHUNK_SAMPLES)).shape == (2, 128)
    assert models.count_parameters(enc) < models.count_parameters(models.SampleCNN()) / 10


def test_export_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = models.SampleCNN(models.EncoderConfig(width=0.125)).eval()
    root = str(tmp_path / "models")
    model_id = models.export_encoder(enc, root, card={"data": "unit test"})
    assert model_id == models.export_encoder(enc, root)  # same weights, same id
    assert (
        models.model_id_or_latest(root) == model_id == versions.latest_version(root)
    )  # published as the latest
    assert models.model_id_or_latest(root, "another-id") == "another-id"
    loaded, card = models.load_encoder(root, model_id)
    assert card["config"]["width"] == 0.125 and card["architecture"] == "SampleCNN"
    x = torch.randn(2, CHUNK_SAMPLES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc(x))
    raw = storage.read_bytes(storage.join(root, model_id, "encoder.safetensors"))
    assert not raw.startswith(b"\x80")  # safetensors, not a pickle
    assert json.loads(storage.read_bytes(storage.join(root, model_id, "card.json")))["model_id"] == model_id


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(storage.StorageError, match="run pretrain first"):
        models.model_id_or_latest(str(tmp_path))
    with pytest.raises(storage.StorageError, match="no exported model"):
        models.load_encoder(str(tmp_path), "samplecnn-w1-000000000000")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_batchnorm_keeps_the_plain_state_dict(device):
    """Either conversion exports a plain model (converted on the CPU: only the CUDA forward needs a GPU)."""
    torch.manual_seed(0)
    plain = models.SampleCNN(models.EncoderConfig(width=0.0625))
    synced = models.sync_batchnorm(models.SampleCNN(plain.config), torch.device(device))
    kind = models.SyncBatchNorm1d if device == "cpu" else torch.nn.SyncBatchNorm
    assert sum(isinstance(m, kind) for m in synced.modules()) == 11
    assert not any(type(m) is torch.nn.BatchNorm1d for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(synced.state_dict())  # strict: the exported encoder loads into the plain SampleCNN


def test_sync_batchnorm_alone_is_batchnorm():
    """Without a process group (one worker, the plain benchmark loop) the CPU module is BatchNorm1d."""
    torch.manual_seed(0)
    plain = models.SampleCNN(models.EncoderConfig(width=0.0625))
    synced = models.sync_batchnorm(models.SampleCNN(plain.config), torch.device("cpu"))
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(4, CHUNK_SAMPLES)
    torch.testing.assert_close(synced(x), plain(x))  # training mode: batch statistics, running ones updated
    torch.testing.assert_close(synced.state_dict(), plain.state_dict())
    torch.testing.assert_close(synced.eval()(x), plain.eval()(x))


def test_random_encoder_is_seeded_exported_latest_and_leaves_torch_rng_alone(tmp_path):
    root = str(tmp_path / "models")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model_id = models.export_random_encoder(root, width=0.0625, seed=0)
    assert torch.rand(1) == before  # the caller's random stream is untouched
    assert (
        models.model_id_or_latest(root)
        == model_id
        == models.export_random_encoder(root, width=0.0625, seed=0)
    )
    assert models.export_random_encoder(root, width=0.0625, seed=1) != model_id
    encoder, _ = models.load_encoder(root, model_id)
    assert encoder.config.width == 0.0625


def test_fold_batchnorm_computes_the_same_function():
    """The folded copy equals conv → BatchNorm (eval) → … in float64, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    encoder = models.SampleCNN(models.EncoderConfig(width=0.125)).double().eval()
    for bn in (m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    folded = models.fold_batchnorm(encoder)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in encoder.modules())  # the original is untouched
    x = torch.randn(3, CHUNK_SAMPLES, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), encoder(x), rtol=1e-9, atol=1e-9)
