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
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nas.budget import Budget
from nas.cluster import check_reachable, corpus_config, corpus_from_config, init_ray, prepare_data, run_dir_name
from nas.data.corpus import Corpus, check_spec
from nas.errors import UserError
from nas.space import Space
from nas.study import (
    HEARTBEAT_S, BudgetGate, enqueue_design, objective_values, open_storage, open_study, progress, storage_url,
)

log = logging.getLogger(__name__)


@dataclass
class SearchSettings:
    space: Space
    budget: Budget
    trials: int = 24
    workers: int = 2
    cpus_per_trial: int = 1
    sampler: str = "tpe"
    seed: int | None = 0
    study: str = "study"
    storage: str | None = None
    address: str | None = None
    data: str = "synth"
    proxy: str = "proxy"
    objectives: tuple[str, ...] = ("wer", "bytes")
    enqueue: list[Path] = field(default_factory=list)
    baselines: bool = True
    results: Path = Path("results")
    max_trial_memory_mb: float | None = None  # a trial's process holding more is stopped, FAIL

    def __post_init__(self) -> None:
        # Tune runs each trial in its own working directory: every path handed to it is absolute.
        self.results = Path(self.results).resolve()

    @property
    def out(self) -> Path:
        return self.results / self.study


def proxy_trial(config: dict) -> None:
    """Ray Tune function trainable: train one design with the proxy schedule, report dev WER.

    A trial that raises (diverges, runs out of memory, meets bad data) reports its reason and
    ends normally, so the driver can mark it FAIL with that reason.
    """
    import torch
    from ray import tune

    from nas.config import ArchConfig
    from nas.train import load_schedule, train

    torch.set_num_threads(config["threads"])
    corpus = corpus_from_config(config["corpus"])
    t0 = time.perf_counter()
    try:
        metrics = train(ArchConfig.from_json(config["arch"]), load_schedule(config["schedule"]), corpus,
                        config["run_dir"], threads=config["threads"], progress=False, evaluate_test=False,
                        max_memory_mb=config["max_memory_mb"],
                        callback=lambda step, point: tune.report({"wer": point["dev_wer"], "step": step}))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL with its reason
        reason = exc.line() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        tune.report({"wer": float("nan"), "error": reason[:500]})
        return
    tune.report({"wer": metrics["dev"]["wer"], "step": metrics["steps"], "final": True,
                 "train_seconds": metrics["train_seconds"], "trainer_seconds": time.perf_counter() - t0})


class BudgetSearcher:
    """Ray Tune ``Searcher`` over an Optuna study, with the budget checked before any trial."""

    def __new__(cls, *args, **kwargs):  # subclass Ray's Searcher lazily: importing ray is slow
        from ray.tune.search import Searcher

        klass = type("BudgetSearcher", (_BudgetSearcherImpl, Searcher), {})
        return klass(*args, **kwargs)


