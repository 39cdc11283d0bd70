"""The corpus manifest: one JSON object per line, the form every corpus takes in `nas`.

A row::

    {"id": "synth-train-000001", "audio": "audio/train/000001.wav", "text": "hello world",
     "speaker": "en-gb+m3", "duration": 3.21}

``audio`` is a path, absolute or relative to the manifest's directory; ``text`` is the
transcript (normalized later by :func:`nas.data.text.normalize`). ``speaker`` and ``duration``
are optional: ``duration`` (seconds) is measured from the file when it is missing.
A corpus is a directory holding ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl``.

A row may also say how it was recorded, in any of the optional *condition* fields
(:data:`CONDITIONS`), which the robustness tables group test WER by
(:mod:`nas.report.robustness`); the embedded corpus records all of them::

    {..., "accent": "en-gb-scotland", "noise": "pink", "snr_db": 12.5, "reverb": true, "telephone": false}
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from nas.data.audio import SAMPLE_RATE, AudioError, probe_audio
from nas.data.text import normalize
from nas.errors import UserError
from nas.files import atomic_write, read_text

SPLITS = ("train", "dev", "test")
# the optional condition fields of a row, and the JSON type each must have
CONDITIONS = {"accent": str, "noise": str, "snr_db": float, "reverb": bool, "telephone": bool}


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    text: str
    speaker: str = ""
    duration: float | None = None
    # conditions (None: not recorded)
    accent: str | None = None  # e.g. the espeak-ng English voice
    noise: str | None = None  # noise colour: white, pink, brown
    snr_db: float | None = None  # signal-to-noise ratio of the added noise
    reverb: bool | None = None  # passed through a reverberant room
    telephone: bool | None = None  # band-limited, telephone-like

    def conditions(self) -> dict[str, str | float | bool]:
        """The condition fields this row records."""
        return {k: getattr(self, k) for k in CONDITIONS if getattr(self, k) is not None}


def manifest_digest(path: str | Path) -> str:
    """The sha256 of a manifest's text: the identity of a split, kept beside what was scored on it
    (:class:`nas.data.features.FeatureSet` records it as ``manifest_sha256``)."""
    return hashlib.sha256(read_text(path, "manifest file").encode()).hexdigest()


def read_manifest(path: str | Path, check_files: bool = False) -> list[Utterance]:
    """Read a JSONL manifest. Malformed rows are a :class:`UserError` naming file, line and field.

    With ``check_files`` (before features are computed), each row must also point at audio whose
    header reads, at ``SAMPLE_RATE`` or above (higher rates are resampled), and its transcript must
    keep some words after normalization. These are mistakes of the manifest, found in seconds with
    nothing computed yet. Damage inside the audio data is not checked here: such a row is skipped
    and counted when features are computed, so one corrupt file never ends a long run.
    """
    path = Path(path)
    rows: list[Utterance] = []
    lines = read_text(path, "manifest file").split("\n")  # JSON Lines: only "\n" ends a row
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(str(path), where, f"not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(str(path), where, "not valid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise UserError(str(path), where, "each line must be a JSON object")
        for key in ("audio", "text"):
            if not isinstance(obj.get(key), str):
                raise UserError(str(path), f"{where}.{key}", "missing or not a string")
        duration = obj.get("duration")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or not 0 <= duration < math.inf):
            raise UserError(str(path), f"{where}.duration", "must be a non-negative number of seconds")
        conditions = _conditions(path, where, obj)
        audio = Path(obj["audio"])
        if not audio.is_absolute():
            audio = path.parent / audio
        if check_files:
            _check_row(path, where, audio, obj["text"])
        rows.append(
            Utterance(
                id=str(obj.get("id", f"{path.stem}-{lineno}")),
                audio=audio,
                text=obj["text"],
                speaker=str(obj.get("speaker", "")),
                duration=None if duration is None else float(duration),
                **conditions,
            )
        )
    if not rows:
        raise UserError(str(path), "", "manifest has no rows")
    return rows


def _conditions(path: Path, where: str, obj: dict) -> dict:
    """The condition fields of a row, checked: a string, a finite number, or true/false."""
    found = {}
    for key, kind in CONDITIONS.items():
        value = obj.get(key)
        if value is None:
            continue
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(str(path), f"{where}.{key}", "must be a number")
            value = float(value)
        elif not isinstance(value, kind):
            raise UserError(str(path), f"{where}.{key}", "must be true or false" if kind is bool else "must be a string")
        found[key] = value
    return found


def _check_row(path: Path, where: str, audio: Path, text: str) -> None:
    if not normalize(text):
        raise UserError(str(path), f"{where}.text", f"no words left in {text!r} after normalization")
    shown = str(audio) if str(audio).isprintable() else repr(str(audio))  # the error stays one line
    try:
        rate = probe_audio(audio)
    except AudioError as exc:
        raise UserError(str(path), f"{where}.audio", f"{shown}: {exc}") from None
    if rate < SAMPLE_RATE:
        raise UserError(str(path), f"{where}.audio", f"{shown}: {rate} Hz, below the {SAMPLE_RATE} Hz the "
                        "features need (upsampling cannot restore the missing band)")


def write_manifest(path: str | Path, rows: list[Utterance]) -> None:
    """Write rows as JSONL; audio paths inside the manifest's directory are stored relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        obj = asdict(row)
        audio = Path(row.audio)
        try:
            obj["audio"] = str(audio.resolve().relative_to(path.parent.resolve()))
        except ValueError:
            obj["audio"] = str(audio.resolve())
        for key in ("duration", *CONDITIONS):  # optional fields a row does not record
            if obj[key] is None:
                del obj[key]
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    atomic_write(path, "".join(lines))  # a killed writer never leaves half a manifest
