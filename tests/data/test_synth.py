"""The embedded espeak-ng corpus: determinism, disjoint splits, audio, idempotence, the text."""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from nas.data import synth
from nas.data.espeak import ESPEAK_RATE, Espeak
from nas.data.manifest import SPLITS, read_manifest
from nas.errors import UserError

TINY = dict(hours=0.01, seed=0, dev_utterances=6, test_utterances=6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth.build(tmp_path_factory.mktemp("synth") / "corpus", **TINY, workers=2, progress=False)


def manifests(corpus: Path) -> dict:
    return {split: read_manifest(corpus / f"{split}.jsonl") for split in SPLITS}


def test_same_seed_gives_the_same_corpus_whatever_the_workers(corpus, tmp_path):
    again = synth.build(tmp_path / "again", **TINY, workers=1, progress=False)
    for split in SPLITS:
        assert (again / f"{split}.jsonl").read_text() == (corpus / f"{split}.jsonl").read_text()
    wavs = sorted(p.relative_to(corpus) for p in corpus.rglob("*.wav"))
    assert wavs == sorted(p.relative_to(again) for p in again.rglob("*.wav"))
    for wav in wavs[::3]:
        assert (again / wav).read_bytes() == (corpus / wav).read_bytes()


def test_synthesis_never_forks_the_calling_process_whose_other_threads_hold_locks(tmp_path):
    """A run synthesizes its corpus while it has other threads (a sitting's timing writer, Ray's,
    torch's). A child forked from it while one of them holds a lock inherits the lock held, and a
    fork waits for locks that fork hooks take: here another thread holds logging's module lock,
    which os.fork's hook takes, for the whole build. Workers forked from this process could never
    start; the build finishes only because they come from a server that has no such threads."""
    import logging
    import threading

    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with logging._lock:  # as a thread that is logging at the moment of a fork
            held.set()
            release.wait()

    holder = threading.Thread(target=hold_the_lock, daemon=True)
    holder.start()
    held.wait()
    built: list[Path] = []
    builder = threading.Thread(target=lambda: built.append(synth.build(tmp_path / "c", **TINY, workers=2,
                                                                       progress=False)), daemon=True)
    try:
        builder.start()
        builder.join(timeout=300)  # a deadlock, not a speed check: the build takes seconds
        assert built and (built[0] / "done.json").is_file(), "synthesis forked this process and hung"
    finally:
        release.set()
        builder.join()


def test_another_seed_draws_another_corpus():
    plans = [synth.plan(**{**TINY, "seed": seed}) for seed in (0, 1)]
    for split in SPLITS:
        assert [t.text for t in plans[0][split]] != [t.text for t in plans[1][split]]


def test_dev_and_test_do_not_depend_on_the_train_size():
    small, large = synth.plan(**TINY), synth.plan(**{**TINY, "hours": 0.1})
    assert len(large["train"]) > len(small["train"])
    assert small["dev"] == large["dev"] and small["test"] == large["test"]


def test_splits_share_no_speaker_and_no_sentence(corpus):
    rows = manifests(corpus)
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not {r.speaker for r in rows[a]} & {r.speaker for r in rows[b]}
        assert not {r.text for r in rows[a]} & {r.text for r in rows[b]}


def test_held_out_variants_make_unseen_speakers(corpus):
    variants = synth.split_variants(synth.list_variants())
    assert len(variants["dev"]) == len(variants["test"]) == synth.HELD_OUT_VARIANTS
    assert len(variants["train"]) >= 70
    assert not set(variants["train"]) & (set(variants["dev"]) | set(variants["test"]))
    assert not set(variants["dev"]) & set(variants["test"])
    for split, rows in manifests(corpus).items():
        for row in rows:
            accent, variant = row.speaker.split("+")
            assert accent in synth.ACCENTS and variant in variants[split]


def test_sizes(corpus):
    rows = manifests(corpus)
    assert len(rows["dev"]) == len(rows["test"]) == 6
    train_s = sum(r.duration for r in rows["train"])
    assert 0.75 * 36 < train_s < 1.25 * 36  # 0.01 h, planned from the text


def test_audio_is_16k_mono_16bit_speech_of_the_stated_duration(corpus):
    for rows in manifests(corpus).values():
        for row in rows:
            info = sf.info(str(row.audio))
            assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
            assert row.duration == pytest.approx(info.frames / info.samplerate, abs=1e-6)
            wav, _ = sf.read(str(row.audio), dtype="float32")
            assert np.sqrt(np.mean(wav**2)) > 1e-3
    assert not list(corpus.rglob("*.tmp*"))


def test_a_complete_corpus_is_not_made_again(corpus):
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file()}
    assert synth.build(corpus, **TINY, progress=False) == corpus
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*") if p.is_file()} == before


