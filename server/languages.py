"""Language tags: ISO 639-1 codes, with common BCP-47 forms normalised (de-DE → de, zh-Hans → zh)."""

from __future__ import annotations

import re

_TAG = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
_ALIASES = {"zh-hans": "zh", "zh-hant": "zh", "zh-cn": "zh", "zh-tw": "zh", "zho": "zh", "cmn": "zh",
            "eng": "en", "deu": "de", "ger": "de", "fra": "fr", "fre": "fr", "ita": "it", "ara": "ar", "arb": "ar"}


def normalise(tag: str) -> str:
    """The ISO 639-1 code of a tag, or the lower-cased tag if it is not well formed (callers reject it)."""
    tag = tag.strip()
    lowered = tag.lower().replace("_", "-")
    if lowered in _ALIASES:
        return _ALIASES[lowered]
    if not _TAG.match(tag):
        return lowered
    primary = lowered.split("-", 1)[0]
    return _ALIASES.get(primary, primary)
