"""`nas bench fidelity`: its runs train in parallel processes, resume, and are ranked."""

import json

import pytest

import nas.bench.fidelity as fidelity
import nas.train
from conftest import TINY_ARCH
from nas.errors import UserError


@pytest.mark.slow
def test_runs_trained_two_at_a_time_are_ranked_and_a_second_sitting_trains_nothing(tiny_corpus_dir, tmp_path,
                                                                                   monkeypatch):
    designs = tmp_path / "designs.json"
    widths = {"thin": 8, "narrow": 16, "middle": 24, "wide": 32}
    designs.write_text(json.dumps([{"label": label, "arch": TINY_ARCH | {"encoder": TINY_ARCH["encoder"] | {"d_model": d}}}
                                   for label, d in widths.items()]))
    reference = tmp_path / "ref.yaml"  # the tiny recipe, 3x as long, under a name of its own
    reference.write_text((fidelity.ROOT / "nas/schedules/tiny.yaml").read_text()
                         .replace("name: tiny", "name: tiny-ref").replace("steps: 12", "steps: 36"))
    monkeypatch.setattr(fidelity, "DESIGNS", designs)
    args = dict(results=tmp_path / "bench", proxy="tiny", reference=str(reference), rungs=(1, 3), search_rungs=(3,),
                data=f"manifest:{tiny_corpus_dir}", threads=1)

    with pytest.raises(UserError, match="0 of 4 designs have all three runs done"):
        fidelity.bench_fidelity(**args, train=False)
    first = fidelity.bench_fidelity(**args, jobs=2)
    # Runs on a corpus other than the default live in a directory named by its spec: another
    # corpus never reads them back as its own.
    (runs_dir,) = (tmp_path / "bench").glob("runs-*")
    with pytest.raises(UserError, match="0 of 4 designs have all three runs done"):
        fidelity.bench_fidelity(**args | {"data": f"manifest:{tmp_path / 'other'}"}, train=False)
    runs = sorted(p.name for p in runs_dir.iterdir())
    assert sorted(run.rsplit("-", 1)[0] for run in runs) == sorted(
        f"{label}-{s}" for label in widths for s in ("tiny", "tiny-asha1-3", "tiny-ref"))
    assert len({run.rsplit("-", 1)[1] for run in runs}) == len(runs)  # each recipe its own hash
    for run in runs:
        m = json.loads((runs_dir / run / "metrics.json").read_text())
        assert m["steps"] == {"tiny": 12, "tiny-asha1-3": 36, "tiny-ref": 36}[run.split("-", 1)[1].rsplit("-", 1)[0]]
        assert ("test" in m) == (m["schedule"] == "tiny-ref")  # only the reference decodes test
    lengths = {row["length"] for row in first["table"]}
    # every evaluation of the stretched run, 2x between the rungs too; halving judged at search_rungs
    assert lengths == {"proxy (12 steps, annealed)", "rung 1x (12 steps)", "rung 2x (24 steps)", "rung 3x (36 steps)"}
    assert list(first["best_by_fidelity"]["asha"]["kendall_tau_by_rung"]) == ["rung 3x (36 steps)"]
    assert {row["signal"] for row in first["table"]} == set(fidelity.SIGNALS)
    assert [d["label"] for d in first["designs"]] == list(widths)
    assert "cpu, 1 threads a run" in first["setup"]
    for signal in fidelity.SIGNALS:
        assert (tmp_path / "bench" / f"fidelity-{signal}.png").is_file()

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(nas.train, "train", no_training)
    again = fidelity.bench_fidelity(**args, jobs=1)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # nan where WER does not vary

    # A sitting cut short: the designs with all three runs done are ranked, and nothing is trained.
    (unfinished,) = runs_dir.glob("middle-tiny-ref-*")
    (unfinished / "metrics.json").unlink()
    standing = fidelity.bench_fidelity(**args, train=False)
    assert standing["setup"].startswith("3 of 4 designs")
    assert [d["label"] for d in standing["designs"]] == ["thin", "narrow", "wide"]


def test_pool_workers_exit_when_the_benchmark_is_killed(tmp_path):
    """A driver killed outright leaves its pool's workers behind unless they watch for it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from nas.bench.fidelity import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=exit_with_parent, initargs=(0.1,))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True,
                            cwd=fidelity.ROOT, env=os.environ | {"PYTHONPATH": str(fidelity.ROOT)})
    worker = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = f"/proc/{worker}/status"
    for _ in range(100):  # the watch polls every 0.1 s here; give a loaded machine 20 s
        try:
            with open(status) as f:  # gone, or a zombie where nothing reaps orphans
                if "\tZ" in next(line for line in f if line.startswith("State:")):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError(f"worker {worker} outlived its killed driver")


def test_bench_md_shows_a_list_of_records_as_a_table_of_its_own_and_a_record_as_named_rows():
    from nas.bench import _markdown

    md = _markdown({"fidelity": {"setup": "3 designs", "table": [{"signal": "loss", "kendall_tau": 0.6},
                                                                 {"signal": "cer", "kendall_tau": 0.2}],
                                 "best": {"signal": "loss", "by": {"kendall_tau": 0.6}}}})
    assert "| setup | 3 designs |" in md
    assert "| signal | kendall_tau |\n| --- | --- |\n| loss | 0.6 |\n| cer | 0.2 |" in md
    assert "| best.signal | loss |\n| best.by.kendall_tau | 0.6 |" in md
    assert "[{" not in md and "{'" not in md


def _row(length, signal, tau):
    return {"length": length, "signal": signal, "kendall_tau": tau}


def test_a_fixed_proxy_takes_its_best_signal_and_halving_the_signal_best_at_its_worst_rung():
    proxy, rungs = "proxy (300 steps, annealed)", ["rung 1x (300 steps)", "rung 3x (900 steps)"]
    table = [_row(proxy, "wer", 0.5), _row(proxy, "loss", 0.4),
             _row(rungs[0], "wer", 0.3), _row(rungs[1], "wer", 0.9),  # best at one rung, worst at the other
             _row(rungs[0], "loss", 0.6), _row(rungs[1], "loss", 0.7),
             _row(rungs[0], "cer", 0.6), _row(rungs[1], "cer", float("nan"))]  # nan: no ranking at all
    best = fidelity._best_by_fidelity(table, proxy, rungs)
    assert best["fixed"] == {"signal": "wer", "kendall_tau": 0.5, "at": proxy}
    assert best["asha"] == {"signal": "loss", "worst_rung_kendall_tau": 0.6,
                            "kendall_tau_by_rung": {rungs[0]: 0.6, rungs[1]: 0.7}}
    table.append(_row(rungs[0], "train_loss", 0.6))
    table.append(_row(rungs[1], "train_loss", 0.8))  # the same worst rung: the higher mean wins
    assert fidelity._best_by_fidelity(table, proxy, rungs)["asha"]["signal"] == "train_loss"


def test_each_fidelitys_default_signal_is_the_one_the_committed_benchmark_ranked_best():
    from nas.study import BEST_SIGNAL, DEFAULT_FIDELITY, DEFAULT_OBJECTIVES

    measured = json.loads((fidelity.ROOT / "results" / "bench.json").read_text())["fidelity"]["best_by_fidelity"]
    assert BEST_SIGNAL == {f: measured[f]["signal"] for f in ("fixed", "asha")}
    assert DEFAULT_OBJECTIVES == (BEST_SIGNAL[DEFAULT_FIDELITY], "bytes")
