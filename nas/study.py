"""The Optuna side of the search: storage, samplers, and the budget gate.

Optuna samples a design define-by-run from the space; the budget is checked by arithmetic at
once. A design over budget gets ``trial.set_constraint("budget", violation > 0)`` and is told as
PRUNED with no values: the sampler files it as infeasible and learns from it, no objective value
is made up, and it never reaches a worker. Feasible designs are told COMPLETE with their
objective values, or FAIL with a reason. Everything lives in Optuna storage (SQLite or
PostgreSQL), which is what makes a search resumable and shareable between drivers.

Trials whose driver died are found by Optuna's heartbeat: their heartbeat stops, they are marked
FAIL and retried (same parameters) by ``RetryHeartbeatStaleTrialCallback``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from nas.budget import Budget, Count, count
from nas.config import ArchConfig
from nas.errors import UserError
from nas.schedule import Rungs, Schedule
from nas.space import Space
from nas.trials import BUDGET_KEY

log = logging.getLogger(__name__)

# The proxy signals, by objective name (all minimized), and their key in a trial's evaluation
# points and final report: dev WER, CER and CTC loss per token (greedy decoding, the schedule's
# dev subset), and the mean training loss over the whole run (Ru et al. 2020's sum of losses).
SIGNALS = {"wer": "dev_wer", "cer": "dev_cer", "loss": "dev_loss", "train_loss": "train_loss_mean"}
# The proxy signal each fidelity ranks designs by unless told otherwise: the one that
# `nas bench fidelity` measured to rank them most as full training does (results/bench.md,
# `best_by_fidelity`: 10 designs at 1M, Kendall tau against full dev WER; parameter count alone
# gives 0.719). A fixed proxy reads its signal once, after its 300 annealed steps: dev WER, 0.568,
# where CER gives 0.449 and loss 0.405. Successive halving reads it at every rung (600, 1,200 and
# 2,700 steps by default, nas.schedule.Rungs): dev loss is best or tied at each (0.809, 0.899 and
# 0.854). At 300 steps, a rung no longer used by default, loss gives 0.629 and WER 0.494.
BEST_SIGNAL = {"fixed": "wer", "asha": "loss"}
# How a search trains its designs unless told otherwise: successive halving (nas.asha), which
# `nas bench search` measured against a fixed proxy as long as its last rung at equal wall time:
# more designs and the same best one (figures where the default rungs are chosen, nas.schedule.Rungs).
# A fixed proxy as short as the first rung ranks worse than parameter count (tau above).
DEFAULT_FIDELITY = "asha"


def default_objectives(fidelity: str = DEFAULT_FIDELITY) -> tuple[str, str]:
    """What a search under ``fidelity`` minimizes unless told otherwise: its best signal, and bytes."""
    return BEST_SIGNAL[fidelity], "bytes"


DEFAULT_OBJECTIVES = default_objectives()
SIZES = ("bytes", "macs")
# What an intermediate evaluation point of a trial keeps (its Optuna user attr ``curve``).
POINT_KEYS = ("step", "train_loss", "train_loss_mean", "dev_wer", "dev_cer", "dev_loss", "lr", "elapsed_s",
              "train_s")


# Costs measured on a trial's trained model (nas.device): objective name -> its key in the trial's
# final report.
DEVICE_OBJECTIVES = {"rtf": "rtf", "memory": "activation_memory_bytes"}


def parse_objectives(text: str) -> tuple[str, ...]:
    """``SIGNAL,bytes[,macs][,rtf][,memory]``: a proxy signal first, then bytes, then optional costs
    (MACs by arithmetic; the real-time factor and activation memory measured on the trained model)."""
    objectives = tuple(o.strip() for o in text.split(","))
    if len(objectives) < 2 or objectives[0] not in SIGNALS or objectives[1] != "bytes" or \
            not set(objectives[2:]) <= {"macs", *DEVICE_OBJECTIVES} or len(set(objectives)) != len(objectives):
        raise UserError("--objectives", "", f"{text!r}: expected a proxy signal ({', '.join(SIGNALS)}), then bytes, "
                        f"and optionally macs, {', '.join(DEVICE_OBJECTIVES)} (e.g. loss,bytes)")
    return objectives
SAMPLERS = ("tpe", "nsga2", "gp", "random")
# A running trial records a heartbeat this often; one silent for GRACE seconds is stale.
HEARTBEAT_S = int(os.environ.get("NAS_HEARTBEAT_S", "10"))
GRACE_S = int(os.environ.get("NAS_GRACE_S", str(6 * HEARTBEAT_S)))



def storage_url(study: str, storage: str | None, results: Path) -> str:
    if storage:
        return storage
    (results / study).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results / study / 'study.db').resolve()}"


SQLITE_LOCK_WAIT_S = 120  # how long a writer waits for another's lock on a study file


def open_storage(url: str, attempts: int = 5) -> RDBStorage:
    """Optuna's RDB storage with heartbeats; an unreachable database is one clear error."""
    for attempt in range(1, attempts + 1):
        try:
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                # Retry a stale trial however often its design was interrupted: the last trial of a
                # capped chain would be left "failed", which counts as done, and never resumed.
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None),
                # SQLite locks the whole file for each write: with two drivers on one study file (and
                # each one's heartbeat thread) a writer can wait for seconds on a loaded machine, past
                # sqlite3's default 5 s, which raises "database is locked" in the middle of a search.
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else
                {"connect_args": {"timeout": SQLITE_LOCK_WAIT_S}},
            )
        except Exception as exc:  # sqlalchemy raises many types for bad URLs and dead servers
            if not _lost_schema_race(exc) or attempt == attempts:
                reason = str(exc).strip().splitlines()[0][:200]
                raise UserError("--storage", "", f"cannot open {_redact(url)}: {reason}") from None
            time.sleep(0.5 * attempt)


