"""The augmentation chain applied to each view, batched, on the training device.

As in CLMR and SemiSupCon: gain, polarity inversion, coloured noise, one filter out of band-pass /
band-stop / high-pass / low-pass, pitch shift and delay, each with its own probability, the whole chain
applied to a view with probability ``p_chain``. Every random draw is per view, so the two views of a clip
are augmented independently, and all come from torch's generator: seeding it fixes every view. The
parameters are torch-audiomentations' draws; it applies the noise, the filters and the pitch shift one
example at a time, and this module batches them (the pitch shift by librosa's method, ``transpose``,
rather than torch-pitch-shift's vocoder). Draws that pick views out of the batch, or set a per-view
scale, are made on the host (``to_device``), so the chain never waits for the GPU. Probabilities and
ranges live in ``AugmentConfig``.

A log-mel encoder's views are augmented a second time, as spectrograms (``SpecAugment``, between the
model's front end and its convolutions): mixing with another view, random resized crops (BYOL-A) and
frequency and time masks (SpecAugment).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch_pitch_shift import get_fast_shifts, semitones_to_ratio
from torchaudio.transforms import Resample

from musiclib.audio import SAMPLE_RATE


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor drawn on the host, on ``device`` without waiting for the GPU (pinned memory, copied
    asynchronously): the CPU queues the chain while the GPU still runs the previous step."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Gain(nn.Module):
    """Each view, with probability ``p``, scaled by a gain drawn uniformly in ``gain_db``, as
    torch-audiomentations' ``Gain`` draws it."""

    def __init__(self, gain_db: tuple[float, float], p: float):
        super().__init__()
        self.gain_db, self.p = gain_db, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T]``."""
        apply = torch.rand(x.shape[0]) < self.p
        db = torch.empty(x.shape[0]).uniform_(*self.gain_db)
        return x * to_device(torch.where(apply, 10.0 ** (db / 20.0), 1.0), x.device)[:, None]


class PolarityInversion(nn.Module):
    """Each view, with probability ``p``, turned upside down."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T]``."""
        sign = torch.where(torch.rand(x.shape[0]) < self.p, -1.0, 1.0)
        return x * to_device(sign, x.device)[:, None]


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the view augmentations (defaults from the SemiSupCon paper)."""

    p_chain: float = 0.8  # a view goes through the augmentation chain at all
    p_gain: float = 0.4  # gain change
    gain_db: tuple[float, float] = (-15.0, 5.0)  # its range in dB
    p_polarity: float = 0.6  # polarity inversion
    p_noise: float = 0.6  # white noise added
    noise_snr_db: tuple[float, float] = (3.0, 30.0)  # its signal-to-noise ratio range in dB
    p_filter: float = 0.3  # one random filter: band-pass, band-stop, high-pass or low-pass
    band_hz: tuple[float, float] = (200.0, 4000.0)  # centre frequency of band-pass and band-stop
    highpass_hz: tuple[float, float] = (200.0, 2400.0)  # cutoff range of the high-pass filter
    lowpass_hz: tuple[float, float] = (150.0, 7500.0)  # cutoff range of the low-pass filter
    p_pitch: float = 0.6  # pitch shift
    pitch_semitones: float = 4.0  # its largest shift, up or down, in semitones
    p_delay: float = 0.6  # a delayed copy mixed in at half volume
    delay_ms: tuple[float, float] = (100.0, 500.0)  # its delay range in ms
    # log-mel views of a melcnn encoder (SpecAugment); off at 0
    p_mix: float = 0.0  # mixed with another view of the batch, in the power domain
    mix_ratio: float = 0.4  # the other view's share is drawn in [0, mix_ratio]
    p_crop: float = 0.0  # a random resized crop, stretched back to the view's size
    crop_scale: tuple[float, float] = (0.6, 1.0)  # the crop's side, as a share of each side of the view
    p_freq_mask: float = 0.0  # a band range masked
    freq_mask: float = 0.15  # a masked band range is up to this share of the bands
    p_time_mask: float = 0.0  # a time range masked
    time_mask: float = 0.15  # a masked time range is up to this share of the frames

    def validate(self) -> None:
        """Raise ValueError on a probability outside [0, 1] or a range whose low end is above its high end."""
        for name, value in vars(self).items():
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation probability {name}={value} is outside [0, 1]")
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"augmentation range {name}={value} must be (low, high) with low <= high")
        if self.pitch_semitones < 0 or self.delay_ms[0] <= 0:
            raise ValueError("pitch_semitones must be >= 0 and delay_ms must be positive")
        shares = (self.mix_ratio, self.freq_mask, self.time_mask, *self.crop_scale)
        if not all(0.0 <= s <= 1.0 for s in shares) or self.crop_scale[0] <= 0:
            raise ValueError("mix_ratio, freq_mask, time_mask and crop_scale must be shares in [0, 1]")


class Delay(nn.Module):
    """Mix in a copy delayed by 100-500 ms at half volume (CLMR's delay; torch-audiomentations has none)."""

    def __init__(
        self, delay_ms: tuple[float, float], p: float, sample_rate: int = SAMPLE_RATE, volume: float = 0.5
    ):
        super().__init__()
        self.delay_ms, self.p, self.sample_rate, self.volume = delay_ms, p, sample_rate, volume

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, T]``; each example is delayed with probability ``p`` by its own random delay."""
        b, _, t = x.shape
        apply = torch.rand(b, device=x.device) < self.p
        delays = torch.empty(b, device=x.device).uniform_(*self.delay_ms) * self.sample_rate / 1000.0
        delays = delays.long().clamp(1, t - 1)
        idx = torch.arange(t, device=x.device)[None, :] - delays[:, None]  # [B, T] source index
        delayed = x.gather(2, idx.clamp_min(0)[:, None, :].expand_as(x)) * (idx >= 0)[:, None, :]
        mixed = (x + self.volume * delayed) / (1.0 + self.volume)
        return torch.where(apply[:, None, None], mixed, x)


def shape_noise(white: torch.Tensor, decay: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Rows of white noise ``[n, sample_rate]`` coloured as torch-audiomentations colours them: the amplitude
    spectrum divided by ``linspace(1, sqrt(sample_rate / 2))`` to the power ``decay`` (power about
    ``1 / f ** decay``: 0 white, 1 pink, 2 brown, negative blue and violet), then scaled to unit RMS."""
    spectrum = torch.fft.rfft(white)
    ramp = torch.linspace(1.0, (sample_rate / 2) ** 0.5, spectrum.shape[1], device=white.device)
    noise = torch.fft.irfft(spectrum / ramp ** decay[:, None])
    return noise / (noise.square().mean(dim=1, keepdim=True).sqrt() + 1e-8)


