"""Training, dev and test data: directions, filters, instruction templates, test sets.

Training pairs come from the corpora in `train/` (landermt.data: `en-XX.tsv.gz` or line-aligned
`en-XX.en` + `en-XX.XX`; both directions); dev is FLORES-200 dev; tests are
FLORES-200 devtest, WMT14 en-fr, WMT16 en-de, IWSLT17 en-ar/en-zh and Tatoeba (see the data
README). Each training example gets one of ten instruction templates at random (fixed seed); the
first one is the inference template stored in the artifact.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from landermt.data import aligned_lines, data_root, training_corpora
from landermt.prompts import DEFAULT_TEMPLATE, Example, translation_example

TEMPLATES: tuple[str, ...] = (
    DEFAULT_TEMPLATE,
    "Translate this {source_language} sentence into {target_language}.\n{source_language}: {source}\n"
    "{target_language}:",
    "{source_language}: {source}\n{target_language}:",
    "What is the {target_language} translation of the following {source_language} text?\n{source}\n"
    "{target_language}:",
    "Render the following text in {target_language}.\nText ({source_language}): {source}\n{target_language}:",
    "Source language: {source_language}. Target language: {target_language}.\nSource: {source}\n"
    "{target_language}:",
    "Please provide a faithful {target_language} translation.\n{source_language}: {source}\n{target_language}:",
    "Here is a sentence in {source_language}: {source}\nThe same sentence in {target_language}:",
    "Convert from {source_language} to {target_language}, keeping the meaning exact.\n{source_language}: {source}\n"
    "{target_language}:",
    "Translate to {target_language}:\n{source}\n{target_language}:",
)

FLORES = {"en": "eng_Latn", "de": "deu_Latn", "fr": "fra_Latn", "it": "ita_Latn", "ar": "arb_Arab",
          "zh": "zho_Hans", "es": "spa_Latn", "ru": "rus_Cyrl", "ja": "jpn_Jpan"}
TATOEBA = {"de": "deu", "fr": "fra", "it": "ita", "ar": "ara", "zh": "cmn"}
TESTSETS = ("flores", "flores_dev", "wmt", "iwslt", "tatoeba")
# `flores_dev`, for choosing settings by BLEU without touching devtest: FLORES dev lines 100-799. The first lines
# give the dev loss (data.dev_examples_per_direction), the last the few-shot examples and held-out perplexity text.
FLORES_DEV_BLEU = slice(100, 800)


@dataclass(frozen=True)
class Pair:
    source_lang: str
    target_lang: str
    source: str
    target: str

    @property
    def direction(self) -> str:
        return f"{self.source_lang}-{self.target_lang}"


def _normal(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower().strip()


def keep(source: str, target: str, min_chars: int, max_chars: int, max_ratio: float) -> bool:
    """Length filters: both sides within [min_chars, max_chars], not a copy, and UTF-8 byte lengths within
    max_ratio (bytes, not characters: a Chinese character is 3 bytes and carries about as much as 3 Latin
    letters, so en-zh pairs are not filtered away)."""
    if not (min_chars <= len(source) <= max_chars and min_chars <= len(target) <= max_chars):
        return False
    a, b = len(source.encode()), len(target.encode())
    return max(a, b) / min(a, b) <= max_ratio and _normal(source) != _normal(target)


def training_pairs(root: str | Path | None, languages: list[str], *, min_chars: int = 2, max_chars: int = 400,
                   max_ratio: float = 3.0, max_per_direction: int | None = None, seed: int = 0) -> list[Pair]:
    """Both directions of en-XX for each XX in `languages`, de-duplicated and filtered, shuffled."""
    corpora = {frozenset((c.first, c.second)): c for c in training_corpora(root)}
    pairs: list[Pair] = []
    for lang in languages:
        corpus = corpora.get(frozenset(("en", lang)))
        if corpus is None:
            raise FileNotFoundError(f"no training data for en-{lang} in {data_root(root) / 'train'} "
                                    f"(en-{lang}.tsv.gz, or line-aligned en-{lang}.en and en-{lang}.{lang})")
        seen = set()
        kept = []
        for en, xx in zip(corpus.side("en"), corpus.side(lang), strict=True):
            key = (_normal(en), _normal(xx))
            if key in seen or not keep(en, xx, min_chars, max_chars, max_ratio):
                continue
            seen.add(key)
            kept.append((en, xx))
        for src, tgt, flip in (("en", lang, False), (lang, "en", True)):
            direction = [Pair(src, tgt, b, a) if flip else Pair(src, tgt, a, b) for a, b in kept]
            random.Random(f"{seed}-{src}-{tgt}").shuffle(direction)
            pairs += direction[:max_per_direction]
    random.Random(seed).shuffle(pairs)
    return pairs


def encode(tokenizer, pairs: list[Pair], max_tokens: int, seed: int) -> list[tuple[Pair, Example]]:
    """Each pair with a randomly assigned template (fixed seed); loss on target tokens only."""
    rng = random.Random(seed)
    return [(p, translation_example(tokenizer, rng.choice(TEMPLATES), p.source_lang, p.target_lang, p.source,
                                    p.target, max_tokens)) for p in pairs]


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"test data file {path} is missing")
    return path


def _lines(path: Path) -> list[str]:
    return _existing(path).read_text(encoding="utf-8").splitlines()


def _aligned(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    return list(zip(*aligned_lines(_existing(src_path), _existing(tgt_path)), strict=True))


def flores(root: str | Path | None, split: str, source: str, target: str) -> list[tuple[str, str]]:
    """FLORES-200 `dev` or `devtest` lines for source -> target."""
    folder = data_root(root) / "flores200" / split
    for code in (source, target):
        if code not in FLORES:
            raise KeyError(f"FLORES has no language {code!r}; known: {', '.join(FLORES)}")
    return _aligned(folder / f"{FLORES[source]}.{split}", folder / f"{FLORES[target]}.{split}")


def evaluation_set(root: str | Path | None, name: str, source: str, target: str) -> list[tuple[str, str]]:
    """(source, reference) lines of a test set for one direction."""
    base = data_root(root)
    other = target if source == "en" else source
    if name == "flores":
        return flores(root, "devtest", source, target)
    if name == "flores_dev":
        return flores(root, "dev", source, target)[FLORES_DEV_BLEU]
    if name == "wmt":
        files = {"fr": "newstest2014.en-fr", "de": "newstest2016.en-de"}
        folder = base / "wmt"
    elif name == "iwslt":
        files = {"ar": "tst2017.en-ar", "zh": "tst2017.en-zh"}
        folder = base / "iwslt17"
    elif name == "tatoeba":
        if other not in TATOEBA or "en" not in (source, target):
            raise KeyError(f"tatoeba has en-{other}? no; it has en paired with {', '.join(TATOEBA)}")
        stem = f"tatoeba.{TATOEBA[other]}-eng"
        names = {"en": "eng", other: TATOEBA[other]}
        return _aligned(base / "tatoeba" / f"{stem}.{names[source]}", base / "tatoeba" / f"{stem}.{names[target]}")
    else:
        raise KeyError(f"unknown test set {name!r}; known: {', '.join(TESTSETS)}")
    if other not in files or "en" not in (source, target):
        raise KeyError(f"{name} has no direction {source}-{target}; it covers en with {', '.join(files)}")
    return _aligned(folder / f"{files[other]}.{source}", folder / f"{files[other]}.{target}")


def monolingual_heldout(root: str | Path | None, language: str, n: int) -> list[str]:
    """Held-out monolingual text for the forgetting check: the last n FLORES dev lines (dev evaluation
    uses the first lines; nothing of FLORES is trained on)."""
    return _lines(data_root(root) / "flores200" / "dev" / f"{FLORES[language]}.dev")[-n:]
