"""Retraining the best designs of a study in full, in parallel on Ray Tune.

Which designs: ``K`` spread along the Pareto front, the knee included, plus the baselines.
The rule (:func:`pick_spread`): on the front normalized to [0, 1] in bytes and WER, take the knee
(the design farthest below the line joining the smallest and the most accurate design), then
repeatedly the design farthest in bytes from those already taken (the extremes come first).

Each design trains with the full schedule into ``results/<study>/retrain/<design>/`` and is
evaluated on dev and test; ``results/<study>/retrained.json`` collects the results. A run that
is interrupted resumes: finished designs are kept, unfinished ones continue from their checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.cluster import corpus_config, corpus_from_config, init_ray, prepare_data, run_dir_name
from nas.errors import UserError
from nas.pareto import front

BASELINES = ("unshared", "paper")  # the labels nas.baselines gives its designs


def open_existing_study(study: str, storage: str | None, results: Path) -> optuna.Study:
    """A study that must already exist (``nas retrain``, ``report``, ``export``)."""
    from nas.study import open_storage

    if storage is None:
        db = results / study / "study.db"
        if not db.is_file():
            raise UserError(str(db), "", f"no study {study!r} here (run nas search first, or give --storage)")
        storage = f"sqlite:///{db.resolve()}"
    try:
        return optuna.load_study(study_name=study, storage=open_storage(storage))
    except KeyError:
        raise UserError("--study", "", f"no study named {study!r} in {storage.split('@')[-1]}") from None


def pick_spread(trials: list[FrozenTrial], k: int) -> list[FrozenTrial]:
    """``k`` designs spread along a front (WER = values[0], bytes = values[1]), the knee first."""
    if len(trials) <= k:
        return list(trials)
    xs = [t.values[1] for t in trials]
    ys = [t.values[0] for t in trials]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    pts = [((x - min(xs)) / span_x, (y - min(ys)) / span_y) for x, y in zip(xs, ys)]
    # The front runs from (0, high WER) to (1, low WER); the knee lies farthest below that line.
    (x0, y0), (x1, y1) = min(pts), max(pts)
    below = [((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)) for px, py in pts]
    chosen = [min(range(len(pts)), key=lambda i: below[i])]
    while len(chosen) < k:
        chosen.append(max((i for i in range(len(pts)) if i not in chosen),
                          key=lambda i: min(abs(pts[i][0] - pts[j][0]) for j in chosen)))
    return [trials[i] for i in chosen]


def designs_to_retrain(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """``top`` searched designs spread along the front, then the baselines (labelled trials)."""
    picked = pick_spread([t for t in front(study) if t.user_attrs.get("label") not in BASELINES], top)
    numbers = {t.number for t in picked}
    for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.FAIL]):
        if t.user_attrs.get("label") in BASELINES and t.number not in numbers:
            picked.append(t)
            numbers.add(t.number)
    return picked


def full_trial(config: dict) -> None:
    """Ray Tune function trainable: train one design with the full schedule, test it."""
    import torch
    from ray import tune

    from nas.config import ArchConfig
    from nas.train import load_schedule, train

    config = config["job"]
    torch.set_num_threads(config["threads"])
    corpus = corpus_from_config(config["corpus"])
    try:
        m = train(ArchConfig.from_json(config["arch"]), load_schedule(config["schedule"]), corpus,
                  config["run_dir"], threads=config["threads"], progress=False)
    except Exception as exc:  # noqa: BLE001 - reported, the other retrains go on
        tune.report({"error": f"{type(exc).__name__}: {exc}"[:500]})
        return
    tune.report({"dev_wer": m["dev"]["wer"], "test_wer": m["test"]["wer"]})


def retrain(study: optuna.Study, out: Path, top: int, schedule: str, workers: int, cpus_per_trial: int,
            address: str | None = None) -> list[dict]:
    """Retrain the chosen designs (those not yet finished) and write ``retrained.json``."""
    from ray import tune

    from nas.train import load_schedule

    out = out.resolve()  # Tune runs each trial in its own working directory

    load_schedule(schedule)
    settings = study.user_attrs["settings"]
    corpus, corpus_line = prepare_data(settings["data"])
    print(corpus_line, flush=True)
    chosen = designs_to_retrain(study, top)
    jobs = []
    for t in chosen:
        run_dir = out / "retrain" / run_dir_name(t.user_attrs["arch"], schedule)
        if not (run_dir / "metrics.json").is_file():
            jobs.append({"arch": t.user_attrs["arch"], "run_dir": str(run_dir), "schedule": schedule,
                         "threads": cpus_per_trial, "corpus": corpus_config(corpus)})
    print(f"retraining {len(jobs)} of {len(chosen)} designs with the {schedule} schedule "
          f"({len(chosen) - len(jobs)} already done); {workers} workers x {cpus_per_trial} CPU", flush=True)
    if jobs:
        init_ray(address)
        tuner = tune.Tuner(
            tune.with_resources(full_trial, {"cpu": cpus_per_trial}),
            param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=tune.RunConfig(storage_path=str((out / "tune").resolve()), verbose=0),
        )
        tuner.fit()
    rows = collect(chosen, out, schedule)
    (out / "retrained.json").write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        state = (f"full dev WER {r['full_dev_wer']:.3f}, test WER {r['full_test_wer']:.3f}"
                 if r["full_test_wer"] is not None else "FAILED: " + r.get("error", ""))
        print(f"trial {r['number']}{' (' + r['label'] + ')' if r['label'] else ''}: proxy WER "
              f"{r['proxy_wer'] if r['proxy_wer'] is None else round(r['proxy_wer'], 3)}, {state}")
    return rows


def collect(chosen: list[FrozenTrial], out: Path, schedule: str) -> list[dict]:
    rows = []
    for t in chosen:
        run_dir = out / "retrain" / run_dir_name(t.user_attrs["arch"], schedule)
        metrics_path = run_dir / "metrics.json"
        m = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        rows.append({
            "number": t.number, "label": t.user_attrs.get("label"),
            "proxy_wer": t.values[0] if t.state == TrialState.COMPLETE else None,
            "full_dev_wer": m["dev"]["wer"] if m else None, "full_test_wer": m["test"]["wer"] if m else None,
            "full_test_cer": m["test"]["cer"] if m else None, "bytes": t.user_attrs["bytes"],
            "bytes_by_dtype": {dt: t.user_attrs[f"bytes_{dt}"] for dt in ("fp32", "bf16", "int8")},
            "physical_params": t.user_attrs["physical_params"], "arch": json.loads(t.user_attrs["arch"]),
            "run_dir": str(run_dir), "schedule": schedule,
        })
    return rows


def pick_best_under(rows: list[dict], budget) -> dict:
    """The retrained design with the lowest full dev WER whose bytes fit ``budget``."""
    fitting = [r for r in rows if r["full_dev_wer"] is not None and r["bytes_by_dtype"][budget.dtype] <= budget.max_bytes]
    if not fitting:
        raise UserError("--best-under", "", f"no retrained design fits {budget.text} (retrain first, or raise the budget)")
    return min(fitting, key=lambda r: r["full_dev_wer"])


def load_retrained(out: Path) -> list[dict] | None:
    path = out / "retrained.json"
    return json.loads(path.read_text()) if path.is_file() else None


def choose_for_export(study: optuna.Study, out: Path, design: int | None, best_under=None) -> tuple:
    """The design to export, the run directory holding its weights, and its provenance.

    ``design``: a trial on the front or retrained; its full-schedule weights when it was
    retrained, else its proxy weights. ``best_under``: the retrained design with the lowest full dev
    WER that fits that budget.
    """
    from nas.config import ArchConfig

    rows = load_retrained(out) or []
    settings = study.user_attrs.get("settings", {})
    if best_under is not None:
        row = pick_best_under(rows, best_under)
        trial = study.trials[row["number"]]
    else:
        by_number = {r["number"]: r for r in rows}
        if design not in {t.number for t in study.best_trials} | set(by_number):
            raise UserError("--design", "", f"trial {design} is neither on the front nor retrained "
                            f"(front: {sorted(t.number for t in study.best_trials)})")
        trial, row = study.trials[design], by_number.get(design)
    retrained = row is not None and row["full_dev_wer"] is not None
    run_dir = Path(row["run_dir"]) if retrained else Path(trial.user_attrs["run_dir"])
    provenance = {
        "study": study.study_name, "trial": trial.number, "label": trial.user_attrs.get("label"),
        "proxy_wer": trial.values[0] if trial.values else None,
        "full_dev_wer": row["full_dev_wer"] if retrained else None,
        "full_test_wer": row["full_test_wer"] if retrained else None,
        "weights": f"{row['schedule']} schedule" if retrained else f"{settings.get('proxy')} schedule (not retrained)",
        "budget": settings.get("budget"), "data": settings.get("data"),
    }
    return ArchConfig.from_json(trial.user_attrs["arch"]), run_dir, provenance
