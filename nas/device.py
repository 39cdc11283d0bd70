"""Device objectives for the search: what a trial's trained model costs on the deployment path.

``--objectives loss,bytes,rtf`` (or ``,memory``) makes the search minimize, beside the proxy signal
and bytes, the real-time factor of the trained model under onnxruntime on one CPU thread (the first
:data:`RTF_UTTERANCES` dev utterances, each alone), or the peak activation memory of one 10 s
utterance (:func:`nas.measure.activation_memory`). They are measured on the fp32 ONNX export of the
trial's own weights when its training ends, in the trial's worker; ``device_seconds`` in the trial's
user attrs records what the measurement cost. A design that stops at a rung of successive halving
is never measured, so device objectives go with ``--fidelity fixed``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from nas.config import ArchConfig
from nas.data.corpus import Corpus

RTF_UTTERANCES = 20  # the objectives these figures answer: nas.study.DEVICE_OBJECTIVES


def measure_device(run_dir: Path, arch: ArchConfig, corpus: Corpus, which: tuple[str, ...]) -> dict:
    """The device figures ``which`` of the model trained in ``run_dir``, and their cost in seconds."""
    from nas.data.features import FeatureConfig, FeatureSet
    from nas.measure import activation_memory
    from nas.model import ConformerCTC
    from nas.onnx_export import onnx_model
    from nas.runtime import session

    t0 = time.perf_counter()
    model = ConformerCTC.load(arch, Path(run_dir) / "model.safetensors").eval()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx_model(model))
        if "rtf" in which:
            sess = session(path, threads=1)  # the deployment path's session, as the export measures it
            dev = FeatureSet(corpus.dev, corpus.feature_cache, FeatureConfig(n_mels=arch.frontend.n_mels))
            feats = [dev.features(i).numpy()[None] for i in range(min(RTF_UTTERANCES, len(dev)))]
            sess.run(None, {"feats": feats[0], "lengths": np.array([feats[0].shape[1]])})  # warm-up
            start = time.perf_counter()
            for x in feats:
                sess.run(None, {"feats": x, "lengths": np.array([x.shape[1]])})
            audio_s = sum(x.shape[1] for x in feats) / 100  # 10 ms frames
            out["rtf"] = (time.perf_counter() - start) / audio_s
        if "memory" in which:
            out["activation_memory_bytes"] = activation_memory(path, arch.frontend.n_mels)["bytes"]
    out["device_seconds"] = round(time.perf_counter() - t0, 1)
    return out
