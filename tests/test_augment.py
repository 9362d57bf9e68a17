"""The view augmentations: the delay and the noise against float64 references, the batched filters and pitch
shift against julius and torchaudio one example at a time, probabilities, the chain; the log-mel views'
mixing, crops and masks."""

from __future__ import annotations

import math
from fractions import Fraction

import julius
import numpy as np
import pytest
import torch
from torchaudio.functional import phase_vocoder, resample

from musiclib.train.augment import (
    ENVELOPE_FLOOR,
    AugmentConfig,
    ColoredNoise,
    Delay,
    Gain,
    OneFilter,
    PitchShift,
    PolarityInversion,
    SpecAugment,
    ViewAugment,
    apply_filters,
    lowpass,
    shape_noise,
    stretch,
    transpose,
)


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


def test_gain_scales_views_by_a_drawn_decibel_gain_with_probability_p():
    torch.manual_seed(0)
    x = torch.ones(4000, 3)
    ratio = Gain((-15.0, 5.0), p=0.4)(x)[:, 0]
    gained = ratio != 1.0
    db = 20 * torch.log10(ratio[gained].double())
    assert 0.37 < float(gained.double().mean()) < 0.43
    assert (
        -15.0 - 1e-4 <= float(db.min()) and float(db.max()) <= 5.0 + 1e-4 and abs(float(db.mean()) + 5) < 0.5
    )


def test_polarity_inversion_flips_views_with_probability_p():
    torch.manual_seed(0)
    x = torch.randn(4000, 3)
    y = PolarityInversion(p=0.6)(x)
    flipped = (y == -x).all(dim=1)
    assert bool(((y == x).all(dim=1) | flipped).all()) and 0.57 < float(flipped.double().mean()) < 0.63


def test_the_chain_keeps_shape_and_skips_views_with_probability_one_minus_p_chain():
    torch.manual_seed(0)
    x = 0.1 * torch.randn(16, 22050)
    cfg = AugmentConfig(p_pitch=0.0)  # pitch shift is slow on CPU and is torch-audiomentations' own
    y = ViewAugment(cfg)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(ViewAugment(AugmentConfig(p_chain=0.0))(x), x)
    always = ViewAugment(AugmentConfig(p_chain=1.0, p_gain=1.0, p_pitch=0.0))(x)
    assert not any(torch.equal(a, b) for a, b in zip(always, x))  # every view changed


def test_shape_noise_matches_its_definition_in_float64():
    white = torch.randn(3, 1000)
    decay = torch.tensor([-2.0, 0.0, 1.5])
    w = white.double().numpy()
    ramp = np.linspace(1.0, np.sqrt(500.0), 501)
    ref = np.fft.irfft(np.fft.rfft(w) / ramp ** decay.double().numpy()[:, None])
    ref /= np.sqrt((ref**2).mean(axis=1, keepdims=True)) + 1e-8
    np.testing.assert_allclose(shape_noise(white, decay, 1000).numpy(), ref, rtol=0, atol=2e-5)


def test_colored_noise_is_one_second_repeated_at_the_drawn_snr():
    torch.manual_seed(0)
    t = torch.arange(3000) / 1000.0
    x = (
        torch.sin(2 * np.pi * torch.linspace(50, 400, 64)[:, None] * t)
        * torch.linspace(0.1, 1.0, 64)[:, None]
    )
    y = ColoredNoise((3.0, 30.0), p=0.5, sample_rate=1000)(x)
    noise = y - x
    changed = noise.abs().amax(dim=1) > 0
    assert 10 < int(changed.sum()) < 54  # about half the views
    torch.testing.assert_close(
        noise[:, :1000], noise[:, 1000:2000], rtol=0, atol=1e-6
    )  # one second, repeated
    snr = 20 * torch.log10(x[changed].square().mean(1).sqrt() / noise[changed].square().mean(1).sqrt())
    assert 3.0 - 1e-3 <= float(snr.min()) and float(snr.max()) <= 30.0 + 1e-3 and float(snr.std()) > 3.0


