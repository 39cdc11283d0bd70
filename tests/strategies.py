"""Hypothesis strategies shared by the tests: random valid `ArchConfig`s spanning all sharing levels."""

from hypothesis import assume
from hypothesis import strategies as st

from nas.config import FAMILIES, ArchConfig
from nas.errors import UserError

PATTERNS = ("sequence", "cycle", "cycle_rev")


@st.composite
def sharing_map(draw, length: int):
    """None (no sharing), a named tiling, or an explicit list that uses every id."""
    kind = draw(st.sampled_from(["none", "tiling", "list"]))
    if kind == "none":
        return None
    n = draw(st.integers(1, length))
    if kind == "tiling":
        return {"pattern": draw(st.sampled_from(PATTERNS)), "n": n}
    ids = list(range(n)) + draw(st.lists(st.integers(0, n - 1), min_size=length - n, max_size=length - n))
    return draw(st.permutations(ids))


@st.composite
def arch_configs(draw, max_dim: int = 24) -> ArchConfig:
    heads = draw(st.sampled_from([1, 2, 4]))
    d = heads * draw(st.integers(1, max_dim // heads))
    L = draw(st.integers(1, 8))
    blocks = draw(sharing_map(L))
    n_blocks = len(set(ArchConfig.from_dict({"encoder": {"n_layers": L, "d_model": d, "n_heads": heads},
                                             "sharing": {"blocks": blocks}}).block_map()))
    ffn = draw(st.integers(1, 2 * max_dim))
    low_rank = {}
    for fam in FAMILIES:
        if draw(st.booleans()):
            max_rank = min(d, ffn) if fam.startswith("ffn") else d
            low_rank[fam] = {"rank": draw(st.integers(1, max_rank)),
                             "share": draw(st.sampled_from(["none", "U", "V", "UV"])),
                             "groups": draw(st.integers(1, 2))}
    ties = {t: draw(st.booleans()) for t in ("ffn_macaron", "attn_qk", "attn_v_out", "conv_glu")}
    if ties["attn_v_out"]:
        if "attn_qkv" in low_rank:
            low_rank["attn_out"] = low_rank["attn_qkv"]
        else:
            low_rank.pop("attn_out", None)
    doc = {
        "frontend": {"n_mels": draw(st.integers(7, 24)), "channels": draw(st.integers(1, 6))},
        "encoder": {"d_model": d, "n_heads": heads, "ffn_dim": ffn,
                    "conv_kernel": draw(st.sampled_from([1, 3, 5])), "n_layers": L,
                    "rel_pos_buckets": draw(st.sampled_from([0, 4, 6]))},
        "vocab_size": draw(st.integers(2, 20)),
        "sharing": {
            "blocks": blocks,
            "modules": {k: draw(sharing_map(n_blocks)) for k in ("ffn", "attn", "conv")},
            "ties": ties,
            "low_rank": low_rank,
            "per_layer_cheap": draw(st.booleans()),
        },
    }
    try:
        return ArchConfig.from_dict(doc)
    except UserError:  # e.g. more factor groups than module instances
        assume(False)
