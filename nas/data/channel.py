"""A simulated room and line for :mod:`nas.data.synth`: silence, reverberation, noise, low-pass, level.

Every random draw comes from the generator passed in, in a fixed order, so the same generator
state gives the same samples.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from nas.data.audio import SAMPLE_RATE

NOISE_COLOURS = {"white": 0.0, "pink": 0.5, "brown": 1.0}  # amplitude ∝ 1/f^exponent


def through_channel(
    speech: torch.Tensor,
    rng: np.random.Generator,
    *,
    lead_s: float,
    trail_s: float,
    rt60_s: float,
    noise: str,
    snr_db: float,
    lowpass_hz: float,
    peak: float,
) -> torch.Tensor:
    """``speech`` (float32 ``(samples,)`` at 16 kHz) as heard through a room and a line.

    Args:
        lead_s, trail_s: silence added before and after the speech.
        rt60_s: reverberation time, 0 for none.
        noise: a key of :data:`NOISE_COLOURS`, added at ``snr_db``.
        lowpass_hz: cut-off of a biquad low-pass (telephone-like), 0 for full band.
        peak: linear peak level of the result.
    Returns the new signal, ``round(lead_s·16k) + samples + round(trail_s·16k)`` samples long.
    """
    wav = F.pad(speech, (round(lead_s * SAMPLE_RATE), round(trail_s * SAMPLE_RATE)))
    if rt60_s:
        wav = reverberate(wav, rt60_s, rng)
    noise_wav = coloured_noise(wav.numel(), NOISE_COLOURS[noise], rng)
    wav = AF.add_noise(wav[None], noise_wav[None], torch.tensor([snr_db]))[0]
    if lowpass_hz:
        wav = AF.lowpass_biquad(wav, SAMPLE_RATE, lowpass_hz)
    return wav * (peak / wav.abs().max())


def reverberate(wav: torch.Tensor, rt60_s: float, rng: np.random.Generator) -> torch.Tensor:
    """``wav`` in a synthetic room: the direct sound plus a noise tail decaying 60 dB in ``rt60_s``.

    The tail carries half the energy of the direct sound, a light reverberation.
    """
    t = np.arange(1, round(rt60_s * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(t.size) * np.exp(-np.log(1000) * t / rt60_s)
    response = torch.from_numpy(np.concatenate([[1.0], tail * np.sqrt(0.5 / np.sum(tail**2))])).float()
    n = _fft_length(wav.numel() + response.numel() - 1)
    return torch.fft.irfft(torch.fft.rfft(wav, n) * torch.fft.rfft(response, n), n)[: wav.numel()]


def coloured_noise(samples: int, exponent: float, rng: np.random.Generator) -> torch.Tensor:
    """Gaussian noise whose amplitude spectrum falls as 1/f^exponent (0 white, 0.5 pink, 1 brown)."""
    n = _fft_length(samples)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.arange(1, spectrum.size + 1) ** exponent
    return torch.from_numpy(np.fft.irfft(spectrum, n)[:samples]).float()


def _fft_length(samples: int) -> int:
    """The power of two at or above ``samples``: an FFT of an arbitrary length can be 10 times slower."""
    return 1 << (samples - 1).bit_length()
