"""Relative positions in self-attention (``encoder.rel_pos_buckets``): T5's buckets, one learned
bias per head and bucket stored with the attention module, counted exactly, shared as the module
is, masked as padding is, and carried through ONNX at fp32 and int8."""

import numpy as np
import pytest
import torch

from nas.budget import count
from nas.config import ArchConfig
from nas.measure import file_bytes
from nas.model import ConformerCTC
from nas.model.conformer import relative_buckets
from nas.onnx_export import onnx_model
from nas.quantize import convert
from nas.runtime import session

# 6 virtual layers on 3 stored blocks; one attention module for all of them.
REL = {"frontend": {"channels": 8}, "vocab_size": 30,
       "encoder": {"d_model": 32, "n_heads": 4, "ffn_dim": 64, "n_layers": 6, "conv_kernel": 5, "rel_pos_buckets": 16},
       "sharing": {"blocks": {"pattern": "cycle", "n": 3}, "modules": {"attn": {"pattern": "cycle", "n": 1}}}}


def test_buckets_are_t5s_exact_near_log_spaced_far_and_apart_by_direction():
    b = relative_buckets(400, 16)  # 8 buckets a direction: distances 0-3 exact, then log-spaced to 128
    assert b.shape == (400, 400) and b.dtype == torch.long
    assert (b.diagonal() == 0).all()
    assert [b[100, 100 - k].item() for k in range(4)] == [0, 1, 2, 3]  # keys before the query
    assert [b[100, 100 + k].item() for k in range(1, 4)] == [9, 10, 11]  # after: the other half
    before, after = b[399].flip(0), b[0]  # distance 0..399 each way
    assert (before.diff() >= 0).all() and (after[1:].diff() >= 0).all()  # farther never nearer
    assert before.max() == 7 and after.max() == 15 and after[1:].min() == 9
    assert before[128:].eq(7).all() and before[50].item() == 6  # the last bucket from 54 frames on
    assert torch.equal(relative_buckets(50, 16), b[:50, :50])  # a distance's bucket, whatever the length


def test_the_bias_table_is_counted_exactly_and_shared_with_the_attention_module():
    arch = ArchConfig.from_dict(REL)
    without = ArchConfig.from_dict(REL | {"encoder": REL["encoder"] | {"rel_pos_buckets": 0}})
    model = ConformerCTC(arch)
    assert count(arch).physical == model.num_params() == count(without).physical + 4 * 16  # one module, one table
    tables = {id(layer.attn.rel_bias) for layer in model.layers}
    assert len(tables) == 1 and model.uses()[model.layers[0].attn.rel_bias] == 6
    cheap = ArchConfig.from_dict(REL | {"sharing": REL["sharing"] | {"per_layer_cheap": True}})
    assert count(cheap).physical - count(ArchConfig.from_dict(
        REL | {"encoder": REL["encoder"] | {"rel_pos_buckets": 0}, "sharing": REL["sharing"] | {"per_layer_cheap": True}}
    )).physical == 6 * 4 * 16  # per layer, as biases are
    assert ConformerCTC(cheap).num_params() == count(cheap).physical
    for bad in (2, 5):
        with pytest.raises(Exception, match="rel_pos_buckets"):
            ArchConfig.from_dict(REL | {"encoder": REL["encoder"] | {"rel_pos_buckets": bad}})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ConformerCTC(ArchConfig.from_dict(REL)).eval()
    with torch.no_grad():
        m.layers[0].attn.rel_bias.normal_(0, 2.0)  # zero at the start; a trained table is not
    return m


def test_the_bias_moves_the_output_and_padding_still_changes_nothing(model):
    torch.manual_seed(1)
    feats, lengths = torch.randn(2, 300, 80), torch.tensor([300, 210])
    with torch.no_grad():
        batch, out_lengths = model(feats, lengths)
        alone, _ = model(feats[1:, :210], lengths[1:])
        table = model.layers[0].attn.rel_bias
        saved = table.clone()
        table.zero_()
        blind, _ = model(feats, lengths)
        table.copy_(saved)
    assert (batch[1, :out_lengths[1]] - alone[0]).abs().max() < 1e-4
    assert (batch - blind).abs().max() > 0.1


def test_onnx_computes_what_pytorch_computes_and_int8_holds_the_table_once(model):
    fp32 = onnx_model(model)
    torch.manual_seed(2)
    feats, lengths = torch.randn(2, 260, 80), torch.tensor([260, 180])
    with torch.no_grad():
        want, _ = model(feats, lengths)
    got = session(fp32).run(None, {"feats": feats.numpy(), "lengths": lengths.numpy()})[0]
    assert np.abs(got - want.numpy()).max() < 1e-4
    stored = model.stored_state().keys()
    params = {k for k, _ in model.named_parameters()} & stored
    int8 = convert(fp32, params, "int8", activations="float")
    f = file_bytes(int8, model.arch, "int8", params, set(stored) - params)
    assert (f["weights"], f["difference"]) == (count(model.arch).bytes("int8"), 0)
    assert np.abs(session(int8).run(None, {"feats": feats.numpy(), "lengths": lengths.numpy()})[0] - got).max() < 0.5


def test_a_design_without_relative_positions_serializes_and_hashes_as_before_the_field_existed():
    from nas.schedule import load_schedule
    from nas.workers import run_key

    arch = ArchConfig.load("search_spaces/designs/unshared-1m.json")
    assert "rel_pos_buckets" not in arch.to_json() and arch.encoder.rel_pos_buckets == 0
    # the key of this design's `full` run before 2026-12-06 (committed runs, studies and exports
    # are found again by it); that `full` is `full-v2` since 2026-12-07
    assert run_key(arch, load_schedule("full-v2").model_copy(update={"name": "full"})) == "5db8b1c3f34ba6c5"
    rel = ArchConfig.from_dict(arch.model_dump() | {"encoder": arch.encoder.model_dump() | {"rel_pos_buckets": 8}})
    assert '"rel_pos_buckets": 8' in rel.to_json() and ArchConfig.from_json(rel.to_json()) == rel != arch
