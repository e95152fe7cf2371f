"""The delta rule (landermt.routing.DeltaFFN) on tiny models of every family, with a dense update and a factored
one (rank r): the base model exactly before any training, a mixed batch equal to each pair alone, each pair's update
and nothing else, exact zero gradients; a factored update served as the dense one it stands for."""

from __future__ import annotations

import pytest
import torch

from landermt.families import family_of
from landermt.partition import delta_tables
from landermt.routing import DeltaFFN, patch_attention, patch_delta, route, unpatch
from tests.test_routing import inputs, logits, random_partition


def patched(model, partition, rank: int | dict[str, int] | None = None, train_factors: bool = False, rounds: int = 1
            ) -> list[DeltaFFN]:
    return patch_delta(model, family_of(model), delta_tables(partition), rank, train_factors, rounds)


@pytest.fixture(params=[{}, {"rank": 4}, {"rank": 4, "train_factors": True}, {"rank": 4, "rounds": 3},
                        {"rank": {"up": 2, "gate": 3, "down": 5}, "rounds": 2}],
                ids=["dense", "rank4", "rank4-trained-factors", "rank4-3-rounds", "ranks-per-part-2-rounds"])
def update(request) -> dict:
    """How the update is parametrised: dense, factored with fixed factors, factored with trained group factors,
    factored in rounds of fixed factors (the earlier rounds frozen), and so with a rank of its own per part."""
    return request.param


