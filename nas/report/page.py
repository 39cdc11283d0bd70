"""The Markdown report as one self-contained HTML page.

Python-Markdown (with its ``tables`` and ``fenced_code`` extensions) renders the same text that
``report.md`` holds; :class:`EmbedImages` then replaces each ``<img>``'s file name by the file's
bytes as a ``data:`` URI, so the page opens with no network and no files beside it.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path
from xml.etree.ElementTree import Element

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2rem; }
pre code { background: none; padding: 0; }
"""


class _Embed(Treeprocessor):
    def __init__(self, md: markdown.Markdown, folder: Path):
        super().__init__(md)
        self.folder = folder

    def run(self, root: Element) -> None:
        for img in root.iter("img"):
            path = self.folder / img.get("src")
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            img.set("src", f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}")


class EmbedImages(Extension):
    """Embed every image, a path relative to ``folder``, as a ``data:`` URI."""

    def __init__(self, folder: Path, **kwargs):
        super().__init__(**kwargs)
        self.folder = Path(folder)

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 - Python-Markdown's name
        md.treeprocessors.register(_Embed(md, self.folder), "embed_images", 5)  # after inline images (20)


def to_html(text: str, title: str, folder: Path) -> str:
    """``text`` (Markdown whose images lie in ``folder``) as a standalone HTML page."""
    body = markdown.markdown(text, extensions=["tables", "fenced_code", EmbedImages(folder)], output_format="html")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
{body}
</body></html>
"""
