"""Training data, test sets, and the evaluate CLI (the language check is tested in test_langid.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from landermt.artifact import load_artifact
from landermt.data import DataError, training_corpora
from landermt.families import family_of
from landermt.models import load_model
from landermt.routing import unpatch
from training.data import TEMPLATES, encode, evaluation_set, keep, training_pairs
from training.evaluate import main as evaluate_main
from training.evaluate import mean_bleu_interval, paired_difference_interval, score, translate
from training.run import main as run_main

ROOT = Path(__file__).resolve().parent.parent


def test_filters_drop_copies_extremes_and_skewed_lengths():
    assert keep("The cat sleeps.", "Die Katze schläft.", 2, 400, 3.0)
    assert not keep("Hello", "hello", 2, 400, 3.0)  # a copy, after NFKC + lower-casing
    assert not keep("A", "Ein", 2, 400, 3.0)  # too short
    assert not keep("Yes.", "Das ist eine sehr lange Antwort auf eine kurze Frage.", 2, 400, 3.0)


def test_training_pairs_cover_both_directions_without_duplicates(tmp_path):
    from tests.conftest import write_corpora

    write_corpora(tmp_path)
    pairs = training_pairs(tmp_path, ["de", "zh"])
    directions = {p.direction for p in pairs}
    assert directions == {"en-de", "de-en", "en-zh", "zh-en"}
    assert len({(p.direction, p.source) for p in pairs}) == len(pairs) == 24
    assert training_pairs(tmp_path, ["de", "zh"]) == pairs  # seeded
    with pytest.raises(FileNotFoundError, match="no training data for en-it"):
        training_pairs(tmp_path, ["it"])


def write_aligned(root: Path, lang: str, pairs: list[tuple[str, str]]) -> None:
    """en-XX as two line-aligned files, the English one gzip'd."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "train" / f"en-{lang}.en.gz", "wt", encoding="utf-8") as f:
        f.write("".join(en + "\n" for en, _ in pairs))
    (root / "train" / f"en-{lang}.{lang}").write_text("".join(xx + "\n" for _, xx in pairs), encoding="utf-8")


def test_line_aligned_files_train_like_the_same_tsv(tmp_path):
    from tests.conftest import PARALLEL, write_corpora

    write_corpora(tmp_path / "tsv")
    for lang, pairs in PARALLEL.items():
        write_aligned(tmp_path / "aligned", lang, pairs)
    assert training_pairs(tmp_path / "aligned", ["de", "zh"]) == training_pairs(tmp_path / "tsv", ["de", "zh"])
    corpora = training_corpora(tmp_path / "aligned")
    assert [(c.first, c.second, c.pairs) for c in corpora] == [
        (c.first, c.second, c.pairs) for c in training_corpora(tmp_path / "tsv")]


def _german_lines(n: int, empty_at: int | None = None) -> str:
    return "".join(" \n" if i == empty_at else f"Satz {i}\n" for i in range(1, n + 1))


@pytest.mark.parametrize("damage,message", [
    (lambda t, n: (t / "en-de.de").write_text(_german_lines(n - 1)), r"en-de.en.gz has \d+ lines but .*en-de.de has"),
    (lambda t, n: (t / "en-de.de").write_text(_german_lines(n, empty_at=4)), r"en-de.de:4: empty line"),
    (lambda t, n: (t / "en-de.de").unlink(), r"corpus en-de needs en-de.tsv\[.gz\] or both en-de.en and en-de.de"),
])
def test_malformed_line_aligned_files_are_named(tmp_path, damage, message):
    from tests.conftest import PARALLEL

    write_aligned(tmp_path, "de", PARALLEL["de"])
    damage(tmp_path / "train", len(PARALLEL["de"]))
    with pytest.raises(DataError, match=message):
        training_corpora(tmp_path)


def test_templates_are_ten_and_assigned_reproducibly(tokenizer, tmp_path):
    from tests.conftest import write_corpora

    assert len(set(TEMPLATES)) == 10
    write_corpora(tmp_path)
    pairs = training_pairs(tmp_path, ["de"])
    first, second = encode(tokenizer, pairs, 128, seed=3), encode(tokenizer, pairs, 128, seed=3)
    assert [e.input_ids for _, e in first] == [e.input_ids for _, e in second]
    for _, example in first:  # loss on the target (and EOS) only
        labelled = [t for t in example.labels if t != -100]
        assert labelled[-1] == tokenizer.eos_token_id and len(labelled) < len(example.input_ids)


@pytest.mark.parametrize("name,direction,lines", [
    ("flores", "en-de", 1012), ("flores", "zh-ar", 1012), ("wmt", "en-fr", 3003), ("wmt", "de-en", 2999),
    ("iwslt", "en-ar", 1460), ("iwslt", "zh-en", 1459), ("tatoeba", "it-en", 1000),
])
def test_test_sets_from_the_shared_data(name, direction, lines):
    rows = evaluation_set(None, name, *direction.split("-"))
    assert len(rows) == lines and all(s and r for s, r in rows[:50])


