"""ArchConfig: validation with named fields, JSON round trip, the sharing maps."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from strategies import arch_configs

from nas.config import ArchConfig, Tiling, resolve_map
from nas.errors import UserError


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(arch_configs())
def test_json_round_trip(arch):
    again = ArchConfig.from_json(arch.to_json())
    assert again == arch and hash(again) == hash(arch)


@pytest.mark.parametrize("pattern, n, want", [
    ("sequence", 3, (0, 0, 1, 1, 2, 2)),
    ("cycle", 3, (0, 1, 2, 0, 1, 2)),
    ("cycle_rev", 3, (0, 1, 2, 2, 1, 0)),
    ("cycle_rev", 3, (0, 1, 2, 0, 1, 2, 2, 1, 0)),
    ("cycle", 1, (0, 0, 0, 0, 0, 0)),
])
def test_named_maps(pattern, n, want):
    assert resolve_map(Tiling(pattern=pattern, n=n), len(want)) == want


def test_module_maps_run_over_stored_blocks():
    arch = ArchConfig.from_dict({"encoder": {"n_layers": 6},
                                 "sharing": {"blocks": {"pattern": "cycle", "n": 3},
                                             "modules": {"conv": {"pattern": "sequence", "n": 1},
                                                         "ffn": [0, 1, 0]}}})
    assert arch.block_map() == (0, 1, 2, 0, 1, 2)
    assert arch.instance_map("conv") == (0,) * 6
    assert arch.instance_map("ffn") == (0, 1, 0, 0, 1, 0)
    assert arch.instance_map("attn") == arch.block_map()


def err(doc: dict) -> str:
    with pytest.raises(UserError) as e:
        ArchConfig.from_dict(doc, source="arch.json")
    return e.value.line()


@pytest.mark.parametrize("doc, line", [
    ({"encoder": {"d_model": 100, "n_heads": 3}}, "error: arch.json: encoder: n_heads=3 does not divide d_model=100"),
    ({"encoder": {"depth": 3}}, "error: arch.json: encoder.depth: unknown key"),
    ({"sharing": {"low_rank": {"ffn_in": {"rank": 400}}}},
     "error: arch.json: sharing.low_rank.ffn_in.rank: 400 exceeds min(out, in) = 144"),
    ({"encoder": {"n_layers": 4}, "sharing": {"blocks": [0, 1, 3, 1]}},
     "error: arch.json: sharing.blocks: ids must be 0..n-1 with none missing, got [0, 1, 3]"),
    ({"encoder": {"n_layers": 4}, "sharing": {"blocks": [0, 1, 1]}},
     "error: arch.json: sharing.blocks: explicit map has 3 entries, expected 4"),
    ({"encoder": {"n_layers": 4}, "sharing": {"blocks": {"pattern": "cycle", "n": 2},
                                              "modules": {"conv": {"pattern": "cycle", "n": 3}}}},
     "error: arch.json: sharing.modules.conv: 3 stored items for 2 positions"),
    ({"sharing": {"ties": {"attn_v_out": True}, "low_rank": {"attn_out": {"rank": 16}}}},
     "error: arch.json: sharing.ties.attn_v_out: value and output projections differ"),
    ({"sharing": {"blocks": {"pattern": "spiral", "n": 2}}}, "error: arch.json: sharing.blocks.pattern: Input should be"),
    ({"vocab_size": "many"}, "error: arch.json: vocab_size: Input should be a valid integer"),
    ({"schema_version": 7}, "error: arch.json: schema_version: Input should be 1"),
    ({"sharing": {"low_rank": {"conv_pw": {"share": "U"}}}},
     "error: arch.json: sharing.low_rank.conv_pw.share: factors can only be shared when a rank is set"),
])
def test_bad_configs_name_their_field(doc, line):
    assert err(doc).startswith(line)


def test_load_names_the_file(tmp_path):
    p = tmp_path / "arch.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match=r"^error: .*arch.json: not valid JSON"):
        ArchConfig.load(p)
    p.write_text(json.dumps({"arch": ArchConfig().model_dump(), "provenance": {"study": "s"}}))
    assert ArchConfig.load(p) == ArchConfig()
