"""Offline language identification (py3langid) for the off-target rate and a LibreTranslate-style `/detect`.

py3langid (the maintained rewrite of langid.py: Naive Bayes over byte n-grams, 139 languages, its model
inside the wheel, nothing downloaded) was the most accurate of the offline candidates on FLORES-200 dev
sentences of our six languages, full and cut to three words, and the fastest in one thread of those
that can be restricted to a language set (bench/langid.py, bench/results/langid.json).

Thread safety: the model is read once per process under a lock and shared. Each LanguageIdentifier
restricts its own py3langid identifier in its constructor (`set_languages` rewrites several attributes
one after another, so it must never run on an identifier other threads use) and only reads it
afterwards, so one instance can serve many threads. Detection is pure Python and numpy and holds the GIL
(about 0.1 ms for a sentence): call it inline from asyncio for request-sized texts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from py3langid.langid import MODEL_FILE
from py3langid.langid import LanguageIdentifier as _Py3LangId

_LOCK = threading.Lock()
_MODEL: _Py3LangId | None = None
NOT_A_LANGUAGE = "zxx"  # py3langid's class for numbers and markup; not offered as a language


def _model() -> _Py3LangId:
    """The full model, read (about 0.5 s and 80 MB of RSS) once per process and shared by every identifier."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            _MODEL = _Py3LangId.from_model_file(MODEL_FILE, norm_probs=True)
        return _MODEL


def supported_languages() -> list[str]:
    """ISO 639 codes the model knows (639-1 where there is one: en, de, fr, it, ar, zh, ...)."""
    return [code for code in _model().labels if code != NOT_A_LANGUAGE]


class LanguageIdentifier:
    """Identifies which of `languages` a text is in; construct once and share (see the module's notes)."""

    def __init__(self, languages: Iterable[str]) -> None:
        self.languages = tuple(sorted(set(languages)))
        if not self.languages:
            raise ValueError("no languages given")
        unsupported = sorted(set(self.languages) - set(supported_languages()))
        if unsupported:
            raise ValueError(f"language identification does not support {', '.join(unsupported)}")
        base = _model()
        self._identifier = _Py3LangId(base.nb_ptc, base.nb_pc, base.nb_classes, base.tk_nextmove, base.tk_output,
                                      norm_probs=True, tk_row=base.tk_row)
        self._identifier.set_languages(list(self.languages))
        self._featureless = self._identifier.rank("")  # what a text without any of the model's features scores

    def detect(self, text: str) -> list[tuple[str, float]]:
        """(language, confidence in percent) best first, those above 0 only; [] when the text gives no
        evidence: no letter in it, or none of the model's features (it scores as the empty text does). With
        one language there is nothing to tell apart: any text with a letter is that language, at 100."""
        if not any(char.isalpha() for char in text):
            return []
        ranked = self._identifier.rank(text)
        if len(self.languages) > 1 and ranked == self._featureless:
            return []
        return [(code, confidence) for code, score in ranked if (confidence := round(100 * float(score), 2)) > 0]

    def best(self, text: str, min_confidence: float = 0.0) -> tuple[str, float] | None:
        """The most likely language with its confidence, or None without evidence or below `min_confidence`."""
        candidates = self.detect(text)
        return candidates[0] if candidates and candidates[0][1] >= min_confidence else None


def off_target_rate(outputs: list[str], target: str, languages: Iterable[str]) -> float:
    """Share of `outputs` identified, among `languages` and `target`, as another language than `target`;
    outputs that give no evidence count as on target."""
    if not outputs:
        return 0.0
    identifier = LanguageIdentifier({target, *languages})
    return sum(1 for text in outputs if (found := identifier.best(text)) and found[0] != target) / len(outputs)