def _lost_schema_race(exc: Exception) -> bool:
    """Drivers that open a new database at once race to create Optuna's tables; the loser sees a
    duplicate table or version row. Once the winner is done, opening again succeeds."""
    from sqlalchemy.exc import IntegrityError

    return isinstance(exc, IntegrityError) or "already exists" in str(exc)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# TPE's first trials are random draws (Optuna's default, 10; over-budget samples count, they are
# PRUNED), made by the same RandomSampler, under the same seed, as --sampler random's.
TPE_STARTUP_TRIALS = 10


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # group=True: the space is conditional (define-by-run)
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                          n_startup_trials=TPE_STARTUP_TRIALS)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError("--sampler", "", f"{name!r} is not one of {', '.join(SAMPLERS)}")


def started_with(storage: RDBStorage, name: str) -> dict:
    """The settings study ``name`` was started with (see :func:`open_study`); empty for a new study."""
    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get("settings", {})
    except KeyError:  # no such study yet
        return {}


def objectives_for(storage: RDBStorage, name: str, fidelity: str, named: tuple[str, ...] | None) -> tuple[str, ...]:
    """What study ``name`` minimizes: the objectives the user ``named``; else those it was started
    with, so that a default changed since (by a new ``nas bench fidelity``) never stops a study from
    resuming; else, for a new study, the fidelity's default (:func:`default_objectives`)."""
    if named:
        return tuple(named)
    before = started_with(storage, name).get("objectives")
    return tuple(before) if before else default_objectives(fidelity)


def rungs_for(storage: RDBStorage, name: str, named: Rungs | None) -> Rungs:
    """Successive halving's rungs for study ``name``: those the user ``named``; else those it was
    started with, so that a default changed since (rungs 1,3,9 until 2026-12-04, 3,9 until
    2026-12-05) never stops a study from resuming; else, for a new study (or one under a
    fixed proxy), the default."""
    if named:
        return named
    before = started_with(storage, name)
    return Rungs(tuple(before["rungs"]), before.get("eta") or Rungs().eta) if before.get("rungs") else Rungs()


def open_study(name: str, storage: RDBStorage, objectives: tuple[str, ...], sampler: str, seed: int | None,
               settings: dict) -> optuna.Study:
    """Create or continue study ``name``. ``settings`` (space, budget, objectives, data, proxy and
    the recipe each trial trains) are stored with the study; continuing it with different ones is
    refused, so that no study mixes designs trained two ways. A setting recorded since the study was
    started is stored when it is continued."""
    study = optuna.create_study(study_name=name, storage=storage, directions=["minimize"] * len(objectives),
                                sampler=make_sampler(sampler, seed), load_if_exists=True)
    before = study.user_attrs.get("settings")
    if before is None:
        study.set_user_attr("settings", settings)
        return study
    adopted = {}
    for key, value in settings.items():
        if key not in before and key in ADOPTED_SETTINGS:  # recorded since this study was started
            adopted[key] = value
            continue
        was = before.get(key)
        if key == "trial_recipe":  # a field added to Schedule since then counts at its default
            was = Schedule.model_validate(was).model_dump(mode="json")
        if was != value:
            raise UserError(f"study {name}", key, f"this study was started with {_differs(was, value)}; "
                            "use another --study")
    if adopted:  # kept from now on
        study.set_user_attr("settings", before | adopted)
    return study


# Settings recorded since some studies were started, which such a study takes on when it is
# continued. Any other setting a study lacks is refused, as one that differs is: a study started
# before the fidelity was recorded must not go on under successive halving.
ADOPTED_SETTINGS = ("trial_recipe",)


def _differs(before, now) -> str:
    """What a setting was and is, in words; for a recipe (a dict), only the fields that changed."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        return "other fields: " + ", ".join(f"{k} {before.get(k)!r}, not {now.get(k)!r}" for k in keys)
    return f"{before!r}, not {now!r}"


# ---- the budget gate ------------------------------------------------------------------------

@dataclass
class Candidate:
    trial: optuna.Trial
    arch: ArchConfig
    count: Count


def record_heartbeat(storage: RDBStorage, study_id: int, number: int) -> None:
    """A heartbeat for a running trial. Optuna records heartbeats only inside ``Study.optimize``,
    and ask-and-tell has no public helper for it, so this calls the storage's own (public)
    ``record_heartbeat`` with the trial's storage id. A missed beat is retried at the next one."""
    try:
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, number))
    except Exception:  # noqa: BLE001 - a missed beat is retried next round
        log.debug("heartbeat failed", exc_info=True)


