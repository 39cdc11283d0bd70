"""Benchmarks. Each prints figures measured in one run, as ratios against a reference measured
in the same run (these machines are noisy, so no absolute threshold is ever asserted), and
adds them to ``results/bench.json`` and ``results/bench.md``.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchaudio

from nas.budget import count
from nas.config import ArchConfig
from nas.model import ConformerCTC, Subsampling
from nas.study import is_infeasible

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "paper.yaml"


def bench_budget(n: int = 5000, n_models: int = 50, seed: int = 0) -> dict:
    """Designs per second of the budget arithmetic, against building each model and counting
    its unique parameters (the reference the arithmetic replaces)."""
    from nas.space import load_space

    space = load_space(SPACE)
    rng = random.Random(seed)
    archs = [space.random(rng) for _ in range(n)]
    count(archs[0])  # warm imports and caches
    t0 = time.perf_counter()
    counts = [count(a).physical for a in archs]
    arithmetic = n / (time.perf_counter() - t0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    built = [ConformerCTC(a).num_params() for a in archs[:n_models]]
    reference = n_models / (time.perf_counter() - t0)
    assert built == counts[:n_models], "budget arithmetic disagrees with the built model"
    return {
        "designs_per_s": round(arithmetic),
        "built_models_per_s": round(reference, 1),
        "speedup_vs_building": round(arithmetic / reference),
        "goal_designs_per_s": 10_000,
    }


def _train_rate(model, batch: int = 16, seconds: float = 4.0, steps: int = 6, vocab: int = 64) -> float:
    """Audio seconds trained per wall second: CTC forward, backward and an AdamW step on random
    log-mels (the data pipeline is not part of the model's cost)."""
    g = torch.Generator().manual_seed(0)
    frames = int(seconds * 100)
    feats = torch.randn(batch, frames, 80, generator=g)
    lengths = torch.full((batch,), frames)
    targets = torch.randint(1, vocab, (batch, 40), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        log_probs, out_lens = model(feats, lengths)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lens, torch.full((batch,), 40))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seconds * steps / (time.perf_counter() - t0)


class TorchaudioCTC(torch.nn.Module):
    """torchaudio's Conformer between the same front end and head as ours: the reference."""

    def __init__(self, arch):
        super().__init__()
        e = arch.encoder
        self.frontend = Subsampling(arch.frontend.n_mels, arch.frontend.channels, e.d_model)
        self.encoder = torchaudio.models.Conformer(e.d_model, e.n_heads, e.ffn_dim, e.n_layers, e.conv_kernel,
                                                   dropout=0.1)
        self.head = torch.nn.Linear(e.d_model, arch.vocab_size)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, feats, lengths):
        x, lengths = self.frontend(feats, lengths)
        x, lengths = self.encoder(self.dropout(x), lengths)
        return self.head(x).log_softmax(-1), lengths


def bench_train(rounds: int = 3) -> dict:
    """(a) the no-sharing design against torchaudio's Conformer of the same dimensions;
    (b) low-rank feed-forward at rank d/4 against the same design at full rank.
    Rounds alternate the two models so that machine noise hits both alike."""
    torch.manual_seed(0)
    plain = ArchConfig.load(SPACE.parent / "designs" / "unshared-d96.json")
    d = plain.encoder.d_model
    doc = plain.model_dump()
    doc["sharing"]["low_rank"]["ffn_in"]["rank"] = doc["sharing"]["low_rank"]["ffn_out"]["rank"] = d // 4
    low_rank = ArchConfig.from_dict(doc)
    models = {"ours": ConformerCTC(plain), "torchaudio": TorchaudioCTC(plain),
              "full_rank": ConformerCTC(plain), "low_rank": ConformerCTC(low_rank)}
    rates = {k: [] for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(_train_rate(model))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "threads": torch.get_num_threads(),
        "design": f"unshared d={d}, {plain.encoder.n_layers} layers, {count(plain).physical:,} params",
        "ours_audio_s_per_s": round(med["ours"], 1),
        "torchaudio_audio_s_per_s": round(med["torchaudio"], 1),
        "ratio_ours_vs_torchaudio": round(med["ours"] / med["torchaudio"], 3),
        "full_rank_audio_s_per_s": round(med["full_rank"], 1),
        "low_rank_ffn_audio_s_per_s": round(med["low_rank"], 1),
        "ratio_low_rank_vs_full_rank": round(med["low_rank"] / med["full_rank"], 3),
        "macs_ratio_low_vs_full": round(count(low_rank).macs_per_second / count(plain).macs_per_second, 3),
    }


# Proxy WERs of barely trained models sit around 1.0 and above (insertions), so the hypervolume's
# reference WER is 1.5: a reference at 1.0 would give most designs no area at all.
HV_REF_WER = 1.5


