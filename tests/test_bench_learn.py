"""`nas bench learn` on a tiny scale: both recipes train, the ratio follows the curves, a rerun reads
the runs back, and a changed recipe trains anew instead of reading back the old recipe's run. `nas
bench levers` likewise: each lever's speedup is read off its own run against the reference's."""

import json

import yaml

from nas.bench.learn import bench_learn, speedup, time_to
from nas.schedule import load_schedule


def test_time_to_is_the_first_evaluation_at_or_below_the_target():
    curve = [{"train_s": 10.0, "dev_cer": 0.9}, {"train_s": 20.0, "dev_cer": 0.3}, {"train_s": 30.0, "dev_cer": 0.2}]
    assert time_to(curve, 0.30) == 20.0 and time_to(curve, 0.25) == 30.0 and time_to(curve, 0.1) is None


def test_the_speedup_is_a_ratio_or_a_lower_bound_when_the_reference_stopped_short():
    assert speedup(329.2, 100.7, 1082.1) == 3.27
    assert speedup(None, 457.7, 1082.1) == "> 2.36"  # the committed figures of 2026-11-27
    assert speedup(329.2, None, 1082.1) is None and speedup(None, None, 1082.1) is None


def _recipe(path, name, **change):
    doc = load_schedule("tiny").model_dump(mode="json") | {"name": name} | change
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_both_recipes_train_and_a_changed_recipe_trains_anew(tmp_path, tiny_corpus_dir):
    data = f"manifest:{tiny_corpus_dir}"
    old = _recipe(tmp_path / "old.yaml", "old")
    new = _recipe(tmp_path / "new.yaml", "new", peak_lr=6e-3, decode="beam")
    # Targets a tiny run can meet: any CER is at most 10, so both recipes reach it at their first
    # evaluation and the ratio is a real number; none reaches 0, so that one has no ratio.
    kw = {"results": tmp_path / "runs", "designs": ("unshared",), "budget": "100K", "eval_audio_s": 60,
          "eval_utterances": 8, "threads": 1, "targets": (10.0, 0.0)}
    figures = bench_learn(recipes=((old, data), (new, data)), **kw)
    row = figures["unshared"]
    assert row["params"] == 99_696  # the 100K unshared baseline of paper.yaml
    assert row["eval_audio_s"] == 60  # the grid its times were read on, kept with its row
    runs = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "runs").iterdir()}
    assert set(runs) == {"unshared-old", "unshared-new"}
    curves = {r: json.loads((runs[f"unshared-{name}"] / "metrics.json").read_text())
              for r, name in ((old, "old"), (new, "new"))}
    # The new recipe runs to its end and is scored on test, greedy and with beam search + LM.
    m = curves[new]
    assert row[new]["steps"] == 12 and len(m["curve"]) == 6  # every 60 s of audio: 2 steps of 30 s batches
    assert (row[new]["test_wer"], row[new]["test_beam_wer"]) == (round(m["test"]["wer"], 4),
                                                                 round(m["test"]["beam_wer"], 4))
    # The times are read off each run's own curve, and the ratio is theirs.
    for r in (old, new):
        assert row[r]["train_s_to_cer_10.00"] == curves[r]["curve"][0]["train_s"] > 0
        assert row[r]["train_s_to_cer_0.00"] is None
    assert row["speedup_to_cer_10.00"] == round(row[old]["train_s_to_cer_10.00"] / row[new]["train_s_to_cer_10.00"], 2)
    assert row["speedup_to_cer_0.00"] is None

    # Run again: both runs are read back, not trained again.
    stamps = {k: (p / "metrics.json").stat().st_mtime_ns for k, p in runs.items()}
    assert bench_learn(recipes=((old, data), (new, data)), **kw) == figures
    assert {k: (p / "metrics.json").stat().st_mtime_ns for k, p in runs.items()} == stamps

    # Where the reference stops is part of its run: another cap trains it anew, not the new recipe.
    bench_learn(recipes=((old, data), (new, data)), **kw | {"cap": 7.0})
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "runs").iterdir())
    assert names == ["unshared-new", "unshared-old", "unshared-old"]
    assert (runs["unshared-new"] / "metrics.json").stat().st_mtime_ns == stamps["unshared-new"]

    # Change the new recipe under the same name: it trains into a directory of its own (and the
    # reference stops where the new curve says), and no run of before is written over.
    _recipe(tmp_path / "new.yaml", "new", peak_lr=4e-3, decode="beam")
    bench_learn(recipes=((old, data), (new, data)), **kw)
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "runs").iterdir())
    assert names.count("unshared-new") == 2
    assert {k: (p / "metrics.json").stat().st_mtime_ns for k, p in runs.items()} == stamps


