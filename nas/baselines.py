"""Designs that are always in the race: hand-made baselines that fit the budget, and ``--enqueue`` files.

- ``unshared``: the largest plain Conformer that fits: ``ffn = 4·d``, 4 heads, kernel 15, at
  least 4 layers, nothing shared (the search's no-sharing reference).
- ``paper``: a paper-style hand design (Hernandez et al. 2023; Takase & Kiyono 2021): stored
  blocks run three times in a ``cycle``, low-rank feed-forward (rank ``d/4``, shared ``U``) and
  per-layer norms and biases; the largest of that shape that fits.

Both take the vocabulary and mel bins the space fixes, and widths the space offers (any multiple of
16 up to 384 when it names none), so they compete on equal terms. Where the
space lets the front end vary (its channels, its subsampling), each baseline takes the option that
leaves the largest design within the budget (ties go to the wider front end): the strongest
setting that fits, never a fixed one the search could beat by choosing another.
"""

from __future__ import annotations

from pathlib import Path

from nas.budget import Budget, count
from nas.config import ArchConfig
from nas.files import read_json
from nas.space import Space

WIDTHS = range(16, 385, 16)


def _options(space: Space, field: str) -> list:
    """The values ``field`` can take in ``space``: its fixed value, its choices, or the default."""
    knob = next((k for k in space.knobs if k.name == field), None)
    if knob is None:
        section, name = field.split(".") if "." in field else (None, field)
        model = getattr(ArchConfig(), section) if section else ArchConfig()
        return [getattr(model, name)]
    return [knob.spec] if knob.fixed else list(getattr(knob.spec, "choice", None) or [])


def _commons(space: Space) -> list[dict]:
    """The fixed parts of a baseline, once per front end the space allows."""
    n_mels, vocab = _options(space, "frontend.n_mels")[0], _options(space, "vocab_size")[0]
    return [{"frontend": {"n_mels": n_mels, "channels": c, "subsampling": s}, "vocab_size": vocab}
            for c in _options(space, "frontend.channels") for s in _options(space, "frontend.subsampling")]


def _largest(designs: list[dict], budget: Budget) -> ArchConfig | None:
    counted = [(count(a), a) for a in map(ArchConfig.from_dict, designs)]
    fitting = [((c.physical, a.frontend.channels), a) for c, a in counted if budget.fits(c)]
    return max(fitting, key=lambda pa: pa[0])[1] if fitting else None


def _widths(space: Space) -> list[list[int]]:
    """The model widths a baseline may take: the space's own when it names them, else (or when none
    of those fits) any multiple of 16 up to 384."""
    named = [d for d in _options(space, "encoder.d_model") if isinstance(d, int)]
    return [named, list(WIDTHS)] if any(k.name == "encoder.d_model" for k in space.knobs) else [list(WIDTHS)]


def unshared(space: Space, budget: Budget) -> ArchConfig | None:
    for widths in _widths(space):
        found = _largest([base | {"encoder": {"d_model": d, "n_heads": 4, "ffn_dim": 4 * d, "conv_kernel": 15,
                                              "n_layers": layers}}
                          for base in _commons(space) for d in widths for layers in range(4, 25)], budget)
        if found:
            return found
    return None


def paper_style(space: Space, budget: Budget, repeats: int = 3) -> ArchConfig | None:
    for widths in _widths(space):
        if found := _paper_style(space, budget, widths, repeats):
            return found
    return None


def _paper_style(space: Space, budget: Budget, widths: list[int], repeats: int) -> ArchConfig | None:
    designs = []
    for base, d in ((base, d) for base in _commons(space) for d in widths):
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
    for path in map(Path, paths):
        doc = read_json(path)
        if not isinstance(doc, list):
            out.append((path.stem, ArchConfig.from_dict(doc, source=str(path))))
            continue
        for i, d in enumerate(doc):
            out.append((f"{path.stem}[{i}]", ArchConfig.from_dict(d, source=str(path), field=f"[{i}]")))
    return out
