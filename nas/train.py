"""The trainer: ``train(arch, schedule, corpus, out_dir) -> metrics``.

CTC on log-mels, AdamW with warm-up and cosine decay, gradient clipping, fixed seeds. A run
checkpoints into ``out_dir`` and resumes from it. Every ``eval_every`` steps the dev set is
decoded greedily and the point (step, losses, dev WER, CER and loss per token, times) goes to
``callback(step, point)``; a callback that returns True stops the run early (the search's
multi-fidelity hook). At the end dev and test are decoded greedily and, when the schedule says
``decode: beam``, by beam search with a lexicon and word LM from the training transcripts
(:mod:`nas.decode`), scored with jiwer. Runs on CUDA when present.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jiwer
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from nas.budget import count
from nas.config import ArchConfig
from nas.data.corpus import Corpus
from nas.data.features import FeatureConfig, FeatureSet, SpecAugment, bucket_batches, collate
from nas.data.tokenizer import BLANK, Tokenizer
from nas.decode import BeamDecoder, build_lm, greedy_decode, stop_workers, tune_decoder
from nas.errors import UserError
from nas.files import atomic_path, atomic_write
from nas.schedule import Schedule
from nas.model import ConformerCTC
from nas.optim import optimizer

log = logging.getLogger(__name__)
TEST_TRANSCRIPTS = "test_transcripts.json"  # each test utterance's final hypothesis, by id (see score)
MAX_NONFINITE = 20  # consecutive non-finite batches before a run is declared diverged
MAX_DECODE_WORKERS = 8  # processes for the final beam search (decode_workers)


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
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _seed(schedule.seed)
    features = FeatureConfig(n_mels=arch.frontend.n_mels)
    train_set = FeatureSet(corpus.train, corpus.feature_cache, features)
    dev_set = FeatureSet(corpus.dev, corpus.feature_cache, features)
    out.mkdir(parents=True, exist_ok=True)  # only once the data was accepted: a refusal writes nothing
    tokenizer = _tokenizer(out, train_set.texts, arch.vocab_size, schedule.tokenizer)

    model = initial_model(arch, schedule).to(device)
    opt = optimizer(model, _param_groups(model, schedule), schedule.peak_lr, schedule.muon_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, schedule))
    state = {"step": 0, "curve": [], "nonfinite": 0, "train_seconds": 0.0, "step_seconds": 0.0, "audio_seconds": 0.0,
             "loss_total": 0.0, "loss_count": 0}
    # The weights evaluated and saved: an exponential moving average of the trained ones when the
    # schedule asks (Polyak averaging; icefall's "averaged model"): at a high learning rate the average
    # decodes far better than the last step's weights.
    ema = AveragedModel(model, multi_avg_fn=_ema(schedule.ema), use_buffers=True) if schedule.ema else None
    ckpt = out / "checkpoint.pt"
    data = _data_record(corpus, train_set)
    if ckpt.is_file():
        state = _resume(ckpt, arch, schedule, data, model, opt, sched, ema)
        state["resumed_at"] = state.get("resumed_at", []) + [state["step"]]
        log.info("resuming %s at step %d", out, state["step"])

    masks = schedule.specaugment
    augment = SpecAugment(**masks.model_dump()) if masks.freq_masks or masks.time_masks else None
    gen = torch.Generator().manual_seed(schedule.seed + state["step"])
    # Where the epoch stood at the checkpoint: the batches not yet taken and SpecAugment's generator,
    # so that a resumed run trains exactly as the uninterrupted one (a checkpoint written before these
    # were saved starts a new epoch from its step's seed instead).
    batches: list[list[int]] = state.pop("epoch_batches", [])
    sorted_epoch: bool = state.pop("epoch_sorted", False)
    if "augment_rng" in state:
        gen.set_state(state.pop("augment_rng"))
    eval_limit = schedule.eval_utterances
    tap = inter_layer(arch) if schedule.inter_ctc else None  # the layer InterCTC decodes, if it is on
    stopped_early, streak, loss_sum, loss_n = False, 0, 0.0, 0
    if callback is not None and state["curve"] and state["step"] < schedule.steps:
        # A resumed run reports its checkpoint's last evaluation again: the process may have died
        # between saving it and reporting it, and successive halving judges a design at that point
        # (a caller keeps one point per step).
        stopped_early = bool(callback(state["step"], state["curve"][-1]))
    bar = tqdm(total=schedule.steps, initial=state["step"], desc=f"train {schedule.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter() - state["train_seconds"]
    while state["step"] < schedule.steps and not stopped_early:
        t_step = time.perf_counter()
        if sorted_epoch and state["step"] >= schedule.sort_first_steps:
            batches, sorted_epoch = [], False  # SortaGrad is over: the rest goes in shuffled epochs
        if not batches:  # a new epoch, its order fixed by the seed and the step it starts at
            sorted_epoch = state["step"] < schedule.sort_first_steps
            batches = bucket_batches(train_set.lengths, schedule.batch_frames, shuffle=not sorted_epoch,
                                     seed=schedule.seed + state["step"])
            if sorted_epoch:
                batches.reverse()  # batches are taken from the end: shortest first
        late = state["step"] >= schedule.specaugment_from  # SpecAugment only once the model has learned a little
        batch = collate(train_set, batches.pop(), tokenizer, augment if late else None, gen).to(device)
        model.train()
        x, out_lens, mid = model.encode(batch.feats, batch.feat_lens, tap=tap)
        loss = _ctc(model.log_probs(x), out_lens, batch)
        if mid is not None:  # InterCTC: the middle layer's output through the same head
            loss = (1 - schedule.inter_ctc) * loss + schedule.inter_ctc * _ctc(model.log_probs(mid), out_lens, batch)
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
        if ema is not None:
            ema.update_parameters(model)
        state["step"] += 1
        state["audio_seconds"] += float(batch.feat_lens.sum()) / 100
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        state["loss_total"] += loss.item()
        state["loss_count"] += 1
        state["step_seconds"] += time.perf_counter() - t_step
        bar.update(1)
        if state["step"] % schedule.eval_every == 0 or state["step"] == schedule.steps:
            dev = evaluate(_weights(model, ema), dev_set, tokenizer, schedule.batch_frames, limit=eval_limit)
            state["train_seconds"] = time.perf_counter() - t_start
            point = {"step": state["step"], "train_loss": loss_sum / max(loss_n, 1),
                     "train_loss_mean": state["loss_total"] / state["loss_count"], "dev_wer": dev["wer"],
                     "dev_cer": dev["cer"], "dev_loss": dev["loss"], "lr": sched.get_last_lr()[0],
                     "elapsed_s": round(state["train_seconds"], 1), "train_s": round(state["step_seconds"], 1)}
            state["curve"].append(point)
            loss_sum, loss_n = 0.0, 0
            bar.set_postfix(loss=f"{point['train_loss']:.3f}", dev_wer=f"{dev['wer']:.3f}")
            _save(ckpt, arch, schedule, data, model, opt, sched,
                  {**state, "epoch_batches": batches, "epoch_sorted": sorted_epoch, "augment_rng": gen.get_state()},
                  ema)
            if callback is not None and callback(state["step"], point):
                stopped_early = True
    bar.close()
    state["train_seconds"] = time.perf_counter() - t_start

    metrics = _final_metrics(arch, schedule, state, stopped_early, device, tokenizer) | {"data": data}
    model = _weights(model, ema)  # what is evaluated and saved from here on
    dev = forward(model, dev_set, tokenizer, schedule.batch_frames, limit=eval_limit)
    decoder = None
    try:
        if schedule.decode == "beam" and not stopped_early:
            decoder, metrics["decoder"] = _beam_decoder(out / "lm", train_set.texts, tokenizer, schedule, dev)
        metrics["dev"] = score(dev, tokenizer, decoder)
        metrics["skipped"] = {"train": train_set.skipped, "dev": dev_set.skipped}
        if evaluate_test and not stopped_early:
            test_set = FeatureSet(corpus.test, corpus.feature_cache, features)
            metrics["test"] = score(forward(model, test_set, tokenizer, schedule.batch_frames), tokenizer, decoder,
                                    transcripts=out / TEST_TRANSCRIPTS)
            metrics["skipped"]["test"] = test_set.skipped
    finally:
        stop_workers()  # the beam search's processes, if it had any
    model.save(out / "model.safetensors")
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def initial_model(arch: ArchConfig, schedule: Schedule) -> ConformerCTC:
    """The model before its first step, initialized as ``schedule`` says: the residual branches'
    scale (``branch_init_gain``) and the blank's bias (``blank_bias``, added to ``nn.Linear``'s)."""
    model = ConformerCTC(arch, dropout=schedule.dropout, branch_init_gain=schedule.branch_init_gain)
    if schedule.blank_bias:
        with torch.no_grad():
            model.head.bias[BLANK] += schedule.blank_bias
    return model


@dataclass
class Outputs:
    """The model's outputs on (the first ``utterances`` of) a split, batch by batch."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (log_probs (B, T, V) on the CPU, lengths (B,))
    refs: list[str]
    ids: list[str]
    loss: float  # CTC loss per target token
    forward_s: float
    manifest_sha256: str = ""  # the split's manifest (FeatureSet.manifest_sha256)

    @property
    def utterances(self) -> int:
        return len(self.refs)


