"""A model as ONNX, each stored tensor held once under its ``model.safetensors`` key.

:func:`onnx_model` exports with torch's dynamo exporter, or the TorchScript exporter when that
fails, then tidies the graph: copies of one stored tensor become one initializer, named by its
storage key, and shape arithmetic is folded. The graph's interface::

    feats (B, T, n_mels) float32, lengths (B,) int64 -> log_probs (B, T', vocab) float32, out_lengths (B,) int64

with ``T' = ((T - 1) // 2 - 1) // 2`` (the 4x subsampling).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from contextlib import contextmanager

import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import (
    ClearMetadataAndDocStringPass, CommonSubexpressionEliminationPass, RemoveUnusedNodesPass,
)
from onnxscript.optimizer import fold_constants

from nas.model import ConformerCTC

log = logging.getLogger(__name__)

INPUTS, OUTPUTS = ("feats", "lengths"), ("log_probs", "out_lengths")


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
    # keep_initializers_as_inputs: otherwise the exporter merges initializers of equal value,
    # distinct stored tensors included (fresh LayerNorm weights are all ones). Made inputs, they
    # are dropped from the inputs below. do_constant_folding=False: folding would replace each
    # transposed weight by an unnamed transposed copy; onnxruntime folds those when it loads.
    buf = io.BytesIO()
    torch.onnx.export(
        model, (feats, lengths), buf, dynamo=False, opset_version=18,
        keep_initializers_as_inputs=True, do_constant_folding=False,
        input_names=list(INPUTS), output_names=list(OUTPUTS),
        dynamic_axes={"feats": {0: "batch", 1: "frames"}, "lengths": {0: "batch"},
                      "log_probs": {0: "batch", 1: "frames_out"}, "out_lengths": {0: "batch"}},
    )
    graph = ir.serde.deserialize_model(onnx.load_from_string(buf.getvalue()))
    inputs = [v for v in graph.graph.inputs if v.name in INPUTS]
    graph.graph.inputs.clear()
    graph.graph.inputs.extend(inputs)
    return graph


def _store_once(graph: ir.Model, model: ConformerCTC) -> None:
    """Make each stored tensor one initializer, named by its ``model.safetensors`` key; tidy up.

    An exporter may hold a stored tensor more than once: one initializer per use, named after
    the module path of the use (with torch 2.11, the dynamo exporter's optimizer made a
    transposed copy per use; the unoptimized dynamo export and the TorchScript export above hold
    each once). Such copies are merged (:func:`_merge_equal_initializers`), then each initializer
    is renamed from the module path that used it (``layers.3.attn.q.weight``) to its storage key
    (``store.tensors.attn_q_W_0.value``).
    """
    owners = _owners(model)
    _merge_equal_initializers(graph, owners)
    for value in list(graph.graph.initializers.values()):
        key = owners.get(value.name)
        if key and key != value.name and key not in graph.graph.initializers:
            value.name = key
    # Fold the shape arithmetic, but never a node that reads a weight (that would store a copy
    # of it), and compute repeated subexpressions once: about 40% fewer nodes. Node metadata
    # (stack traces with local paths) was most of the file's bytes.
    weights = set(graph.graph.initializers.values())
    fold_constants(graph, should_fold=lambda node: False if any(v in weights for v in node.inputs) else None)
    _merge_equal_initializers(graph, owners)  # the constants folding made
    CommonSubexpressionEliminationPass()(graph)
    RemoveUnusedNodesPass()(graph)
    ClearMetadataAndDocStringPass()(graph)
    graph.graph.metadata_props.clear()


def _owners(model: ConformerCTC) -> dict[str, str]:
    """Every name of every stored tensor (its key, and the module path of each use) -> its key."""
    stored = model.stored_state().keys()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    keys = {id(t): name for name, t in named if name in stored}
    return {name: keys[id(t)] for name, t in named if id(t) in keys}


def _merge_equal_initializers(graph: ir.Model, owners: dict[str, str]) -> None:
    """Initializers of equal dtype, shape and bytes become one, unless they are two stored tensors.

    Merged: copies of one stored tensor (names that ``owners`` maps to the same key), and
    unnamed constants (an exporter's anonymous copies, the constants folding made), which go to
    the first initializer of equal content, a stored tensor if there is one.

    Never merged: two different stored tensors, however equal their values. Freshly initialized
    LayerNorm weights are all ones in every layer, and a trained model may keep some equal too;
    merging them would compute the same, but the file would then hold fewer stored tensors than
    the design has: fewer bytes than the budget arithmetic (:func:`nas.budget.count`) says, and
    a stored key missing from ``model.onnx``, so the two files would no longer describe the
    same stored tensors.
    """
    inits = graph.graph.initializers
    kept: dict[tuple, ir.Value] = {}  # (content, stored key or None) -> the initializer kept
    first: dict[tuple, ir.Value] = {}  # content -> the first initializer kept
    for value in sorted(inits.values(), key=lambda v: v.name not in owners):  # stored tensors first
        array = value.const_value.numpy()
        digest = hashlib.sha256(array.tobytes()).hexdigest()  # tobytes is C order, even for a view
        content = (array.dtype.str, array.shape, digest)
        owner = owners.get(value.name)
        into = kept.get((content, owner)) if owner else first.get(content)
        if into is not None:
            value.replace_all_uses_with(into)
            inits.pop(value.name)
        else:
            kept[(content, owner)] = value
            first.setdefault(content, value)


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
