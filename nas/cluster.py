"""Where search and retraining meet Ray: starting or joining a cluster, handing the corpus to
workers, and the run directory of each trained design."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from nas.data.corpus import Corpus, resolve_data
from nas.errors import UserError


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our line per trial replaces Tune's tables
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError("--address", "", f"cannot reach a Ray cluster at {address!r}: {reason}") from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init waits for many minutes on an address where nothing answers: fail fast instead."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except ValueError:
        raise UserError("--address", "", f"{address!r} is not HOST:PORT (or ray://HOST:PORT)") from None
    except OSError as exc:
        raise UserError("--address", "", f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc}") from None


def prepare_data(spec: str) -> tuple[Corpus, str]:
    """Resolve the corpus and compute its features once, before workers need them.

    Returns the corpus and a one-line summary for the run's output: utterances per split, and
    the rows skipped because their audio would not decode."""
    from nas.data.features import FeatureSet, skipped_text

    corpus = resolve_data(spec)
    parts = []
    for split, manifest in (("train", corpus.train), ("dev", corpus.dev), ("test", corpus.test)):
        fs = FeatureSet(manifest, corpus.feature_cache)
        parts.append(f"{split} {len(fs)} utterances{skipped_text(fs.skipped)}")
    return corpus, f"corpus {spec}: " + "; ".join(parts)


def corpus_config(corpus: Corpus) -> dict:
    """The corpus as plain values for a Tune trial's config."""
    return {"spec": corpus.spec, "train": str(corpus.train), "dev": str(corpus.dev), "test": str(corpus.test)}


def corpus_from_config(c: dict) -> Corpus:
    return Corpus(c["spec"], Path(c["train"]), Path(c["dev"]), Path(c["test"]))


def run_dir_name(arch_json: str, schedule: str) -> str:
    """Same design, same schedule: same run directory, so a re-run resumes or reuses it."""
    return hashlib.sha256(f"{schedule}\n{arch_json}".encode()).hexdigest()[:16]