class ColoredNoise(nn.Module):
    """Each view, with probability ``p``, plus coloured noise (``shape_noise``, one second repeated, a decay
    drawn in ``decay``) at a signal-to-noise ratio drawn in ``snr_db``, as torch-audiomentations'
    ``AddColoredNoise`` does one example at a time; batched."""

    def __init__(
        self,
        snr_db: tuple[float, float],
        p: float,
        sample_rate: int = SAMPLE_RATE,
        decay: tuple[float, float] = (-2.0, 2.0),
    ):
        super().__init__()
        self.snr_db, self.p, self.sample_rate, self.decay = snr_db, p, sample_rate, decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T]``."""
        views = torch.nonzero(torch.rand(x.shape[0]) < self.p).squeeze(1)
        if not len(views):
            return x
        snr = torch.empty(len(views)).uniform_(*self.snr_db)
        decay = torch.empty(len(views)).uniform_(*self.decay)
        views, snr, decay = (to_device(t, x.device) for t in (views, snr, decay))
        white = torch.randn(len(views), self.sample_rate, device=x.device)
        noise = shape_noise(white, decay, self.sample_rate)
        noise = noise.repeat(1, math.ceil(x.shape[1] / noise.shape[1]))[:, : x.shape[1]]
        clean = x[views]
        rms = clean.square().mean(dim=1, keepdim=True).sqrt()
        out = x.clone()
        out[views] = clean + rms / 10 ** (snr[:, None] / 20) * noise
        return out


def mel_uniform(low_hz: float, high_hz: float, n: int) -> torch.Tensor:
    """``n`` frequencies in Hz drawn uniformly on the mel scale, as torch-audiomentations draws its cutoffs."""
    low, high = (2595.0 * math.log10(1.0 + f / 700.0) for f in (low_hz, high_hz))
    return 700.0 * (10.0 ** (torch.empty(n).uniform_(low, high) / 2595.0) - 1.0)


def lowpass_kernels(cutoffs: torch.Tensor, half_sizes: torch.Tensor, width: int) -> torch.Tensor:
    """Windowed-sinc low-pass filters ``[n, 2 * width + 1]``, julius's design: cutoffs as fractions of the
    sample rate, a Hann window of ``2 * half_size + 1`` taps, unit gain at DC; zero beyond each half size."""
    t = torch.arange(-width, width + 1, device=cutoffs.device, dtype=torch.float32)
    h = half_sizes[:, None].float()
    window = torch.where(t.abs() <= h, 0.5 + 0.5 * torch.cos(math.pi * t / h), 0.0)
    arg = 2.0 * math.pi * cutoffs[:, None] * t
    sinc = torch.where(t == 0, 1.0, torch.sin(arg) / arg)
    kernels = 2.0 * cutoffs[:, None] * window * sinc
    return kernels / kernels.sum(dim=1, keepdim=True)


def lowpass(x: torch.Tensor, cutoffs: torch.Tensor, half_sizes: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``x`` ``[n, T]`` low-passed at ``cutoffs[i]`` (fraction of the sample rate) with a filter of
    ``half_sizes[i]`` taps each side, edges padded by repetition, as ``julius.lowpass_filter``; batched.
    ``cutoffs`` and ``half_sizes`` are on the host.

    Rows are grouped by the FFT length their filter needs (a power of two), so one very long filter does
    not make every row pay for its length; each group is one batched FFT convolution.
    """
    length = x.shape[1]
    out = torch.empty_like(x)
    sizes = [1 << int(math.ceil(math.log2(length + 2 * int(h)))) for h in half_sizes.tolist()]
    for size in sorted(set(sizes)):
        rows = torch.tensor([i for i, s in enumerate(sizes) if s == size])
        width = int(half_sizes[rows].max())
        kernels = lowpass_kernels(
            to_device(cutoffs[rows], x.device), to_device(half_sizes[rows], x.device), width
        )
        rows = to_device(rows, x.device)
        padded = nn.functional.pad(x[rows][:, None], (width, width), mode="replicate")[:, 0]
        full = torch.fft.irfft(torch.fft.rfft(padded, size) * torch.fft.rfft(kernels, size), size)
        out[rows] = full[:, 2 * width : 2 * width + length]
    return out


