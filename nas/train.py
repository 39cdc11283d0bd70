"""The trainer: ``train(arch, schedule, corpus, out_dir) -> metrics``.

CTC on log-mels, AdamW with warm-up and cosine decay, gradient clipping, fixed seeds; greedy
CTC decoding scored with jiwer. A run checkpoints into ``out_dir`` and resumes from it. Every
``eval_every`` steps the dev WER goes to ``callback(step, metrics)``; a callback that returns
True stops the run early (the search's multi-fidelity hook). Runs on CUDA when present.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Literal

import jiwer
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from nas.budget import count
from nas.config import ArchConfig, user_error
from nas.data.corpus import Corpus
from nas.data.features import FeatureConfig, FeatureSet, SpecAugment, bucket_batches, collate
from nas.data.tokenizer import BLANK, Tokenizer
from nas.errors import UserError
from nas.model import ConformerCTC

log = logging.getLogger(__name__)
SCHEDULES = Path(__file__).with_name("schedules")
MAX_NONFINITE = 20  # consecutive non-finite batches before a run is declared diverged


class _Augment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    freq_masks: int = Field(2, ge=0)
    freq_width: int = Field(15, ge=0)
    time_masks: int = Field(2, ge=0)
    time_width_ratio: float = Field(0.05, ge=0, le=1)


class Schedule(BaseModel):
    """A named training recipe, read from ``nas/schedules/<name>.yaml`` or a user's YAML file."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    steps: int = Field(gt=0)
    batch_frames: int = Field(gt=0)
    peak_lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    final_lr_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    specaugment: _Augment = _Augment()
    eval_every: int = Field(gt=0)
    eval_utterances: int | None = Field(None, gt=0)
    tokenizer: Literal["char", "unigram", "bpe"] = "char"
    seed: int = 0


def load_schedule(name_or_path: str | Path) -> Schedule:
    """A built-in schedule by name (``proxy``, ``full``, ``demo``, ``tiny``) or a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCHEDULES / f"{name_or_path}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in SCHEDULES.glob("*.yaml")))
            raise UserError("--schedule", "", f"no schedule named {str(name_or_path)!r} (built in: {names}; or a .yaml path)")
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(str(path), "", "file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(str(path), "", f"YAML syntax error ({exc})".replace("\n", " ")) from None
    try:
        return Schedule.model_validate(doc)
    except ValidationError as exc:
        raise user_error(str(path), exc) from None


class Diverged(UserError):
    """The loss stayed non-finite; the last good checkpoint is kept."""


class OverMemory(UserError):
    """The run's process grew past its memory guard (``max_memory_mb``)."""


