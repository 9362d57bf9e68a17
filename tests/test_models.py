"""Both encoder families: shapes and cost, the log-mel front end, export and safe load, BatchNorm folding
and synchronisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from musiclib.audio import CHUNK_SAMPLES
from musiclib.core import storage, versions
from musiclib.datasets import audio_files
from musiclib.embed import chunking
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
    loaded, prep = models.load_encoder(root, model_id)
    card = models.load_card(root, model_id)
    assert card["config"]["width"] == 0.125 and card["architecture"] == "SampleCNN"
    assert prep == models.Preprocessing.of(enc.config) and prep.frontend is None
    assert models.load_encoder(storage.join(root, model_id))[1] == prep  # the model's folder alone
    old_card = {"config": card["config"], "preprocessing": {"scale": "int16 audio divided by 32767"}}
    assert models.Preprocessing.from_card(old_card) == prep  # a card written before the fields were
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
    model_id = models.export_random_encoder(root, models.EncoderConfig(width=0.0625), seed=0)
    assert torch.rand(1) == before  # the caller's random stream is untouched
    assert (
        models.model_id_or_latest(root)
        == model_id
        == models.export_random_encoder(root, models.EncoderConfig(width=0.0625), seed=0)
    )
    assert models.export_random_encoder(root, models.EncoderConfig(width=0.0625), seed=1) != model_id
    encoder, _ = models.load_encoder(root, model_id)
    assert encoder.config.width == 0.0625


@pytest.mark.parametrize(
    "config",
    [
        models.EncoderConfig(width=0.125),
        models.EncoderConfig(family="melcnn", width=0.125, n_mels=32, hop=1024),
    ],
    ids=["samplecnn", "melcnn"],
)
def test_fold_batchnorm_computes_the_same_function(config):
    """The folded copy equals conv → BatchNorm (eval) → … in float64, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    encoder = models.build_encoder(config).double().eval()
    batchnorms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    conv_bns = [m for m in encoder.modules() if isinstance(m, batchnorms)]
    for bn in conv_bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    folded = models.fold_batchnorm(encoder)
    folded_kind = torch.nn.BatchNorm1d if config.family == "samplecnn" else torch.nn.BatchNorm2d
    assert not any(isinstance(m, folded_kind) for m in folded.modules())
    assert any(isinstance(m, batchnorms) for m in encoder.modules())  # the original is untouched
    x = torch.randn(3, CHUNK_SAMPLES, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), encoder(x), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- the log-mel CNN

MEL = models.EncoderConfig(family="melcnn", width=0.125, n_mels=32, hop=1024)


def test_melcnn_shapes_cost_and_widest_activation():
    """The embedding is mean and max over time of every (channel, band) of the last block; the widest
    activation the config names is the one a forward makes (CPU forwards are sized by it)."""
    torch.manual_seed(0)
    enc = models.build_encoder(MEL)
    assert isinstance(enc, models.MelCNN) and MEL.embed_dim == 2 * 64 * 2
    assert enc(torch.zeros(3, CHUNK_SAMPLES)).shape == (3, MEL.embed_dim)
    sizes = [enc.frontend.mel.spectrogram(torch.zeros(1, CHUNK_SAMPLES)).numel()]
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel())) for m in enc.net]
    enc(torch.zeros(1, CHUNK_SAMPLES))
    for h in hooks:
        h.remove()
    assert MEL.widest_activation() == max(sizes)
    same_width = models.SampleCNN(models.EncoderConfig(width=0.125))
    assert models.count_parameters(enc) < models.count_parameters(same_width)
    assert models.ContrastiveModel(MEL)(torch.zeros(2, CHUNK_SAMPLES)).shape == (2, 128)


def test_melcnn_front_end_is_the_log_mel_spectrogram():
    """The front end equals torchaudio's spectrogram and mel filter bank computed directly, in float64."""
    enc = models.build_encoder(MEL).double()
    x = 0.1 * torch.randn(2, CHUNK_SAMPLES, dtype=torch.float64)
    window = torch.hann_window(MEL.n_fft).double()  # the module builds its window in float32
    power = torchaudio.functional.spectrogram(
        x, 0, window, MEL.n_fft, MEL.hop, MEL.n_fft, power=2.0, normalized=False
    )
    fb = torchaudio.functional.melscale_fbanks(
        MEL.n_fft // 2 + 1, 0.0, MEL.sample_rate / 2, MEL.n_mels, MEL.sample_rate
    )
    expected = torch.log(
        torch.matmul(power.transpose(-1, -2), fb.double()).transpose(-1, -2) + models.LOG_OFFSET
    )
    got = enc.frontend(x)
    assert got.dtype == torch.float64 and got.shape == (2, MEL.n_mels, MEL.frames)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    bf16 = x.float().to(torch.bfloat16)
    assert models.build_encoder(MEL).frontend(bf16).dtype == torch.float32  # never an STFT in bf16