class BudgetGate:
    """Asks Optuna for designs until one fits the budget; the others are told infeasible.

    With ``storage``, each trial gets a heartbeat as soon as it is asked for: Optuna never finds a
    trial stale that has had none, so a driver that died before the first beat would leave it
    running for ever, and a search waiting on its last trials would never end."""

    def __init__(self, study: optuna.Study, space: Space, budget: Budget, max_tries: int = 5000,
                 storage: RDBStorage | None = None):
        self.study, self.space, self.budget, self.max_tries = study, space, budget, max_tries
        self.storage = storage
        self._study_id = storage.get_study_id_from_name(study.study_name) if storage is not None else None

    def next_feasible(self) -> Candidate:
        for _ in range(self.max_tries):
            with warnings.catch_warnings():
                # Optuna warns that heartbeats are meant for Study.optimize; ask-and-tell records them
                # too (nas.search beats for its running trials).
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = self.study.ask()
            if self.storage is not None:
                record_heartbeat(self.storage, self._study_id, trial.number)
            try:
                arch = self._design(trial)
            except UserError as exc:  # a combination the space allows but ArchConfig refuses
                trial.set_user_attr("invalid", f"{exc.field}: {exc.why}" if exc.field else exc.why)
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            c = count(arch)
            violation = self.budget.violation(c)
            with warnings.catch_warnings():  # a retried trial carries its constraint: setting it again is a no-op
                warnings.filterwarnings("ignore", message="The constraint value is ignored")
                trial.set_constraint(BUDGET_KEY, violation)
            for key, value in _sizes(arch, c, self.budget).items():
                trial.set_user_attr(key, value)
            if violation > 0:
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            return Candidate(trial, arch, c)
        raise UserError(self.space.source, "budget", f"no design fitting {self.budget.text} in {self.max_tries} samples")

    def _design(self, trial: optuna.Trial) -> ArchConfig:
        """An enqueued design (a baseline, or ``--enqueue``) carries its config; others are sampled."""
        if "arch" in trial.user_attrs:
            return ArchConfig.from_json(trial.user_attrs["arch"], source=f"enqueued trial {trial.number}")
        return self.space.sample(trial)


def _sizes(arch: ArchConfig, c: Count, budget: Budget) -> dict:
    return {"arch": arch.model_dump_json(), "physical_params": c.physical, "virtual_params": c.virtual,
            "bytes": c.bytes(budget.dtype), "bytes_fp32": c.bytes("fp32"), "bytes_bf16": c.bytes("bf16"),
            "bytes_int8": c.bytes("int8"), "macs_per_second": c.macs_per_second, "dtype": budget.dtype}


def objective_values(objectives: tuple[str, ...], result: dict, attrs: dict) -> list[float]:
    """The values told to Optuna: proxy signals and device costs from the trial's final report,
    sizes from its user attrs (``attrs``, written by the budget gate). A device cost that could not
    be measured is a ValueError."""
    sizes = {"bytes": attrs["bytes"], "macs": attrs["macs_per_second"]}
    values = []
    for o in objectives:
        if o in SIGNALS or o in DEVICE_OBJECTIVES:
            value = result.get(SIGNALS[o] if o in SIGNALS else DEVICE_OBJECTIVES[o])
            if value is None:
                raise ValueError(f"{o} was not measured")
            values.append(float(value))
        else:
            values.append(sizes[o])
    return values


def enqueue_design(study: optuna.Study, arch: ArchConfig, label: str) -> None:
    """Add a fixed design (a baseline) to the study, once: a second enqueue of it is a no-op."""
    key = arch.model_dump_json()
    if any(t.user_attrs.get("arch") == key and t.user_attrs.get("label") == label
           for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial({}, user_attrs={"arch": key, "label": label})


def open_existing_study(study: str, storage: str | None, results: Path) -> optuna.Study:
    """A study that must already exist (``nas retrain``, ``report``, ``export``)."""
    if storage is None:
        db = results / study / "study.db"
        if not db.is_file():
            raise UserError(str(db), "", f"no study {study!r} here (run nas search first, or give --storage)")
        storage = f"sqlite:///{db.resolve()}"
    try:
        return optuna.load_study(study_name=study, storage=open_storage(storage))
    except KeyError:
        raise UserError("--study", "", f"no study named {study!r} in {_redact(storage)}") from None


@contextmanager
def taken_over_is_dropped(trial: optuna.Trial):
    """Writes to a running trial, dropped with a warning if another driver has failed it as stale
    meanwhile, to retry it (this driver's heartbeats came late, on a loaded machine): the other
    driver's retry is the trial now, and this driver's copy must neither crash it nor go on."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed as stale by another driver, which retries it; this driver drops its copy",
                    trial.number)
