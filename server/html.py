"""Translate the text of an HTML document and keep its markup byte for byte (LibreTranslate's format "html").

    doc = split_html(document)
    translated = doc.render(translate_all(doc.texts))

`split_html` tokenises with the standard library's `html.parser.HTMLParser` (no regular expressions, no
extra dependency) and takes as segments the text nodes that hold more than whitespace. Everything else
is copied from the input unchanged by `render`: tags as written (quoting, case, whitespace, malformed or
unclosed ones), comments, doctype, CDATA, processing instructions, and the content of the elements in
UNTRANSLATED_ELEMENTS (code, scripts, styles, form values).

What is and is not translated, and why:
- Attribute values are never translated, `title` and `alt` included: changing them would mean
  rewriting tags, and the markup is to stay exactly as written.
- Each text node is one segment. An inline tag splits a sentence (`Hello <b>world</b>!` gives "Hello",
  "world" and "!"), as LibreTranslate/argos does: simple, and every tag stays where it was, at the cost
  of context for the translator.
- The translator sees decoded text (`Tom &amp; Jerry` gives "Tom & Jerry") without the node's leading
  and trailing whitespace (literal or written as `&nbsp;`-like references; a bare `&nbsp` glued to a
  word stays in the text), which stays around the translation as written. A translation is written back
  with &, < and > escaped; one equal to its segment keeps the segment's source, so `doc.render(doc.texts)`
  returns the input exactly.
- Malformed markup never raises. A `<` the parser reports as text is text when it cannot start a tag
  (`a < b`, `<3`); when it could (a tag cut off at the end, an unclosed comment, `</` junk) it and the
  text after it up to the next tag are kept unchanged, since browsers read it as markup.
- An unclosed untranslated element (`<pre>` with no `</pre>`) leaves the rest of the document as it is.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from html.parser import HTMLParser

# Content that is code, data or raw text rather than prose. textarea holds a form value; template is inert
# markup filled in by scripts; xmp, iframe, noembed, noframes and plaintext are raw text for the parser in
# newer Pythons, where escaping a translation would change what is shown. noscript is translated: it is
# what a reader without JavaScript sees.
UNTRANSLATED_ELEMENTS = frozenset({
    "script", "style", "code", "pre", "kbd", "samp", "textarea", "template",
    "xmp", "iframe", "noembed", "noframes", "plaintext",
})


@dataclass(frozen=True)
class _Segment:
    start: int  # source offsets of the text without its leading and trailing whitespace
    end: int
    text: str  # that source decoded: what the translator sees


@dataclass(frozen=True)
class _Event:
    offset: int  # where the token starts in the source
    data: str | None  # the decoded text of a text token; None for markup
    translatable: bool


class HtmlDocument:
    """A tokenised document: the texts to translate, and the source to put their translations back into."""

    def __init__(self, source: str, segments: list[_Segment]) -> None:
        self._source = source
        self._segments = segments

    @property
    def texts(self) -> list[str]:
        """The segments to translate, in document order, decoded and stripped of surrounding whitespace."""
        return [segment.text for segment in self._segments]

    def render(self, translations: list[str]) -> str:
        """The source with each segment replaced by its translation (HTML-escaped); all else byte for byte."""
        if len(translations) != len(self._segments):
            raise ValueError(f"{len(translations)} translations for {len(self._segments)} texts")
        parts, position = [], 0
        for segment, translation in zip(self._segments, translations, strict=True):
            parts.append(self._source[position:segment.start])
            if translation == segment.text:  # keeps the source's own spelling of its references
                parts.append(self._source[segment.start:segment.end])
            else:
                parts.append(html.escape(translation, quote=False))
            position = segment.end
        parts.append(self._source[position:])
        return "".join(parts)


class _Tokens(HTMLParser):
    """Records where each token starts and, for text, its decoded data and whether it is to be translated."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)  # merges text and character references into one data token
        # getpos() gives (line, column) with lines split at "\n" only, so "\r\n" documents map exactly too.
        self._line_starts = [0]
        newline = source.find("\n")
        while newline >= 0:
            self._line_starts.append(newline + 1)
            newline = source.find("\n", newline + 1)
        self._open = dict.fromkeys(UNTRANSLATED_ELEMENTS, 0)  # counts, not a stack: tolerant of bad nesting
        self.events: list[_Event] = []

    def _record(self, data: str | None = None) -> None:
        line, column = self.getpos()
        self.events.append(_Event(self._line_starts[line - 1] + column, data, not any(self._open.values())))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record()
        if tag in self._open:
            self._open[tag] += 1

    def handle_endtag(self, tag: str) -> None:
        self._record()
        if self._open.get(tag):
            self._open[tag] -= 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record()  # <pre/>: an empty element, nothing opened

    def handle_data(self, data: str) -> None:
        self._record(data)

    def handle_comment(self, data: str) -> None:
        self._record()

    def handle_decl(self, decl: str) -> None:
        self._record()

    def handle_pi(self, data: str) -> None:
        self._record()

    def unknown_decl(self, data: str) -> None:
        self._record()

    def parse_marked_section(self, i: int, report: int = 1) -> int:
        """`<![CDATA[...]]>` and Word's `<![if ...]>` as the base class reads them; any other `<![` (on which the
        base class raises AssertionError) as the bogus comment browsers see."""
        position = self.lineno, self.offset
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            self.lineno, self.offset = position  # it may have moved them before raising
            return self.parse_bogus_comment(i, report)


