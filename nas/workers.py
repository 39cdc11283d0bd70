"""Where search and retraining meet Ray: the job a worker gets, the one trainable, and the Tuner.

A :class:`Job` is one training run: a design, a schedule, the corpus and the run directory. The
search hands Ray Tune one job per sampled design (through its searcher); retraining hands it a
list. Either way Tune runs :func:`trainable`, a thin function around :func:`nas.train.train`, on
a worker with the job's CPUs, and retries a worker that dies once (the retry continues from the
run's checkpoint). :func:`run_on_ray` is the one Tuner set-up both use.

A run directory is named by :func:`run_key`, a hash of the design's and the schedule's fields:
the same design under the same schedule always lands in the same directory, so a resumed or
retried run reuses its checkpoint, whoever serialized the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nas.config import ArchConfig
from nas.data.corpus import Corpus, resolve_data
from nas.errors import UserError
from nas.schedule import Schedule


@dataclass(frozen=True)
class Job:
    """One training run for a Ray worker.

    Attributes:
        arch: the design.
        schedule: the training schedule.
        corpus: the corpus, its features already computed (:func:`prepare_data`).
        run_dir: where the trainer checkpoints and writes its results (absolute).
        threads: torch threads (the CPUs Tune reserves for the trial).
        evaluate_test: evaluate on the test set at the end (retraining does; the search does not).
        max_memory_mb: the trainer's memory guard, or None.
        measure: device costs to measure on the trained model (:mod:`nas.device`): ``rtf``, ``memory``.
    """

    arch: ArchConfig
    schedule: Schedule
    corpus: Corpus
    run_dir: Path
    threads: int = 1
    evaluate_test: bool = False
    max_memory_mb: float | None = None
    measure: tuple[str, ...] = ()  # device costs measured on the trained model (nas.device)


def run_key(arch: ArchConfig, schedule: Schedule) -> str:
    """The run directory's name: a hash of the design's and the schedule's fields, canonical
    (sorted keys, no whitespace) so that it does not depend on how either was serialized."""
    fields = {"arch": arch.model_dump(mode="json"), "schedule": schedule.model_dump(mode="json")}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_dir(parent: Path, arch: ArchConfig, schedule: Schedule) -> Path:
    """``parent/<run_key>``, absolute: Tune runs each trial in a working directory of its own."""
    return Path(parent).resolve() / run_key(arch, schedule)


def trainable(config: dict) -> None:
    """Ray Tune function trainable: run ``config["job"]``, report each evaluation and the end.

    Intermediate reports carry the trainer's evaluation point (``step``, ``dev_wer``...). The final
    report has ``final: True`` and the run's dev metrics, or ``error`` with the reason when the run
    raised (diverged, ran out of memory, met bad data): the trial then ends normally, and the
    driver records it as failed with that reason.
    """
    import torch
    from ray import tune

    from nas.device import measure_device
    from nas.train import train

    job: Job = config["job"]
    torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    try:
        metrics = train(job.arch, job.schedule, job.corpus, job.run_dir, threads=job.threads,
                        progress=False, evaluate_test=job.evaluate_test, max_memory_mb=job.max_memory_mb,
                        callback=lambda step, point: tune.report(point))
        device = measure_device(job.run_dir, job.arch, job.corpus, job.measure) if job.measure else {}
    except Exception as exc:  # noqa: BLE001 - every failure becomes a failed trial with its reason
        reason = exc.line() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        tune.report({"error": reason[:500]})
        return
    tune.report({"final": True, **device, **{f"dev_{k}": v for k, v in metrics["dev"].items() if isinstance(v, float)},
                 "train_loss_mean": metrics["train_loss_mean"], "step": metrics["steps"],
                 "train_seconds": metrics["train_seconds"], "trainer_seconds": time.perf_counter() - t0})


def run_on_ray(out: Path, name: str, workers: int, cpus_per_trial: int, searcher=None, scheduler=None,
               jobs: list[Job] | None = None, on_end: Callable[[Job], None] | None = None,
               time_budget_s: float | None = None, gpus_per_trial: float = 0) -> None:
    """Run trials on Ray Tune: those a ``searcher`` suggests until it says it is finished, or the
    given ``jobs``. At most ``workers`` at once, each with ``cpus_per_trial`` CPUs (and
    ``gpus_per_trial`` GPUs: Ray hides the GPUs from a trial that asks for none); a worker that
    dies is retried once. ``on_end(job)`` is called as each trial ends (a progress bar)."""
    from ray import tune

    class Ended(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            on_end(trial.config["job"])

        on_trial_error = on_trial_complete

    run_config = tune.RunConfig(name=f"{name}-{int(time.time())}", storage_path=str((out / "tune").resolve()),
                                verbose=0, failure_config=tune.FailureConfig(max_failures=1),
                                callbacks=[Ended()] if on_end else None)
    if searcher is not None:
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                                      max_concurrent_trials=workers, time_budget_s=time_budget_s)
        param_space = None
    else:
        tune_config = tune.TuneConfig(max_concurrent_trials=workers)
        param_space = {"job": tune.grid_search(jobs or [])}
    resources = {"cpu": cpus_per_trial} | ({"gpu": gpus_per_trial} if gpus_per_trial else {})
    # Ray Tune catches Ctrl-C, stops its trials and returns as if the run were done, and nothing
    # public says that it was interrupted: the search would go on to retrain a half-searched front,
    # and a timed benchmark would record a part cut short. Let Ctrl-C be a KeyboardInterrupt
    # instead; everything resumes from Optuna storage and the trials' checkpoints (Tune's own
    # experiment state, which its handler saves, is never restored here).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    tune.Tuner(tune.with_resources(trainable, resources), param_space=param_space,
               tune_config=tune_config, run_config=run_config).fit()


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our line per trial replaces Tune's tables
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError("--address", "", f"cannot reach a Ray cluster at {address!r}: {reason}") from None
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        # ray.init puts in its own SIGTERM handler, which logs and aborts the driver on the spot:
        # put back the command's (nas.cli stops on SIGTERM as on Ctrl-C, so the run resumes cleanly).
        signal.signal(signal.SIGTERM, on_term)


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
    """Resolve the corpus and compute its features once, on all cores, before workers need them.

    Returns the corpus and a one-line summary for the run's output: utterances per split, and
    the rows skipped because their audio would not decode."""
    from nas.data.features import FeatureSet, skipped_text

    corpus = resolve_data(spec)
    parts = []
    for split, manifest in (("train", corpus.train), ("dev", corpus.dev), ("test", corpus.test)):
        fs = FeatureSet(manifest, corpus.feature_cache, workers=os.cpu_count() or 1)
        parts.append(f"{split} {len(fs)} utterances{skipped_text(fs.skipped)}")
    return corpus, f"corpus {spec}: " + "; ".join(parts)
