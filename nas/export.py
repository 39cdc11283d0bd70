"""The export: a chosen design, handed to the trainer and to deployment, in one directory.

``write_export(out_dir, arch, run_dir, provenance)`` turns a trainer run directory into::

    arch.json          {"arch": ArchConfig, "provenance": {...}}; `nas train DIR/arch.json` reads it
    model.safetensors  each stored tensor once, under its storage-plan key (float32)
    model.onnx         log-mels (B, T, n_mels) + lengths (B,) -> log-probs (B, T', vocab) + lengths (B,),
                       at the deployment dtype (fp32, bf16 or int8: :mod:`nas.quantize`), each
                       stored tensor one initializer named by its key
    features.npz       the log-mel window and filterbank, for the torch-free front end (:mod:`nas.runtime`)
    tokenizer.model    the sentencepiece model (CTC class 0 is the blank)
    lm/                the run's lexicon and word LM for beam search, when it decoded so
    README.md          the model card

with ``T' = ((T - 1) // 2 - 1) // 2`` (the 4x subsampling). Given a corpus, the export then
measures itself on the deployment path (:mod:`nas.measure`): test WER and CER at fp32 and at its
dtype, the file's bytes against the budget arithmetic, the one-thread real-time factor, the peak
activation memory of a 10 s utterance, and WER by recording condition; ``arch.json`` and the card
record them. ``load_export`` reads the export back into PyTorch; ``transcribe`` runs it with
onnxruntime (:class:`nas.runtime.Recognizer`); ``check_onnx`` compares onnxruntime with PyTorch on
a real audio file. The ONNX export itself is :mod:`nas.onnx_export`; the model card is the template
``templates/model_card.md.j2``.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import torch
import torchaudio
from safetensors import SafetensorError

from nas.budget import DTYPE_BYTES, count, parse_budget
from nas.config import SCHEMA_VERSION, ArchConfig
from nas.data.audio import AudioError, load_audio
from nas.data.corpus import resolve_data
from nas.data.features import FeatureConfig, log_mel
from nas.data.manifest import read_manifest
from nas.data.tokenizer import Tokenizer
from nas.decode import LM_FILES
from nas.errors import UserError
from nas.files import atomic_write
from nas.measure import calibration_feeds, file_bytes, measure_export
from nas.model import ConformerCTC
from nas.model_card import model_card
from nas.onnx_export import OUTPUTS, onnx_model
from nas.pareto import front
from nas.plan import subsampled_frames
from nas.quantize import ACTIVATIONS, DTYPES, convert
from nas.retrain import load_retrained, pick_best_under
from nas.runtime import FEATURES_FILE, LM_DIR, LogMel, Recognizer
from nas.trials import records

RUN_FILES = ("model.safetensors", "tokenizer.model", "metrics.json")
CALIBRATION_UTTERANCES = 32  # training utterances whose activation ranges set the int8 scales


def write_export(out_dir: Path, arch: ArchConfig, run_dir: Path, provenance: dict, force: bool = False,
                 dtype: str | None = None, data: str | None = None, activations: str = "static",
                 test_utterances: int | None = None, measure: bool = True, progress: bool = False) -> Path:
    """Export the design ``arch`` trained in ``run_dir`` (a trainer output directory) to ``out_dir``.

    ``provenance`` (study, trial, proxy signal and value, full WER, budget...) is stored as given in
    ``arch.json``, completed with the sizes from :func:`nas.budget.count`, the tokenizer's
    sha256, the feature settings, the run's metrics, the dtype and how it was quantized, and the
    measurements. Refuses an ``out_dir`` that already holds files unless ``force`` (which
    overwrites the export's files and leaves any others). Returns ``out_dir``.

    Args:
        dtype: ``model.onnx``'s dtype, ``fp32``, ``bf16`` or ``int8``; default the dtype of
            ``provenance["budget"]`` (``4MB@int8`` gives int8), else fp32.
        data: the corpus (``--data`` spec) whose training audio calibrates int8 activations and
            whose test split the export is measured on; default ``provenance["data"]``. Without
            one nothing is measured (and static int8 is refused).
        activations: int8 only: ``static`` (calibrated, as an int8 device runs) or ``float``.
        test_utterances: measure on the first so many test utterances (default all).
        measure: measure the export (WER at each dtype, speed, memory, bytes, robustness).
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
    dtype = dtype or _budget_dtype(provenance.get("budget"))
    if dtype not in DTYPES:
        raise UserError("--dtype", "", f"{dtype!r}: expected one of {', '.join(DTYPES)}")
    if activations not in ACTIVATIONS:
        raise UserError("--activations", "", f"{activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    static = dtype == "int8" and activations == "static"
    _check_trained_design(run_dir / "checkpoint.pt", arch)
    tokenizer = _tokenizer(run_dir / "tokenizer.model", arch)
    model = _model(arch, run_dir / "model.safetensors")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(str(run_dir / "metrics.json"), "", f"not valid JSON ({exc})") from None
    data = data or provenance.get("data")
    corpus = None
    if data and (measure or static):
        corpus = resolve_data(data, progress=progress)
    if static and corpus is None:
        raise UserError("--data", "", "an int8 export calibrates its activations on training audio: name the "
                                      "corpus with --data (or quantize the weights only: --activations float)")
    lm = run_dir / LM_DIR if all((run_dir / LM_DIR / f).is_file() for f in LM_FILES) else None

    # the slow, fallible part, done before anything is written
    fp32 = onnx_model(model)
    features = frontend_arrays(_features(arch))
    params, buffers = stored_names(model)
    quantization, feeds = None, []
    if static:
        feeds, quantization = _calibration(corpus, features)
    deployed = convert(fp32, params, dtype, feeds, activations)
    if dtype != "fp32":
        quantization = _quantization(dtype, activations, quantization)

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
        "dtype": dtype,
        "onnx_file": file_bytes(deployed, arch, dtype, params, buffers),
        **({"quantization": quantization} if quantization else {}),
        **({"decoder": _beam_settings(metrics["decoder"])} if lm and metrics.get("decoder") else {}),
        "schema_version": SCHEMA_VERSION,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_doc(out_dir, arch, prov)
    model.save(out_dir / "model.safetensors")
    atomic_write(out_dir / "tokenizer.model", (run_dir / "tokenizer.model").read_bytes())
    atomic_write(out_dir / "model.onnx", deployed)
    atomic_write(out_dir / FEATURES_FILE, features)
    for name in LM_FILES:  # the run's LM, or none: an LM left by an earlier export would not match
        if lm:
            (out_dir / LM_DIR).mkdir(exist_ok=True)
            atomic_write(out_dir / LM_DIR / name, (lm / name).read_bytes())
        else:
            (out_dir / LM_DIR / name).unlink(missing_ok=True)
    if measure and corpus is not None:
        prov["deployment"] = measure_export(out_dir, arch, {"fp32": fp32, dtype: deployed}, dtype, corpus,
                                            params, buffers, test_utterances, progress)
    atomic_write(out_dir / "README.md", model_card(out_dir.name, arch, prov, len(deployed)).encode())
    _write_doc(out_dir, arch, prov)
    return out_dir


def _write_doc(out_dir: Path, arch: ArchConfig, prov: dict) -> None:
    doc = {"arch": json.loads(arch.to_json()), "provenance": prov}
    atomic_write(out_dir / "arch.json", (json.dumps(doc, indent=2) + "\n").encode())


def _budget_dtype(budget: str | None) -> str:
    """The dtype a study's budget counts bytes at (``1M``: fp32; ``4MB@int8``: int8); fp32 without one."""
    if not budget:
        return "fp32"
    return parse_budget(budget, "provenance", "budget").dtype


def stored_names(model: ConformerCTC) -> tuple[set[str], set[str]]:
    """The keys of the stored parameters (the budget) and of the stored buffers (BatchNorm statistics)."""
    stored = model.stored_state().keys()
    params = {k for k, _ in model.named_parameters()} & stored
    return params, set(stored) - params


def frontend_arrays(cfg: FeatureConfig) -> bytes:
    """``features.npz``: what :class:`nas.runtime.LogMel` needs to compute :func:`log_mel` in numpy,
    taken from torch's own window and torchaudio's filterbank (those ``MelSpectrogram`` uses)."""
    window = torch.hann_window(cfg.win_length).numpy()
    left = (cfg.n_fft - cfg.win_length) // 2  # torch.stft centres a shorter window in n_fft
    fb = torchaudio.functional.melscale_fbanks(cfg.n_fft // 2 + 1, 0.0, float(cfg.sample_rate // 2), cfg.n_mels,
                                               cfg.sample_rate)
    buf = io.BytesIO()
    np.savez(buf, window=np.pad(window, (left, cfg.n_fft - cfg.win_length - left)), mel_fb=fb.numpy(),
             sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
             log_offset=cfg.log_offset)
    return buf.getvalue()


def _calibration(corpus, features: bytes) -> tuple[list[dict], dict]:
    """Calibration feeds from the corpus's training audio, and what to record of them."""
    feeds, ids = calibration_feeds(read_manifest(corpus.train), LogMel(io.BytesIO(features)),
                                   CALIBRATION_UTTERANCES)
    if not feeds:
        raise UserError(str(corpus.train), "", "no usable training utterance to calibrate int8 activations on")
    frames = sum(f["feats"].shape[1] for f in feeds)
    return feeds, {"data": corpus.spec, "split": "train", "utterances": len(ids), "seconds": frames / 100,
                   "ids": ids, "method": "onnxruntime MinMaxCalibrater: each activation's min and max over these "
                                         "utterances, run one at a time"}


def _quantization(dtype: str, activations: str, calibration: dict | None) -> dict:
    if dtype == "bf16":
        return {"weights": "bfloat16 (rounded to nearest even), one Cast to float32 per stored tensor",
                "activations": "float32", "tool": "nas.quantize"}
    return {
        "weights": "int8, one DequantizeLinear per stored tensor (QDQ): matrices and kernels symmetric per output "
                   "channel, vectors asymmetric per tensor",
        "activations": ("uint8, asymmetric, per tensor, static (calibrated): the inputs of every matrix product "
                        "and convolution" if activations == "static" else "float32 (weights only)"),
        **({"calibration": calibration} if calibration else {}),
        "tool": f"nas.quantize; calibration by onnxruntime {ort.__version__}",
    }


def _beam_settings(decoder: dict) -> dict:
    """The run's tuned beam search settings (``metrics.json``'s ``decoder``), as the export uses them."""
    keys = ("beam", "beam_tokens", "beam_threshold", "lm_weight", "word_score", "tuned_on", "tuned_dev_wer", "lm")
    return {k: decoder[k] for k in keys if k in decoder}


def choose_for_export(study: optuna.Study, out: Path, design: int | None, best_under=None) -> tuple:
    """The design to export, the run directory holding its weights, and its provenance.

    ``design``: a trial on the front or retrained; its full-schedule weights when it was
    retrained, else its proxy weights. ``best_under``: the retrained design with the lowest full dev
    WER that fits that budget.
    """
    rows = load_retrained(out) or []
    settings = study.user_attrs.get("settings", {})
    by_number = {r.number: r for r in records(study)}
    on_front = sorted(r.number for r in front(study))
    if best_under is not None:
        row = pick_best_under(rows, best_under)
        rec = by_number[row["number"]]
    else:
        retrained_rows = {r["number"]: r for r in rows}
        if design not in set(on_front) | set(retrained_rows):
            raise UserError("--design", "", f"trial {design} is neither on the front nor retrained (front: {on_front})")
        rec, row = by_number[design], retrained_rows.get(design)
    retrained = row is not None and row["full_dev_wer"] is not None
    provenance = {
        "study": study.study_name, "trial": rec.number, "label": rec.label,
        **dict(zip(("proxy_signal", "proxy_value"), rec.proxy)),
        "full_dev_wer": row["full_dev_wer"] if retrained else None,
        "full_test_wer": row["full_test_wer"] if retrained else None,
        "weights": f"{row['schedule']} schedule" if retrained else f"{settings.get('proxy')} schedule (not retrained)",
        "budget": settings.get("budget"), "data": settings.get("data"),
    }
    return rec.arch, Path(row["run_dir"]) if retrained else rec.run_dir, provenance


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
    """Transcript of one audio file by the export's ``model.onnx`` with onnxruntime, without torch
    (:class:`nas.runtime.Recognizer`): beam search with the export's LM when it has one, else greedy."""
    return Recognizer(dir).transcribe(audio_path)


def check_onnx(dir: Path, audio_path: Path) -> float:
    """Max absolute difference between onnxruntime's and PyTorch's log-probs on ``audio_path``
    (``inf`` when their shapes or output lengths differ). Parity holds for an fp32 export; a bf16 or
    int8 ``model.onnx`` differs by its rounding (measured as WER at export instead)."""
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
    factor = arch.frontend.subsampling
    if subsampled_frames(1 + len(wav) // cfg.hop_length, factor) < 1:
        least = next(n for n in range(1, 100) if subsampled_frames(n, factor) >= 1)  # log-mel frames
        raise UserError(str(audio_path), "", f"too short ({len(wav) * 1000 // cfg.sample_rate} ms; the model needs "
                                             f"at least {(least - 1) * cfg.hop_length * 1000 // cfg.sample_rate} ms)")
    return log_mel(wav, cfg)


# ---- helpers -----------------------------------------------------------------------------

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
