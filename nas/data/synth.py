"""``synth``: an English speech corpus made on this machine with espeak-ng, so `nas` needs no download.

The text is ``sentences.txt`` beside this module: prose sentences from the docstrings and comments
of CPython's standard library (PSF License). Each utterance picks an *accent*, one of the eight
English voices of espeak-ng, and a *variant* (``m3``, ``f2``, ``klatt``..., about 100): a speaker is
the pair, written ``en-gb+m3``. Rate, pitch and intonation range vary per utterance. The speech then
passes a simulated room and line: silence around it, sometimes reverberation, white, pink or brown
noise at 5–30 dB SNR, sometimes a low-pass (telephone-like), and a random level.

The splits share neither sentences nor speakers. A hash of its text puts each sentence in one split
(about 10% each to dev and test); a hash of its name holds 10 variants out for dev and 10 others
for test, each crossed with all eight accents. These partitions do not depend on the seed; what is
drawn from them (sentence order, speakers, voice and channel settings) does, and the same seed gives
the same corpus, byte for byte. Train is sized in hours, dev and test in utterances.

libespeak-ng keeps state from one utterance to the next (pitch flutter phase, gain control), so an
utterance's samples depend on what its process synthesized before. Utterances are therefore made in
chunks of :data:`CHUNK`, each in a new worker process with a fresh library: the output depends on
neither the number of workers nor their timing.

``out_dir`` ends up holding ``audio/<split>/<n>.wav`` (16 kHz mono 16-bit), the manifests
``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` (see :mod:`nas.data.manifest`), and last
``done.json`` with the parameters, so a complete corpus is never made twice and a killed run is
made again.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import espeakng_loader
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from tqdm import tqdm

from nas.data.audio import SAMPLE_RATE, write_audio
from nas.data.manifest import SPLITS, Utterance, write_manifest
from nas.errors import UserError

VERSION = 1  # of the recipe below: a corpus stamped with another version is not taken as done
SENTENCES = Path(__file__).with_name("sentences.txt")
DEV_UTTERANCES = TEST_UTTERANCES = 300

# accent, as written in speaker ids → espeak-ng voice name
ACCENTS = {
    "en-us": "en-us",
    "en-gb": "en",
    "en-gb-scotland": "en-gb-scotland",
    "en-gb-x-rp": "en-gb-x-rp",
    "en-gb-x-gbclan": "en-gb-x-gbclan",
    "en-gb-x-gbcwmd": "en-gb-x-gbcwmd",
    "en-029": "en-029",
    "en-us-nyc": "en-us-nyc",
}
HELD_OUT_VARIANTS = 10  # variants for dev, and as many others for test
HELD_OUT_SENTENCES = 10  # one sentence in this many goes to dev, and one in this many to test
CHUNK = 50  # utterances per worker process

# what each utterance draws, uniformly in these ranges
RATE_WPM = (140, 210)
PITCH = (25, 75)  # espeak-ng's 0–100 scale, around the variant's own pitch
INTONATION = (25, 75)  # espeak-ng's pitch range, 0 monotone to 100
PAD_S = (0.05, 0.4)  # silence before and after the speech
REVERB_P, RT60_S = 0.3, (0.15, 0.6)
NOISE_COLOURS = {"white": 0.0, "pink": 0.5, "brown": 1.0}  # amplitude ∝ 1/f^exponent
SNR_DB = (5.0, 30.0)
LOWPASS_P, LOWPASS_HZ = 0.3, (2500.0, 6000.0)
PEAK_DBFS = (-20.0, -1.0)

ESPEAK_RATE = 22_050
SECONDS_PER_CHAR = 0.054  # espeak-ng's speech per character of text at 175 wpm, measured over variants

# espeak-ng's API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Take:
    """One utterance to make: what is said, by whom, how, and through which room and line."""

    id: str
    audio: str  # path relative to the corpus directory
    text: str
    accent: str
    variant: str
    rate: int  # words per minute
    pitch: int
    intonation: int
    lead_s: float
    trail_s: float
    rt60_s: float  # 0: no reverberation
    noise: str  # a key of NOISE_COLOURS
    snr_db: float
    lowpass_hz: float  # 0: full band
    peak: float  # linear peak level of the result
    seed: int  # for espeak-ng's random generators and the noise

    @property
    def speaker(self) -> str:
        return f"{self.accent}+{self.variant}"


def default_dir(
    hours: float = 3.0,
    seed: int = 0,
    dev_utterances: int = DEV_UTTERANCES,
    test_utterances: int = TEST_UTTERANCES,
) -> Path:
    """Where the corpus of these parameters is cached: under ``$NAS_CACHE`` (``~/.cache/nas``)."""
    name = f"synth-{hours:g}h-seed{seed}"
    if (dev_utterances, test_utterances) != (DEV_UTTERANCES, TEST_UTTERANCES):
        name += f"-dev{dev_utterances}-test{test_utterances}"
    return Path(os.environ.get("NAS_CACHE", "~/.cache/nas")).expanduser() / name


def build(
    out_dir: str | Path,
    hours: float = 3.0,
    seed: int = 0,
    dev_utterances: int = DEV_UTTERANCES,
    test_utterances: int = TEST_UTTERANCES,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Make the corpus in ``out_dir`` unless it is already complete there; returns ``out_dir``.

    Args:
        hours: size of train, planned from the text before synthesis (within 1% at 3 hours).
        seed: what is drawn; the same seed gives the same manifests and the same audio.
        dev_utterances, test_utterances: sizes of dev and test.
        workers: processes synthesizing at once.
        progress: show a progress bar.

    Raises:
        UserError: a parameter is out of range, or ``out_dir`` holds a corpus of other parameters.
    """
    out_dir = Path(out_dir)
    params = _params(hours, seed, dev_utterances, test_utterances)
    if workers < 1:
        raise UserError("synth", "workers", f"must be at least 1, not {workers}")
    if _is_done(out_dir, params):
        return out_dir
    takes = plan(hours, seed, dev_utterances, test_utterances)
    durations = _render_all(out_dir, takes, workers, progress)
    for split in SPLITS:
        rows = [Utterance(t.id, out_dir / t.audio, t.text, t.speaker, durations[t.id]) for t in takes[split]]
        write_manifest(out_dir / f"{split}.jsonl", rows)
    _write_json(out_dir / "done.json", {"params": params, "hours": _hours(takes, durations)})
    return out_dir


