"""The view augmentations: the delay's index arithmetic against a float64 loop, probabilities, the chain."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from musiclib.augment import AugmentConfig, Delay, OneFilter, ViewAugment


def _delayed_reference(x: np.ndarray, d: int, volume: float) -> np.ndarray:
    """``(x[t] + volume * x[t - d]) / (1 + volume)``, with ``x[t - d] = 0`` before the start, in float64."""
    out = np.empty_like(x, dtype=np.float64)
    for t in range(x.shape[-1]):
        past = x[..., t - d] if t >= d else 0.0
        out[..., t] = (x[..., t] + volume * past) / (1.0 + volume)
    return out


@pytest.mark.parametrize("d", [1, 7, 49])
def test_delay_mixes_in_the_signal_d_samples_earlier(d):
    x = torch.randn(3, 1, 50, dtype=torch.float64)
    delay = Delay((d, d), p=1.0, sample_rate=1000)  # 1 kHz: d milliseconds are d samples
    np.testing.assert_allclose(delay(x).numpy(), _delayed_reference(x.numpy(), d, 0.5), rtol=1e-12)


def test_delay_draws_its_own_delay_per_example_within_the_range():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 600)
    x[:, :, 0] = 1.0  # an impulse: the echo lands at the delay
    y = Delay((100.0, 500.0), p=1.0, sample_rate=1000)(x)[:, 0]
    echoes = [int(torch.nonzero(row[1:])[0]) + 1 for row in y]
    assert all(100 <= e <= 500 for e in echoes) and len(set(echoes)) > 10
    torch.testing.assert_close(y[:, 0], torch.full((64,), 1 / 1.5))


def test_delay_longer_than_the_clip_is_clamped_inside_it():
    x = torch.randn(2, 1, 20, dtype=torch.float64)
    y = Delay((500.0, 500.0), p=1.0, sample_rate=1000)(x)  # 500 samples on a 20-sample clip: clamped to 19
    np.testing.assert_allclose(y.numpy(), _delayed_reference(x.numpy(), 19, 0.5), rtol=1e-12)


def test_delay_probability_zero_and_one():
    x = torch.randn(8, 1, 100)
    torch.testing.assert_close(Delay((5.0, 5.0), p=0.0, sample_rate=1000)(x), x)
    assert not torch.allclose(Delay((5.0, 5.0), p=1.0, sample_rate=1000)(x), x)


def test_the_chain_keeps_shape_and_skips_views_with_probability_one_minus_p_chain():
    torch.manual_seed(0)
    x = 0.1 * torch.randn(16, 22050)
    cfg = AugmentConfig(p_pitch=0.0)  # pitch shift is slow on CPU and is torch-audiomentations' own
    y = ViewAugment(cfg)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(ViewAugment(AugmentConfig(p_chain=0.0))(x), x)
    always = ViewAugment(AugmentConfig(p_chain=1.0, p_gain=1.0, p_pitch=0.0))(x)
    assert not any(torch.equal(a, b) for a, b in zip(always, x))  # every view changed


class _Scale(torch.nn.Module):
    """A stand-in filter with torch-audiomentations' call signature: multiplies by ``k``."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, samples: torch.Tensor, sample_rate: int) -> SimpleNamespace:
        return SimpleNamespace(samples=self.k * samples)


def test_one_filter_chooses_per_view_from_torchs_generator():
    x = torch.ones(64, 1, 10)
    one = OneFilter([_Scale(k) for k in (2.0, 3.0, 5.0, 7.0)])
    torch.manual_seed(0)
    y = one(x)
    factors = y[:, 0, 0]
    assert set(factors.tolist()) == {2.0, 3.0, 5.0, 7.0}  # every filter is used within one batch
    torch.testing.assert_close(y, factors[:, None, None].expand_as(x))  # one filter per view, whole view
    torch.manual_seed(0)
    torch.testing.assert_close(one(x), y)


def test_the_chain_is_fixed_by_the_torch_seed():
    x = 0.1 * torch.randn(16, 4096)
    chain = ViewAugment(AugmentConfig(p_chain=1.0, p_filter=1.0, p_pitch=0.0))
    torch.manual_seed(7)
    y = chain(x)
    torch.manual_seed(7)
    torch.testing.assert_close(chain(x), y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "field, value",
    [("p_gain", 1.5), ("gain_db", (5.0, -15.0)), ("delay_ms", (0.0, 10.0)), ("pitch_semitones", -1.0)],
)
def test_bad_augment_config_is_refused(field, value):
    with pytest.raises(ValueError):
        AugmentConfig(**{field: value}).validate()
