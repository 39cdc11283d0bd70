"""The export: round trip, ONNX parity on real audio, each stored tensor once, the trainer reads it."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import nas.export
from nas.budget import count
from nas.config import ArchConfig
from nas.data.audio import load_audio
from nas.data.corpus import resolve_data
from nas.data.features import log_mel
from nas.data.manifest import read_manifest
from nas.data.tokenizer import Tokenizer
from nas.describe import layer_map, sharing_in_words
from nas.errors import UserError
from nas.export import check_onnx, load_export, transcribe, write_export
from nas.model import ConformerCTC
from nas.train import greedy_decode, load_schedule, train

# Unshared, 218,776 parameters: big enough that file metadata is far below 2%.
PLAIN = ArchConfig.from_dict({
    "frontend": {"channels": 16}, "vocab_size": 40,
    "encoder": {"d_model": 64, "n_heads": 4, "ffn_dim": 256, "n_layers": 2, "conv_kernel": 15}})
# Every level of sharing: 6 virtual layers on 3 stored blocks, one conv module for all, three ties,
# low-rank feed-forward with shared factors. 405,144 stored parameters, 1,667,016 virtual.
SHARED = ArchConfig.from_dict({
    "frontend": {"channels": 16}, "vocab_size": 40,
    "encoder": {"d_model": 144, "n_heads": 4, "ffn_dim": 576, "n_layers": 6, "conv_kernel": 15},
    "sharing": {"blocks": {"pattern": "cycle", "n": 3}, "modules": {"conv": {"pattern": "cycle", "n": 1}},
                "ties": {"attn_qk": True, "conv_glu": True, "ffn_macaron": True},
                "low_rank": {"ffn_in": {"rank": 48, "share": "U"}, "ffn_out": {"rank": 48, "share": "V"}},
                "per_layer_cheap": True}})
PROVENANCE = {"study": "test", "trial": 3, "proxy_wer": 0.91, "budget": "1M"}


@pytest.fixture(scope="module")
def wav(tiny_corpus_dir):
    return read_manifest(tiny_corpus_dir / "test.jsonl")[0].audio


@pytest.fixture(scope="module")
def plain_run(tiny_corpus_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("plain-run")
    schedule = load_schedule("tiny").model_copy(update={"steps": 4, "eval_every": 4})
    train(PLAIN, schedule, resolve_data(f"manifest:{tiny_corpus_dir}"), run, progress=False)
    return run


@pytest.fixture(scope="module")
def shared_run(tiny_corpus_dir, tmp_path_factory):
    """A run directory without training (the WER does not matter here): random weights and
    statistics, so that no two stored tensors are equal, and a real tokenizer."""
    run = tmp_path_factory.mktemp("shared-run")
    torch.manual_seed(0)
    model = ConformerCTC(SHARED)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
    model.save(run / "model.safetensors")
    texts = [r.text for r in read_manifest(tiny_corpus_dir / "train.jsonl")]
    Tokenizer.train(texts, SHARED.vocab_size, "char", run / "tokenizer.model")
    (run / "metrics.json").write_text(json.dumps({"schedule": "none", "steps": 0}))
    return run


@pytest.fixture(scope="module")
def plain_export(plain_run, tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("exports") / "plain", PLAIN, plain_run, PROVENANCE)


@pytest.fixture(scope="module")
def shared_export(shared_run, tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("exports") / "shared", SHARED, shared_run, PROVENANCE)


def features(wav_path):
    feats = log_mel(load_audio(wav_path))
    return feats[None], torch.tensor([len(feats)])


@pytest.mark.parametrize("design", ["plain", "shared"])
def test_round_trip_computes_what_the_trained_model_computes(design, request, wav):
    arch = {"plain": PLAIN, "shared": SHARED}[design]
    trained = ConformerCTC.load(arch, request.getfixturevalue(f"{design}_run") / "model.safetensors").eval()
    loaded_arch, model, tokenizer = load_export(request.getfixturevalue(f"{design}_export"))
    assert loaded_arch == arch and not model.training and tokenizer.vocab_size == arch.vocab_size
    with torch.no_grad():
        want, got = trained(*features(wav)), model(*features(wav))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_sharing_survives_the_round_trip(shared_export):
    _, model, _ = load_export(shared_export)
    assert model.num_params() == count(SHARED).physical
    L = model.layers
    assert L[0].attn.q.weight is L[3].attn.q.weight is L[0].attn.k.weight  # cycle ABCABC; query/key tied
    assert L[0].attn.q.weight is not L[1].attn.q.weight
    assert all(layer.conv.dw_weight is L[0].conv.dw_weight for layer in L)  # one conv module
    assert all(layer.ffn2.inner.U is L[0].ffn1.inner.U for layer in L)  # U shared, macaron halves tied
    assert L[0].ffn1.inner.V is L[3].ffn2.inner.V and L[0].ffn1.inner.V is not L[1].ffn1.inner.V
    assert L[0].attn.norm is not L[3].attn.norm  # per-layer norms


@pytest.mark.parametrize("design", ["plain", "shared"])
def test_onnx_matches_pytorch_on_real_audio(design, request, wav):
    assert check_onnx(request.getfixturevalue(f"{design}_export"), wav) <= 1e-4


@pytest.mark.parametrize("design", ["plain", "shared"])
def test_safetensors_size_is_the_accounted_size(design, request):
    arch = {"plain": PLAIN, "shared": SHARED}[design]
    size = (request.getfixturevalue(f"{design}_export") / "model.safetensors").stat().st_size
    assert abs(size / count(arch).bytes("fp32") - 1) <= 0.02


def onnx_initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def assert_stored_once(path, arch):
    c = count(arch)
    assert c.virtual >= 4 * c.physical  # a copy per use would show at once
    inits = onnx_initializers(path)
    total = sum(a.nbytes for a in inits.values())
    assert c.bytes("fp32") <= total <= 1.05 * c.bytes("fp32")  # BatchNorm statistics come on top
    return inits


def test_onnx_stores_each_tensor_once_under_its_safetensors_key(shared_export):
    stored = ConformerCTC(SHARED).stored_state()
    inits = assert_stored_once(shared_export / "model.onnx", SHARED)
    # the graph itself costs about 8 KB per virtual layer
    assert (shared_export / "model.onnx").stat().st_size <= 1.05 * count(SHARED).bytes("fp32")
    used = {k for k in stored if not k.endswith("num_batches_tracked")}
    assert used <= inits.keys()
    weights = ConformerCTC.load(SHARED, shared_export / "model.safetensors").stored_state()
    assert all(np.array_equal(inits[k], weights[k].numpy()) for k in used)


def test_the_torchscript_fallback_also_stores_each_tensor_once(shared_run, tmp_path, wav, monkeypatch):
    def unavailable(*args):
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(nas.export, "_export_dynamo", unavailable)
    out = write_export(tmp_path / "ts", SHARED, shared_run, {})
    assert_stored_once(out / "model.onnx", SHARED)
    assert check_onnx(out, wav) <= 1e-4


def test_arch_json_is_what_the_trainer_reads(plain_export, plain_run):
    assert ArchConfig.load(plain_export / "arch.json") == PLAIN
    prov = json.loads((plain_export / "arch.json").read_text())["provenance"]
    metrics = json.loads((plain_run / "metrics.json").read_text())
    c = count(PLAIN)
    assert {k: prov[k] for k in PROVENANCE} == PROVENANCE
    assert (prov["physical_params"], prov["virtual_params"]) == (c.physical, c.virtual)
    assert prov["bytes"] == {"fp32": c.bytes("fp32"), "bf16": c.bytes("bf16"), "int8": c.bytes("int8")}
    assert prov["tokenizer_sha256"] == Tokenizer.load(plain_export / "tokenizer.model").sha256
    assert prov["run"]["test_wer"] == metrics["test"]["wer"] and prov["features"]["n_mels"] == 80
    card = (plain_export / "README.md").read_text()
    assert sharing_in_words(PLAIN) in card and "0.910" in card and "class 0 is the CTC blank" in card
    assert "nas transcribe DIR FILE.wav" in card and "nas train DIR/arch.json --schedule full" in card


def test_the_card_describes_the_sharing(shared_export):
    card = (shared_export / "README.md").read_text()
    assert sharing_in_words(SHARED) in card and layer_map(SHARED) in card


def test_transcribe_is_greedy_decoding_of_the_model(plain_export, plain_run, wav):
    model = ConformerCTC.load(PLAIN, plain_run / "model.safetensors").eval()
    with torch.no_grad():
        want = greedy_decode(*model(*features(wav)), Tokenizer.load(plain_run / "tokenizer.model"))[0]
    text = transcribe(plain_export, wav)
    assert isinstance(text, str) and text == want


def test_bad_audio_is_a_user_error_naming_the_file(plain_export, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    with pytest.raises(UserError) as err:
        transcribe(plain_export, bad)
    assert err.value.line().startswith(f"error: {bad}: cannot read audio")


def test_refuses_an_out_dir_that_holds_files(plain_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as err:
        write_export(out, PLAIN, plain_run, {})
    assert err.value.line().startswith(f"error: {out}: already holds files")
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    with pytest.raises(UserError, match="model.safetensors: not found"):  # force passes the check
        write_export(out, PLAIN, empty_run, {}, force=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_refuses_weights_of_another_design_with_the_same_shapes(plain_run, tmp_path):
    two_heads = PLAIN.model_copy(update={"encoder": PLAIN.encoder.model_copy(update={"n_heads": 2})})
    with pytest.raises(UserError) as err:
        write_export(tmp_path / "out", two_heads, plain_run, {})
    ckpt = plain_run / "checkpoint.pt"
    assert err.value.line() == f"error: {ckpt}: arch: the run trained another design than the one exported"