def split_html(document: str) -> HtmlDocument:
    """Tokenise `document` and find its translatable text segments (see the module docstring for which)."""
    tokens = _Tokens(document)
    tokens.feed(document)
    tokens.close()
    events = tokens.events
    starts = [event.offset for event in events] + [len(document)]
    segments: list[_Segment] = []
    run: list[int] = []  # [start, end] of the text read since the last markup token, if any
    markup_like = False  # whether a "<" that opens markup (see _could_open_markup) was read since then
    for event, limit in zip(events, starts[1:], strict=True):
        end = None
        if event.data is None:
            markup_like = False
        elif event.translatable and not markup_like:
            markup_like = _could_open_markup(document, event.offset)
            if not markup_like:
                end = _source_end(document, event.offset, limit, event.data)
        if end is not None and run and run[1] == event.offset:  # "a ", "<", " b": one text node
            run[1] = end
            continue
        if run:
            segments.extend(_segment(document, *run))
        run = [event.offset, end] if end is not None else []
    if run:
        segments.extend(_segment(document, *run))
    return HtmlDocument(document, segments)


def _could_open_markup(source: str, offset: int) -> bool:
    """Whether a `<` the parser reported as text starts something a browser reads as a tag or comment."""
    if not source.startswith("<", offset):
        return False
    follower = source[offset + 1:offset + 2]
    return follower in ("/", "!", "?") or (follower.isascii() and follower.isalpha())


def _source_end(source: str, start: int, limit: int, data: str) -> int | None:
    """Where the text token `data` starting at `start` ends in the source; None if it cannot be located.

    It ends where the next token starts, unless the parser skipped something between them (`</>`): then
    it ends at a `<` before that.
    """
    end = limit
    while end > start:
        if html.unescape(source[start:end]) == data:
            return end
        end = source.rfind("<", start + 1, end)
    return None


def _segment(source: str, start: int, end: int) -> list[_Segment]:
    """The text node source[start:end] as a segment without its surrounding whitespace; none if all whitespace."""
    while start < end and (step := _space_length(source, start, end, forward=True)):
        start += step
    while end > start and (step := _space_length(source, start, end, forward=False)):
        end -= step
    text = html.unescape(source[start:end])
    return [_Segment(start, end, text)] if text.strip() else []


def _space_length(source: str, start: int, end: int, *, forward: bool) -> int:
    """Length of the whitespace character or reference (`&nbsp;`, `&#10;`, `&nbsp`) at source[start] or before end.

    Cutting there cannot change how the rest decodes: a reference starts at "&", holds no other "&" and no
    whitespace (no entity name does), and ends at ";" if it has one. A leading one must end at ";" or before
    whitespace, so that no translation is written right after a bare `&#32`.
    """
    if source[start if forward else end - 1].isspace():
        return 1
    if forward:
        if source[start] != "&":
            return 0
        stop = start + 1
        while stop < end and source[stop] != "&" and not source[stop].isspace():
            stop += 1
            if source[stop - 1] == ";":
                break
        if source[stop - 1] != ";" and not (stop < end and source[stop].isspace()):
            return 0  # "&#32" right before the translation would read its first digits as part of it
        reference = source[start:stop]
    else:
        ampersand = source.rfind("&", start, end)
        if ampersand < 0:
            return 0
        reference = source[ampersand:end]
    return len(reference) if html.unescape(reference).isspace() else 0
