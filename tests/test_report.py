"""The report after a search, on a small real study: designs sampled under the budget by Optuna and
really trained (tiny schedule, tiny corpus), one failure, one baseline; no Ray."""

import base64
import json
import math
import random
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from scipy.stats import kendalltau, spearmanr

from nas.baselines import baselines
from nas.budget import count, parse_budget
from nas.config import ArchConfig
from nas.data.corpus import resolve_data
from nas.pareto import front, reference_point
from nas.report import decisions, param_importances, write_report
from nas.report.document import headline_section
from nas.report.verdict import headline, headline_json, shortfall
from nas.schedule import load_schedule
from nas.space import load_space
from nas.study import BudgetGate, enqueue_design, objective_values
from nas.train import train
from nas.trials import records, tally

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
        study.tell(cand.trial, objective_values(("wer", "bytes"), {"dev_wer": metrics["dev"]["wer"]},
                                                cand.trial.user_attrs))
    return study


def stand_in_study(n: int, signal: str = "wer") -> optuna.Study:
    """``n`` designs of paper.yaml under 1 MB, not trained: a stand-in ``signal`` that depends on
    the feed-forward rank only."""
    space, budget = load_space("search_spaces/paper.yaml"), parse_budget("1M")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("settings", {"objectives": [signal, "bytes"]})
    gate, rng = BudgetGate(study, space, budget), random.Random(0)
    for _ in range(n):
        cand = gate.next_feasible()
        low_rank = cand.arch.sharing.low_rank.ffn_in.rank is not None
        study.tell(cand.trial, [0.4 + 0.3 * low_rank + rng.gauss(0, 0.01), cand.count.bytes()])
    return study


def retrained_rows(study):
    """Full-retrain rows for every trained design and the paper baseline, at seed 0, then seeds 1
    and 2 of the best searched design and the baselines (test WER ± 0.01): the searched design wins."""
    budget = TINY.budget
    trained = [r for r in records(study) if r.state == "complete"]
    paper = dict(baselines(TINY, budget))["paper"]
    rows = [{"number": r.number, "label": r.label, "seed": 0, "proxy_signal": "wer", "proxy_value": r.values["wer"],
             "full_dev_wer": 0.30 + 0.05 * i, "full_test_wer": 0.32 + 0.05 * i, "full_test_cer": 0.1 + 0.02 * i,
             "bytes": r.bytes, "physical_params": r.physical_params, "arch": {}} for i, r in enumerate(trained)]
    rows.append({"number": 99, "label": "paper", "seed": 0, "proxy_signal": "wer", "proxy_value": 0.97, "full_dev_wer": 0.41,
                 "full_test_wer": 0.43, "full_test_cer": 0.15, "bytes": count(paper).bytes(budget.dtype),
                 "physical_params": count(paper).physical, "arch": {}})
    next(r for r in rows if r["label"] == "unshared").update(full_dev_wer=0.50, full_test_wer=0.52)
    best = min((r for r in rows if not r["label"]), key=lambda r: r["full_dev_wer"])
    for r in [best] + [r for r in rows if r["label"]]:
        rows += [r | {"seed": s, "full_test_wer": r["full_test_wer"] + d} for s, d in ((1, 0.01), (2, -0.01))]
    return rows


def pareto_table_numbers(md: str) -> set[int]:
    return {int(line.split("|")[1]) for line in section(md, "The Pareto designs").splitlines()
            if re.match(r"\| \d+ \|", line)}


def section(md: str, title: str) -> str:
    return md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, path


def assert_self_contained(out_dir, pngs):
    """report.html is rendered HTML (no Markdown left raw), fetches nothing, and embeds exactly the
    report's PNGs, each byte for byte as a data: URI."""
    page, md = (out_dir / "report.html").read_text(), (out_dir / "report.md").read_text()
    for mark in ("**", "`", "|---", "| ---", "](", "```"):
        assert mark not in page, f"raw Markdown {mark!r} in report.html"
    assert not re.search(r"https?://", page), "the HTML must not fetch anything"
    assert "<table>" in page and "<strong>" in page and "<h2>" in page
    embedded = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(pngs)
    assert sorted(embedded) == sorted(base64.b64encode((out_dir / p).read_bytes()).decode() for p in pngs)
    for png in pngs:
        assert_png(out_dir / png)
        assert f"]({png})" in md


