"""The report after a search, on a small real study: designs sampled under the budget by Optuna and
really trained (tiny schedule, tiny corpus), one failure, one baseline; no Ray."""

import math
import random
import re

import optuna
import pytest
from optuna.trial import TrialState
from scipy.stats import kendalltau, spearmanr

from nas.baselines import baselines
from nas.budget import count, parse_budget
from nas.config import ArchConfig
from nas.data.corpus import resolve_data
from nas.pareto import front
from nas.report import decisions, headline_section, param_importances, render_markdown, write_report
from nas.space import load_space
from nas.study import BudgetGate, enqueue_design, objective_values
from nas.train import load_schedule, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = load_space("search_spaces/tiny.yaml")


@pytest.fixture(scope="module")
def searched(tiny_corpus_dir, tmp_path_factory):
    """A study of 5 trials: the unshared baseline and 3 sampled designs trained, 1 failed; the
    infeasible samples the gate refused on the way."""
    runs = tmp_path_factory.mktemp("runs")
    study = optuna.create_study(study_name="report-test", directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(multivariate=True, group=True, seed=1))
    unshared = dict(baselines(TINY, TINY.budget))["unshared"]
    enqueue_design(study, unshared, "unshared")
    gate, corpus = BudgetGate(study, TINY, TINY.budget), resolve_data(f"manifest:{tiny_corpus_dir}")
    schedule = load_schedule("tiny").model_copy(update={"steps": 4, "eval_every": 4})  # one evaluation: faster
    for n in range(5):
        cand = gate.next_feasible()
        if n == 2:
            cand.trial.set_user_attr("fail_reason", "RuntimeError: out of memory (simulated)")
            study.tell(cand.trial, state=TrialState.FAIL)
            continue
        metrics = train(cand.arch, schedule, corpus, runs / str(n), progress=False, evaluate_test=False)
        cand.trial.set_user_attr("train_seconds", metrics["train_seconds"])
        study.tell(cand.trial, objective_values(("wer", "bytes"), metrics["dev"]["wer"], cand.trial))
    return study


def pareto_table_numbers(md: str) -> set[int]:
    section = md.split("## The Pareto designs", 1)[1].split("\n## ", 1)[0]
    return {int(line.split("|")[1]) for line in section.splitlines() if re.match(r"\| \d+ \|", line)}


def section(md: str, title: str) -> str:
    return md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, path


def test_report_of_a_real_study(searched, tmp_path):
    budget = TINY.budget
    md_path = write_report(searched, tmp_path, budget.max_bytes, budget.dtype)
    md, page = md_path.read_text(), (tmp_path / "report.html").read_text()
    assert md_path == tmp_path / "report.md"

    assert "Headline" not in md  # no retrained rows, no headline
    assert not re.search(r"https?://", page), "the HTML must not fetch anything"
    for name in ("front.png", "hypervolume.png"):
        assert_png(tmp_path / name)
        assert f"]({name})" in md
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(img.startswith("iVBORw0KGgo") for img in images)  # base64 of the signature

    on_front = {t.number for t in front(searched)}
    assert on_front and pareto_table_numbers(md) == on_front
    maps = section(md, "Layer maps")
    assert all(f"#{n}" in maps for n in on_front) and "blocks A" in maps
    assert "| unshared |" in section(md, "The front")  # the baseline, placed against the front

    complete = sum(t.state == TrialState.COMPLETE for t in searched.trials)
    assert complete == 4
    assert f"Not enough trials ({complete}) to estimate importance" in md
    assert "Not measured: no design has been retrained in full" in md
    summary = section(md, "Search summary")
    assert "| complete | 4 |" in summary and "| failed | 1 |" in summary
    assert "RuntimeError: out of memory (simulated)" in summary
    infeasible = sum(t.state == TrialState.PRUNED for t in searched.trials)
    assert f"{infeasible} of {len(searched.trials)} samples" in summary


