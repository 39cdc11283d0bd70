"""Wires a Conformer-CTC model from an `ArchConfig`'s storage plan.

:class:`Store` creates each stored tensor of the plan once, on first use, and hands the same
object to every later use. The model is then written plainly, layer by layer, asking the store
for the tensor each slot of each virtual layer uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from nas.config import ArchConfig
from nas.files import atomic_write
from nas.model.conformer import (
    ConformerLayer, Convolution, FeedForward, Linear, SelfAttention, Subsampling,
)
from nas.plan import Plan, Slot, build_plan

# Each residual branch's output matrix (or its U factor) starts at a tenth of nn.Linear's scale (the
# schedule's `branch_init_gain`, 0.1 by default), so a deep stack starts near the identity. With
# nn.Linear's scale every design that repeats blocks (each virtual layer ends in a LayerNorm) sat on
# the CTC blank plateau: the paper-style 1M design at dev loss 2.68 after 400 proxy steps, drawn-0a
# still at 2.70 after 2,700. At 0.1 they learn like the shallow designs (paper-style 1.56, unshared
# 1.49 instead of 1.56; 0.25 only half-escapes: 2.08); designs of 18 or more virtual layers did
# not until a shared tensor's learning rate was divided by its uses (`nas.train._param_groups`); the
# README's `ArchConfig` section has the command. The default is also the schedules': a
# model built outside training starts as a trained one did. Parity with torchaudio is unaffected:
# it concerns what a layer computes from given weights.
BRANCH_OUTPUTS = ("ffn1.out", "ffn2.out", "attn.out", "conv.pw2")
BRANCH_INIT_GAIN = 0.1


class Store(nn.Module):
    """Every stored tensor of the encoder, keyed ``"<store>.<id>"`` as in the plan.

    Registering them here gives each a single, stable name in ``state_dict`` (the layers that
    use a tensor refer to it too; :func:`torch.save` and safetensors keep one copy).
    """

    def __init__(self, plan: Plan, branch_init_gain: float = BRANCH_INIT_GAIN):
        super().__init__()
        self.plan, self.branch_init_gain = plan, branch_init_gain
        self.slots = {s.name: s for s in plan.slots}
        self.tensors = nn.ModuleDict()  # norms (modules) and parameter holders

    def get(self, name: str, layer: int) -> nn.Parameter | nn.Module:
        slot = self.slots[name]
        key = f"{slot.store}.{slot.ids[layer]}".replace(".", "_")
        if key not in self.tensors:
            self.tensors[key] = _make(slot, self.branch_init_gain)
        made = self.tensors[key]
        return made if slot.kind in ("layernorm", "batchnorm") else made.value

    def linear(self, name: str, layer: int, bias: str | None = None) -> Linear:
        """The (possibly low-rank) matrix at ``name`` plus its bias slot."""
        b = self.get(bias or f"{name}.b", layer)
        if f"{name}.W" in self.slots:
            return Linear(weight=self.get(f"{name}.W", layer), bias=b)
        return Linear(U=self.get(f"{name}.U", layer), V=self.get(f"{name}.V", layer), bias=b)


class _Holder(nn.Module):
    """Holds one parameter, so that parameters and norm modules share one keyed container."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = nn.Parameter(value)


def _make(slot: Slot, branch_init_gain: float) -> nn.Module:
    """A freshly initialized stored tensor, initialized as ``nn.Linear``/``nn.Conv1d`` would be,
    except the residual branches' output matrices, scaled by ``branch_init_gain``."""
    if slot.kind == "layernorm":
        return nn.LayerNorm(slot.shape[0])
    if slot.kind == "batchnorm":
        return nn.BatchNorm1d(slot.shape[0])
    if slot.kind == "vector":  # biases: uniform(±1/sqrt(fan_in)) needs the fan-in; 1/sqrt(n) is close
        bound = 1 / math.sqrt(slot.shape[0])
        return _Holder(torch.empty(slot.shape).uniform_(-bound, bound))
    if slot.kind == "table":  # relative-position biases start at zero: attention starts position-blind
        return _Holder(torch.zeros(slot.shape))
    if slot.kind == "dwconv":  # Conv1d(groups=d) fan-in is the kernel size
        bound = 1 / math.sqrt(slot.shape[1])
        return _Holder(torch.empty(slot.shape).uniform_(-bound, bound))
    out, inp = slot.shape
    # nn.Linear's kaiming-uniform(a=√5) gives Var = 1/(3·in). For U·V we keep the product's
    # variance equal to that: V as nn.Linear(in→r), U with Var = 1/r.
    if slot.name.endswith(".U"):
        bound = math.sqrt(3 / inp)
    else:
        bound = 1 / math.sqrt(inp)
    if slot.store.rsplit(".", 1)[0] in BRANCH_OUTPUTS and slot.store.endswith((".W", ".U")):
        bound *= branch_init_gain  # keyed by the stored tensor: tied to v, attn.out keeps v's scale
    return _Holder(torch.empty(slot.shape).uniform_(-bound, bound))


