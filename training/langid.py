"""An offline language check for off-target rates: script first, then stopwords for Latin script."""

from __future__ import annotations

import re

SCRIPTS = {
    "zh": re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]"),
    "ar": re.compile(r"[\u0600-\u06ff\u0750-\u077f]"),
    "ja": re.compile(r"[\u3040-\u30ff]"),
    "ru": re.compile(r"[\u0400-\u04ff]"),
}
STOPWORDS = {
    "en": "the of and to in is that for it with as was on be by this are from at have not an which".split(),
    "de": "der die und das ist nicht ein eine zu den mit sich des auf für im dem von wird auch".split(),
    "fr": "le la les et des est une un du que en pour dans qui pas sur au avec il elle sont".split(),
    "it": "il di che la per un una non sono del della gli le con nel è anche alla questo".split(),
    "es": "el los las del que una por con para como pero más este esta fue son también".split(),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def detect(text: str) -> str | None:
    """A language code, or None when the text gives no evidence."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    for code, pattern in SCRIPTS.items():
        if len(pattern.findall(text)) / len(letters) > 0.3:
            return "ja" if code == "zh" and SCRIPTS["ja"].search(text) else code
    words = [w.lower() for w in _WORD.findall(text)]
    counts = {code: sum(w in stop for w in words) for code, stop in STOPWORDS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 and list(counts.values()).count(counts[best]) == 1 else None


def off_target_rate(outputs: list[str], target: str) -> float:
    """Share of outputs detected as another language than `target` (undecidable ones count as on target)."""
    if not outputs:
        return 0.0
    wrong = sum(1 for text in outputs if (lang := detect(text)) is not None and lang != target)
    return wrong / len(outputs)
