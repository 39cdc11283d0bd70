"""Naming a corpus: ``synth``, ``librispeech:PATH`` or ``manifest:DIR``, resolved to manifests.

- ``synth``: the embedded corpus, made once into the cache (``$NAS_CACHE``, default
  ``~/.cache/nas``); ``synth:HOURS`` sizes its training split.
- ``librispeech:PATH``: LibriSpeech's own layout; train = every ``train-*`` subset, dev =
  ``dev-clean``, test = ``test-clean`` (or the first ``dev-*``/``test-*`` present).
- ``manifest:DIR``: a directory holding ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from nas.data.manifest import SPLITS, read_manifest, write_manifest
from nas.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("NAS_CACHE", "~/.cache/nas")).expanduser()


@dataclass(frozen=True)
class Corpus:
    spec: str  # as the user named it
    train: Path
    dev: Path
    test: Path

    @property
    def feature_cache(self) -> Path:
        return self.train.parent / "features"


def check_spec(spec: str) -> tuple[str, str]:
    """``(kind, argument)`` of a corpus name, refused at once if malformed or naming no folder."""
    kind, _, arg = spec.partition(":")
    if kind == "synth":
        try:
            if arg and float(arg) <= 0:
                raise ValueError
        except ValueError:
            raise UserError("--data", "synth", f"{arg!r} is not a positive number of hours") from None
        return kind, arg
    if kind in ("manifest", "librispeech") and arg:
        if not Path(arg).is_dir():
            raise UserError(arg, "", "corpus directory not found")
        return kind, arg
    raise UserError("--data", "", f"{spec!r}: expected synth, synth:HOURS, librispeech:PATH or manifest:DIR")


def check_data(spec: str) -> None:
    """Refuse a malformed corpus name, and a manifest corpus whose rows are wrong (missing or
    unreadable audio, empty text...), before anything is written or computed."""
    kind, arg = check_spec(spec)
    if kind == "manifest":
        corpus = _from_dir(spec, Path(arg))
        for manifest in (corpus.train, corpus.dev, corpus.test):
            read_manifest(manifest, check_files=True)


def resolve_data(spec: str, progress: bool = True) -> Corpus:
    kind, arg = check_spec(spec)
    if kind == "synth":
        from nas.data import synth

        hours = float(arg) if arg else synth.DEFAULT_HOURS
        out = synth.default_dir(hours, 0)
        synth.build(out, hours=hours, progress=progress)
        return _from_dir(spec, out)
    if kind == "manifest":
        return _from_dir(spec, Path(arg))
    return _librispeech(spec, Path(arg))


def _from_dir(spec: str, d: Path) -> Corpus:
    if not d.is_dir():
        raise UserError(str(d), "", "corpus directory not found")
    paths = {s: d / f"{s}.jsonl" for s in SPLITS}
    for split, p in paths.items():
        if not p.exists():
            raise UserError(str(d), split, f"missing {p.name} (a corpus directory holds train/dev/test.jsonl)")
        if p.is_dir():
            raise UserError(str(p), "", "a directory, not a manifest file")
    return Corpus(spec, paths["train"], paths["dev"], paths["test"])


def _librispeech(spec: str, root: Path) -> Corpus:
    from nas.data.librispeech import librispeech_splits, to_manifests

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    out = cache_root() / f"librispeech-{key}"
    if not (out / "test.jsonl").is_file():
        to_manifests(root, out / "subsets")
        splits = librispeech_splits(out / "subsets")
        for split in SPLITS:
            if split not in splits:
                raise UserError(str(root), split, f"no LibriSpeech subset for the {split} split")
        for split in SPLITS:  # one manifest per split: the train subsets are concatenated
            write_manifest(out / f"{split}.jsonl", [u for p in splits[split] for u in read_manifest(p)])
    return _from_dir(spec, out)
