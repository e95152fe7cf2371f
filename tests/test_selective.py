"""Selective finetuning freezes what it promises, bit for bit, under AdamW with weight decay."""

from __future__ import annotations

import pytest
import torch

from landermt.partition import build_partition
from landermt.prompts import translation_example
from tests.conftest import PARALLEL, tiny_model
from training.config import ALIGNED_PARTS, MethodConfig, TrainConfig
from training.finetune import Batch, Trainer, lr_at, mean_target_loss, rows_of_batch
from training.methods import prepare
from training.optim import NeuronAdamW

LANGS = ("en", "de", "fr", "zh")


def partition_for(model, epsilon=0.5):
    p = model.config.intermediate_size if hasattr(model.config, "intermediate_size") else None
    gen = torch.Generator().manual_seed(0)
    return build_partition({1: torch.rand(4, p or 128, generator=gen), 2: torch.rand(4, p or 128, generator=gen)},
                           LANGS, epsilon, "paper")


def batch_for(tokenizer, partition, direction, routed=True):
    src, tgt = direction
    lang = tgt if src == "en" else src
    rows = [(en, xx) if src == "en" else (xx, en) for en, xx in PARALLEL[lang][:3]]
    from landermt.prompts import DEFAULT_TEMPLATE, collate

    examples = [translation_example(tokenizer, DEFAULT_TEMPLATE, src, tgt, s, t, 160) for s, t in rows]
    ids = torch.full((len(rows),), partition.pair_id(src, tgt)) if routed else None
    return Batch(collate(examples, tokenizer.pad_token_id), ids)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("routing", ["delta", "mask"])
@pytest.mark.parametrize("method", ["landermt", "ls", "lg"])
def test_untouched_neurons_and_all_other_parameters_stay_bit_for_bit(tokenizer, method, routing):
    model = tiny_model("gemma", len(tokenizer))
    partition = partition_for(model)
    prepared = prepare(model, MethodConfig(name=method, routing=routing), partition)
    optimizer = NeuronAdamW([(p, axis) for _, p, axis in prepared.trainable], lr=1e-2, weight_decay=0.1)
    trainable = {id(p) for _, p, _ in prepared.trainable}

    def step(direction):
        loss = mean_target_loss(model, batch_for(tokenizer, partition, direction))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before_all = snapshot(model)
    step(("fr", "zh"))  # gives fr- and zh-specific neurons momentum
    after_fr_zh = snapshot(model)
    step(("en", "de"))
    step(("de", "en"))
    after = snapshot(model)
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(after[name], before_all[name]), name
    for name, p, axis in prepared.trainable:
        layer = partition.layers[int(name.split(".")[1])]
        fr, zh = LANGS.index("fr"), LANGS.index("zh")
        other = (layer.specific == fr) | (layer.specific == zh)
        frozen_now = other  # en-de steps never touch fr/zh-specific neurons
        if method == "ls":
            frozen_now = frozen_now | layer.general  # ls never trains general neurons
        if method == "lg":
            frozen_now = ~layer.general  # lg trains general neurons only
        key = next(n for n, q in model.named_parameters() if q is p)
        old, new = after_fr_zh[key].movedim(axis, 0), after[key].movedim(axis, 0)
        assert torch.equal(new[frozen_now], old[frozen_now]), name
        assert not torch.equal(new[~frozen_now], old[~frozen_now]), name  # the rest did train