def forward(model: ConformerCTC, data: FeatureSet, tokenizer: Tokenizer, batch_frames: int,
            limit: int | None = None) -> Outputs:
    """Run the model (eval mode) on the first ``limit`` utterances of ``data``."""
    device = next(model.parameters()).device
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    out = Outputs([], [], [], 0.0, 0.0, data.manifest_sha256)
    loss, tokens, t0 = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for idx in bucket_batches(data.lengths[:n], 2 * batch_frames, shuffle=False):
            batch = collate(data, idx, tokenizer).to(device)
            log_probs, lens = model(batch.feats, batch.feat_lens)
            loss += float(_ctc(log_probs, lens, batch, reduction="sum"))
            tokens += int(batch.target_lens.sum())
            out.batches.append((log_probs.cpu(), lens.cpu()))
            out.refs += batch.texts
            out.ids += batch.ids
    out.loss, out.forward_s = loss / max(tokens, 1), time.perf_counter() - t0
    return out


def score(outputs: Outputs, tokenizer: Tokenizer, decoder: BeamDecoder | None = None,
          transcripts: Path | None = None) -> dict:
    """Greedy WER and CER of ``outputs``, and with ``decoder`` also ``beam_wer``, ``beam_cer`` and the
    seconds the beam search took (``decode_s``, against ``forward_s`` for the model). With
    ``transcripts``, each utterance's final hypothesis (the beam search's when there is a decoder)
    and reference are written there by utterance id, with the split's manifest digest, as icefall
    keeps its recogs: the report's robustness tables read them, so they need no weights and no
    features."""
    refs = outputs.refs
    hyps = [h for lp, n in outputs.batches for h in greedy_decode(lp, n, tokenizer)]
    result = {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "loss": outputs.loss,
              "utterances": outputs.utterances, "forward_s": round(outputs.forward_s, 2),
              "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}
    if decoder is not None:
        t0 = time.perf_counter()
        beam = decoder.decode(outputs.batches)
        result |= {"beam_wer": jiwer.wer(refs, beam), "beam_cer": jiwer.cer(refs, beam),
                   "decode_s": round(time.perf_counter() - t0, 2), "decode_workers": decoder.workers}
        for example, h in zip(result["examples"], beam):
            example["beam"] = h
    if transcripts is not None:
        final = beam if decoder is not None else hyps
        atomic_write(transcripts, json.dumps({"decoding": "beam + lexicon + LM" if decoder else "greedy",
                                              "manifest_sha256": outputs.manifest_sha256,
                                              "hyps": dict(zip(outputs.ids, final)),
                                              "refs": dict(zip(outputs.ids, refs))}, indent=0) + "\n")
    return result


def evaluate(model: ConformerCTC, data: FeatureSet, tokenizer: Tokenizer, batch_frames: int,
             limit: int | None = None, decoder: BeamDecoder | None = None) -> dict:
    """Decode (the first ``limit`` utterances of) ``data``; WER and CER by jiwer (see :func:`score`)."""
    return score(forward(model, data, tokenizer, batch_frames, limit), tokenizer, decoder)


def _beam_decoder(lm_dir: Path, train_texts: list[str], tokenizer: Tokenizer, schedule: Schedule,
                  dev: Outputs) -> tuple[BeamDecoder, dict]:
    """The lexicon and LM from the training transcripts (only), and the beam search settings
    that decode ``dev`` best; returns the decoder and what to record of it."""
    t0 = time.perf_counter()
    build_lm(train_texts, tokenizer, lm_dir, schedule.lm_order)
    built = time.perf_counter() - t0
    workers = decode_workers()
    settings, dev_wer = tune_decoder(lm_dir, dev.batches, dev.refs, workers=workers)
    record = {"beam": settings.beam, "beam_tokens": settings.beam_tokens, "beam_threshold": settings.beam_threshold,
              "lm_weight": settings.lm_weight,
              "word_score": settings.word_score, "tuned_on": f"dev ({dev.utterances} utterances)",
              "tuned_dev_wer": dev_wer, "lm": json.loads((lm_dir / "lm.json").read_text()),
              "lm_build_s": round(built, 1), "tune_s": round(time.perf_counter() - t0 - built, 1)}
    return BeamDecoder(lm_dir, settings, workers), record


def decode_workers() -> int:
    """Processes for the final beam search: one per torch thread (the cores the forward passes
    had), at most ``MAX_DECODE_WORKERS`` (each holds torch and the decoder: about 0.3 GB)."""
    return max(1, min(torch.get_num_threads(), MAX_DECODE_WORKERS))


def inter_layer(arch: ArchConfig) -> int:
    """The virtual layer whose output InterCTC decodes (``Schedule.inter_ctc``): the middle one."""
    return max(1, arch.encoder.n_layers // 2)


def _ctc(log_probs: torch.Tensor, lengths: torch.Tensor, batch, reduction: str = "mean") -> torch.Tensor:
    """CTC loss of batch-first ``log_probs`` against ``batch``'s targets: the training loss (mean over
    the batch of each utterance's loss per target token) or, with ``reduction="sum"``, the sum that
    the dev loss divides by the token count."""
    return F.ctc_loss(log_probs.transpose(0, 1), batch.targets, lengths, batch.target_lens, blank=BLANK,
                      reduction=reduction, zero_infinity=True)


def _param_groups(model: ConformerCTC, s: Schedule) -> list[dict]:
    """AdamW's parameter groups: weight decay for matrices only, and a learning rate divided by
    ``uses ** shared_lr_exponent`` for a tensor used at several places of the encoder.

    Adam moves every tensor by about the learning rate whatever its gradient's size, so a tensor
    that serves k places moves the function about k times as far as one that serves one. Without
    the division, designs of 18 or more virtual layers on repeated blocks stayed on the CTC blank
    plateau (the README's `shared_lr_exponent` says what was measured). Groups come in a fixed
    order, so that a checkpoint's optimizer state resumes into the same groups."""
    uses = model.uses()
    groups: dict[tuple[bool, int], list] = {}
    for p in model.parameters():
        groups.setdefault((p.ndim >= 2, uses.get(p, 1)), []).append(p)
    return [{"params": ps, "weight_decay": s.weight_decay if decay else 0.0,
             "lr": s.peak_lr / k ** s.shared_lr_exponent}
            for (decay, k), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


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


def _ema(decay: float):
    """The moving average's update, with its decay warmed up as in TensorFlow's
    ExponentialMovingAverage: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first
    steps' weights fade fast.

    It updates a whole group of tensors (one device and dtype) at once with foreach kernels, reading
    ``n`` once: per tensor, as ``avg_fn`` would, a step costs one host-device sync per parameter on a
    GPU and hundreds of small ops. Integer buffers (BatchNorm's batch counter) are copied."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        torch._foreach_lerp_(averaged, current, 1 - d)
    return update


def _weights(model: ConformerCTC, ema: AveragedModel | None) -> ConformerCTC:
    return model if ema is None else ema.module


def _data_record(corpus: Corpus, train_set: FeatureSet) -> dict:
    """What a run was trained on: the corpus as named, and its training split's size and manifest
    digest (what identifies it, however it was named: ``synth`` and ``synth:10`` are one corpus)."""
    return {"spec": corpus.spec, "train_utterances": len(train_set),
            "train_hours": round(sum(train_set.lengths) / 100 / 3600, 2), "train_sha256": train_set.manifest_sha256}


def _save(path: Path, arch, schedule, data: dict, model, opt, sched, state, ema=None) -> None:
    with atomic_path(path) as tmp:  # a run killed while saving keeps the previous checkpoint
        torch.save({"arch": arch.to_json(), "schedule": schedule.model_dump(), "data": data,
                    "model": model.stored_state(), "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state,
                    "ema": None if ema is None else {"model": ema.module.stored_state(), "n": ema.n_averaged},
                    "rng": torch.get_rng_state()}, tmp)


def _resume(path: Path, arch, schedule, data: dict, model, opt, sched, ema=None) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises pickle, zip and EOF errors for damaged files
        raise UserError(str(path), "", f"cannot read this checkpoint ({type(exc).__name__}); delete it to start "
                        "the run over") from None
    if ArchConfig.from_json(ck["arch"]) != arch or ck["schedule"] != schedule.model_dump():
        raise UserError(str(path), "", "holds a run of another design or schedule; use another --out")
    trained_on = ck.get("data")  # (checkpoints written before 2026-12-06 do not say)
    if trained_on is not None and trained_on["train_sha256"] != data["train_sha256"]:
        raise UserError(str(path), "data", f"holds a run trained on another corpus ({trained_on['spec']}, "
                        f"{trained_on['train_hours']:g} h), not {data['spec']}; use another --out")
    model.load_state_dict(ck["model"], strict=False)
    if ema is not None:
        ema.module.load_state_dict(ck["ema"]["model"], strict=False)
        ema.n_averaged.copy_(ck["ema"]["n"])
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
        "train_loss_mean": state["loss_total"] / max(state["loss_count"], 1),  # over the whole run
        "resumed_at_steps": state.get("resumed_at", []),  # a run killed and continued from its checkpoint
        "device": str(device),
        "threads": torch.get_num_threads(),
        "tokenizer": {"type": schedule.tokenizer, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256},
    }
