"""Log-mel features, SpecAugment, a disk-cached feature set, and length-bucketed batches."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import multiprocessing
import random
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import torch
import torchaudio.transforms as T
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from nas.data.audio import AudioError, load_audio
from nas.data.manifest import Utterance, read_manifest
from nas.data.text import normalize
from nas.data.tokenizer import Tokenizer
from nas.errors import UserError
from nas.files import atomic_path, read_text

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the cached file's content changes (files of format 1 written with
# "durations", which nothing read, still load)


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel settings: 25 ms windows every 10 ms at 16 kHz, ``log(mel + log_offset)``."""

    sample_rate: int = 16_000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    log_offset: float = 1e-6


@functools.lru_cache(maxsize=4)
def _mel_spectrogram(cfg: FeatureConfig) -> T.MelSpectrogram:
    return T.MelSpectrogram(
        sample_rate=cfg.sample_rate,
        n_fft=cfg.n_fft,
        win_length=cfg.win_length,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
    )


def log_mel(wav: Tensor, cfg: FeatureConfig = FeatureConfig()) -> Tensor:
    """Log-mel features of one utterance, normalized per utterance.

    Args:
        wav: ``(samples,)``, mono at ``cfg.sample_rate``, at least ``cfg.n_fft // 2 + 1`` samples.

    Returns:
        ``(frames, n_mels)`` with ``frames = 1 + samples // hop_length``; every mel bin has mean 0
        and standard deviation 1 over the frames (a constant bin becomes 0).
    """
    with torch.no_grad():
        feats = (_mel_spectrogram(cfg)(wav) + cfg.log_offset).log().T
    return (feats - feats.mean(0)) / (feats.std(0, correction=0) + 1e-5)


@dataclass(frozen=True)
class SpecAugment:
    """SpecAugment (Park et al., 2019) without time warping; for training batches only.

    Masks are drawn per utterance inside its true length, and set to 0, the per-utterance mean of
    normalized features.

    Args:
        freq_masks: frequency masks per utterance.
        freq_width: the widest frequency mask, in mel bins.
        time_masks: time masks per utterance.
        time_width_ratio: the widest time mask, as a fraction of the utterance's frames.
    """

    freq_masks: int
    freq_width: int
    time_masks: int
    time_width_ratio: float

    def __call__(self, feats: Tensor, lengths: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Args: feats ``(B, T, F)``; lengths ``(B,)`` valid frames. Returns a masked copy ``(B, T, F)``.

        The masks are drawn from ``generator`` (the global generator when ``None``), whose
        state advances; the global random state is left as it was.
        """
        out = feats.clone()
        freq = T.FrequencyMasking(self.freq_width)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # torchaudio draws from the global generator
            torch.manual_seed(seed)
            for b, n in enumerate(lengths.tolist()):
                time = T.TimeMasking(n, p=self.time_width_ratio)
                spec = out[b, :n].T  # (F, n): torchaudio's (freq, time)
                for _ in range(self.freq_masks):
                    spec = freq(spec)
                for _ in range(self.time_masks):
                    spec = time(spec)
                out[b, :n] = spec.T
        return out


def skipped_text(skipped: dict[str, int]) -> str:
    """``", 2 skipped (1 bad audio, 1 short audio)"``, or ``""`` when nothing was skipped."""
    if not skipped:
        return ""
    return f", {sum(skipped.values())} skipped ({', '.join(f'{n} {why}' for why, n in skipped.items())})"


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _one_thread() -> None:
    torch.set_num_threads(1)


def _features(utt: Utterance, cfg: FeatureConfig) -> tuple[str, Tensor] | _Skip:
    """One row's normalized transcript and float16 log-mels, or why it is left out."""
    try:
        text, wav = _read(utt, cfg)
    except _Skip as skip:
        return skip
    return text, log_mel(wav, cfg).half()


def _read(utt: Utterance, cfg: FeatureConfig) -> tuple[str, Tensor]:
    """The normalized transcript and the waveform ``(samples,)`` of a checked row; raises _Skip."""
    text = normalize(utt.text)
    try:
        wav = load_audio(utt.audio, cfg.sample_rate)
    except AudioError as exc:
        raise _Skip("bad audio", str(exc)) from None
    if len(wav) < cfg.win_length:
        raise _Skip("short audio", f"{len(wav)} samples, less than one {cfg.win_length}-sample window")
    return text, wav


class FeatureSet:
    """Features of a manifest's usable utterances, computed once and cached in ``cache_dir``.

    The cache file is keyed by the manifest's bytes and location and by ``cfg``. The manifest's
    rows are checked first (:func:`read_manifest` with ``check_files``): a wrong one is a
    UserError, and nothing is written, not even ``cache_dir``. A row whose audio then fails to
    decode, or is empty, non-finite or shorter than one window, is left out with one warning;
    ``skipped`` counts them by reason.

    Attributes:
        manifest_sha256: the manifest's :func:`nas.data.manifest.manifest_digest`: which split this is.
        ids, texts: per utterance, in manifest order; ``texts`` are normalized.
        lengths: frames per utterance.
        skipped: reason → rows left out.
    """

    def __init__(self, manifest: str | Path, cache_dir: str | Path, cfg: FeatureConfig = FeatureConfig(),
                 workers: int = 1):
        """``workers``: processes computing the features when they are not cached yet."""
        manifest = Path(manifest)
        text = read_text(manifest, "manifest file").encode()
        key = hashlib.sha256(text)
        key.update(repr((_CACHE_FORMAT, str(manifest.resolve()), astuple(cfg))).encode())
        cache = Path(cache_dir) / f"{manifest.stem}-{key.hexdigest()[:16]}.pt"
        if not cache.is_file():
            computed = self._compute(manifest, cfg, workers)  # checks the rows: a refusal writes nothing
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:  # concurrent workers may compute it too
                torch.save(computed, tmp)
            del computed  # the features are read back memory-mapped
        data = torch.load(cache, mmap=True)  # features are paged in as batches use them
        log.info("%s: %d utterances%s; in %s", manifest, len(data["ids"]), skipped_text(data["skipped"]), cache)
        self.cfg = cfg
        self.manifest_sha256 = hashlib.sha256(text).hexdigest()  # as manifest_digest(manifest)
        self.ids: list[str] = data["ids"]
        self.texts: list[str] = data["texts"]
        self.lengths: list[int] = data["lengths"]
        self.skipped: dict[str, int] = data["skipped"]
        self._feats: Tensor = data["feats"]  # (total frames, n_mels) float16
        self._starts = [0, *itertools.accumulate(self.lengths)]

    @staticmethod
    def _compute(manifest: Path, cfg: FeatureConfig, workers: int = 1) -> dict:
        data = {"ids": [], "texts": [], "lengths": [], "skipped": {}}
        feats = []
        rows = read_manifest(manifest, check_files=True)
        one = functools.partial(_features, cfg=cfg)
        with contextlib.ExitStack() as stack:
            if workers > 1 and len(rows) > 64:  # spawned: a forked child of a process using torch's threads can hang
                pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers, _one_thread))
                results = pool.imap(one, rows, chunksize=32)  # in manifest order
            else:
                results = map(one, rows)
            for utt, got in tqdm(zip(rows, results), total=len(rows), desc=f"features {manifest.name}", unit="utt"):
                if isinstance(got, _Skip):
                    log.warning("%s: %s: skipped, %s: %s", manifest, utt.id, got.reason, got.detail)
                    data["skipped"][got.reason] = data["skipped"].get(got.reason, 0) + 1
                    continue
                text, feat = got
                feats.append(feat)
                data["ids"].append(utt.id)
                data["texts"].append(text)
                data["lengths"].append(len(feat))
        if not feats:
            counts = ", ".join(f"{n} {reason}" for reason, n in data["skipped"].items())
            total = sum(data["skipped"].values())
            raise UserError(str(manifest), "", f"no usable utterance ({total} skipped: {counts})")
        data["feats"] = torch.cat(feats)
        return data

    def __len__(self) -> int:
        return len(self.ids)

    def features(self, i: int) -> Tensor:
        """Utterance ``i``'s features, ``(frames, n_mels)`` float32."""
        return self._feats[self._starts[i] : self._starts[i + 1]].float()


