"""Successive halving for several objectives: the promotion rule, and real tiny searches."""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from nas.asha import moasha_order, promoted
from nas.budget import parse_budget
from nas.schedule import Rungs, load_schedule
from nas.trials import records, tally
from searches import (
    FAST_HEARTBEAT, a_trial_taken_over, assert_nothing_over_budget_was_trained, load, nas_search, run, trial_lines,
)


def test_a_design_goes_on_only_within_the_first_1_over_eta_share_of_its_rung_in_moasha_order():
    rung = [(0.5, 100.0), (0.6, 90.0), (0.7, 80.0), (0.4, 300.0), (0.9, 400.0)]  # (signal, bytes)
    # 6 designs at the rung with the new one: with eta 3 it goes on if at most 2 come before it.
    # (0.8, 95) is dominated by two designs only, but it is on the second front and the first front
    # holds four: stopped (counting its dominators alone would have kept it).
    assert moasha_order([*rung, (0.8, 95.0)]) == [3, 2, 0, 1, 5, 4]
    assert not promoted((0.8, 95.0), rung, eta=3)
    assert promoted((0.1, 999.0), rung, eta=3)  # the best signal comes first
    assert promoted((0.65, 50.0), rung, eta=3)  # the smallest: farthest from the best signal
    assert not promoted((0.8, 500.0), rung, eta=3)  # dominated by all five
    assert promoted((0.9, 400.0), [], eta=3)  # the first at a rung goes on
    assert not promoted((0.9, 400.0), [(0.5, 100.0)], eta=3)  # second of 2: more than a third


def test_within_a_front_the_order_spreads_over_it_rather_than_taking_a_crowd():
    crowd = [(0.30, 900.0), (0.31, 880.0), (0.32, 860.0), (0.33, 840.0), (0.34, 820.0)]  # one front
    assert promoted((0.9, 100.0), crowd, eta=3)  # on the front, far from the crowd: second
    assert moasha_order([*crowd, (0.9, 100.0)])[:2] == [0, 5]
    assert not promoted((0.335, 830.0), crowd, eta=3)  # on the front too, but inside the crowd: last
    assert moasha_order([*crowd, (0.335, 830.0)])[-1] == 5
    assert moasha_order([(1.0, 3.0), (1.0, 2.0), (1.0, 1.0)]) == [2, 1, 0]  # a tied signal: bytes decide


def test_the_stretched_proxy_evaluates_at_every_rung():
    base = load_schedule("tiny")
    s = Rungs((1, 2, 4), 2).schedule(base)
    assert s.steps == 4 * base.steps and s.eval_every == base.steps
    assert all(step % s.eval_every == 0 for step in Rungs((1, 2, 4)).steps(base))
    assert s.model_copy(update={"name": base.name, "steps": base.steps, "eval_every": base.eval_every}) == base


def test_rungs_are_named_by_what_they_train_and_by_eta_where_it_is_not_the_default():
    # a benchmark study under other rungs or another eta must never be read back as this one's
    assert Rungs().tag == "asha2-4-9" and Rungs((1, 3, 9)).tag == "asha1-3-9" and Rungs((3, 9)).tag == "asha3-9"
    assert Rungs((2, 9), 4).tag == "asha2-9-eta4" and Rungs((2, 9), 3).tag == "asha2-9"


# At the tiny schedule every design's dev WER is still 100% at the rungs, so bytes decide: with eta 10
# and fewer than 10 designs at a rung, a design goes on only if it comes first there, i.e. only if
# it is the smallest so far.
# The first design at each rung always goes on; a larger one arriving later is always stopped.
ASHA = ["--fidelity", "asha", "--rungs", "1,2,4", "--eta", "10", "--objectives", "wer,bytes"]


