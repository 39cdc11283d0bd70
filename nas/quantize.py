"""An exported ONNX model at a deployment dtype: ``fp32``, ``bf16`` or ``int8``, each stored tensor once.

The budget (:mod:`nas.budget`) counts every stored parameter at the deployment dtype: 4, 2 or 1
byte. :func:`convert` makes the ONNX file hold exactly that. Each stored parameter (an initializer
named by its ``model.safetensors`` key, see :mod:`nas.onnx_export`) is replaced, under the same
name, by one initializer at the dtype, read through one node that gives the float tensor back
to every use:

- ``bf16``: a bfloat16 initializer and one ``Cast`` to float;
- ``int8``: an int8 initializer, its scale and zero point (``KEY.scale``, ``KEY.zero_point``)
  and one ``DequantizeLinear`` (the QDQ format). Matrices and convolution kernels are symmetric
  per output channel (zero point 0, one scale per row); vectors (biases, norm weights) one
  asymmetric scale and zero point each.

The BatchNorm running statistics, outside the budget, stay float32.

Why not onnxruntime's ``quantize_static`` on the whole graph? Measured with onnxruntime 1.32 on
our export of a shared design: the exporter feeds every matrix to its products through a
``Transpose``, so the quantizer sees no weight there; it quantizes the transposed matrix as an
activation and leaves the float32 matrix in the file (``tests/test_quantize.py`` keeps this
check). After its recommended pre-processing (``quant_pre_process``), the matrices are quantized,
but the graph optimizer has folded each layer's BatchNorm into the depthwise kernel that the
layers share, making a fused copy of it per layer, and renamed every weight: more int8 bytes than
the design stores, under names that no longer say which stored tensor they are. Quantizing each
stored tensor ourselves, once, makes sharing survive by construction: a tensor shared by six
layers is one int8 initializer with one set of scales, dequantized once.

Activations (``int8`` only, ``activations="static"``, the default): the inputs of every matrix
product and convolution pass a ``QuantizeLinear``/``DequantizeLinear`` pair with a fixed scale and
zero point (uint8, asymmetric, per tensor: onnxruntime's default for activations), calibrated with
onnxruntime's ``MinMaxCalibrater`` on log-mels of a few training utterances. Static, not dynamic:
an int8 neural processor (Edge TPU class) runs fixed-scale integer kernels and cannot compute an
activation's range at run time, so the error measured is the one the device makes; onnxruntime's
dynamic quantization is a CPU speed-up that would understate it. Norms, softmax and the other
elementwise operations stay float, as in onnxruntime's own QDQ quantization. ``activations="float"``
quantizes the weights only, to tell the two errors apart.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

DTYPES = ("fp32", "bf16", "int8")
ACTIVATIONS = ("static", "float")
SCALE, ZERO_POINT = ".scale", ".zero_point"  # suffixes of a stored tensor's quantization parameters
# products whose float inputs are quantized as activations
QUANTIZED_OPS = ("MatMul", "Conv")
# nodes a weight may pass between its dequantization and a product (a view, not a computation)
_VIEWS = ("Transpose", "Unsqueeze", "Reshape", "Squeeze", "Identity", "Cast", "DequantizeLinear")


def convert(model: bytes, params: Iterable[str], dtype: str, calibration: Sequence[dict] = (),
            activations: str = "static") -> bytes:
    """The float32 ONNX ``model`` with the stored parameters ``params`` (initializer names) at ``dtype``.

    Args:
        calibration: ``int8`` with static activations: feeds (``{"feats": (1, T, n_mels),
            "lengths": (1,)}``) whose activation ranges set the activation scales.
        activations: ``int8`` only: ``"static"`` (calibrated, fixed scales) or ``"float"``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
    if dtype == "fp32":
        return model
    graph = ir.serde.deserialize_model(onnx.load_from_string(model))
    params = set(params)
    for value in list(graph.graph.initializers.values()):
        if value.name in params:
            (_to_bf16 if dtype == "bf16" else _to_int8)(graph.graph, value)
    if dtype == "int8":
        _transpose_before_dequantizing(graph.graph)
    graph.graph.sort()
    if dtype == "int8" and activations == "static":
        if not calibration:
            raise ValueError("static int8 activations need calibration feeds")
        ranges = _calibrate(graph, calibration)
        _quantize_activations(graph.graph, ranges)
        graph.graph.sort()
    return ir.serde.serialize_model(graph).SerializeToString()


