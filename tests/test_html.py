"""server/html.py: text nodes go to the translator decoded and stripped, everything else comes back byte for byte."""

from __future__ import annotations

import random

import pytest

from server.html import split_html


def bracket(document: str) -> str:
    """The document "translated" by wrapping each text in brackets: shows exactly what was replaced."""
    doc = split_html(document)
    return doc.render([f"[{text}]" for text in doc.texts])


def identity(document: str) -> str:
    doc = split_html(document)
    return doc.render(doc.texts)


def test_plain_text_without_tags():
    doc = split_html("Hello world.")
    assert doc.texts == ["Hello world."]
    assert doc.render(["Hallo Welt."]) == "Hallo Welt."
    assert bracket("  Hello world.\n") == "  [Hello world.]\n"


def test_empty_and_whitespace_only_documents_have_nothing_to_translate():
    for document in ("", " \n\t ", "<p> </p>\r\n", "&nbsp;&#32;\u3000"):
        doc = split_html(document)
        assert doc.texts == []
        assert doc.render([]) == document


def test_nested_inline_tags_give_one_segment_per_text_node():
    document = '<div><p>Hello <b>bold <i>and italic</i></b> world!</p></div>'
    doc = split_html(document)
    assert doc.texts == ["Hello", "bold", "and italic", "world!"]
    assert doc.render(["Hallo", "fett", "und kursiv", "Welt!"]) == (
        '<div><p>Hallo <b>fett <i>und kursiv</i></b> Welt!</p></div>'
    )


def test_attributes_are_never_translated():
    document = (
        '<a href="/search?q=a&amp;lang=en" title="A title" data-x=Hello>Link text</a>'
        "<img alt='Alt &amp; text' src=x.png>"
        '<input value="Submit" placeholder="Your name">'
    )
    doc = split_html(document)
    assert doc.texts == ["Link text"]
    assert doc.render(["LINK TEXT"]) == document.replace("Link text", "LINK TEXT")


def test_entities_are_decoded_for_the_translator_and_escaped_on_the_way_back():
    doc = split_html("<p>Tom &amp; Jerry &lt;3 &#233;t&eacute; &#x41;&gt;</p>")
    assert doc.texts == ["Tom & Jerry <3 été A>"]
    assert doc.render(["Tom & Jerry <3 été A> & more"]) == "<p>Tom &amp; Jerry &lt;3 été A&gt; &amp; more</p>"
    # quotes need no escaping in text
    assert doc.render(['Er sagte "hi" & \'ja\'']) == "<p>Er sagte \"hi\" &amp; 'ja'</p>"


def test_a_translation_cannot_inject_markup():
    doc = split_html("<p>Text</p>")
    out = doc.render(["<script>alert(1)</script> &amp;"])
    assert out == "<p>&lt;script&gt;alert(1)&lt;/script&gt; &amp;amp;</p>"
    assert split_html(out).texts == ["<script>alert(1)</script> &amp;"]


def test_identity_translation_keeps_the_source_spelling_of_references():
    document = "<p>caf&eacute; &#233; &#xE9; &amp; &AMP; R&D &copy 2024</p>"
    doc = split_html(document)
    assert doc.texts == ["café é é & & R&D © 2024"]
    assert doc.render(doc.texts) == document


def test_bare_ampersands_and_semicolonless_references():
    doc = split_html("<p>R&D & more &amp</p>")
    assert doc.texts == ["R&D & more &"]
    assert doc.render([t.upper() for t in doc.texts]) == "<p>R&amp;D &amp; MORE &amp;</p>"


@pytest.mark.parametrize("element", ["script", "style", "code", "pre", "textarea", "template", "kbd", "samp"])
def test_untranslated_elements_keep_their_content(element):
    document = f"<p>Before</p><{element} class=x>Some <b>text</b> &amp; more</{element}><p>After</p>"
    assert bracket(document) == document.replace("Before", "[Before]").replace("After", "[After]")


def test_script_and_style_with_markup_like_content_are_untouched():
    document = (
        '<script type="text/javascript">\n'
        '  if (a < b && c > d) { el.innerHTML = "</div><p>Hi & bye</p>"; }\n'
        "</script>"
        "<style>p > a::after { content: '<b>&amp;'; }</style>"
        "<p>Visible</p>"
        "<SCRIPT>document.write('<p>x</p>')</SCRIPT>"
    )
    doc = split_html(document)
    assert doc.texts == ["Visible"]
    assert doc.render(["Sichtbar"]) == document.replace("Visible", "Sichtbar")


def test_nested_and_unclosed_code_elements():
    assert bracket("<pre><code>x = 1</code> y</pre> z") == "<pre><code>x = 1</code> y</pre> [z]"
    assert bracket("<code>a<code>b</code>c</code>d") == "<code>a<code>b</code>c</code>[d]"
    # an unclosed <pre> leaves the rest alone; a stray </pre> closes nothing
    assert bracket("<p>a</p><pre>b<p>c</p>") == "<p>[a]</p><pre>b<p>c</p>"
    assert bracket("</pre><p>a</p>") == "</pre><p>[a]</p>"
    # self-closing syntax opens nothing
    assert bracket("<pre/>Text<code />More") == "<pre/>[Text]<code />[More]"


