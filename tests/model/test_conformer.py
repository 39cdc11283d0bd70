"""The model: parity with torchaudio's Conformer, and sharing that is real."""

import copy

import pytest
import torch
import torchaudio

from nas.config import ArchConfig
from nas.model import ConformerCTC, Linear


def plain(**enc) -> ArchConfig:
    base = dict(d_model=64, n_heads=4, ffn_dim=128, conv_kernel=7, n_layers=3)
    return ArchConfig.from_dict({"encoder": base | enc})


def copy_from_torchaudio(model: ConformerCTC, ta: torchaudio.models.Conformer) -> None:
    """Load torchaudio's weights into an unshared, full-rank model (independent name mapping)."""
    d = model.arch.encoder.d_model
    with torch.no_grad():
        for ours, theirs in zip(model.layers, ta.conformer_layers):
            for o, t in ((ours.ffn1, theirs.ffn1), (ours.ffn2, theirs.ffn2)):
                o.norm.load_state_dict(t.sequential[0].state_dict())
                o.inner.weight.copy_(t.sequential[1].weight), o.inner.bias.copy_(t.sequential[1].bias)
                o.outer.weight.copy_(t.sequential[4].weight), o.outer.bias.copy_(t.sequential[4].bias)
            ours.attn.norm.load_state_dict(theirs.self_attn_layer_norm.state_dict())
            mha = theirs.self_attn
            for i, proj in enumerate((ours.attn.q, ours.attn.k, ours.attn.v)):
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            ours.attn.out.weight.copy_(mha.out_proj.weight), ours.attn.out.bias.copy_(mha.out_proj.bias)
            cm, seq = ours.conv, theirs.conv_module.sequential
            cm.norm.load_state_dict(theirs.conv_module.layer_norm.state_dict())
            cm.pw1.weight.copy_(seq[0].weight[:, :, 0]), cm.pw1.bias.copy_(seq[0].bias)
            cm.dw_weight.copy_(seq[2].weight[:, 0, :]), cm.dw_bias.copy_(seq[2].bias)
            cm.bn.load_state_dict(seq[3].state_dict())
            cm.pw2.weight.copy_(seq[5].weight[:, :, 0]), cm.pw2.bias.copy_(seq[5].bias)
            ours.final_norm.load_state_dict(theirs.final_layer_norm.state_dict())


def encoder_params(model: ConformerCTC) -> int:
    return model.num_params() - sum(p.numel() for p in model.frontend.parameters()) - sum(
        p.numel() for p in model.head.parameters())


@pytest.mark.parametrize("enc", [
    {}, {"d_model": 144, "n_heads": 4, "ffn_dim": 576, "conv_kernel": 31, "n_layers": 16},
    {"d_model": 96, "n_heads": 3, "ffn_dim": 384, "conv_kernel": 15, "n_layers": 5},
])
def test_unshared_encoder_has_torchaudio_parameter_count(enc):
    arch = plain(**enc)
    e = arch.encoder
    ta = torchaudio.models.Conformer(e.d_model, e.n_heads, e.ffn_dim, e.n_layers, e.conv_kernel)
    assert encoder_params(ConformerCTC(arch)) == sum(p.numel() for p in ta.parameters())


