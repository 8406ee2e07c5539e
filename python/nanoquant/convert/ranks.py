"""Rank allocation: how the bits of the target bpw are shared among a model's NanoQuant layers.

Both allocations spend one budget, bpw x (weights of all factorised layers), counted as the file stores them (signs,
F32 scales), so the realized bpw is never above the target and, for any model of more than a few layers, within a
fraction of a percent below it. The one exception is the floor: every layer has rank 32 at least, which in tiny
layers (tests' 96 x 224 models) takes more than a low target.

- uniform: every layer gets the method's rank rule for its shape (nq1.rank_for_bpw); the bits its rounding to a
  multiple of 32 leaves over go, 32 ranks at a time, to the layers furthest below the target.
- sensitivity: the ranks go where they lower the model's loss most. A layer's cost to the loss is its error in the
  norm of its Fisher diagonal, ||D_out (W - W_hat) D_in||^2 with the converter's statistics (E[(dL/dy)^2] and E[x^2]),
  so errors of different layers are in one unit; how that error falls with the rank is read off the singular values
  of D_out W D_in: a binary factorisation of rank r is scored as the best real one of rank EFFECTIVE_RANK_SHARE x r.
  Ranks start at 32 and grow greedily by the largest drop of error per bit (the tails are convex, so greedy is exact
  for the model). The model is first order, so each layer's rank stays within a factor (the spread) of its uniform
  rank: left unbounded on SmolLM2 at 0.55 bpw it gave 11 v_proj (192 x 576) rank 480, where it promised zero error
  (0.4 x 480 >= 192) and the tuned layers kept 0.26-0.34 of it, while 34 of the 90 MLP layers sat at rank 32
  (relative error 0.97) and 22 at 64; that file lost to uniform ranks (150-chunk PPL 310.9 against 281.0), where at
  1.0 bpw it had won.
"""
from __future__ import annotations

import heapq
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch
from tqdm import tqdm

if TYPE_CHECKING:  # the settings module reads this one's names
    from nanoquant.convert.settings import ConvertSettings
    from nanoquant.convert.source import Source

from nanoquant.convert.units import HEAD, unit_preconditioners, unit_shape, unit_weight
from nanoquant.fileformat import nq1