def test_unknown_test_set_directions_are_clear_errors():
    with pytest.raises(KeyError, match="wmt has no direction en-zh"):
        evaluation_set(None, "wmt", "en", "zh")
    with pytest.raises(KeyError, match="unknown test set"):
        evaluation_set(None, "newstest", "en", "de")


def test_scores():
    result = score(["Der Hund schläft."], ["Der Hund schläft."], "de")
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in result["bleu_signature"]
    assert "tok:zh" in score(["狗在睡觉。"], ["狗在睡觉。"], "zh")["bleu_signature"]


def test_mean_bleu_interval_is_a_bootstrap_over_each_directions_sentences():
    import random

    rng = random.Random(0)
    words = "der die das hund katze haus schläft läuft im garten heute morgen".split()
    refs = [" ".join(rng.choices(words, k=8)) for _ in range(40)]
    perfect = {"en-de": score(refs, refs, "de"), "de-en": score(refs, refs, "en")}
    assert mean_bleu_interval(perfect) == (pytest.approx(100.0), pytest.approx(100.0))
    half = [r if i % 2 else " ".join(rng.choices(words, k=8)) for i, r in enumerate(refs)]
    noisy = {"en-de": score(half, refs, "de"), "de-en": score(refs, refs, "en")}
    low, high = mean_bleu_interval(noisy)
    mean = (noisy["en-de"]["bleu"] + noisy["de-en"]["bleu"]) / 2
    assert low < mean < high < 100 and high - low > 2
    assert mean_bleu_interval(noisy) == (low, high)  # seeded
    worse = {"en-de": score(half, refs, "de"), "de-en": score(half, refs, "en")}
    better_low, better_high = paired_difference_interval(noisy, worse)
    assert 0 < better_low < (noisy["de-en"]["bleu"] - worse["de-en"]["bleu"]) / 2 < better_high
    assert paired_difference_interval(noisy, noisy) == (0.0, 0.0)  # the same draws for both runs
    del noisy["en-de"]["bleu_stats"]  # results from before the statistics were kept
    assert mean_bleu_interval(noisy) is None


def test_evaluate_cli_on_a_smoke_artifact(tmp_path, capsys):
    run_main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output", str(tmp_path / "run")])
    out = tmp_path / "eval.json"
    evaluate_main(["--artifact", str(tmp_path / "run" / "artifact"), "--model", str(tmp_path / "run" / "base_model"),
                   "--testset", "flores", "--directions", "en-de,zh-en", "--limit", "2", "--output", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"en-de", "zh-en"} and results["en-de"]["sentences"] == 2
    assert len(results["en-de"]["outputs"]) == len(results["en-de"]["bleu_stats"]) == 2
    assert "| **mean** |" in out.with_suffix(".md").read_text() and "bootstrap" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        evaluate_main(["--artifact", str(tmp_path / "run" / "artifact"), "--model",
                       str(tmp_path / "run" / "base_model"), "--directions", "en-xx"])
    assert "not servable" in capsys.readouterr().err


def test_evaluate_unrouted_serves_the_trained_weights_without_a_mask(tmp_path):
    """--unrouted is for the mask rule (a delta artifact unrouted is the base model itself)."""
    run_main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output", str(tmp_path / "run"),
              "--set", "method.routing=mask"])
    artifact_dir, base_dir = tmp_path / "run" / "artifact", tmp_path / "run" / "base_model"
    out = tmp_path / "unrouted.json"
    evaluate_main(["--artifact", str(artifact_dir), "--model", str(base_dir), "--directions", "en-de",
                   "--limit", "3", "--unrouted", "--output", str(out)])
    artifact = load_artifact(artifact_dir)
    assert artifact.ffn is not None
    model, tokenizer = load_model(str(base_dir), artifact.dtype)
    artifact.apply(model)
    sources = [s for s, _ in evaluation_set(None, "flores", "en", "de")[:3]]
    template = artifact.manifest.prompt_template
    routed = translate(model, tokenizer, template, "en", "de", sources, artifact.partition.pair_id("en", "de"))
    unpatch(model, family_of(model))  # the same trained FFN weights in the plain model
    unrouted = translate(model, tokenizer, template, "en", "de", sources)
    outputs = [e["output"] for e in json.loads(out.read_text())["en-de"]["examples"]]
    assert outputs == unrouted and outputs != routed


@pytest.mark.parametrize("command,argv,message", [
    (run_main, ["--config", str(ROOT / "configs" / "smoke.yaml"), "--set", "data.root=/no/such/data"],
     "data directory /no/such/data does not exist"),
    (evaluate_main, ["--artifact", "/no/such/artifact"], "no manifest.json; not a LANDeRMT artifact"),
])
def test_bad_input_to_a_cli_is_one_line_and_status_2(tmp_path, capsys, command, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        command([*argv, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