def test_report_of_a_real_study(searched, tmp_path):
    budget = TINY.budget
    md_path = write_report(searched, tmp_path, budget.max_bytes, budget.dtype)
    md = md_path.read_text()
    assert md_path == tmp_path / "report.md"

    assert "Headline" not in md  # no retrained rows, no headline
    assert_self_contained(tmp_path, ["front.png", "hypervolume.png"])

    on_front = {r.number for r in front(searched)}
    assert on_front and pareto_table_numbers(md) == on_front
    assert "| proxy WER |" in section(md, "The Pareto designs")
    maps = section(md, "Layer maps")
    assert all(f"#{n}" in maps for n in on_front) and "blocks A" in maps
    assert "| unshared |" in section(md, "The front")  # the baseline, placed against the front

    ref = reference_point("wer", budget.max_bytes)
    assert ref[0] == 1.5
    assert f"WER {ref[0]:.1%}" in section(md, "Hypervolume against trials")  # the reference it used is stated

    complete = sum(t.state == TrialState.COMPLETE for t in searched.trials)
    assert complete == 4
    assert f"Not enough trials ({complete}) to estimate importance" in md
    assert "Not measured: no design with a final proxy value has been retrained in full" in md
    summary = section(md, "Search summary")
    assert "| complete | 4 |" in summary and "| failed | 1 |" in summary
    assert "RuntimeError: out of memory (simulated)" in summary
    infeasible = sum(t.state == TrialState.PRUNED for t in searched.trials)
    assert f"{infeasible} of {len(searched.trials)} samples" in summary


def test_the_summary_quotes_the_one_infeasible_share(searched, tmp_path):
    budget = TINY.budget
    t = tally(records(searched))
    assert t["infeasible"] > 0 and t.samples == len(searched.trials)
    summary = section(write_report(searched, tmp_path, budget.max_bytes, budget.dtype).read_text(), "Search summary")
    quoted = re.search(r"(\d+) of (\d+) samples \(([\d.]+)%\) were over the budget", summary)
    assert quoted and (int(quoted[1]), int(quoted[2])) == (t["infeasible"], t.samples)
    assert float(quoted[3]) / 100 == pytest.approx(t.infeasible_share, abs=0.0005)


def test_report_with_retrained_designs_has_the_headline_and_proxy_fidelity(searched, tmp_path):
    budget = TINY.budget
    rows = retrained_rows(searched)
    best = min((r for r in rows if not r["label"]), key=lambda r: r["full_dev_wer"])

    md = write_report(searched, tmp_path, budget.max_bytes, budget.dtype, retrained=rows).read_text()
    head = section(md, "Headline: the searched design against the baselines")
    assert md.index("## Headline") < md.index("## The front")
    for wer in (best["full_test_wer"], 0.52, 0.43):  # means over seeds 0, 1, 2 (the noise cancels out)
        assert f"{wer:.1%} ± 1.0" in head
    assert f"{(0.52 - best['full_test_wer']) / 0.52:.1%} lower, beats" in head
    assert "**Yes:" in head  # 0.32 ± 0.01 against 0.52 and 0.43 ± 0.01: beyond 2 x 0.01 from both
    saved = json.loads((tmp_path / "headline.json").read_text())
    assert saved["verdict"] == "yes" and saved["searched"]["trial"] == best["number"]
    assert saved["searched"]["seeds"] == [0, 1, 2] and saved["baselines"]["paper"]["test_wer_mean"] == pytest.approx(0.43)

    seed0 = [r for r in rows if r["seed"] == 0]  # fidelity counts each design once
    proxy, full = [r["proxy_value"] for r in seed0], [r["full_dev_wer"] for r in seed0]
    fidelity = section(md, "Proxy fidelity")
    for stat in (kendalltau(proxy, full).statistic, spearmanr(proxy, full).statistic):
        assert ("n/a" if math.isnan(stat) else f"{stat:.3f}") in fidelity  # nan when a side does not vary
    assert_self_contained(tmp_path, ["front.png", "hypervolume.png", "fidelity.png"])


