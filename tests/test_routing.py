"""The routed CAR FFN on tiny models of every family: identity, per-row routing, exclusion."""

from __future__ import annotations

import threading

import pytest
import torch

from landermt.families import UnsupportedModelError, family_of
from landermt.partition import build_partition
from landermt.routing import RoutedFFN, patch, route, unpatch

LANGUAGES = ("en", "de", "fr", "zh")


def random_partition(model, layers=(1, 2), epsilon=0.5, car="paper", seed=0):
    family = family_of(model)
    p = family.intermediate_size(model)
    gen = torch.Generator().manual_seed(seed)
    phi = {i: torch.rand(len(LANGUAGES), p, generator=gen) for i in layers}
    return build_partition(phi, LANGUAGES, epsilon, car)


def inputs(tokenizer, n=4):
    texts = ["The cat sleeps on the warm mat.", "Wir gehen heute auf den Markt.",
             "Il fait très beau ce matin.", "猫睡在温暖的垫子上。", "Where is the train station?"][:n]
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits(model, batch, pair_ids=None):
    with torch.no_grad(), route(pair_ids):
        return model(**batch).logits


def test_identity_row_is_the_base_model_exactly(family_model, tokenizer):
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    patch(family_model, family_of(family_model), partition.scale_tables())
    assert torch.equal(logits(family_model, batch), base)  # no route: every row is id 0
    zeros = torch.zeros(len(batch["input_ids"]), dtype=torch.long)
    assert torch.equal(logits(family_model, batch, zeros), base)
    mixed = torch.tensor([0, 3, 0, 5])
    out = logits(family_model, batch, mixed)
    assert torch.equal(out[mixed == 0], base[mixed == 0])
    assert not torch.allclose(out[1], base[1])  # a routed row really differs


def test_mixed_pair_batch_equals_each_pair_alone(family_model, tokenizer):
    batch = inputs(tokenizer)
    partition = random_partition(family_model)
    patch(family_model, family_of(family_model), partition.scale_tables())
    mixed = torch.tensor([partition.pair_id("en", "de"), partition.pair_id("fr", "zh"),
                          partition.pair_id("de", "en"), 0])
    out = logits(family_model, batch, mixed)
    for pair in mixed.unique():
        alone = logits(family_model, batch, torch.full_like(mixed, int(pair)))
        rows = mixed == pair
        assert torch.equal(out[rows], alone[rows])
        one_row = {k: v[rows][:1] for k, v in batch.items()}
        single = logits(family_model, one_row, pair.view(1))
        assert torch.allclose(out[rows][:1], single, atol=1e-5)


def test_per_token_pair_ids_match_per_row(family_model, tokenizer):
    batch = inputs(tokenizer)
    patch(family_model, family_of(family_model), random_partition(family_model).scale_tables())
    rows = torch.tensor([1, 2, 3, 4])
    per_token = rows[:, None].expand_as(batch["input_ids"])
    assert torch.equal(logits(family_model, batch, rows), logits(family_model, batch, per_token))


def test_excluded_neurons_output_zero_and_get_zero_gradient(family_model, tokenizer):
    family = family_of(family_model)
    partition = random_partition(family_model, layers=(1,), epsilon=0.25)
    patch(family_model, family, partition.scale_tables())
    pair = partition.pair_id("en", "de")
    part = partition.layers[1]
    excluded = ~part.pair_mask(0, 1)
    assert excluded.any()
    ffn = family.ffns(family_model)[1]
    seen = []
    handle = getattr(ffn, family.down).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    batch = inputs(tokenizer)
    family_model.train(False)
    with route(torch.full((4,), pair)):
        loss = family_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    handle.remove()
    h = seen[0]
    assert torch.all(h[..., excluded] == 0)
    assert torch.any(h[..., ~excluded] != 0)
    for part_name in ("up", "gate", "down"):
        attr = getattr(family, part_name)
        if attr is None:
            continue
        module = getattr(ffn, attr)
        axis = family.neuron_axis(part_name)
        grad = module.weight.grad.movedim(axis, 0)
        assert torch.all(grad[excluded] == 0), part_name
        assert torch.any(grad[~excluded] != 0), part_name
        if part_name != "down" and module.bias is not None:
            assert torch.all(module.bias.grad[excluded] == 0)


def test_car_modes_change_outputs_and_off_keeps_general_at_full_scale(tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    batch = inputs(tokenizer)
    pair = torch.full((4,), 1)
    outs = {}
    for car in ("paper", "swapped", "off"):
        family = family_of(model)
        partition = random_partition(model, car=car)
        patch(model, family, partition.scale_tables())
        outs[car] = logits(model, batch, pair)
        unpatch(model, family)
        table = partition.scale_tables()[1][1]
        part = partition.layers[1]
        c = partition.car_ratios()["en-de"][1]
        expected_general = {"paper": c, "swapped": 1 - c, "off": 1.0}[car]
        assert torch.allclose(table[part.general], torch.tensor(expected_general))
    assert not torch.allclose(outs["paper"], outs["swapped"])
    assert not torch.allclose(outs["paper"], outs["off"])


def test_concurrent_threads_route_independently(tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("gemma", len(tokenizer))
    patch(model, family_of(model), random_partition(model).scale_tables())
    batch = inputs(tokenizer)
    expected = {pid: logits(model, batch, torch.full((4,), pid)) for pid in (1, 2, 3)}
    failures = []

    def worker(pid: int) -> None:
        for _ in range(5):
            if not torch.equal(logits(model, batch, torch.full((4,), pid)), expected[pid]):
                failures.append(pid)

    threads = [threading.Thread(target=worker, args=(pid,)) for pid in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_state_dict_keys_unchanged_by_patching_and_unpatch_restores(family_model):
    family = family_of(family_model)
    keys = list(family_model.state_dict())
    original = family.ffns(family_model)[1]
    patch(family_model, family, random_partition(family_model).scale_tables())
    assert isinstance(family.ffns(family_model)[1], RoutedFFN)
    assert list(family_model.state_dict()) == keys
    with pytest.raises(ValueError, match="already patched"):
        patch(family_model, family, random_partition(family_model).scale_tables())
    unpatch(family_model, family)
    assert family.ffns(family_model)[1] is original


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match="opt.*supported model types: gemma3_text"):
        family_of(model)
