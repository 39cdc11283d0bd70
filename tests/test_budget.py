"""The budget: exact by construction, checked against the built model."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import arch_configs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nas.budget import DTYPE_BYTES, FRAME_RATE, MACS_WINDOW_S, count, macs_per_second, parse_budget
from nas.config import ArchConfig
from nas.errors import UserError
from nas.model import ConformerCTC
from nas.plan import build_plan


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(arch_configs())
def test_arithmetic_count_equals_unique_parameters_of_the_built_model(arch):
    c = count(arch)
    model = ConformerCTC(arch)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert c.physical == sum(unique.values())
    assert c.buffers == sum(b.numel() for b in {id(b): b for b in model.buffers()}.values())
    # The bytes of the stored tensors cast to each dtype, as the model holds them: each shared tensor once.
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    assert set(torch_dtypes) == set(DTYPE_BYTES)
    unique_tensors = {id(p): p for p in model.parameters()}.values()
    for dtype, t in torch_dtypes.items():
        assert c.bytes(dtype) == sum(p.detach().to(t).nbytes for p in unique_tensors)
    assert c.virtual >= c.physical


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(arch_configs())
def test_model_wires_every_use_to_the_tensor_the_plan_names(arch):
    """Two uses hold the same object exactly when the plan gives them the same stored key."""
    plan = build_plan(arch)
    model = ConformerCTC(arch)
    for slot in plan.slots:
        objs = [model.store.get(slot.name, l) for l in range(arch.encoder.n_layers)]
        for a in range(len(objs)):
            for b in range(len(objs)):
                same_key = slot.ids[a] == slot.ids[b]
                assert (objs[a] is objs[b]) == same_key, (slot.name, a, b)
    # and the layers really use what the store holds
    layer_params = {id(p) for layer in model.layers for p in layer.parameters()}
    assert layer_params == {id(p) for p in model.store.parameters()}


def test_unshared_design_counts_its_virtual_parameters_once():
    c = count(ArchConfig())
    assert c.physical == c.virtual == 7_993_488  # d=144, 16 layers, 64 front-end channels


def test_sharing_reduces_physical_but_not_virtual_parameters():
    plain = count(ArchConfig.from_dict({"encoder": {"n_layers": 12}}))
    shared = count(ArchConfig.from_dict({"encoder": {"n_layers": 12},
                                         "sharing": {"blocks": {"pattern": "cycle_rev", "n": 4}}}))
    layer = (plain.physical - plain.by_part["frontend"] - plain.by_part["head"]) // 12
    assert plain.physical - shared.physical == 8 * layer
    assert shared.virtual == plain.virtual


MACS_SHARING = {
    "unshared": {},
    "ties-low-rank-blocks": {
        "ties": {"attn_qk": True, "conv_glu": True, "ffn_macaron": True},
        "low_rank": {"ffn_in": {"rank": 16, "share": "U"}, "attn_qkv": {"rank": 8}},
        "blocks": {"pattern": "cycle", "n": 2}},
    # the output projection stores the value projection's matrix but applies it to another input
    "attn-v-out-tie": {"ties": {"attn_v_out": True}},
    "low-rank-conv-pw": {"low_rank": {"conv_pw": {"rank": 8, "share": "V"}}, "ties": {"conv_glu": True}},
}


def macs_arch(sharing: dict) -> ArchConfig:
    return ArchConfig.from_dict({"encoder": {"d_model": 64, "n_heads": 4, "ffn_dim": 128, "conv_kernel": 7,
                                             "n_layers": 4}, "sharing": sharing})


@pytest.mark.parametrize("seconds", [10.0, 2.5])  # attention's T×T products make MACs/s depend on it
@pytest.mark.parametrize("sharing", MACS_SHARING.values(), ids=MACS_SHARING.keys())
def test_macs_equal_torch_flop_counter(sharing, seconds):
    """The arithmetic against torch's count of what the built model runs (a MAC is 2 FLOPs)."""
    arch = macs_arch(sharing)
    model = ConformerCTC(arch).eval()
    frames = round(seconds * FRAME_RATE)
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, frames, 80), torch.tensor([frames]))
    assert round(macs_per_second(arch, seconds=seconds) * seconds) * 2 == fc.get_total_flops()
    if seconds == MACS_WINDOW_S:
        assert count(arch).macs_per_second == macs_per_second(arch)


def test_ties_change_storage_not_compute():
    """A tie stores one matrix for two products on different inputs: fewer parameters, the same MACs."""
    untied, tied = macs_arch({}), macs_arch(MACS_SHARING["attn-v-out-tie"])
    assert count(untied).physical - count(tied).physical == 4 * 64 * 64  # one d×d matrix per layer
    assert macs_per_second(tied) == macs_per_second(untied)


@given(st.integers(1, 10**9))
def test_parameter_budgets_parse_exactly(n):
    assert parse_budget(str(n)).max_params == n
    assert parse_budget(f"{n}K").max_params == n * 1000


@given(st.integers(1, 10**6), st.sampled_from(sorted(DTYPE_BYTES)))
def test_byte_budgets_at_a_dtype(n, dtype):
    b = parse_budget(f"{n}MB@{dtype}")
    assert b.max_bytes == n * 10**6 and b.dtype == dtype
    assert b.max_params == n * 10**6 // DTYPE_BYTES[dtype]
    assert parse_budget(f"{n}MiB@{dtype}").max_bytes == n * 2**20


@given(st.integers(1, 5_000_000), st.integers(1, 5_000_000))
def test_fits_iff_bytes_within_budget(params, limit):
    from nas.budget import Budget, Count
    b = Budget(limit, "int8", "x")
    assert b.fits(Count(params, params, 0)) == (params <= limit)


@pytest.mark.parametrize("text", ["4XB@int9", "", "-1M", "1M@fp32", "4MB", "4MB@fp16", "0", "lots"])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(UserError) as e:
        parse_budget(text, "space.yaml", "budget")
    assert e.value.line().startswith("error: space.yaml: budget: ")
