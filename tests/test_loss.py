"""The loss head on target positions only (landermt/loss.py) equals the loss of the full logits, and so do its
gradients, on every family, with chunks smaller than the batch's targets and with Gemma's logit soft-capping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from landermt.loss import target_loss
from landermt.prompts import DEFAULT_TEMPLATE, IGNORE, collate, text_example, translation_example
from tests.conftest import FAMILY_NAMES, PARALLEL, tiny_model


def full_logits_loss(model, input_ids, attention_mask, labels, reduction: str) -> torch.Tensor:
    """The reference: logits at every position from the model's own forward, shifted cross-entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def translation_batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = [("en", "de", *PARALLEL["de"][0]), ("fr", "en", *reversed(PARALLEL["fr"][3])),
            ("en", "zh", *PARALLEL["zh"][4])]
    examples = [translation_example(tokenizer, DEFAULT_TEMPLATE, s, t, a, b, 64) for s, t, a, b in rows]
    return collate(examples, tokenizer.pad_token_id)


MODELS = [*FAMILY_NAMES, "gemma-softcapped"]


def model_for(name: str, vocab_size: int) -> torch.nn.Module:
    model = tiny_model(name.removesuffix("-softcapped"), vocab_size)
    if name.endswith("softcapped"):  # as Gemma 2 does; the tiny Gemma 3 reads it from its config in forward
        model.config.final_logit_softcapping = 0.1  # small enough to bend the tiny model's small logits
    return model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_the_full_logits_loss_and_its_gradients(name, reduction, tokenizer):
    model = model_for(name, len(tokenizer))  # eval mode: no dropout, so both passes see the same network
    batch = translation_batch(tokenizer)
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) > 7  # chunks of 7 below split the targets

    want = full_logits_loss(model, **batch, reduction=reduction)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = target_loss(model, **batch, reduction=reduction, chunk_tokens=7)
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6)


def test_soft_capping_is_applied(tokenizer):
    batch = translation_batch(tokenizer)
    capped, plain = model_for("gemma-softcapped", len(tokenizer)), model_for("gemma", len(tokenizer))
    with torch.no_grad():
        assert abs(target_loss(capped, **batch).item() - target_loss(plain, **batch).item()) > 1e-3


def test_plain_text_and_no_grad(tokenizer):
    """Perplexity's use: every token after the first is scored, no autograd."""
    model = tiny_model("llama", len(tokenizer))
    batch = collate([text_example(tokenizer, s, 64) for s, _ in PARALLEL["de"]], tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(target_loss(model, **batch, reduction="sum"),
                                   full_logits_loss(model, **batch, reduction="sum"), rtol=1e-5, atol=1e-4)


def test_lora_wrapped_model(tokenizer):
    """Through PEFT's wrapper: the adapters inside the model are used, and they get the same gradients."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj", "up_proj"],
                                                                          init_lora_weights=False))
    batch = translation_batch(tokenizer)
    want = full_logits_loss(model, **batch, reduction="mean")
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = target_loss(model, **batch)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads and all(torch.allclose(p.grad, want_grads[n], rtol=1e-4, atol=1e-6)
                              for n, p in model.named_parameters() if p.grad is not None)


def test_a_batch_with_no_targets_has_loss_zero_and_zero_gradient(tokenizer):
    model = tiny_model("gemma", len(tokenizer))
    batch = translation_batch(tokenizer)
    batch["labels"][:] = IGNORE
    loss = target_loss(model, **batch)
    loss.backward()
    assert loss.item() == 0 and all(not p.grad.any() for p in model.parameters() if p.grad is not None)
