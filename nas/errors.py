"""The one error type users see.

Every refusal of bad input raises :class:`UserError`. The CLI prints it as a single line,
``error: <file>: <field>: <why>``, and exits with code 2; no traceback reaches the user.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, explained in one line.

    Args:
        source: the file (or ``"cli"``, ``"--budget"``...) the bad value came from.
        field: the dotted key inside it (``"sharing.blocks.pattern"``), or ``""``.
        why: what is wrong, in words.
    """

    def __init__(self, source: str, field: str, why: str):
        self.source, self.field, self.why = str(source), field, why
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.source] + ([self.field] if self.field else []) + [self.why]
        return "error: " + ": ".join(parts)