UNIFORM, SENSITIVITY = "uniform", "sensitivity"
ALLOCATIONS = (UNIFORM, SENSITIVITY)
# a rank-r sign factorisation with row and column scales fits a matrix about as well as the best real rank-k one for
# k = share x r. Measured on SmolLM2 (blocks 0 and 15, q/k/gate/down, r 64-384, ADMM 30 iterations): 0.17-0.28 for
# the fast-decaying spectra of block 0's q and k, 0.35-0.53 for the rest; one share for all layers is the model's
# simplification, 0.4 the middle of what was measured
EFFECTIVE_RANK_SHARE = 0.4
MAX_BPW = 16.0  # no layer is given more bits per weight than this


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_out: int
    d_in: int
    has_s_mid: bool = False

    def bits(self, rank: int) -> int:
        return nq1.LayerBits(self.d_out, self.d_in, rank, has_s_mid=self.has_s_mid).bits

    @property
    def bits_per_step(self) -> int:
        """What 32 more ranks cost: their signs in U and V, and their s_mid entries."""
        return self.bits(2 * nq1.RANK_MULTIPLE) - self.bits(nq1.RANK_MULTIPLE)

    @property
    def max_rank(self) -> int:
        return max(nq1.RANK_MULTIPLE, int(MAX_BPW * self.d_out * self.d_in / (self.d_out + self.d_in))
                   // nq1.RANK_MULTIPLE * nq1.RANK_MULTIPLE)


def budget_bits(layers: list[LayerShape], bpw: float) -> int:
    return int(bpw * sum(layer.d_out * layer.d_in for layer in layers))


def realized_bpw(layers: list[LayerShape], ranks: dict[str, int]) -> float:
    return sum(layer.bits(ranks[layer.name]) for layer in layers) / sum(layer.d_out * layer.d_in for layer in layers)


def _fill(layers: list[LayerShape], ranks: dict[str, int], bpw: float, priority) -> dict[str, int]:
    """Adds 32 ranks at a time to the layer that comes first by priority(layer, rank) (lowest first; None: no more
    for this layer) while the budget has room; returns the ranks."""
    left = budget_bits(layers, bpw) - sum(layer.bits(ranks[layer.name]) for layer in layers)

    def entry(i: int):
        key = priority(layers[i], ranks[layers[i].name])
        return None if key is None else (key, i)

    queue = [e for e in map(entry, range(len(layers))) if e is not None]
    heapq.heapify(queue)
    while queue:
        _, i = heapq.heappop(queue)
        layer = layers[i]
        if layer.bits_per_step > left or ranks[layer.name] + nq1.RANK_MULTIPLE > layer.max_rank:
            continue  # a layer that no longer fits leaves the queue; smaller ones may still fit
        ranks[layer.name] += nq1.RANK_MULTIPLE
        left -= layer.bits_per_step
        e = entry(i)
        if e is not None:
            heapq.heappush(queue, e)
    return ranks


def _lowest_bpw_first(layer: LayerShape, rank: int) -> float:
    return layer.bits(rank) / (layer.d_out * layer.d_in)


def uniform_ranks(layers: list[LayerShape], bpw: float) -> dict[str, int]:
    ranks = {layer.name: min(nq1.rank_for_bpw(layer.d_out, layer.d_in, bpw, n_scales=2 + layer.has_s_mid),
                             layer.max_rank) for layer in layers}
    return _fill(layers, ranks, bpw, _lowest_bpw_first)


def error_curve(singular_values: torch.Tensor):
    """err(r): the squared error left by the best real approximation of rank EFFECTIVE_RANK_SHARE x r (linear
    between whole ranks), in the units of the singular values."""
    energy = singular_values.double().pow(2).flip(0).cumsum(0).flip(0)  # energy[k] = sum of sigma_i^2, i >= k
    tail = torch.cat([energy, energy.new_zeros(1)])

    def err(rank: int) -> float:
        k = EFFECTIVE_RANK_SHARE * rank
        lo = min(int(k), len(tail) - 1)
        hi = min(lo + 1, len(tail) - 1)
        return float(tail[lo] + (k - lo) * (tail[hi] - tail[lo]))
    return err


SPREAD_EXPECTED = "expected 0 (unbounded) or a factor >= 1"


def valid_spread(spread: float) -> bool:
    return spread == 0 or spread >= 1


def spread_bounds(uniform_rank: int, spread: float) -> tuple[int, int]:
    """The ranks a layer may take: within a factor `spread` of its uniform rank, in steps of 32 (0: any)."""
    if not valid_spread(spread):
        raise ValueError(f"rank spread {spread}: {SPREAD_EXPECTED}")
    if spread == 0:
        return nq1.RANK_MULTIPLE, 1 << 30
    step = nq1.RANK_MULTIPLE
    return max(step, int(uniform_rank / spread) // step * step), -(-int(uniform_rank * spread) // step) * step


def sensitivity_ranks(layers: list[LayerShape], bpw: float, curves: dict, spread: float = 0) -> dict[str, int]:
    """Greedy from the lowest rank each layer may take: the next 32 ranks to the layer whose error
    (curves[name](rank)) falls most per bit, within spread_bounds of its uniform rank; bits left over (every error at
    zero, or every layer at its upper bound) are shared as the uniform allocation does."""
    uniform = uniform_ranks(layers, bpw)
    bounds = {layer.name: spread_bounds(uniform[layer.name], spread) for layer in layers}

    def largest_gain_first(layer: LayerShape, rank: int) -> float | None:
        if rank + nq1.RANK_MULTIPLE > bounds[layer.name][1]:
            return None
        gain = curves[layer.name](rank) - curves[layer.name](rank + nq1.RANK_MULTIPLE)
        return -gain / layer.bits_per_step if gain > 0 else None

    ranks = _fill(layers, {name: low for name, (low, _) in bounds.items()}, bpw, largest_gain_first)
    return _fill(layers, ranks, bpw, _lowest_bpw_first)


def allocate_ranks(model, source: Source, stats, names: list[str], settings: ConvertSettings) -> dict[str, int]:
    """Every layer's rank at the target's total bits (ranks.py). The sensitivity allocation reads the singular values
    of each layer's weight in its Fisher-diagonal norm, one block's weights in memory at a time."""
    layers = [LayerShape(name, *unit_shape(model, name), has_s_mid=settings.mid_scale) for name in names]
    if settings.rank_allocation == UNIFORM:
        ranks = uniform_ranks(layers, settings.bpw)
    else:
        gamma = source.arch.shrinkage if settings.shrinkage is None else settings.shrinkage
        curves = {}
        for i in tqdm(range(len(model.model.layers)), desc="rank allocation", unit="block"):
            source.blocks.load(model, i)
            for name in (n for n in names if n.startswith(f"model.layers.{i}.")):
                weight = unit_weight(model, name).detach().float()
                pre_in, pre_out = unit_preconditioners(stats, name, gamma, weight)
                weighted = pre_out[:, None] * weight * pre_in[None, :]
                curves[name] = error_curve(torch.linalg.svdvals(weighted).cpu())
            source.blocks.release(model, i)
        if HEAD in names:  # the head is outside the blocks, always in memory
            weight = unit_weight(model, HEAD).detach().float()
            pre_in, pre_out = unit_preconditioners(stats, HEAD, gamma, weight)
            curves[HEAD] = error_curve(
                torch.linalg.svdvals(pre_out[:, None] * weight * pre_in[None, :]).cpu())
        ranks = sensitivity_ranks(layers, settings.bpw, curves, settings.rank_spread)
    by_type: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        by_type.setdefault(name.split(".", 3)[-1], []).append(rank)
    spread = ", ".join(f"{t.split('.')[-1]} {min(r)}-{max(r)}" for t, r in by_type.items())
    realized = realized_bpw(layers, ranks)
    floor = " (rank 32, the floor, in every layer)" if realized > settings.bpw else ""
    print(f"rank allocation ({settings.rank_allocation}): {realized:.4f} bpw of {settings.bpw} target{floor}; "
          f"ranks {spread}")
    return ranks