def test_a_corpus_of_other_parameters_is_refused(corpus):
    with pytest.raises(UserError, match="other parameters"):
        synth.build(corpus, **{**TINY, "seed": 1}, progress=False)


def test_bad_parameters_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="hours"):
        synth.build(tmp_path, hours=0, progress=False)
    with pytest.raises(UserError, match="dev_utterances"):
        synth.build(tmp_path, dev_utterances=0, progress=False)


def test_default_dir_names_the_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv("NAS_CACHE", str(tmp_path))
    assert synth.default_dir(3.0, 0) == tmp_path / "synth-3h-seed0"
    assert synth.default_dir(0.5, 2, dev_utterances=50, test_utterances=300).name == "synth-0.5h-seed2-dev50-test300"


def test_sentence_file():
    lines = synth.SENTENCES.read_text(encoding="utf-8").splitlines()
    assert synth.SENTENCES.stat().st_size < 1_000_000
    assert [line.startswith("#") for line in lines[:4]] == [True, True, True, False]
    sentences = synth.load_sentences()
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert re.fullmatch(r"[a-z']+( [a-z']+){3,19}", sentence), sentence
    splits = synth.split_sentences(sentences)
    assert len(set(splits["train"])) >= 3000
    assert len({word for s in splits["train"] for word in s.split()}) >= 2000
    assert min(len(splits["dev"]), len(splits["test"])) >= synth.DEV_UTTERANCES


def _say(voice: str) -> np.ndarray | str:
    """In a fresh process: one utterance, or the error message."""
    try:
        return Espeak().say("the quick brown fox", voice, rate=175, pitch=50, intonation=50, seed=7)
    except RuntimeError as exc:
        return str(exc)


def test_the_espeak_binding_in_fresh_processes():
    """The same text, voice and seed give the same samples; an unknown voice is an error. Each call
    runs in a new process, as the corpus does: this one never loads libespeak-ng."""
    with multiprocessing.get_context("forkserver").Pool(1, maxtasksperchild=1) as pool:
        first, again, bad = pool.map(_say, ["en-us+m3", "en-us+m3", "xx-no-such-voice"], chunksize=1)
    assert first.dtype == np.float32 and 0.5 < len(first) / ESPEAK_RATE < 3 and np.abs(first).max() > 0.01
    assert np.array_equal(first, again)
    assert bad.startswith("espeak_SetVoiceByName failed")


def test_manifests_record_each_utterances_conditions(corpus):
    """The conditions each take drew, as the manifest rows record them (the audio is unchanged:
    recording them draws nothing more)."""
    takes = synth.plan(**TINY)
    for split, rows in manifests(corpus).items():
        assert len(rows) == len(takes[split])
        for row, take in zip(rows, takes[split]):
            assert row.id == take.id and row.accent == take.accent and row.noise == take.noise
            assert row.snr_db == round(take.snr_db, 2) and 5 <= row.snr_db <= 30
            assert row.reverb == (take.rt60_s > 0) and row.telephone == (take.lowpass_hz > 0)
            assert row.speaker.startswith(row.accent + "+")


def test_conditions_of_a_corpus_are_drawn_again_from_its_parameters(corpus, tmp_path):
    """For corpora whose manifests predate the condition fields: the same conditions, from done.json."""
    again = synth.conditions(corpus)
    for rows in manifests(corpus).values():
        for row in rows:
            assert again[row.id] == {"text": row.text, **row.conditions()}
    assert synth.conditions(tmp_path) == {}
