"""The fault-injection suite: real tiny searches, hurt the way clusters hurt them.

Each test runs `nas search` as a subprocess, as a user would, then injures it: kills a Ray worker
or the driver, damages the corpus or a checkpoint, makes trials diverge or outgrow a memory guard,
runs two drivers on one study. It checks from the study's storage and files that nothing recorded
was lost, no trial was recorded twice, and every failure says why.
"""

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from conftest import TINY_ARCH
from damage import corrupt_flac
from nas.config import ArchConfig
from nas.data.manifest import Utterance, read_manifest, write_manifest
from nas.budget import parse_budget
from nas.schedule import load_schedule
from nas.trials import records, tally
from nas.workers import run_key
from searches import (
    FAST_HEARTBEAT, ROOT, assert_nothing_over_budget_was_trained, cmdline, descendants, load, nas_search, ray_head,
    run, trial_lines,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def schedule_file(tmp_path, name, **over) -> Path:
    """The tiny proxy schedule with some fields changed, as a YAML file for ``--proxy``."""
    doc = yaml.safe_load((ROOT / "nas/schedules/tiny.yaml").read_text()) | {"name": name} | over
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def trials_table(tmp_path, study="t") -> dict[int, dict]:
    with open(tmp_path / study / "trials.csv", newline="") as f:
        return {int(row["number"]): row for row in csv.DictReader(f)}


def test_a_worker_killed_mid_trial_is_retried_and_corrupt_audio_is_skipped_and_reported(tiny_corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"  # the tiny corpus, with one recording whose data is damaged
    for split in ("train", "dev", "test"):
        rows = read_manifest(tiny_corpus_dir / f"{split}.jsonl")
        if split == "train":
            rows.insert(3, Utterance("broken", corrupt_flac(tmp_path / "broken.flac"), "a broken recording"))
        write_manifest(corpus / f"{split}.jsonl", rows)
    slow = schedule_file(tmp_path, "slow", steps=100, eval_every=10)  # checkpoints every 10 steps
    cmd = nas_search(tmp_path, corpus, "--workers", "1", "--proxy", str(slow), trials=2)
    trials_dir = tmp_path / "t" / "trials"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        driver = subprocess.Popen(cmd, env=os.environ | FAST_HEARTBEAT, stdout=out, stderr=err)
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            mid_training = [d for d in trials_dir.glob("*")
                            if (d / "checkpoint.pt").is_file() and not (d / "metrics.json").is_file()]
            workers = [p for p in descendants(driver.pid) if cmdline(p).startswith("ray::ImplicitFunc")]
            if mid_training and workers:
                os.kill(workers[0], signal.SIGKILL)  # the one worker (--workers 1) of that trial
                victim = mid_training[0].resolve()
        driver.wait(timeout=600)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert victim is not None, "no trial was caught mid-training"
    assert driver.returncode == 0, stderr[-3000:]

    study = load(tmp_path)
    assert tally(records(study)).done == 2 and tally(records(study))["failed"] == 0
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    killed = next(t for t in study.get_trials() if Path(t.user_attrs.get("run_dir", "/")).resolve() == victim)
    assert killed.state == TrialState.COMPLETE  # Ray Tune ran it again (FailureConfig(max_failures=1))...
    metrics = json.loads((victim / "metrics.json").read_text())
    assert metrics["resumed_at_steps"] and metrics["steps"] == 100  # ...and it went on from its checkpoint
    assert sorted(trial_lines(stdout)) == sorted(t.number for t in study.get_trials() if "run_dir" in t.user_attrs)
    # The corrupt recording was skipped and counted, and the run's summary (its last line) says so.
    assert re.search(r"corpus manifest:\S+: train \d+ utterances, 1 skipped \(1 bad audio\); dev \d+ utterances; "
                     r"test \d+ utterances$", stdout.strip().splitlines()[-1])


def test_driver_killed_with_sigkill_resumes_without_rerunning_finished_trials(tiny_corpus_dir, tmp_path):
    cmd = nas_search(tmp_path, tiny_corpus_dir, trials=5)
    proc = subprocess.Popen(cmd, env=os.environ | FAST_HEARTBEAT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:  # kill it once 2 trials are done and another one is training
        time.sleep(0.5)
        try:
            recs = records(load(tmp_path))
        except Exception:  # the study may not exist yet
            continue
        if tally(recs).done >= 2 and any(r.state == "running" and r.trained for r in recs):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = load(tmp_path)
    finished = {t.number: (t.values, t.user_attrs["run_dir"]) for t in before.get_trials()
                if t.state == TrialState.COMPLETE}
    in_flight = {t.number: t.user_attrs["run_dir"] for t in before.get_trials()
                 if t.state == TrialState.RUNNING and "run_dir" in t.user_attrs}
    assert 2 <= len(finished) < 5 and in_flight, "the kill did not land mid-search"
    mtimes = {n: (Path(d) / "metrics.json").stat().st_mtime for n, (_, d) in finished.items()}

    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    after = load(tmp_path)
    assert tally(records(after)).done == 5  # the size of an uninterrupted study
    for n, (values, run_dir) in finished.items():  # kept, and not trained again
        assert after.trials[n].state == TrialState.COMPLETE and after.trials[n].values == values
        assert (Path(run_dir) / "metrics.json").stat().st_mtime == mtimes[n]
    assert not [t for t in after.get_trials() if t.state == TrialState.RUNNING]
    assert not set(trial_lines(r.stdout)) & set(finished)
    assert trial_lines(r.stdout), "the resumed run trained nothing"
    # Each trial that was training when the driver died was found stale and run again: as a new
    # trial with its parameters, in its run directory (so from its checkpoint, if it had one).
    retries = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in after.get_trials()}
    for number, run_dir in in_flight.items():
        assert after.trials[number].state == TrialState.FAIL
        assert number in retries and retries[number].user_attrs["run_dir"] == run_dir
        assert retries[number].state == TrialState.COMPLETE


@pytest.mark.parametrize("fault", ["loss turns NaN", "trial raises", "over its memory guard"])
def test_a_failing_trial_is_fail_with_its_reason_and_the_search_goes_on(fault, tiny_corpus_dir, tmp_path):
    if fault == "loss turns NaN":
        diverge = schedule_file(tmp_path, "diverge", steps=30, eval_every=30, peak_lr=1e30, warmup_steps=0)
        extra, reason = ["--proxy", str(diverge)], r"loss: non-finite for 20 consecutive batches at step \d+"
    elif fault == "trial raises":  # an enqueued design whose run directory holds a damaged checkpoint
        design = ArchConfig.from_dict(TINY_ARCH)
        (tmp_path / "design.json").write_text(design.model_dump_json())
        run_dir = tmp_path / "t" / "trials" / run_key(design, load_schedule("tiny"))
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
        extra = ["--no-baselines", "--enqueue", str(tmp_path / "design.json")]
        reason = r"checkpoint\.pt: cannot read this checkpoint \(\w+\); delete it to start the run over"
    else:
        extra = ["--max-trial-memory", "1MB"]
        reason = r"memory: the process holds [\d,]+ MB at step 0, over its guard of 1 MB"
    r = run(nas_search(tmp_path, tiny_corpus_dir, *extra, trials=2))
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(tmp_path)
    assert tally(records(study)).done == 2
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL and "run_dir" in t.user_attrs]
    assert failed
    table = trials_table(tmp_path)
    for t in failed:
        assert table[t.number]["state"] == "FAILED" and re.search(reason, table[t.number]["user_attrs_fail_reason"])
        assert re.search(rf"^trial {t.number}\b.*: FAILED: .*{reason}", r.stdout, re.MULTILINE)
    if fault == "trial raises":  # the other trial was trained after it: the driver went on
        assert [t.state for t in study.get_trials() if "run_dir" in t.user_attrs] == [TrialState.FAIL,
                                                                                     TrialState.COMPLETE]


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_two_drivers_on_one_study_record_every_trial_once(storage, tiny_corpus_dir, tmp_path):
    if storage == "postgresql":
        if not os.environ.get("NAS_TEST_POSTGRES"):
            pytest.skip("needs NAS_TEST_POSTGRES (set by .ci/run)")
        url = os.environ["NAS_TEST_POSTGRES"]
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    study = f"two-{os.getpid()}-{int(time.time())}"
    env = os.environ | FAST_HEARTBEAT | {"RAY_AUTH_MODE": "disabled"}  # a loopback-only test cluster
    with ray_head(env) as address:
        cmd = nas_search(tmp_path, tiny_corpus_dir, "--storage", url, "--address", address, "--workers", "1",
                         study=study, trials=4)
        drivers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(2)]
        outs = [d.communicate(timeout=600) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), "\n\n".join(f"exit {d.returncode}: {o[1][-2500:]}"
                                                                 for d, o in zip(drivers, outs))
    s = load(tmp_path, study, storage=url)
    printed = [n for out, _ in outs for n in trial_lines(out)]
    assert len(printed) == len(set(printed))  # no trial was told twice
    finished = {t.number for t in s.get_trials() if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and "run_dir" in t.user_attrs}
    states = {t.number: (t.state.name, t.user_attrs.get("fail_reason"), t.system_attrs.get("failed_trial"))
              for t in s.get_trials()}
    evidence = "\n\n".join(f"driver {i}: {o[0][-2000:]}\n{o[1][-2000:]}" for i, o in enumerate(outs))
    assert set(printed) == finished and 4 <= len(finished) <= 5, f"{states}\n{evidence}"  # both may start the last
    assert not [t for t in s.get_trials() if t.state == TrialState.RUNNING]
    assert_nothing_over_budget_was_trained(s, tmp_path / study / "trials", parse_budget("60K"))
