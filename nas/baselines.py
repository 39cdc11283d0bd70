"""Designs that are always in the race: hand-made baselines that fit the budget, and ``--enqueue`` files.

- ``unshared``: the largest plain Conformer that fits: ``ffn = 4·d``, 4 heads, kernel 15, at
  least 4 layers, nothing shared (the search's no-sharing reference).
- ``paper``: a paper-style hand design (Hernandez et al. 2023; Takase & Kiyono 2021): stored
  blocks run three times in a ``cycle``, low-rank feed-forward (rank ``d/4``, shared ``U``) and
  per-layer norms and biases; the largest of that shape that fits.

Both take the front end and vocabulary the space fixes, so they compete on equal terms.
"""

from __future__ import annotations

import json
from pathlib import Path

from nas.budget import Budget, count
from nas.config import ArchConfig
from nas.errors import UserError
from nas.space import Space

WIDTHS = range(16, 385, 16)


def _common(space: Space) -> dict:
    fixed = {k.name: k.spec for k in space.knobs if k.fixed}
    return {"frontend": {"n_mels": fixed.get("frontend.n_mels", 80), "channels": fixed.get("frontend.channels", 32)},
            "vocab_size": fixed.get("vocab_size", 64)}


def _largest(designs: list[dict], budget: Budget) -> ArchConfig | None:
    counted = [(count(a), a) for a in map(ArchConfig.from_dict, designs)]
    fitting = [(c.physical, a) for c, a in counted if budget.fits(c)]
    return max(fitting, key=lambda pa: pa[0])[1] if fitting else None


def unshared(space: Space, budget: Budget) -> ArchConfig | None:
    base = _common(space)
    return _largest([base | {"encoder": {"d_model": d, "n_heads": 4, "ffn_dim": 4 * d, "conv_kernel": 15,
                                         "n_layers": layers}}
                     for d in WIDTHS for layers in range(4, 25)], budget)


def paper_style(space: Space, budget: Budget, repeats: int = 3) -> ArchConfig | None:
    base = _common(space)
    designs = []
    for d in WIDTHS:
        low_rank = {"rank": d // 4, "share": "U"}
        for blocks in range(2, 9):
            designs.append(base | {
                "encoder": {"d_model": d, "n_heads": 4, "ffn_dim": 4 * d, "conv_kernel": 15,
                            "n_layers": blocks * repeats},
                "sharing": {"blocks": {"pattern": "cycle", "n": blocks},
                            "low_rank": {"ffn_in": low_rank, "ffn_out": low_rank}, "per_layer_cheap": True},
            })
    return _largest(designs, budget)


def baselines(space: Space, budget: Budget) -> list[tuple[str, ArchConfig]]:
    found = [("unshared", unshared(space, budget)), ("paper", paper_style(space, budget))]
    return [(label, arch) for label, arch in found if arch is not None]


def load_enqueue_files(paths: list[Path]) -> list[tuple[str, ArchConfig]]:
    """Designs from ``--enqueue`` files: one ArchConfig per file, or a JSON list of them."""
    out = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(str(path), "", "file not found") from None
        except json.JSONDecodeError as exc:
            raise UserError(str(path), "", f"not valid JSON ({exc.msg})") from None
        docs = doc if isinstance(doc, list) else [doc]
        for i, d in enumerate(docs):
            label = f"{Path(path).stem}[{i}]" if isinstance(doc, list) else Path(path).stem
            out.append((label, ArchConfig.from_dict(d, source=f"{path}" + (f"[{i}]" if isinstance(doc, list) else ""))))
    return out