def test_the_html_is_the_markdown_rendered_with_every_png_embedded(searched, tmp_path):
    budget = TINY.budget
    write_report(searched, tmp_path, budget.max_bytes, budget.dtype, retrained=retrained_rows(searched))
    page = (tmp_path / "report.html").read_text()
    assert "<strong>Yes:" in page  # the verdict's bold, rendered by Markdown
    assert re.search(r"<td>RuntimeError: out of memory \(simulated\)</td>", page)
    assert "<pre><code>#" in page  # the layer maps, a fenced code block
    assert_self_contained(tmp_path, ["front.png", "hypervolume.png", "fidelity.png"])


def test_outside_text_is_shown_as_written_not_read_as_markup(searched, tmp_path):
    trials = searched.get_trials(deepcopy=True)
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    failed.user_attrs["fail_reason"] = "<oops> *not bold* `x` | a_b_ [c](d)"
    study = optuna.create_study(study_name="odd", directions=["minimize", "minimize"])
    study.add_trials(trials)
    budget = TINY.budget
    md = write_report(study, tmp_path, budget.max_bytes, budget.dtype).read_text()
    page = (tmp_path / "report.html").read_text()
    assert "<td>&lt;oops&gt; *not bold* `x` | a_b_ [c](d)</td>" in page
    assert "| failure reason |" in section(md, "Search summary")


