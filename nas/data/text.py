"""Text normalization, the same for training targets and for scoring WER.

:func:`normalize` applies, in order:

1. The typographic apostrophes ``’`` (U+2019) and ``ʼ`` (U+02BC) become ``'``.
2. Lowercasing.
3. Unicode NFKD decomposition, then dropping the combining marks, so accented letters keep
   their base letter (``"Café"`` → ``"cafe"``) and ligatures split (``"ﬁ"`` → ``"fi"``).
4. Every character other than ``a``–``z``, the apostrophe ``'`` and the space becomes a space:
   digits, punctuation, hyphens and dashes, and any non-ASCII letter left after step 3.
5. Runs of whitespace collapse to one space, and the ends are stripped.

So ``"Don’t stop—it's 5 o'clock!"`` becomes ``"don't stop it's o'clock"``. Numbers are not
spelled out: a corpus whose transcripts hold digits should spell them before this step.
"""

from __future__ import annotations

import re
import unicodedata

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})
_NOT_KEPT = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r" {2,}")


def normalize(text: str) -> str:
    """The normalized form of ``text``: lowercase ``a``–``z``, ``'`` and single spaces."""
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES).lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return _SPACES.sub(" ", _NOT_KEPT.sub(" ", text)).strip()
