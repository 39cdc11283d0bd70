"""Speed benchmarks: the budget arithmetic against building models, a training step of our model
against torchaudio's Conformer (and low rank against full rank), and the optimizer's step alone."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio

from nas.budget import count
from nas.config import ArchConfig
from nas.model import ConformerCTC, Subsampling

SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "paper.yaml"


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


def bench_optim(designs: tuple[str, ...] = ("unshared", "paper"), budget: str = "1M", steps: int = 30,
                rounds: int = 3) -> dict:
    """The optimizer's step alone (no forward or backward pass: random gradients) on each 1M
    baseline's tensors, under ``full``'s parameter groups: fused AdamW for every tensor, and Muon for
    the encoder's linear maps with AdamW for the rest, through ``torch.optim.Muon`` (one tensor at a
    time) and through :class:`nas.optim.BatchedMuon` (batched by shape). Milliseconds a step, the
    median of ``rounds`` rounds that alternate the three; the ratio is the library's time over ours."""
    from nas.baselines import baselines
    from nas.budget import parse_budget
    from nas.optim import MuonAdamW, matrices
    from nas.schedule import load_schedule
    from nas.space import load_space
    from nas.train import _param_groups

    schedule = load_schedule("full")
    found = dict(baselines(load_space(SPACE), parse_budget(budget)))
    figures: dict = {"threads": torch.get_num_threads(), "setup": f"{budget} baselines of paper.yaml, {steps} steps a round"}
    for design in designs:
        model = ConformerCTC(found[design])
        mats, ratio = matrices(model), schedule.muon_lr / schedule.peak_lr
        optimizers = {"adamw": torch.optim.AdamW(_param_groups(model, schedule), lr=schedule.peak_lr, fused=True),
                      "torch_muon": MuonAdamW(_param_groups(model, schedule), mats, ratio, muon=torch.optim.Muon),
                      "batched_muon": MuonAdamW(_param_groups(model, schedule), mats, ratio)}
        times: dict[str, list[float]] = {k: [] for k in optimizers}
        for _ in range(rounds):
            for name, opt in optimizers.items():
                for p in model.parameters():
                    p.grad = torch.randn_like(p) * 1e-3
                opt.step()  # the first step makes the state
                t0 = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                times[name].append((time.perf_counter() - t0) / steps * 1000)
        med = {k: statistics.median(v) for k, v in times.items()}
        figures[design] = {"muon_tensors": len(mats), "shapes": len({tuple(sorted(m.shape)) for m in mats})} | {
            f"{k}_ms_per_step": round(v, 2) for k, v in med.items()} | {
            "ratio_torch_muon_vs_batched": round(med["torch_muon"] / med["batched_muon"], 2)}
    return figures