def test_unshared_encoder_computes_torchaudio_outputs():
    torch.manual_seed(0)
    arch = plain()
    e = arch.encoder
    ta = torchaudio.models.Conformer(e.d_model, e.n_heads, e.ffn_dim, e.n_layers, e.conv_kernel, dropout=0.1)
    # Non-trivial BatchNorm statistics, so that eval mode really uses them.
    for layer in ta.conformer_layers:
        bn = layer.conv_module.sequential[3]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.2, 0.2)
    model = ConformerCTC(arch)
    copy_from_torchaudio(model, ta)
    model.eval(), ta.eval()
    x = torch.randn(3, 37, e.d_model)

    def ours(x, lengths):
        mask = torch.arange(x.shape[1])[None] >= lengths[:, None]
        with torch.no_grad():
            for layer in model.layers:
                x = layer(x, mask)
        return x

    full = torch.full((3,), 37)
    with torch.no_grad():
        want, _ = ta(x, full)
    assert torch.allclose(ours(x, full), want, atol=1e-5), (ours(x, full) - want).abs().max()
    # Padded: each utterance's valid frames are what torchaudio computes for it alone. (In a padded
    # batch torchaudio's depthwise convolution reads the padding next to the last frames; ours
    # zeroes it first, so an utterance's output does not depend on the batch it is in.)
    lengths = torch.tensor([37, 30, 11])
    got = ours(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        with torch.no_grad():
            alone, _ = ta(x[i:i + 1, :n], lengths[i:i + 1])
        assert torch.allclose(got[i, :n], alone[0], atol=1e-5), (got[i, :n] - alone[0]).abs().max()


def shared_arch() -> ArchConfig:
    return ArchConfig.from_dict({
        "encoder": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "conv_kernel": 5, "n_layers": 4},
        "sharing": {"blocks": {"pattern": "cycle", "n": 2},
                    "modules": {"conv": {"pattern": "cycle", "n": 1}},
                    "ties": {"ffn_macaron": True},
                    "low_rank": {"ffn_in": {"rank": 8, "share": "U"}}},
    })


def test_changing_a_shared_tensor_changes_every_layer_that_uses_it():
    torch.manual_seed(0)
    model = ConformerCTC(shared_arch(), dropout=0.0).eval()
    conv_weight = model.layers[0].conv.pw2.weight
    assert all(layer.conv.pw2.weight is conv_weight for layer in model.layers)  # one conv for all
    x = torch.randn(2, 12, 32)
    outputs = []

    def record(_module, _inp, out):
        outputs.append(out.detach().clone())

    def conv_outputs() -> list[torch.Tensor]:  # each virtual layer's conv output, running the layers in turn
        outputs.clear()
        h = x
        for layer in model.layers:
            h = layer(h, None)
        return list(outputs)

    hooks = [layer.conv.register_forward_hook(record) for layer in model.layers]
    with torch.no_grad():
        before = conv_outputs()
        conv_weight.add_(0.1)
        after = conv_outputs()
    for h in hooks:
        h.remove()
    assert len(before) == len(after) == 4  # one conv call per virtual layer
    for b, a in zip(before, after):
        assert not torch.allclose(b, a)
    # The basis U of the low-rank feed-forward input is shared by all four layers' both halves' ffn1.
    u = model.layers[0].ffn1.inner.U
    assert all(layer.ffn1.inner.U is u and layer.ffn2.inner.U is u for layer in model.layers)


def test_gradient_of_a_shared_tensor_is_the_sum_over_its_uses():
    torch.manual_seed(0)
    model = ConformerCTC(shared_arch(), dropout=0.0).eval()
    feats, lengths = torch.randn(2, 40, 80), torch.tensor([40, 33])
    model(feats, lengths)[0].sum().backward()
    shared = model.layers[0].conv.pw2.weight
    grad_shared = shared.grad.clone()

    # An unshared copy: every layer gets its own clone of the tensor; sum their gradients.
    twin = copy.deepcopy(model)
    twin.zero_grad()
    clones = []
    for layer in twin.layers:
        clone = torch.nn.Parameter(layer.conv.pw2.weight.detach().clone())
        layer.conv.pw2 = Linear(weight=clone, bias=layer.conv.pw2.bias)
        clones.append(clone)
    twin(feats, lengths)[0].sum().backward()
    assert torch.allclose(grad_shared, sum(c.grad for c in clones), atol=1e-5)
    assert model.num_params() < twin.num_params()


def test_low_rank_at_full_rank_from_svd_reproduces_the_matrix():
    torch.manual_seed(0)
    W = torch.randn(48, 32)
    U_, S, Vh = torch.linalg.svd(W, full_matrices=False)
    lin = Linear(U=torch.nn.Parameter(U_ * S), V=torch.nn.Parameter(Vh))
    x = torch.randn(5, 32)
    assert torch.allclose(lin(x), x @ W.T, atol=1e-4)


