"""The search end to end, with Ray Tune: a tiny real search through the `nas search` command.
Faults (killed workers and drivers, failing trials, shared studies) are in test_faults.py."""

import csv
import json
import time

import pytest

from nas.budget import parse_budget
from nas.trials import records, tally
from searches import assert_nothing_over_budget_was_trained, load, nas_search, run

pytestmark = pytest.mark.slow


def test_tiny_search_leaves_a_front_and_trains_nothing_over_budget(tiny_corpus_dir, tmp_path):
    t0 = time.monotonic()
    r = run(nas_search(tmp_path, tiny_corpus_dir, trials=5))
    assert r.returncode == 0, r.stderr[-3000:]
    elapsed = time.monotonic() - t0
    study = load(tmp_path)
    assert tally(records(study)).done == 5
    assert_nothing_over_budget_was_trained(study, tmp_path / "t" / "trials", parse_budget("60K"))
    front = json.loads((tmp_path / "t" / "pareto.json").read_text())["front"]
    assert front and all(row["bytes"] <= 60_000 * 4 for row in front)
    with open(tmp_path / "t" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.get_trials()]
    assert {r["state"] for r in rows} <= {"COMPLETE", "FAILED", "INFEASIBLE"}
    lines = [l for l in r.stdout.splitlines() if l.startswith("trial ")]
    assert len(lines) == 5 and all("feasible" in l or "FAILED" in l for l in lines)
    labels = {t.user_attrs.get("label") for t in study.get_trials()}
    assert {"unshared", "paper"} <= labels  # the built-in baselines are always in the race
    print(f"tiny search: 5 trials in {elapsed:.0f} s")


def test_device_objectives_are_measured_on_each_trained_model(tiny_corpus_dir, tmp_path):
    r = run(nas_search(tmp_path, tiny_corpus_dir, "--objectives", "wer,bytes,rtf,memory", trials=2))
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(tmp_path)
    complete = [x for x in records(study) if x.state == "complete"]
    assert complete
    for x in complete:
        assert set(x.values) == {"wer", "bytes", "rtf", "memory"}
        assert 0 < x.values["rtf"] < 1 and x.values["memory"] > 0  # a tiny model runs far faster than real time
        assert study.trials[x.number].user_attrs["device_seconds"] > 0  # what measuring cost, recorded
    front = json.loads((tmp_path / "t" / "pareto.json").read_text())
    assert front["objectives"] == ["wer", "bytes", "rtf", "memory"]
