"""The deployment path without torch: numpy log-mels equal the trainer's, numpy greedy and
flashlight beam search equal nas.decode's, and `nas transcribe` never imports torch."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY_ARCH
from nas.config import ArchConfig
from nas.data.audio import load_audio
from nas.data.features import FeatureConfig, _mel_spectrogram, log_mel
from nas.data.manifest import read_manifest
from nas.data.tokenizer import Tokenizer
from nas.decode import BeamDecoder, BeamSettings, build_lm, greedy_decode
from nas.errors import UserError
from nas.export import frontend_arrays, write_export
from nas.model import ConformerCTC
from nas.runtime import LexiconBeamSearch, LogMel, Recognizer, greedy, load_wav

BEAM = {"beam": 16, "beam_tokens": 10, "beam_threshold": 25.0, "lm_weight": 1.5, "word_score": 0.5}


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    path = tmp_path_factory.mktemp("frontend") / "features.npz"
    path.write_bytes(frontend_arrays(FeatureConfig()))
    return LogMel(path)


@pytest.fixture(scope="module")
def tokenizer_and_lm(tiny_corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    texts = [r.text for r in read_manifest(tiny_corpus_dir / "train.jsonl")]
    tokenizer = Tokenizer.train(texts, 40, "char", out / "tokenizer.model")
    return tokenizer, build_lm([" ".join(t.lower().split()) for t in texts], tokenizer, out / "lm")


@pytest.fixture(scope="module")
def export_with_lm(tiny_corpus_dir, tokenizer_and_lm, tmp_path_factory):
    """An untrained tiny design's run directory with an LM and tuned settings, exported (not measured)."""
    tokenizer, lm = tokenizer_and_lm
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = ConformerCTC(ArchConfig.from_dict(TINY_ARCH))
    with torch.no_grad():  # an output layer that emits characters following the audio, not only blanks
        model.head.weight.normal_()
        model.head.bias.zero_()
    model.save(run / "model.safetensors")
    (run / "tokenizer.model").write_bytes((lm.parent / "tokenizer.model").read_bytes())
    (run / "lm").mkdir()
    for f in lm.iterdir():
        (run / "lm" / f.name).write_bytes(f.read_bytes())
    (run / "metrics.json").write_text(json.dumps({"schedule": "none", "decoder": BEAM | {"tuned_on": "dev"}}))
    return write_export(tmp_path_factory.mktemp("export") / "tiny", ArchConfig.from_dict(TINY_ARCH), run, {},
                        measure=False)


def test_numpy_log_mels_are_the_trainers(frontend, tiny_corpus_dir):
    """Equal to log_mel within 1e-4, but in the nearly silent mel bins of telephone-band audio
    (energy near the log offset), where the trainer's float32 rounding is the whole difference:
    there numpy (float64) equals log_mel computed in float64 to 1e-6, and differs from float32
    log_mel by no more than float32 log_mel differs from float64."""
    cfg = FeatureConfig()
    mel64 = copy.deepcopy(_mel_spectrogram(cfg)).double()

    def log_mel64(wav):
        with torch.no_grad():
            feats = (mel64(wav.double()) + cfg.log_offset).log().T
        return ((feats - feats.mean(0)) / (feats.std(0, correction=0) + 1e-5)).numpy()

    rows = read_manifest(tiny_corpus_dir / "test.jsonl")
    assert {r.telephone for r in rows} == {True, False}
    rng = np.random.default_rng(0)
    cases = [(load_audio(r.audio), r.telephone) for r in rows]
    cases += [(torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.1), False) for n in (257, 1601, 16_003)]
    for wav, telephone in cases:
        want, exact = log_mel(wav).numpy(), log_mel64(wav)
        got = frontend(wav.numpy())
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - exact).max() <= 1e-6
        if telephone:
            assert np.abs(got - want).max() <= np.abs(want - exact).max() + 1e-6
        else:
            assert np.abs(got - want).max() <= 1e-4


