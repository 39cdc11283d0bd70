"""LibriSpeech, read from its own directory layout into manifests.

The layout is ``<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter, each line ``<utt-id> <TRANSCRIPT>``. Audio is read
with soundfile (``torchaudio.datasets.LIBRISPEECH`` needs torchcodec, which does not load here).
"""

from __future__ import annotations

import logging
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from nas.data.manifest import Utterance, write_manifest
from nas.errors import UserError

log = logging.getLogger(__name__)


def to_manifests(root: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<out_dir>/<subset>.jsonl`` for every subset found under ``root``.

    ``root`` may hold subsets (``train-clean-100/``, ``dev-clean/``...) or be one subset's
    directory: a chapter's subset is the directory two levels above its transcript. Each row
    keeps the transcript as written (normalized later), the speaker id, and the duration
    measured from the flac header. A line whose flac is missing or unreadable is skipped with a
    warning; each subset's counts are logged at INFO.

    Returns:
        subset name → manifest path.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise UserError(str(root), "", "LibriSpeech directory not found")
    subsets: dict[str, list[Path]] = {}
    for transcript in sorted(root.rglob("*.trans.txt")):
        subsets.setdefault(transcript.parents[2].name, []).append(transcript)
    if not subsets:
        raise UserError(str(root), "", "no LibriSpeech transcript (*.trans.txt) under this directory")
    manifests = {}
    for subset, transcripts in subsets.items():
        rows, skipped = [], 0
        for transcript in tqdm(transcripts, desc=subset, unit="chapter"):
            for lineno, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                flac = transcript.parent / f"{utt_id}.flac"
                try:
                    info = sf.info(str(flac))
                except sf.SoundFileError as exc:
                    why = "not found" if not flac.exists() else str(exc)
                    log.warning("%s: line %d: %s: %s; utterance skipped", transcript, lineno, flac.name, why)
                    skipped += 1
                    continue
                speaker = utt_id.split("-")[0]
                rows.append(Utterance(utt_id, flac, text, speaker, info.frames / info.samplerate))
        if not rows:
            log.warning("%s: no utterance has its audio; no manifest written", subset)
            continue
        manifests[subset] = out_dir / f"{subset}.jsonl"
        write_manifest(manifests[subset], rows)
        log.info("%s: %d utterances, %d skipped → %s", subset, len(rows), skipped, manifests[subset])
    if not manifests:
        raise UserError(str(root), "", "no transcript line has its flac file")
    return manifests


def librispeech_splits(manifest_dir: str | Path) -> dict[str, list[Path]]:
    """Our splits from the subset manifests :func:`to_manifests` wrote into ``manifest_dir``.

    ``train`` is every ``train-*`` subset; ``dev`` is ``dev-clean``, else the first ``dev-*`` by
    name; ``test`` likewise. A split with no subset is left out.
    """
    subsets = {p.stem: p for p in sorted(Path(manifest_dir).glob("*.jsonl"))}
    splits = {}
    train = [path for name, path in subsets.items() if name.startswith("train-")]
    if train:
        splits["train"] = train
    for split in ("dev", "test"):
        names = [name for name in subsets if name.startswith(f"{split}-")]
        if names:
            splits[split] = [subsets[f"{split}-clean" if f"{split}-clean" in names else names[0]]]
    if not splits:
        raise UserError(str(manifest_dir), "", "no subset manifest (train-*.jsonl, dev-*, test-*)")
    return splits
