"""Eq. 5 partition and the CAR ratios / scale tables (eqs. 6–9)."""

from __future__ import annotations

import math

import pytest
import torch

from landermt.partition import GENERAL, build_partition, car_ratio, partition_layer

LANGS = ("en", "de", "fr", "it", "ar", "zh")


@pytest.mark.parametrize("p,epsilon", [(2048, 0.9), (64, 0.5), (100, 0.33), (7, 0.0), (7, 1.0)])
def test_exactly_floor_epsilon_p_general_neurons(p, epsilon):
    phi = torch.rand(len(LANGS), p, generator=torch.Generator().manual_seed(p))
    part = partition_layer(phi, epsilon)
    assert int(part.general.sum()) == math.floor(epsilon * p)
    specific = part.specific[~part.general]
    assert torch.equal(specific, phi[:, ~part.general].argmax(dim=0))  # highest-scoring language
    # one language per neuron: the specific sets are disjoint and, with G, cover every neuron
    sets = [set(torch.nonzero(part.specific == lang).flatten().tolist()) for lang in range(len(LANGS))]
    assert sum(len(s) for s in sets) + int(part.general.sum()) == p
    assert all(sets[a].isdisjoint(sets[b]) for a in range(len(sets)) for b in range(a + 1, len(sets)))


def test_general_neurons_have_the_lowest_variance():
    phi = torch.rand(len(LANGS), 500, generator=torch.Generator().manual_seed(1))
    part = partition_layer(phi, 0.8)
    variance = phi.var(dim=0, unbiased=False)
    assert variance[part.general].max() <= variance[~part.general].min()


def test_car_ratio_eqs_6_7_by_hand():
    phi = torch.tensor([[1.0, 1.0, 4.0, 0.0], [1.0, 1.0, 0.0, 2.0], [1.0, 1.0, 3.0, 9.0]])
    part = partition_layer(phi, 0.5)  # neurons 0, 1 have zero variance -> general
    assert part.specific.tolist() == [GENERAL, GENERAL, 0, 2]
    # pair (0, 1): specific = {2}; ΣΦ(S) = 4 + 0; ΣΦ(G) = (1 + 1) + (1 + 1)
    assert car_ratio(part, 0, 1) == pytest.approx(4 / 8)
    # pair (1, 2): specific = {3}; ΣΦ(S) = 2 + 9; ΣΦ(G) = 4
    assert car_ratio(part, 1, 2) == pytest.approx(11 / 15)


def test_pairs_are_all_language_combinations_in_either_direction():
    phi = {3: torch.rand(len(LANGS), 32), 5: torch.rand(len(LANGS), 32)}
    partition = build_partition(phi, LANGS, 0.5, "paper")
    assert len(partition.pairs) == 15
    assert partition.pair_id("de", "fr") == partition.pair_id("fr", "de") > 0  # never trained together
    ids = {partition.pair_id(a, b) for a in LANGS for b in LANGS if a != b}
    assert ids == set(range(1, 16))
    with pytest.raises(KeyError, match="unsupported language 'xx'"):
        partition.pair_id("en", "xx")
    with pytest.raises(ValueError, match="both 'en'"):
        partition.pair_id("en", "en")
    with pytest.raises(ValueError, match="car must be one of"):
        build_partition(phi, LANGS, 0.5, "sideways")


def test_scale_table_rows_follow_eqs_8_9():
    phi = {0: torch.rand(len(LANGS), 40, generator=torch.Generator().manual_seed(3))}
    partition = build_partition(phi, LANGS, 0.5, "paper")
    table = partition.scale_tables()[0]
    assert table.shape == (16, 40)
    assert torch.all(table[0] == 1)
    part = partition.layers[0]
    row = table[partition.pair_id("de", "zh")]
    c = partition.car_ratios()["de-zh"][0]
    de, zh = LANGS.index("de"), LANGS.index("zh")
    assert torch.allclose(row[part.general], torch.tensor(c))
    own = (part.specific == de) | (part.specific == zh)
    assert torch.allclose(row[own], torch.tensor(1 - c))
    assert torch.all(row[~(part.general | own)] == 0)