class _BudgetSearcherImpl:
    def __init__(self, study: optuna.Study, gate: BudgetGate, settings: SearchSettings, corpus: Corpus,
                 on_finish):
        super().__init__(metric="wer", mode="min")
        self.study, self.gate, self.settings, self.corpus = study, gate, settings, corpus
        self.on_finish = on_finish
        self.live: dict[str, optuna.Trial] = {}
        self._heartbeat = threading.Thread(target=self._beat, daemon=True)
        self._heartbeat.start()

    def suggest(self, trial_id: str):
        from ray.tune.search import Searcher

        optuna.storages.fail_stale_trials(self.study)  # trials of a dead driver are retried
        p = progress(self.study)
        if p["done"] >= self.settings.trials:
            return Searcher.FINISHED
        if p["done"] + p["running"] >= self.settings.trials and p["waiting"] == 0:
            return None  # the last trials are running (maybe under another driver): wait
        cand = self.gate.next_feasible()
        # Beat at once: a trial with no heartbeat at all is never found stale if this driver dies.
        self.study._storage.record_heartbeat(cand.trial._trial_id)
        self.live[trial_id] = cand.trial
        run_dir = self.settings.out / "trials" / run_dir_name(cand.trial.user_attrs["arch"], self.settings.proxy)
        cand.trial.set_user_attr("run_dir", str(run_dir))
        return {"arch": cand.arch.to_json(), "number": cand.trial.number, "schedule": self.settings.proxy,
                "run_dir": str(run_dir), "threads": self.settings.cpus_per_trial,
                "max_memory_mb": self.settings.max_trial_memory_mb,
                "corpus": corpus_config(self.corpus)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self.live.get(trial_id)
        # Intermediate points only: the final report and a failed trial's report carry no step.
        if trial is not None and "step" in result and "error" not in result and not result.get("final"):
            curve = dict(trial.user_attrs.get("curve", {}))
            curve[str(result["step"])] = result["wer"]
            trial.set_user_attr("curve", curve)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        if error or not result or "error" in result or "wer" not in result:
            reason = (result or {}).get("error") or "the trial's process failed (worker died or Ray error)"
            trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            trial.set_user_attr("train_seconds", result.get("train_seconds"))
            trial.set_user_attr("trainer_seconds", result.get("trainer_seconds"))  # the whole train() call
            self.study.tell(trial, objective_values(self.settings.objectives, result["wer"], trial))
        self.on_finish(self.study.get_trials(deepcopy=False)[trial.number])

    # The search's state lives in Optuna storage; re-running the command is how a search resumes.
    # Tune pickles its search algorithm for Tuner.restore, which we do not use: keep nothing.
    def __getstate__(self) -> dict:
        return {}

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass

    def _beat(self) -> None:
        storage = self.study._storage
        while True:
            for trial in list(self.live.values()):
                try:
                    storage.record_heartbeat(trial._trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried next round
                    log.debug("heartbeat failed", exc_info=True)
            time.sleep(HEARTBEAT_S)


# ---- the driver -----------------------------------------------------------------------------

def run_search(s: SearchSettings) -> optuna.Study:
    """Run (or continue) the study until ``s.trials`` designs have been trained."""
    from nas import pareto
    from nas.baselines import baselines, load_enqueue_files

    screen_budget(s.space, s.budget)  # an impossible budget is found before anything is written
    enqueued = load_enqueue_files(s.enqueue)
    check_spec(s.data)  # everything the user typed is checked before anything is written
    if s.address and s.address != "auto":
        check_reachable(s.address)  # before the storage: a refused run writes nothing
    storage = open_storage(storage_url(s.study, s.storage, s.results))  # before hours of feature extraction
    corpus, corpus_line = prepare_data(s.data)
    print(corpus_line, flush=True)
    init_ray(s.address)
    record = {"space": s.space.name, "budget": s.budget.text, "objectives": list(s.objectives),
              "data": s.data, "proxy": s.proxy}
    seed = None if s.seed is None else s.seed + _n_trials(s.study, storage)  # a resumed run draws anew
    study = open_study(s.study, storage, s.objectives, s.sampler, seed, record)
    for label, arch in (baselines(s.space, s.budget) if s.baselines else []) + enqueued:
        enqueue_design(study, arch, label)
    s.out.mkdir(parents=True, exist_ok=True)

    def on_finish(trial: optuna.trial.FrozenTrial) -> None:
        pareto.write_outputs(study, s.out, s.objectives)
        print(pareto.trial_line(study, trial), flush=True)

    searcher = BudgetSearcher(study, BudgetGate(study, s.space, s.budget), s, corpus, on_finish)
    p = progress(study)
    print(f"study {s.study}: {p['done']}/{s.trials} trials done, {p['infeasible']} infeasible samples so far; "
          f"{s.workers} workers x {s.cpus_per_trial} CPU", flush=True)
    if p["done"] < s.trials:
        _tune(searcher, s)
    pareto.write_outputs(study, s.out, s.objectives)
    p = progress(study)
    print(f"study {s.study}: {p['done']} trials done ({p['complete']} complete, {p['failed']} failed); "
          f"{p['infeasible']} infeasible samples ({p['waste_pct']}% of samples); front in {s.out / 'pareto.json'}")
    print(corpus_line)  # the run summary repeats what the corpus lost, after the trials' lines
    return study


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


def _tune(searcher, s: SearchSettings) -> None:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(proxy_trial, {"cpu": s.cpus_per_trial}),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=s.workers),
        run_config=tune.RunConfig(name=f"{s.study}-{int(time.time())}", storage_path=str((s.out / "tune").resolve()),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=1)),
    )
    tuner.fit()
