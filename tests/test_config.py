"""ArchConfig: validation with named fields, JSON round trip, the sharing maps."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError
from strategies import arch_configs

from nas.config import ArchConfig, Tiling, dotted, resolve_map, user_error
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


@pytest.mark.parametrize("make, why", [
    (lambda p: None, "file not found"),
    (lambda p: p.mkdir(), "a directory, not a file"),
    (lambda p: p.write_bytes(b'{"encoder": {"d_model": \xff}}'),
     "not a text file: byte 0xff at offset 24 is not UTF-8"),
    (lambda p: p.write_text("[" * 100_000), "not valid JSON (nested too deeply)"),
])
def test_load_refuses_what_is_not_a_json_text_in_one_line(tmp_path, make, why):
    p = tmp_path / "arch.json"
    make(p)
    with pytest.raises(UserError) as e:
        ArchConfig.load(p)
    assert e.value.line() == f"error: {p}: {why}"


def test_a_byte_order_mark_is_dropped(tmp_path):
    p = tmp_path / "arch.json"
    p.write_bytes(b"\xef\xbb\xbf" + ArchConfig().to_json().encode())
    assert ArchConfig.load(p) == ArchConfig()


def test_an_unknown_key_is_named_before_the_missing_one_it_likely_replaces():
    from nas.schedule import Schedule

    with pytest.raises(ValidationError) as e:
        Schedule.model_validate({"name": "s", "stepz": 10})
    assert user_error("s.yaml", e.value).line() == "error: s.yaml: stepz: unknown key"


def test_field_names_stay_on_one_line():
    assert dotted("knobs", "encoder.d_model", 0) == "knobs.encoder.d_model.0"
    assert dotted("knobs", "a\nb") == "knobs.'a\\nb'"
    line = err({"encoder": {"bad\nkey": 1}})
    assert line == "error: arch.json: encoder.'bad\\nkey': unknown key"


def test_from_dict_can_name_where_the_design_sits():
    with pytest.raises(UserError, match=r"^error: designs.json: \[2\]\.encoder\.d_model: "):
        ArchConfig.from_dict({"encoder": {"d_model": "wide"}}, source="designs.json", field="[2]")