# ---- weights --------------------------------------------------------------------------------

def _replace(graph: ir.Graph, value: ir.Value, stored: ir.Value, op: str, extra: list[ir.Value],
             attributes: dict) -> None:
    """Put ``stored`` (named like ``value``) and ``extra`` in the file instead of ``value``; every
    use of ``value`` reads the float tensor one ``op`` node makes of them."""
    node = ir.Node("", op, [stored, *extra], attributes=[_attr(k, v) for k, v in attributes.items()],
                   num_outputs=1, name=f"{value.name}/{op}")
    node.outputs[0].name = f"{value.name}/float"
    value.replace_all_uses_with(node.outputs[0])
    graph.initializers.pop(value.name)
    for v in (stored, *extra):
        graph.register_initializer(v)
    graph.append(node)


def _to_bf16(graph: ir.Graph, value: ir.Value) -> None:
    array = value.const_value.numpy().astype(np.float32)
    stored = _initializer(value.name, _bf16_tensor(array, value.name))
    _replace(graph, value, stored, "Cast", [], {"to": ir.DataType.FLOAT})


def _to_int8(graph: ir.Graph, value: ir.Value) -> None:
    array = value.const_value.numpy().astype(np.float32)
    q, scale, zero_point, axis = quantize_weight(array)
    name = value.name
    extra = [_initializer(name + SCALE, ir.tensor(scale, name=name + SCALE)),
             _initializer(name + ZERO_POINT, ir.tensor(zero_point, name=name + ZERO_POINT))]
    _replace(graph, value, _initializer(name, ir.tensor(q, name=name)), "DequantizeLinear", extra,
             {"axis": axis} if axis is not None else {})


def _transpose_before_dequantizing(graph: ir.Graph) -> None:
    """``int8 → DequantizeLinear → Transpose`` becomes ``int8 → Transpose → DequantizeLinear``.

    The exporter feeds each matrix to its products through a ``Transpose``. Between the
    dequantization and the product, it keeps onnxruntime from fusing them into integer kernels
    (``MatMulIntegerToFloat``, ``QLinearMatMul``): measured, it then runs float products on
    dequantized weights. Transposed first, the int8 weight is folded in memory when the session
    loads; the file still holds it once, in its stored layout.
    """
    for node in list(graph):
        dq = node.inputs[0].producer() if node.op_type == "Transpose" and node.inputs else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
            continue
        perm = list(node.attributes["perm"].value)
        transpose = ir.Node("", "Transpose", [dq.inputs[0]], attributes=[ir.Attr("perm", ir.AttributeType.INTS, perm)],
                            num_outputs=1, name=f"{node.name}/int8")
        per_channel = dq.inputs[1].shape is not None and dq.inputs[1].shape.rank() > 0
        axis = [_attr("axis", perm.index(dq.attributes["axis"].value))] if per_channel else []
        after = ir.Node("", "DequantizeLinear", [transpose.outputs[0], dq.inputs[1], dq.inputs[2]], attributes=axis,
                        num_outputs=1, name=f"{dq.name}/transposed")
        after.outputs[0].name = f"{node.outputs[0].name}/float"
        node.outputs[0].replace_all_uses_with(after.outputs[0])
        graph.extend([transpose, after])
        graph.remove(node, safe=True)
        if not dq.outputs[0].uses():
            graph.remove(dq, safe=True)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """``(q int8, scale float32, zero_point int8, axis)``, with ``w ≈ (q - zero_point) * scale``.

    A matrix or kernel (2 or more dimensions): symmetric per output channel (axis 0), ``q`` in
    [-127, 127], zero point 0. A vector: one asymmetric scale over ``[min(w, 0), max(w, 0)]``
    (a LayerNorm weight near 1 keeps twice the resolution it would have symmetric).
    """
    if w.ndim >= 2:
        amax = np.abs(w).reshape(len(w), -1).max(1)
        scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        return q, scale, np.zeros(len(w), np.int8), 0
    lo, hi = min(float(w.min(initial=0.0)), 0.0), max(float(w.max(initial=0.0)), 0.0)
    scale = np.float32((hi - lo) / 255 if hi > lo else 1.0)
    zero_point = np.int8(np.clip(np.rint(-128 - lo / scale), -128, 127))
    q = np.clip(np.rint(w / scale) + zero_point, -128, 127).astype(np.int8)
    return q, np.array(scale, np.float32), np.array(zero_point, np.int8), None