def bench_search(trials: int = 12, seeds: int = 3, space: str = "paper.yaml", budget: str = "1M",
                 proxy: str = "proxy", data: str = "synth", parallel_trials: int = 4,
                 results: Path = Path("results/bench-search")) -> dict:
    """The default sampler (TPE) against random sampling on the same space, budget and proxy, over
    ``seeds`` seeds and ``trials`` trials each: hypervolume of (WER, bytes) after each trial, with
    no baselines enqueued (they would be the same first trials for both). Then trials per hour for
    2 workers x 1 CPU against 1 worker x 2 CPUs on the same designs (same seed), and the share of a
    trial's wall time that is Ray and Optuna overhead: from Optuna's ask to its tell, everything
    outside the trainer (worker start, imports, scheduling, storage)."""
    from nas.budget import parse_budget
    from nas.pareto import hypervolume_curve
    from nas.search import SearchSettings, run_search
    from nas.space import load_space

    sp, b = load_space(SPACE.parent / space), parse_budget(budget)
    results = Path(results)
    shutil.rmtree(results, ignore_errors=True)  # every figure comes from this run
    ref = (HV_REF_WER, float(b.max_bytes))

    def search(study: str, **kw) -> list:
        settings = SearchSettings(space=sp, budget=b, study=study, data=data, proxy=proxy, results=results,
                                  baselines=False, **kw)
        return run_search(settings).get_trials(deepcopy=False)

    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    overhead, waste = [], {"tpe": [], "random": []}
    for seed in range(seeds):
        for sampler in curves:
            done = search(f"{sampler}-{seed}", trials=trials, sampler=sampler, seed=seed)
            curves[sampler].append(hypervolume_curve(done, ref)[:trials])
            waste[sampler].append(sum(is_infeasible(t) for t in done) / len(done))
            overhead += [1 - t.user_attrs["trainer_seconds"] / t.duration.total_seconds() for t in done
                         if t.user_attrs.get("trainer_seconds") and t.duration]
    mean = {k: [statistics.mean(c[i] for c in v if len(c) > i) for i in range(trials)] for k, v in curves.items()}
    target = mean["random"][-1]
    reach = next((i + 1 for i, hv in enumerate(mean["tpe"]) if hv >= target), None)
    rates = {}
    for workers, cpus in ((2, 1), (1, 2)):
        t0 = time.perf_counter()
        search(f"parallel-{workers}x{cpus}", trials=parallel_trials, workers=workers, cpus_per_trial=cpus, seed=0)
        rates[f"{workers}x{cpus}"] = parallel_trials / ((time.perf_counter() - t0) / 3600)
    return {
        "setup": f"{space} at {budget}, proxy {proxy}, data {data}; hypervolume of (WER, bytes) normalized "
                 f"to [0, {HV_REF_WER}] x [0, budget bytes], mean over seeds",
        "trials_per_run": trials, "seeds": seeds,
        "hypervolume_tpe": [round(x / (ref[0] * ref[1]), 4) for x in mean["tpe"]],
        "hypervolume_random": [round(x / (ref[0] * ref[1]), 4) for x in mean["random"]],
        "tpe_trials_to_reach_random_final": reach, "goal_trials": trials // 2,
        "infeasible_share_tpe": round(statistics.mean(waste["tpe"]), 3),
        "infeasible_share_random": round(statistics.mean(waste["random"]), 3),
        "trials_per_hour_2x1": round(rates["2x1"], 1), "trials_per_hour_1x2": round(rates["1x2"], 1),
        "ratio_2x1_vs_1x2": round(rates["2x1"] / rates["1x2"], 2),
        "overhead_share_of_trial_time": round(statistics.median(overhead), 3) if overhead else None,
        "goal_overhead_share": 0.05,
    }


BENCHMARKS: dict[str, Callable[..., dict]] = {"budget": bench_budget, "train": bench_train, "search": bench_search}


def run(which: str, out_dir: Path, search: dict | None = None) -> dict:
    """Run one benchmark or all; ``search`` overrides :func:`bench_search`'s arguments."""
    names = list(BENCHMARKS) if which == "all" else [which]
    overrides = {"search": {"results": out_dir / "bench-search"} | (search or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        print(f"== bench {name}", flush=True)
        figures = BENCHMARKS[name](**overrides.get(name, {}))
        for key, value in figures.items():
            print(f"  {key}: {value}")
        results[name] = figures | {"measured": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "bench.md").write_text(_markdown(results))
    return results


def _markdown(results: dict) -> str:
    lines = ["# Benchmarks", "", "Written by `nas bench`. Ratios are against a reference measured in the same run.", ""]
    for name, figures in results.items():
        lines += [f"## {name}", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in figures.items()]
        lines.append("")
    return "\n".join(lines)
