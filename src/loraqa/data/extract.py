"""A document file as text, for ``loraqa ask --document``: plain text and Markdown as they are, HTML's
text (scripts and styles dropped, blocks on lines of their own), a PDF's text layer page by page
(``pypdf``, the ``documents`` extra), with where each page begins, so an answer can say its page.

Every file that cannot give text is refused in one line naming it: no such file, empty, over
``MAX_BYTES``, not UTF-8 text, an unknown extension, an encrypted PDF, a PDF with no text layer.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from loraqa.data.examples import DataError

MAX_BYTES = 20 << 20  # 20 MB: several books' text; a larger file is more likely a mistake than a document
TEXT = (".txt", ".text", ".md", ".markdown", ".rst")
HTML = (".html", ".htm", ".xhtml")
PAGE_BREAK = "\n\n"  # between a PDF's pages in the text


@dataclass(frozen=True)
class Document:
    path: str
    text: str
    page_starts: tuple[int, ...] = ()  # a PDF's pages: where each begins in ``text`` (page 1 first)

    def page_of(self, offset: int | None) -> int | None:
        """The page (1-based) holding the character at ``offset``; None for files without pages."""
        if offset is None or not self.page_starts:
            return None
        return bisect.bisect_right(self.page_starts, offset)


def read_document(path: str | Path) -> Document:
    """The file's text (see the module's docstring); ``DataError`` in one line for a file that has none."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT + HTML + (".pdf",):
        raise DataError(f"--document {path}: unknown kind of file '{suffix or path.name}' (text: "
                        f"{', '.join(TEXT)}; HTML: {', '.join(HTML)}; PDF: .pdf)")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"--document {path}: cannot read: {e.strerror}") from None
    if size == 0:
        raise DataError(f"--document {path}: the file is empty")
    if size > MAX_BYTES:
        raise DataError(f"--document {path}: {size / 1e6:,.1f} MB, over the {MAX_BYTES >> 20} MB a document may be")
    if suffix == ".pdf":
        return _pdf(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--document {path}: not UTF-8 text (a binary file?)") from None
    text = _html_text(raw) if suffix in HTML else raw
    if not text.strip():
        raise DataError(f"--document {path}: no text in it")
    return Document(str(path), text)


def _pdf(path: Path) -> Document:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise DataError(f"--document {path}: reading PDF needs pypdf: pip install 'loraqa[documents]'") from None
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise DataError(f"--document {path}: the PDF is encrypted; decrypt it first")
        pages = [_squash(page.extract_text() or "") for page in reader.pages]
    except PdfReadError as e:
        raise DataError(f"--document {path}: not a readable PDF ({e})") from None
    if not any(p.strip() for p in pages):
        raise DataError(f"--document {path}: the PDF has no text layer (scanned pages?); run OCR on it first")
    starts, at = [], 0
    for page in pages:
        starts.append(at)
        at += len(page) + len(PAGE_BREAK)
    return Document(str(path), PAGE_BREAK.join(pages), tuple(starts))


def _squash(text: str) -> str:
    """A page's text with runs of spaces folded (PDF text layers space words out)."""
    return re.sub(r"[ \t]+", " ", text).strip()


class _Text(HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre",
              "blockquote", "table", "ul", "ol", "title"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        self.skipping -= tag in self.SKIP and self.skipping > 0
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _html_text(raw: str) -> str:
    parser = _Text()
    parser.feed(raw)
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
    return re.sub(r"\s*\n\s*\n\s*", "\n\n", text).strip()
