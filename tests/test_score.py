"""Taylor-expansion awareness (eqs. 3–4) and layer detection (eqs. 1–2) on tiny real models."""

from __future__ import annotations

import pytest
import torch

from landermt.detect import layer_activations, layer_differences, shared_layers, top_layers
from landermt.families import family_of
from landermt.loss import target_loss
from landermt.prompts import batches, collate, text_example
from landermt.score import neuron_awareness
from tests.conftest import tiny_model

SENTENCES = ["The cat sleeps on the warm mat.", "Wir gehen heute auf den Markt.",
             "Il fait très beau ce matin.", "My brother reads a long book."]


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


def test_taylor_scores_rank_like_real_ablation(tokenizer):
    """Φ_j (eq. 4) should order neurons like the real loss change of zeroing neuron j (eq. 3).

    Eq. 4 takes |·| per token, so its exact counterpart zeroes h_{t,j} at one token t at a time
    and averages |ΔL| over tokens."""
    model = tiny_model("llama", len(tokenizer)).double()
    family = family_of(model)
    batch = collate([text_example(tokenizer, SENTENCES[0], 64)], tokenizer.pad_token_id)
    layer = 2
    phi = neuron_awareness(model, family, [batch], [layer])[layer]

    down = getattr(family.ffns(model)[layer], family.down)
    forward = {k: batch[k] for k in ("input_ids", "attention_mask")}
    tokens = batch["input_ids"].shape[1]
    with torch.no_grad():
        base = target_loss(model, **forward, labels=batch["labels"], reduction="sum")
        ablation = torch.zeros(phi.numel())
        for j in range(phi.numel()):
            for t in range(tokens):
                def zero_one(module, args, j=j, t=t):
                    h = args[0].clone()
                    h[:, t, j] = 0
                    return (h,)

                handle = down.register_forward_pre_hook(zero_one)
                loss = target_loss(model, **forward, labels=batch["labels"], reduction="sum")
                handle.remove()
                ablation[j] += (loss - base).abs().item() / tokens
    assert spearman(phi, ablation) > 0.9


def test_scores_do_not_depend_on_batching_or_padding(tokenizer):
    model = tiny_model("gemma", len(tokenizer))
    family = family_of(model)
    examples = [text_example(tokenizer, s, 64) for s in SENTENCES]
    one_big = neuron_awareness(model, family, batches(examples, 4, tokenizer.pad_token_id), [1, 3])
    singles = neuron_awareness(model, family, batches(examples, 1, tokenizer.pad_token_id), [1, 3])
    for layer in (1, 3):
        assert torch.allclose(one_big[layer], singles[layer], rtol=1e-4, atol=1e-7)
        assert (one_big[layer] > 0).all()


def test_scoring_allocates_no_weight_gradients_and_restores_trainability(tokenizer):
    model = tiny_model("bloom", len(tokenizer))
    examples = [text_example(tokenizer, s, 64) for s in SENTENCES]
    neuron_awareness(model, family_of(model), batches(examples, 2, tokenizer.pad_token_id))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_layer_differences_follow_eq_2():
    acts = torch.tensor([[1.0, 3.0, 2.0, 2.5], [3.0, 5.0, 2.0, 0.5]])  # 2 passes, 4 layers
    d = layer_differences(acts)  # layer means: 2, 4, 2, 1.5
    assert torch.allclose(d, torch.tensor([2.0, 2.0, 0.5]))
    assert top_layers(d, 2) == [0, 1]
    assert shared_layers({"a-b": torch.tensor([0.0, 1.0, 5.0]), "b-a": torch.tensor([3.0, 0.0, 1.0])}, 1) == [2]
    with pytest.raises(ValueError, match="k must be"):
        top_layers(d, 4)


def test_layer_activations_ignore_padding(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    family = family_of(model)
    examples = [text_example(tokenizer, s, 64) for s in SENTENCES]
    together = layer_activations(model, family, batches(examples, 4, tokenizer.pad_token_id))
    alone = layer_activations(model, family, batches(examples, 1, tokenizer.pad_token_id))
    assert together.shape == (4, 4)
    assert torch.allclose(together, alone, rtol=1e-4)
