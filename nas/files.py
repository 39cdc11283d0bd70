"""Writing files so that a reader never sees half of one, and reading the files a user names.

Every file `nas` writes that another process may read while it is written (a checkpoint, the
trials table, a feature cache, a corpus manifest, an export) goes through here: the bytes go to a
temporary file beside the target, which is renamed over it once complete. A rename within one
directory is atomic on POSIX file systems, NFS included, so a reader sees the old file or the new
one, and a run killed mid-write leaves the old one.

Files the user hands `nas` (a space, a design, a schedule, a manifest) are read through here too:
whatever stops one being read as text (a directory, no permission, binary bytes) is one
:class:`~nas.errors.UserError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from nas.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a path (``torch.save``, soundfile).

    It keeps ``path``'s suffix (some writers choose the format by it) and is unique to this process
    and thread, so concurrent writers of the same target do not collide. When the block ends
    without error it is renamed over ``path``; otherwise it is removed.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


# ---- reading a user's file ------------------------------------------------------------------

def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a file the user named, or a :class:`UserError` naming it.

    Refused: a missing path, a directory, a file this process may not read, and bytes that are not
    UTF-8 text (a leading byte-order mark is dropped). ``what`` names the file in those messages
    (``"manifest file"``: "manifest file not found").
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(str(path), "", f"{what} not found") from None
    except IsADirectoryError:
        raise UserError(str(path), "", f"a directory, not a {what}") from None
    except OSError as exc:  # permission denied, an I/O error...
        raise UserError(str(path), "", f"cannot read this {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise UserError(str(path), "", f"not a text {what}: byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start} is not UTF-8") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON document from a user's file; unreadable files and bad JSON are a :class:`UserError`."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(str(path), "", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(str(path), "", "not valid JSON (nested too deeply)") from None


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """A YAML document (safe types only) from a user's file; unreadable files and bad YAML are a
    :class:`UserError` naming the line."""
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        where = f"line {mark.line + 1}" if mark else ""
        raise UserError(str(path), where, f"YAML syntax error ({problem})") from None
    except RecursionError:
        raise UserError(str(path), "", "YAML syntax error (nested too deeply)") from None


@contextmanager
def quiet_stderr():
    """What C code writes to stderr (file descriptor 2) goes to a temporary file instead
    (KenLM prints its loading progress there); the decoder and the runtime both use it."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # stderr replaced (pytest capture)
        yield
        return
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