def random_update(modules: list[DeltaFFN], seed: int = 1, scale: float = 0.5) -> None:
    """Random trained numbers, and random earlier rounds where there are any (they are part of the update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in [*module.update.values(), *module.earlier_rounds().values()]:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def all_ids(partition) -> list[int]:
    return list(range(len(partition.pairs) + 1))


def test_before_training_every_pair_is_the_base_model_bit_for_bit(family_model, tokenizer, update):
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    patched(family_model, partition, **update)
    assert torch.equal(logits(family_model, batch), base)  # no ids
    for pair in all_ids(partition):
        assert torch.equal(logits(family_model, batch, torch.full((4,), pair)), base), pair
    assert torch.equal(logits(family_model, batch, torch.tensor([0, 3, 5, 6])), base)


def test_mixed_batch_equals_each_pair_alone_and_row_0_is_the_base(family_model, tokenizer, update):
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    random_update(patched(family_model, partition, **update))
    mixed = torch.tensor([partition.pair_id("en", "de"), partition.pair_id("fr", "zh"), 0,
                          partition.pair_id("de", "en")])
    out = logits(family_model, batch, mixed)
    assert torch.equal(out[2], base[2])  # row 0 in a mixed batch: the base model exactly
    for pair in mixed.unique():
        alone = logits(family_model, batch, torch.full_like(mixed, int(pair)))
        rows = mixed == pair
        assert torch.equal(out[rows], alone[rows])
    assert not torch.allclose(out[0], base[0])  # the update really acts
    per_token = mixed[:, None].expand_as(batch["input_ids"])
    assert torch.equal(logits(family_model, batch, per_token), out)


def merged_reference(model, partition, modules: list[DeltaFFN], pair: int):
    """What pair `pair` should compute: the plain model with W + Δ on G ∪ S_a ∪ S_b and W elsewhere."""
    family = family_of(model)
    updates = {index: {k: v.detach().clone() for k, v in m.dense_update().items()} for index, m in zip(
        sorted(partition.layers), modules, strict=True)}
    unpatch(model, family)
    x, y = partition.pairs[pair - 1]
    a, b = partition.languages.index(x), partition.languages.index(y)
    with torch.no_grad():
        for index, update in updates.items():
            keep = partition.layers[index].pair_mask(a, b).float()
            ffn = family.ffns(model)[index]
            for key, delta in update.items():
                name, kind = key.split(":")
                param = getattr(getattr(ffn, name), kind)
                part = next(p for p in ("up", "gate", "down") if getattr(family, p) == name)
                shape = [1] * param.dim()
                shape[family.neuron_axis(part) if kind == "weight" else 0] = -1
                param += delta * keep.view(shape)


def test_each_pair_adds_its_own_neurons_update_and_other_languages_keep_the_base(family_model, tokenizer, update):
    batch = inputs(tokenizer)
    partition = random_partition(family_model)
    modules = patched(family_model, partition, **update)
    random_update(modules, scale=0.05)
    pair = partition.pair_id("de", "zh")
    routed = logits(family_model, batch, torch.full((4,), pair))
    merged_reference(family_model, partition, modules, pair)
    torch.testing.assert_close(routed, logits(family_model, batch), rtol=1e-4, atol=1e-4)


def test_outside_its_pair_an_update_gets_exactly_zero_gradient_from_a_row(family_model, tokenizer, update):
    batch = {k: v[:1] for k, v in inputs(tokenizer).items()}
    partition = random_partition(family_model, layers=(1,))
    [module] = patched(family_model, partition, **update)
    random_update([module])
    for p in module.update.values():
        p.requires_grad_(True)
    pair = partition.pair_id("en", "de")
    with route(torch.tensor([pair])):
        family_model(**batch).logits.float().square().mean().backward()
    part = partition.layers[1]
    outside = ~part.pair_mask(0, 1)
    assert outside.any() and (~outside).any()
    family = family_of(family_model)
    # a trained factor's unit is its neuron group: groups with no neuron of the pair get nothing
    outside_group = module.groups[~outside].sum(0) == 0
    for key, p in module.update.items():
        name, kind = key.split(":")
        part_name = next(x for x in ("up", "gate", "down") if getattr(family, x) == name)
        grad = p.grad.movedim(family.neuron_axis(part_name) if kind == "weight" else 0, 0)
        out = outside_group if kind == "factor" else outside
        assert torch.all(grad[out] == 0), key
        assert grad[~out].abs().sum() > 0, key
    if update.get("train_factors"):
        assert outside_group.any() and (~outside_group).sum() == 3  # general, en's and de's neurons


def test_inference_reuses_merged_weights_until_an_update_changes(tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    batch = inputs(tokenizer)
    partition = random_partition(model)
    modules = patched(model, partition)
    ids = torch.full((4,), partition.pair_id("en", "fr"))
    before = logits(model, batch, ids)
    cached = modules[0]._cache[1]["up_proj.weight"]
    assert logits(model, batch, ids) is not None and modules[0]._cache[1]["up_proj.weight"] is cached
    random_update(modules)  # in place, as an optimizer step: the cache must notice
    assert not torch.equal(logits(model, batch, ids), before)


@pytest.mark.parametrize("bad", ["row0", "width"])
def test_a_malformed_uses_table_is_refused(tokenizer, bad):
    from tests.conftest import tiny_model

    model = tiny_model("gemma", len(tokenizer))
    partition = random_partition(model)
    tables = delta_tables(partition)
    general, specific, uses = tables[1]
    uses = uses.clone()
    if bad == "row0":
        uses[0, 0] = 1
    else:
        uses = uses[:, :-1]
    tables[1] = (general, specific, uses)
    with pytest.raises(ValueError, match="uses must be"):
        patch_delta(model, family_of(model), tables)


FACTORED = pytest.mark.parametrize("factored", [{}, {"train_factors": True}, {"rounds": 2}],
                                   ids=["fixed-factors", "trained-factors", "2-rounds"])


@FACTORED
def test_a_factored_update_serves_as_its_dense_update(family_model, tokenizer, factored):
    """Training with rank r, then an artifact's dense update (landermt.artifact.update_weights) loaded into a dense
    DeltaFFN, as serving does: the same outputs for every pair."""
    from landermt.artifact import load_update, update_weights

    batch = inputs(tokenizer)
    partition = random_partition(family_model)
    layers = sorted(partition.layers)
    modules = patched(family_model, partition, 3, **factored)
    random_update(modules, scale=0.05)
    assert all(m.update[f"{m.family.up}:weight"].shape[-1] == 3 or m.update[f"{m.family.up}:weight"].shape[0] == 3
               for m in modules)
    ids = torch.tensor([partition.pair_id("en", "de"), partition.pair_id("fr", "zh"), 0, 2])
    trained = logits(family_model, batch, ids)
    dense_update = update_weights(modules, layers)
    unpatch(family_model, family_of(family_model))
    load_update(patched(family_model, partition), layers, dense_update)
    torch.testing.assert_close(logits(family_model, batch, ids), trained, rtol=1e-5, atol=1e-5)


@FACTORED
def test_factored_training_path_equals_the_merged_path(family_model, tokenizer, factored):
    """With grad enabled a factored update is applied to the activations (no dense Δ); without, through merged
    weights: the same logits for a mixed batch, row 0 the base."""
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    random_update(patched(family_model, partition, 3, **factored), scale=0.05)
    ids = torch.tensor([partition.pair_id("en", "de"), 0, partition.pair_id("fr", "zh"), 2])
    merged = logits(family_model, batch, ids)
    with torch.enable_grad(), route(ids):
        activations = family_model(**batch).logits.float().detach()
    torch.testing.assert_close(activations, merged, rtol=1e-4, atol=1e-4)
    assert torch.equal(activations[1], base[1]) and not torch.allclose(activations[0], base[0])


def test_retiring_a_round_keeps_the_update_and_frees_the_numbers(family_model, tokenizer):
    """DeltaFFN.retire (method.factor_rounds): the trained numbers and their factor move into the round's frozen slot,
    the numbers restart at zero, and the model computes what it did; numbers trained on new factors then add to the
    retired update, which the next retirement keeps too."""
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    modules = patched(family_model, partition, 3, rounds=3)
    ids = torch.tensor([partition.pair_id("en", "de"), 0, partition.pair_id("fr", "zh"), 2])
    generator = torch.Generator().manual_seed(3)
    for round_index in range(2):
        with torch.no_grad():  # this round's numbers, and (after round 1) new factors, as re-aligning sets them
            for module in modules:
                for p in [*module.update.values(), *(module.fixed_factors().values() if round_index else [])]:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        before, dense = logits(family_model, batch, ids), [m.dense_update() for m in modules]
        assert not torch.allclose(before[0], base[0])
        for module, update in zip(modules, dense, strict=True):
            zeroed = module.retire(round_index)
            assert len(zeroed) == len(module.factored) and all(torch.all(p == 0) for p in zeroed)
            for key, value in module.dense_update().items():
                torch.testing.assert_close(value, update[key], rtol=1e-5, atol=1e-6)
        after = logits(family_model, batch, ids)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        assert torch.equal(after[1], base[1])  # row 0: the base model, whatever the rounds hold
    earlier = modules[0].earlier_rounds()
    assert earlier and all(value.abs().sum() > 0 for value in earlier.values())


def attention_patched(model, partition, rank: int | None = 3):
    """The delta rule with an attention update too (method.attention_rank), both updates random."""
    modules = patched(model, partition, rank)
    random_update(modules, scale=0.05)
    attention = patch_attention(model, family_of(model), sorted(partition.layers), rank)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in attention.values():
            module.update.copy_(torch.randn(module.update.shape, generator=generator) * 0.05)
    return modules, attention


def test_an_attention_update_starts_at_the_base_and_leaves_row_0_alone(family_model, tokenizer):
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    attention = patch_attention(family_model, family_of(family_model), sorted(partition.layers), rank=3)
    assert len(attention) == 2 * len(family_of(family_model).attention)
    ids = torch.tensor([partition.pair_id("en", "de"), 0, partition.pair_id("fr", "zh"), 2])
    assert torch.equal(logits(family_model, batch, ids), base)  # zero update: the base bit for bit
    unpatch(family_model, family_of(family_model))
    modules, attention = attention_patched(family_model, partition)
    mixed = logits(family_model, batch, ids)
    assert torch.equal(mixed[1], base[1]) and not torch.allclose(mixed[0], base[0])
    for pair in ids.unique():  # a mixed batch equals each pair alone (merged weight for all-routed batches)
        rows = ids == pair
        assert torch.equal(mixed[rows], logits(family_model, batch, torch.full_like(ids, int(pair)))[rows])
    with torch.enable_grad(), route(ids):  # training's path (factored, on the activations) computes the same
        trained = family_model(**batch).logits.float().detach()
    torch.testing.assert_close(trained, mixed.float(), rtol=1e-4, atol=1e-4)


def test_an_attention_update_gets_no_gradient_from_base_rows(family_model, tokenizer):
    batch = inputs(tokenizer)
    partition = random_partition(family_model)
    _, attention = attention_patched(family_model, partition)
    for module in attention.values():
        module.update.requires_grad_(True)

    def gradients(ids: torch.Tensor) -> list[torch.Tensor]:
        for module in attention.values():
            module.update.grad = None
        with route(ids):
            family_model(**batch).logits.float().square().mean().backward()
        return [module.update.grad for module in attention.values()]

    assert all(g is None or torch.all(g == 0) for g in gradients(torch.zeros(4, dtype=torch.long)))
    assert all(g.abs().sum() > 0 for g in gradients(torch.full((4,), partition.pair_id("en", "de"))))


def test_gradient_factors_keep_the_base_and_catch_more_of_the_gradient(family_model, tokenizer):
    """method.update_factor "gradient" (landermt.routing.aligned_factor): after aligning, every pair is still the
    base model bit for bit, and the trained numbers' first gradient is larger than with the noise factors of the
    same norm: the factors span the directions in which the loss wants each weight to move."""
    batch = inputs(tokenizer)
    base = logits(family_model, batch)
    partition = random_partition(family_model)
    modules = patched(family_model, partition, 2)
    ids = torch.full((4,), partition.pair_id("en", "de"))

    def gradients(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.enable_grad(), route(ids):
            loss = family_model(**batch, labels=batch["input_ids"]).loss
            return list(torch.autograd.grad(loss, tensors))

    trained = [m.update[m.key(name, "weight")] for m in modules for name in m.fixed_factors()]
    for p in trained:
        p.requires_grad_(True)
    before = gradients(trained)
    for module in modules:
        names = list(module.fixed_factors())
        weights = [getattr(module, name).weight.requires_grad_(True) for name in names]
        module.align_factors(dict(zip(names, gradients(weights), strict=True)))
        for w in weights:
            w.requires_grad_(False)
    for pair in all_ids(partition):
        assert torch.equal(logits(family_model, batch, torch.full((4,), pair)), base), pair
    after = gradients(trained)
    assert len(trained) == (3 if family_of(family_model).gate else 2) * len(modules)
    for old, new in zip(before, after, strict=True):
        assert new.norm() > 1.5 * old.norm(), (float(old.norm()), float(new.norm()))