def test_noscript_and_title_text_are_translated():
    document = "<title>My &amp; page</title><noscript>Please enable JavaScript</noscript>"
    assert split_html(document).texts == ["My & page", "Please enable JavaScript"]


def test_comments_doctype_cdata_and_processing_instructions_are_untouched():
    document = (
        "<!DOCTYPE html>\n"
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<!-- a comment with <b>bold</b> text & stuff -->\n"
        "<![CDATA[raw <data> here]]>\n"
        "<!--[if IE]><p>Old browser</p><![endif]-->\n"
        "<p>Text</p>"
    )
    doc = split_html(document)
    assert doc.texts == ["Text"]
    assert doc.render(["TEXT"]) == document.replace("Text</p>", "TEXT</p>")


def test_malformed_unclosed_and_stray_tags():
    assert bracket("<p>One<p>Two<li>Three") == "<p>[One]<p>[Two]<li>[Three]"
    assert bracket("Hello</p> world</div >") == "[Hello]</p> [world]</div >"
    assert bracket("a</>b") == "[a]</>[b]"


def test_less_than_sign_in_text():
    doc = split_html("<p>1 < 2 and 3 > 2, <3</p>")
    assert doc.texts == ["1 < 2 and 3 > 2, <3"]
    assert doc.render(["EINS < ZWEI"]) == "<p>EINS &lt; ZWEI</p>"
    assert bracket("x <") == "[x &lt;]"


def test_unquoted_attributes_uppercase_tags_and_odd_whitespace_inside_tags():
    document = "<A HREF=/x class=big\n  target = _blank >Go</A><P\tCLASS='y'>Hi</P ><br/><BR>"
    assert bracket(document) == document.replace(">Go<", ">[Go]<").replace(">Hi<", ">[Hi]<")


def test_tag_cut_off_at_the_end_is_kept_as_markup():
    assert bracket('<p>Hello <a href="x') == '<p>[Hello] <a href="x'
    assert bracket("<p>Hello <b") == "<p>[Hello] <b"
    assert bracket("<div>Hi</div") == "<div>[Hi]</div"
    assert bracket("<p>Hi</p><!-- never closed <b>x</b>") == "<p>[Hi]</p><!-- never closed <b>x</b>"
    assert bracket("<p>Hi</p><script>var a = '<b>x</b>';") == "<p>[Hi]</p><script>var a = '<b>x</b>';"


def test_marked_sections_that_the_standard_library_would_reject():
    # _markupbase raises AssertionError on these; browsers read them as bogus comments
    assert bracket("<p>a<![foo[ bar ]]>b</p>") == "<p>[a]<![foo[ bar ]]>[b]</p>"
    assert bracket("<p>a<![ x") == "<p>[a]<![ x"
    assert bracket("<![ x >\r\n<![1]>Text") == "<![ x >\r\n<![1]>[Text]"  # positions stay exact after them
    word = "<p><![if !supportLists]>1.<![endif]>Item</p>"
    assert bracket(word) == "<p><![if !supportLists]>[1.]<![endif]>[Item]</p>"


def test_whitespace_only_nodes_are_not_sent():
    document = "<ul>\n  <li>A</li>\n\t<li> B </li>\r\n  <li>&nbsp;</li><li>\u00a0</li>\n</ul>\n"
    doc = split_html(document)
    assert doc.texts == ["A", "B"]
    assert doc.render(["x", "y"]) == document.replace(">A<", ">x<").replace("> B <", "> y <")


def test_leading_and_trailing_whitespace_stay_around_the_translation():
    document = "<p>\n    Hello world  \t</p><td>&nbsp;Price&#32;&#x0A;</td><td>&nbsp Total\u00a0</td>"
    doc = split_html(document)
    assert doc.texts == ["Hello world", "Price", "Total"]
    assert doc.render(["Hallo Welt", "Preis", "Summe"]) == (
        "<p>\n    Hallo Welt  \t</p><td>&nbsp;Preis&#32;&#x0A;</td><td>&nbsp Summe\u00a0</td>"
    )


def test_a_bare_numeric_reference_is_not_glued_to_the_translation():
    # "&#32" directly before the text would read a translation's leading digits as part of the reference
    doc = split_html("<p>&#32&amp;x</p>")
    out = doc.render(["5 x"])
    assert out == "<p>5 x</p>"
    assert split_html(out).texts == ["5 x"]


def test_crlf_and_non_ascii_offsets_are_exact():
    document = (
        "<html>\r\n<body>\r\n<h1 title='Grüße'>Grüße aus Köln</h1>\r\n"
        "<p>中文 <em>测试</em> 😀 text</p>\r\n<p>\r\n  zweite\r\n  Zeile\r\n</p>\r\n</body>\r\n</html>\r\n"
    )
    doc = split_html(document)
    assert doc.texts == ["Grüße aus Köln", "中文", "测试", "😀 text", "zweite\r\n  Zeile"]
    assert bracket(document) == (
        "<html>\r\n<body>\r\n<h1 title='Grüße'>[Grüße aus Köln]</h1>\r\n"
        "<p>[中文] <em>[测试]</em> [😀 text]</p>\r\n<p>\r\n  [zweite\r\n  Zeile]\r\n</p>\r\n</body>\r\n</html>\r\n"
    )