class ConformerCTC(nn.Module):
    """Log-mels ``(B, T, n_mels)`` → subsampling → ``n_layers`` virtual Conformer layers → CTC logits.

    ``forward`` returns log-probabilities ``(B, T', vocab)`` and output lengths ``(B,)``.
    """

    def __init__(self, arch: ArchConfig, dropout: float = 0.1, branch_init_gain: float = BRANCH_INIT_GAIN):
        super().__init__()
        self.arch = arch
        plan = build_plan(arch)
        fe, enc = arch.frontend, arch.encoder
        self.frontend = Subsampling(fe.n_mels, fe.channels, enc.d_model, fe.subsampling)
        self.store = Store(plan, branch_init_gain)
        self.layers = nn.ModuleList(self._layer(self.store, l, dropout) for l in range(enc.n_layers))
        self.head = nn.Linear(enc.d_model, arch.vocab_size)
        self.dropout = nn.Dropout(dropout)

    def _layer(self, s: Store, l: int, p: float) -> ConformerLayer:
        arch = self.arch
        ties = arch.sharing.ties

        def ffn(half: str) -> FeedForward:
            return FeedForward(s.get(f"{half}.norm", l), s.linear(f"{half}.in", l), s.linear(f"{half}.out", l), p)

        attn = SelfAttention(
            s.get("attn.norm", l), s.linear("attn.q", l), s.linear("attn.k", l), s.linear("attn.v", l),
            s.linear("attn.out", l), arch.encoder.n_heads, p, qk_tied=ties.attn_qk,
            rel_bias=s.get("attn.rel_bias", l) if arch.encoder.rel_pos_buckets else None,
        )
        conv = Convolution(
            s.get("conv.norm", l), s.linear("conv.pw1", l), s.get("conv.dw", l), s.get("conv.dw.b", l),
            s.get("conv.bn", l), s.linear("conv.pw2", l), p,
            gate_bias=s.get("conv.pw1.gate_b", l) if ties.conv_glu else None,
        )
        return ConformerLayer(ffn("ffn1"), attn, conv, ffn("ffn2"), s.get("final_norm", l), p)

    def encode(self, feats: Tensor, lengths: Tensor, tap: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Encoder output ``(B, T', d)``, lengths, and the output of virtual layer ``tap`` (counted
        from 1; None when no layer is tapped)."""
        x, lengths = self.frontend(feats, lengths)
        x = self.dropout(x)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
        tapped = None
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if i == tap:
                tapped = x
        return x, lengths, tapped

    def log_probs(self, x: Tensor) -> Tensor:
        """The CTC head's log-probabilities ``(B, T', vocab)`` of encoder states ``(B, T', d)``."""
        return self.head(x).log_softmax(-1)

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths, _ = self.encode(feats, lengths)
        return self.log_probs(x), lengths

    def uses(self) -> dict[nn.Parameter, int]:
        """How many places of the encoder use each of its parameters: the virtual layers that
        refer to it, counted once more for each tie inside a layer (tied q/k, v/out, macaron
        halves). The front-end's and the head's parameters are not in it: each serves one place."""
        counts: dict[nn.Parameter, int] = {}
        for _, p in self.layers.named_parameters(remove_duplicate=False):
            counts[p] = counts.get(p, 0) + 1
        return counts

    def num_params(self) -> int:
        """Unique parameter elements: what the budget arithmetic must equal."""
        return sum(p.numel() for p in self.parameters())

    def stored_state(self) -> dict[str, Tensor]:
        """Each tensor once, under its canonical name. Layers own nothing: they only refer to the
        store's tensors, so dropping their aliases loses nothing."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("layers.")}

    def save(self, path: str | Path) -> None:
        """Weights as safetensors, each stored tensor once."""
        state = {k: v.contiguous() for k, v in self.stored_state().items()}
        atomic_write(path, safetensors.torch.save(state))

    @classmethod
    def load(cls, arch: ArchConfig, path: str | Path, device: str = "cpu") -> ConformerCTC:
        model = cls(arch)
        state = safetensors.torch.load_file(str(path), device="cpu")
        expected = model.stored_state().keys()
        if state.keys() != expected:
            raise ValueError(f"{path}: weights do not match the config "
                             f"({len(expected - state.keys())} missing, {len(state.keys() - expected)} unexpected)")
        model.load_state_dict(state, strict=False)
        return model.to(device)
