"""Rank allocation: both allocations spend the target's bits, never more, and within 0.5% of them."""
import pytest
import torch

from nanoquant.fileformat import nq1
from nanoquant.convert.ranks import (LayerShape, error_curve, realized_bpw, sensitivity_ranks, spread_bounds,
                                     uniform_ranks)

SMOL_BLOCK = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
              "up": (1536, 576), "down": (576, 1536)}


def smol_layers(n_blocks=30, mid=False):
    return [LayerShape(f"{b}.{t}", o, i, mid) for b in range(n_blocks) for t, (o, i) in SMOL_BLOCK.items()]


@pytest.mark.parametrize("bpw", [0.55, 0.8, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("mid", [False, True])
def test_uniform_ranks_spend_the_budget(bpw, mid):
    layers = smol_layers(mid=mid)
    ranks = uniform_ranks(layers, bpw)
    assert all(r % nq1.RANK_MULTIPLE == 0 and r >= nq1.RANK_MULTIPLE for r in ranks.values())
    realized = realized_bpw(layers, ranks)
    assert 0.995 * bpw <= realized <= bpw, realized
    for layer in layers:  # the rule's rank, or a little more where its rounding left bits over
        rule = nq1.rank_for_bpw(layer.d_out, layer.d_in, bpw, n_scales=2 + mid)
        assert rule <= ranks[layer.name] <= rule + 64, (layer, ranks[layer.name], rule)


def test_two_bpw_is_no_longer_capped_at_full_rank():
    layers = smol_layers()
    ranks = uniform_ranks(layers, 2.0)
    assert realized_bpw(layers, ranks) >= 1.96
    assert ranks["0.gate"] > 576 and ranks["0.k"] > 192  # beyond min(d_out, d_in)


def test_rank_32_is_the_floor_of_both_allocations():
    layers = smol_layers(2)
    flat = {layer.name: error_curve(torch.ones(576)) for layer in layers}
    assert set(uniform_ranks(layers, 0.1).values()) == {32}
    assert set(sensitivity_ranks(layers, 0.1, flat).values()) == {32}


def test_sensitivity_ranks_follow_the_error_and_spend_the_budget():
    torch.manual_seed(0)
    layers = smol_layers(4)
    # block 0's layers matter 100x more (their weighted singular values are 10x larger), block 3's have a flat
    # spectrum (a rank buys little), the others a decaying one
    curves, spectra = {}, {}
    for layer in layers:
        block = int(layer.name.split(".")[0])
        n = min(layer.d_out, layer.d_in)
        decay = torch.ones(n) if block == 3 else torch.arange(1, n + 1, dtype=torch.float64) ** -0.7
        spectra[layer.name] = decay * (10.0 if block == 0 else 1.0)
        curves[layer.name] = error_curve(spectra[layer.name])
    for bpw in (0.55, 1.0, 2.0):
        ranks = sensitivity_ranks(layers, bpw, curves)
        realized = realized_bpw(layers, ranks)
        assert 0.995 * bpw <= realized <= bpw, (bpw, realized)
        assert ranks["0.q"] > ranks["1.q"] and ranks["0.gate"] > ranks["2.gate"]
        total = lambda rs: sum(curves[l.name](rs[l.name]) for l in layers)  # noqa: E731
        assert total(ranks) < total(uniform_ranks(layers, bpw))  # lower modelled error at the same bits


def test_error_curve_is_the_tail_energy_at_the_effective_rank():
    from nanoquant.convert.ranks import EFFECTIVE_RANK_SHARE
    sv = torch.tensor([4.0, 3.0, 2.0, 1.0])
    err = error_curve(sv)
    assert err(0) == pytest.approx(30.0)
    assert err(round(2 / EFFECTIVE_RANK_SHARE)) == pytest.approx(5.0)  # sigma_3^2 + sigma_4^2
    assert err(1000) == 0.0
    assert all(err(r) >= err(r + 32) for r in range(0, 200, 32))


def _steep_and_flat_curves(layers):
    """Block 0's layers matter 10^4 x more than the rest: unbounded, they take nearly all the bits."""
    return {layer.name: error_curve(torch.arange(1, min(layer.d_out, layer.d_in) + 1, dtype=torch.float64) ** -0.7
                                    * (100.0 if layer.name.startswith("0.") else 1.0)) for layer in layers}


@pytest.mark.parametrize("bpw", [0.55, 1.0, 2.0])
def test_the_spread_keeps_every_rank_near_its_uniform_rank_and_spends_the_budget(bpw):
    layers = smol_layers(6)
    curves = _steep_and_flat_curves(layers)
    uniform = uniform_ranks(layers, bpw)
    unbounded = sensitivity_ranks(layers, bpw, curves, spread=0)
    assert any(unbounded[n] < uniform[n] / 2 or unbounded[n] > 2 * uniform[n] for n in uniform)  # the test can fail
    ranks = sensitivity_ranks(layers, bpw, curves, spread=2)
    assert 0.995 * bpw <= realized_bpw(layers, ranks) <= bpw
    for name, rank in ranks.items():
        low, high = spread_bounds(uniform[name], 2)
        assert low <= rank <= high and low >= uniform[name] / 2 - 32 and high < 2 * uniform[name] + 32, (name, rank)
    assert ranks["0.q"] > uniform["0.q"] and ranks["3.gate"] < uniform["3.gate"]  # still moved by the error


def test_a_spread_below_one_is_refused():
    with pytest.raises(ValueError, match="rank spread 0.5"):
        sensitivity_ranks(smol_layers(1), 1.0, _steep_and_flat_curves(smol_layers(1)), spread=0.5)
