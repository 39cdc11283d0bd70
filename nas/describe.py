"""A design's weight sharing in words, and which stored weights each virtual layer uses.

Pure functions of an :class:`~nas.config.ArchConfig` (no torch), for reports and listings:

- :func:`sharing_in_words`: ``"12 virtual layers on 4 stored blocks (cycle_rev); one convolution
  module for all layers; feed-forward rank 32 with shared U; query/key tied; per-layer norms and
  biases"``; a plain Conformer reads ``"6 layers, nothing shared"``.
- :func:`layer_map`: ``"blocks A B C C B A | ffn A B C C B A | attn A A A A A A | conv A B C C B A"``,
  one letter per virtual layer for the stored block or module instance it runs (numbers from 0
  when there are more than 26).

Both describe what a config *does* (its resolved maps), so ``{"pattern": "cycle", "n": 6}`` on six
layers reads as no sharing at all.
"""

from __future__ import annotations

from string import ascii_uppercase

from nas.config import KINDS, ArchConfig, LowRank, SharingMap, Tiling, resolve_map

KIND_WORDS = {"ffn": "feed-forward", "attn": "self-attention", "conv": "convolution"}
TIE_WORDS = {"ffn_macaron": "macaron feed-forward halves", "attn_qk": "query/key", "attn_v_out": "value/output",
             "conv_glu": "GLU halves"}
# Low-rank families, and the name of a pair when both members have the same setting.
FAMILY_WORDS = {"ffn_in": "feed-forward input", "ffn_out": "feed-forward output", "attn_qkv": "attention q/k/v",
                "attn_out": "attention output", "conv_pw": "pointwise convolution"}
FAMILY_PAIRS = {("ffn_in", "ffn_out"): "feed-forward", ("attn_qkv", "attn_out"): "attention"}


def sharing_in_words(arch: ArchConfig) -> str:
    """The four sharing levels of ``arch`` as one line of clauses separated by ``"; "``."""
    blocks = arch.block_map()
    n_layers, n_blocks = len(blocks), len(set(blocks))
    clauses = [_blocks_clause(arch.sharing.blocks, n_layers, n_blocks, _ids(blocks))]
    module_clauses = _module_clauses(arch, n_blocks)
    low_rank = _low_rank_clauses(arch)
    tied = [words for name, words in TIE_WORDS.items() if getattr(arch.sharing.ties, name)]
    factors_shared = any(getattr(arch.sharing.low_rank, f).share != "none" for f in FAMILY_WORDS)
    if n_blocks == n_layers and not module_clauses and not tied and not factors_shared:
        clauses[0] += ", nothing shared"
    clauses += module_clauses + low_rank
    if tied:
        clauses.append(f"{_and(tied)} tied")
    if arch.sharing.per_layer_cheap and _layers_share_a_module(arch):
        clauses.append("per-layer norms and biases")
    return "; ".join(clauses)


LEVELS = ("blocks", "modules", "ties", "low rank")  # the four sharing levels of Hernandez et al. 2023


def sharing_levels(arch: ArchConfig) -> tuple[str, ...]:
    """The sharing levels ``arch`` uses, in :data:`LEVELS` order: repeated blocks, modules shared
    among stored blocks, tied sub-components, low-rank factors."""
    blocks = arch.block_map()
    n_blocks = len(set(blocks))
    used = {"blocks": n_blocks < len(blocks),
            "modules": any(arch.n_instances(kind) < n_blocks for kind in KINDS),
            "ties": any(tied for _, tied in arch.sharing.ties),
            "low rank": any(getattr(arch.sharing.low_rank, f).rank for f in FAMILY_WORDS)}
    return tuple(level for level in LEVELS if used[level])


def layer_map(arch: ArchConfig) -> str:
    """Per virtual layer, the stored block and the module instance of each kind it uses."""
    blocks = arch.block_map()
    maps = {"blocks": blocks} | {kind: arch.instance_map(kind, blocks) for kind in KINDS}
    numbers = max(max(m) for m in maps.values()) >= len(ascii_uppercase)
    return " | ".join(f"{name} {_ids(ids, numbers)}" for name, ids in maps.items())


# ---- clauses ------------------------------------------------------------------------------

def _blocks_clause(spec: SharingMap | None, n_layers: int, n_blocks: int, letters: str) -> str:
    if n_blocks == n_layers:
        return f"{n_layers} layer" + ("s" if n_layers != 1 else "")
    if n_blocks == 1:
        return f"{n_layers} virtual layers on one stored block"
    return f"{n_layers} virtual layers on {n_blocks} stored blocks ({_how(spec, letters)})"


def _module_clauses(arch: ArchConfig, n_blocks: int) -> list[str]:
    """How the stored blocks share modules, per kind; kinds with one module for all are merged."""
    single, out = [], []
    for kind in KINDS:
        n_inst = arch.n_instances(kind)
        if n_inst == n_blocks:  # each block has its own
            continue
        if n_inst == 1:
            single.append(KIND_WORDS[kind])
            continue
        spec = getattr(arch.sharing.modules, kind)
        how = _how(spec, _ids(resolve_map(spec, n_blocks)))
        out.append(f"{n_inst} {KIND_WORDS[kind]} modules for {n_blocks} blocks ({how})")
    if single:
        out.insert(0, f"{_and(['one ' + k for k in single])} module for all layers")
    return out


def _low_rank_clauses(arch: ArchConfig) -> list[str]:
    """One clause per low-rank family; a pair with the same setting (ffn in/out) reads as one."""
    lr = arch.sharing.low_rank
    out, merged = [], set()
    for fam, words in FAMILY_WORDS.items():
        setting = getattr(lr, fam)
        if fam in merged or setting.rank is None:
            continue
        for (a, b), pair_words in FAMILY_PAIRS.items():
            if fam == a and getattr(lr, b) == setting:
                words = pair_words
                merged.add(b)
        out.append(_factor_words(words, setting))
    return out


def _factor_words(family: str, lr: LowRank) -> str:
    text = f"{family} rank {lr.rank}"
    if lr.share == "none":
        return text
    factors = "U and V" if lr.share == "UV" else lr.share
    if lr.groups == 1:
        return f"{text} with shared {factors}"
    return f"{text} with {factors} shared within {lr.groups} groups"


def _layers_share_a_module(arch: ArchConfig) -> bool:
    """Whether per-layer norms and biases change anything: some module serves several layers."""
    n = arch.encoder.n_layers
    return any(arch.n_instances(kind) < n for kind in KINDS)


# ---- helpers ------------------------------------------------------------------------------

def _how(spec: SharingMap | None, letters: str) -> str:
    return spec.pattern if isinstance(spec, Tiling) else f"explicit {letters}"


def _ids(ids: tuple[int, ...], numbers: bool | None = None) -> str:
    """``(0, 1, 1)`` as ``"A B B"``; as numbers from 0 when some id is past Z."""
    if numbers is None:
        numbers = max(ids) >= len(ascii_uppercase)
    return " ".join(str(i) if numbers else ascii_uppercase[i] for i in ids)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