def load_sentences(path: Path = SENTENCES) -> list[str]:
    """The sentences of ``path``, one per line; ``#`` lines and blank lines are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def split_sentences(sentences: list[str]) -> dict[str, list[str]]:
    """Sentences per split, each placed by a hash of its text, so the partition never changes."""
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for sentence in sentences:
        bucket = _hash(sentence) % HELD_OUT_SENTENCES
        splits["test" if bucket == 0 else "dev" if bucket == 1 else "train"].append(sentence)
    return splits


def list_variants() -> list[str]:
    """The voice variants shipped with espeak-ng (the files of ``voices/!v``), but names with spaces."""
    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file() and " " not in p.name)


def split_variants(variants: list[str]) -> dict[str, list[str]]:
    """Variants per split: ranked by a hash of the name, the first ones are held out for test and dev."""
    ranked = sorted(variants, key=_hash)
    n = HELD_OUT_VARIANTS
    return {"train": sorted(ranked[2 * n :]), "dev": sorted(ranked[n : 2 * n]), "test": sorted(ranked[:n])}


def plan(hours: float, seed: int, dev_utterances: int, test_utterances: int) -> dict[str, list[Take]]:
    """Every take of every split, drawn from ``seed``: the corpus before anything is synthesized.

    Each split draws from its own generator, so dev and test do not change with ``hours``.
    """
    sentences = split_sentences(load_sentences())
    variants = split_variants(list_variants())
    takes = {split: _takes(split, seed, sentences[split], variants[split]) for split in SPLITS}
    return {
        "train": _first_hours(takes["train"], hours),
        "dev": list(itertools.islice(takes["dev"], dev_utterances)),
        "test": list(itertools.islice(takes["test"], test_utterances)),
    }


def _params(hours: float, seed: int, dev_utterances: int, test_utterances: int) -> dict:
    """The parameters that decide the corpus, checked, as stamped in ``done.json``."""
    if not hours > 0:
        raise UserError("synth", "hours", f"must be positive, not {hours}")
    for field, count in (("dev_utterances", dev_utterances), ("test_utterances", test_utterances)):
        if count < 1:
            raise UserError("synth", field, f"must be at least 1, not {count}")
    return {
        "version": VERSION,
        "hours": hours,
        "seed": seed,
        "dev_utterances": dev_utterances,
        "test_utterances": test_utterances,
    }


def _is_done(out_dir: Path, params: dict) -> bool:
    """Whether ``out_dir`` holds the complete corpus of ``params``; a corpus of others is an error."""
    stamp = out_dir / "done.json"
    if not stamp.is_file():
        return False
    done = json.loads(stamp.read_text(encoding="utf-8"))["params"]
    if done != params:
        why = f"holds a synth corpus of other parameters ({done}); delete it or choose another directory"
        raise UserError(str(out_dir), "", why)
    return True


def _hash(text: str) -> int:
    """A stable hash of ``text`` (Python's ``hash`` changes between runs)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _takes(split: str, seed: int, sentences: list[str], variants: list[str]) -> Iterator[Take]:
    """Endless takes for one split: the sentences in shuffled passes, all else drawn at random."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for n in itertools.count():
        if n % len(sentences) == 0:
            order = rng.permutation(len(sentences))
        text = sentences[order[n % len(sentences)]]
        yield _draw(f"synth-{split}-{n:06d}", f"audio/{split}/{n:06d}.wav", text, variants, rng)


def _draw(id: str, audio: str, text: str, variants: list[str], rng: np.random.Generator) -> Take:
    """A take of ``text`` with a speaker, voice settings and channel drawn from ``rng``."""
    return Take(
        id=id,
        audio=audio,
        text=text,
        accent=str(rng.choice(list(ACCENTS))),
        variant=str(rng.choice(variants)),
        rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
        pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
        intonation=int(rng.integers(INTONATION[0], INTONATION[1] + 1)),
        lead_s=float(rng.uniform(*PAD_S)),
        trail_s=float(rng.uniform(*PAD_S)),
        rt60_s=float(rng.uniform(*RT60_S)) if rng.random() < REVERB_P else 0.0,
        noise=str(rng.choice(list(NOISE_COLOURS))),
        snr_db=float(rng.uniform(*SNR_DB)),
        lowpass_hz=float(rng.uniform(*LOWPASS_HZ)) if rng.random() < LOWPASS_P else 0.0,
        peak=float(10 ** (rng.uniform(*PEAK_DBFS) / 20)),
        seed=int(rng.integers(2**31)),
    )


def _first_hours(takes: Iterator[Take], hours: float) -> list[Take]:
    """Takes from the front of ``takes`` until their estimated duration reaches ``hours``."""
    chosen, seconds = [], 0.0
    while seconds < hours * 3600:
        take = next(takes)
        chosen.append(take)
        seconds += len(take.text) * SECONDS_PER_CHAR * 175 / take.rate + take.lead_s + take.trail_s
    return chosen


def _render_all(out_dir: Path, takes: dict[str, list[Take]], workers: int, progress: bool) -> dict[str, float]:
    """Synthesize every take into ``out_dir``; the duration of each, by id.

    Chunks never span two splits, so dev and test audio does not depend on the size of train.
    """
    chunks = [(out_dir, split[i : i + CHUNK]) for split in takes.values() for i in range(0, len(split), CHUNK)]
    total = sum(map(len, takes.values()))
    durations: dict[str, float] = {}
    # fork: workers start at once and inherit the loaded modules, but never libespeak-ng, which
    # this process does not load; maxtasksperchild=1: a new process, a fresh library, per chunk
    with (
        multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool,
        tqdm(total=total, desc=f"synth {out_dir.name}", unit="utt", disable=not progress) as bar,
    ):
        for done in pool.imap(_render_chunk, chunks):
            durations.update(done)
            bar.update(len(done))
    return durations


def _render_chunk(job: tuple[Path, list[Take]]) -> dict[str, float]:
    """Worker: synthesize a chunk of takes in order, with this process's fresh libespeak-ng."""
    out_dir, takes = job
    torch.set_num_threads(1)  # one process per core; a forked OpenMP pool must not be used either
    espeak = _Espeak()
    return {take.id: _render(take, espeak, out_dir) for take in takes}


def _render(take: Take, espeak: _Espeak, out_dir: Path) -> float:
    """Synthesize ``take``, resample it to 16 kHz, pass it through its channel and write it.

    Returns:
        its duration in seconds.
    """
    speech = AF.resample(torch.from_numpy(espeak.say(take)), ESPEAK_RATE, SAMPLE_RATE)
    wav = _channel(speech, take, np.random.default_rng(take.seed))
    path = out_dir / take.audio
    tmp = path.with_suffix(".tmp.wav")
    write_audio(tmp, wav)
    tmp.replace(path)  # atomic: a killed worker never leaves half a file under the real name
    return wav.numel() / SAMPLE_RATE


def _channel(speech: torch.Tensor, take: Take, rng: np.random.Generator) -> torch.Tensor:
    """The room and the line: silence around, reverberation, noise, low-pass, then the level."""
    wav = F.pad(speech, (round(take.lead_s * SAMPLE_RATE), round(take.trail_s * SAMPLE_RATE)))
    if take.rt60_s:
        wav = _reverberate(wav, take.rt60_s, rng)
    noise = _noise(wav.numel(), NOISE_COLOURS[take.noise], rng)
    wav = AF.add_noise(wav[None], noise[None], torch.tensor([take.snr_db]))[0]
    if take.lowpass_hz:
        wav = AF.lowpass_biquad(wav, SAMPLE_RATE, take.lowpass_hz)
    return wav * (take.peak / wav.abs().max())


def _reverberate(wav: torch.Tensor, rt60_s: float, rng: np.random.Generator) -> torch.Tensor:
    """``wav`` in a synthetic room: the direct sound plus a noise tail decaying 60 dB in ``rt60_s``.

    The tail carries half the energy of the direct sound, a light reverberation.
    """
    t = np.arange(1, round(rt60_s * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(t.size) * np.exp(-np.log(1000) * t / rt60_s)
    response = torch.from_numpy(np.concatenate([[1.0], tail * np.sqrt(0.5 / np.sum(tail**2))])).float()
    n = _fft_length(wav.numel() + response.numel() - 1)
    return torch.fft.irfft(torch.fft.rfft(wav, n) * torch.fft.rfft(response, n), n)[: wav.numel()]


def _noise(samples: int, exponent: float, rng: np.random.Generator) -> torch.Tensor:
    """Gaussian noise whose amplitude spectrum falls as 1/f^exponent (0 white, 0.5 pink, 1 brown)."""
    n = _fft_length(samples)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.arange(1, spectrum.size + 1) ** exponent
    return torch.from_numpy(np.fft.irfft(spectrum, n)[:samples]).float()


def _fft_length(samples: int) -> int:
    """The power of two at or above ``samples``: an FFT of an arbitrary length can be 10 times slower."""
    return 1 << (samples - 1).bit_length()


class _Espeak:
    """libespeak-ng in this process, synthesizing synchronously into memory at 22.05 kHz."""

    def __init__(self):
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {rate}, expected the sample rate {ESPEAK_RATE}")
        self._lib, self._libc = lib, ctypes.CDLL(None)
        self._pieces: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it
        lib.espeak_SetSynthCallback(self._callback)

    def say(self, take: Take) -> np.ndarray:
        """``take.text`` in the take's voice, rate, pitch and intonation: float32 at 22.05 kHz."""
        voice = f"{ACCENTS[take.accent]}+{take.variant}".encode()
        _check("espeak_SetVoiceByName", self._lib.espeak_SetVoiceByName(voice))
        for param, value in ((_RATE, take.rate), (_PITCH, take.pitch), (_RANGE, take.intonation)):
            _check("espeak_SetParameter", self._lib.espeak_SetParameter(param, value, 0))
        # espeak-ng draws noise from its own generator and from libc's rand()
        self._lib.espeak_ng_SetRandSeed(take.seed)
        self._libc.srand(take.seed)
        text = take.text.encode("utf-8") + b"\0"
        self._pieces = []
        _check("espeak_Synth", self._lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None))
        if not self._pieces:
            raise RuntimeError(f"espeak-ng made no audio for {take.id}")
        return np.concatenate(self._pieces).astype(np.float32) / 32768

    def _collect(self, samples, count: int, events) -> int:
        """The synthesis callback: keep a copy of each piece of audio; 0 means go on."""
        if count > 0:
            self._pieces.append(np.ctypeslib.as_array(samples, (count,)).copy())
        return 0


def _check(call: str, status: int) -> None:
    """Raise if a libespeak-ng call did not return EE_OK (0)."""
    if status != 0:
        raise RuntimeError(f"{call} failed with espeak-ng status {status}")


def _hours(takes: dict[str, list[Take]], durations: dict[str, float]) -> dict[str, float]:
    """Hours of audio per split."""
    return {split: round(sum(durations[t.id] for t in takes[split]) / 3600, 4) for split in SPLITS}


def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON atomically, so a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
