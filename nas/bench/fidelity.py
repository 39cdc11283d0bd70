"""Proxy fidelity: does a short training rank designs as a long one does?

The designs are fixed and committed (``search_spaces/fidelity.json``): the two baselines of
``paper.yaml`` at 1M, and designs drawn from ``paper.yaml`` with a fixed seed, two in each quarter
of 0.2M-1M physical parameters, picked to spread over the four sharing levels. Each design is
trained three ways:

- the ``proxy`` schedule (what ``--fidelity fixed`` trains);
- the proxy stretched to the last rung of successive halving (what ``--fidelity asha`` trains);
  it is evaluated after every proxy's steps, which gives the signals a rung would read at 1x,
  2x, ... 9x the proxy's steps, so that any rungs up to the last can be judged from the same runs;
- the reference schedule (``full`` by default), at least ten times the proxy's compute.

For every candidate signal (dev loss per token, dev CER, dev WER, the mean training loss) at every
proxy length, the benchmark reports Kendall's τ and Spearman's ρ against the reference's dev WER
(beam search with the LM when the reference decodes so), the proxy's cost as a share of the
reference's training time, and the τ of ranking by physical parameters alone (more is better),
the baseline a proxy must beat. Each run lives in ``results/bench-fidelity/runs/<design>-<schedule>-<hash>``
(the hash is :func:`nas.workers.run_key`'s, so a changed recipe starts new runs) and resumes:
the benchmark can be finished over several sittings.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import warnings
from pathlib import Path

from nas.study import SIGNALS  # the proxy signals a search can rank by, and their keys in a run's curve

ROOT = Path(__file__).resolve().parents[2]
DESIGNS = ROOT / "search_spaces" / "fidelity.json"
BINS = ((200_000, 400_000), (400_000, 600_000), (600_000, 800_000), (800_000, 1_000_000))


def draw_designs(seed: int = 0, per_bin: int = 2, samples: int = 4000) -> list[dict]:
    """The baselines, then ``per_bin`` designs of paper.yaml per size bin, spread over sharing levels:
    in each bin, first the design using the most levels, then the one whose levels differ most."""
    from nas.baselines import baselines
    from nas.budget import count, parse_budget
    from nas.describe import sharing_levels
    from nas.space import load_space

    space, budget = load_space(ROOT / "search_spaces" / "paper.yaml"), parse_budget("1M")
    out = [{"label": label, "arch": a.model_dump(mode="json")} for label, a in baselines(space, budget)]
    rng = random.Random(seed)
    pool: list[list] = [[] for _ in BINS]
    for _ in range(samples):
        arch = space.random(rng)
        params = count(arch).physical
        for i, (lo, hi) in enumerate(BINS):
            if lo <= params < hi or (hi == budget.max_params and params == hi):
                pool[i].append((arch, set(sharing_levels(arch))))
    for i, candidates in enumerate(pool):
        chosen: list = []
        for _ in range(per_bin):
            left = [c for c in candidates if all(c[0] != a for a, _ in chosen)]
            if not left:
                break
            if not chosen:
                pick = max(left, key=lambda c: len(c[1]))
            else:
                pick = max(left, key=lambda c: len(c[1] ^ set().union(*(lv for _, lv in chosen))))
            chosen.append(pick)
        out += [{"label": f"drawn-{i}{'ab'[j]}", "arch": a.model_dump(mode="json")} for j, (a, _) in enumerate(chosen)]
    return out


def load_designs() -> list[tuple[str, object]]:
    """The committed designs (written by :func:`draw_designs` on first use)."""
    from nas.config import ArchConfig
    from nas.files import atomic_write

    if not DESIGNS.is_file():
        atomic_write(DESIGNS, json.dumps(draw_designs(), indent=1) + "\n")
    return [(d["label"], ArchConfig.from_dict(d["arch"], source=str(DESIGNS))) for d in json.loads(DESIGNS.read_text())]


def bench_fidelity(results: Path = Path("results/bench-fidelity"), proxy: str = "proxy", reference: str = "full",
                   rungs: tuple[int, ...] = (1, 3, 9), search_rungs: tuple[int, ...] | None = None,
                   data: str = "synth", threads: int = 2, jobs: int = 1, train: bool = True) -> dict:
    """Train every design's three runs that are not done yet (``jobs`` at a time, each in its own
    process with ``threads`` threads; on a GPU machine they share the GPU), then rank. With
    ``train=False``, only rank the designs whose three runs are done: where a benchmark run over
    several sittings stands (its ``setup`` says how many designs are in).

    The runs are trained up to ``rungs``' last; successive halving's signal is chosen by its τ at
    ``search_rungs`` (by default the rungs a search runs, :class:`nas.schedule.Rungs`), read from
    the same runs."""
    from scipy.stats import kendalltau, spearmanr

    from nas.budget import count
    from nas.describe import sharing_levels
    from nas.errors import UserError
    from nas.schedule import Rungs, load_schedule
    from nas.workers import prepare_data, run_key

    base, ref = load_schedule(proxy), load_schedule(reference)
    stretched = Rungs(rungs).schedule(base)
    search_rungs = search_rungs or Rungs().multiples
    if search_rungs[-1] > rungs[-1]:
        raise ValueError(f"rungs {search_rungs} reach past the runs' last rung, {rungs[-1]}x")
    runs = runs_dir(Path(results), data)
    designs = load_designs()
    # A run's directory names its recipe's hash too: a change to a schedule (or to a design)
    # trains it anew instead of reading the metrics of the recipe before.
    plan = [(label, arch, name, schedule, runs / f"{label}-{schedule.name}-{run_key(arch, schedule)[:8]}")
            for label, arch in designs
            for name, schedule in (("proxy", base), ("asha", stretched), ("reference", ref))]
    pending = {p[4]: p for p in sorted(plan, key=lambda p: p[2] == "reference")}  # one run per directory,
    # the reference's where a schedule is both (it also decodes test)
    if train:
        corpus, summary = prepare_data(data)  # once, here: not in each of the jobs
        print(f"  {summary}", flush=True)
        _train_all([p for out, p in pending.items() if not (out / "metrics.json").is_file()], corpus, threads, jobs)
    done = [(label, arch) for label, arch in designs
            if all((p[4] / "metrics.json").is_file() for p in plan if p[0] == label)]
    if len(done) < 3:
        raise UserError(str(runs), "", f"{len(done)} of {len(designs)} designs have all three runs done: "
                                       "too few to rank (run the benchmark without --no-train to train them)")
    rows = []
    for label, arch in done:
        row = {"label": label, "params": count(arch).physical, "levels": sharing_levels(arch)}
        for _, _, name, schedule, out in (p for p in plan if p[0] == label):
            row[name] = m = json.loads((out / "metrics.json").read_text())
            print(f"  {label} {schedule.name}: dev WER {m['dev']['wer']:.3f}, {m['train_seconds']:.0f} s", flush=True)
        rows.append(row)

    def reference_wer(row) -> float:
        dev = row["reference"]["dev"]
        return dev.get("beam_wer", dev["wer"])

    target = [reference_wer(r) for r in rows]
    ref_s = sum(r["reference"]["curve"][-1]["train_s"] for r in rows)
    # Each proxy length: where its signals are read in a row's runs, and its training seconds.
    proxy_length = f"proxy ({base.steps} steps, annealed)"

    def rung(m: int) -> str:
        return f"rung {m}x ({base.steps * m} steps)"

    # every evaluation of the stretched run: where a rung at that multiple would read its signal
    rung_lengths = {rung(m): base.steps * m for m in range(1, rungs[-1] + 1)}
    lengths = {proxy_length: (lambda r: r["proxy"]["curve"][-1], lambda r: r["proxy"]["curve"][-1]["train_s"])}
    for length, step in rung_lengths.items():
        lengths[length] = (lambda r, s=step: _at(r["asha"], s), lambda r, s=step: _at(r["asha"], s)["train_s"])
    table = []
    for length, (point_of, seconds_of) in lengths.items():
        cost = sum(seconds_of(r) for r in rows)
        for signal, key in SIGNALS.items():
            values = [point_of(r)[key] for r in rows]
            table.append({"length": length, "signal": signal, **_rank(values, target, kendalltau, spearmanr),
                          "cost_share": round(cost / ref_s, 4)})
    by_size = _rank([-r["params"] for r in rows], target, kendalltau, spearmanr)
    best = max(table, key=_tau)
    by_fidelity = _best_by_fidelity(table, proxy_length, [rung(m) for m in search_rungs])
    plotted = [proxy_length] + [rung(m) for m in rungs]
    _plots(rows, target, {k: lengths[k] for k in plotted}, Path(results))
    return {
        "setup": f"{len(rows)}{'' if len(rows) == len(designs) else f' of {len(designs)}'} designs of {DESIGNS.name}; proxy {proxy}, rungs {rungs}, reference {reference} "
                 f"(dev WER, {'beam + LM' if 'beam_wer' in rows[0]['reference']['dev'] else 'greedy'}); "
                 f"trained on {_where(rows)}",
        "designs": [{"label": r["label"], "params": r["params"], "levels": list(r["levels"]),
                     "reference_dev_wer": round(t, 4)} for r, t in zip(rows, target)],
        "table": table,
        "params_kendall_tau": by_size["kendall_tau"], "params_spearman_rho": by_size["spearman_rho"],
        "best": {k: best[k] for k in ("length", "signal", "kendall_tau", "spearman_rho", "cost_share")},
        "best_by_fidelity": by_fidelity,
        "reference_train_seconds": round(ref_s),
    }


def _tau(row: dict) -> float:
    return -2.0 if math.isnan(row["kendall_tau"]) else row["kendall_tau"]


def _best_by_fidelity(table: list[dict], proxy: str, rungs: list[str]) -> dict:
    """The signal each ``--fidelity`` should rank by. A fixed proxy reads its signal once, at the
    proxy's end: the best τ there. Successive halving reads the same signal at every rung, to stop
    designs at the lower ones and to rank the complete ones at the last: the signal whose worst τ
    over the rungs is highest (a tie goes to the higher mean over the rungs)."""
    fixed = max((t for t in table if t["length"] == proxy), key=_tau)
    by_rung: dict[str, dict[str, dict]] = {}  # signal -> rung -> its row
    for t in table:
        if t["length"] in rungs:
            by_rung.setdefault(t["signal"], {})[t["length"]] = t
    taus = {s: [_tau(rows[r]) if r in rows else -2.0 for r in rungs] for s, rows in by_rung.items()}
    asha = max(taus, key=lambda s: (min(taus[s]), statistics.mean(taus[s])))
    return {"fixed": {"signal": fixed["signal"], "kendall_tau": fixed["kendall_tau"], "at": proxy},
            "asha": {"signal": asha, "worst_rung_kendall_tau": min(by_rung[asha][r]["kendall_tau"] for r in rungs),
                     "kendall_tau_by_rung": {r: by_rung[asha][r]["kendall_tau"] for r in rungs}}}


def _train_all(plan: list, corpus, threads: int, jobs: int) -> None:
    """Train the runs of ``plan``: one after the other, or ``jobs`` at a time in processes of their own
    (spawned: CUDA cannot be forked). There, a run that fails is reported and the others go on; the
    benchmark then stops with the failures named, and running it again retries them from their
    checkpoints."""
    from nas.train import train

    # A step's cost grows with depth. The cheapest go first, also in parallel: the benchmark is
    # stopped and resumed over several sittings (or cut by a GPU loan's deadline), and its short runs
    # done early already tell something. (Longest-first would balance one sitting's jobs better.)
    plan = sorted(plan, key=lambda p: p[3].steps * p[1].encoder.n_layers)
    if jobs <= 1:
        for label, arch, name, schedule, out in plan:
            train(arch, schedule, corpus, out, threads=threads, progress=True, evaluate_test=name == "reference")
        return
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from nas.errors import UserError

    print(f"  training {len(plan)} runs, {jobs} at a time", flush=True)
    t0, failed = time.perf_counter(), []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent) as pool:
        futures = {pool.submit(train, arch, schedule, corpus, out, threads=threads, progress=False,
                               evaluate_test=name == "reference"): out.name
                   for _, arch, name, schedule, out in plan}
        for done in as_completed(futures):
            try:
                m = done.result()
                print(f"  {futures[done]} done at {time.perf_counter() - t0:.0f} s: dev WER {m['dev']['wer']:.3f}, "
                      f"{m['train_seconds']:.0f} s of training", flush=True)
            except Exception as exc:  # noqa: BLE001 - one run's failure must not lose the others
                failed.append(futures[done])
                print(f"  {futures[done]} failed: {type(exc).__name__}: {exc}", flush=True)
    if failed:
        raise UserError(str(plan[0][4].parent), "", f"{len(failed)} runs failed ({', '.join(failed)}); "
                        "run the benchmark again to retry them from their checkpoints")


def runs_dir(results: Path, data: str) -> Path:
    """Runs on the default corpus live in ``runs/``; on any other, in a directory named by its
    spec's hash, so that ``--data`` never reads back runs trained on other data as its own."""
    return results / ("runs" if data == "synth" else f"runs-{hashlib.sha256(data.encode()).hexdigest()[:8]}")