@dataclass
class FilterDraw:
    """Per view: whether it is filtered, which filter (an index into ``OneFilter.KINDS``), the cutoff of its
    first low-pass (the upper one of a band), a band's lower cutoff, and the filter's half size in taps."""

    apply: torch.Tensor
    kind: torch.Tensor
    cutoff: torch.Tensor
    band_low: torch.Tensor
    half: torch.Tensor


def apply_filters(x: torch.Tensor, draw: FilterDraw) -> torch.Tensor:
    """``x`` ``[B, T]`` through the drawn filters (``draw`` on the host), built from low-passes ``L`` as julius
    builds them: high-pass ``x - L(f)``, band-pass ``L(f_high) - L(f_low)``, band-stop ``x - band-pass``."""
    views = torch.nonzero(draw.apply).squeeze(1)
    if not len(views):
        return x
    kind = draw.kind[views]
    bands = torch.nonzero(kind < 2).squeeze(1)  # positions among ``views``
    subtract = torch.nonzero((kind == 1) | (kind == 2)).squeeze(1)  # band-stop and high-pass
    rows = torch.cat([views, views[bands]])
    cutoffs = torch.cat([draw.cutoff[views], draw.band_low[views[bands]]])
    low_passed = lowpass(x[to_device(rows, x.device)], cutoffs, draw.half[rows])
    views, bands, subtract = (to_device(t, x.device) for t in (views, bands, subtract))
    filtered = low_passed[: len(views)]
    filtered[bands] -= low_passed[len(views) :]
    filtered[subtract] = x[views][subtract] - filtered[subtract]
    out = x.clone()
    out[views] = filtered
    return out


