"""Artifact build, round trip and validation, and the inspect CLI, on tiny real models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from landermt.artifact import FFN, MANIFEST, PARTITIONS, ArtifactError, ffn_weights, load_artifact, save_artifact
from landermt.build import build
from landermt.build import main as build_main
from landermt.data import training_corpora
from landermt.families import family_of
from landermt.inspect import main as inspect_main
from landermt.models import load_model
from landermt.routing import route
from tests.conftest import tiny_model, write_corpora


@pytest.fixture
def built(tmp_path, tokenizer):
    """A tiny Gemma-style model, its data, and an artifact built from them."""
    model = tiny_model("gemma", len(tokenizer))
    write_corpora(tmp_path / "data")
    manifest, partition = build(model, tokenizer, training_corpora(tmp_path / "data"), k=2, epsilon=0.75,
                                detect_samples=4, score_samples=6, batch_size=4, model_name="tiny")
    directory = save_artifact(tmp_path / "artifact", manifest, partition)
    return model, directory


def test_build_records_the_method_settings(built):
    _, directory = built
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["languages"] == ["en", "de", "fr", "zh"]
    assert sorted(manifest["directions"]) == sorted(["en-de", "de-en", "en-fr", "fr-en", "en-zh", "zh-en"])
    assert len(manifest["layers"]) == manifest["k"] == 2
    assert all(len(d) == 3 for d in manifest["differences"].values())  # 4 layers -> 3 differences
    assert set(manifest["car_ratios"]) == {"en-de", "en-fr", "en-zh", "de-fr", "de-zh", "fr-zh"}
    assert all(0 < c < 1 for by_layer in manifest["car_ratios"].values() for c in by_layer.values())
    assert "{source}" in manifest["prompt_template"]


def test_round_trip_is_bit_exact(built, tmp_path, tokenizer):
    model, directory = built
    family = family_of(model)
    first = load_artifact(directory)
    with torch.no_grad():  # pretend training moved the selected FFNs
        for layer in first.manifest.layers:
            getattr(family.ffns(model)[layer], family.up).weight.add_(0.01)
    trained = ffn_weights(model, family, first.manifest.layers)
    save_artifact(tmp_path / "copy", first.manifest, first.partition, trained)
    second = load_artifact(tmp_path / "copy")
    assert second.manifest == first.manifest
    for i, layer in first.partition.layers.items():
        assert torch.equal(layer.phi, second.partition.layers[i].phi)
        assert torch.equal(layer.specific, second.partition.layers[i].specific)
    assert second.ffn.keys() == trained.keys()
    assert all(torch.equal(second.ffn[k], trained[k]) for k in trained)
    assert (tmp_path / "copy" / PARTITIONS).read_bytes() == (directory / PARTITIONS).read_bytes()

    fresh = tiny_model("gemma", len(tokenizer))
    second.apply(fresh, verify_base=False)  # weights were changed above, so skip the base hash
    batch = tokenizer(["The cat sleeps.", "Wo ist der Bahnhof?"], return_tensors="pt", padding=True)
    pair = second.partition.pair_id("en", "de")
    with torch.no_grad(), route(torch.tensor([pair, 0])):
        got = fresh(**batch).logits
    first.apply(model, verify_base=False)
    with torch.no_grad(), route(torch.tensor([pair, 0])):
        want = model(**batch).logits
    assert torch.equal(got, want)


def test_apply_checks_the_base_model(built, tokenizer):
    _, directory = built
    artifact = load_artifact(directory)
    other = tiny_model("gemma", len(tokenizer))
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    with pytest.raises(ArtifactError, match="sha256 .* does not match"):
        artifact.apply(other)
    with pytest.raises(ArtifactError, match="artifact is for a gemma3_text model with 4 layers"):
        artifact.apply(tiny_model("llama", len(tokenizer)))
    artifact.apply(tiny_model("gemma", len(tokenizer)))  # same seed, same weights: accepted


def _corrupt(directory, name, mutate):
    path = directory / name
    path.write_text(mutate(path.read_text())) if name.endswith(".json") else path.write_bytes(mutate(path.read_bytes()))


@pytest.mark.parametrize("name,mutate,message", [
    (MANIFEST, lambda s: s[:50], "not valid JSON"),
    (MANIFEST, lambda s: s.replace('"schema_version": 1', '"schema_version": 99'), "schema_version 99"),
    (MANIFEST, lambda s: s.replace('"car": "paper"', '"car": "loud"'), "car is 'loud'"),
    (MANIFEST, lambda s: s.replace('"epsilon": 0.75', '"epsilon": 0.5'), "general neurons, ε=0.5 implies"),
    (MANIFEST, lambda s: s.replace('"k": 2,', '"k": 2, "surprise": 1,'), "unknown keys \\['surprise'\\]"),
    (PARTITIONS, lambda b: b[:100], "corrupted safetensors"),
    (PARTITIONS, lambda b: b[:-8], "corrupted safetensors"),
])
def test_corrupted_artifact_gives_a_clear_error(built, name, mutate, message):
    _, directory = built
    _corrupt(directory, name, mutate)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(directory)


def test_tampered_car_ratio_and_mismatched_ffn_are_caught(built, tokenizer):
    model, directory = built
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["car_ratios"]["en-de"][str(manifest["layers"][0])] += 0.1
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="c for en-de layer"):
        load_artifact(directory)

    manifest["car_ratios"]["en-de"][str(manifest["layers"][0])] -= 0.1
    (directory / MANIFEST).write_text(json.dumps(manifest))
    from safetensors.torch import save_file

    family = family_of(model)
    weights = ffn_weights(model, family, manifest["layers"])
    key = next(iter(weights))
    weights[key] = torch.zeros(3, 3)
    save_file(weights, directory / FFN)
    with pytest.raises(ArtifactError, match=f"{key} has shape \\(3, 3\\)"):
        load_artifact(directory).apply(tiny_model("gemma", len(tokenizer)))


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json; not a LANDeRMT artifact"):
        load_artifact(tmp_path)


def test_build_cli_on_a_local_model_directory_and_inspect(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_model("bloom", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model, _ = load_model(str(model_dir), torch.float32)
    assert model.config.model_type == "bloom"
    write_corpora(tmp_path / "data")
    build_main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "art"),
                "--k", "2", "--epsilon", "0.5", "--detect-samples", "3", "--score-samples", "4",
                "--dtype", "float32", "--car", "swapped", "--objective", "translation"])
    artifact = load_artifact(tmp_path / "art")
    assert artifact.manifest.car == "swapped" and artifact.manifest.scoring["objective"] == "translation"
    artifact.apply(model)  # the base hash matches the model the CLI loaded
    capsys.readouterr()
    inspect_main([str(tmp_path / "art"), "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    p = artifact.manifest.base_model.intermediate_size
    assert "ε=0.5, CAR mode swapped" in out
    for layer in artifact.manifest.layers:
        assert f"{layer:>5}  {math.floor(0.5 * p):>7}" in out
    for name in ("layer_differences.png", "awareness.png", "car_ratios.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_reports_a_bad_artifact_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect_main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not a LANDeRMT artifact" in capsys.readouterr().err


def delta_copy(built, tmp_path, scale: float = 0.01, attention: bool = False):
    """The built artifact as a delta-rule one with a random update (of the attention projections too, factored as
    training makes it), and the update."""
    import dataclasses

    from landermt.artifact import update_weights
    from landermt.partition import delta_tables
    from landermt.routing import patch_attention, patch_delta, unpatch

    model, directory = built
    artifact = load_artifact(directory)
    family = family_of(model)
    layers = sorted(artifact.partition.layers)
    modules = patch_delta(model, family, delta_tables(artifact.partition))
    projections = patch_attention(model, family, layers, rank=2) if attention else {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [p for module in modules for p in module.update.values()] + [
                m.update for m in projections.values()]:
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    update = update_weights(modules, layers, projections)
    unpatch(model, family)
    manifest = dataclasses.replace(artifact.manifest, routing="delta")
    return save_artifact(tmp_path / "delta", manifest, artifact.partition, update=update), update


def test_delta_artifact_round_trip_serves_its_update_and_keeps_the_base_hash(built, tmp_path, tokenizer):
    from landermt.artifact import UPDATE

    model, _ = built
    directory, update = delta_copy(built, tmp_path)
    loaded = load_artifact(directory)
    assert json.loads((directory / MANIFEST).read_text())["routing"] == "delta"
    assert loaded.ffn is None and loaded.update.keys() == update.keys()
    assert all(torch.equal(loaded.update[k], update[k]) for k in update)
    assert not (directory / FFN).exists() and (directory / UPDATE).exists()

    batch = tokenizer(["The cat sleeps.", "Wo ist der Bahnhof?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    loaded.apply(model)  # the base is untouched by a delta artifact: its hash still matches
    pair = loaded.partition.pair_id("de", "en")
    with torch.no_grad(), route(torch.tensor([pair, 0])):
        routed = model(**batch).logits
    assert torch.equal(routed[1], base[1]) and not torch.allclose(routed[0], base[0])


def test_a_delta_artifact_with_an_attention_update_serves_it_to_routed_rows_only(built, tmp_path, tokenizer):
    from landermt.artifact import attention_keys
    from landermt.routing import attention_updates, unpatch

    model, _ = built
    family = family_of(model)
    batch = tokenizer(["The cat sleeps.", "Wo ist der Bahnhof?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    plain, _ = delta_copy(built, tmp_path / "plain", scale=0.05)
    directory, update = delta_copy(built, tmp_path / "attention", scale=0.05, attention=True)
    keys = attention_keys(update, family)
    assert len(keys) == len(family.attention) * 2 and all(update[k].dim() == 2 for k in keys)  # stored dense
    outputs = []
    for folder in (plain, directory):
        load_artifact(folder).apply(model)
        pair = load_artifact(folder).partition.pair_id("de", "en")
        with torch.no_grad(), route(torch.tensor([pair, 0])):
            outputs.append(model(**batch).logits)
        assert len(attention_updates(model, family)) == (len(keys) if folder == directory else 0)
        unpatch(model, family)
    assert torch.equal(outputs[1][1], base[1])  # row 0: the base model
    assert not torch.allclose(outputs[1][0], outputs[0][0])  # the attention update acts on routed rows


def test_delta_artifact_mismatches_are_refused(built, tmp_path, tokenizer):
    from safetensors.torch import save_file

    from landermt.artifact import UPDATE

    model, _ = built
    directory, update = delta_copy(built, tmp_path)
    key = next(iter(update))
    save_file({**update, key: torch.zeros(3, 3)}, directory / UPDATE)
    with pytest.raises(ArtifactError, match=f"{UPDATE}: {key} has shape \\(3, 3\\)"):
        load_artifact(directory).apply(tiny_model("gemma", len(tokenizer)))
    save_file(ffn_weights(model, family_of(model), load_artifact(directory).manifest.layers), directory / FFN)
    with pytest.raises(ArtifactError, match="ffn.safetensors does not belong to an artifact with routing 'delta'"):
        load_artifact(directory)
    (directory / FFN).unlink()
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps(manifest | {"routing": "sideways"}))
    with pytest.raises(ArtifactError, match="routing is 'sideways', expected one of mask, delta"):
        load_artifact(directory)


def test_artifacts_made_before_the_delta_rule_load_as_mask(built):
    _, directory = built
    manifest = json.loads((directory / MANIFEST).read_text())
    del manifest["routing"]
    (directory / MANIFEST).write_text(json.dumps(manifest))
    assert load_artifact(directory).manifest.routing == "mask"


def test_configured_layers_can_skip_detection(tmp_path, tokenizer):
    model = tiny_model("gemma", len(tokenizer))
    write_corpora(tmp_path / "data")
    corpora = training_corpora(tmp_path / "data")
    manifest, partition = build(model, tokenizer, corpora, epsilon=0.75, detect_samples=0, score_samples=4,
                                layers=[2, 3], model_name="tiny")
    assert manifest.layers == [2, 3] and sorted(partition.layers) == [2, 3] and manifest.differences == {}
    assert len(manifest.directions) == 6 and manifest.layer_rule == "configured (not detected)"
    load_artifact(save_artifact(tmp_path / "artifact", manifest, partition))  # a valid artifact
    with pytest.raises(ValueError, match="detect_samples 0 skips layer detection"):
        build(model, tokenizer, corpora, detect_samples=0)
