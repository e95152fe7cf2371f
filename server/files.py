"""Files as LibreTranslate's /translate_file takes them: plain text and HTML, translated through the job queue.

A file is cut into segments (the non-blank lines of a .txt, without their surrounding whitespace; the text
nodes of an .html, server/html.py) which become the lines of a job in SQLite, stored with the document in
one transaction: a server killed mid-file finishes it after a restart. `render` puts the translations
back into the document; a segment whose line failed keeps its source text.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from server.html import split_html

FILE_FORMATS = (".txt", ".html", ".htm")
MEDIA_TYPES = {".txt": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8",
               ".htm": "text/html; charset=utf-8"}


class FileError(ValueError):
    """The upload is not a file this server translates; the message says why, `status` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def extension(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise FileError(f"file format {suffix or '(none)'!r} is not supported; supported: {', '.join(FILE_FORMATS)}")
    return suffix


def decode(name: str, data: bytes, limit: int) -> str:
    """The upload as text: UTF-8 (a byte-order mark is dropped), at most `limit` bytes."""
    if not data:
        raise FileError(f"{name} is empty")
    if len(data) > limit:
        raise FileError(f"{name} has {len(data)} bytes; the limit is {limit}", 413)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FileError(f"{name} is not UTF-8 text ({error})") from None


def segments(name: str, document: str) -> list[str]:
    """The texts to translate, in document order."""
    if extension(name) == ".txt":
        return [line.strip() for line in document.splitlines() if line.strip()]
    return split_html(document).texts


def render(name: str, document: str, translations: list[str | None]) -> str:
    """The document with each segment replaced by its translation (`segments` order); None keeps the segment."""
    if extension(name) != ".txt":
        doc = split_html(document)
        return doc.render([t if t is not None else text for t, text in zip(translations, doc.texts, strict=True)])
    given = iter(translations)
    lines = document.splitlines(keepends=True)
    out = []
    for line in lines:
        body = line.rstrip("\r\n")
        core = body.strip()
        if core:
            start = body.index(core)
            translation = next(given)
            body = body[:start] + (core if translation is None else translation) + body[start + len(core):]
        out.append(body + line[len(line.rstrip("\r\n")):])
    return "".join(out)


def translated_name(name: str, target: str) -> str:
    """doc.txt -> doc_de.txt, as LibreTranslate names its downloads: the upload's base name, with characters
    other than letters, digits, '.', '-' and '_' replaced (it becomes part of a URL)."""
    path = PurePosixPath(PurePosixPath(name.replace("\\", "/")).name)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem) or "file"
    return f"{stem}_{target}{path.suffix.lower()}"
