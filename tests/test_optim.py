import pytest
import torch

from nas.config import ArchConfig
from nas.model import ConformerCTC
from nas.optim import BatchedMuon, MuonAdamW, matrices, optimizer
from nas.schedule import load_schedule
from nas.train import _lr_factor, _param_groups

SHARED = {  # 4 virtual layers on 2 blocks, one conv for all, tied halves, a shared low-rank factor
    "encoder": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "conv_kernel": 5, "n_layers": 4},
    "sharing": {"blocks": {"pattern": "cycle", "n": 2},
                "modules": {"conv": {"pattern": "cycle", "n": 1}},
                "ties": {"ffn_macaron": True, "attn_qk": True},
                "low_rank": {"ffn_in": {"rank": 8, "share": "U"}}},
}


def shared_model() -> ConformerCTC:
    torch.manual_seed(0)
    return ConformerCTC(ArchConfig.from_dict(SHARED))


def test_muon_takes_the_encoders_linear_maps_each_stored_tensor_once():
    model = shared_model()
    found = matrices(model)
    first, second = model.layers[0], model.layers[1]
    want = [first.attn.q.weight, first.attn.v.weight, first.attn.out.weight, first.ffn1.inner.U,
            first.ffn1.inner.V, first.ffn1.outer.weight, first.conv.pw1.weight, first.conv.pw2.weight,
            second.attn.q.weight, second.ffn1.inner.V]
    ids = {id(p) for p in found}
    assert len(ids) == len(found) and all(id(p) in ids for p in want)
    # 2 blocks x (q = k, v, out, ffn V, ffn out: the macaron halves tied) + 1 shared U + 1 conv's pw1, pw2
    assert len(found) == 2 * 5 + 1 + 2
    left_out = [model.head.weight, model.frontend.proj.weight, first.conv.dw_weight, first.attn.norm.weight,
                first.ffn1.inner.bias, model.head.bias]
    assert not any(id(p) in ids for p in left_out)


def test_a_muon_step_is_orthogonal_on_the_matrices_and_adamws_elsewhere():
    """Muon's first step on a matrix is its gradient's nearest orthogonal matrix (all singular
    values about equal, where the gradient's spread tenfold), scaled to AdamW's size (0.2
    sqrt(max(rows, cols)) times the rate); AdamW's first step moves every entry by the rate (its
    sign is the gradient's)."""
    model = shared_model()
    s = load_schedule("tiny").model_copy(update={"peak_lr": 1e-3, "weight_decay": 0.0, "muon_lr": 2e-3})
    opt = optimizer(model, _param_groups(model, s), s.peak_lr, s.muon_lr)
    assert isinstance(opt, MuonAdamW)
    before = {p: p.detach().clone() for p in model.parameters()}
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    for p in matrices(model):  # a gradient whose singular values spread tenfold, from 1 to 10
        n = min(p.shape)
        u, _ = torch.linalg.qr(torch.randn(p.shape[0], n, generator=g))
        v, _ = torch.linalg.qr(torch.randn(p.shape[1], n, generator=g))
        p.grad = u @ torch.diag(torch.logspace(0, 1, n)) @ v.T
    opt.step()
    uses = model.uses()
    for p in matrices(model):
        step = (before[p] - p.detach()) / (2e-3 / uses.get(p, 1) * 0.2 * max(p.shape) ** 0.5)
        sv = torch.linalg.svdvals(step)
        assert 0.6 < sv.min() and sv.max() < 1.3, (p.shape, sv)  # Newton-Schulz's band, not 1 exactly
        assert torch.sum(step * p.grad) > 0  # downhill
    for p in (model.head.weight, model.frontend.proj.weight, model.layers[0].conv.dw_weight):
        rate = 1e-3 / uses.get(p, 1)  # the one convolution serves 4 layers
        torch.testing.assert_close((before[p] - p.detach()), rate * p.grad.sign(), rtol=1e-3, atol=1e-8)


def test_the_learning_rate_schedule_drives_both_halves_and_reports_adamws_rate():
    model = shared_model()
    s = load_schedule("tiny").model_copy(update={"peak_lr": 1e-3, "muon_lr": 3e-3})
    opt = optimizer(model, _param_groups(model, s), s.peak_lr, s.muon_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, s))
    for _ in range(3):
        opt.step()
        sched.step()
    factor = _lr_factor(3, s)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 * factor)  # the head's group: AdamW at peak_lr
    muon_rates = {p: g["lr"] for g in opt.muon.param_groups for p in g["params"]}
    uses = model.uses()
    for p in matrices(model):
        assert muon_rates[p] == pytest.approx(3e-3 / uses.get(p, 1) * factor)
    adam = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert len(adam) + len(muon_rates) == len(list(model.parameters())) and not adam & set(map(id, muon_rates))


def test_batched_muon_steps_as_the_librarys_muon():
    """Our Muon batches the iterations of tensors of one shape (a tall one transposed: 12x4 with
    4x12); over several steps, two groups of different rates and decays, and a checkpoint moved
    from one to the other, it moves every tensor where ``torch.optim.Muon`` does, at toy shapes and
    at the 1M unshared design's (d=96), to within bf16's rounding of the step (the library iterates
    on a tall matrix's transposed view, which may round otherwise)."""
    shapes = [(12, 4), (4, 12), (4, 12), (8, 8), (12, 4), (6, 5), (8, 8), (3, 7), (384, 96), (96, 384), (96, 96),
              (192, 96), (96, 96)]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in shapes]
    runs = {}
    for cls in (torch.optim.Muon, BatchedMuon):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": ps[:5] + ps[8:11], "lr": 8e-3, "weight_decay": 0.01},
                  {"params": ps[5:8] + ps[11:], "lr": 2e-3, "weight_decay": 0.0}]
        runs[cls] = (ps, cls(groups, adjust_lr_fn="match_rms_adamw"))
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps, opt in runs.values():
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opt.step()
        if step == 1:  # each resumes from the other's checkpoint
            (_, a), (_, b) = runs.values()
            a_state, b_state = a.state_dict(), b.state_dict()
            a.load_state_dict(b_state)
            b.load_state_dict(a_state)
    (ours_ps, _), (lib_ps, _) = runs[BatchedMuon], runs[torch.optim.Muon]
    for ours, lib, s in zip(ours_ps, lib_ps, start):
        moved = (lib - s).detach()
        assert moved.abs().max() > 1e-3
        # bf16 keeps 8 bits, so a rounding is at most 0.4% of an entry: 1% of the largest move allows one
        torch.testing.assert_close((ours - s).detach(), moved, rtol=0, atol=0.01 * moved.abs().max().item())


def test_the_optimizer_benchmark_times_the_three_on_the_unshared_designs_40_matrices():
    from nas.bench.speed import bench_optim

    figures = bench_optim(designs=("unshared",), steps=1, rounds=1)["unshared"]
    assert figures["muon_tensors"] == 40 and figures["shapes"] == 3  # 20 of 96x96, 16 of 96x384 or 384x96, 4 of 192x96
    assert all(figures[f"{k}_ms_per_step"] > 0 for k in ("adamw", "torch_muon", "batched_muon"))
