"""Text normalization and the sentencepiece tokenizer seen as CTC classes."""

import hashlib
import random

import pytest

from nas.data.text import normalize
from nas.data.tokenizer import BLANK, Tokenizer

WORDS = (
    "the a of to and in is it that for on with as was he be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three don't it's o'clock"
).split()


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 15))).capitalize() + "." for _ in range(300)]


def test_normalize():
    assert normalize("Don’t stop—it's 5 o'clock!") == "don't stop it's o'clock"
    assert normalize("  Café\tNAÏVE\n\nﬁne, well-known  ") == "cafe naive fine well known"
    assert normalize("İstanbul") == "istanbul"
    assert normalize("?! 42 —") == ""
    assert normalize(normalize("Hello,  World!")) == "hello world"


@pytest.mark.parametrize("model_type, vocab_size", [("char", 40), ("unigram", 120), ("bpe", 120)])
def test_round_trip_and_classes(texts, tmp_path, model_type, vocab_size):
    tok = Tokenizer.train(texts, vocab_size, model_type, tmp_path / "tok.model")
    assert tok.vocab_size == vocab_size
    unseen = "Nobody knew her whereabouts."  # new words, letters seen in training
    assert set(normalize(unseen)) <= set(" ".join(WORDS))
    for text in texts + [unseen]:
        ids = tok.encode(text)
        assert ids and BLANK not in ids and max(ids) < vocab_size
        assert tok.decode(ids) == normalize(text)
    ids = tok.encode(texts[0])
    assert tok.decode([BLANK] + ids[:1] + [BLANK, BLANK] + ids[1:] + [BLANK]) == normalize(texts[0])
    assert tok.encode("HELLO, world!") == tok.encode("hello world")


def test_char_model_spells_and_pads_unused_classes(texts, tmp_path):
    tok = Tokenizer.train(texts, 64, "char", tmp_path / "char.model")
    assert tok.vocab_size == 64
    assert len(tok.encode("it's")) == 5  # word start, i, t, ', s
    all_ids = {i for text in texts for i in tok.encode(text)}
    assert len(all_ids) <= 27  # the letters used, the apostrophe and the word-start mark
    assert Tokenizer.load(tmp_path / "char.model").vocab_size == 64


def test_too_few_or_too_many_classes_is_a_clear_error(texts, tmp_path):
    with pytest.raises(ValueError, match=r"distinct characters, which need \d+ CTC classes"):
        Tokenizer.train(texts, 10, "char", tmp_path / "a.model")
    with pytest.raises(ValueError, match="sentencepiece cannot train a unigram model"):
        Tokenizer.train(texts[:3], 500, "unigram", tmp_path / "b.model")
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(["123", "!!"], 40, "char", tmp_path / "c.model")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model_type, vocab_size", [("char", 40), ("unigram", 120)])
def test_training_is_deterministic_and_saved(texts, tmp_path, model_type, vocab_size):
    first = Tokenizer.train(texts, vocab_size, model_type, tmp_path / "first.model")
    second = Tokenizer.train(list(texts), vocab_size, model_type, tmp_path / "second.model")
    data = (tmp_path / "first.model").read_bytes()
    assert data == (tmp_path / "second.model").read_bytes()
    assert first.sha256 == second.sha256 == hashlib.sha256(data).hexdigest()
    loaded = Tokenizer.load(tmp_path / "first.model")
    assert (loaded.sha256, loaded.vocab_size) == (first.sha256, first.vocab_size)
    assert loaded.encode(texts[1]) == first.encode(texts[1])
