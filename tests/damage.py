"""Ways to damage a corpus, for the tests of what `nas` does with damaged input."""

from pathlib import Path

import numpy as np
import soundfile as sf


def corrupt_flac(path: Path, seconds: float = 1.0, sample_rate: int = 16_000) -> Path:
    """A FLAC whose header reads (rate, length) but whose data does not decode: as a disk or a
    copy that went bad leaves it. Only decoding can find it."""
    noise = np.random.default_rng(0).standard_normal(int(seconds * sample_rate)).astype(np.float32) * 0.1
    sf.write(path, noise, sample_rate, format="FLAC")
    data = bytearray(path.read_bytes())
    garbage = np.random.default_rng(1).integers(0, 256, len(data) // 2, dtype=np.uint8).tobytes()
    data[len(data) // 4 : len(data) // 4 + len(garbage)] = garbage
    path.write_bytes(bytes(data))
    assert sf.info(path).frames == int(seconds * sample_rate)  # the header is intact
    return path
