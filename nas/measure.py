"""What an export costs on a device, measured at export time on the deployment path (:mod:`nas.runtime`:
onnxruntime and numpy, no torch):

- :func:`file_bytes`: the bytes of each kind of initializer in the ONNX file, counted from the file:
  the stored parameters (what the budget counts, compared exactly with :func:`nas.budget.count`),
  the BatchNorm statistics (outside the budget), the quantization scales and zero points, and the
  graph's own constants;
- :func:`accuracy_and_speed`: test WER and CER of each model (greedy, and beam search with the
  export's LM when it has one), and the real-time factor of onnxruntime on one CPU thread, each
  test utterance run alone (batch 1);
- :func:`activation_memory`: the peak memory one run on a 10 s utterance adds, measured in a fresh
  process (see there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from nas.budget import count
from nas.config import ArchConfig
from nas.data.text import normalize
from nas.errors import UserError
from nas.quantize import SCALE, ZERO_POINT
from nas.runtime import MODEL_FILE, LogMel, Recognizer, greedy, load_wav, session

if TYPE_CHECKING:
    from nas.data.manifest import Utterance

MEMORY_SECONDS = 10.0


def file_bytes(model: bytes, arch: ArchConfig, dtype: str, params: set[str], buffers: set[str]) -> dict:
    """Bytes of the initializers of ``model`` by kind and element type, counted from the file.

    ``params`` and ``buffers`` name the stored parameters and BatchNorm statistics. ``weights`` is
    the parameters' bytes, ``budget_bytes`` what :func:`nas.budget.count` says they take at
    ``dtype``, ``difference`` the one less the other (0 when the file is the budget).
    """
    proto = onnx.load_from_string(model)
    kinds = {"weights": {}, "buffers": {}, "quantization": {}, "constants": {}}
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        name = init.name
        if name in params:
            kind = "weights"
        elif name in buffers:
            kind = "buffers"
        elif name.endswith((SCALE, ZERO_POINT)):
            kind = "quantization"
        else:
            kind = "constants"
        dt = onnx.TensorProto.DataType.Name(init.data_type).lower()
        kinds[kind][dt] = kinds[kind].get(dt, 0) + array.size * _itemsize(init.data_type)
    totals = {k: sum(v.values()) for k, v in kinds.items()}
    budget = count(arch).bytes(dtype)
    stored = {i.name for i in proto.graph.initializer} & params
    return {
        "file": len(model), "weights": totals["weights"], "budget_bytes": budget,
        "difference": totals["weights"] - budget, "difference_share": (totals["weights"] - budget) / budget,
        "stored_tensors": len(stored), "missing_stored_tensors": len(params - stored),
        "quantization_params": totals["quantization"], "buffers": totals["buffers"], "constants": totals["constants"],
        "graph_and_names": len(model) - sum(totals.values()),
        "by_kind_and_type": kinds,
    }


def _itemsize(data_type: int) -> int:
    return {onnx.TensorProto.BFLOAT16: 2}.get(data_type) or np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def calibration_feeds(train: list[Utterance], frontend: LogMel, n: int) -> tuple[list[dict], list[str]]:
    """Feeds of ``n`` training utterances spread evenly over the manifest (batch 1), and their ids."""
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(n, len(train))).round().astype(int)]
    feeds, ids = [], []
    for utt in chosen:
        try:
            wav = load_wav(utt.audio, frontend.sample_rate)
            if len(wav) < frontend.sample_rate // 2:  # under half a second: not worth calibrating on
                continue
            feats = frontend(wav)
        except UserError:  # unreadable: another utterance will do
            continue
        feeds.append({"feats": feats[None], "lengths": np.array([len(feats)], np.int64)})
        ids.append(utt.id)
    return feeds, ids


def accuracy_and_speed(export_dir: Path, models: dict[str, bytes], test: list[Utterance],
                       progress: bool = False) -> dict:
    """Test WER/CER and one-thread real-time factor of each of ``models`` (by dtype), and the
    per-utterance hypotheses (``hyps``: dtype -> id -> text, in the export's decoding)."""
    import jiwer
    from tqdm import tqdm

    rec = Recognizer(export_dir, threads=1)
    feats, refs, seconds, skipped, t0 = {}, {}, {}, 0, time.perf_counter()
    for utt in test:
        try:
            wav = load_wav(utt.audio, rec.frontend.sample_rate)
            feats[utt.id] = rec.features_of(wav, utt.audio)
        except UserError:  # unreadable or too short: counted, left out
            skipped += 1
            continue
        refs[utt.id], seconds[utt.id] = normalize(utt.text), len(wav) / rec.frontend.sample_rate
    features_s = time.perf_counter() - t0
    ids = list(feats)
    if not ids:
        raise UserError(str(test[0].audio.parent) if test else "test", "", "no usable test utterance to measure on")
    audio_s = sum(seconds.values())
    out = {"utterances": len(ids), "skipped": skipped, "audio_s": round(audio_s, 1), "decoding": rec.decoding,
           "features_rtf": features_s / audio_s, "threads": 1, "accuracy": {}, "rtf": {}, "forward_s": {}, "decode_s": {},
           "decode_alone_s": {}, "hyps": {}}
    for dtype, model in models.items():
        sess = session(model, threads=1)
        sess.run(None, {"feats": feats[ids[0]][None], "lengths": np.array([len(feats[ids[0]])], np.int64)})  # warm-up
        run_s, best, beam, decode_s, log_probs = 0.0, {}, {}, 0.0, {}
        for i in tqdm(ids, desc=f"test {dtype}", unit="utt", disable=not progress):
            x = feats[i]
            t0 = time.perf_counter()
            lp, n = sess.run(None, {"feats": x[None], "lengths": np.array([len(x)], np.int64)})
            run_s += time.perf_counter() - t0
            lp = log_probs[i] = lp[0, : int(n[0])]
            best[i] = rec.tokenizer.decode(greedy(lp, len(lp)))
            if rec.beam is not None:
                t0 = time.perf_counter()
                beam[i] = rec.beam(lp, len(lp))
                decode_s += time.perf_counter() - t0
        if rec.beam is not None:  # the same search again with no forward pass between: what interleaving costs
            t0 = time.perf_counter()
            for i in ids:
                rec.beam(log_probs[i], len(log_probs[i]))
            out["decode_alone_s"][dtype] = round(time.perf_counter() - t0, 4)
        r, acc = [refs[i] for i in ids], {}
        for name, hyps in (("greedy", best), ("beam", beam)):
            if hyps:
                h = [hyps[i] for i in ids]
                acc[name] = {"wer": jiwer.wer(r, h), "cer": jiwer.cer(r, h)}
        out["accuracy"][dtype], out["rtf"][dtype] = acc, run_s / audio_s
        out["forward_s"][dtype], out["decode_s"][dtype] = round(run_s, 4), round(decode_s, 4)
        out["hyps"][dtype] = beam or best
    out["refs"] = refs
    return out


def differences(accuracy: dict, dtype: str) -> dict:
    """``accuracy[dtype] - accuracy["fp32"]``, per decoding and metric (absolute, as fractions)."""
    if dtype == "fp32" or "fp32" not in accuracy:
        return {}
    return {dec: {m: accuracy[dtype][dec][m] - v for m, v in ms.items()} for dec, ms in accuracy["fp32"].items()
            if dec in accuracy[dtype]}


def activation_memory(model: Path, n_mels: int, seconds: float = MEMORY_SECONDS) -> dict:
    """Peak memory that one onnxruntime run on a ``seconds``-long utterance adds, in a fresh process.

    How: batch 1, one thread, onnxruntime's CPU memory arena off (allocations go to the C
    allocator and are counted as they happen), glibc's mmap threshold fixed at 64 KiB (every
    larger block is returned when freed); a warm-up run on 1 s first, so that lazily made kernels
    and buffers are not counted; then the process's peak resident memory (Linux's ``VmHWM``) is
    reset through ``/proc/self/clear_refs`` and the run is made. The figure is the peak less the
    resident memory before the run: the activations and the output, plus any scratch space the
    kernels take, as onnxruntime on a CPU needs them (a neural processor's compiler plans its own
    buffers). Repeated, it varied by about 2% (measured on the paper-style design). Not Linux: ``None``.
    """
    cmd = [sys.executable, "-m", "nas.runtime", "memory", str(model), str(n_mels), str(seconds)]
    # glibc's malloc otherwise moves its mmap threshold as blocks are freed, so the same run's
    # peak varied by 2x (measured); fixed, every block of 64 KiB or more is mapped when allocated and
    # unmapped when freed, and the resident peak follows what is live.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        return {"bytes": None, "why": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_export(export_dir: Path, arch: ArchConfig, models: dict[str, bytes], dtype: str, corpus,
                   params: set[str], buffers: set[str], limit: int | None = None, progress: bool = False) -> dict:
    """Everything :mod:`nas.measure` measures of an export whose ``model.onnx`` is ``models[dtype]``,
    against ``models["fp32"]``, on the test split of ``corpus`` (its first ``limit`` utterances)."""
    from nas.data.manifest import read_manifest
    from nas.conditions import conditions_of, robustness_table

    test = read_manifest(corpus.test)[:limit]
    run = accuracy_and_speed(export_dir, models, test, progress)
    conditions, source = conditions_of(corpus.test)
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt, model in models.items():
            path = Path(export_dir) / MODEL_FILE if dt == dtype else Path(tmp) / f"model.{dt}.onnx"
            if dt != dtype:
                path.write_bytes(model)
            memory[dt] = activation_memory(path, arch.frontend.n_mels)
    return {
        "dtype": dtype,
        "test": {"data": corpus.spec, "manifest": str(corpus.test), "utterances": run["utterances"],
                 "skipped": run["skipped"], "audio_s": run["audio_s"]},
        "decoding": run["decoding"],
        "accuracy": run["accuracy"],
        "difference": differences(run["accuracy"], dtype),
        "rtf": {dt: round(x, 5) for dt, x in run["rtf"].items()},
        "rtf_features": round(run["features_rtf"], 5),
        "rtf_how": "onnxruntime session.run time over audio time, each test utterance alone (batch 1), one "
                   "thread (intra_op_num_threads=1), after one warm-up run; features and decoding not included",
        "forward_s": run["forward_s"],  # the session.run time that ``rtf`` is of
        "decode_s": run["decode_s"],  # the beam search's time on the same utterances, in the same loop
        "decode_alone_s": run["decode_alone_s"],  # the same search again, in a loop of its own
        "activation_memory": memory,
        "file": {dt: file_bytes(model, arch, dt, params, buffers) for dt, model in models.items()},
        "robustness": {"conditions_from": source, "dtype": dtype, "table": robustness_table(
            run["refs"], run["hyps"][dtype], conditions)},
    }

