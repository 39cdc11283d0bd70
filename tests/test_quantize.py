"""The ONNX file at bf16 and int8: each stored tensor one initializer at the dtype, its bytes the
budget's exactly, one scale and zero point per tensor, and the model still computes the same."""

import logging
from math import prod

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from nas.budget import count
from nas.config import ArchConfig
from nas.measure import file_bytes
from nas.model import ConformerCTC
from nas.onnx_export import onnx_model
from nas.quantize import SCALE, ZERO_POINT, activation_params, convert, quantize_weight
from nas.runtime import session

# Every level of sharing, small: 4 virtual layers on 2 stored blocks, one conv module for all, three
# ties, low-rank feed-forward with shared factors.
SHARED = ArchConfig.from_dict({
    "frontend": {"channels": 8}, "vocab_size": 40,
    "encoder": {"d_model": 64, "n_heads": 2, "ffn_dim": 128, "n_layers": 4, "conv_kernel": 7},
    "sharing": {"blocks": {"pattern": "cycle", "n": 2}, "modules": {"conv": {"pattern": "cycle", "n": 1}},
                "ties": {"attn_qk": True, "conv_glu": True, "ffn_macaron": True},
                "low_rank": {"ffn_in": {"rank": 16, "share": "U"}, "ffn_out": {"rank": 16, "share": "V"}},
                "per_layer_cheap": True}})


def log_mels(frames: int, seed: int) -> dict:
    """A feed of smooth, speech-like normalized log-mels (random walks along time)."""
    x = np.cumsum(np.random.default_rng(seed).standard_normal((frames, 80)), 0)
    x = (x - x.mean(0)) / x.std(0)
    return {"feats": x[None].astype(np.float32), "lengths": np.array([frames], np.int64)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConformerCTC(SHARED).eval()


@pytest.fixture(scope="module")
def fp32(model):
    return onnx_model(model)


@pytest.fixture(scope="module")
def names(model):
    stored = model.stored_state().keys()
    params = {k for k, _ in model.named_parameters()} & stored
    return params, set(stored) - params


@pytest.fixture(scope="module")
def int8(fp32, names):
    return convert(fp32, names[0], "int8", [log_mels(n, i) for i, n in enumerate((150, 300, 220))])


def initializers(model: bytes) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load_from_string(model).graph.initializer}


def run(model: bytes, feed: dict) -> np.ndarray:
    return session(model).run(None, feed)[0]


def test_a_shared_tensor_is_one_int8_initializer_with_one_scale_and_zero_point(model, int8, names):
    params, buffers = names
    c = count(SHARED)
    assert c.virtual >= 2 * c.physical  # a copy per use would show at once
    inits = initializers(int8)
    # each stored parameter: one int8 initializer under its key, with one scale and one zero point
    assert all(inits[k].data_type == onnx.TensorProto.INT8 for k in params)
    assert {k for k in inits if k.endswith((SCALE, ZERO_POINT))} >= {k + s for k in params for s in (SCALE, ZERO_POINT)}
    # ... read by exactly one node (a DequantizeLinear, or the Transpose before one), never copied
    graph = onnx.load_from_string(int8).graph
    readers = {k: [n.op_type for n in graph.node if k in n.input] for k in params}
    assert all(len(r) == 1 and r[0] in ("DequantizeLinear", "Transpose") for r in readers.values()), readers
    # the int8 bytes are the budget's, exactly; nothing else in the file is a weight
    arrays = {k: numpy_helper.to_array(v) for k, v in inits.items()}
    assert sum(arrays[k].size for k in params) == c.physical == c.bytes("int8")
    assert sum(a.nbytes for k, a in arrays.items() if a.dtype == np.int8 and not k.endswith(ZERO_POINT)) \
        == c.bytes("int8")
    # the overhead: per matrix or kernel a float32 scale and an int8 zero point per output channel,
    # per vector one of each; activations one of each (scalars)
    weight_overhead = sum(5 * (arrays[k].shape[0] if arrays[k].ndim >= 2 else 1) for k in params)
    n_activations = sum(1 for k in inits if k.endswith(SCALE) and k.removesuffix(SCALE) not in params)
    f = file_bytes(int8, SHARED, "int8", params, buffers)
    assert (f["weights"], f["difference"], f["stored_tensors"]) == (c.bytes("int8"), 0, len(params))
    assert f["quantization_params"] == weight_overhead + 5 * n_activations and n_activations >= 10
    assert f["buffers"] == 4 * sum(arrays[k].size for k in buffers if k in arrays)