def _julius_filter(x: torch.Tensor, kind: int, cutoff: float, band_low: float) -> torch.Tensor:
    """One view through torch-audiomentations' filter of ``OneFilter.KINDS[kind]`` (julius, one example)."""
    if kind < 2:
        band = julius.bandpass_filter(x, band_low, cutoff)
        return band if kind == 0 else x - band
    return julius.highpass_filter(x, cutoff) if kind == 2 else julius.lowpass_filter(x, cutoff)


def test_lowpass_matches_julius_for_short_and_very_long_filters():
    x = torch.randn(5, 3000, dtype=torch.float64).float()
    cutoffs = torch.tensor([0.4, 0.1, 0.01, 0.002, 0.0004])  # half sizes 10 to 10,000 taps (> T: all edge)
    half = torch.floor(8.0 / cutoffs.double() / 2).long()
    got = lowpass(x, cutoffs, half)
    for i in range(len(x)):
        torch.testing.assert_close(got[i], julius.lowpass_filter(x[i], float(cutoffs[i])), rtol=0, atol=2e-5)


def test_one_filter_applies_each_drawn_filter_as_julius_does():
    torch.manual_seed(0)
    x = torch.randn(48, 2000)
    one = OneFilter((200.0, 4000.0), (200.0, 2400.0), (150.0, 7500.0), p=0.75, sample_rate=22050)
    draw = one.draw(len(x))
    y = apply_filters(x, draw)
    assert set(draw.kind[draw.apply].tolist()) == {0, 1, 2, 3} and 0 < int(draw.apply.sum()) < len(x)
    for i in range(len(x)):
        if not draw.apply[i]:
            torch.testing.assert_close(y[i], x[i], rtol=0, atol=0)
            continue
        want = _julius_filter(x[i], int(draw.kind[i]), float(draw.cutoff[i]), float(draw.band_low[i]))
        torch.testing.assert_close(y[i], want, rtol=0, atol=2e-5)


def test_filter_draws_stay_in_their_ranges():
    torch.manual_seed(0)
    one = OneFilter((200.0, 4000.0), (300.0, 2400.0), (150.0, 7500.0), p=1.0, sample_rate=20000)
    d = one.draw(4000)
    hz = d.cutoff * 20000
    for kind, (low, high) in [(2, (300.0, 2400.0)), (3, (150.0, 7500.0))]:
        sel = hz[d.kind == kind]
        assert low - 1e-3 <= float(sel.min()) and float(sel.max()) <= high + 1e-3
    bands = d.kind < 2
    centre = (d.cutoff[bands] + d.band_low[bands]) / 2 * 20000
    assert 200.0 - 1e-2 <= float(centre.min()) and float(centre.max()) <= 4000.0 + 1e-2
    width = (d.cutoff[bands] - d.band_low[bands]) / ((d.cutoff[bands] + d.band_low[bands]) / 2)
    assert 0.5 - 1e-4 <= float(width.min()) and float(width.max()) <= 1.99 + 1e-4
    lowest = torch.where(bands, d.band_low, d.cutoff).double()
    torch.testing.assert_close(d.half, torch.floor(8.0 / lowest / 2).long())
    assert 0.2 < float((d.kind == 0).double().mean()) < 0.3  # one of four, chosen per view


