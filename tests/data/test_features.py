"""Log-mel features, SpecAugment, the cached feature set, bucketing and collation."""

import logging
import random

import numpy as np
import pytest
import soundfile as sf
import torch

import nas.data.features as features
from nas.data.features import FeatureConfig, FeatureSet, SpecAugment, bucket_batches, collate, log_mel
from nas.data.manifest import Utterance, read_manifest, write_manifest
from nas.data.tokenizer import Tokenizer
from nas.errors import UserError
from damage import corrupt_flac

SR = 16_000


def sweep_and_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """A 100 Hz → 7 kHz sine sweep plus white noise, float32 at 16 kHz."""
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * (100 * t + (7000 - 100) * t**2 / (2 * seconds))
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.5 * np.sin(phase) + 0.05 * noise).astype(np.float32)


def make_utterances(folder, rows):
    """Writes a wav for each ``(id, seconds, text)`` row; returns the rows as utterances."""
    utterances = []
    for i, (utt_id, seconds, text) in enumerate(rows):
        path = folder / f"{utt_id}.wav"
        sf.write(path, sweep_and_noise(seconds, seed=i), SR)
        utterances.append(Utterance(utt_id, path, text))
    return utterances


@pytest.fixture
def corpus(tmp_path):
    rows = [
        ("a", 1.0, "Hello world."),
        ("b", 0.5, "It's a test"),
        ("c", 2.0, "One more, longer line"),
        ("d", 0.3, "ok"),
    ]
    write_manifest(tmp_path / "train.jsonl", make_utterances(tmp_path, rows))
    return tmp_path / "train.jsonl"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["hello world", "it's a test", "one more longer line", "ok"]
    return Tokenizer.train(texts, 32, "char", tmp_path_factory.mktemp("tok") / "char.model")


def test_log_mel_frames_and_normalization():
    for seconds, frames in [(1.0, 101), (2.5, 251), (0.3, 31)]:
        assert log_mel(torch.from_numpy(sweep_and_noise(seconds))).shape == (frames, 80)
    feats = log_mel(torch.from_numpy(sweep_and_noise(2.0)), FeatureConfig(n_mels=40))
    assert feats.shape == (201, 40) and feats.dtype == torch.float32
    assert feats.mean(0).abs().max() < 1e-4
    assert (feats.std(0, correction=0) - 1).abs().max() < 1e-3


def test_feature_set_holds_usable_rows(corpus, tmp_path):
    fs = FeatureSet(corpus, tmp_path / "cache")
    assert len(fs) == 4 and fs.skipped == {}
    assert fs.ids == ["a", "b", "c", "d"]
    assert fs.texts == ["hello world", "it's a test", "one more longer line", "ok"]
    assert fs.lengths == [101, 51, 201, 31]
    wav, _ = sf.read(tmp_path / "c.wav", dtype="float32")
    expected = log_mel(torch.from_numpy(wav))
    got = fs.features(2)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-2)  # stored as float16


def test_cache_hit_does_not_recompute(corpus, tmp_path, monkeypatch):
    first = FeatureSet(corpus, tmp_path / "cache")
    [cache_file] = (tmp_path / "cache").iterdir()

    def no_recompute(*args, **kwargs):
        raise AssertionError("features were computed again")

    monkeypatch.setattr(features, "log_mel", no_recompute)
    second = FeatureSet(corpus, tmp_path / "cache")
    assert (second.ids, second.texts, second.lengths) == (first.ids, first.texts, first.lengths)
    assert torch.equal(second.features(1), first.features(1))
    assert list((tmp_path / "cache").iterdir()) == [cache_file]
    # Another config or another manifest content is another cache entry.
    with pytest.raises(AssertionError, match="computed again"):
        FeatureSet(corpus, tmp_path / "cache", FeatureConfig(n_mels=40))
    corpus.write_text(corpus.read_text().replace("ok", "okay"))
    with pytest.raises(AssertionError, match="computed again"):
        FeatureSet(corpus, tmp_path / "cache")


