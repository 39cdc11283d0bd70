"""The Optuna side of the search, without Ray: the budget gate, counting, storage."""

import optuna
import pytest
from optuna.trial import TrialState

from nas.budget import count, parse_budget
from nas.config import ArchConfig
from nas.errors import UserError
from nas.search import screen_budget
from nas.space import load_space
from nas.study import BEST_SIGNAL, TPE_STARTUP_TRIALS, BudgetGate, enqueue_design, make_sampler, objectives_for, open_storage, open_study, rungs_for
from nas.trials import is_infeasible, records, tally
from searches import a_searcher_with_a_live_trial, a_trial_taken_over

PAPER = load_space("search_spaces/paper.yaml")
SETTINGS = {"space": "paper", "budget": "1M", "objectives": ["wer", "bytes"], "data": "synth", "proxy": "proxy"}


def fast_heartbeat_storage(tmp_path, monkeypatch):
    """The search's own storage (open_storage: its retry callback), beating every second with a
    grace period of one second."""
    import nas.study

    monkeypatch.setattr(nas.study, "HEARTBEAT_S", 1)
    monkeypatch.setattr(nas.study, "GRACE_S", 1)
    return open_storage(f"sqlite:///{tmp_path / 'study.db'}")


def study_in(tmp_path, sampler="tpe", settings=SETTINGS, name="s"):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return open_study(name, storage, ("wer", "bytes"), sampler, 0, settings)


def fake_wer(c) -> float:
    """A stand-in objective for sampling-only checks: bigger designs do better."""
    return 1.0 - c.physical / 2e6


def test_gate_returns_only_designs_within_budget_and_tells_the_rest_infeasible(tmp_path):
    study = study_in(tmp_path)
    budget = parse_budget("1M")
    gate = BudgetGate(study, PAPER, budget)
    for _ in range(15):
        cand = gate.next_feasible()
        assert budget.fits(cand.count) and cand.count.physical <= 1_000_000
        assert ArchConfig.from_json(cand.trial.user_attrs["arch"]) == cand.arch
        study.tell(cand.trial, [fake_wer(cand.count), cand.count.bytes()])
    trials = study.get_trials()
    infeasible = [t for t in trials if is_infeasible(t)]
    assert infeasible, "paper.yaml at 1M has designs over budget; some samples must have been refused"
    for t in infeasible:
        assert t.state == TrialState.PRUNED and t.values is None  # no made-up objective value
        assert count(ArchConfig.from_json(t.user_attrs["arch"])).physical > 1_000_000
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.system_attrs["constraints:budget"] <= 0


def test_tpe_learns_the_budget_waste_after_20_trials_is_under_20_percent(tmp_path):
    """Sampling only (a stand-in objective): the share of infeasible samples after the first 20
    feasible trials, on paper.yaml at 1M, over three seeds."""
    budget = parse_budget("1M")
    for seed in range(3):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler("tpe", seed))
        gate = BudgetGate(study, PAPER, budget)
        for i in range(60):
            cand = gate.next_feasible()
            study.tell(cand.trial, [fake_wer(cand.count), cand.count.bytes()])
            if i == 19:
                first = len(study.get_trials(deepcopy=False))
        waste = tally(study.get_trials(deepcopy=False)[first:]).infeasible_share
        assert waste < 0.20, f"seed {seed}: {waste:.0%} of samples after the first 20 trials were infeasible"


def test_tpe_draws_the_random_samplers_designs_until_its_startup_trials_are_done():
    """What nas bench search's TPE-vs-random comparison rests on: under one seed, TPE's first
    TPE_STARTUP_TRIALS samples (over-budget ones count) are random sampling's own, and it departs
    from them after, as it learns (a stand-in objective, paper.yaml at 1M)."""
    budget = parse_budget("1M")
    drawn = {}
    for name in ("tpe", "random"):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(name, 0))
        gate = BudgetGate(study, PAPER, budget)
        while len(study.get_trials(deepcopy=False)) < TPE_STARTUP_TRIALS + 10:
            cand = gate.next_feasible()
            study.tell(cand.trial, [fake_wer(cand.count), cand.count.bytes()])
        drawn[name] = [t.params for t in study.get_trials()][:TPE_STARTUP_TRIALS + 10]
    assert any(is_infeasible(t) for t in study.get_trials()[:TPE_STARTUP_TRIALS])  # they count too
    assert drawn["tpe"][:TPE_STARTUP_TRIALS] == drawn["random"][:TPE_STARTUP_TRIALS]
    after = sum(a != b for a, b in zip(drawn["tpe"][TPE_STARTUP_TRIALS:], drawn["random"][TPE_STARTUP_TRIALS:]))
    assert after >= 8, f"only {after} of TPE's next 10 samples differ from random sampling's"


