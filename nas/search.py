"""The search: Optuna proposes designs under the budget, Ray Tune trains their proxies.

The driver runs a Ray Tune experiment whose search algorithm, :class:`BudgetSearcher`, is
Optuna's ask-and-tell loop behind the budget gate of :mod:`nas.study`: infeasible samples are
told to Optuna inside ``suggest()`` and never become Tune trials. Each Tune trial is
:func:`proxy_trial`, a thin function around :func:`nas.train.train` with the proxy schedule.
Results go back to Optuna storage; ``results/<study>/`` gets the trials table and the front after
every finished trial. Running the same command again continues the same study.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from ray.tune.search import Searcher
from tqdm import tqdm

from nas.asha import RungScheduler, Rungs
from nas.budget import Budget
from nas.data.corpus import Corpus, check_data
from nas.errors import UserError
from nas.schedule import Schedule, load_schedule
from nas.space import Space
from nas.study import (
    DEFAULT_FIDELITY, DEVICE_OBJECTIVES, HEARTBEAT_S, POINT_KEYS, BudgetGate, enqueue_design, objective_values, objectives_for, open_storage, rungs_for, open_study, storage_url,
    record_heartbeat, taken_over_is_dropped,
)
from nas.trials import records, tally
from nas.workers import Job, check_reachable, init_ray, prepare_data, run_dir, run_on_ray

log = logging.getLogger(__name__)


@dataclass
class SearchSettings:
    space: Space
    budget: Budget
    trials: int = 24
    workers: int = 2
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0
    sampler: str = "tpe"
    seed: int | None = 0
    study: str = "study"
    storage: str | None = None
    address: str | None = None
    data: str = "synth"
    proxy: str = "proxy"
    # None: what the study was started with, else the fidelity's best signal and bytes (see run_search)
    objectives: tuple[str, ...] | None = None
    fidelity: str = DEFAULT_FIDELITY  # "asha": successive halving; "fixed": every design trains the proxy
    rungs: Rungs | None = None  # None: what the study was started with, else the default (see run_search)
    enqueue: list[Path] = field(default_factory=list)
    baselines: bool = True
    results: Path = Path("results")
    max_trial_memory_mb: float | None = None  # a trial's process holding more is stopped, FAIL
    time_budget_s: float | None = None  # after this long Tune stops everything (running trials: FAIL)

    def __post_init__(self) -> None:
        # Tune runs each trial in its own working directory: every path handed to it is absolute.
        self.results = Path(self.results).resolve()

    @property
    def out(self) -> Path:
        return self.results / self.study

    def trial_schedule(self) -> Schedule:
        """What each design trains: the proxy, or under ASHA the proxy stretched to its last rung."""
        proxy = load_schedule(self.proxy)
        return (self.rungs or Rungs()).schedule(proxy) if self.fidelity == "asha" else proxy


class BudgetSearcher(Searcher):
    """Ray Tune ``Searcher`` over an Optuna study, with the budget checked before any trial.

    ``suggest`` asks the budget gate for the next design that fits and hands Tune its
    :class:`~nas.workers.Job`; every evaluation a trial reports goes to its Optuna trial's
    ``curve``; its end is told to Optuna (COMPLETE with the objective values, or FAIL with a
    reason) and ``on_finish(number)`` is called.
    """

    def __init__(self, study: optuna.Study, storage: RDBStorage, gate: BudgetGate, settings: SearchSettings,
                 corpus: Corpus, on_finish: Callable[[int], None]):
        super().__init__()  # no metric: the objectives are told to Optuna here, not ranked by Tune
        self.study, self.storage, self.gate, self.settings, self.corpus = study, storage, gate, settings, corpus
        self.on_finish = on_finish
        self.live: dict[str, optuna.Trial] = {}
        self.schedule = settings.trial_schedule()
        self._study_id = storage.get_study_id_from_name(study.study_name)
        self._stopped = threading.Event()
        threading.Thread(target=self._beat_forever, daemon=True).start()

    def suggest(self, trial_id: str):
        optuna.storages.fail_stale_trials(self.study)  # trials of a dead driver are retried
        t = tally(records(self.study))
        if t.done >= self.settings.trials:
            return Searcher.FINISHED
        if t.done + t["running"] >= self.settings.trials and t["waiting"] == 0:
            return None  # the last trials are running (maybe under another driver): wait
        cand = self.gate.next_feasible()
        self.live[trial_id] = cand.trial
        job = Job(arch=cand.arch, schedule=self.schedule, corpus=self.corpus,
                  run_dir=run_dir(self.settings.out / "trials", cand.arch, self.schedule),
                  threads=self.settings.cpus_per_trial, max_memory_mb=self.settings.max_trial_memory_mb,
                  measure=tuple(o for o in self.settings.objectives if o in DEVICE_OBJECTIVES))
        cand.trial.set_user_attr("run_dir", str(job.run_dir))
        return {"job": job}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self.live.get(trial_id)
        # Intermediate points only: the final report and a failed trial's report are told at the end.
        if trial is not None and "step" in result and "error" not in result and not result.get("final"):
            with taken_over_is_dropped(trial):
                self.record_point(trial, result)

    def record_point(self, trial: optuna.Trial, result: dict) -> None:
        """Add an evaluation point to the trial's ``curve`` (once per step: the rung scheduler may
        have recorded it already)."""
        curve = trial.user_attrs.get("curve", [])
        if all(p["step"] != result["step"] for p in curve):
            trial.set_user_attr("curve", [*curve, {k: result[k] for k in POINT_KEYS if k in result}])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        with taken_over_is_dropped(trial):
            self._tell(trial, result, error)
        try:
            self.on_finish(trial.number)
        except Exception:  # noqa: BLE001 - the trial is told; what reports it must not undo that
            # Tune would take an error here for the trial failing: it would log "Error stopping
            # trial", run the trial again and call this again, and the trial's line would be lost.
            log.exception("trial %d is recorded in the study, but reporting it failed; the search's files are "
                          "written again after the next trial and at its end", trial.number)

    def _tell(self, trial: optuna.Trial, result: dict | None, error: bool) -> None:
        if not error and result and "stopped" in trial.user_attrs.get("rungs", {}).values():
            # Stopped by successive halving at a rung: PRUNED, never COMPLETE, so the sampler does not
            # take a half-trained score for a final one; its points stay in its curve.
            trial.set_user_attr("stopped_at_step", result.get("step"))
            self.study.tell(trial, state=TrialState.PRUNED)
        elif error or not result or not result.get("final"):
            reason = (result or {}).get("error") or (
                "stopped before the end (the search's time budget ran out)" if result and not error else
                "the trial's process failed (worker died or Ray error)")
            trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            trial.set_user_attr("train_seconds", result.get("train_seconds"))
            trial.set_user_attr("trainer_seconds", result.get("trainer_seconds"))  # the whole train() call
            if "device_seconds" in result:  # what the device measurement cost
                trial.set_user_attr("device_seconds", result["device_seconds"])
            try:
                values = objective_values(self.settings.objectives, result, trial.user_attrs)
            except ValueError as exc:
                trial.set_user_attr("fail_reason", f"device measurement failed: {exc}")
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, values)

    # The search's state lives in Optuna storage; re-running the command is how a search resumes.
    # Tune pickles its search algorithm for Tuner.restore, which we do not use: keep nothing.
    def __getstate__(self) -> dict:
        return {}

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass

    def _beat(self, trials: list[optuna.Trial]) -> None:
        for trial in trials:
            record_heartbeat(self.storage, self._study_id, trial.number)

    def _beat_forever(self) -> None:
        while not self._stopped.is_set():
            self._beat(list(self.live.values()))
            self._stopped.wait(HEARTBEAT_S)

    def fail_live(self, reason: str) -> None:
        """End every trial still live (the search has returned): PRUNED if successive halving had
        already stopped it at a rung, else FAILED with ``reason``."""
        for trial in list(self.live.values()):
            with taken_over_is_dropped(trial):
                curve = trial.user_attrs.get("curve", [])
                if curve and "stopped" in trial.user_attrs.get("rungs", {}).values():
                    trial.set_user_attr("stopped_at_step", curve[-1]["step"])
                    self.study.tell(trial, state=TrialState.PRUNED)
                else:
                    trial.set_user_attr("fail_reason", reason)
                    self.study.tell(trial, state=TrialState.FAIL)
        self.live.clear()

    def stop(self) -> None:
        """Stop the heartbeats once the search returns. A trial still live then (one that Ray
        stopped at the time budget before it reported) would otherwise be kept from going stale,
        and its study written to, for as long as this process lives."""
        self._stopped.set()


# ---- the driver -----------------------------------------------------------------------------

def run_search(s: SearchSettings) -> optuna.Study:
    """Run (or continue) the study until ``s.trials`` designs have been trained."""
    from nas import pareto
    from nas.baselines import baselines, load_enqueue_files

    screen_budget(s.space, s.budget)  # an impossible budget is found before anything is written
    enqueued = load_enqueue_files(s.enqueue)
    check_data(s.data)  # everything the user typed is checked before anything is written
    if s.address and s.address != "auto":
        check_reachable(s.address)  # before the storage: a refused run writes nothing
    storage = open_storage(storage_url(s.study, s.storage, s.results))  # before hours of feature extraction
    s = replace(s, objectives=objectives_for(storage, s.study, s.fidelity, s.objectives),
                rungs=rungs_for(storage, s.study, s.rungs))
    corpus, corpus_line = prepare_data(s.data)
    print(corpus_line, flush=True)
    init_ray(s.address)
    record = {"space": s.space.name, "budget": s.budget.text, "objectives": list(s.objectives),
              "data": s.data, "proxy": s.proxy, "fidelity": s.fidelity,
              "rungs": list(s.rungs.multiples) if s.fidelity == "asha" else None,
              "eta": s.rungs.eta if s.fidelity == "asha" else None,
              # the recipe itself, not only its name: an edited schedule file must not mix into a study
              "trial_recipe": s.trial_schedule().model_dump(mode="json")}
    seed = None if s.seed is None else s.seed + _n_trials(s.study, storage)  # a resumed run draws anew
    study = open_study(s.study, storage, s.objectives, s.sampler, seed, record)
    adopt_orphans(study, storage)
    for label, arch in (baselines(s.space, s.budget) if s.baselines else []) + enqueued:
        enqueue_design(study, arch, label)
    s.out.mkdir(parents=True, exist_ok=True)

    t = tally(records(study))
    print(f"study {s.study}: {t.done}/{s.trials} trials done, {t['infeasible']} infeasible samples so far; "
          f"objectives {','.join(s.objectives)}; {s.workers} workers x {s.cpus_per_trial} CPU", flush=True)
    bar = tqdm(total=s.trials, initial=min(t.done, s.trials), desc="search", unit="trial", dynamic_ncols=True)

    def on_finish(number: int) -> None:
        bar.update(1)
        bar.write(pareto.trial_line(study, number))  # the line first: the files are rewritten later anyway
        pareto.write_outputs(study, s.out)

    searcher = BudgetSearcher(study, storage, BudgetGate(study, s.space, s.budget, storage=storage), s, corpus,
                              on_finish)
    scheduler = RungScheduler(searcher, load_schedule(s.proxy), s.rungs) if s.fidelity == "asha" else None
    try:
        if t.done < s.trials:
            run_on_ray(s.out, s.study, s.workers, s.cpus_per_trial, searcher=searcher, scheduler=scheduler,
                       time_budget_s=s.time_budget_s, gpus_per_trial=s.gpus_per_trial)
            # At the time budget Tune stops the trials still training without telling the searcher:
            # they end here, FAILED with the reason, rather than stay running in storage.
            if s.time_budget_s is not None:
                searcher.fail_live("stopped before the end (the search's time budget ran out)")
    finally:
        searcher.stop()
    bar.close()
    pareto.write_outputs(study, s.out)
    t = tally(records(study))
    print(f"study {s.study}: {t.done} trials done ({t['complete']} complete, {t['failed']} failed); "
          f"{t['infeasible']} infeasible samples ({t.infeasible_share:.0%} of {t.samples} samples); "
          + (f"{t['invalid']} invalid samples (the space allows what ArchConfig refuses: see trials.csv); "
             if t["invalid"] else "") + f"front in {s.out / 'pareto.json'}")
    print(corpus_line)  # the run summary repeats what the corpus lost, after the trials' lines
    return study


def adopt_orphans(study: optuna.Study, storage) -> None:
    """Make sure every running trial will be found stale if no driver is running it.

    Optuna finds a trial stale only once it has had a heartbeat, and a driver stopped between
    asking for a trial and its first beat (Ctrl-C lands there readily: it is where the driver
    is busy when a trial ends) leaves one running that none ever has, which the search would
    wait for for ever. So at the start, after those already stale are failed and retried, each
    running trial gets a beat: one whose driver is gone goes stale a grace period later and is
    retried; one another live driver runs is only beaten once more."""
    optuna.storages.fail_stale_trials(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record_heartbeat(storage, study_id, t.number)


def screen_budget(space: Space, budget: Budget, samples: int = 3000, seed: int = 0) -> float:
    """The share of random designs of the space that fit; none at all is refused up front."""
    import random

    from nas.budget import count

    rng = random.Random(seed)
    sizes, invalid = [], None
    for _ in range(samples):
        try:
            sizes.append(count(space.random(rng)).bytes(budget.dtype))
        except UserError as exc:
            invalid = invalid or exc
    if not sizes and invalid:
        raise invalid  # no design of the space is valid at all: say why, not "nothing fits"
    fit = sum(b <= budget.max_bytes for b in sizes)
    if not fit:
        smallest = min(sizes) if sizes else 0
        raise UserError(space.source, "budget", f"no design of the space fits {budget.text}: the smallest of "
                        f"{samples} random designs needs {smallest:,} bytes at {budget.dtype}, "
                        f"the budget allows {budget.max_bytes:,}")
    return fit / len(sizes)


def _n_trials(name: str, storage) -> int:
    try:
        return len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        return 0