@pytest.mark.slow
def test_a_stopped_design_is_pruned_with_its_curve_and_a_promoted_one_trains_on(tiny_corpus_dir, tmp_path):
    r = run(nas_search(tmp_path, tiny_corpus_dir, *ASHA, trials=6))
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(tmp_path)
    recs = records(study)
    assert tally(recs).done == 6
    steps = Rungs((1, 2, 4)).steps(load_schedule("tiny"))  # 12, 24, 48
    stopped = [x for x in recs if x.state == "pruned"]
    finished = [x for x in recs if x.state == "complete"]
    named = [x for x in recs if x.label]  # the baselines: never stopped, the yardstick of the others
    assert stopped and finished and named, [(x.state, x.label) for x in recs]
    assert all(x in finished for x in named)
    for x in stopped:  # PRUNED in storage, never COMPLETE: no values, its points kept
        t = study.trials[x.number]
        assert t.state == TrialState.PRUNED and t.values is None and not x.values
        assert x.curve and x.curve[-1]["step"] in steps[:-1] and {"dev_loss", "dev_wer"} <= x.curve[-1].keys()
        assert list(x.curve[-1:]) and t.user_attrs["rungs"][str(steps.index(x.curve[-1]["step"]))] == "stopped"
    for x in finished:  # promoted at every rung: one run, its step counter going on to the end
        assert [p["step"] for p in x.curve] == list(range(12, 49, 12))
        kept = {"kept: named design"} if x.label else {"promoted"}
        assert set(study.trials[x.number].user_attrs["rungs"].values()) == kept
        metrics = json.loads((x.run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 48 and metrics["resumed_at_steps"] == []
        assert x.values["wer"] == pytest.approx(metrics["dev"]["wer"])
    with open(tmp_path / "t" / "trials.csv", newline="") as f:
        states = {int(row["number"]): row["state"] for row in csv.DictReader(f)}
    assert {states[x.number] for x in stopped} == {"PRUNED"}
    assert sum("stopped at a rung" in line for line in r.stdout.splitlines()) == len(stopped)
    assert_nothing_over_budget_was_trained(study, tmp_path / "t" / "trials", parse_budget("60K"))


@pytest.mark.slow
@pytest.mark.faults
def test_a_driver_killed_past_a_rung_resumes_its_trials_from_their_checkpoints(tiny_corpus_dir, tmp_path):
    slow = tmp_path / "slow.yaml"  # a longer tiny proxy, so that trials are caught between rungs
    slow.write_text((Path(__file__).parents[1] / "nas/schedules/tiny.yaml").read_text()
                    .replace("steps: 12", "steps: 30").replace("eval_every: 6", "eval_every: 30"))
    cmd = nas_search(tmp_path, tiny_corpus_dir, *ASHA, "--proxy", str(slow), trials=4)
    proc = subprocess.Popen(cmd, env=os.environ | FAST_HEARTBEAT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    caught = None
    deadline = time.monotonic() + 400
    while caught is None and time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            recs = records(load(tmp_path))
        except Exception:  # the study may not exist yet
            continue
        caught = next((x for x in recs if x.state == "running" and x.curve and x.curve[-1]["step"] >= 30
                       and x.curve[-1]["step"] < 120), None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught is not None, "no trial was caught past its first rung"

    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(tmp_path)
    assert tally(records(study)).done == 4
    retries = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in study.get_trials()}
    retry = retries[caught.number]  # run again in the same directory...
    assert retry.user_attrs["run_dir"] == str(caught.run_dir) and retry.number in trial_lines(r.stdout)
    if retry.state == TrialState.COMPLETE:  # ...from its checkpoint: the step counter went on
        metrics = json.loads((caught.run_dir / "metrics.json").read_text())
        assert metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] >= 30 and metrics["steps"] == 120
    else:  # or it was stopped at a later rung than the one it had passed
        assert retry.state == TrialState.PRUNED and retry.user_attrs["curve"][-1]["step"] > caught.curve[-1]["step"]
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]


def test_a_rung_result_for_a_trial_another_driver_failed_as_stale_stops_it_here(tmp_path):
    """As in tests/test_study.py for the searcher: the other driver retries the trial, so this
    driver's scheduler stops its copy at once instead of crashing on the finished trial."""
    from ray.tune.schedulers import TrialScheduler

    from nas.asha import RungScheduler

    with a_trial_taken_over(tmp_path) as (study, searcher, trial):
        scheduler = RungScheduler(searcher, load_schedule("tiny"), Rungs((1, 2, 4)))
        tune_trial = type("TuneTrial", (), {"trial_id": "late"})()  # all the scheduler reads of Tune's trial
        point = {"step": scheduler.rung_steps[0], "dev_wer": 0.9, "dev_loss": 2.0}
        assert scheduler.on_trial_result(None, tune_trial, point) == TrialScheduler.STOP
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and "curve" not in t.user_attrs


def test_a_retried_design_counts_once_in_a_rung_table(tmp_path):
    """A trial whose driver died is retried as a new trial carrying its curve; the design must
    enter the rung table once, not once per copy, or a design judged beside it loses places."""
    from ray.tune.schedulers import TrialScheduler

    from nas.asha import RungScheduler
    from nas.search import BudgetSearcher, SearchSettings
    from nas.space import load_space
    from nas.study import open_storage, open_study

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    record = {"space": "tiny", "budget": "60K", "objectives": ["wer", "bytes"], "data": "synth", "proxy": "tiny"}
    study = open_study("s", storage, ("wer", "bytes"), "tpe", 0, record)
    settings = SearchSettings(space=load_space("search_spaces/tiny.yaml"), budget=parse_budget("60K"),
                              proxy="tiny", results=tmp_path, objectives=("wer", "bytes"))
    searcher = BudgetSearcher(study, storage, None, settings, None, lambda number: None)
    try:
        scheduler = RungScheduler(searcher, load_schedule("tiny"), Rungs((1, 2, 4), eta=2))
        step = scheduler.rung_steps[0]
        first = study.ask()
        for key, value in {"bytes": 1000, "macs_per_second": 1.0,
                           "curve": [{"step": step, "dev_wer": 0.5, "dev_loss": 1.0}]}.items():
            first.set_user_attr(key, value)
        study.tell(first, state=TrialState.FAIL)  # its driver died: failed as stale, and retried
        RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study.trials[first.number])
        retry = study.ask()  # the same design, training on
        assert retry.user_attrs["curve"] == first.user_attrs["curve"]
        assert [r.state for r in records(study)] == ["retried", "running"]
        judged = study.ask()  # a design behind it on both objectives: second of 2 at eta 2 goes on
        judged.set_user_attr("bytes", 2000)
        judged.set_user_attr("macs_per_second", 1.0)
        searcher.live["t"] = judged
        tune_trial = type("TuneTrial", (), {"trial_id": "t"})()
        point = {"step": step, "dev_wer": 0.9, "dev_loss": 2.0}
        assert scheduler.on_trial_result(None, tune_trial, point) == TrialScheduler.CONTINUE
        assert study.trials[judged.number].user_attrs["rungs"] == {"0": "promoted"}
    finally:
        searcher.stop()


def test_a_retry_of_a_design_already_stopped_at_a_rung_stops_at_once(tmp_path):
    """The driver died after deciding "stopped" and before telling Optuna; the retry inherits the
    decision and must not train on to the end."""
    from ray.tune.schedulers import TrialScheduler

    from nas.asha import RungScheduler

    with a_trial_taken_over(tmp_path) as (study, searcher, _):
        scheduler = RungScheduler(searcher, load_schedule("tiny"), Rungs((1, 2, 4)))
        retry = study.ask()
        for key, value in {"bytes": 1000, "macs_per_second": 1.0, "rungs": {"0": "stopped"}}.items():
            retry.set_user_attr(key, value)
        searcher.live["retry"] = retry
        tune_trial = type("TuneTrial", (), {"trial_id": "retry"})()
        point = {"step": scheduler.rung_steps[1], "dev_wer": 0.1, "dev_loss": 0.5}  # past the rung it failed
        assert scheduler.on_trial_result(None, tune_trial, point) == TrialScheduler.STOP