def test_resampled_audio_keeps_the_frame_count(frontend, tmp_path):
    t = np.arange(22_050) / 22_050
    sf.write(tmp_path / "a.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22_050)
    wav = load_wav(tmp_path / "a.wav", 16_000)
    assert len(wav) == 16_000 and frontend(wav).shape == log_mel(load_audio(tmp_path / "a.wav")).shape


def test_numpy_greedy_is_greedy_decode(tokenizer_and_lm):
    tokenizer, _ = tokenizer_and_lm
    log_probs = torch.randn(3, 50, 40).log_softmax(-1)
    log_probs[:, ::3, 0] = 5  # blanks between repeats
    lengths = torch.tensor([50, 31, 7])
    want = greedy_decode(log_probs, lengths, tokenizer)
    got = [tokenizer.decode(greedy(lp.numpy(), int(n))) for lp, n in zip(log_probs, lengths)]
    assert got == want


def test_flashlight_beam_search_is_nas_decodes(tokenizer_and_lm):
    """The same lexicon, LM and settings give the same words as torchaudio's ctc_decoder."""
    tokenizer, lm = tokenizer_and_lm
    g = torch.Generator().manual_seed(0)
    spelled = [tokenizer.encode(w) for w in "the value of the object is returned".split()]
    classes = [c for word in spelled for c in (*word, 0)]
    log_probs = torch.randn(2, 2 * len(classes), 40, generator=g)
    for t, c in enumerate(classes):  # emissions that spell the words, blurred
        log_probs[0, 2 * t, c] += 6
    log_probs = log_probs.log_softmax(-1)
    lengths = torch.tensor([2 * len(classes), 55])
    want = BeamDecoder(lm, BeamSettings(**BEAM))(log_probs, lengths)
    search = LexiconBeamSearch(lm, BEAM)
    got = [search(lp.numpy(), int(n)) for lp, n in zip(log_probs, lengths)]
    assert got == want and want[0]


def test_transcribe_never_imports_torch(export_with_lm, tiny_corpus_dir):
    """`nas transcribe` in a fresh interpreter: transcripts (beam search, then greedy), timing on
    stderr, and torch never in sys.modules."""
    wavs = [str(r.audio) for r in read_manifest(tiny_corpus_dir / "test.jsonl")[:2]]
    script = ("import sys; from nas.cli import main\n"
              "rc = main(sys.argv[1:])\n"
              "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
              "sys.exit(rc)")
    rec = Recognizer(export_with_lm)
    assert rec.decoding == "beam + lexicon + LM"
    for extra, decoding in (([], "beam + lexicon + LM"), (["--greedy"], "greedy")):
        r = subprocess.run([sys.executable, "-c", script, "transcribe", str(export_with_lm), *wavs, *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = r.stdout.splitlines()
        assert [line.split("\t")[0] for line in lines] == wavs
        assert "2 files" in r.stderr and decoding in r.stderr and "real-time factor" in r.stderr
        if not extra:
            assert [line.split("\t")[1] for line in lines] == [rec.transcribe(w) for w in wavs]


def test_beam_transcripts_are_nas_decodes_on_the_onnx_outputs(export_with_lm, tokenizer_and_lm, tiny_corpus_dir):
    rec = Recognizer(export_with_lm)
    wav = read_manifest(tiny_corpus_dir / "test.jsonl")[0].audio
    log_probs = rec.log_probs(rec.features(wav))
    want = BeamDecoder(export_with_lm / "lm", BeamSettings(**BEAM))(
        torch.from_numpy(log_probs)[None], torch.tensor([len(log_probs)]))[0]
    assert rec.transcribe(wav) == want
    # The untrained model's emissions spell no word of the lexicon, so that decode is empty; the
    # recognizer's decoding of emissions that do spell words is nas's decoding too, word for word.
    tokenizer, _ = tokenizer_and_lm
    classes = [c for w in "the value of the object is returned".split() for c in (*tokenizer.encode(w), 0)]
    spelled = torch.randn(2 * len(classes), 40, generator=torch.Generator().manual_seed(0))
    for t, c in enumerate(classes):
        spelled[2 * t, c] += 6
    spelled = spelled.log_softmax(-1)
    want = BeamDecoder(export_with_lm / "lm", BeamSettings(**BEAM))(spelled[None], torch.tensor([len(spelled)]))[0]
    assert want and rec.decode(spelled.numpy()) == want


def test_audio_too_short_for_the_model_is_a_user_error(export_with_lm, tmp_path):
    sf.write(tmp_path / "short.wav", np.zeros(300, np.float32), 16_000)
    with pytest.raises(UserError) as err:
        Recognizer(export_with_lm).transcribe(tmp_path / "short.wav")
    assert err.value.line().startswith(f"error: {tmp_path / 'short.wav'}: too short (18 ms; the model needs at least")


def test_an_export_without_the_frontend_file_is_refused(export_with_lm, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in ("arch.json", "model.onnx", "tokenizer.model"):
        (old / f).write_bytes((export_with_lm / f).read_bytes())
    with pytest.raises(UserError, match="features.npz: not found"):
        Recognizer(old)