def test_melcnn_export_and_load_round_trip_with_its_preprocessing(tmp_path):
    torch.manual_seed(0)
    enc = models.build_encoder(MEL).eval()
    root = str(tmp_path / "models")
    model_id = models.export_encoder(enc, root)
    assert model_id.startswith("melcnn-w0.125-")
    loaded, prep = models.load_encoder(root)  # the latest model of the root
    card = models.load_card(root, model_id)
    assert isinstance(loaded, models.MelCNN) and card["architecture"] == "MelCNN"
    assert card["config"]["n_mels"] == 32 and card["config"]["hop"] == 1024
    assert prep.int16_scale == 32767 and prep.frontend["n_mels"] == 32 and prep.frontend["hop_length"] == 1024
    x = torch.randn(2, CHUNK_SAMPLES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), enc(x))
    assert models.export_random_encoder(root, MEL, seed=0) != models.export_random_encoder(root, MEL, seed=1)


def test_melcnn_sync_batchnorm_converts_every_batchnorm_and_keeps_the_state_dict():
    plain = models.build_encoder(MEL)
    synced = models.sync_batchnorm(models.build_encoder(MEL), torch.device("cpu"))
    assert sum(isinstance(m, models.SyncBatchNorm2d) for m in synced.modules()) == 4
    assert sum(isinstance(m, models.SyncBatchNorm1d) for m in synced.modules()) == 1  # the bands
    plain.load_state_dict(synced.state_dict())


def test_encoder_config_problems_name_the_option():
    assert models.EncoderConfig(family="vit").problems() == [
        "--encoder 'vit' must be one of samplecnn, melcnn"
    ]
    assert "--n-mels 40" in models.EncoderConfig(family="melcnn", n_mels=40).problems()[0]
    assert "--hop" in models.EncoderConfig(family="melcnn", hop=4096, n_fft=1024).problems()[0]
    assert models.EncoderConfig(family="samplecnn", n_mels=40).problems() == []  # SampleCNN has no front end


def _stereo(seconds: float, sr: int) -> np.ndarray:
    """A stereo test signal: a different chord in each channel, with a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(0)
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)
    right = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    return np.stack([left, right]).astype(np.float32)


def test_the_card_says_enough_to_preprocess_without_musiclib(tmp_path):
    """From card.json alone (torchaudio and numpy, no musiclib code) a track becomes the encoder's input and
    the front end's output that the model computes; the same as ``Preprocessing.chunks``."""
    torch.manual_seed(0)
    root = str(tmp_path / "models")
    model_id = models.export_encoder(models.build_encoder(MEL).eval(), root)
    card = json.loads((tmp_path / "models" / model_id / "card.json").read_text())
    prep = card["preprocessing"]
    x, sr, max_chunks = _stereo(12.0, 44100), 44100, 3  # 4 full chunks: 3 of them, spread

    mono = x.mean(axis=0)
    resampler = {k: v for k, v in prep["resampler"].items() if k != "function"}
    y = torchaudio.functional.resample(torch.from_numpy(mono), sr, prep["sample_rate"], **resampler).numpy()
    y = np.clip(np.round(y * prep["int16_scale"]), -32768, 32767) / prep["int16_scale"]
    n, length = len(y), prep["chunk_samples"]
    starts = np.round(np.linspace(0, n - length, max_chunks)).astype(int) if n // length > max_chunks else []
    chunks = torch.tensor(np.stack([y[s : s + length] for s in starts]), dtype=torch.float32)
    front = prep["frontend"]
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=prep["sample_rate"],
        n_fft=front["n_fft"],
        win_length=front["win_length"],
        hop_length=front["hop_length"],
        center=front["center"],
        pad_mode=front["pad_mode"],
        power=front["power"],
        n_mels=front["n_mels"],
        f_min=front["f_min"],
        f_max=front["f_max"],
        mel_scale=front["mel_scale"],
        norm=front["mel_norm"],
    )
    offset = float(front["log"].rsplit("+ ", 1)[1].rstrip(")"))

    encoder, preprocessing = models.load_encoder(root, model_id)
    ours = dataclasses.replace(preprocessing, max_chunks=max_chunks).chunks(x, sr)
    torch.testing.assert_close(ours, chunks)
    torch.testing.assert_close(encoder.frontend(chunks), torch.log(mel(chunks) + offset))


def test_the_readme_embeds_a_wav_file_as_the_embed_job_does(tmp_path):
    """The README's snippet, run as written on a tiny exported encoder, gives the embedding the embed job's
    path (decode, int16 chunks, forward, mean per track) gives the same file."""
    torch.manual_seed(0)
    root = tmp_path / "models"
    model_id = models.export_encoder(models.build_encoder(MEL).eval(), str(root))
    wav = tmp_path / "track.wav"
    wav.write_bytes(audio_files.encode(_stereo(9.0, 44100), 44100, "wav"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = (
        readme.split("## An exported encoder, anywhere", 1)[1].split("```python\n", 1)[1].split("```")[0]
    )
    assert 'load_encoder("data/demo/models")' in snippet and 'load("track.wav")' in snippet
    namespace: dict = {}
    exec(snippet.replace("data/demo/models", str(root)).replace("track.wav", str(wav)), namespace)

    encoder, _ = models.load_encoder(str(root), model_id)
    chunks, _, error = chunking.decode_track(str(wav))
    assert error is None and len(chunks) == 3
    expected = chunking.track_means(chunking.forward_chunks(encoder, chunks), np.array([len(chunks)]))[0]
    np.testing.assert_allclose(namespace["embedding"].numpy(), expected, rtol=1e-5, atol=1e-6)
