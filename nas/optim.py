"""The trainer's optimizer: AdamW, or Muon for the encoder's linear maps and AdamW for the rest.

``optimizer(model, groups, peak_lr, muon_lr)`` takes the trainer's parameter groups (weight decay,
and a learning rate divided by a shared tensor's uses: :func:`nas.train._param_groups`) and returns
one ``torch.optim.Optimizer``, so that one learning-rate schedule, one checkpoint and one resume
serve either kind.

Muon (Jordan et al. 2024; ``torch.optim.Muon``) replaces a matrix's momentum by its nearest
orthogonal matrix (Newton-Schulz iterations) before the step. It is made for the hidden layers'
matrices only: the encoder's ``Linear`` maps here (full-rank weights and low-rank factors, shared or
not). The front end's convolutions and projection, the CTC head, the depthwise kernels, the norms
and the biases stay with AdamW, as Muon's authors do with a network's input and output layers and
its vectors. Its step is scaled as Moonshot's (``match_rms_adamw``: the update's size matches
AdamW's), so ``muon_lr`` reads as a peak rate of AdamW's kind; the schedule's warm-up and decay
apply to both. :class:`BatchedMuon` is the library's Muon with its iterations batched by shape.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.optim._muon import _adjust_lr

from nas.model.conformer import Linear


def matrices(model: nn.Module) -> list[nn.Parameter]:
    """The encoder's linear maps (each stored tensor once): what Muon steps."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Linear):
            for p in (module.weight, module.U, module.V):
                if p is not None:
                    found.setdefault(id(p), p)
    return list(found.values())


def optimizer(model: nn.Module, groups: list[dict], peak_lr: float, muon_lr: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over ``groups`` at ``peak_lr``; with ``muon_lr``, :class:`MuonAdamW`."""
    if not muon_lr:  # fused: one kernel for all parameters, a step's optimizer time / 5 on the CPU
        return torch.optim.AdamW(groups, lr=peak_lr, fused=True)
    return MuonAdamW(groups, matrices(model), muon_lr / peak_lr)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for ``muon_params``, AdamW for every other tensor of ``groups``, as one optimizer.

    Each group is split in two, keeping its weight decay; the Muon half's learning rate is the
    group's times ``muon_ratio``. ``param_groups`` lists AdamW's groups, then Muon's (the same
    dicts the two hold), so a learning-rate scheduler sets both, and its first rate is AdamW's.
    ``muon`` is the Muon class (:class:`BatchedMuon` unless given: ``torch.optim.Muon`` steps the same).
    """

    def __init__(self, groups: list[dict], muon_params: list[nn.Parameter], muon_ratio: float,
                 muon: type[torch.optim.Muon] | None = None):
        muon_ids = {id(p) for p in muon_params}
        adam_groups, muon_groups = [], []
        for g in groups:
            rest = {k: v for k, v in g.items() if k != "params"}
            if ps := [p for p in g["params"] if id(p) not in muon_ids]:
                adam_groups.append({**rest, "params": ps})
            if ps := [p for p in g["params"] if id(p) in muon_ids]:
                muon_groups.append({**rest, "params": ps, "lr": rest["lr"] * muon_ratio})
        self.adamw = torch.optim.AdamW(adam_groups, fused=True)
        self.muon = (muon or BatchedMuon)(muon_groups, adjust_lr_fn="match_rms_adamw")
        super().__init__([p for g in groups for p in g["params"]], {})
        self.param_groups = self.adamw.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW takes no closure")
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        self.param_groups = self.adamw.param_groups + self.muon.param_groups  # loading made new group dicts


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iterations of tensors of one shape batched.

    Written here because torch 2.11's Muon orthogonalizes one tensor at a time and refuses
    ``foreach`` ("not supported yet"): at d=96 a step's 40 small matrices spend most of their time
    in per-call overhead, about 20% of a training step on 2 cores (``nas bench optim`` measures the
    two). The arithmetic is the library's, tensor for tensor: the same momentum and Nesterov
    update, the same quintic iterations in bf16 on the wide orientation (a tall matrix is
    transposed, so that 384x96 and 96x384 batch together), the same learning-rate scaling and
    decoupled weight decay, the same state (``momentum_buffer``), so checkpoints of either load in
    the other. The steps are equal but for bf16 rounding: the library iterates on a tall matrix's
    transposed view, this on a contiguous copy, and in training about one tensor's step in 200 (a
    tall one, the one time it was seen) differs by a rounding (ad hoc, the unshared design's first
    steps). ``tests/test_optim.py`` checks its steps against
    the library's.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("BatchedMuon takes no closure")
        by_shape: dict[tuple, list] = defaultdict(list)  # (wide shape, iteration settings) -> [(param, group, update)]
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            momentum = group["momentum"]
            for p, g, buf in zip(params, grads, bufs):
                if g.ndim != 2:
                    raise ValueError("Muon steps 2-D tensors only")
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                wide = update.T if update.size(0) > update.size(1) else update
                key = (tuple(wide.shape), group["ns_coefficients"], group["ns_steps"], group["eps"])
                by_shape[key].append((p, group, wide))
        for (_, (a, b, c), ns_steps, eps), items in by_shape.items():
            x = torch.stack([w for _, _, w in items]).bfloat16()
            x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
            for _ in range(ns_steps):
                gram = x @ x.mT
                x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
            for (p, group, _), o in zip(items, x):
                o = o.T if p.size(0) > p.size(1) else o
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
