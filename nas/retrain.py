"""Retraining the best designs of a study in full, in parallel on Ray Tune.

Which designs: ``K`` spread along the Pareto front, the knee included, plus the baselines.
The rule (:func:`pick_spread`): on the front normalized to [0, 1] in bytes and the proxy signal,
take the knee (the design farthest below the line joining the smallest and the best design), then
repeatedly the design farthest in bytes from those already taken (the extremes come first).

Each design trains with the full schedule into ``results/<study>/retrain/<run key>/`` and is
evaluated on dev and test; ``results/<study>/retrained.json`` collects the results. A run that
is interrupted resumes: finished designs are kept, unfinished ones continue from their checkpoint.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import optuna
from tqdm import tqdm

from nas.budget import macs_per_second, parse_budget
from nas.errors import UserError
from nas.files import atomic_write
from nas.pareto import front
from nas.trials import DONE, TrialRecord, records
from nas.schedule import load_schedule
from nas.workers import Job, init_ray, prepare_data, run_dir, run_on_ray

BASELINES = ("unshared", "paper")  # the labels nas.baselines gives its designs


def pick_spread(recs: list[TrialRecord], k: int) -> list[TrialRecord]:
    """``k`` designs spread along a front (the proxy signal is the first objective), the knee first."""
    if len(recs) <= k:
        return list(recs)
    xs = [float(r.bytes) for r in recs]
    ys = [r.proxy[1] for r in recs]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    pts = [((x - min(xs)) / span_x, (y - min(ys)) / span_y) for x, y in zip(xs, ys)]
    # The front runs from (0, high signal) to (1, low signal); the knee lies farthest below that line.
    (x0, y0), (x1, y1) = min(pts), max(pts)
    below = [((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)) for px, py in pts]
    chosen = [min(range(len(pts)), key=lambda i: below[i])]
    while len(chosen) < k:
        chosen.append(max((i for i in range(len(pts)) if i not in chosen),
                          key=lambda i: min(abs(pts[i][0] - pts[j][0]) for j in chosen)))
    return [recs[i] for i in chosen]


def designs_to_retrain(study: optuna.Study, top: int) -> list[TrialRecord]:
    """``top`` searched designs spread along the front, then the baselines (labelled trials)."""
    picked = pick_spread([r for r in front(study) if r.label not in BASELINES], top)
    numbers = {r.number for r in picked}
    for r in records(study):
        if r.label in BASELINES and r.trained and r.state in DONE and r.number not in numbers:
            picked.append(r)
            numbers.add(r.number)
    return picked


def retrain(study: optuna.Study, out: Path, top: int, schedule: str, workers: int, cpus_per_trial: int,
            address: str | None = None, gpus_per_trial: float = 0, seeds: int = 1) -> list[dict]:
    """Retrain the chosen designs (those not yet finished) and write ``retrained.json``.

    With ``seeds`` > 1, the searched design with the lowest full dev WER (within the budget) and the
    baselines are then trained again with seeds 1 to ``seeds - 1`` (the schedule's seed: the
    initial weights and the batch order), so the headline can tell a difference from seed noise.
    """
    out = out.resolve()
    settings = study.user_attrs["settings"]
    corpus, corpus_line = prepare_data(settings["data"])
    print(corpus_line, flush=True)
    chosen = designs_to_retrain(study, top)
    recipe = load_schedule(schedule)

    def jobs_for(designs: list[TrialRecord], seed: int) -> list[tuple[TrialRecord, Job]]:
        s = recipe if seed == recipe.seed else recipe.model_copy(update={"seed": seed})
        return [(r, Job(arch=r.arch, schedule=s, corpus=corpus, run_dir=run_dir(out / "retrain", r.arch, s),
                        threads=cpus_per_trial, evaluate_test=True)) for r in designs]

    def run(pairs: list[tuple[TrialRecord, Job]], what: str) -> None:
        todo = [j for _, j in pairs if not (j.run_dir / "metrics.json").is_file()]
        # Longest first (by MACs per second of audio, which training time follows), so that no
        # worker is left alone with a long run at the end while the others wait idle.
        todo.sort(key=lambda j: macs_per_second(j.arch), reverse=True)
        print(f"retraining {len(todo)} of {len(pairs)} {what} with the {schedule} schedule "
              f"({len(pairs) - len(todo)} already done); {workers} workers x {cpus_per_trial} CPU", flush=True)
        if todo:
            init_ray(address)
            with tqdm(total=len(todo), desc=f"retrain {schedule}", unit="design", dynamic_ncols=True) as bar:
                run_on_ray(out, f"retrain-{study.study_name}", workers, cpus_per_trial, jobs=todo,
                           on_end=lambda job: bar.update(1), gpus_per_trial=gpus_per_trial)

    more_seeds = range(recipe.seed + 1, recipe.seed + seeds)
    pairs = jobs_for(chosen, recipe.seed)
    # The baselines' further seeds do not depend on which searched design is best, so they train
    # beside the first seeds; only the best searched design's further seeds wait for those.
    baselines = [r for r in chosen if r.label in BASELINES]
    early = [pair for seed in more_seeds for pair in jobs_for(baselines, seed)]
    again_n = f"{seeds - 1} more seed{'s' if seeds > 2 else ''}"
    run(pairs + early, f"runs of {len(chosen)} designs" + (f" (the baselines with {again_n})" if early else ""))
    rows = [_row(r, j, schedule) for r, j in pairs]
    if seeds > 1:
        budget = parse_budget(settings["budget"])
        searched = [row for row in rows if not row["label"] and row["full_dev_wer"] is not None
                    and row["bytes_by_dtype"][budget.dtype] <= budget.max_bytes]
        best = min(searched, key=lambda row: row["full_dev_wer"])["number"] if searched else None
        again = [r for r in chosen if r.number == best or r.label in BASELINES]
        more = [pair for seed in more_seeds for pair in jobs_for(again, seed)]
        run(more, f"runs of {len(again)} designs with {again_n}")
        rows += [_row(r, j, schedule) for r, j in more]
    atomic_write(out / "retrained.json", json.dumps(rows, indent=2) + "\n")
    for r in rows:
        state = (f"full dev WER {r['full_dev_wer']:.3f}, test WER {r['full_test_wer']:.3f}"
                 if r["full_test_wer"] is not None else "FAILED: " + (r.get("error") or "no metrics.json"))
        proxy = "none" if r["proxy_value"] is None else f"{r['proxy_signal']} {r['proxy_value']:.3f}"
        print(f"trial {r['number']}{' (' + r['label'] + ')' if r['label'] else ''} seed {r['seed']}: "
              f"proxy {proxy}, {state}")
    return rows


def _row(r: TrialRecord, job: Job, schedule: str) -> dict:
    """What ``retrained.json`` says of one design. Its full WERs are those of the schedule's final
    decoding (beam search with the LM when it decodes so), the greedy ones beside them."""
    metrics_path = job.run_dir / "metrics.json"
    m = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None

    def wer(split: str, key: str) -> float | None:
        return None if m is None else m[split].get(f"beam_{key}", m[split][key])

    return {
        "number": r.number, "label": r.label, "seed": job.schedule.seed,
        **dict(zip(("proxy_signal", "proxy_value"), r.proxy)),
        "full_dev_wer": wer("dev", "wer"), "full_test_wer": wer("test", "wer"), "full_test_cer": wer("test", "cer"),
        "full_test_wer_greedy": m["test"]["wer"] if m else None, "full_test_cer_greedy": m["test"]["cer"] if m else None,
        "decoding": None if m is None else ("beam + lexicon + LM" if "beam_wer" in m["test"] else "greedy"),
        "bytes": r.bytes,
        "bytes_by_dtype": r.bytes_by_dtype, "physical_params": r.physical_params,
        "arch": r.arch.model_dump(mode="json"), "run_dir": str(job.run_dir), "schedule": schedule,
    }


def pick_best_under(rows: list[dict], budget) -> dict:
    """The retrained design whose bytes fit ``budget`` with the lowest full dev WER, as a mean over
    its seeds (the headline's rule), and of its runs the one with the lowest dev WER."""
    fitting = [r for r in rows if r["full_dev_wer"] is not None and r["bytes_by_dtype"][budget.dtype] <= budget.max_bytes]
    if not fitting:
        raise UserError("--best-under", "", f"no retrained design fits {budget.text} (retrain first, or raise the budget)")
    runs: dict[int, list[dict]] = {}
    for r in fitting:
        runs.setdefault(r["number"], []).append(r)
    best = min(runs.values(), key=lambda rs: statistics.fmean(r["full_dev_wer"] for r in rs))
    return min(best, key=lambda r: r["full_dev_wer"])


def load_retrained(out: Path) -> list[dict] | None:
    path = out / "retrained.json"
    return json.loads(path.read_text()) if path.is_file() else None