def _stretched_reference(x: torch.Tensor, rate: float, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """One clip, padded at its end to whole frames and ``n_fft`` more, cut in Hann frames, stretched by
    torchaudio's ``phase_vocoder`` and overlap-added from the definition in float64,
    ``y[t] = sum_j w[t - j hop] f_j[t - j hop] / max(sum_j w[t - j hop] ** 2, floor)``, up to the centre of its last frame."""
    n_frames = 1 + math.ceil(len(x) / hop)
    padded = torch.nn.functional.pad(x, (0, n_fft + hop * (n_frames - 1) - len(x)))
    window = torch.hann_window(n_fft)
    spec = torch.stft(padded, n_fft, hop, window=window, center=False, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, spec.shape[0])[:, None]
    frames = torch.fft.irfft(phase_vocoder(spec, rate, advance), n_fft, dim=0).double().numpy()
    w = window.double().numpy()
    signal, envelope = (
        np.zeros(n_fft + hop * (frames.shape[1] - 1)),
        np.zeros(n_fft + hop * (frames.shape[1] - 1)),
    )
    for j in range(frames.shape[1]):
        signal[j * hop : j * hop + n_fft] += w * frames[:, j]
        envelope[j * hop : j * hop + n_fft] += w**2
    length = hop * (frames.shape[1] - 1) + n_fft // 2
    return signal[:length] / np.maximum(envelope[:length], ENVELOPE_FLOOR)


def _transposed_reference(x: torch.Tensor, shift: Fraction) -> torch.Tensor:
    """One clip stretched by ``1 / shift`` (``_stretched_reference``) and resampled by ``shift`` with
    torchaudio's ``resample``, cut or padded to the clip's length."""
    stretched = torch.from_numpy(_stretched_reference(x, float(1 / shift))).float()
    y = resample(stretched, shift.numerator, shift.denominator)[: len(x)]
    return torch.nn.functional.pad(y, (0, len(x) - len(y)))


def test_stretch_is_torchaudios_phase_vocoder_row_by_row():
    x = 0.1 * torch.randn(5, 22050)
    rates = [1.25, 0.8, 45 / 49, 1.07, 1 / 1.2]
    y, lengths = stretch(x, rates, 2048, 512)
    for i, rate in enumerate(rates):
        expected = _stretched_reference(x[i], rate)
        assert lengths[i] == len(expected)
        np.testing.assert_allclose(y[i, : len(expected)].numpy(), expected, rtol=0, atol=1e-5)
        assert not y[i, len(expected) :].any()


def test_pitch_shift_gives_each_view_one_fast_shift_or_leaves_it():
    torch.manual_seed(0)
    x = 0.1 * torch.randn(12, 8192)
    shift = PitchShift(4.0, p=0.5, sample_rate=22050)
    y = shift(x)
    used = set()
    for i in range(len(x)):
        if torch.equal(y[i], x[i]):
            used.add(None)
            continue
        matches = [
            k
            for k, s in enumerate(shift.shifts)
            if torch.allclose(y[i], _transposed_reference(x[i], s), rtol=0, atol=1e-5)
        ]
        assert matches, f"view {i} is no fast shift of its input"
        used.add(matches[0])
    assert None in used and len(used) >= 4  # some views left, several shifts drawn in one batch


@pytest.mark.parametrize("shift", [Fraction(6, 5), Fraction(50, 49), Fraction(45, 49), Fraction(5, 6)])
def test_transpose_moves_a_tone_to_its_shifted_frequency_at_its_level(shift):
    """A 440 Hz tone comes out at 440 Hz times the shift (the peak of a zero-padded spectrum of its middle
    second, to a tenth of a hertz) with its RMS level within 5 %."""
    sr = 22050
    t = torch.arange(3 * sr, dtype=torch.float64) / sr
    tone = (0.5 * torch.sin(2 * math.pi * 440.0 * t)).float()
    y = transpose(torch.stack([tone, tone]), [shift, shift])
    assert y.shape == (2, 3 * sr)
    middle = y[0, sr : 2 * sr].double()
    spectrum = torch.fft.rfft(middle * torch.hann_window(sr, dtype=torch.float64), 16 * sr).abs()
    peak_hz = float(torch.argmax(spectrum)) * sr / (16 * sr)
    assert abs(peak_hz - 440.0 * float(shift)) < 0.1
    assert abs(float(middle.square().mean().sqrt()) / (0.5 / math.sqrt(2)) - 1) < 0.05
    torch.testing.assert_close(y[1], y[0], rtol=0, atol=0)


def test_the_chain_is_fixed_by_the_torch_seed():
    x = 0.1 * torch.randn(16, 4096)
    chain = ViewAugment(AugmentConfig(p_chain=1.0, p_filter=1.0, p_pitch=1.0))
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


# --------------------------------------------------------------------------- log-mel views (SpecAugment)


def _spec(b: int = 6, f: int = 16, t: int = 40) -> torch.Tensor:
    return torch.randn(b, f, t, dtype=torch.float64)


def test_spec_augment_off_is_the_identity_and_draws_are_seeded():
    x = _spec()
    off = SpecAugment(AugmentConfig())
    assert not off.enabled() and torch.equal(off(x), x)
    on = SpecAugment(AugmentConfig(p_mix=0.5, p_crop=0.5, p_freq_mask=0.5, p_time_mask=0.5))
    torch.manual_seed(3)
    first = on(x)
    torch.manual_seed(3)
    assert torch.equal(on(x), first) and not torch.equal(first, x)


def test_mixing_is_in_the_power_domain_with_the_next_view():
    """Every view mixed: exp(out) = (1 - r) exp(x) + r exp(x_next), float64, r in [0, mix_ratio]."""
    x = _spec()
    torch.manual_seed(0)
    out = SpecAugment(AugmentConfig(p_mix=1.0, mix_ratio=0.4))(x)
    other = x.roll(1, dims=0)
    moved, apart = out.exp() - x.exp(), other.exp() - x.exp()
    r = (moved * apart).sum(dim=(1, 2)) / apart.square().sum(dim=(1, 2))  # each view's r, least squares
    torch.testing.assert_close(out.exp(), (1 - r)[:, None, None] * x.exp() + r[:, None, None] * other.exp())
    assert ((r >= 0) & (r <= 0.4)).all() and r.std() > 0


def test_masks_set_one_range_per_view_to_its_mean():
    x = _spec()
    torch.manual_seed(1)
    out = SpecAugment(AugmentConfig(p_freq_mask=1.0, freq_mask=0.25))(x)
    for view, y in zip(x, out, strict=True):
        changed = (y != view).any(dim=1)  # which bands changed
        bands = torch.nonzero(changed).squeeze(1)
        assert len(bands) <= 4 and (len(bands) == 0 or bands.max() - bands.min() + 1 == len(bands))
        torch.testing.assert_close(y[changed], torch.full_like(y[changed], float(view.mean())))
    torch.manual_seed(1)
    out = SpecAugment(AugmentConfig(p_time_mask=1.0, time_mask=0.5))(x)
    assert ((out != x).any(dim=1).sum(dim=1) <= 20).all() and (out != x).any()


def test_a_full_size_crop_is_the_identity_and_a_smaller_one_zooms_in():
    x = _spec()
    torch.manual_seed(2)
    torch.testing.assert_close(SpecAugment(AugmentConfig(p_crop=1.0, crop_scale=(1.0, 1.0)))(x), x)
    ramp = torch.arange(40, dtype=torch.float64).expand(2, 16, 40).contiguous()  # time index as value
    torch.manual_seed(2)
    zoomed = SpecAugment(AugmentConfig(p_crop=1.0, crop_scale=(0.5, 0.5)))(ramp)
    steps = zoomed[:, :, 1:-1].diff(dim=2)  # inside the crop, half a frame per output frame
    torch.testing.assert_close(steps, torch.full_like(steps, 0.5))


def test_spec_augment_ranges_are_checked():
    with pytest.raises(ValueError, match="shares"):
        AugmentConfig(freq_mask=1.5).validate()
    with pytest.raises(ValueError, match="shares"):
        AugmentConfig(crop_scale=(0.0, 1.0)).validate()