def test_rows_whose_audio_will_not_decode_are_skipped_and_counted(tmp_path, caplog):
    good = make_utterances(tmp_path, [("good1", 0.5, "fine"), ("good2", 0.4, "also fine")])
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SR)
    sf.write(tmp_path / "tiny.wav", np.zeros(100, dtype=np.float32), SR)
    sf.write(tmp_path / "nan.wav", np.full(SR, np.nan, dtype=np.float32), SR, subtype="FLOAT")
    bad = [
        Utterance("corrupt", corrupt_flac(tmp_path / "corrupt.flac"), "some words"),
        Utterance("empty", tmp_path / "empty.wav", "some words"),
        Utterance("nan", tmp_path / "nan.wav", "some words"),
        Utterance("tiny", tmp_path / "tiny.wav", "some words"),
    ]
    write_manifest(tmp_path / "train.jsonl", good + bad)

    with caplog.at_level(logging.WARNING, logger="nas.data.features"):
        fs = FeatureSet(tmp_path / "train.jsonl", tmp_path / "cache")
    assert fs.ids == ["good1", "good2"]
    assert fs.skipped == {"bad audio": 3, "short audio": 1}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4
    for utt_id in ("corrupt", "empty", "nan", "tiny"):
        assert sum(f": {utt_id}: skipped" in w for w in warned) == 1
    assert features.skipped_text(fs.skipped) == ", 4 skipped (3 bad audio, 1 short audio)"