def test_saved_model_stores_each_shared_tensor_once(tmp_path):
    from nas.budget import count

    arch = ArchConfig.from_dict({"encoder": {"n_layers": 12},
                                 "sharing": {"blocks": {"pattern": "cycle_rev", "n": 3},
                                             "modules": {"conv": {"pattern": "cycle", "n": 1}},
                                             "low_rank": {"ffn_in": {"rank": 32, "share": "U"}}}})
    c = count(arch)
    assert c.virtual > 3 * c.physical
    model = ConformerCTC(arch)
    path = tmp_path / "model.safetensors"
    model.save(path)
    assert abs(path.stat().st_size - c.bytes("fp32")) / c.bytes("fp32") < 0.05
    torch.save(model.state_dict(), tmp_path / "model.pt")  # torch.save keeps sharing too
    assert abs((tmp_path / "model.pt").stat().st_size - c.bytes("fp32")) / c.bytes("fp32") < 0.05

    loaded = ConformerCTC.load(arch, path).eval()
    model.eval()
    feats, lengths = torch.randn(2, 50, 80), torch.tensor([50, 41])
    with torch.no_grad():
        assert torch.equal(model(feats, lengths)[0], loaded(feats, lengths)[0])
    # sharing survives the round trip
    assert all(layer.conv.pw2.weight is loaded.layers[0].conv.pw2.weight for layer in loaded.layers)


@pytest.mark.parametrize("factor", [4, 6, 8])
def test_each_front_end_is_counted_exactly_and_maps_lengths_as_the_plan_says(factor):
    from nas.budget import count
    from nas.plan import subsampled_frames

    arch = ArchConfig.from_dict({"frontend": {"channels": 8, "subsampling": factor}, "vocab_size": 40,
                                 "encoder": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 2,
                                             "conv_kernel": 7}})
    model = ConformerCTC(arch).eval()
    assert model.num_params() == count(arch).physical
    lengths = torch.tensor([200, 137, 61])
    feats = torch.randn(3, 200, 80)
    with torch.no_grad():
        log_probs, out = model(feats, lengths)
    want = [subsampled_frames(int(n), factor) for n in lengths]
    assert out.tolist() == want and log_probs.shape[1] == want[0]
    # the frame rate each factor promises: 200 frames (2 s) give about 200 / factor
    assert abs(want[0] - 200 / factor) <= 2


def test_residual_branches_start_at_a_tenth_of_nn_linear_scale():
    """Each branch's output matrix (or the U of its factors) is drawn from ±0.1/√fan_in; every other
    matrix keeps nn.Linear's ±1/√fan_in, so a deep shared stack starts near the identity. The
    schedules set the gain: 0.1 in every recipe but ``full-v1``, the one before it."""
    from nas.schedule import SCHEDULES, load_schedule

    gains = {p.stem: load_schedule(p.stem).branch_init_gain for p in SCHEDULES.glob("*.yaml")}
    assert gains.pop("full-v1") == 1.0 and set(gains.values()) == {0.1} and len(gains) >= 5
    torch.manual_seed(0)
    arch = ArchConfig.from_dict({
        "encoder": {"d_model": 64, "n_heads": 4, "ffn_dim": 256, "conv_kernel": 7, "n_layers": 2},
        "sharing": {"ties": {"attn_v_out": True},
                    "low_rank": {"ffn_out": {"rank": 16, "share": "U"}}},
    })
    layer = ConformerCTC(arch).layers[0]

    def spans(w, fan_in, gain):  # a uniform draw of this many elements nearly reaches its bound
        bound = gain / fan_in ** 0.5
        return w.abs().max().item() <= bound and w.abs().max().item() > 0.9 * bound

    assert spans(layer.conv.pw2.weight, 64, 0.1)
    assert spans(layer.ffn1.outer.U, 16, 0.1 * 3 ** 0.5)  # U·V keeps nn.Linear's variance, then the gain
    assert spans(layer.ffn1.outer.V, 256, 1.0)
    assert spans(layer.ffn1.inner.weight, 64, 1.0) and spans(layer.conv.pw1.weight, 64, 1.0)
    assert layer.attn.out.weight is layer.attn.v.weight and spans(layer.attn.v.weight, 64, 1.0)  # tied to v
    assert spans(ConformerCTC(arch, branch_init_gain=1.0).layers[0].conv.pw2.weight, 64, 1.0)