@dataclass
class Batch:
    """A padded batch of ``B`` utterances.

    Attributes:
        feats: ``(B, T, n_mels)`` float32, zero beyond each length.
        feat_lens: ``(B,)`` long, valid frames.
        targets: ``(B, S)`` long, CTC classes padded with 0 (the blank).
        target_lens: ``(B,)`` long.
        texts: normalized transcripts. ids: utterance ids.
    """

    feats: Tensor
    feat_lens: Tensor
    targets: Tensor
    target_lens: Tensor
    texts: list[str]
    ids: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            feats=self.feats.to(device),
            feat_lens=self.feat_lens.to(device),
            targets=self.targets.to(device),
            target_lens=self.target_lens.to(device),
        )


def bucket_batches(lengths: Sequence[int], max_frames: int, shuffle: bool, seed: int = 0) -> list[list[int]]:
    """Batches of indices into ``lengths`` whose padded size ``B * longest`` is at most ``max_frames``.

    Indices are sorted by length and cut into consecutive batches, so each batch holds similar
    lengths; with ``shuffle`` the order of the batches is shuffled by ``seed``. An utterance longer
    than ``max_frames`` gets a batch of its own.
    """
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batch and (len(batch) + 1) * lengths[i] > max_frames:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def collate(
    features: FeatureSet,
    indices: Sequence[int],
    tokenizer: Tokenizer,
    augment: SpecAugment | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    """The :class:`Batch` of utterances ``indices``; ``augment`` (training only) draws from ``generator``."""
    feats = [features.features(i) for i in indices]
    feat_lens = torch.tensor([len(f) for f in feats])
    padded = pad_sequence(feats, batch_first=True)
    if augment is not None:
        padded = augment(padded, feat_lens, generator)
    texts = [features.texts[i] for i in indices]
    targets = [torch.tensor(tokenizer.encode(text), dtype=torch.long) for text in texts]
    return Batch(
        feats=padded,
        feat_lens=feat_lens,
        targets=pad_sequence(targets, batch_first=True),
        target_lens=torch.tensor([len(t) for t in targets]),
        texts=texts,
        ids=[features.ids[i] for i in indices],
    )
