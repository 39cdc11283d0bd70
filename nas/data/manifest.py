"""The corpus manifest: one JSON object per line, the form every corpus takes in `nas`.

A row::

    {"id": "synth-train-000001", "audio": "audio/train/000001.wav", "text": "hello world",
     "speaker": "en-gb+m3", "duration": 3.21}

``audio`` is a path, absolute or relative to the manifest's directory; ``text`` is the
transcript (normalized later by :func:`nas.data.text.normalize`). ``speaker`` and ``duration``
are optional: ``duration`` (seconds) is measured from the file when it is missing.
A corpus is a directory holding ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nas.errors import UserError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    text: str
    speaker: str = ""
    duration: float | None = None


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest. Malformed rows are a :class:`UserError` naming file, line and field.

    Rows whose audio is missing or unreadable are *not* rejected here: they are skipped and
    counted when features are computed, so one broken file never ends a long run.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "", "manifest file not found")
    rows: list[Utterance] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(str(path), where, f"not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(str(path), where, "each line must be a JSON object")
        for key in ("audio", "text"):
            if not isinstance(obj.get(key), str):
                raise UserError(str(path), f"{where}.{key}", "missing or not a string")
        duration = obj.get("duration")
        if duration is not None and (not isinstance(duration, (int, float)) or duration < 0):
            raise UserError(str(path), f"{where}.duration", "must be a non-negative number of seconds")
        audio = Path(obj["audio"])
        if not audio.is_absolute():
            audio = path.parent / audio
        rows.append(
            Utterance(
                id=str(obj.get("id", f"{path.stem}-{lineno}")),
                audio=audio,
                text=obj["text"],
                speaker=str(obj.get("speaker", "")),
                duration=None if duration is None else float(duration),
            )
        )
    if not rows:
        raise UserError(str(path), "", "manifest has no rows")
    return rows


def write_manifest(path: str | Path, rows: list[Utterance]) -> None:
    """Write rows as JSONL; audio paths inside the manifest's directory are stored relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            obj = asdict(row)
            audio = Path(row.audio)
            try:
                obj["audio"] = str(audio.resolve().relative_to(path.parent.resolve()))
            except ValueError:
                obj["audio"] = str(audio.resolve())
            if obj["duration"] is None:
                del obj["duration"]
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a killed writer never leaves half a manifest
