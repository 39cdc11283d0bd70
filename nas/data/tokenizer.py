"""CTC output classes from a sentencepiece model.

Class 0 is the CTC blank; sentencepiece piece ``i`` is class ``i + 1``. Piece 0 is ``<unk>``;
there is no bos, eos or pad. The model file alone defines the classes: a ``char`` model trained
for more classes than the data has characters is padded with ``<unusedN>`` control pieces, which
:meth:`Tokenizer.encode` never produces, so ``vocab_size`` is always the count asked for.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from nas.data.text import normalize
from nas.files import atomic_write

BLANK = 0
MODEL_TYPES = ("unigram", "bpe", "char")


class Tokenizer:
    """A trained sentencepiece model seen as CTC classes; build with :meth:`train` or :meth:`load`."""

    def __init__(self, model: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.sha256 = hashlib.sha256(model).hexdigest()
        self.vocab_size = self._sp.get_piece_size() + 1  # + the CTC blank

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str, path: str | Path) -> Tokenizer:
        """Train on the normalized ``texts`` and save the model to ``path`` (a ``.model`` file).

        Args:
            texts: training transcripts, normalized here with :func:`nas.data.text.normalize`.
            vocab_size: CTC classes, the blank included.
            model_type: ``"unigram"``, ``"bpe"`` or ``"char"``.
            path: where the model file is written.

        Raises ValueError when the texts need more classes than ``vocab_size`` (``char``) or
        cannot fill ``vocab_size`` (``unigram``, ``bpe``). Training is deterministic: the same
        texts give the same model bytes.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, not {model_type!r}")
        texts = [t for t in map(normalize, texts) if t]
        if not texts:
            raise ValueError("no training text left after normalization")
        pieces = vocab_size - 1  # sentencepiece's count leaves out the CTC blank
        unused = []
        if model_type == "char":
            chars = set("".join(texts).replace(" ", "")) | {"▁"}  # ▁ marks a word start
            needed = len(chars) + 2  # + <unk> + blank
            if needed > vocab_size:
                raise ValueError(
                    f"the training texts hold {len(chars)} distinct characters, which need "
                    f"{needed} CTC classes (with <unk> and the blank); vocab_size is {vocab_size}"
                )
            unused = [f"<unused{i}>" for i in range(vocab_size - needed)]
        model = io.BytesIO()
        spm.set_random_generator_seed(0)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=model,
                model_type=model_type,
                vocab_size=pieces,
                control_symbols=unused,
                character_coverage=1.0,
                normalization_rule_name="identity",  # the texts are normalized already
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise ValueError(
                f"sentencepiece cannot train a {model_type} model of {pieces} pieces "
                f"({vocab_size} CTC classes less the blank) on these texts: {exc}"
            ) from None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, model.getvalue())
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def encode(self, text: str) -> list[int]:
        """Class ids (never the blank, 0) of ``normalize(text)``."""
        return [i + 1 for i in self._sp.encode(normalize(text))]

    def pieces(self, word: str) -> list[str]:
        """The pieces that spell one normalized ``word`` (as :meth:`encode` would emit them)."""
        return self._sp.encode_as_pieces(word)

    def piece_list(self) -> list[str]:
        """Every piece, in class order: piece ``i`` is CTC class ``i + 1``."""
        return [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of class ids; blanks are dropped."""
        return self._sp.decode([int(i) - 1 for i in ids if i != BLANK])
