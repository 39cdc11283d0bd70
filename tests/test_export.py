"""The export: exact sizes, ONNX parity (real audio, a padded batch), each stored tensor once, the trainer reads it."""

import json
from math import prod

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from onnx import numpy_helper
from torch import nn

import nas.onnx_export
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
from nas.plan import subsampled_frames
from nas.schedule import load_schedule
from nas.decode import build_lm, greedy_decode
from nas.train import train

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
PROVENANCE = {"study": "test", "trial": 3, "proxy_signal": "cer", "proxy_value": 0.91, "budget": "1M"}


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
    """A run directory without training (the WER does not matter here), with a real tokenizer.

    Random weights and statistics, but for the LayerNorms, kept as initialized: their weights are
    all ones and their biases all zeros in every layer. So distinct stored tensors of equal value
    exist, which the ONNX export must not merge (see ``_merge_equal_initializers``).
    """
    run = tmp_path_factory.mktemp("shared-run")
    torch.manual_seed(0)
    model = ConformerCTC(SHARED)
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and id(t) not in norms:
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


@pytest.fixture(scope="module")
def three_utterances(tiny_corpus_dir):
    """Log-mels of three test utterances of different lengths: the middle one, the shortest, the longest."""
    rows = sorted(read_manifest(tiny_corpus_dir / "test.jsonl"), key=lambda r: r.duration)
    feats = [log_mel(load_audio(r.audio)) for r in (rows[len(rows) // 2], rows[0], rows[-1])]
    assert len({len(f) for f in feats}) == 3
    return feats


def features(wav_path):
    feats = log_mel(load_audio(wav_path))
    return feats[None], torch.tensor([len(feats)])


def padded(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(B, T_max, n_mels)``, zero-padded at the end, and the lengths."""
    batch = torch.zeros(len(feats), max(len(f) for f in feats), feats[0].shape[1])
    for i, f in enumerate(feats):
        batch[i, : len(f)] = f
    return batch, torch.tensor([len(f) for f in feats])


def run_onnx(export_dir, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["log_probs", "out_lengths"], {"feats": feats.numpy(), "lengths": lengths.numpy()})


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
def test_onnx_matches_pytorch_on_a_padded_batch(design, request, three_utterances):
    """Three utterances of different lengths in one padded batch: the same valid frames and lengths."""
    export = request.getfixturevalue(f"{design}_export")
    _, model, _ = load_export(export)
    feats, lengths = padded(three_utterances)
    with torch.no_grad():
        want, want_lengths = model(feats, lengths)
    got, got_lengths = run_onnx(export, feats, lengths)
    assert got.shape == tuple(want.shape)
    assert got_lengths.tolist() == want_lengths.tolist() == [subsampled_frames(len(f)) for f in three_utterances]
    for i, n in enumerate(got_lengths):  # frames past an utterance's length are not compared
        assert np.abs(got[i, :n] - want[i, :n].numpy()).max() <= 1e-4


def test_the_lengths_reach_the_onnx_graph(plain_export, three_utterances):
    """Told that every utterance fills the batch, onnxruntime gives the shorter ones other log-probs
    (their attention then reads the padding too): the padding mask is in the graph. (On the trained
    design: the shared fixture's random weights leave its output nearly blind to its input.)"""
    feats, lengths = padded(three_utterances)
    masked, out_lengths = run_onnx(plain_export, feats, lengths)
    unmasked, _ = run_onnx(plain_export, feats, torch.full_like(lengths, feats.shape[1]))
    shorter = np.flatnonzero(out_lengths < masked.shape[1])
    assert len(shorter) == 2
    for i in shorter:
        n = out_lengths[i]
        assert np.abs(unmasked[i, :n] - masked[i, :n]).max() > 1e-3


def test_padding_does_not_change_an_utterance(plain_export, three_utterances):
    """An utterance's valid frames, padded in a batch, are those it gives alone."""
    batch, lengths = run_onnx(plain_export, *padded(three_utterances))
    for i, f in enumerate(three_utterances):
        alone, alone_lengths = run_onnx(plain_export, f[None], torch.tensor([len(f)]))
        n = alone_lengths[0]
        assert n == lengths[i]
        assert np.abs(batch[i, :n] - alone[0]).max() <= 1e-4


SAFETENSORS_ITEMSIZE = {"F32": 4, "I64": 8}


def safetensors_header(path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]]:
    """The bytes of a safetensors file's header (an 8-byte little-endian length, then that much
    JSON) and, per tensor, its dtype, shape and data offsets (from the end of the header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}


@pytest.mark.parametrize("design", ["plain", "shared"])
def test_safetensors_holds_exactly_the_accounted_bytes(design, request):
    arch = {"plain": PLAIN, "shared": SHARED}[design]
    c, d = count(arch), arch.encoder.d_model
    path = request.getfixturevalue(f"{design}_export") / "model.safetensors"
    header, tensors = safetensors_header(path)
    assert tensors.keys() == ConformerCTC(arch).stored_state().keys()
    # each tensor's bytes are its elements at its dtype, and the tensors tile the data: no gap, no overlap
    spans = sorted(offsets for _, _, offsets in tensors.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(end - start == prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
               for dtype, shape, (start, end) in tensors.values())
    data = spans[-1][1]

    def payload(keys):
        return sum(tensors[k][2][1] - tensors[k][2][0] for k in keys)

    # The parameters: exactly the budget's bytes at fp32, no tolerance.
    buffers = {k for k, _ in ConformerCTC(arch).named_buffers()}
    params = tensors.keys() - buffers
    assert {tensors[k][0] for k in params} == {"F32"}
    assert payload(params) == c.bytes("fp32")
    # The buffers, outside the budget: per BatchNorm, the running mean and variance (d float32
    # each) and a step counter (one int64); count() gives their elements.
    n_bn = sum(k.endswith(".num_batches_tracked") for k in buffers)
    assert n_bn >= 1 and sum(prod(tensors[k][1]) for k in buffers) == c.buffers == n_bn * (2 * d + 1)
    assert payload(buffers) == n_bn * (2 * d * 4 + 8)
    # The rest of the file is the header (its JSON names every tensor): under 2% of it.
    size = path.stat().st_size
    assert size - data == header and header < 0.02 * size


def onnx_initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def assert_stored_once(path, arch):
    """Each stored tensor is one initializer under its safetensors key, and nothing else is stored.

    Exactly: the stored initializers hold ``physical + buffers - n_bn`` elements, the budget's
    parameters and the BatchNorm buffers but for the step counters (one per BatchNorm, which
    eval mode does not read, so the graph does not keep them). The other initializers are the
    graph's own constants (shape arithmetic): scalars.
    """
    c = count(arch)
    assert c.virtual >= 4 * c.physical  # a copy per use would show at once
    stored = ConformerCTC(arch).stored_state().keys()
    counters = {k for k in stored if k.endswith(".num_batches_tracked")}
    inits = onnx_initializers(path)
    assert stored & inits.keys() == stored - counters
    assert all(inits[k].dtype == np.float32 for k in stored - counters)
    assert sum(inits[k].size for k in stored - counters) == c.physical + c.buffers - len(counters)
    constants = {k: a for k, a in inits.items() if k not in stored}
    assert all(a.size <= 1 for a in constants.values()), {k: a.shape for k, a in constants.items()}
    return inits


def equal_groups(arrays: dict[str, np.ndarray]) -> list[set[str]]:
    """Names of arrays of equal dtype, shape and values, in groups of two or more."""
    groups: dict[tuple, set[str]] = {}
    for k, a in arrays.items():
        groups.setdefault((a.dtype.str, a.shape, a.tobytes()), set()).add(k)
    return [g for g in groups.values() if len(g) > 1]


def test_onnx_stores_each_tensor_once_under_its_safetensors_key(shared_export):
    inits = assert_stored_once(shared_export / "model.onnx", SHARED)
    # the graph itself costs about 8 KB per virtual layer
    assert (shared_export / "model.onnx").stat().st_size <= 1.05 * count(SHARED).bytes("fp32")
    weights = ConformerCTC.load(SHARED, shared_export / "model.safetensors").stored_state()
    assert all(np.array_equal(inits[k], weights[k].numpy()) for k in weights if k in inits)


def test_equal_valued_stored_tensors_stay_distinct(shared_export):
    """Distinct stored tensors of equal value (the fresh LayerNorms) keep an initializer each.

    Merging them would compute the same, but the file would hold fewer tensors than the design
    stores, and fewer bytes than the budget arithmetic, which the exact check above forbids.
    """
    weights = safetensors.torch.load_file(str(shared_export / "model.safetensors"))
    groups = equal_groups({k: v.numpy() for k, v in weights.items() if not k.endswith("num_batches_tracked")})
    assert sum(len(g) for g in groups) >= 4 * SHARED.encoder.n_layers  # 4 norms a layer, ones and zeros
    inits = onnx_initializers(shared_export / "model.onnx")
    for group in groups:
        assert group <= inits.keys()


def exporter_with_a_copy_per_use(made: dict):
    """The dynamo exporter, then a copy of each shared initializer for every use but the first,
    named by the module path of another use of the same stored tensor: what an exporter that
    lifts parameters per module path would write. ``made["copies"]`` counts the copies."""
    real = nas.onnx_export._export_dynamo

    def export(model, feats, lengths):
        graph = real(model, feats, lengths)
        aliases: dict[int, list[str]] = {}
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for name, t in named:
            aliases.setdefault(id(t), []).append(name)
        others = {name: [a for a in aliases[id(t)] if a != name] for name, t in named}
        inits = graph.graph.initializers
        before = len(inits)
        for value in list(inits.values()):
            spare = [a for a in others.get(value.name, []) if a not in inits]
            for (node, index), name in zip(value.uses()[1:], spare):
                copy = ir.Value(name=name, shape=value.shape, type=value.type, const_value=value.const_value)
                graph.graph.register_initializer(copy)
                node.replace_input_with(index, copy)
        made["copies"] = len(inits) - before
        return graph

    return export


def test_copies_of_a_stored_tensor_are_merged_into_one(shared_run, tmp_path, wav, monkeypatch):
    made = {}
    monkeypatch.setattr(nas.onnx_export, "_export_dynamo", exporter_with_a_copy_per_use(made))
    out = write_export(tmp_path / "copies", SHARED, shared_run, {})
    assert made["copies"] >= 50  # shared blocks, shared factors, one conv module for six layers
    assert_stored_once(out / "model.onnx", SHARED)  # the fresh LayerNorms, equal but distinct, included
    assert check_onnx(out, wav) <= 1e-4


def test_the_torchscript_fallback_also_stores_each_tensor_once(shared_run, tmp_path, wav, monkeypatch):
    def unavailable(*args):
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(nas.onnx_export, "_export_dynamo", unavailable)
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
    assert sharing_in_words(PLAIN) in card and "| proxy cer | 0.910 |" in card and "class 0 is the CTC blank" in card
    assert "nas transcribe DIR FILE.wav" in card and "nas train DIR/arch.json --schedule full" in card


def test_the_card_describes_the_sharing(shared_export):
    card = (shared_export / "README.md").read_text()
    assert sharing_in_words(SHARED) in card and layer_map(SHARED) in card


def test_a_baseline_is_not_called_found_by_the_search(plain_export):
    # The demo exports the retrained design with the lowest dev WER, which can be a baseline.
    from nas.model_card import model_card
    prov = json.loads((plain_export / "arch.json").read_text())["provenance"]
    searched = model_card("x", PLAIN, prov, 1)
    baseline = model_card("x", PLAIN, prov | {"label": "unshared"}, 1)
    assert "found by `nas`" in searched and "labelled" not in searched
    assert "found by" not in baseline and "its design labelled `unshared`, named by hand" in baseline


def test_transcribe_is_greedy_decoding_of_the_model(plain_run, wav, tmp_path):
    # A fresh model with a random output layer emits characters that follow the audio; the briefly
    # trained plain run emits only blanks, and two empty strings would prove nothing.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("tokenizer.model", "metrics.json"):
        (run / name).write_bytes((plain_run / name).read_bytes())
    torch.manual_seed(0)
    model = ConformerCTC(PLAIN).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.zero_()
    model.save(run / "model.safetensors")
    with torch.no_grad():
        want = greedy_decode(*model(*features(wav)), Tokenizer.load(run / "tokenizer.model"))[0]
    text = transcribe(write_export(tmp_path / "export", PLAIN, run, PROVENANCE, measure=False), wav)
    assert len(set(want)) > 3 and text == want


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


# ---- deployment: dtypes, measurements, the LM ------------------------------------------------

BEAM = {"beam": 8, "beam_tokens": 10, "beam_threshold": 25.0, "lm_weight": 1.0, "word_score": 0.0,
        "tuned_on": "dev (8 utterances)", "tuned_dev_wer": 0.9}


@pytest.fixture(scope="module")
def plain_lm_run(plain_run, tiny_corpus_dir, tmp_path_factory):
    """The plain run, as if its schedule had decoded with beam search: an LM from the training
    transcripts in ``lm/`` and the tuned settings in metrics.json."""
    run = tmp_path_factory.mktemp("plain-lm-run")
    for f in plain_run.iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    texts = [r.text for r in read_manifest(tiny_corpus_dir / "train.jsonl")]
    build_lm([" ".join(t.lower().split()) for t in texts], Tokenizer.load(run / "tokenizer.model"), run / "lm")
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(metrics | {"decoder": BEAM | {"lm": {"order": 3}}}))
    return run


@pytest.fixture(scope="module")
def int8_export(plain_lm_run, tiny_corpus_dir, tmp_path_factory):
    """At the budget's dtype (int8), calibrated on and measured with the tiny corpus."""
    return write_export(tmp_path_factory.mktemp("exports") / "int8", PLAIN, plain_lm_run,
                        PROVENANCE | {"budget": "1MB@int8"}, data=f"manifest:{tiny_corpus_dir}")


def provenance(export) -> dict:
    return json.loads((export / "arch.json").read_text())["provenance"]


def test_the_int8_export_is_the_budget_exactly(int8_export, tiny_corpus_dir):
    prov, c = provenance(int8_export), count(PLAIN)
    assert prov["dtype"] == "int8"  # the budget's dtype: 1MB@int8
    f = prov["onnx_file"]
    assert (f["weights"], f["budget_bytes"], f["difference"]) == (c.bytes("int8"), c.bytes("int8"), 0)
    assert f["stored_tensors"] == len([k for k, _ in ConformerCTC(PLAIN).named_parameters()])
    assert 0 < f["quantization_params"] < 0.1 * f["weights"] and f["missing_stored_tensors"] == 0
    assert f["file"] == (int8_export / "model.onnx").stat().st_size
    calibration = prov["quantization"]["calibration"]
    train_ids = {r.id for r in read_manifest(tiny_corpus_dir / "train.jsonl")}
    assert calibration["utterances"] == len(calibration["ids"]) == min(32, len(train_ids))
    assert set(calibration["ids"]) <= train_ids and calibration["split"] == "train"
    assert "static" in prov["quantization"]["activations"]


def test_the_export_measures_wer_speed_and_memory_at_fp32_and_int8(int8_export, plain_lm_run):
    d = provenance(int8_export)["deployment"]
    assert d["dtype"] == "int8" and d["test"]["utterances"] == 8 and d["test"]["audio_s"] > 10
    assert d["decoding"] == "beam + lexicon + LM"
    for dtype in ("fp32", "int8"):
        for decoding in ("greedy", "beam"):
            assert set(d["accuracy"][dtype][decoding]) == {"wer", "cer"}
            assert all(0 <= v < 5 for v in d["accuracy"][dtype][decoding].values())
        assert 0 < d["rtf"][dtype] < 1
        assert d["activation_memory"][dtype]["bytes"] > 0
    for decoding in ("greedy", "beam"):
        for m in ("wer", "cer"):
            assert d["difference"][decoding][m] == pytest.approx(
                d["accuracy"]["int8"][decoding][m] - d["accuracy"]["fp32"][decoding][m], abs=1e-12)
    # fp32 on the deployment path (numpy features, onnxruntime) decodes as the trainer did (float16
    # cached features, PyTorch): the same greedy WER, or nearly
    run_wer = json.loads((plain_lm_run / "metrics.json").read_text())["test"]["wer"]
    assert d["accuracy"]["fp32"]["greedy"]["wer"] == pytest.approx(run_wer, abs=0.05)
    table = d["robustness"]["table"]
    assert table["all"] == {"wer": d["accuracy"]["int8"]["beam"]["wer"], "utterances": 8}
    assert {"accent", "noise", "snr_db", "reverb", "telephone"} <= table.keys()
    assert sum(g["utterances"] for g in table["snr_db"].values()) == 8


def test_the_lm_travels_with_the_export_and_the_card_says_so(int8_export, plain_lm_run):
    prov = provenance(int8_export)
    for name in ("lexicon.txt", "tokens.txt", "lm.arpa", "lm.json"):
        assert (int8_export / "lm" / name).read_bytes() == (plain_lm_run / "lm" / name).read_bytes()
    assert {k: prov["decoder"][k] for k in BEAM} == BEAM
    card = (int8_export / "README.md").read_text()
    assert "`lm/` holds the beam search's lexicon" in card and "LM weight 1.0" in card
    assert "## Deployment" in card and "**int8**" in card and "calibrated on" in card
    assert "| test WER (beam + lexicon + LM) |" in card and "points |" in card
    assert "real-time factor, one CPU thread" in card and "peak activation memory, 10 s utterance" in card
    assert "A device holds both" in card and "| SNR | utterances | WER |" in card
    assert "+0 B (+0.00%) against the arithmetic" in card


def test_an_export_without_a_corpus_is_not_measured(plain_export):
    prov = provenance(plain_export)
    assert prov["dtype"] == "fp32" and "deployment" not in prov and "decoder" not in prov
    assert prov["onnx_file"]["difference"] == 0 and prov["onnx_file"]["quantization_params"] == 0
    card = (plain_export / "README.md").read_text()
    assert "Not measured at export" in card and "Greedy CTC" in card
    assert not (plain_export / "lm").exists()


def test_bf16_export_and_refusals(plain_run, tmp_path):
    out = write_export(tmp_path / "bf16", PLAIN, plain_run, PROVENANCE, dtype="bf16", measure=False)
    prov = provenance(out)
    assert prov["dtype"] == "bf16" and prov["onnx_file"]["weights"] == count(PLAIN).bytes("bf16")
    with pytest.raises(UserError) as err:
        write_export(tmp_path / "int8", PLAIN, plain_run, PROVENANCE, dtype="int8")
    assert err.value.line().startswith("error: --data: an int8 export calibrates its activations on training audio")
    with pytest.raises(UserError, match="expected one of fp32, bf16, int8"):
        write_export(tmp_path / "fp16", PLAIN, plain_run, PROVENANCE, dtype="fp16")
    assert not (tmp_path / "int8").exists() and not (tmp_path / "fp16").exists()


def test_the_deploy_benchmark_reads_its_figures_from_the_export(plain_lm_run, tiny_corpus_dir, tmp_path):
    from nas.bench.deploy import bench_deploy

    # no corpus given: the run's own, which its metrics.json records, calibrates and measures it
    figures = bench_deploy([plain_lm_run], test_utterances=4, results=tmp_path)
    name = plain_lm_run.name
    assert figures[f"{name}.data"] == f"manifest:{tiny_corpus_dir}" and figures["data"] == "each run's own"
    prov = json.loads((tmp_path / name / "arch.json").read_text())["provenance"]
    assert figures[f"{name}.int8_weight_bytes"] == figures[f"{name}.budget_arithmetic_bytes"] == count(PLAIN).bytes("int8")
    assert figures[f"{name}.bytes_within_1pct"] is True and figures[f"{name}.test_utterances"] == 4
    increase = prov["deployment"]["difference"]["beam"]["wer"]
    assert figures[f"{name}.wer_increase_points_beam"] == round(100 * increase, 2)
    assert figures[f"{name}.wer_increase_within_1pt"] == (increase <= 0.01)
    assert figures[f"{name}.int8_activation_mb_10s"] > 0 and figures[f"{name}.fp32_rtf_1_thread"] > 0
    # Decoding's share is the beam search's time over the forward passes', both of the same loop.
    d = prov["deployment"]
    for dt in ("fp32", "int8"):
        assert d["forward_s"][dt] > 0 and d["decode_s"][dt] > 0
        assert d["forward_s"][dt] == pytest.approx(d["rtf"][dt] * d["test"]["audio_s"], rel=0.05, abs=1e-3)  # both rounded
        share = d["decode_s"][dt] / d["forward_s"][dt]
        assert figures[f"{name}.{dt}_decode_share"] == round(share, 3)
        assert figures[f"{name}.{dt}_decode_within_25pct"] == (share <= 0.25)
        # and the same search in a loop of its own, over the same forward passes' time
        assert d["decode_alone_s"][dt] > 0
        assert figures[f"{name}.{dt}_decode_share_alone"] == round(d["decode_alone_s"][dt] / d["forward_s"][dt], 3)


def test_export_flags_are_checked_by_the_command_line(capsys):
    from nas.cli import main

    assert main(["export", "s", "--design", "1", "--out", "x", "--dtype", "fp16"]) == 2
    assert "error: cli: export: argument --dtype: invalid choice: 'fp16'" in capsys.readouterr().err
    assert main(["export", "s", "--design", "1", "--out", "x", "--data", "nowhere:x"]) == 2
    assert "error: --data: 'nowhere:x': expected synth" in capsys.readouterr().err


def test_nas_export_defaults_to_the_budgets_dtype_and_prints_the_figures(plain_lm_run, tiny_corpus_dir, tmp_path,
                                                                         monkeypatch, capsys):
    import nas.export
    import nas.study
    from nas.cli import main

    settings = {"budget": "1MB@int8", "data": f"manifest:{tiny_corpus_dir}"}
    monkeypatch.setattr(nas.study, "open_existing_study", lambda *a: None)
    monkeypatch.setattr(nas.export, "choose_for_export",
                        lambda *a: (PLAIN, plain_lm_run, PROVENANCE | settings))
    out = tmp_path / "export"
    assert main(["export", "s", "--best-under", "1MB@int8", "--out", str(out), "--test-utterances", "2",
                 "--results", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"exported trial 3 to {out} at int8" in printed
    assert f"weights in model.onnx: {count(PLAIN).bytes('int8'):,} B; budget arithmetic" in printed
    assert "int8: greedy WER" in printed and "RTF" in printed and "(10 s)" in printed
    assert provenance(out)["deployment"]["test"]["utterances"] == 2


def test_best_under_a_budget_ranks_designs_by_their_mean_dev_wer_over_seeds():
    """With seeds, a design's lucky run does not win the export: the design with the lower mean does
    (the headline's rule), and of its runs the one with the lowest dev WER is exported."""
    from nas.budget import parse_budget
    from nas.retrain import pick_best_under

    def row(number, seed, dev, size=1000):
        return {"number": number, "seed": seed, "full_dev_wer": dev, "bytes_by_dtype": {"fp32": size}}

    rows = [row(0, 0, 0.30), row(0, 1, 0.50), row(0, 2, 0.49),  # mean 0.43, best run 0.30
            row(1, 0, 0.40), row(1, 1, 0.36), row(1, 2, 0.41),  # mean 0.39
            row(2, 0, 0.10, size=10_000)]  # over the budget
    best = pick_best_under(rows, parse_budget("1KB@fp32"))
    assert (best["number"], best["seed"]) == (1, 1)
