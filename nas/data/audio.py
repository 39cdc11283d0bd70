"""Reading audio. torchaudio.load needs torchcodec, which does not load here, so we read with
soundfile (wav, flac) and resample with torchaudio.functional."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000


class AudioError(Exception):
    """An audio file that cannot be used (missing, corrupt, empty)."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate``, shape ``(samples,)``. Raises AudioError."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for missing/corrupt files
        raise AudioError(f"{path}: cannot read audio ({str(exc).splitlines()[0]})") from None
    if data.size == 0:
        raise AudioError(f"{path}: audio is empty")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if not torch.isfinite(wav).all():
        raise AudioError(f"{path}: audio holds non-finite samples")
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav


def probe_audio(path: str | Path) -> int:
    """The sample rate in a file's header, read without decoding; raises AudioError.

    It finds what a manifest gets wrong (a missing file, a file that is not audio, a rate too low)
    in microseconds per file, before hours of decoding start. Damage inside the data is found
    only by :func:`load_audio`.
    """
    if not Path(path).is_file():
        raise AudioError("no such file")
    try:
        return sf.info(str(path)).samplerate
    except Exception as exc:  # soundfile raises several types for files it cannot parse
        raise AudioError(f"not an audio file soundfile can read ({str(exc).splitlines()[0]})") from None


def write_audio(path: str | Path, wav: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sample_rate, subtype="PCM_16")
