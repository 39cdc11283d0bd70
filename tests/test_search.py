"""The search end to end, with Ray Tune: tiny real searches through the `nas search` command."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.study import is_infeasible, progress

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST_HEARTBEAT = {"NAS_HEARTBEAT_S": "2", "NAS_GRACE_S": "8"}


def nas_search(tmp_path, corpus, *extra, study="t", trials=4):
    return [sys.executable, "-m", "nas.cli", "search", str(ROOT / "search_spaces/tiny.yaml"), "--trials", str(trials),
            "--workers", "2", "--proxy", "tiny", "--data", f"manifest:{corpus}", "--results", str(tmp_path),
            "--study", study, *extra]


def run(cmd, **kw):
    env = os.environ | FAST_HEARTBEAT
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)


def load(tmp_path, study="t", storage=None):
    return optuna.load_study(study_name=study, storage=storage or f"sqlite:///{tmp_path / study / 'study.db'}")


def assert_nothing_over_budget_was_trained(study):
    trained = [t for t in study.get_trials() if "run_dir" in t.user_attrs]
    assert trained
    for t in trained:
        assert t.system_attrs["constraints:budget"] <= 0 and not is_infeasible(t)
    for t in study.get_trials():
        if is_infeasible(t):
            assert "run_dir" not in t.user_attrs and t.values is None


def test_tiny_search_leaves_a_front_and_trains_nothing_over_budget(tiny_corpus_dir, tmp_path):
    t0 = time.monotonic()
    r = run(nas_search(tmp_path, tiny_corpus_dir, trials=5))
    assert r.returncode == 0, r.stderr[-3000:]
    elapsed = time.monotonic() - t0
    study = load(tmp_path)
    assert progress(study)["done"] == 5
    assert_nothing_over_budget_was_trained(study)
    front = json.loads((tmp_path / "t" / "pareto.json").read_text())["front"]
    assert front and all(row["bytes"] <= 60_000 * 4 for row in front)
    with open(tmp_path / "t" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.get_trials()]
    assert {r["state"] for r in rows} <= {"COMPLETE", "FAIL", "INFEASIBLE"}
    lines = [l for l in r.stdout.splitlines() if l.startswith("trial ")]
    assert len(lines) == 5 and all("feasible" in l or "FAIL" in l for l in lines)
    labels = {t.user_attrs.get("label") for t in study.get_trials()}
    assert {"unshared", "paper"} <= labels  # the built-in baselines are always in the race
    print(f"tiny search: 5 trials in {elapsed:.0f} s")


def test_driver_killed_with_sigkill_resumes_without_rerunning_finished_trials(tiny_corpus_dir, tmp_path):
    cmd = nas_search(tmp_path, tiny_corpus_dir, trials=5)
    proc = subprocess.Popen(cmd, env=os.environ | FAST_HEARTBEAT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            if progress(load(tmp_path))["done"] >= 2:
                break
        except Exception:  # the study may not exist yet
            continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = load(tmp_path)
    finished = {t.number: (t.values, t.user_attrs["run_dir"]) for t in before.get_trials()
                if t.state == TrialState.COMPLETE}
    assert len(finished) >= 2
    mtimes = {n: (Path(d) / "metrics.json").stat().st_mtime for n, (_, d) in finished.items()}

    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    after = load(tmp_path)
    assert progress(after)["done"] == 5
    for n, (values, run_dir) in finished.items():  # kept, and not trained again
        assert after.trials[n].state == TrialState.COMPLETE and after.trials[n].values == values
        assert (Path(run_dir) / "metrics.json").stat().st_mtime == mtimes[n]
    assert not [t for t in after.get_trials() if t.state == TrialState.RUNNING]
    printed = [int(l.split()[1].rstrip(":")) for l in r.stdout.splitlines() if l.startswith("trial ")]
    assert not set(printed) & set(finished)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.environ.get("NAS_TEST_POSTGRES"), reason="needs NAS_TEST_POSTGRES (set by .ci/run)")
def test_two_drivers_on_one_postgres_study_record_every_trial_once(tiny_corpus_dir, tmp_path):
    url = os.environ["NAS_TEST_POSTGRES"]
    study = f"two-{os.getpid()}-{int(time.time())}"
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    env = os.environ | FAST_HEARTBEAT | {"RAY_AUTH_MODE": "disabled"}  # a loopback-only test cluster
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                   check=True, capture_output=True, timeout=120, env=env)
    try:
        cmd = nas_search(tmp_path, tiny_corpus_dir, "--storage", url, "--address", f"127.0.0.1:{port}",
                         "--workers", "1", study=study, trials=4)
        drivers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(2)]
        outs = [d.communicate(timeout=600) for d in drivers]
        assert all(d.returncode == 0 for d in drivers), [o[1][-2000:] for o in outs]
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)
    s = load(tmp_path, study, storage=url)
    printed = [int(l.split()[1].rstrip(":")) for out, _ in outs for l in out.splitlines() if l.startswith("trial ")]
    assert len(printed) == len(set(printed))  # no trial was told twice
    finished = {t.number for t in s.get_trials() if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and "run_dir" in t.user_attrs}
    assert set(printed) == finished and 4 <= len(finished) <= 5  # both drivers may start the last one
    assert not [t for t in s.get_trials() if t.state == TrialState.RUNNING]
    assert_nothing_over_budget_was_trained(s)