def seeds_of(number, label, test_wers, dev=0.3, bytes=100):
    return [{"number": number, "label": label, "seed": s, "full_dev_wer": dev + 0.01 * s, "full_test_wer": w,
             "full_test_cer": 0.1, "bytes": bytes, "physical_params": bytes // 4} for s, w in enumerate(test_wers)]


def test_the_verdict_beats_only_beyond_twice_the_larger_seed_deviation():
    searched = seeds_of(3, None, [0.30, 0.32, 0.28])  # mean 0.30, std 0.02
    over = seeds_of(4, None, [0.10, 0.10, 0.10], dev=0.1, bytes=900)  # better, but over the budget: not eligible
    later = seeds_of(5, None, [0.20], dev=0.35)  # better on test, worse on dev: dev chooses, test never does
    unshared = seeds_of(0, "unshared", [0.40, 0.41, 0.39])  # 0.10 above: beyond 2 x 0.02
    paper = seeds_of(1, "paper", [0.33, 0.35, 0.31])  # 0.03 above: within 2 x 0.02
    h = headline(searched + over + later + unshared + paper, budget_bytes=500)
    assert h.best.number == 3 and h.best.std("full_test_wer") == pytest.approx(0.02)
    assert {label: c.outcome for label, c in h.comparisons.items()} == {"unshared": "beats", "paper": "within noise"}
    assert h.verdict == "within noise" and h.goal_ratio == pytest.approx(0.30 / 0.33)
    md = headline_section(h)
    assert "| searched (best mean full dev WER) | 3 |" in md and "30.0% ± 2.0" in md
    assert "**Within noise: the searched design (trial 3)" in md and "(goal: at most 0.90x, not met)" in md
    saved = headline_json(h)
    assert saved["comparisons"]["paper"]["outcome"] == "within noise" and saved["goal"]["met"] is False

    better = [r | {"full_test_wer": r["full_test_wer"] - 0.1} for r in searched]  # mean 0.20
    h = headline(better + unshared + paper, budget_bytes=500)
    assert h.verdict == "yes" and h.goal_ratio <= 0.90 and "**Yes:" in headline_section(h)
    worse = [r | {"full_test_wer": r["full_test_wer"] + 0.2} for r in searched]
    assert headline(worse + unshared + paper, budget_bytes=500).verdict == "no"


def test_a_missed_goal_comes_with_the_budget_the_baselines_use_and_the_searched_designs_proxy_standing():
    """The facts behind a missed goal: the share of the budget each baseline uses, and whether the
    search's own proxy already put the searched design behind the baselines (then the search found
    nothing better; else the proxy misranked it)."""
    def proxy(rows, value):
        return [r | {"proxy_signal": "loss", "proxy_value": value} for r in rows]
    unshared = proxy(seeds_of(0, "unshared", [0.14, 0.14, 0.16], bytes=376), 0.748)
    paper = proxy(seeds_of(1, "paper", [0.145, 0.147, 0.146], bytes=393), 0.734)
    searched = seeds_of(37, None, [0.170, 0.169, 0.169], bytes=316)
    h = headline(proxy(searched, 0.878) + unshared + paper, budget_bytes=400)
    assert h.verdict == "no" and h.goal_ratio > 0.90
    s = shortfall(h)
    assert s.budget_share == {"unshared": 0.94, "paper": 0.9825} and s.behind_on_the_proxy is True
    md = headline_section(h)
    assert "the unshared baseline fits in 94% of the budget's bytes (the paper-style design in 98%)" in md
    assert "proxy loss already put the searched design behind (0.878 against paper's 0.734)" in md

    h = headline(proxy(searched, 0.70) + unshared + paper, budget_bytes=400)
    assert shortfall(h).behind_on_the_proxy is False
    assert "proxy loss put the searched design ahead (0.7 against paper's 0.734) and full training did not" in \
        headline_section(h)
    h = headline(searched + unshared + paper, budget_bytes=400)  # rows without the proxy's value: bytes only
    assert shortfall(h).behind_on_the_proxy is None and "Why the goal is missed" in headline_section(h)
    assert "proxy" not in headline_section(h).split("Why the goal is missed")[1].split("**")[0]

    met = [r | {"full_test_wer": 0.10} for r in searched]  # 0.69x the better baseline: nothing to explain
    h = headline(proxy(met, 0.878) + unshared + paper, budget_bytes=400)
    assert h.goal_ratio <= 0.90 and shortfall(h) is None and "Why the goal is missed" not in headline_section(h)


def test_with_one_seed_there_is_no_winner_and_missing_designs_are_named():
    rows = seeds_of(3, None, [0.30]) + seeds_of(0, "unshared", [0.40]) + seeds_of(1, "paper", [0.33])
    h = headline(rows, budget_bytes=500)
    assert h.verdict == "no noise estimate" and "**No verdict yet:" in headline_section(h)
    h = headline(rows[1:], budget_bytes=500)
    assert h.verdict == "no searched design" and "No verdict: no searched design" in headline_section(h)
    h = headline(rows[:2], budget_bytes=500)
    assert h.verdict == "baseline missing" and "the paper baseline was not retrained" in headline_section(h)


def test_no_verdict_when_nothing_has_learned():
    rows = [{"number": 1, "label": None, "full_dev_wer": 1.0, "full_test_wer": 1.05, "full_test_cer": 0.9,
             "bytes": 10, "physical_params": 10},
            {"number": 2, "label": "unshared", "full_dev_wer": 1.2, "full_test_wer": 1.3, "full_test_cer": 0.9,
             "bytes": 10, "physical_params": 10},
            {"number": 3, "label": "paper", "full_dev_wer": 1.1, "full_test_wer": 1.2, "full_test_cer": 0.9,
             "bytes": 10, "physical_params": 10}]
    h = headline([r | {"seed": 0} for r in rows], budget_bytes=100)
    assert h.verdict == "nothing learned"
    assert "**No verdict: every design's test WER is at least 100%" in headline_section(h)


def test_every_field_a_shipped_space_searches_outside_sharing_is_a_decision():
    """A searched knob missing from the decisions would never show in the importance table (the
    front end's channels were missing until 2026-12-06): every searched field of ``frontend``,
    ``encoder`` and ``vocab_size`` in ``search_spaces/*.yaml`` must be one, with the design's value."""
    design = ArchConfig.load(Path("search_spaces/designs/unshared-1m-relpos.json"))
    found = decisions(design)
    assert (found["frontend.channels"], found["frontend.subsampling"], found["vocab_size"],
            found["encoder.rel_pos_buckets"]) == (32, 4, 64, 32)
    searched = {k.name for f in sorted(Path("search_spaces").glob("*.yaml")) for k in load_space(f).knobs
                if not k.fixed and k.name.startswith(("frontend.", "encoder.", "vocab_size"))}
    assert "frontend.channels" in searched  # the check has something to check
    assert searched - {"encoder.n_layers"} <= set(found)  # layers: "virtual layers"
    assert "virtual layers" in found


def test_importance_of_design_decisions_on_a_larger_study(tmp_path):
    """Importance needs more trials than a test can train: 30 designs of paper.yaml with a stand-in WER
    that depends on the feed-forward rank only. The estimate must name that decision first."""
    study, budget = stand_in_study(30), parse_budget("1M")
    complete = [r for r in records(study) if r.state == "complete"]
    importances, evaluator, _ = param_importances(complete, "wer")
    assert evaluator in ("fANOVA", "PED-ANOVA")
    assert set(importances) <= set(decisions(complete[0].arch))
    assert next(iter(importances)).startswith("low_rank.ffn_")

    md = write_report(study, tmp_path, budget.max_bytes, budget.dtype).read_text()
    table = section(md, "Importance of each design decision")
    assert evaluator in table and "| low_rank.ffn_" in table
    assert_self_contained(tmp_path, ["front.png", "hypervolume.png", "importance.png"])


def test_a_signal_other_than_wer_is_named_and_written_as_a_plain_number(tmp_path):
    study, budget = stand_in_study(6, signal="loss"), parse_budget("1M")
    md = write_report(study, tmp_path, budget.max_bytes, budget.dtype).read_text()
    table = section(md, "The Pareto designs")
    assert "| proxy loss |" in table and "WER" not in table
    values = {r.number: r.values["loss"] for r in front(study)}
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert {int(row[0]): row[8] for row in rows} == {n: f"{v:.4g}" for n, v in values.items()}
    ref = reference_point("loss", budget.max_bytes, records(study))
    assert ref[0] != 1.5 and f"loss {ref[0]:.4g}" in section(md, "Hypervolume against trials")


def test_a_failed_retrain_is_left_out_not_a_crash(tmp_path):
    study = optuna.create_study(directions=["minimize", "minimize"])
    failed = {"number": 0, "label": "unshared", "proxy_signal": "wer", "proxy_value": 1.0, "full_dev_wer": None, "full_test_wer": None,
              "full_test_cer": None, "bytes": 10, "physical_params": 10, "arch": {}}
    text = write_report(study, tmp_path, 100, "fp32", retrained=[failed]).read_text()
    assert "Headline" not in text
    assert "The study has no trials yet." in text


def test_the_report_says_which_sharing_levels_the_front_uses(searched, tmp_path):
    from nas.describe import sharing_levels

    budget = TINY.budget
    md = write_report(searched, tmp_path, budget.max_bytes, budget.dtype).read_text()
    text = section(md, "What the front shares")
    on_front = front(searched)
    for level, words in (("blocks", "repeat stored blocks"), ("low rank", "factor matrices at low rank")):
        used = sum(level in sharing_levels(r.arch) for r in on_front)
        assert f"{used} of {len(on_front)} {words}" in text
    # Against the unshared baseline: the best proxy value among the front designs no larger than it.
    unshared = next(r for r in records(searched) if r.label == "unshared")
    signal = next(k for k in unshared.values if k != "bytes")
    fitting = [r for r in on_front if r.bytes <= unshared.bytes]
    if fitting:
        best = min(fitting, key=lambda r: r.values[signal])
        better = "better than" if best.values[signal] < unshared.values[signal] else "no better than"
        assert (f"With no more bytes than the unshared baseline (trial {unshared.number}, " in text
                and f"the best front design is trial {best.number} (" in text
                and f"{best.bytes / unshared.bytes:.0%} of its bytes" in text and f"{better} the design" in text)
    else:
        assert f"No front design is as small as the unshared baseline (trial {unshared.number}, " in text
    for r in on_front:
        assert re.search(rf"^\| {r.number} \| ", text, re.MULTILINE)


def test_proxy_fidelity_ranks_only_designs_with_a_final_proxy_value():
    from nas.report.analysis import fidelity

    rows = [{"number": n, "seed": 0, "proxy_value": p, "full_dev_wer": w}
            for n, p, w in [(0, 0.9, 0.5), (1, 0.8, 0.4), (2, 0.7, 0.3), (3, None, 0.2)]]  # 3: stopped at a rung
    rows.append({"number": 1, "seed": 1, "proxy_value": 0.8, "full_dev_wer": 0.45})  # a second seed counts once
    f = fidelity(rows)
    assert [r["number"] for r in f.rows] == [0, 1, 2]
    assert f.tau == pytest.approx(1.0) and f.rho == pytest.approx(1.0)
