"""Running `nas search` as a user does, for the end-to-end and fault tests: a subprocess on the
tiny space, and reading back the study it leaves."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import optuna
import torch

from nas.budget import count
from nas.config import ArchConfig

from nas.trials import is_infeasible

ROOT = Path(__file__).resolve().parents[1]
FAST_HEARTBEAT = {"NAS_HEARTBEAT_S": "2", "NAS_GRACE_S": "8"}


def nas_search(tmp_path, corpus, *extra, study="t", trials=4) -> list[str]:
    """The command line; options in ``extra`` come last, so they override these. Every design trains
    the proxy (``--fidelity fixed``) unless ``extra`` says ``--fidelity asha`` (tests/test_asha.py)."""
    return [sys.executable, "-m", "nas.cli", "search", str(ROOT / "search_spaces/tiny.yaml"), "--trials", str(trials),
            "--workers", "2", "--proxy", "tiny", "--data", f"manifest:{corpus}", "--results", str(tmp_path),
            "--study", study, "--fidelity", "fixed", *extra]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=os.environ | FAST_HEARTBEAT, capture_output=True, text=True, timeout=600, **kw)


def load(tmp_path, study="t", storage=None) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=storage or f"sqlite:///{tmp_path / study / 'study.db'}")


def trial_lines(stdout: str) -> list[int]:
    """Numbers of the trials a driver printed as finished."""
    return [int(line.split()[1].rstrip(":")) for line in stdout.splitlines() if line.startswith("trial ")]


def assert_nothing_over_budget_was_trained(study, trials_dir, budget) -> None:
    """Audit what was trained, not what the gate wrote down: every run directory under
    ``trials_dir`` holds a checkpoint naming the design it trained, and that design, counted again
    by the budget arithmetic, fits ``budget``. Every trained trial's run is among them, and no
    sample told infeasible has a run."""
    runs = sorted(d for d in Path(trials_dir).iterdir() if d.is_dir())
    assert runs
    for run_dir in runs:
        trained = ArchConfig.from_json(torch.load(run_dir / "checkpoint.pt", weights_only=True)["arch"])
        assert budget.fits(count(trained)), f"{run_dir} trained a design of {count(trained).physical:,} parameters"
    run_dirs = {str(d) for d in runs}
    for t in study.get_trials():
        if "run_dir" in t.user_attrs:
            assert t.user_attrs["run_dir"] in run_dirs
        if is_infeasible(t):
            assert "run_dir" not in t.user_attrs and t.values is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@contextmanager
def ray_head(env: dict):
    """A one-node Ray cluster that drivers join by address, as `ray start --head` makes one on a
    cluster. Yields its address. It is stopped by killing its own processes only: `ray stop` would
    stop every Ray on the machine, a benchmark's included."""
    temp = tempfile.mkdtemp(prefix="nas-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    f"--temp-dir={temp}"], check=True, capture_output=True, timeout=120, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ours = [int(p.name) for p in Path("/proc").glob("[0-9]*") if temp in cmdline(int(p.name))]
        for pid in ours + [d for p in ours for d in descendants(p)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def a_searcher_with_a_live_trial(tmp_path, on_finish=lambda number: None):
    """This driver's searcher on a study of the tiny space, holding one live trial ("live") whose
    design is 1,000 bytes: (study, searcher, trial). The searcher's ``suggest`` is not used, so it
    has no budget gate and no corpus."""
    from nas.budget import parse_budget
    from nas.search import BudgetSearcher, SearchSettings
    from nas.space import load_space
    from nas.study import open_storage, open_study

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    record = {"space": "tiny", "budget": "60K", "objectives": ["wer", "bytes"], "data": "synth", "proxy": "tiny"}
    study = open_study("s", storage, ("wer", "bytes"), "tpe", 0, record)
    settings = SearchSettings(space=load_space(ROOT / "search_spaces/tiny.yaml"), budget=parse_budget("60K"),
                              proxy="tiny", results=tmp_path, objectives=("wer", "bytes"))
    searcher = BudgetSearcher(study, storage, None, settings, None, on_finish)
    try:
        trial = study.ask()
        trial.set_user_attr("bytes", 1000)
        trial.set_user_attr("macs_per_second", 1e6)
        searcher.live["live"] = trial
        yield study, searcher, trial
    finally:
        searcher.stop()


@contextmanager
def a_trial_taken_over(tmp_path, on_finish=lambda number: None):
    """As :func:`a_searcher_with_a_live_trial`, with the live trial ("late") just failed as stale by
    another driver, as ``fail_stale_trials`` does: (study, searcher, trial)."""
    from optuna.trial import TrialState

    with a_searcher_with_a_live_trial(tmp_path, on_finish) as (study, searcher, trial):
        searcher.live["late"] = searcher.live.pop("live")
        optuna.load_study(study_name="s", storage=study._storage).tell(trial.number, state=TrialState.FAIL)
        yield study, searcher, trial