def test_tally_counts_what_happened(tmp_path):
    study = study_in(tmp_path)
    gate = BudgetGate(study, PAPER, parse_budget("1M"))
    a, b, _ = gate.next_feasible(), gate.next_feasible(), gate.next_feasible()  # the third stays running
    study.tell(a.trial, [0.5, a.count.bytes()])
    b.trial.set_user_attr("fail_reason", "boom")
    study.tell(b.trial, state=TrialState.FAIL)
    t = tally(records(study))
    assert t["complete"] == 1 and t["failed"] == 1 and t.done == 2 and t["running"] == 1
    n_infeasible = sum(is_infeasible(x) for x in study.get_trials())
    assert n_infeasible > 0 and t["infeasible"] == n_infeasible
    # the one infeasible share: over every sample drawn (complete, failed, running and infeasible ones)
    assert t.samples == len(study.get_trials()) == n_infeasible + 3
    assert t.infeasible_share == n_infeasible / (n_infeasible + 3)
    assert tally(study.get_trials()).counts == t.counts  # from raw Optuna trials, the same states
    fail = next(r for r in records(study) if r.number == b.trial.number)
    assert fail.state == "failed" and fail.fail_reason == "boom" and fail.arch == b.arch


def test_enqueued_designs_run_once_and_keep_their_label(tmp_path):
    study = study_in(tmp_path)
    arch = ArchConfig.load("search_spaces/designs/unshared-d96.json")
    enqueue_design(study, arch, "unshared")
    enqueue_design(study, arch, "unshared")  # a resumed search enqueues again: no duplicate
    assert len(study.get_trials(states=[TrialState.WAITING])) == 1
    cand = BudgetGate(study, PAPER, parse_budget("1M")).next_feasible()
    assert cand.arch == arch and cand.trial.user_attrs["label"] == "unshared"


def test_a_study_continued_with_other_settings_is_refused(tmp_path):
    study_in(tmp_path)
    with pytest.raises(UserError, match="budget: this study was started with '1M', not '2M'"):
        study_in(tmp_path, settings=SETTINGS | {"budget": "2M"})


def test_an_impossible_budget_is_found_before_training(tmp_path):
    with pytest.raises(UserError, match=r"budget: no design of the space fits 10K"):
        screen_budget(PAPER, parse_budget("10K"))
    assert 0.3 < screen_budget(PAPER, parse_budget("1M")) < 1


def test_an_unreachable_storage_is_one_clear_error():
    with pytest.raises(UserError, match=r"^error: --storage: cannot open postgresql://\*\*\*@127.0.0.1:1/x"):
        open_storage("postgresql://u:p@127.0.0.1:1/x")


def test_a_result_for_a_trial_another_driver_failed_as_stale_is_dropped_and_the_driver_goes_on(tmp_path):
    """Two drivers share a study; on a loaded machine one driver's heartbeats come late, and the
    other fails its trial as stale and retries it. The late driver's points and its final result
    for that trial are then dropped with a warning, and the trial stays as the other driver left it."""
    finished = []
    with a_trial_taken_over(tmp_path, finished.append) as (study, searcher, trial):
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # what the driver met before
            trial.set_user_attr("curve", [])
        searcher.on_trial_result("late", {"step": 100, "wer": 0.9})
        searcher.on_trial_complete("late", {"step": 300, "final": True, "wer": 0.8, "train_seconds": 1.0})
    assert finished == [trial.number]  # its line is still printed: it shows the trial as failed
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and "curve" not in t.user_attrs


def test_a_trial_whose_reporting_fails_stays_recorded_and_the_error_never_reaches_tune(tmp_path, caplog):
    """Ray Tune takes an exception from ``on_trial_complete`` for the trial failing: it logs "Error
    stopping trial", runs the trial again and calls back once more, when the trial is no longer
    live, so its line was never printed (CI, two drivers on one SQLite study: a trial told
    COMPLETE that neither driver printed). Reporting that fails is logged, naming the trial."""
    import sqlite3

    def report(number):
        raise sqlite3.OperationalError("database is locked")

    with a_searcher_with_a_live_trial(tmp_path, report) as (study, searcher, trial):
        searcher.on_trial_complete("live", {"step": 300, "final": True, "dev_wer": 0.8, "train_seconds": 1.0})
    (t,) = study.get_trials()
    assert t.state == TrialState.COMPLETE and t.values == [0.8, 1000]
    assert f"trial {trial.number} is recorded in the study, but reporting it failed" in caplog.text
    assert "database is locked" in caplog.text