@pytest.mark.parametrize("mistake, message", [
    ("missing", r"line 3\.audio: .*nowhere\.wav: no such file"),
    ("not audio", r"line 3\.audio: .*notes\.wav: not an audio file soundfile can read"),
    ("8 kHz", r"line 3\.audio: .*narrow\.wav: 8000 Hz, below the 16000 Hz"),
    ("no words", r"line 3\.text: no words left in '\?! …' after normalization"),
])
def test_manifest_mistakes_are_refused_before_anything_is_decoded(tmp_path, mistake, message):
    rows = make_utterances(tmp_path, [("good1", 0.5, "fine"), ("good2", 0.4, "also fine")])
    (tmp_path / "notes.wav").write_text("these are my notes, not audio\n" * 20)
    sf.write(tmp_path / "narrow.wav", sweep_and_noise(0.5)[::2], 8000)
    wrong = {"missing": Utterance("x", tmp_path / "nowhere.wav", "words"),
             "not audio": Utterance("x", tmp_path / "notes.wav", "words"),
             "8 kHz": Utterance("x", tmp_path / "narrow.wav", "words"),
             "no words": Utterance("x", rows[0].audio, "?! …")}[mistake]
    write_manifest(tmp_path / "train.jsonl", rows + [wrong])
    with pytest.raises(UserError, match=r"train\.jsonl: " + message):
        FeatureSet(tmp_path / "train.jsonl", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything is written


def test_a_manifest_that_is_not_text_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"audio": "a.wav", "text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(UserError, match=r"train\.jsonl: not a text manifest file: byte 0xe9 at offset 31"):
        FeatureSet(tmp_path / "train.jsonl", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_only_a_newline_ends_a_manifest_row(tmp_path):
    """JSON Lines: a transcript may hold U+2028 or a form feed, which str.splitlines would cut at."""
    [row] = make_utterances(tmp_path, [("a", 0.5, "one\u2028two\x0cthree")])
    write_manifest(tmp_path / "train.jsonl", [row])
    [again] = read_manifest(tmp_path / "train.jsonl")
    assert again.text == row.text and again.audio == row.audio


def test_higher_sample_rates_are_resampled(tmp_path):
    sf.write(tmp_path / "wide.wav", np.repeat(sweep_and_noise(1.0), 3), 48_000)
    write_manifest(tmp_path / "train.jsonl", [Utterance("w", tmp_path / "wide.wav", "words")])
    fs = FeatureSet(tmp_path / "train.jsonl", tmp_path / "cache")
    assert fs.lengths == [101]  # one second at 16 kHz


def test_no_usable_row_is_a_user_error(tmp_path):
    write_manifest(tmp_path / "dev.jsonl", [Utterance("x", corrupt_flac(tmp_path / "x.flac"), "words"),
                                            Utterance("y", corrupt_flac(tmp_path / "y.flac"), "words")])
    with pytest.raises(UserError, match=r"dev\.jsonl: no usable utterance \(2 skipped: 2 bad audio\)"):
        FeatureSet(tmp_path / "dev.jsonl", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_spec_augment_masks_inside_true_lengths():
    lengths = torch.tensor([200, 120, 60])
    feats = torch.randn(3, 200, 80) + 5  # no zero can occur by chance
    for b, n in enumerate(lengths):
        feats[b, n:] = 7.0
    augment = SpecAugment(freq_masks=2, freq_width=15, time_masks=3, time_width_ratio=0.1)
    rng_state = torch.get_rng_state()
    out = augment(feats, lengths, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(out, augment(feats, lengths, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(feats, lengths, torch.Generator().manual_seed(1)))
    assert (feats != 0).all() and (feats[0] == out[0]).sum() < feats[0].numel()  # input kept, copy masked
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(out[b, n:], feats[b, n:])  # padding untouched
        valid = out[b, :n]
        changed = valid != feats[b, :n]
        assert (valid[changed] == 0).all()
        masked_frames = (valid == 0).all(dim=1).sum().item()
        masked_bins = (valid == 0).all(dim=0).sum().item()
        assert masked_frames <= 3 * int(0.1 * n)
        assert masked_bins <= 2 * 15
        rest = changed.clone()  # every change lies in a fully masked frame or bin
        rest[(valid == 0).all(dim=1)] = False
        rest[:, (valid == 0).all(dim=0)] = False
        assert not rest.any()


def test_collate_pads_and_augments_only_when_asked(corpus, tmp_path, tokenizer):
    fs = FeatureSet(corpus, tmp_path / "cache")
    batch = collate(fs, [2, 0, 3], tokenizer)
    assert batch.feats.shape == (3, 201, 80) and batch.feats.dtype == torch.float32
    assert batch.feat_lens.tolist() == [201, 101, 31]
    assert batch.ids == ["c", "a", "d"] and batch.texts == ["one more longer line", "hello world", "ok"]
    for row, i in enumerate([2, 0, 3]):
        n = fs.lengths[i]
        assert torch.equal(batch.feats[row, :n], fs.features(i))
        assert (batch.feats[row, n:] == 0).all()
        target = batch.targets[row, : batch.target_lens[row]].tolist()
        assert tokenizer.decode(target) == fs.texts[i] and 0 not in target
    assert batch.targets.dtype == batch.target_lens.dtype == torch.long
    assert batch.targets.shape == (3, int(batch.target_lens.max()))

    augment = SpecAugment(freq_masks=2, freq_width=20, time_masks=2, time_width_ratio=0.2)
    augmented = collate(fs, [2, 0, 3], tokenizer, augment, torch.Generator().manual_seed(0))
    assert not torch.equal(augmented.feats, batch.feats)
    assert torch.equal(augmented.targets, batch.targets)
    assert batch.to("cpu").feats is not None


def test_bucket_batches_cover_every_index_once_within_max_frames():
    rng = random.Random(0)
    lengths = [rng.randint(30, 900) for _ in range(500)] + [2500]  # one longer than max_frames
    batches = bucket_batches(lengths, max_frames=4000, shuffle=False)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 4000 or batch == [500]
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order)  # length-bucketed: similar lengths share a batch
    assert len(batches) <= 1.3 * sum(lengths) / 4000 + 2  # batches are reasonably full

    shuffled = bucket_batches(lengths, max_frames=4000, shuffle=True, seed=1)
    assert sorted(shuffled) == sorted(batches) and shuffled != batches
    assert shuffled == bucket_batches(lengths, max_frames=4000, shuffle=True, seed=1)
    assert shuffled != bucket_batches(lengths, max_frames=4000, shuffle=True, seed=2)


def test_features_computed_by_workers_equal_one_process_and_skip_the_same_rows(tmp_path):
    rows = [(f"u{i}", 0.3 + 0.05 * (i % 7), f"line {i}") for i in range(70)]  # over the 64 rows a pool needs
    good = make_utterances(tmp_path, rows)
    sf.write(tmp_path / "tiny.wav", np.zeros(100, dtype=np.float32), SR)
    bad = [Utterance("corrupt", corrupt_flac(tmp_path / "corrupt.flac"), "x"), Utterance("tiny", tmp_path / "tiny.wav", "y")]
    write_manifest(tmp_path / "train.jsonl", good[:30] + bad + good[30:])
    one = FeatureSet(tmp_path / "train.jsonl", tmp_path / "one")
    two = FeatureSet(tmp_path / "train.jsonl", tmp_path / "two", workers=2)
    assert two.ids == one.ids == [u.id for u in good]
    assert (two.texts, two.lengths, two.skipped) == (one.texts, one.lengths, one.skipped)
    assert one.skipped == {"bad audio": 1, "short audio": 1}
    assert torch.equal(two._feats, one._feats)
