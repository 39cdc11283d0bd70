"""The front in pareto.json against an independent non-dominated sort of trials.csv."""

import csv
import json
import random

import optuna
import pytest

from nas.budget import parse_budget
from nas.cli import main
from nas.pareto import hypervolume_2d, write_outputs
from nas.space import load_space
from nas.study import BudgetGate, open_storage, open_study

SETTINGS = {"space": "paper", "budget": "1M", "objectives": ["wer", "bytes"], "data": "synth", "proxy": "proxy"}


@pytest.fixture()
def study_dir(tmp_path):
    """A study of 30 designs of paper.yaml; WER values are stand-ins (this checks the bookkeeping)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = open_study("p", storage, ("wer", "bytes"), "random", 0, SETTINGS)
    gate, rng = BudgetGate(study, load_space("search_spaces/paper.yaml"), parse_budget("1M")), random.Random(0)
    for i in range(30):
        cand = gate.next_feasible()
        if i % 7 == 3:
            cand.trial.set_user_attr("fail_reason", "diverged")
            study.tell(cand.trial, state=optuna.trial.TrialState.FAIL)
        else:
            wer = round(0.3 + 0.5 * rng.random() - cand.count.physical / 4e6, 3)
            study.tell(cand.trial, [wer, cand.trial.user_attrs["bytes"]])
    write_outputs(study, tmp_path)
    return tmp_path


def test_pareto_json_is_the_non_dominated_set_of_the_trials_table(study_dir):
    with open(study_dir / "trials.csv", newline="") as f:
        done = [(int(r["number"]), float(r["wer"]), float(r["bytes"])) for r in csv.DictReader(f)
                if r["state"] == "COMPLETE"]
    assert len(done) > 20
    dominated = {n for n, w, b in done
                 if any(w2 <= w and b2 <= b and (w2 < w or b2 < b) for _, w2, b2 in done)}
    expected = {n for n, _, _ in done} - dominated
    front = json.loads((study_dir / "pareto.json").read_text())["front"]
    assert {row["number"] for row in front} == expected
    with open(study_dir / "trials.csv", newline="") as f:
        on_front = {int(r["number"]) for r in csv.DictReader(f) if r["on_front"] == "True"}
    assert on_front == expected


def test_hypervolume_matches_a_grid_count():
    rng = random.Random(1)
    points = [(rng.random(), rng.random()) for _ in range(12)]
    n = 400  # midpoints of an n x n grid over the reference box [0, 1]^2
    inside = sum(any(x <= (i + 0.5) / n and y <= (j + 0.5) / n for x, y in points)
                 for i in range(n) for j in range(n))
    assert abs(hypervolume_2d(points, (1.0, 1.0)) - inside / n**2) < 0.01


def test_missing_study_and_bad_design_are_one_line_errors(study_dir, tmp_path, capsys):
    assert main(["report", "nosuch", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no study 'nosuch' here" in err and "\n" not in err
    front = {row["number"] for row in json.loads((study_dir / "pareto.json").read_text())["front"]}
    off = next(n for n in range(30) if n not in front)
    (tmp_path / "p").mkdir()
    (study_dir / "study.db").rename(tmp_path / "p" / "study.db")
    assert main(["export", "p", "--design", str(off), "--out", str(tmp_path / "x"), "--results", str(tmp_path)]) == 2
    assert f"error: --design: trial {off} is neither on the front nor retrained" in capsys.readouterr().err
    assert main(["export", "p", "--best-under", "1M", "--out", str(tmp_path / "x"), "--results", str(tmp_path)]) == 2
    assert "error: --best-under: no retrained design fits 1M" in capsys.readouterr().err