class OneFilter(nn.Module):
    """Each view, with probability ``p``, through one filter out of band-pass, band-stop, high-pass and
    low-pass, chosen per view, with torch-audiomentations' parameter draws (mel-uniform frequencies, a
    band 0.5 to 1.99 times its centre wide) and julius's windowed-sinc filters, batched.

    torch-audiomentations filters one example at a time; its band filters, whose half size follows the
    lower cutoff, took most of the chain's time on a GPU (docs/BENCHMARKS.md).
    """

    KINDS = ("band-pass", "band-stop", "high-pass", "low-pass")

    def __init__(
        self,
        band_hz: tuple[float, float],
        highpass_hz: tuple[float, float],
        lowpass_hz: tuple[float, float],
        p: float,
        sample_rate: int = SAMPLE_RATE,
        bandwidth: tuple[float, float] = (0.5, 1.99),
        zeros: float = 8.0,
    ):
        super().__init__()
        self.band_hz, self.highpass_hz, self.lowpass_hz = band_hz, highpass_hz, lowpass_hz
        self.p, self.sample_rate, self.bandwidth, self.zeros = p, sample_rate, bandwidth, zeros

    def draw(self, b: int) -> FilterDraw:
        """Parameters for ``b`` views, on the host; the half size follows the filter's lowest cutoff, as in
        julius."""
        sr = self.sample_rate
        apply = torch.rand(b) < self.p
        kind = torch.randint(len(self.KINDS), (b,))
        centre = mel_uniform(*self.band_hz, b)
        width = torch.empty(b).uniform_(*self.bandwidth)
        band_low, band_high = centre * (1 - 0.5 * width) / sr, centre * (1 + 0.5 * width) / sr
        high = mel_uniform(*self.highpass_hz, b) / sr
        low = mel_uniform(*self.lowpass_hz, b) / sr
        cutoff = torch.stack([band_high, band_high, high, low], dim=1).gather(1, kind[:, None])[:, 0]
        lowest = torch.where(kind < 2, band_low, cutoff)
        half = torch.floor(self.zeros / lowest.double() / 2).long()
        return FilterDraw(apply, kind, cutoff, band_low, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T]``."""
        return apply_filters(x, self.draw(x.shape[0]))


ENVELOPE_FLOOR = 1e-4  # the first samples, under almost no window, fade in rather than divide by nearly 0


def stretch(x: torch.Tensor, rates: list[float], n_fft: int, hop: int) -> tuple[torch.Tensor, list[int]]:
    """Rows of ``x`` ``[n, T]`` time-stretched by ``rates`` (one per row; above 1 shortens): torchaudio's phase
    vocoder (``phase_vocoder``) on Hann frames, overlap-added back, all rows in one batch of frames. Returns
    the rows, zero past each one's length: up to the centre of its last frame, where frames overlap fully.

    The frames lie inside the clip, which is padded with ``n_fft`` zeros at its end only. The vocoder carries
    each frame's phase advance on to every later frame, so frames that reach before the start (``torch.stft``'s
    centred default, padded by reflection) would corrupt a raised clip from its first frame on.
    """
    window = torch.hann_window(n_fft, device=x.device)
    n_frames = 1 + math.ceil(x.shape[1] / hop)
    padded = nn.functional.pad(x, (0, n_fft + hop * (n_frames - 1) - x.shape[1]))
    spec = torch.stft(padded, n_fft, hop, window=window, center=False, return_complex=True)  # [n, F, N]
    n_freq = spec.shape[1]
    counts = [math.ceil(n_frames / rate) for rate in rates]  # frames out: the length of arange(0, N, rate)
    lengths = [hop * (count - 1) + n_fft // 2 for count in counts]
    rate = to_device(torch.tensor(rates, dtype=torch.float64), x.device)[:, None]
    ends = to_device(torch.tensor(list(zip(counts, lengths))), x.device)  # [n, 2]: frames and samples out
    j = torch.arange(max(counts), device=x.device)
    steps = (j * rate).float()  # [n, M]: where each output frame reads the input
    valid = (j < ends[:, :1])[:, None, :]
    first = steps.long().clamp(max=n_frames)[:, None, :].expand(-1, n_freq, -1)
    spec = nn.functional.pad(spec, (0, 2))
    norm, angle = spec.abs(), spec.angle()
    advance = torch.linspace(0, math.pi * hop, n_freq, device=x.device)[:, None]
    phase = angle.gather(2, first + 1) - angle.gather(2, first) - advance
    phase = phase - 2 * math.pi * torch.round(phase / (2 * math.pi)) + advance
    phase = torch.cat([angle[..., :1], phase[..., :-1]], dim=-1).cumsum(-1)
    alpha = (steps % 1.0)[:, None, :]
    magnitude = alpha * norm.gather(2, first + 1) + (1 - alpha) * norm.gather(2, first)
    frames = torch.fft.irfft(torch.polar(magnitude * valid, phase), n_fft, dim=1) * window[:, None]
    fold = dict(output_size=(1, n_fft + hop * (len(j) - 1)), kernel_size=(1, n_fft), stride=(1, hop))
    signal = nn.functional.fold(frames, **fold)[:, 0, 0]
    envelope = nn.functional.fold(window[None, :, None].square() * valid, **fold)[:, 0, 0]
    inside = torch.arange(signal.shape[1], device=x.device) < ends[:, 1:]
    return torch.where(inside, signal / envelope.clamp_min(ENVELOPE_FLOOR), 0.0), lengths


def transpose(x: torch.Tensor, shifts: list[Fraction], n_fft: int = 2048, hop: int = 512) -> torch.Tensor:
    """Row ``i`` of ``x`` ``[n, T]`` raised in pitch by the frequency ratio ``shifts[i]``, its length kept, by
    librosa's method: ``stretch`` lengthens it by the shift (on librosa's STFT by default) and torchaudio's
    resampler brings it back to its length. The rows that share a shift are resampled together, with no wait
    for the GPU between groups."""
    order = sorted(range(len(shifts)), key=lambda i: shifts[i])  # each shift's rows together
    sorted_shifts = [shifts[i] for i in order]
    order_on_device = to_device(torch.tensor(order), x.device)
    stretched, lengths = stretch(x[order_on_device], [float(1 / s) for s in sorted_shifts], n_fft, hop)
    groups, start, length = [], 0, x.shape[1]
    for shift, rows in itertools.groupby(sorted_shifts):
        end = start + len(list(rows))
        y = resampler(shift, x.device)(stretched[start:end, : lengths[start]])
        groups.append(nn.functional.pad(y[:, :length], (0, max(0, length - y.shape[1]))))
        start = end
    out = torch.empty_like(x)
    out[order_on_device] = torch.cat(groups)
    return out


@functools.cache
def resampler(shift: Fraction, device: torch.device) -> nn.Module:
    """torchaudio's resampler from ``shift.numerator`` to ``shift.denominator`` on ``device``, its kernel built
    once: building it takes longer on a GPU than applying it."""
    return Resample(shift.numerator, shift.denominator).to(device)


class PitchShift(nn.Module):
    """Each view, with probability ``p``, transposed (``transpose``) by one of the shifts within ``semitones``
    either way that torch-audiomentations draws from (torch-pitch-shift's fast shifts at ``sample_rate``),
    chosen per view from torch's generator.

    torch-audiomentations transposes one view at a time with torch-pitch-shift, whose vocoder (a rectangular
    window, 32 frames per window) took most of the chain's time; here all views are stretched in one batch.
    """

    def __init__(self, semitones: float, p: float, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        low, high = semitones_to_ratio(-semitones), semitones_to_ratio(semitones)
        self.shifts = get_fast_shifts(sample_rate, lambda r: low <= r <= high and r != 1)
        if not self.shifts:
            raise ValueError(f"no fast pitch shift within {semitones} semitones at {sample_rate} Hz")
        self.p, self.sample_rate = p, sample_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T]``."""
        views = torch.nonzero(torch.rand(x.shape[0]) < self.p).squeeze(1)
        choice = torch.randint(len(self.shifts), (len(views),))
        if not len(views):
            return x
        views = to_device(views, x.device)
        out = x.clone()
        out[views] = transpose(x[views], [self.shifts[k] for k in choice.tolist()])
        return out


class ViewAugment(nn.Module):
    """The per-view chain: ``[B, T]`` waveforms in, ``[B, T]`` augmented waveforms out."""

    def __init__(self, config: AugmentConfig, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        c = config
        self.gain = Gain(c.gain_db, c.p_gain)
        self.polarity = PolarityInversion(c.p_polarity)
        self.noise = ColoredNoise(c.noise_snr_db, c.p_noise, sample_rate)
        self.filter = OneFilter(c.band_hz, c.highpass_hz, c.lowpass_hz, c.p_filter, sample_rate)
        self.pitch = PitchShift(c.pitch_semitones, c.p_pitch, sample_rate) if c.p_pitch > 0 else nn.Identity()
        self.delay = Delay(c.delay_ms, c.p_delay, sample_rate)
        self.p_chain = c.p_chain

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p_chain == 0.0:
            return x
        y = self.pitch(self.filter(self.noise(self.polarity(self.gain(x)))))
        y = self.delay(y[:, None, :])[:, 0, :]
        keep = torch.rand(x.shape[0], device=x.device) >= self.p_chain  # these views skip the whole chain
        return torch.where(keep[:, None], x, y)


def band_masks(n: int, size: int, p: float, max_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view, with probability ``p``, a range ``[start, stop)`` of ``size`` bins up to ``max_share`` of them
    wide (SpecAugment's masks); ``start == stop`` where a view is not masked. Drawn on the host."""
    apply = torch.rand(n) < p
    width = (torch.rand(n) * max_share * size).long() * apply
    start = (torch.rand(n) * (size - width + 1)).long()
    return start, start + width


class SpecAugment(nn.Module):
    """Log-mel views ``[B, F, T]`` in, augmented log-mel views out: mixing, a random resized crop, masks.

    - mixing (BYOL-A's mixup): with probability ``p_mix``, a view becomes ``log((1 - r) exp(x) + r exp(y))``
      with ``y`` another view of the batch (the next one, so a clip's two views never mix together when the
      batch holds more than two views) and ``r`` drawn in ``[0, mix_ratio]``;
    - random resized crop (BYOL-A): with probability ``p_crop``, a region whose sides are drawn in
      ``crop_scale`` of the view's, stretched back to its size (bilinear);
    - masks (SpecAugment): with probability ``p_freq_mask`` / ``p_time_mask``, a band / time range up to
      ``freq_mask`` / ``time_mask`` of the view set to the view's mean.
    All draws come from torch's generator, on the host, so seeding it fixes every view.
    """

    def __init__(self, config: AugmentConfig):
        super().__init__()
        self.config = config

    def enabled(self) -> bool:
        c = self.config
        return any(p > 0 for p in (c.p_mix, c.p_crop, c.p_freq_mask, c.p_time_mask))

    @torch.no_grad()
    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        c, b, device = self.config, spec.shape[0], spec.device
        if c.p_mix > 0 and b > 2:
            ratio = torch.where(torch.rand(b) < c.p_mix, torch.rand(b) * c.mix_ratio, 0.0)
            r = to_device(ratio, device)[:, None, None]
            other = spec.roll(1, dims=0)
            mixed = torch.logaddexp(spec + torch.log1p(-r), other + torch.log(r.clamp_min(1e-12)))
            spec = torch.where(r > 0, mixed, spec)
        if c.p_crop > 0:
            spec = self.crop(spec)
        mean = spec.mean(dim=(1, 2), keepdim=True)
        for dim, (p, share) in ((1, (c.p_freq_mask, c.freq_mask)), (2, (c.p_time_mask, c.time_mask))):
            if p > 0:
                start, stop = (to_device(v, device) for v in band_masks(b, spec.shape[dim], p, share))
                pos = torch.arange(spec.shape[dim], device=device)[None, :]
                masked = (pos >= start[:, None]) & (pos < stop[:, None])
                masked = masked[:, :, None] if dim == 1 else masked[:, None, :]
                spec = torch.where(masked, mean, spec)
        return spec

    def crop(self, spec: torch.Tensor) -> torch.Tensor:
        """Random resized crops of the views drawn to be cropped, as one batched ``grid_sample``."""
        c, b = self.config, spec.shape[0]
        apply = torch.rand(b) < self.config.p_crop
        low, high = c.crop_scale
        sides = torch.where(apply[:, None], low + torch.rand(b, 2) * (high - low), 1.0)  # [B, (freq, time)]
        centres = (torch.rand(b, 2) * 2 - 1) * (1 - sides)  # inside [-1, 1], the crop within the view
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = sides[:, 1], sides[:, 0]  # grid x is time, y is frequency
        theta[:, 0, 2], theta[:, 1, 2] = centres[:, 1], centres[:, 0]
        theta = to_device(theta, spec.device).to(spec.dtype)
        grid = nn.functional.affine_grid(theta, [b, 1, *spec.shape[1:]], align_corners=False)
        return nn.functional.grid_sample(spec[:, None], grid, align_corners=False)[:, 0]
