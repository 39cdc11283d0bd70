"""Markdown pieces shared by the report and the model card: a table, and outside text (failure
reasons, labels, settings) written so that it shows as itself and is never read as markup."""

from __future__ import annotations

from itertools import groupby


def table(header: list[str], rows: list[list[str]]) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(header), row(["---"] * len(header)), *map(row, rows)])


def escape(text: str) -> str:
    """Outside text as itself: Markdown's marks backslash-escaped, ``<`` and ``&`` as entities."""
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return "".join("\\" + c if c in "\\`*_[]" else c for c in text)


def code(text: str) -> str:
    """``text`` as inline code: a code span holds any text but a run of backticks as long as its fence."""
    text = str(text)
    longest = max((len(list(run)) for c, run in groupby(text) if c == "`"), default=0)
    pad = " " if longest else ""
    return f"{'`' * (longest + 1)}{pad}{text}{pad}{'`' * (longest + 1)}"
