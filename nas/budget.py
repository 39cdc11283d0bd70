"""Exact parameter memory and compute of a design, by arithmetic on its storage plan.

No model is built. ``physical`` counts each stored tensor once; ``virtual`` counts every use, as
if nothing were shared. Bytes are physical parameters times the deployment dtype's size. The
budget itself (``1M`` parameters, or ``4MB@int8`` bytes) is parsed here too.

Not counted: the BatchNorm running statistics (buffers, ``2·d`` per convolution module), which
fold into the depthwise convolution at export; they are reported as ``buffers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod

from nas.config import CONV_STACKS, ArchConfig
from nas.errors import UserError
from nas.plan import Plan, build_plan, conv_out

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
FRAME_RATE = 100  # log-mel frames per second of audio (10 ms hop)
MACS_WINDOW_S = 10.0  # attention MACs grow with utterance length: we count a 10 s utterance


@dataclass(frozen=True)
class Count:
    physical: int
    virtual: int
    buffers: int
    by_part: dict[str, int] = field(default_factory=dict)  # physical parameters per part
    macs_per_second: float = 0.0

    def bytes(self, dtype: str = "fp32") -> int:
        return self.physical * DTYPE_BYTES[dtype]

    def as_dict(self) -> dict:
        return {
            "physical_params": self.physical,
            "virtual_params": self.virtual,
            "bytes": {dt: self.bytes(dt) for dt in DTYPE_BYTES},
            "buffers": self.buffers,
            "by_part": dict(self.by_part),
            "macs_per_second": self.macs_per_second,
        }


def count(arch: ArchConfig, plan: Plan | None = None) -> Count:
    """Physical and virtual parameters, per-part breakdown and MACs/s of ``arch``."""
    plan = plan or build_plan(arch)
    L = arch.encoder.n_layers
    by_part = {"frontend": sum(prod(s) for _, s in plan.frontend)}
    virtual = by_part["frontend"]
    seen: set[str] = set()
    for slot in plan.slots:
        virtual += slot.numel * L
        if slot.store in seen:  # a tied slot: the tensors are counted at their first slot
            continue
        seen.add(slot.store)
        by_part[slot.part] = by_part.get(slot.part, 0) + slot.numel * slot.n_stored
        if slot.kind == "batchnorm":
            buffers = slot.n_stored * (2 * arch.encoder.d_model + 1)
    by_part["head"] = sum(prod(s) for _, s in plan.head)
    virtual += by_part["head"]
    return Count(
        physical=sum(by_part.values()),
        virtual=virtual,
        buffers=buffers,
        by_part=by_part,
        macs_per_second=macs_per_second(arch, plan),
    )


def macs_per_second(arch: ArchConfig, plan: Plan | None = None, seconds: float = MACS_WINDOW_S) -> float:
    """Multiply-accumulates per second of audio for one ``seconds``-long utterance.

    Counts the convolutions, every matrix product (a low-rank one costs ``r·(in+out)``; a
    matrix tied inside a module and applied to the same input is computed once) and attention's
    two ``T×T`` products. Norms, activations and softmax are left out (they are not MACs).
    """
    plan = plan or build_plan(arch)
    fe, enc = arch.frontend, arch.encoder
    frames = int(seconds * FRAME_RATE)
    c, d = fe.channels, enc.d_model
    t, f, c_in, total = frames, fe.n_mels, 1, 0
    for k, s in CONV_STACKS[fe.subsampling]:  # each output cell: c_in * k * k MACs per channel
        t, f = conv_out(t, k, s), conv_out(f, k, s)
        total += t * f * c * c_in * k * k
        c_in = c
    t2 = t
    total += t2 * c * f * d  # the projection to d_model
    # MACs of one virtual layer per frame: each matrix slot (W, or U and V) and the depthwise
    # kernel once. A key projection tied to the query projection reuses the query's product.
    qk_tied = arch.sharing.ties.attn_qk
    per_frame = sum(
        s.numel for s in plan.slots
        if s.kind in ("matrix", "dwconv") and not (qk_tied and s.name.startswith("attn.k."))
    )
    total += enc.n_layers * (t2 * per_frame + 2 * t2 * t2 * d)
    total += t2 * d * arch.vocab_size
    return total / seconds



def budget_table(rows: list[tuple[str, Count]], budget: Budget | None = None) -> str:
    """A plain-text table of named counts, with a part breakdown and (given a budget) the verdict."""
    parts = ("frontend", "ffn", "attn", "conv", "norm", "head")
    head = ["design", "physical", "virtual", "fp32 B", "bf16 B", "int8 B", "MMACs/s", *parts]
    if budget:
        head.append(f"fits {budget.text}")
    table = [head]
    for name, c in rows:
        row = [name, f"{c.physical:,}", f"{c.virtual:,}", *(f"{c.bytes(dt):,}" for dt in DTYPE_BYTES),
               f"{c.macs_per_second / 1e6:.1f}", *(f"{c.by_part.get(p, 0):,}" for p in parts)]
        if budget:
            row.append("yes" if budget.fits(c) else f"no (+{budget.violation(c):,} B)")
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- the budget --------------------------------------------------------------------------

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Budget:
    """A hard limit on physical parameter memory: ``max_bytes`` at ``dtype``."""

    max_bytes: int
    dtype: str
    text: str

    @property
    def max_params(self) -> int:
        return self.max_bytes // DTYPE_BYTES[self.dtype]

    def violation(self, c: Count) -> int:
        """Bytes over the budget (> 0 means infeasible)."""
        return c.bytes(self.dtype) - self.max_bytes

    def fits(self, c: Count) -> bool:
        return self.violation(c) <= 0


def parse_bytes(text: str) -> int | None:
    """``4MB`` / ``2MiB`` / ``800 B`` in bytes (MB = 10**6, MiB = 2**20), or None if it is no size."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?i?B)", str(text).strip(), flags=re.IGNORECASE)
    if not m or m[2].upper() not in _BYTE_UNITS:
        return None
    return round(float(m[1]) * _BYTE_UNITS[m[2].upper()])


def parse_budget(text: str, source: str = "--budget", field: str = "") -> Budget:
    """``1M`` / ``850K`` / ``1000000`` parameters (fp32 bytes), or ``4MB@int8`` / ``2MiB@bf16`` bytes."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)", s, flags=re.IGNORECASE)
    if m:
        params = round(float(m[1]) * _UNITS[m[2].upper()])
        if params <= 0:
            raise UserError(source, field, f"budget {s!r} must be positive")
        return Budget(params * DTYPE_BYTES["fp32"], "fp32", s)
    size, at, dtype = s.partition("@")
    nbytes = parse_bytes(size) if at else None
    if nbytes is not None and dtype.strip().lower() in DTYPE_BYTES:
        if nbytes <= 0:
            raise UserError(source, field, f"budget {s!r} must be positive")
        return Budget(nbytes, dtype.strip().lower(), s)
    raise UserError(
        source, field,
        f"budget {s!r} is neither a parameter count (1M, 850K) nor bytes@dtype (4MB@int8; units B KB MB GB KiB MiB GiB; dtypes {', '.join(DTYPE_BYTES)})",
    )
