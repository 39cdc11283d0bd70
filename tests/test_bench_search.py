"""`nas bench search`: it runs end to end on a tiny space, and a second sitting resumes it."""

import json

import pytest

from nas.bench.search import bench_search
from nas.schedule import Rungs


@pytest.mark.slow
def test_the_search_benchmark_resumes_and_measures_nothing_twice(tiny_corpus_dir, tmp_path):
    # A minute and a half each: the fixed proxy trains 9x the tiny schedule, and a trial still
    # running when the time is up fails, so a shorter window may evaluate nothing on a slow machine.
    args = dict(trials=2, seeds=1, space="tiny.yaml", budget="60K", proxy="tiny", data=f"manifest:{tiny_corpus_dir}",
                parallel_trials=2, objective="cer", fidelity_minutes=1.5, reference="tiny", results=tmp_path / "b")
    first = bench_search(**args)
    (out,) = (tmp_path / "b").iterdir()  # this run's settings' own directory
    assert len(first["hypervolume_tpe"]) == len(first["hypervolume_random"]) == 2
    modes = first["fidelity_fixed_vs_asha"]
    for mode in ("fixed", "asha"):
        assert modes[mode]["designs_evaluated"] >= modes[mode]["complete"] >= 1
        assert "best_arch" not in modes[mode]  # kept on disk for a resumed sitting, not in the figures
        run = out / modes[mode]["reference_run"] / "metrics.json"
        test = json.loads(run.read_text())["test"]  # tiny decodes greedily: no beam WER
        assert "beam_wer" not in test and modes[mode]["best_reference_test_wer"] == round(test["wer"], 4)
    # A design that both modes chose is retrained once; distinct designs each get a run.
    # each part is named by what it trains: the fixed proxy's length, halving's rungs (the default)
    names = {"fixed": "fixed-x9", "asha": Rungs().tag}
    assert names["asha"] == "asha2-4-9" and modes["asha"]["rungs"] == [2, 4, 9]
    chosen = {m: json.loads((out / f"{names[m]}-1.5min.json").read_text())["best_arch"] for m in names}
    same = chosen["fixed"] == chosen["asha"]
    assert modes["fixed"]["reference_run"] == "reference-fixed-x9-1.5min"
    assert modes["asha"]["reference_run"] == ("reference-fixed-x9-1.5min" if same else "reference-asha2-4-9-1.5min")
    assert (out / "reference-asha2-4-9-1.5min").exists() != same
    # The fixed proxy trains every design as long as halving's last rung (tiny's steps, 9x).
    from nas.schedule import load_schedule
    fixed = load_schedule(str(out / "tiny-x9.yaml"))
    assert fixed.steps == 9 * load_schedule("tiny").steps
    studies = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/study.db")}
    # The designs still training when a timed part's time ran out end as FAILED, with a reason.
    import optuna
    for mode in ("fixed", "asha"):
        study = f"{names[mode]}-1.5min"
        trials = optuna.load_study(study_name=study, storage=f"sqlite:///{out / study / 'study.db'}").get_trials()
        assert not [t for t in trials if t.state.name == "RUNNING"]
        assert all(t.user_attrs.get("fail_reason") for t in trials if t.state.name == "FAIL"
                   and "invalid" not in t.user_attrs)  # the time budget's, or a worker's failure
    references = {p: p.stat().st_mtime_ns for p in out.glob("reference-*/*") if p.is_file()}

    # A second sitting: the timed parts are read back (their studies untouched), the sampler
    # studies are complete, so every figure is the same.
    again = bench_search(**args)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    timed = [n for n in studies if n.startswith(("parallel", "fixed", "asha"))]
    assert timed and all((out / n / "study.db").stat().st_mtime_ns == studies[n] for n in timed)
    assert references and {p: p.stat().st_mtime_ns for p in references} == references  # not retrained

    # Without the timed parts the same directory is read: the sampler studies can be measured first.
    alone = bench_search(**args | {"fidelity_minutes": 0})
    assert "fidelity_fixed_vs_asha" not in alone and alone["hypervolume_tpe"] == first["hypervolume_tpe"]
    assert list((tmp_path / "b").iterdir()) == [out]

    # Other settings measure into a directory of their own: nothing measured before is lost.
    bench_search(**args | {"trials": 1, "fidelity_minutes": 0})
    assert len(list((tmp_path / "b").iterdir())) == 2 and (out / "fixed-x9-1.5min.json").is_file()

    # Other rungs with the same last one: halving is measured under its own name, and compared with
    # the fixed proxy measured before (read back); its sampler studies are its own too.
    other = bench_search(**args | {"rungs": Rungs((2, 9))})["fidelity_fixed_vs_asha"]
    assert other["fixed"] == first["fidelity_fixed_vs_asha"]["fixed"] and other["asha"]["rungs"] == [2, 9]
    assert (out / "fixed-x9-1.5min" / "study.db").stat().st_mtime_ns == studies["fixed-x9-1.5min"]
    assert (out / "asha2-9-1.5min.json").is_file() and (out / "tpe-0-asha2-9" / "study.db").is_file()
