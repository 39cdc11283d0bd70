"""The storage plan: every stored tensor of a design, and which virtual layer uses which.

One plan, two readers. :mod:`nas.budget` sums the plan's sizes; :mod:`nas.model` creates one
tensor per stored key and wires every use to it. So the count is exact by construction, and a
property test checks that the model honours the plan.

A :class:`Slot` is one weight position inside a Conformer layer (``"ffn1.in.U"``,
``"conv.norm"``...). ``slot.ids[l]`` is the id of the stored tensor virtual layer ``l`` uses
there; the stored tensor's key is ``f"{slot.store}.{id}"``. Tied slots name the same ``store``.
This module is pure arithmetic: it imports no torch, so the budget stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import NamedTuple

from nas.config import CONV_STACKS, ArchConfig

class Slot(NamedTuple):  # a NamedTuple: the budget builds ~40 per design, fast
    name: str  # position inside a layer
    store: str  # stored-tensor family; tied slots share it
    kind: str  # "matrix" (out, in) | "vector" (n,) | "layernorm"/"batchnorm" (n,) | "dwconv" (ch, k) | "table" (heads, buckets)
    shape: tuple[int, ...]
    part: str  # "ffn" | "attn" | "conv" | "norm"
    ids: tuple[int, ...]  # per virtual layer: which stored tensor of `store` it uses
    numel: int  # elements of one stored tensor (a norm holds weight and bias)
    n_stored: int  # how many distinct tensors the layers use: len(set(ids))


@dataclass(frozen=True)
class Plan:
    arch: ArchConfig
    frontend: tuple[tuple[str, tuple[int, ...]], ...]  # stored once: (key, shape)
    head: tuple[tuple[str, tuple[int, ...]], ...]
    slots: tuple[Slot, ...]


def frontend_shapes(arch: ArchConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    c, d = arch.frontend.channels, arch.encoder.d_model
    f = subsampled_mels(arch.frontend.n_mels, arch.frontend.subsampling)
    shapes = []
    for i, (k, _) in enumerate(CONV_STACKS[arch.frontend.subsampling], start=1):
        shapes += [(f"frontend.conv{i}.weight", (c, 1 if i == 1 else c, k, k)), (f"frontend.conv{i}.bias", (c,))]
    return (*shapes, ("frontend.proj.weight", (d, c * f)), ("frontend.proj.bias", (d,)))


def conv_out(n: int, kernel: int, stride: int) -> int:
    return (n - kernel) // stride + 1


def subsampled_mels(n_mels: int, factor: int = 4) -> int:
    """Frequency bins left after the front end's convolutions."""
    for k, s in CONV_STACKS[factor]:
        n_mels = conv_out(n_mels, k, s)
    return n_mels


def subsampled_frames(frames: int, factor: int = 4) -> int:
    """Encoder frames left of ``frames`` log-mel frames (fewer than one: the input is too short)."""
    for k, s in CONV_STACKS[factor]:
        frames = conv_out(frames, k, s)
    return frames


def build_plan(arch: ArchConfig) -> Plan:
    enc, sh = arch.encoder, arch.sharing
    d, f, k, L = enc.d_model, enc.ffn_dim, enc.conv_kernel, enc.n_layers
    blocks = arch.block_map()
    inst = {kind: arch.instance_map(kind, blocks) for kind in ("ffn", "attn", "conv")}
    per_layer = tuple(range(L))
    slots: list[Slot] = []
    distinct: dict[tuple[int, ...], int] = {}  # the few id maps recur in many slots

    def add(name: str, store: str, kind: str, shape: tuple[int, ...], part: str, ids: tuple[int, ...]) -> None:
        n = prod(shape) * (2 if kind in ("layernorm", "batchnorm") else 1)
        if ids not in distinct:
            distinct[ids] = len(set(ids))
        slots.append(Slot(name, store, kind, shape, part, ids, n, distinct[ids]))

    def cheap(owner: tuple[int, ...]) -> tuple[int, ...]:
        return per_layer if sh.per_layer_cheap else owner

    def norm(name: str, kind: str, part_owner: tuple[int, ...]) -> None:
        add(name, name, kind, (d,), "norm", cheap(part_owner))

    def bias(name: str, n: int, part: str, owner: tuple[int, ...]) -> None:
        add(name, name, "vector", (n,), part, cheap(owner))

    def matrix(name: str, store: str, family: str, out: int, inp: int, owner: tuple[int, ...]) -> None:
        """A weight matrix, dense or low-rank; ``store`` differs from ``name`` when tied."""
        lr = getattr(sh.low_rank, family)
        part = family.split("_")[0]
        if lr.rank is None:
            add(f"{name}.W", f"{store}.W", "matrix", (out, inp), part, owner)
            return
        group = owner if lr.share == "none" else _groups(owner, lr.groups)
        for factor, shape in (("U", (out, lr.rank)), ("V", (lr.rank, inp))):
            add(f"{name}.{factor}", f"{store}.{factor}", "matrix", shape, part, group if factor in lr.share else owner)

    t = sh.ties
    fi, ai, ci = inst["ffn"], inst["attn"], inst["conv"]
    for half in ("ffn1", "ffn2"):
        src = "ffn1" if t.ffn_macaron else half
        norm(f"{half}.norm", "layernorm", fi)
        matrix(f"{half}.in", f"{src}.in", "ffn_in", f, d, fi)
        bias(f"{half}.in.b", f, "ffn", fi)
        matrix(f"{half}.out", f"{src}.out", "ffn_out", d, f, fi)
        bias(f"{half}.out.b", d, "ffn", fi)
    norm("attn.norm", "layernorm", ai)
    for proj in ("q", "k", "v"):
        matrix(f"attn.{proj}", "attn.q" if proj == "k" and t.attn_qk else f"attn.{proj}", "attn_qkv", d, d, ai)
        bias(f"attn.{proj}.b", d, "attn", ai)
    matrix("attn.out", "attn.v" if t.attn_v_out else "attn.out", "attn_out", d, d, ai)
    bias("attn.out.b", d, "attn", ai)
    if enc.rel_pos_buckets:  # one bias per head and distance bucket: cheap, like a bias
        add("attn.rel_bias", "attn.rel_bias", "table", (enc.n_heads, enc.rel_pos_buckets), "attn", cheap(ai))
    norm("conv.norm", "layernorm", ci)
    if t.conv_glu:  # one matrix computes both GLU halves; each half keeps its own bias
        matrix("conv.pw1", "conv.pw1", "conv_pw", d, d, ci)
        bias("conv.pw1.b", d, "conv", ci)
        bias("conv.pw1.gate_b", d, "conv", ci)
    else:
        matrix("conv.pw1", "conv.pw1", "conv_pw", 2 * d, d, ci)
        bias("conv.pw1.b", 2 * d, "conv", ci)
    add("conv.dw", "conv.dw", "dwconv", (d, k), "conv", ci)
    bias("conv.dw.b", d, "conv", ci)
    norm("conv.bn", "batchnorm", ci)
    matrix("conv.pw2", "conv.pw2", "conv_pw", d, d, ci)
    bias("conv.pw2.b", d, "conv", ci)
    norm("final_norm", "layernorm", blocks)

    head = (("head.weight", (arch.vocab_size, d)), ("head.bias", (arch.vocab_size,)))
    return Plan(arch, frontend_shapes(arch), head, tuple(slots))



def _groups(owner: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """Instance ids 0..n-1 put into ``groups`` contiguous groups (one shared factor per group)."""
    n = len(set(owner))
    return tuple(i * groups // n for i in owner)