def test_a_new_study_ranks_by_its_fidelitys_signal_and_a_resumed_one_by_what_it_was_started_with(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    for fidelity in ("fixed", "asha"):
        assert objectives_for(storage, "new", fidelity, None) == (BEST_SIGNAL[fidelity], "bytes")
    study_in(tmp_path)  # started with wer,bytes: a default changed since must not stop it resuming
    assert objectives_for(storage, "s", "asha", None) == ("wer", "bytes") != (BEST_SIGNAL["asha"], "bytes")
    assert objectives_for(storage, "s", "asha", ("cer", "bytes")) == ("cer", "bytes")  # named: open_study refuses it


def test_a_new_study_halves_at_the_default_rungs_and_a_resumed_one_at_those_it_was_started_with(tmp_path):
    from nas.schedule import Rungs

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert rungs_for(storage, "new", None) == Rungs() == Rungs((2, 4, 9), 3)
    # started under the rungs that were the default until 2026-12-04, with eta 4
    study_in(tmp_path, settings=SETTINGS | {"fidelity": "asha", "rungs": [1, 3, 9], "eta": 4})
    assert rungs_for(storage, "s", None) == Rungs((1, 3, 9), 4)
    assert rungs_for(storage, "s", Rungs((2, 9))) == Rungs((2, 9))  # named: open_study refuses it
    study_in(tmp_path, settings=SETTINGS | {"fidelity": "fixed", "rungs": None, "eta": None}, name="f")
    assert rungs_for(storage, "f", None) == Rungs()  # a fixed proxy has none


def test_a_design_interrupted_twice_is_retried_twice_and_never_counts_as_done(tmp_path, monkeypatch):
    """A trial whose driver dies is failed as stale and run again as a new trial; if that one's
    driver dies too, it is retried again. Both interrupted trials are "retried", not "failed":
    a failed trial counts toward --trials, and the search would end a design short."""
    import time

    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials

    storage = fast_heartbeat_storage(tmp_path, monkeypatch)
    study = optuna.create_study(storage=storage, directions=["minimize", "minimize"])
    for _ in range(2):  # the first run, then its retry: each starts, beats once and goes silent
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        time.sleep(2.5)
        fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert RetryHeartbeatStaleTrialCallback.retry_history(trials[2]) == [0, 1]
    t = tally(trials)
    assert (t["retried"], t["failed"], t["waiting"], t.done) == (2, 0, 1, 0)
    last = study.ask()  # the third run of the design finishes
    study.tell(last, [0.5, 1000.0])
    t = tally(study.get_trials())
    assert (t["retried"], t["complete"], t.done) == (2, 1, 1)
    assert t.samples == 1  # one draw from the sampler, run three times: the infeasible share's denominator


def test_a_study_continued_with_an_edited_recipe_is_refused_and_an_old_study_adopts_the_record(tmp_path):
    from nas.schedule import load_schedule

    recipe = load_schedule("tiny").model_dump(mode="json")
    study_in(tmp_path, settings=SETTINGS)  # a study started before recipes were recorded
    study = study_in(tmp_path, settings=SETTINGS | {"trial_recipe": recipe})
    assert study.user_attrs["settings"]["trial_recipe"] == recipe  # recorded from now on
    with pytest.raises(UserError, match=r"^error: study s: trial_recipe: this study was started with other "
                                        r"fields: peak_lr 0.003, not 0.006; use another --study$"):
        study_in(tmp_path, settings=SETTINGS | {"trial_recipe": recipe | {"peak_lr": 0.006}})
    # A field added to the recipe since then (at its default) is not an edit.
    older = {k: v for k, v in recipe.items() if k != "branch_init_gain"}
    study.set_user_attr("settings", study.user_attrs["settings"] | {"trial_recipe": older})
    study_in(tmp_path, settings=SETTINGS | {"trial_recipe": recipe})
    # Any other setting a study lacks is refused as before: a study that never recorded its
    # fidelity must not go on under successive halving.
    with pytest.raises(UserError, match=r"^error: study s: fidelity: this study was started with None, not 'asha'"):
        study_in(tmp_path, settings=SETTINGS | {"fidelity": "asha"})


def test_a_trial_gets_its_heartbeat_as_soon_as_the_gate_asks_for_it(tmp_path, monkeypatch):
    """Optuna never finds a trial stale that has had no heartbeat: a driver that died between
    asking for a design and its first beat would leave it running for ever."""
    import time

    from optuna.storages import fail_stale_trials

    storage = fast_heartbeat_storage(tmp_path, monkeypatch)
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    beaten = BudgetGate(study, PAPER, parse_budget("1M"), storage=storage).next_feasible().trial
    silent = BudgetGate(study, PAPER, parse_budget("1M")).next_feasible().trial  # no storage: no beat
    time.sleep(2.5)  # this driver "died" right after asking
    fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[beaten.number] == TrialState.FAIL  # found stale: retried as a new trial
    assert states[silent.number] == TrialState.RUNNING  # what every trial would be without the beat
    assert TrialState.WAITING in states.values()


def test_a_running_trial_that_never_had_a_heartbeat_is_adopted_and_retried(tmp_path, monkeypatch):
    """A driver stopped between asking for a trial and its first beat (where Ctrl-C lands readily)
    leaves a running trial that Optuna never finds stale; a search resumed on the study would wait
    for it for ever. The search beats every running trial when it starts, so it goes stale."""
    import time

    from optuna.storages import fail_stale_trials

    from nas.search import adopt_orphans

    storage = fast_heartbeat_storage(tmp_path, monkeypatch)
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    orphan = study.ask()  # the driver died here
    time.sleep(2.5)
    fail_stale_trials(study)
    assert study.trials[orphan.number].state == TrialState.RUNNING  # never found stale on its own
    adopt_orphans(study, storage)  # a search starts on the study
    time.sleep(2.5)
    fail_stale_trials(study)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]  # retried