def test_report_with_retrained_designs_has_the_headline_and_proxy_fidelity(searched, tmp_path):
    budget = TINY.budget
    trained = [t for t in searched.trials if t.state == TrialState.COMPLETE]
    paper = dict(baselines(TINY, budget))["paper"]
    rows = [{"number": t.number, "label": t.user_attrs.get("label"), "proxy_wer": t.values[0],
             "full_dev_wer": 0.30 + 0.05 * i, "full_test_wer": 0.32 + 0.05 * i, "full_test_cer": 0.1 + 0.02 * i,
             "bytes": t.user_attrs["bytes"], "physical_params": t.user_attrs["physical_params"],
             "arch": {}} for i, t in enumerate(trained)]
    rows.append({"number": 99, "label": "paper", "proxy_wer": 0.97, "full_dev_wer": 0.41, "full_test_wer": 0.43,
                 "full_test_cer": 0.15, "bytes": count(paper).bytes(budget.dtype),
                 "physical_params": count(paper).physical, "arch": {}})
    unshared = next(r for r in rows if r["label"] == "unshared")
    unshared.update(full_dev_wer=0.50, full_test_wer=0.52)
    best = min((r for r in rows if not r["label"]), key=lambda r: r["full_dev_wer"])

    md = write_report(searched, tmp_path, budget.max_bytes, budget.dtype, retrained=rows).read_text()
    head = section(md, "Headline: the searched design against the baselines")
    assert md.index("## Headline") < md.index("## The front")
    for wer in (best["full_test_wer"], 0.52, 0.43):
        assert f"{wer:.1%}" in head
    assert f"{(0.52 - best['full_test_wer']) / 0.52:.1%} lower" in head
    assert "**Yes:" in head  # 0.32 against 0.52 and 0.43: both at least 10% better

    proxy, full = [r["proxy_wer"] for r in rows], [r["full_dev_wer"] for r in rows]
    fidelity = section(md, "Proxy fidelity")
    for stat in (kendalltau(proxy, full).statistic, spearmanr(proxy, full).statistic):
        assert ("n/a" if math.isnan(stat) else f"{stat:.3f}") in fidelity  # nan when a side does not vary
    assert_png(tmp_path / "fidelity.png")
    assert not re.search(r"https?://", (tmp_path / "report.html").read_text())


def test_headline_says_no_when_a_baseline_is_within_ten_percent():
    rows = [{"number": 3, "label": None, "full_dev_wer": 0.30, "full_test_wer": 0.30, "full_test_cer": 0.1,
             "bytes": 100, "physical_params": 25},
            {"number": 4, "label": None, "full_dev_wer": 0.20, "full_test_wer": 0.20, "full_test_cer": 0.1,
             "bytes": 900, "physical_params": 225},  # better, but over the budget: not eligible
            {"number": 0, "label": "unshared", "full_dev_wer": 0.40, "full_test_wer": 0.40, "full_test_cer": 0.1,
             "bytes": 100, "physical_params": 25},
            {"number": 1, "label": "paper", "full_dev_wer": 0.33, "full_test_wer": 0.33, "full_test_cer": 0.1,
             "bytes": 100, "physical_params": 25}]
    md = render_markdown("t", "", [headline_section(rows, budget_bytes=500)])
    assert "| searched (best full dev WER) | 3 |" in md
    assert "25.0% lower vs unshared and 9.1% lower vs paper" in md and "**No:" in md
    md = render_markdown("t", "", [headline_section(rows[2:], budget_bytes=500)])
    assert "No verdict: no searched design" in md


def test_importance_of_design_decisions_on_a_larger_study(tmp_path):
    """Importance needs more trials than a test can train: 30 designs of paper.yaml with a stand-in WER
    that depends on the feed-forward rank only. The estimate must name that decision first."""
    space, budget = load_space("search_spaces/paper.yaml"), parse_budget("1M")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    gate, rng = BudgetGate(study, space, budget), random.Random(0)
    for _ in range(30):
        cand = gate.next_feasible()
        low_rank = cand.arch.sharing.low_rank.ffn_in.rank is not None
        study.tell(cand.trial, [0.4 + 0.3 * low_rank + rng.gauss(0, 0.01), cand.count.bytes()])
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    importances, evaluator, _ = param_importances(complete)
    assert evaluator in ("fANOVA", "PED-ANOVA")
    assert set(importances) <= set(decisions(ArchConfig.from_json(complete[0].user_attrs["arch"])))
    assert next(iter(importances)).startswith("low_rank.ffn_")

    md = write_report(study, tmp_path, budget.max_bytes, budget.dtype).read_text()
    table = section(md, "Importance of each design decision")
    assert evaluator in table and "| low_rank.ffn_" in table
    assert_png(tmp_path / "importance.png")


def test_no_verdict_when_nothing_has_learned(tmp_path):
    from nas.report import _verdict

    row = {"number": 1, "full_test_wer": 1.05}
    text = _verdict(row, {"unshared": {"number": 2, "full_test_wer": 1.3}, "paper": {"number": 3, "full_test_wer": 1.2}})
    assert text.startswith("**No verdict: every design's test WER is at least 100%")


def test_a_failed_retrain_is_left_out_not_a_crash(tmp_path):
    import optuna

    from nas.report import write_report

    study = optuna.create_study(directions=["minimize", "minimize"])
    failed = {"number": 0, "label": "unshared", "proxy_wer": 1.0, "full_dev_wer": None, "full_test_wer": None,
              "full_test_cer": None, "bytes": 10, "physical_params": 10, "arch": {}}
    text = write_report(study, tmp_path, 100, "fp32", retrained=[failed]).read_text()
    assert "Headline" not in text