def test_plain_adamw_would_move_frozen_neurons(tokenizer):
    """The property above is not free: torch's AdamW moves zero-gradient neurons (momentum, decay)."""
    model = tiny_model("gemma", len(tokenizer))
    partition = partition_for(model)
    prepared = prepare(model, MethodConfig(name="landermt"), partition)
    optimizer = torch.optim.AdamW([p for _, p, _ in prepared.trainable], lr=1e-2, weight_decay=0.1)
    for direction in (("fr", "zh"), ("en", "de")):
        mean_target_loss(model, batch_for(tokenizer, partition, direction)).backward()
        if direction == ("en", "de"):
            before = snapshot(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    name, p, axis = prepared.trainable[0]
    layer = partition.layers[int(name.split(".")[1])]
    fr_zh = (layer.specific == LANGS.index("fr")) | (layer.specific == LANGS.index("zh"))
    key = next(n for n, q in model.named_parameters() if q is p)
    assert not torch.equal(p.detach().movedim(axis, 0)[fr_zh], before[key].movedim(axis, 0)[fr_zh])


def test_optimizer_state_exists_only_for_trainable_parameters(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    partition = partition_for(model)
    prepared = prepare(model, MethodConfig(name="landermt"), partition)
    n_trainable = sum(p.numel() for _, p, _ in prepared.trainable)
    assert n_trainable < sum(p.numel() for p in model.parameters()) / 5
    assert sorted({n.split(".")[1] for n, _, _ in prepared.trainable}) == ["1", "2"]
    assert all(p.requires_grad == any(p is q for _, q, _ in prepared.trainable) for p in model.parameters())


def test_batch_order_and_schedule_are_functions_of_seed_and_step():
    lengths = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1]
    assert rows_of_batch(lengths, 4, 0, 3) == rows_of_batch(lengths, 4, 0, 3)
    for bucket in (1, 3):
        epoch = [r for b in range(5) for r in rows_of_batch(lengths, 2, 1, b, bucket)]
        assert sorted(epoch) == list(range(10))  # one epoch visits every example once
    first, second = ([rows_of_batch(lengths, 2, 1, b) for b in epoch] for epoch in (range(5), range(5, 10)))
    assert first != second  # each epoch has its own order
    config = TrainConfig(lr=1.0, steps=100, warmup_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.5) and lr_at(99, config) == pytest.approx(1 / 90)
    # a round begun at step 50 (train.rewarm_rounds) warms up again to the decayed schedule
    assert lr_at(50, config, 50) == pytest.approx(0.1 * 50 / 90) and lr_at(59, config, 50) == pytest.approx(41 / 90)
    assert lr_at(60, config, 50) == lr_at(60, config)


@pytest.mark.parametrize("method", [{}, {"update_rank": 2, "update_factor": "gradient"},
                                    {"update_rank": 2, "update_factor": "gradient", "factor_rounds": 3}],
                         ids=["dense", "gradient-factors", "3-rounds"])
def test_trainer_checkpoint_round_trip_continues_identically(tokenizer, tmp_path, method):
    """Killed after step 5, resumed from the step-4 checkpoint: the same weights as a straight run. With gradient
    factors the resumed run does not align again: its factors (noise until aligned) come from the checkpoint. In
    3 rounds the factors are re-aligned before steps 3 and 5 (after the step-4 checkpoint: the resumed run does it
    again, identically), and the best weights come with the factors and earlier rounds they were trained on."""
    def make(output, fresh=True):
        model = tiny_model("gemma", len(tokenizer))
        partition = partition_for(model)
        prepared = prepare(model, MethodConfig(name="landermt", **method), partition)
        from landermt.prompts import DEFAULT_TEMPLATE

        examples = [((s, t), translation_example(tokenizer, DEFAULT_TEMPLATE, s, t, a, b, 64))
                    for lang in ("de", "fr", "zh") for s, t in (("en", lang), (lang, "en"))
                    for a, b in PARALLEL[lang][:3]]
        rounds = "factor_rounds" in method  # then with train.rewarm_rounds, and a warmup (3 steps) to see it
        config = TrainConfig(lr=1e-3, steps=6, batch_size=4, eval_every=2, checkpoint_every=2,
                             warmup_ratio=0.5 if rounds else 0.05, rewarm_rounds=rounds)
        trainer = Trainer(prepared, examples, examples[:4], lambda st: partition.pair_id(*st),
                          tokenizer.pad_token_id, config, output)
        if fresh and prepared.fixed:
            trainer.align_factors(2, ALIGNED_PARTS[method["update_factor"]])
        return trainer, model

    straight, _ = make(tmp_path / "a")
    log = []
    want = straight.train(log.append)
    assert [entry["step"] for entry in log if "realigned_s" in entry] == ([3, 5] if "factor_rounds" in method else [])
    if "factor_rounds" in method:  # train.rewarm_rounds: each round's first step is a warmup step again
        c = straight.config
        assert [entry["lr"] for entry in log if "realigned_s" in entry] == [lr_at(2, c) / 3, lr_at(4, c) / 3]
    assert set(straight.prepared.fixed) <= set(want)
    if "factor_rounds" in method:
        earlier = [want[name] for name in straight.prepared.fixed if name.endswith(".earlier")]
        assert earlier and all(t.abs().sum() > 0 for t in earlier)
    first, _ = make(tmp_path / "b")

    class Killed(Exception):
        pass

    def kill_at_step_5(entry):
        if entry["step"] == 5:
            raise Killed  # after step 5's update, before its checkpoint: the step-4 one is on disk

    with pytest.raises(Killed):
        first.train(kill_at_step_5)
    resumed, _ = make(tmp_path / "b", fresh=False)
    assert resumed.load_checkpoint() and resumed.step == 4
    got = resumed.train(lambda entry: None)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_length_buckets_cut_padding_and_keep_batches_full_and_random():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 160, (1000,), generator=generator).tolist()

    def padding(bucket: int) -> float:
        batches = [rows_of_batch(lengths, 8, 0, b, bucket) for b in range(125)]
        assert all(len(rows) == 8 for rows in batches)
        return sum(1 - sum(lengths[r] for r in rows) / (8 * max(lengths[r] for r in rows)) for rows in batches) / 125

    assert padding(64) < padding(1) / 4
    bucketed = [rows_of_batch(lengths, 8, 0, b, 64) for b in range(125)]
    assert sorted(r for rows in bucketed for r in rows) == list(range(1000))
    longest = [max(lengths[r] for r in rows) for rows in bucketed[:64]]
    assert longest != sorted(longest)  # batches of one chunk come in random order, not by length


def test_lora_targets_choose_the_adapted_modules(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    prepared = prepare(model, MethodConfig(name="lora", lora_targets=["gate_proj", "up_proj", "down_proj"]), None)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _, _ in prepared.trainable}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="none of \\['query'\\] is a module"):
        prepare(tiny_model("llama", len(tokenizer)), MethodConfig(name="lora", lora_targets=["query"]), None)