def exit_with_parent(poll_s: float = 2.0) -> None:
    """A pool worker's initializer: the worker exits once the process that started it is gone.

    A benchmark stopped by a signal (``kill``, a session's end) ends without shutting its pool
    down, and the workers would go on training, unseen, on the cores the next run is timed on.
    The standard library has no portable parent-death signal, hence the watch thread."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # checkpoints are written atomically: the last one stays whole

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _where(rows: list[dict]) -> str:
    runs = [r[k] for r in rows for k in ("proxy", "asha", "reference")]
    devices = sorted({m.get("device", "?") for m in runs})
    threads = sorted({m.get("threads", 0) for m in runs})
    return f"{'/'.join(devices)}, {'/'.join(map(str, threads))} threads a run"


def _at(m: dict, step: int) -> dict:
    return next(p for p in m["curve"] if p["step"] == step)


def _rank(values, target, kendalltau, spearmanr) -> dict:
    with warnings.catch_warnings():  # a constant side gives nan, reported as such
        warnings.simplefilter("ignore")
        tau, tau_p = kendalltau(values, target)
        rho, rho_p = spearmanr(values, target)
    return {"kendall_tau": round(float(tau), 3), "kendall_p": round(float(tau_p), 4),
            "spearman_rho": round(float(rho), 3), "spearman_p": round(float(rho_p), 4)}


def _plots(rows, target, lengths, out: Path) -> None:
    """One scatter per signal: its value at each proxy length against the reference dev WER."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    for signal, key in SIGNALS.items():
        fig = Figure(figsize=(4 * len(lengths), 3.6), dpi=100, layout="constrained")
        axes = fig.subplots(1, len(lengths), squeeze=False)[0]
        for ax, (length, (point_of, _)) in zip(axes, lengths.items()):
            xs = [point_of(r)[key] for r in rows]
            ax.scatter(xs, target, s=24)
            for x, y, r in zip(xs, target, rows):
                ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(f"{signal} at {length}", fontsize=8)
            ax.set_ylabel("reference dev WER", fontsize=8)
            ax.grid(alpha=0.3)
        fig.savefig(out / f"fidelity-{signal}.png")