def test_each_lever_is_timed_against_the_recipe_as_it_is_trained_in_the_same_run(tmp_path, tiny_corpus_dir):
    from nas.bench.learn import bench_levers

    tiny = _recipe(tmp_path / "tiny.yaml", "tiny")
    # A target every run meets at its first evaluation, so each speedup is a ratio of two times.
    kw = {"results": tmp_path / "levers", "schedule": tiny, "data": f"manifest:{tiny_corpus_dir}", "budget": "100K",
          "levers": ({"peak_lr": 6e-3}, {"batch_frames": 1500}), "target": 10.0, "eval_audio_s": 60,
          "eval_utterances": 8, "threads": 1}
    figures = bench_levers(**kw)
    rows = figures["unshared"]
    assert [r["lever"] for r in rows] == ["tiny", "peak_lr=0.006", "batch_frames=1500"]
    runs = {p.name.rsplit("-", 1)[0]: json.loads((p / "metrics.json").read_text())
            for p in (tmp_path / "levers").iterdir()}
    assert set(runs) == {f"unshared-{r['lever']}" for r in rows}
    reference = runs["unshared-tiny"]["curve"][0]
    assert rows[0]["train_s_to_cer_10.00"] == reference["train_s"] and rows[0]["speedup"] == 1.0
    for row in rows[1:]:
        m = runs[f"unshared-{row['lever']}"]
        assert m["stopped_early"] and "test" not in m  # stopped at the target, never scored on test
        assert row["train_s_to_cer_10.00"] == m["curve"][0]["train_s"]
        assert row["speedup"] == round(reference["train_s"] / m["curve"][0]["train_s"], 2)
    # 30 s batches evaluated every 60 s of audio: 2 steps; 15 s batches: 4.
    assert [r["steps"] for r in rows] == [2, 2, 4]
    stamps = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in (tmp_path / "levers").iterdir()}
    assert bench_levers(**kw) == figures  # read back, not trained again
    assert {p.name: (p / "metrics.json").stat().st_mtime_ns for p in (tmp_path / "levers").iterdir()} == stamps


def test_a_design_lever_changes_the_design_by_its_dotted_path_and_never_goes_over_the_budget():
    import pytest

    from nas.baselines import baselines
    from nas.bench.learn import LEVERS, SPACE, _changed
    from nas.budget import count, parse_budget
    from nas.space import load_space

    budget = parse_budget("1M")
    arch = dict(baselines(load_space(SPACE), budget))["unshared"]
    full = load_schedule("full")
    # A schedule lever leaves the design as it is (so its run's key is the one it always had).
    same, s = _changed(arch, full, {"peak_lr": 6e-3}, budget)
    assert same is arch and s.peak_lr == 6e-3 and s.model_dump() == full.model_dump() | {"peak_lr": 6e-3}
    # A design lever sets the dotted field and nothing else, and the schedule's fields beside it.
    changed, s = _changed(arch, full, {"frontend.subsampling": 8, "vocab_size": 256, "tokenizer": "bpe"}, budget)
    assert (changed.frontend.subsampling, changed.vocab_size, s.tokenizer) == (8, 256, "bpe")
    assert changed.model_dump() == arch.model_dump() | {"vocab_size": 256,
                                                        "frontend": arch.frontend.model_dump() | {"subsampling": 8}}
    # Every lever of the benchmark is within its 1M budget, counted exactly.
    for change in LEVERS:
        assert budget.fits(count(_changed(arch, full, change, budget)[0]))
    with pytest.raises(ValueError, match="over 1M"):  # 4,096 output units at d=96: 394K more parameters
        _changed(arch, full, {"vocab_size": 4096}, budget)
    with pytest.raises(ValueError, match="neither a schedule field nor a design field"):
        _changed(arch, full, {"frontend.subsample": 6}, budget)
    with pytest.raises(Exception, match="subsampling"):  # validated: 5x is no front end
        _changed(arch, full, {"frontend.subsampling": 5}, budget)


def test_a_design_measured_in_an_earlier_sitting_keeps_its_row_and_its_own_date(tmp_path, tiny_corpus_dir):
    """`nas bench learn --designs` one design per sitting: `results/bench.json` keeps the designs
    measured before, each dated by its own sitting, so a row never reads as measured later."""
    from nas.bench import run

    data = f"manifest:{tiny_corpus_dir}"
    recipes = ((_recipe(tmp_path / "old.yaml", "old"), data), (_recipe(tmp_path / "new.yaml", "new"), data))
    kw = {"recipes": recipes, "budget": "100K", "eval_audio_s": 60, "eval_utterances": 8, "threads": 1,
          "targets": (10.0,)}
    first = run("learn", tmp_path, learn=kw | {"designs": ("unshared",)})["learn"]
    assert first["unshared"]["measured"] == first["measured"]
    bench = tmp_path / "bench.json"
    results = json.loads(bench.read_text())
    results["learn"]["unshared"]["measured"] = results["learn"]["measured"] = "2026-12-05 10:00"  # a sitting of before
    bench.write_text(json.dumps(results))
    learn = run("learn", tmp_path, learn=kw | {"designs": ("paper",)})["learn"]
    assert learn["unshared"] == first["unshared"] | {"measured": "2026-12-05 10:00"}  # kept as it was
    assert learn["paper"]["measured"] == learn["measured"] != "2026-12-05 10:00"
    md = (tmp_path / "bench.md").read_text()
    assert "| unshared.measured | 2026-12-05 10:00 |" in md and f"| paper.measured | {learn['measured']} |" in md