def test_bf16_holds_each_stored_tensor_once_at_two_bytes(fp32, names):
    params, buffers = names
    bf16 = convert(fp32, params, "bf16")
    inits = initializers(bf16)
    assert all(inits[k].data_type == onnx.TensorProto.BFLOAT16 for k in params)
    f = file_bytes(bf16, SHARED, "bf16", params, buffers)
    assert (f["weights"], f["difference"], f["quantization_params"]) == (count(SHARED).bytes("bf16"), 0, 0)
    feed = log_mels(400, 7)
    want, got = run(fp32, feed), run(bf16, feed)
    assert 0 < np.abs(got - want).max() < 0.05  # bfloat16 keeps 8 bits of mantissa


@pytest.mark.parametrize("activations", ["static", "float"])
def test_int8_computes_nearly_what_fp32_computes(fp32, int8, names, activations):
    model = int8 if activations == "static" else convert(fp32, names[0], "int8", activations="float")
    feed = log_mels(500, 11)  # longer than any calibration feed
    want, got = run(fp32, feed), run(model, feed)
    assert got.shape == want.shape
    probs = np.exp(want)
    assert 0 < np.abs(np.exp(got) - probs).max() < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_weights_only_int8_is_exactly_the_dequantized_weights(model, fp32, names):
    """QDQ's meaning: the int8 file computes what the float model computes with each weight
    replaced by its dequantized value (onnxruntime's integer kernels may round otherwise only with
    quantized activations)."""
    proto = onnx.load_from_string(fp32)
    for init in proto.graph.initializer:
        if init.name in names[0]:
            w = numpy_helper.to_array(init)
            q, scale, zero, axis = quantize_weight(w)
            shape = (-1,) + (1,) * (w.ndim - 1) if axis is not None else ()
            init.CopyFrom(numpy_helper.from_array(
                ((q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)), init.name))
    feed = log_mels(300, 3)
    weights_only = convert(fp32, names[0], "int8", activations="float")
    assert np.abs(run(weights_only, feed) - run(proto.SerializeToString(), feed)).max() <= 1e-5


def test_quantize_weight_rounds_within_half_a_step():
    rng = np.random.default_rng(0)
    for w in (rng.standard_normal((24, 16)).astype(np.float32), rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
              (1 + 0.1 * rng.standard_normal(32)).astype(np.float32), np.zeros((4, 4), np.float32)):
        q, scale, zero, axis = quantize_weight(w)
        assert q.dtype == np.int8 and q.shape == w.shape
        if w.ndim >= 2:
            assert axis == 0 and scale.shape == zero.shape == (len(w),) and not zero.any()
            assert np.abs(q).max() <= 127
            s = scale.reshape(-1, *[1] * (w.ndim - 1))
            assert np.all(np.abs(q * s - w) <= s / 2 + 1e-7)
        else:
            assert axis is None and scale.shape == zero.shape == ()
            assert np.abs((q.astype(np.float32) - zero) * scale - w).max() <= scale / 2 + 1e-7
            assert scale <= (w.max() - min(w.min(), 0)) / 255 + 1e-7  # asymmetric: the whole range
    scale, zero = activation_params(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == round(255 / 4)


def test_onnxruntimes_own_static_quantizer_would_leave_the_matrices_float(fp32, names, tmp_path):
    """Why nas.quantize quantizes each stored tensor itself (measured with onnxruntime 1.32): on our
    export, where each matrix reaches its products through a Transpose, quantize_static quantizes
    the transposed matrices as activations and leaves every stored matrix float32 in the file."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([log_mels(200, 0)])

        def get_next(self):
            return next(self.feeds, None)

    (tmp_path / "fp32.onnx").write_bytes(fp32)
    logging.disable(logging.WARNING)
    try:
        quantize_static(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", Feeds(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    inits = {i.name: i for i in onnx.load(tmp_path / "int8.onnx").graph.initializer}
    matrices = [k for k in names[0] if len(inits.get(k, onnx.TensorProto()).dims) == 2]
    assert matrices and all(inits[k].data_type == onnx.TensorProto.FLOAT for k in matrices)
    assert sum(prod(inits[k].dims) for k in matrices) > count(SHARED).physical // 2


def test_refuses_unknown_dtypes_and_static_int8_without_calibration(fp32, names):
    with pytest.raises(ValueError, match="dtype"):
        convert(fp32, names[0], "fp16")
    with pytest.raises(ValueError, match="calibration"):
        convert(fp32, names[0], "int8")
    assert convert(fp32, names[0], "fp32") is fp32
