"""The augmentation chain applied to each view (torch-audiomentations, batched, on the training device).

As in CLMR and SemiSupCon: gain, polarity inversion, coloured noise, one filter out of band-pass /
band-stop / high-pass / low-pass, pitch shift and delay, each with its own probability, the whole chain
applied to a view with probability ``p_chain``. Every random draw is per view, so the two views of a clip
are augmented independently. Draws come from torch's generator, and the pitch shift's transpositions from
Python's ``random``: seeding both fixes every view (``pretraining.seed_augmentations``). Probabilities and
ranges live in ``AugmentConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_audiomentations as ta
from torch import nn

from musiclib.audio import SAMPLE_RATE


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the view augmentations (defaults from the SemiSupCon paper)."""

    p_chain: float = 0.8
    p_gain: float = 0.4
    gain_db: tuple[float, float] = (-15.0, 5.0)
    p_polarity: float = 0.6
    p_noise: float = 0.6
    noise_snr_db: tuple[float, float] = (3.0, 30.0)
    p_filter: float = 0.3
    band_hz: tuple[float, float] = (200.0, 4000.0)  # centre frequency of band-pass and band-stop
    highpass_hz: tuple[float, float] = (200.0, 2400.0)
    lowpass_hz: tuple[float, float] = (150.0, 7500.0)
    p_pitch: float = 0.6
    pitch_semitones: float = 4.0
    p_delay: float = 0.6
    delay_ms: tuple[float, float] = (100.0, 500.0)

    def validate(self) -> None:
        """Raise ValueError on a probability outside [0, 1] or a range whose low end is above its high end."""
        for name, value in vars(self).items():
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation probability {name}={value} is outside [0, 1]")
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"augmentation range {name}={value} must be (low, high) with low <= high")
        if self.pitch_semitones < 0 or self.delay_ms[0] <= 0:
            raise ValueError("pitch_semitones must be >= 0 and delay_ms must be positive")


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


class OneFilter(nn.Module):
    """Pass each view through one of ``filters``, chosen per view (torch-audiomentations' ``OneOf`` chooses
    one per batch, with Python's ``random``); each filter keeps its own probability of acting."""

    def __init__(self, filters: list[nn.Module], sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.filters, self.sample_rate = nn.ModuleList(filters), sample_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, T]``."""
        choice = torch.randint(len(self.filters), (x.shape[0],), device=x.device)
        out = x.clone()
        for k, f in enumerate(self.filters):
            views = torch.nonzero(choice == k).squeeze(1)
            if len(views):
                out[views] = f(samples=x[views], sample_rate=self.sample_rate).samples
        return out


class ViewAugment(nn.Module):
    """The per-view chain: ``[B, T]`` waveforms in, ``[B, T]`` augmented waveforms out."""

    def __init__(self, config: AugmentConfig, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        c = config
        filters = [
            ta.BandPassFilter(*c.band_hz, p=c.p_filter, output_type="dict"),
            ta.BandStopFilter(*c.band_hz, p=c.p_filter, output_type="dict"),
            ta.HighPassFilter(*c.highpass_hz, p=c.p_filter, output_type="dict"),
            ta.LowPassFilter(*c.lowpass_hz, p=c.p_filter, output_type="dict"),
        ]
        self.chain = ta.Compose(
            [
                ta.Gain(*c.gain_db, p=c.p_gain, output_type="dict"),
                ta.PolarityInversion(p=c.p_polarity, output_type="dict"),
                ta.AddColoredNoise(*c.noise_snr_db, p=c.p_noise, output_type="dict"),
                OneFilter(filters, sample_rate),
                ta.PitchShift(
                    -c.pitch_semitones,
                    c.pitch_semitones,
                    p=c.p_pitch,
                    sample_rate=sample_rate,
                    output_type="dict",
                ),
            ],
            output_type="dict",
        )
        self.delay = Delay(c.delay_ms, c.p_delay, sample_rate)
        self.p_chain = c.p_chain
        self.sample_rate = sample_rate

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p_chain == 0.0:
            return x
        y = self.chain(x[:, None, :], sample_rate=self.sample_rate).samples
        y = self.delay(y)[:, 0, :]
        keep = torch.rand(x.shape[0], device=x.device) >= self.p_chain  # these views skip the whole chain
        return torch.where(keep[:, None], x, y)
