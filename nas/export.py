"""The export: a chosen design, handed to the trainer and to deployment, in one directory.

``write_export(out_dir, arch, run_dir, provenance)`` turns a trainer run directory into::

    arch.json          {"arch": ArchConfig, "provenance": {...}}; `nas train DIR/arch.json` reads it
    model.safetensors  each stored tensor once, under its storage-plan key
    model.onnx         log-mels (B, T, n_mels) + lengths (B,) -> log-probs (B, T', vocab) + lengths (B,)
    tokenizer.model    the sentencepiece model (CTC class 0 is the blank)
    README.md          the model card

with ``T' = ((T - 1) // 2 - 1) // 2`` (the 4x subsampling). ``load_export`` and ``transcribe`` read
it back; ``check_onnx`` compares onnxruntime with PyTorch on a real audio file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx_ir.passes.common import (
    ClearMetadataAndDocStringPass, CommonSubexpressionEliminationPass, RemoveUnusedNodesPass,
)
from onnxscript.optimizer import fold_constants
from safetensors import SafetensorError

from nas.budget import DTYPE_BYTES, count
from nas.config import SCHEMA_VERSION, ArchConfig
from nas.data.audio import AudioError, load_audio
from nas.data.features import FeatureConfig, log_mel
from nas.data.tokenizer import Tokenizer
from nas.describe import layer_map, sharing_in_words
from nas.errors import UserError
from nas.model import ConformerCTC
from nas.plan import subsampled_frames
from nas.train import greedy_decode

log = logging.getLogger(__name__)

RUN_FILES = ("model.safetensors", "tokenizer.model", "metrics.json")
INPUTS, OUTPUTS = ("feats", "lengths"), ("log_probs", "out_lengths")


def write_export(out_dir: Path, arch: ArchConfig, run_dir: Path, provenance: dict, force: bool = False) -> Path:
    """Export the design ``arch`` trained in ``run_dir`` (a trainer output directory) to ``out_dir``.

    ``provenance`` (study, trial, proxy and full WER, budget...) is stored as given in
    ``arch.json``, completed with the sizes from :func:`nas.budget.count`, the tokenizer's
    sha256, the feature settings and the run's metrics. Refuses an ``out_dir`` that already
    holds files unless ``force`` (which overwrites the five files and leaves any others).
    Returns ``out_dir``.
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(str(out_dir), "", "is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(str(out_dir), "", "already holds files; use --force to overwrite")
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise UserError(str(run_dir / name), "", f"not found (a trainer run directory holds "
                                                     f"{', '.join(RUN_FILES)})")
    _check_trained_design(run_dir / "checkpoint.pt", arch)
    tokenizer = _tokenizer(run_dir / "tokenizer.model", arch)
    model = _model(arch, run_dir / "model.safetensors")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(str(run_dir / "metrics.json"), "", f"not valid JSON ({exc})") from None
    onnx_bytes = onnx_model(model)  # the slow, fallible part: done before anything is written

    c = count(arch)
    prov = {
        **provenance,
        "physical_params": c.physical,
        "virtual_params": c.virtual,
        "bytes": {dt: c.bytes(dt) for dt in DTYPE_BYTES},
        "macs_per_second": c.macs_per_second,
        "tokenizer_sha256": tokenizer.sha256,
        "features": asdict(_features(arch)),
        "run": _run_summary(metrics),
        "schema_version": SCHEMA_VERSION,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"arch": json.loads(arch.to_json()), "provenance": prov}
    _write(out_dir / "arch.json", (json.dumps(doc, indent=2) + "\n").encode())
    model.save(out_dir / "model.safetensors")
    _write(out_dir / "tokenizer.model", (run_dir / "tokenizer.model").read_bytes())
    _write(out_dir / "model.onnx", onnx_bytes)
    _write(out_dir / "README.md", model_card(out_dir.name, arch, prov, len(onnx_bytes)).encode())
    return out_dir


def load_export(dir: Path) -> tuple[ArchConfig, ConformerCTC, Tokenizer]:
    """The design, its model (eval mode, shared tensors shared again) and its tokenizer."""
    dir = Path(dir)
    arch = ArchConfig.load(dir / "arch.json")
    tokenizer = _tokenizer(dir / "tokenizer.model", arch)
    expected = json.loads((dir / "arch.json").read_text()).get("provenance", {}).get("tokenizer_sha256")
    if expected and expected != tokenizer.sha256:
        raise UserError(str(dir / "tokenizer.model"), "", "is not the tokenizer arch.json was exported with "
                                                          "(sha256 differs)")
    return arch, _model(arch, dir / "model.safetensors"), tokenizer


def transcribe(dir: Path, audio_path: Path) -> str:
    """Greedy CTC transcript of one audio file (any rate soundfile reads; resampled to 16 kHz)."""
    arch, model, tokenizer = load_export(dir)
    feats = features_of(audio_path, arch)
    with torch.no_grad():
        log_probs, lengths = model(feats[None], torch.tensor([len(feats)]))
    return greedy_decode(log_probs, lengths, tokenizer)[0]


def check_onnx(dir: Path, audio_path: Path) -> float:
    """Max absolute difference between onnxruntime's and PyTorch's log-probs on ``audio_path``
    (``inf`` when their shapes or output lengths differ)."""
    arch, model, _ = load_export(dir)
    feats = features_of(audio_path, arch)[None]
    lengths = torch.tensor([feats.shape[1]])
    with torch.no_grad():
        ref, ref_lens = model(feats, lengths)
    session = ort.InferenceSession(str(Path(dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    got, got_lens = session.run(list(OUTPUTS), {"feats": feats.numpy(), "lengths": lengths.numpy()})
    if got.shape != tuple(ref.shape) or not np.array_equal(got_lens, ref_lens.numpy()):
        return float("inf")
    return float(np.abs(got - ref.numpy()).max())


def features_of(audio_path: Path, arch: ArchConfig) -> torch.Tensor:
    """Log-mels ``(T, n_mels)`` of an audio file, as the trainer computes them. Bad audio: UserError."""
    cfg = _features(arch)
    try:
        wav = load_audio(audio_path, cfg.sample_rate)
    except AudioError as exc:
        raise UserError(str(audio_path), "", str(exc).removeprefix(f"{audio_path}: ")) from None
    if subsampled_frames(1 + len(wav) // cfg.hop_length) < 1:  # 7 frames give one after subsampling
        raise UserError(str(audio_path), "", f"too short ({len(wav) * 1000 // cfg.sample_rate} ms; the model needs "
                                             f"at least {6 * cfg.hop_length * 1000 // cfg.sample_rate} ms)")
    return log_mel(wav, cfg)


# ---- ONNX --------------------------------------------------------------------------------

def onnx_model(model: ConformerCTC) -> bytes:
    """``model`` (eval mode) as a serialized ONNX model with dynamic batch and time axes,
    every stored tensor held once, named by its key in ``model.safetensors``."""
    model.eval()
    n_mels = model.arch.frontend.n_mels
    feats = torch.randn(2, 200, n_mels, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([200, 150])  # unequal: the padding mask is traced too
    with _quiet():
        try:
            graph = _export_dynamo(model, feats, lengths)
        except Exception as exc:  # noqa: BLE001 — the exporter fails in many ways; the fallback is the remedy
            log.warning("the dynamo ONNX exporter failed (%s); falling back to the TorchScript exporter",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            graph = _export_torchscript(model, feats, lengths)
    _store_once(graph, model)
    proto = ir.serde.serialize_model(graph)
    del proto.graph.value_info[:]  # intermediate shapes: optional, onnxruntime infers them
    return proto.SerializeToString()


def _export_dynamo(model: ConformerCTC, feats: torch.Tensor, lengths: torch.Tensor) -> ir.Model:
    # optimize=False: the exporter's optimizer folds the transpose of a shared weight into one
    # copy per use, and fuses each layer's BatchNorm into a shared depthwise kernel (a scaled
    # copy per layer). Unoptimized, each parameter is one initializer; onnxruntime does those
    # optimizations in memory when it loads the file.
    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames", min=7)
    program = torch.onnx.export(
        model, (feats, lengths), dynamo=True, optimize=False, verbose=False,
        input_names=list(INPUTS), output_names=list(OUTPUTS),
        dynamic_shapes={"feats": {0: batch, 1: frames}, "lengths": {0: batch}},
    )
    return program.model


def _export_torchscript(model: ConformerCTC, feats: torch.Tensor, lengths: torch.Tensor) -> ir.Model:
    buf = io.BytesIO()
    torch.onnx.export(
        model, (feats, lengths), buf, dynamo=False, opset_version=18,
        input_names=list(INPUTS), output_names=list(OUTPUTS),
        dynamic_axes={"feats": {0: "batch", 1: "frames"}, "lengths": {0: "batch"},
                      "log_probs": {0: "batch", 1: "frames_out"}, "out_lengths": {0: "batch"}},
    )
    return ir.serde.deserialize_model(onnx.load_from_string(buf.getvalue()))


def _store_once(graph: ir.Model, model: ConformerCTC) -> None:
    """Make each stored tensor one initializer, named by its ``model.safetensors`` key; tidy up.

    An exporter may hold a shared weight more than once: one initializer per use, or per folded
    copy (with torch 2.11, the dynamo exporter's optimizer made a transposed copy per use; the
    unoptimized dynamo export and the TorchScript export hold each once). Initializers of equal
    dtype, shape and content are merged (hashing their bytes), so that each shared tensor is
    stored once whatever the exporter did. The
    initializers are then renamed from the first module path that used them
    (``layers.3.attn.q.weight``) to their storage key (``store.tensors.attn_q_W_0.value``).
    """
    _merge_equal_initializers(graph)
    stored = model.stored_state().keys()
    canonical: dict[int, str] = {}
    aliases: dict[str, int] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases[name] = id(t)
        if name in stored:
            canonical[id(t)] = name
    for value in list(graph.graph.initializers.values()):
        key = canonical.get(aliases.get(value.name, -1))
        if key and key != value.name and key not in graph.graph.initializers:
            value.name = key
    # Fold the shape arithmetic, but never a node that reads a weight (that would store a copy
    # of it), and compute repeated subexpressions once: about 40% fewer nodes. Node metadata
    # (stack traces with local paths) was most of the file's bytes.
    weights = set(graph.graph.initializers.values())
    fold_constants(graph, should_fold=lambda node: False if any(v in weights for v in node.inputs) else None)
    _merge_equal_initializers(graph)  # the constants folding made
    CommonSubexpressionEliminationPass()(graph)
    RemoveUnusedNodesPass()(graph)
    ClearMetadataAndDocStringPass()(graph)
    graph.graph.metadata_props.clear()


def _merge_equal_initializers(graph: ir.Model) -> None:
    """Initializers of equal dtype, shape and bytes become one; its users read that one."""
    kept: dict[tuple, ir.Value] = {}
    for value in list(graph.graph.initializers.values()):
        array = value.const_value.numpy()
        digest = hashlib.sha256(array.tobytes()).hexdigest()  # tobytes is C order, even for a view
        key = (array.dtype.str, array.shape, digest)
        if key in kept:
            value.replace_all_uses_with(kept[key])
            graph.graph.initializers.pop(value.name)
        else:
            kept[key] = value


@contextmanager
def _quiet():
    """Silence the exporters' warnings (deprecations, 'torchvision is not installed')."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# ---- the model card ----------------------------------------------------------------------

def model_card(name: str, arch: ArchConfig, prov: dict, onnx_size: int) -> str:
    """The export's README.md."""
    b, run, feat = prov["bytes"], prov.get("run", {}), prov["features"]
    sizes = [("physical parameters (stored)", f"{prov['physical_params']:,}"),
             ("virtual parameters (every use)", f"{prov['virtual_params']:,}"),
             ("weights at fp32 / bf16 / int8", f"{b['fp32']:,} / {b['bf16']:,} / {b['int8']:,} B"),
             ("MACs per second of audio", f"{prov['macs_per_second'] / 1e6:.1f} M"),
             ("model.onnx", f"{onnx_size:,} B")]
    wers = [(k.replace("_", " "), f"{v:.3f}" if isinstance(v, float) else str(v))
            for k, v in prov.items() if "wer" in k.lower() and not isinstance(v, dict)]
    wers += [(f"this run, {k.replace('_', ' ')}", f"{v:.3f}") for k, v in run.items() if k.endswith(("_wer", "_cer"))]
    given = [(k, json.dumps(v)) for k, v in prov.items()
             if k not in ("bytes", "features", "run", "physical_params", "virtual_params", "macs_per_second")
             and "wer" not in k.lower()]
    vocab, enc = arch.vocab_size, arch.encoder
    return f"""# {name}

A Conformer-CTC speech recognizer found by `nas`: {sharing_in_words(arch)}.

Dimensions: d_model {enc.d_model}, {enc.n_heads} heads, feed-forward {enc.ffn_dim}, convolution kernel
{enc.conv_kernel}, {enc.n_layers} virtual layers, front end of {arch.frontend.channels} channels, {vocab} CTC classes.
What each virtual layer runs (a letter per stored block or module): `{layer_map(arch)}`.

## Size

{_table(sizes)}

## Accuracy (WER)

{_table(wers) if wers else "No WER recorded."}

## Provenance

{_table(given + [(f"run {k}", str(v)) for k, v in run.items() if not k.endswith(("_wer", "_cer"))])}

## Files

- `arch.json`: the design (`"arch"`, an `ArchConfig`) and this provenance.
- `model.safetensors`: the weights, each stored tensor once (shared tensors are not repeated).
- `model.onnx`: the same model, eval mode, each stored tensor once. Inputs `feats` float32
  `(batch, frames, {arch.frontend.n_mels})` and `lengths` int64 `(batch,)`; outputs `log_probs` float32
  `(batch, frames', {vocab})` and `out_lengths` int64 `(batch,)`, with `frames' = ((frames - 1) // 2 - 1) // 2`.
- `tokenizer.model`: the sentencepiece model.

## Use

```sh
nas transcribe DIR FILE.wav                                    # greedy CTC transcript
nas train DIR/arch.json --schedule full --data synth --out RUN    # retrain the design
```

`DIR` is this directory.

In Python: `nas.export.load_export(DIR)` gives `(arch, model, tokenizer)`.

## Input features

{feat['n_mels']}-dim log-mel of 16 kHz mono audio: {feat['win_length'] * 1000 // feat['sample_rate']} ms windows
({feat['win_length']} samples, FFT {feat['n_fft']}) every {feat['hop_length'] * 1000 // feat['sample_rate']} ms
({feat['hop_length']} samples), `log(mel + {feat['log_offset']:g})`, then normalized per utterance: each mel bin
to mean 0 and standard deviation 1 over the utterance's frames (`nas.data.features.log_mel`).

## Tokenizer

`tokenizer.model` is a sentencepiece model (sha256 `{prov['tokenizer_sha256']}`). The model has {vocab} CTC
classes: **class 0 is the CTC blank**, class `i + 1` is sentencepiece piece `i`. Decode greedily: the best
class per frame, repeats collapsed, blanks removed, the rest mapped through sentencepiece.
"""


# ---- helpers -----------------------------------------------------------------------------

def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def _run_summary(metrics: dict) -> dict:
    """What the export records of the run: schedule, steps, time, dev and test WER and CER."""
    out = {k: metrics[k] for k in ("schedule", "steps", "train_seconds") if k in metrics}
    for split in ("dev", "test"):
        for m in ("wer", "cer"):
            if m in metrics.get(split, {}):
                out[f"{split}_{m}"] = metrics[split][m]
    return out


def _check_trained_design(checkpoint: Path, arch: ArchConfig) -> None:
    """Weights alone do not tell designs of the same shapes apart (another head count, ``cycle``
    instead of ``sequence``): the run's checkpoint, when kept, names the design it trained."""
    if not checkpoint.is_file():
        return
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True).get("arch")
    if trained is not None and ArchConfig.from_json(trained, str(checkpoint)) != arch:
        raise UserError(str(checkpoint), "arch", "the run trained another design than the one exported")


def _features(arch: ArchConfig) -> FeatureConfig:
    return FeatureConfig(n_mels=arch.frontend.n_mels)


def _tokenizer(path: Path, arch: ArchConfig) -> Tokenizer:
    if not path.is_file():
        raise UserError(str(path), "", "not found")
    try:
        tokenizer = Tokenizer.load(path)
    except RuntimeError as exc:
        raise UserError(str(path), "", f"not a sentencepiece model ({str(exc).splitlines()[0]})") from None
    if tokenizer.vocab_size != arch.vocab_size:
        raise UserError(str(path), "", f"has {tokenizer.vocab_size} CTC classes; "
                                       f"the design has vocab_size {arch.vocab_size}")
    return tokenizer


def _model(arch: ArchConfig, path: Path) -> ConformerCTC:
    if not path.is_file():
        raise UserError(str(path), "", "not found")
    try:
        return ConformerCTC.load(arch, path).eval()
    except (ValueError, RuntimeError, SafetensorError) as exc:
        why = str(exc).removeprefix(f"{path}: ").splitlines()[0]
        raise UserError(str(path), "", f"does not hold this design's weights ({why})") from None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
