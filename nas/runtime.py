"""The deployment path: an export run with onnxruntime and numpy, without torch.

``nas transcribe`` runs here, and so does every figure measured at export time (:mod:`nas.measure`).
Nothing in this module imports torch, directly or through another module (a test checks it in a
fresh process):

- :class:`LogMel` computes the log-mels in numpy as :func:`nas.data.features.log_mel` does in
  torch, from the mel filterbank and window the export saved (``features.npz``);
- :func:`load_wav` reads audio with soundfile (and resamples with scipy's polyphase filter; the
  trainer's torchaudio resampler gives slightly different samples, so audio at 16 kHz is exact);
- :func:`greedy` decodes in numpy; :class:`LexiconBeamSearch` runs the lexicon and word LM the
  export holds (``lm/``) through flashlight-text's own Python bindings, as
  :class:`nas.decode.BeamDecoder` does through torchaudio;
- :class:`Recognizer` ties them to an onnxruntime session of ``model.onnx``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nas.config import ArchConfig
from nas.data.tokenizer import BLANK, Tokenizer
from nas.errors import UserError
from nas.files import quiet_stderr
from nas.plan import subsampled_frames

FEATURES_FILE = "features.npz"
MODEL_FILE = "model.onnx"
LM_DIR = "lm"


class LogMel:
    """Log-mels ``(frames, n_mels)`` of a waveform, normalized per utterance, as
    :func:`nas.data.features.log_mel` computes them (to about 1e-5).

    ``features.npz`` holds the settings (``sample_rate``, ``n_fft``, ``hop_length``,
    ``log_offset``), the analysis ``window`` zero-padded to ``n_fft`` as ``torch.stft`` pads it,
    and the ``(n_fft // 2 + 1, n_mels)`` mel filterbank ``mel_fb``.
    """

    def __init__(self, path: Path):
        with np.load(path) as f:
            self.window = f["window"].astype(np.float64)
            self.mel_fb = f["mel_fb"].astype(np.float64)
            self.sample_rate, self.n_fft = int(f["sample_rate"]), int(f["n_fft"])
            self.hop_length, self.log_offset = int(f["hop_length"]), float(f["log_offset"])

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        pad = self.n_fft // 2  # torch.stft(center=True): reflect-padded by half a window each side
        x = np.pad(np.asarray(wav, np.float64), pad, mode="reflect")
        frames = 1 + len(wav) // self.hop_length
        starts = np.arange(frames) * self.hop_length
        spec = np.abs(np.fft.rfft(x[starts[:, None] + np.arange(self.n_fft)] * self.window, axis=1)) ** 2
        feats = np.log(spec @ self.mel_fb + self.log_offset)
        return ((feats - feats.mean(0)) / (feats.std(0) + 1e-5)).astype(np.float32)


def load_wav(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of an audio file at ``sample_rate``; bad audio is a UserError."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for missing or corrupt files
        raise UserError(str(path), "", f"cannot read audio ({str(exc).splitlines()[0]})") from None
    if data.size == 0:
        raise UserError(str(path), "", "audio is empty")
    wav = data.mean(axis=1)
    if not np.isfinite(wav).all():
        raise UserError(str(path), "", "audio holds non-finite samples")
    if rate != sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, sample_rate)
        wav = resample_poly(wav, sample_rate // g, rate // g).astype(np.float32)
    return wav


def greedy(log_probs: np.ndarray, n: int) -> list[int]:
    """CTC classes of ``log_probs`` ``(T, V)`` over its first ``n`` frames: the best class per
    frame, repeats collapsed, blanks removed."""
    best = log_probs[:n].argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[keep] if i != BLANK]


class LexiconBeamSearch:
    """Lexicon-constrained beam search with a word n-gram LM, through flashlight-text.

    ``lm_dir`` is an LM directory as :func:`nas.decode.build_lm` writes it: ``tokens.txt`` lists
    the CTC classes, the blank first and last a silence class the model never emits (appended to
    the emissions here, as :class:`nas.decode.BeamDecoder` does). ``settings`` are the tuned
    ``beam``, ``beam_tokens``, ``beam_threshold``, ``lm_weight`` and ``word_score``.
    """

    def __init__(self, lm_dir: Path, settings: dict):
        from flashlight.lib.text.decoder import (CriterionType, LexiconDecoder, LexiconDecoderOptions, SmearingMode,
                                                 Trie)
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary, create_word_dict, load_words

        lm_dir = Path(lm_dir)
        self.settings = dict(settings)
        tokens = Dictionary(str(lm_dir / "tokens.txt"))
        lexicon = load_words(str(lm_dir / "lexicon.txt"))
        self._words = create_word_dict(lexicon)
        with quiet_stderr():  # KenLM prints its loading progress to the C stderr
            self._lm = KenLM(str(lm_dir / "lm.arpa"), self._words)
        self.blank, self.silence = BLANK, tokens.index_size() - 1
        trie = Trie(tokens.index_size(), self.silence)
        start = self._lm.start(False)
        for word, spellings in lexicon.items():
            index = self._words.get_index(word)
            _, score = self._lm.score(start, index)
            for spelling in spellings:
                trie.insert([tokens.get_index(t) for t in spelling], index, score)
        trie.smear(SmearingMode.MAX)
        options = LexiconDecoderOptions(
            beam_size=int(settings["beam"]), beam_size_token=int(settings["beam_tokens"]),
            beam_threshold=float(settings["beam_threshold"]), lm_weight=float(settings["lm_weight"]),
            word_score=float(settings["word_score"]), unk_score=float("-inf"), sil_score=0.0, log_add=False,
            criterion_type=CriterionType.CTC)
        self._trie = trie  # the decoder refers to the trie and the LM: they must outlive it
        self._decoder = LexiconDecoder(options, trie, self._lm, self.silence, self.blank,
                                       self._words.get_index("<unk>"), [], False)

    def __call__(self, log_probs: np.ndarray, n: int) -> str:
        """The best word sequence for ``log_probs`` ``(T, V)`` over its first ``n`` frames."""
        emissions = np.full((n, log_probs.shape[1] + 1), -1e4, np.float32)  # + the silence class
        emissions[:, :-1] = log_probs[:n]
        results = self._decoder.decode(emissions.ctypes.data, n, emissions.shape[1])
        if not results:
            return ""
        return " ".join(self._words.get_entry(w) for w in results[0].words if w >= 0)


class Recognizer:
    """An export directory, ready to transcribe: features, onnxruntime session, decoder.

    Args:
        threads: onnxruntime's intra-op threads (default: onnxruntime's choice, all cores).
        beam: decode with the export's lexicon and LM (``lm/``) when it has one; else greedy.
        model: the ONNX file, default the export's ``model.onnx``.
    """

    def __init__(self, export_dir: Path, threads: int | None = None, beam: bool = True,
                 model: Path | bytes | None = None):
        self.dir = Path(export_dir)
        self.arch = ArchConfig.load(self.dir / "arch.json")
        self.provenance = json.loads((self.dir / "arch.json").read_text()).get("provenance", {})
        for name in (FEATURES_FILE, MODEL_FILE, "tokenizer.model"):
            if not (self.dir / name).is_file():
                raise UserError(str(self.dir / name), "", "not found (export again with this version of nas)")
        self.frontend = LogMel(self.dir / FEATURES_FILE)
        self.tokenizer = Tokenizer.load(self.dir / "tokenizer.model")
        self.session = session(model if model is not None else self.dir / MODEL_FILE, threads)
        decoder = self.provenance.get("decoder")
        lm = self.dir / LM_DIR
        self.beam = LexiconBeamSearch(lm, decoder) if beam and decoder and (lm / "lm.arpa").is_file() else None

    @property
    def decoding(self) -> str:
        return "beam + lexicon + LM" if self.beam else "greedy"

    def features(self, audio: Path) -> np.ndarray:
        """Log-mels ``(frames, n_mels)`` of an audio file; too short or bad audio is a UserError."""
        return self.features_of(load_wav(audio, self.frontend.sample_rate), audio)

    def features_of(self, wav: np.ndarray, audio: Path | str = "audio") -> np.ndarray:
        """Log-mels of samples at the model's rate; audio too short for the model is a UserError."""
        rate, hop = self.frontend.sample_rate, self.frontend.hop_length
        factor = self.arch.frontend.subsampling
        if len(wav) <= self.frontend.n_fft // 2 or subsampled_frames(1 + len(wav) // hop, factor) < 1:
            least = next(n for n in range(1, 100) if subsampled_frames(n, factor) >= 1)
            raise UserError(str(audio), "", f"too short ({len(wav) * 1000 // rate} ms; the model needs at least "
                                            f"{max((least - 1) * hop, self.frontend.n_fft // 2 + 1) * 1000 // rate} ms)")
        return self.frontend(wav)

    def log_probs(self, feats: np.ndarray) -> np.ndarray:
        """Log-probabilities ``(T', vocab)`` of one utterance's log-mels ``(T, n_mels)``."""
        out, lengths = self.session.run(None, {"feats": feats[None], "lengths": np.array([len(feats)], np.int64)})
        return out[0, : int(lengths[0])]

    def decode(self, log_probs: np.ndarray) -> str:
        if self.beam is not None:
            return self.beam(log_probs, len(log_probs))
        return self.tokenizer.decode(greedy(log_probs, len(log_probs)))

    def transcribe(self, audio: Path) -> str:
        return self.decode(self.log_probs(self.features(audio)))