REALISTIC_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="description" content="A page about Tom &amp; Jerry">
  <title>Tom &amp; Jerry &mdash; The Story</title>
  <link rel=stylesheet href="/s.css?v=1&amp;x=2">
  <style>
    body > p { color: #333; }  /* <not a tag> */
  </style>
  <script async src="https://example.com/a.js"></script>
  <script>
    window.dataLayer = []; if (1 < 2 && "</p>") { console.log('<b>hi</b>'); }
  </script>
</head>
<BODY class="home page">
  <!-- navigation -->
  <nav><ul>
    <li><a href="/" class=active>Home</a></li>
    <li><a href='/about?id=1&amp;ref=nav' title="About us">About&nbsp;us</a></li>
  </ul></nav>
  <main>
    <h1 id=top>Caf&eacute; culture &#8212; a &quot;short&quot; history</h1>
    <p>It&#39;s   a <strong>long</strong> story, told in <em>three <b>parts</b></em>.<br/>
       Read on&hellip;</p>
    <img src="cat.jpg" alt="A cat &amp; a mouse" width=100>
    <pre><code>for (i = 0; i < n; i++) { a &amp;= b; }</code></pre>
    <p>Use <kbd>Ctrl</kbd>+<kbd>C</kbd> to copy &lt;text&gt;.</p>
    <form><label for=q>Search:</label> <input id=q name=q value="query">
      <textarea name=t>Default text</textarea><button type=submit>Go!</button></form>
    <table><tr><td>&nbsp;</td><td> 1&nbsp;000 &euro; </td></tr></table>
  </main>
  <footer>&copy; 2024 Example Inc. All rights reserved.</footer>
</BODY>
</html>
"""


def test_identity_render_equals_input_on_a_realistic_page():
    doc = split_html(REALISTIC_PAGE)
    assert doc.render(doc.texts) == REALISTIC_PAGE
    assert doc.texts == [
        "Tom & Jerry — The Story", "Home", "About\u00a0us", 'Café culture — a "short" history',
        "It's   a", "long", "story, told in", "three", "parts", ".", "Read on…", "Use", "+", "to copy <text>.",
        "Search:", "Go!", "1\u00a0000 €", "© 2024 Example Inc. All rights reserved.",
    ]


def test_translating_a_realistic_page_changes_only_the_text():
    doc = split_html(REALISTIC_PAGE)
    out = doc.render([text.upper() for text in doc.texts])
    assert split_html(out).texts == [text.upper() for text in doc.texts]
    # markup, scripts, styles, code and attributes come back as written
    for kept in ('<link rel=stylesheet href="/s.css?v=1&amp;x=2">', "console.log('<b>hi</b>')",
                 "/* <not a tag> */", "<code>for (i = 0; i < n; i++) { a &amp;= b; }</code>",
                 '<img src="cat.jpg" alt="A cat &amp; a mouse" width=100>', "<kbd>Ctrl</kbd>",
                 "<textarea name=t>Default text</textarea>", "<!-- navigation -->", "<BODY class=\"home page\">",
                 '<a href=\'/about?id=1&amp;ref=nav\' title="About us">'):
        assert kept in out
    assert "<title>TOM &amp; JERRY — THE STORY</title>" in out
    assert "<td>&nbsp;</td><td> 1&nbsp;000 &euro; </td>" in out  # unchanged by upper(): kept as written


def test_wrong_number_of_translations_is_an_error():
    doc = split_html("<p>a</p><p>b</p>")
    with pytest.raises(ValueError):
        doc.render(["x"])
    with pytest.raises(ValueError):
        doc.render(["x", "y", "z"])
    with pytest.raises(ValueError):
        split_html("<p> </p>").render(["x"])


def test_random_markup_never_raises_and_renders_exactly():
    """Seeded soup of tags, references and broken markup: identity is exact, translations land where split."""
    pieces = ["<", ">", "/", "!", "?", "&", ";", "#", "amp", "nbsp", "32", "x", "b", "p", " ", "\n", "\r\n", "é",
              "中", '"', "'", "=", "[", "]", "<!--", "-->", "<p>", "</p>", "<B>", "</b >", "<script>", "</script>",
              "<pre>", "</pre>", "<![", "<!", "</", "<?", "</>", "&amp;", "&#233;", "&nbsp;", "&#32", "\u00a0",
              '<a href="x&amp;y">', "<img alt=x&amp;y>", "Hello", "world", "<![endif]>", "<br/>"]
    rng = random.Random(20240601)
    for _ in range(3000):
        document = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        doc = split_html(document)
        assert doc.render(doc.texts) == document
        bracketed = [f"[{text}]" for text in doc.texts]
        assert split_html(doc.render(bracketed)).texts == bracketed, document