def _bf16_tensor(array: np.ndarray, name: str) -> ir.TensorProtocol:
    """``array`` rounded to bfloat16 (to nearest even), as an ONNX tensor."""
    bits = array.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    proto = onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, array.shape, rounded.tobytes(), raw=True)
    return ir.serde.deserialize_tensor(proto)


def _initializer(name: str, tensor) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _attr(name: str, value: int) -> ir.Attr:
    return ir.Attr(name, ir.AttributeType.INT, int(value))


# ---- activations ----------------------------------------------------------------------------

def _activation_inputs(graph: ir.Graph) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
    """The float inputs of the products (``QUANTIZED_OPS``) that are computed, not weights, and
    their uses by those products."""
    constant: dict[ir.Value, bool] = {}

    def is_constant(v: ir.Value) -> bool:
        if v not in constant:
            node = v.producer()
            constant[v] = v.const_value is not None or (
                node is not None and (node.op_type in _VIEWS or node.op_type == "Constant")
                and all(i is None or is_constant(i) for i in node.inputs))
        return constant[v]

    found: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
    for node in graph:
        if node.op_type not in QUANTIZED_OPS:
            continue
        for index in (0, 1) if node.op_type == "MatMul" else (0,):
            v = node.inputs[index]
            if v is not None and not is_constant(v):
                found.setdefault(v, []).append((node, index))
    return found


def _calibrate(model: ir.Model, feeds: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """``(min, max)`` of every activation input of a product, over ``feeds``, by onnxruntime's
    MinMax calibrater."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader, MinMaxCalibrater

    names = {v.name for v in _activation_inputs(model.graph)}

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(ir.serde.serialize_model(model).SerializeToString())
        calibrater = MinMaxCalibrater(path, op_types_to_calibrate=list(QUANTIZED_OPS),
                                      augmented_model_path=str(Path(tmp) / "augmented.onnx"))
        calibrater.augment_graph()
        calibrater.create_inference_session()
        calibrater.collect_data(Feeds())
        data = calibrater.compute_data()
    return {name: (float(np.min(data[name].range_value[0])), float(np.max(data[name].range_value[1])))
            for name in names if name in data}


def activation_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point of the range ``[lo, hi]`` (widened to hold 0, which must be exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255 if hi > lo else 1.0)
    return scale, np.uint8(np.clip(np.rint(-lo / scale), 0, 255))


def _quantize_activations(graph: ir.Graph, ranges: dict[str, tuple[float, float]]) -> None:
    """A QuantizeLinear/DequantizeLinear pair on each calibrated activation input of a product."""
    for value, uses in _activation_inputs(graph).items():
        if value.name not in ranges:
            continue
        scale, zero_point = activation_params(*ranges[value.name])
        s = _initializer(value.name + SCALE, ir.tensor(np.array(scale, np.float32), name=value.name + SCALE))
        z = _initializer(value.name + ZERO_POINT, ir.tensor(np.array(zero_point, np.uint8),
                                                            name=value.name + ZERO_POINT))
        graph.register_initializer(s)
        graph.register_initializer(z)
        q = ir.Node("", "QuantizeLinear", [value, s, z], num_outputs=1, name=f"{value.name}/Quantize")
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], num_outputs=1, name=f"{value.name}/Dequantize")
        q.outputs[0].name, dq.outputs[0].name = f"{value.name}/q", f"{value.name}/dq"
        graph.extend([q, dq])
        for node, index in uses:
            node.replace_input_with(index, dq.outputs[0])