def session(model: Path | bytes, threads: int | None = None, arena: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``threads``: intra-op threads (one op at a time between ops);
    ``arena``: onnxruntime's CPU memory arena (off: each allocation goes to the C allocator)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 3  # no warnings about the QDQ nodes it keeps
    # A product of a float activation and an int8 weight (weights-only int8) is fused into
    # MatMulNBits, which by default quantizes the activation to int8 on the fly (accuracy level 4):
    # measured, log-probs 0.01 off the dequantized model. Level 1 computes in float32, as the graph says.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_memory(model: str, n_mels: int, seconds: float) -> dict:
    """What one run on a ``seconds``-long input adds to this process's peak resident memory
    (:func:`nas.measure.activation_memory` runs it in a fresh process: ``python -m nas.runtime memory``)."""
    sess = session(Path(model), threads=1, arena=False)
    rng = np.random.default_rng(0)

    def run(frames: int) -> None:
        sess.run(None, {"feats": rng.standard_normal((1, frames, n_mels), dtype=np.float32),
                        "lengths": np.array([frames], np.int64)})

    frames = int(seconds * 100) + 1  # 10 ms hop: 1 + samples // 160 frames
    x = rng.standard_normal((1, frames, n_mels), dtype=np.float32)  # the input, made before the reset
    run(101)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        return {"bytes": None, "why": f"cannot reset the peak resident memory ({exc.strerror})"}
    before = _status_kib("VmRSS")
    sess.run(None, {"feats": x, "lengths": np.array([frames], np.int64)})
    peak = _status_kib("VmHWM")
    return {"bytes": (peak - before) * 1024, "seconds": seconds, "frames": frames,
            "method": "peak resident memory growth over one onnxruntime run in a fresh process (Linux VmHWM, reset "
                      "through /proc/self/clear_refs after a 1 s warm-up run), batch 1, one thread, onnxruntime's "
                      "CPU arena off, glibc blocks of 64 KiB and more mapped and unmapped as allocated and freed"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


if __name__ == "__main__" and sys.argv[1:2] == ["memory"]:
    print(json.dumps(run_memory(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))))
