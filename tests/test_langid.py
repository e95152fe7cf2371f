"""Language identification (landermt.langid, py3langid) on real FLORES-200 dev sentences."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from landermt.data import data_root
from landermt.langid import LanguageIdentifier, off_target_rate, supported_languages
from training.data import FLORES
from training.evaluate import score

SIX = ("en", "de", "fr", "it", "ar", "zh")


def flores_dev(code: str, n: int = 100) -> list[str]:
    return (data_root() / "flores200" / "dev" / f"{FLORES[code]}.dev").read_text(encoding="utf-8").splitlines()[:n]


@pytest.fixture(scope="module")
def six() -> LanguageIdentifier:
    return LanguageIdentifier(SIX)


@pytest.mark.parametrize("code", SIX)
def test_full_sentences_are_identified(six, code):
    found = [six.best(text) for text in flores_dev(code)]
    assert [f[0] for f in found] == [code] * len(found)
    assert min(f[1] for f in found) > 90


@pytest.mark.parametrize("code", SIX)
def test_three_words_are_mostly_identified(six, code):
    texts = [text[:6] if code == "zh" else " ".join(text.split()[:3]) for text in flores_dev(code, 997)]
    share = sum((found := six.best(text)) is not None and found[0] == code for text in texts) / len(texts)
    assert share >= 0.93, f"{code}: {share:.1%} of three-word prefixes"  # 94.2% (fr) to 99.9% (ar) measured


def test_candidates_are_ranked_percentages(six):
    candidates = six.detect("Le comité se réunira de nouveau jeudi pour discuter du budget.")
    assert candidates[0][0] == "fr" and candidates[0][1] > 99
    assert {code for code, _ in candidates} <= set(SIX)
    confidences = [confidence for _, confidence in candidates]
    assert confidences == sorted(confidences, reverse=True) and all(0 < c <= 100 for c in confidences)
    assert sum(confidences) == pytest.approx(100, abs=0.1)


@pytest.mark.parametrize("text", ["", "   \n", "12345", "3.14 — 2,71 !!!", "ok", "A"])
def test_no_evidence_gives_nothing(six, text):
    assert six.detect(text) == []
    assert six.best(text) is None


def test_min_confidence(six):
    assert six.best("Hallo")[1] < 50  # one short word: several languages are plausible
    assert six.best("Hallo", min_confidence=50) is None
    assert six.best("Der Ausschuss wird sich am Donnerstag erneut treffen.", min_confidence=90)[0] == "de"


def test_unsupported_and_empty_language_sets_are_errors():
    with pytest.raises(ValueError, match="does not support tlh, xx$"):
        LanguageIdentifier(["en", "xx", "tlh"])
    with pytest.raises(ValueError, match="zxx"):  # the model's "not a language" class is no language
        LanguageIdentifier(["en", "zxx"])
    with pytest.raises(ValueError, match="no languages"):
        LanguageIdentifier([])
    assert set(SIX) | {"es", "ru", "ja"} <= set(supported_languages())


def test_subsets_and_supersets():
    pair = LanguageIdentifier(["de", "en"])
    assert {code for code, _ in pair.detect(flores_dev("fr", 1)[0])} <= {"de", "en"}
    wider = LanguageIdentifier([*SIX, "es", "ru", "ja"])
    for code in ("es", "ru", "ja", "it"):
        assert [wider.best(text)[0] for text in flores_dev(code, 20)] == [code] * 20
    alone = LanguageIdentifier(["de"])
    assert alone.detect("The committee will meet again on Thursday.") == [("de", 100.0)]
    assert alone.detect("42") == []


def test_one_identifier_serves_many_threads(six):
    texts = [text for code in SIX for text in flores_dev(code, 30)]
    expected = [six.detect(text) for text in texts]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(six.detect, texts)) == expected
        built = list(pool.map(lambda _: LanguageIdentifier(["en", "de"]), range(8)))
    assert all(identifier.best(flores_dev("de", 1)[0])[0] == "de" for identifier in built)


def test_off_target_rate():
    german, english = flores_dev("de", 2), flores_dev("en", 2)
    assert off_target_rate([*german, english[0], "12345"], "de", SIX) == pytest.approx(1 / 4)
    assert off_target_rate(english, "de", ["en"]) == 1.0  # the target joins the languages to choose from
    assert off_target_rate(german, "de", ["en"]) == 0.0
    assert off_target_rate(["", "..."], "zh", SIX) == 0.0  # undecidable outputs count as on target
    assert off_target_rate([], "de", SIX) == 0.0


def test_evaluation_scores_use_it():
    english, german = flores_dev("en", 4), flores_dev("de", 4)
    assert score(english, german, "de")["off_target"] == 1.0
    assert score(german[:2] + english[:2], german, "de", ["en", "de"])["off_target"] == 0.5
