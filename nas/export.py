"""The export: a chosen design, handed to the trainer and to deployment, in one directory.

``write_export(out_dir, arch, run_dir, provenance)`` turns a trainer run directory into::

    arch.json          {"arch": ArchConfig, "provenance": {...}}; `nas train DIR/arch.json` reads it
    model.safetensors  each stored tensor once, under its storage-plan key
    model.onnx         log-mels (B, T, n_mels) + lengths (B,) -> log-probs (B, T', vocab) + lengths (B,)
    tokenizer.model    the sentencepiece model (CTC class 0 is the blank)
    README.md          the model card

with ``T' = ((T - 1) // 2 - 1) // 2`` (the 4x subsampling). ``load_export`` and ``transcribe`` read
it back; ``check_onnx`` compares onnxruntime with PyTorch on a real audio file. The ONNX export
itself is :mod:`nas.onnx_export`; the model card is the template ``templates/model_card.md.j2``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import cache
from importlib import resources
from pathlib import Path

import jinja2
import numpy as np
import onnxruntime as ort
import torch
from safetensors import SafetensorError

from nas.budget import DTYPE_BYTES, count
from nas.config import SCHEMA_VERSION, ArchConfig
from nas.data.audio import AudioError, load_audio
from nas.data.features import FeatureConfig, log_mel
from nas.data.tokenizer import Tokenizer
from nas.decode import greedy_decode
from nas.describe import layer_map, sharing_in_words
from nas.errors import UserError
from nas.files import atomic_write
from nas.model import ConformerCTC
from nas.onnx_export import OUTPUTS, onnx_model
from nas.pareto import front
from nas.plan import subsampled_frames
from nas.retrain import load_retrained, pick_best_under
from nas.trials import records

RUN_FILES = ("model.safetensors", "tokenizer.model", "metrics.json")


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
    atomic_write(out_dir / "arch.json", (json.dumps(doc, indent=2) + "\n").encode())
    model.save(out_dir / "model.safetensors")
    atomic_write(out_dir / "tokenizer.model", (run_dir / "tokenizer.model").read_bytes())
    atomic_write(out_dir / "model.onnx", onnx_bytes)
    atomic_write(out_dir / "README.md", model_card(out_dir.name, arch, prov, len(onnx_bytes)).encode())
    return out_dir


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
        "proxy_wer": next(iter(rec.values.values())) if rec.values else None,
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
    factor = arch.frontend.subsampling
    if subsampled_frames(1 + len(wav) // cfg.hop_length, factor) < 1:
        least = next(n for n in range(1, 100) if subsampled_frames(n, factor) >= 1)  # log-mel frames
        raise UserError(str(audio_path), "", f"too short ({len(wav) * 1000 // cfg.sample_rate} ms; the model needs "
                                             f"at least {(least - 1) * cfg.hop_length * 1000 // cfg.sample_rate} ms)")
    return log_mel(wav, cfg)


# ---- the model card ----------------------------------------------------------------------

def model_card(name: str, arch: ArchConfig, prov: dict, onnx_size: int) -> str:
    """The export's README.md: ``templates/model_card.md.j2`` filled in from the design and ``prov``."""
    b, run = prov["bytes"], prov.get("run", {})
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
    given += [(f"run {k}", str(v)) for k, v in run.items() if not k.endswith(("_wer", "_cer"))]
    return _card_template().render(
        name=name, sharing=sharing_in_words(arch), layer_map=layer_map(arch), enc=arch.encoder,
        frontend=arch.frontend, vocab=arch.vocab_size, sizes=sizes, wers=wers, provenance=given,
        feat=prov["features"], tokenizer_sha256=prov["tokenizer_sha256"],
    )


@cache
def _card_template() -> jinja2.Template:
    text = (resources.files("nas") / "templates" / "model_card.md.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    return env.from_string(text)


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