def rss_mb() -> float:
    """This process's resident memory in MB (10**6 bytes, as budgets count): Linux's /proc, else
    the peak that getrusage keeps."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def train(
    arch: ArchConfig,
    schedule: Schedule,
    corpus: Corpus,
    out_dir: str | Path,
    callback: Callable[[int, dict], bool | None] | None = None,
    threads: int | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
    max_memory_mb: float | None = None,
) -> dict:
    """Train ``arch`` under ``schedule`` on ``corpus``; write ``metrics.json``, the checkpoint and
    the tokenizer into ``out_dir`` and return the metrics. Resumes from a checkpoint there.

    ``max_memory_mb`` is a memory guard: once the process holds more after a step, the run stops
    with :class:`OverMemory` (the last checkpoint is kept), before the machine starts to swap or
    the kernel kills a whole worker."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _seed(schedule.seed)
    features = FeatureConfig(n_mels=arch.frontend.n_mels)
    train_set = FeatureSet(corpus.train, corpus.feature_cache, features)
    dev_set = FeatureSet(corpus.dev, corpus.feature_cache, features)
    tokenizer = _tokenizer(out, train_set.texts, arch.vocab_size, schedule.tokenizer)

    model = ConformerCTC(arch, dropout=schedule.dropout).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=schedule.peak_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, schedule))
    state = {"step": 0, "curve": [], "nonfinite": 0, "train_seconds": 0.0, "audio_seconds": 0.0}
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = _resume(ckpt, arch, schedule, model, opt, sched)
        state["resumed_at"] = state.get("resumed_at", []) + [state["step"]]
        log.info("resuming %s at step %d", out, state["step"])

    augment = SpecAugment(**schedule.specaugment.model_dump())
    gen = torch.Generator().manual_seed(schedule.seed + state["step"])
    eval_limit = schedule.eval_utterances
    stopped_early, streak, loss_sum, loss_n = False, 0, 0.0, 0
    bar = tqdm(total=schedule.steps, initial=state["step"], desc=f"train {schedule.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    batches: list[list[int]] = []
    t_start = time.perf_counter() - state["train_seconds"]
    while state["step"] < schedule.steps and not stopped_early:
        if not batches:  # a new epoch, its order fixed by the seed and the step it starts at
            batches = bucket_batches(train_set.lengths, schedule.batch_frames, shuffle=True,
                                     seed=schedule.seed + state["step"])
        batch = collate(train_set, batches.pop(), tokenizer, augment, gen).to(device)
        model.train()
        log_probs, out_lens = model(batch.feats, batch.feat_lens)
        loss = F.ctc_loss(log_probs.transpose(0, 1), batch.targets, out_lens, batch.target_lens,
                          blank=BLANK, zero_infinity=True)
        opt.zero_grad(set_to_none=True)
        ok = torch.isfinite(loss)
        if ok:
            loss.backward()
            ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip))
        if not ok:
            state["nonfinite"] += 1
            streak += 1
            if streak >= MAX_NONFINITE:
                raise Diverged(str(ckpt), "loss", f"non-finite for {streak} consecutive batches at step "
                               f"{state['step']}; the last good checkpoint is kept")
            continue
        streak = 0
        if max_memory_mb is not None and (held := rss_mb()) > max_memory_mb:
            raise OverMemory(str(out), "memory", f"the process holds {held:,.0f} MB at step {state['step']}, "
                             f"over its guard of {max_memory_mb:,.0f} MB")
        opt.step()
        sched.step()
        state["step"] += 1
        state["audio_seconds"] += float(batch.feat_lens.sum()) / 100
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)
        if state["step"] % schedule.eval_every == 0 or state["step"] == schedule.steps:
            dev = evaluate(model, dev_set, tokenizer, schedule.batch_frames, limit=eval_limit)
            state["train_seconds"] = time.perf_counter() - t_start
            point = {"step": state["step"], "train_loss": loss_sum / max(loss_n, 1), "dev_wer": dev["wer"],
                     "dev_cer": dev["cer"], "lr": sched.get_last_lr()[0], "elapsed_s": round(state["train_seconds"], 1)}
            state["curve"].append(point)
            loss_sum, loss_n = 0.0, 0
            bar.set_postfix(loss=f"{point['train_loss']:.3f}", dev_wer=f"{dev['wer']:.3f}")
            _save(ckpt, arch, schedule, model, opt, sched, state)
            if callback is not None and callback(state["step"], point):
                stopped_early = True
    bar.close()
    state["train_seconds"] = time.perf_counter() - t_start

    metrics = _final_metrics(arch, schedule, state, stopped_early, device, tokenizer)
    metrics["dev"] = evaluate(model, dev_set, tokenizer, schedule.batch_frames, limit=eval_limit)
    metrics["skipped"] = {"train": train_set.skipped, "dev": dev_set.skipped}
    if evaluate_test and not stopped_early:
        test_set = FeatureSet(corpus.test, corpus.feature_cache, features)
        metrics["test"] = evaluate(model, test_set, tokenizer, schedule.batch_frames)
        metrics["skipped"]["test"] = test_set.skipped
    model.save(out / "model.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate(model: ConformerCTC, data: FeatureSet, tokenizer: Tokenizer, batch_frames: int,
             limit: int | None = None) -> dict:
    """Greedy CTC decoding of (the first ``limit`` utterances of) ``data``; WER and CER by jiwer."""
    device = next(model.parameters()).device
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    refs, hyps = [], []
    with torch.no_grad():
        for idx in bucket_batches(data.lengths[:n], 2 * batch_frames, shuffle=False):
            batch = collate(data, idx, tokenizer).to(device)
            log_probs, lens = model(batch.feats, batch.feat_lens)
            hyps += greedy_decode(log_probs, lens, tokenizer)
            refs += batch.texts
    return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "utterances": n,
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, tokenizer: Tokenizer) -> list[str]:
    """Best class per frame, repeats collapsed, blanks removed. ``log_probs`` ``(B, T, V)``."""
    best = log_probs.argmax(-1).cpu()
    texts = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[:n]).tolist()
        texts.append(tokenizer.decode([i for i in ids if i != BLANK]))
    return texts


def _lr_factor(step: int, s: Schedule) -> float:
    """Linear warm-up to the peak, then cosine decay to ``final_lr_ratio`` of it."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    return s.final_lr_ratio + (1 - s.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer(out: Path, texts: list[str], vocab_size: int, model_type: str) -> Tokenizer:
    path = out / "tokenizer.model"
    if path.is_file():
        return Tokenizer.load(path)
    try:
        return Tokenizer.train(texts, vocab_size, model_type, path)
    except ValueError as exc:
        raise UserError("arch", "vocab_size", str(exc)) from None


def _save(path: Path, arch, schedule, model, opt, sched, state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"arch": arch.to_json(), "schedule": schedule.model_dump(), "model": model.stored_state(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state,
                "rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)  # a run killed while saving keeps the previous checkpoint


def _resume(path: Path, arch, schedule, model, opt, sched) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises pickle, zip and EOF errors for damaged files
        raise UserError(str(path), "", f"cannot read this checkpoint ({type(exc).__name__}); delete it to start "
                        "the run over") from None
    if ck["arch"] != arch.to_json() or ck["schedule"] != schedule.model_dump():
        raise UserError(str(path), "", "holds a run of another design or schedule; use another --out")
    model.load_state_dict(ck["model"], strict=False)
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["rng"])
    return ck["state"]


def _final_metrics(arch, schedule, state, stopped_early, device, tokenizer) -> dict:
    c = count(arch)
    return {
        "schedule": schedule.name,
        "steps": state["step"],
        "stopped_early": stopped_early,
        "physical_params": c.physical,
        "virtual_params": c.virtual,
        "bytes_fp32": c.bytes("fp32"),
        "curve": state["curve"],
        "train_seconds": round(state["train_seconds"], 1),
        "audio_seconds_per_second": round(state["audio_seconds"] / max(state["train_seconds"], 1e-9), 1),
        "nonfinite_batches": state["nonfinite"],
        "resumed_at_steps": state.get("resumed_at", []),  # a run killed and continued from its checkpoint
        "device": str(device),
        "threads": torch.get_num_threads(),
        "tokenizer": {"type": schedule.tokenizer, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256},
    }
