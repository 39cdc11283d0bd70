"""``synth``: an English speech corpus made on this machine with espeak-ng, so `nas` needs no download.

The text is ``sentences.txt`` beside this module: prose sentences from the docstrings and comments
of CPython's standard library (PSF License). Each utterance picks an *accent*, one of the eight
English voices of espeak-ng, and a *variant* (``m3``, ``f2``, ``klatt``..., about 100): a speaker is
the pair, written ``en-gb+m3``. Rate, pitch and intonation range vary per utterance. The speech then
passes a simulated room and line: silence around it, sometimes reverberation, white, pink or brown
noise at 5–30 dB SNR, sometimes a low-pass (telephone-like), and a random level. The binding to
libespeak-ng is :mod:`nas.data.espeak`; the room and line are :mod:`nas.data.channel`.

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
``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` (see :mod:`nas.data.manifest`; each row records
its conditions: accent, noise colour, SNR, reverberation, telephone band), and last
``done.json`` with the parameters, so a complete corpus is never made twice and a killed run is
made again.
"""

from __future__ import annotations

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
import torchaudio.functional as AF
from tqdm import tqdm

from nas.data.audio import SAMPLE_RATE, write_audio
from nas.data.channel import NOISE_COLOURS, through_channel
from nas.data.espeak import ESPEAK_RATE, Espeak
from nas.data.manifest import SPLITS, Utterance, write_manifest
from nas.errors import UserError
from nas.files import atomic_path, atomic_write

VERSION = 1  # of the recipe below: a corpus stamped with another version is not taken as done
SENTENCES = Path(__file__).with_name("sentences.txt")
DEV_UTTERANCES = TEST_UTTERANCES = 300
# Hours of training speech in `synth`. 10 h rather than 3: models of 1M parameters trained without
# dropout or SpecAugment overfit 3 h, and synthesis is cheap (about 100 s for 10 h on 2 cores).
DEFAULT_HOURS = 10.0

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
SNR_DB = (5.0, 30.0)
LOWPASS_P, LOWPASS_HZ = 0.3, (2500.0, 6000.0)
PEAK_DBFS = (-20.0, -1.0)

SECONDS_PER_CHAR = 0.054  # espeak-ng's speech per character of text at 175 wpm, measured over variants


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
    noise: str  # a key of nas.data.channel.NOISE_COLOURS
    snr_db: float
    lowpass_hz: float  # 0: full band
    peak: float  # linear peak level of the result
    seed: int  # for espeak-ng's random generators and the noise

    @property
    def speaker(self) -> str:
        return f"{self.accent}+{self.variant}"

    def conditions(self) -> dict:
        """What the manifest records of the take's conditions (:data:`nas.data.manifest.CONDITIONS`)."""
        return {"accent": self.accent, "noise": self.noise, "snr_db": round(self.snr_db, 2),
                "reverb": self.rt60_s > 0, "telephone": self.lowpass_hz > 0}


def default_dir(
    hours: float = DEFAULT_HOURS,
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
    hours: float = DEFAULT_HOURS,
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
        rows = [Utterance(t.id, out_dir / t.audio, t.text, t.speaker, durations[t.id], **t.conditions())
                for t in takes[split]]
        write_manifest(out_dir / f"{split}.jsonl", rows)
    _write_json(out_dir / "done.json", {"params": params, "hours": _hours(takes, durations)})
    return out_dir


def conditions(out_dir: str | Path) -> dict[str, dict]:
    """The conditions of every utterance of the synth corpus in ``out_dir``, by id, drawn again
    from the parameters in its ``done.json`` (nothing is synthesized or written). For corpora made
    before manifests recorded conditions; ``{}`` when ``out_dir`` holds no complete synth corpus."""
    stamp = Path(out_dir) / "done.json"
    if not stamp.is_file():
        return {}
    p = json.loads(stamp.read_text(encoding="utf-8"))["params"]
    if p.get("version") != VERSION:
        return {}
    takes = plan(p["hours"], p["seed"], p["dev_utterances"], p["test_utterances"])
    return {t.id: {"text": t.text, **t.conditions()} for split in SPLITS for t in takes[split]}


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
    # forkserver: each worker is forked from a server process that has only imported this module, so
    # workers start fast and never hold libespeak-ng from before. Not plain fork: this process has
    # threads by now (the pool's own, a run's timing writer, torch's), and a child forked while one
    # of them held a lock waits on it for ever (seen: a `nas demo` stuck 9 min into synthesis).
    # maxtasksperchild=1: a new process, a fresh library, per chunk.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with (
        context.Pool(workers, maxtasksperchild=1) as pool,
        tqdm(total=total, desc=f"synth {out_dir.name}", unit="utt", disable=not progress) as bar,
    ):
        for done in pool.imap(_render_chunk, chunks):
            durations.update(done)
            bar.update(len(done))
    return durations


def _render_chunk(job: tuple[Path, list[Take]]) -> dict[str, float]:
    """Worker: synthesize a chunk of takes in order, with this process's fresh libespeak-ng."""
    out_dir, takes = job
    torch.set_num_threads(1)  # one process per core
    espeak = Espeak()
    return {take.id: _render(take, espeak, out_dir) for take in takes}


def _render(take: Take, espeak: Espeak, out_dir: Path) -> float:
    """Synthesize ``take``, resample it to 16 kHz, pass it through its channel and write it.

    Returns:
        its duration in seconds.
    """
    voice = f"{ACCENTS[take.accent]}+{take.variant}"
    samples = espeak.say(take.text, voice, take.rate, take.pitch, take.intonation, take.seed)
    speech = AF.resample(torch.from_numpy(samples), ESPEAK_RATE, SAMPLE_RATE)
    wav = through_channel(
        speech, np.random.default_rng(take.seed), lead_s=take.lead_s, trail_s=take.trail_s, rt60_s=take.rt60_s,
        noise=take.noise, snr_db=take.snr_db, lowpass_hz=take.lowpass_hz, peak=take.peak,
    )
    with atomic_path(out_dir / take.audio) as tmp:  # a killed worker never leaves half a file
        write_audio(tmp, wav)
    return wav.numel() / SAMPLE_RATE


def _hours(takes: dict[str, list[Take]], durations: dict[str, float]) -> dict[str, float]:
    """Hours of audio per split."""
    return {split: round(sum(durations[t.id] for t in takes[split]) / 3600, 4) for split in SPLITS}


def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON atomically, so a reader never sees half of it."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")
