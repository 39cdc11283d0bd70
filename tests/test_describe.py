"""A design's sharing in words and its layer map: exact strings for designs across the four levels."""

import pytest

from nas.config import ArchConfig
from nas.describe import layer_map, sharing_in_words, sharing_levels


def arch(n_layers: int, **sharing) -> ArchConfig:
    return ArchConfig.from_dict({"encoder": {"d_model": 64, "n_heads": 4, "ffn_dim": 256, "n_layers": n_layers},
                                 "sharing": sharing})


LOW_RANK_U = {"rank": 32, "share": "U"}

CASES = [
    pytest.param(arch(6), "6 layers, nothing shared",
                 "blocks A B C D E F | ffn A B C D E F | attn A B C D E F | conv A B C D E F", id="plain"),
    pytest.param(arch(12, blocks={"pattern": "cycle_rev", "n": 4}, modules={"conv": {"pattern": "cycle", "n": 1}},
                      low_rank={"ffn_in": LOW_RANK_U, "ffn_out": LOW_RANK_U}, ties={"attn_qk": True},
                      per_layer_cheap=True),
                 "12 virtual layers on 4 stored blocks (cycle_rev); one convolution module for all layers; "
                 "feed-forward rank 32 with shared U; query/key tied; per-layer norms and biases",
                 "blocks A B C D A B C D D C B A | ffn A B C D A B C D D C B A | attn A B C D A B C D D C B A | "
                 "conv A A A A A A A A A A A A", id="paper-like"),
    pytest.param(arch(6, blocks={"pattern": "cycle_rev", "n": 3}),
                 "6 virtual layers on 3 stored blocks (cycle_rev)",
                 "blocks A B C C B A | ffn A B C C B A | attn A B C C B A | conv A B C C B A", id="cycle_rev"),
    pytest.param(arch(6, blocks=[0, 1, 2, 2, 1, 0], modules={"attn": [0, 0, 1]},
                      low_rank={"ffn_in": {"rank": 8}, "attn_qkv": {"rank": 16, "share": "UV", "groups": 2}},
                      ties={"ffn_macaron": True, "attn_qk": True, "conv_glu": True}),
                 "6 virtual layers on 3 stored blocks (explicit A B C C B A); 2 self-attention modules for 3 blocks "
                 "(explicit A A B); feed-forward input rank 8; attention q/k/v rank 16 with U and V shared within 2 "
                 "groups; macaron feed-forward halves, query/key and GLU halves tied",
                 "blocks A B C C B A | ffn A B C C B A | attn A A B B A A | conv A B C C B A", id="explicit"),
    pytest.param(arch(6, blocks={"pattern": "sequence", "n": 2}, modules={"ffn": {"pattern": "cycle", "n": 1},
                                                                           "attn": {"pattern": "cycle", "n": 1}},
                      low_rank={"ffn_in": {"rank": 16, "share": "V"}, "ffn_out": {"rank": 16},
                                "conv_pw": {"rank": 8}}, ties={"attn_v_out": True}),
                 "6 virtual layers on 2 stored blocks (sequence); one feed-forward and one self-attention module "
                 "for all layers; feed-forward input rank 16 with shared V; feed-forward output rank 16; pointwise "
                 "convolution rank 8; value/output tied",
                 "blocks A A A B B B | ffn A A A A A A | attn A A A A A A | conv A A A B B B", id="merged-modules"),
    pytest.param(arch(4, blocks={"pattern": "cycle", "n": 1}, per_layer_cheap=True),
                 "4 virtual layers on one stored block; per-layer norms and biases",
                 "blocks A A A A | ffn A A A A | attn A A A A | conv A A A A", id="one-block"),
    pytest.param(arch(6, low_rank={"attn_qkv": {"rank": 16}, "attn_out": {"rank": 16}}, per_layer_cheap=True),
                 "6 layers, nothing shared; attention rank 16",  # per-layer norms change nothing here
                 "blocks A B C D E F | ffn A B C D E F | attn A B C D E F | conv A B C D E F", id="low-rank-only"),
    pytest.param(arch(6, blocks={"pattern": "cycle", "n": 6}), "6 layers, nothing shared",
                 "blocks A B C D E F | ffn A B C D E F | attn A B C D E F | conv A B C D E F",
                 id="pattern-without-effect"),
]


@pytest.mark.parametrize(("design", "words", "layers"), CASES)
def test_sharing_in_words_and_layer_map(design, words, layers):
    assert sharing_in_words(design) == words
    assert layer_map(design) == layers


def test_layer_map_uses_numbers_past_26_ids():
    design = arch(28, blocks={"pattern": "cycle", "n": 27}, modules={"conv": {"pattern": "sequence", "n": 1}})
    ids = " ".join(str(i) for i in range(27)) + " 0"
    assert layer_map(design) == f"blocks {ids} | ffn {ids} | attn {ids} | conv {' '.join(['0'] * 28)}"
    words = "28 virtual layers on 27 stored blocks (cycle); one convolution module for all layers"
    assert sharing_in_words(design) == words


# The levels each case above uses, read off its config by hand: repeated blocks (fewer stored
# blocks than layers), modules shared among blocks (fewer instances of a kind than stored blocks),
# any tie, any low-rank family.
LEVELS_OF = {"plain": (), "paper-like": ("blocks", "modules", "ties", "low rank"), "cycle_rev": ("blocks",),
             "explicit": ("blocks", "modules", "ties", "low rank"),
             "merged-modules": ("blocks", "modules", "ties", "low rank"), "one-block": ("blocks",),
             "low-rank-only": ("low rank",), "pattern-without-effect": ()}


@pytest.mark.parametrize(("design", "levels"), [pytest.param(c.values[0], LEVELS_OF[c.id], id=c.id) for c in CASES])
def test_sharing_levels(design, levels):
    assert sharing_levels(design) == levels


def test_as_many_module_instances_as_blocks_is_not_module_sharing():
    design = arch(6, blocks={"pattern": "cycle", "n": 3}, modules={"conv": {"pattern": "cycle", "n": 3}},
                  ties={"conv_glu": True})
    assert sharing_levels(design) == ("blocks", "ties")
