"""A factorised layer of a model is a unit: one linear, or a shared-input unit (architectures.SharedInputUnit) whose
members' weights are stacked by rows. These helpers read and replace units in a torch model by full name
('model.layers.3.self_attn.qkv_proj'), so the converter and the reference forward treat both kinds alike."""
from __future__ import annotations

import torch

from nanoquant.convert.architectures import unit_members

HEAD = "lm_head"  # the output head, by its Hugging Face name: a unit of its own with --nq-head


class RowSlice(torch.nn.Module):
    """A member of a shared-input unit: rows [start, stop) of the unit's output. The unit module is shared by all
    members (torch's modules() and parameters() list it once), so its scales stay one set through distillation."""

    def __init__(self, unit: torch.nn.Module, start: int, stop: int):
        super().__init__()
        self.unit, self.start, self.stop = unit, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x)[..., self.start:self.stop]


def member_names(name: str) -> tuple[str, ...]:
    """The members' names in the form of `name`: full ('model.layers.3.self_attn.q_proj', ...) or inside a block
    ('self_attn.q_proj', ...)."""
    parent, marker, rest = name.rpartition(".layers.")
    block, _, unit = rest.partition(".") if marker else ("", "", name)
    prefix = f"{parent}.layers.{block}." if marker else ""
    return tuple(prefix + member for member in unit_members(unit))


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def unit_rows(root: torch.nn.Module, name: str) -> list[int]:
    """Output rows of each member, in order (whether the members are still dense or already slices)."""
    return [_output_rows(root.get_submodule(m)) for m in member_names(name)]


def _output_rows(module: torch.nn.Module) -> int:
    if isinstance(module, RowSlice):
        return module.stop - module.start
    # a dense linear, or a factorised layer (frozen or reference: u; in STE tuning: u_latent)
    for attribute in ("weight", "u", "u_latent"):
        if hasattr(module, attribute):
            return getattr(module, attribute).shape[0]
    raise TypeError(f"{type(module).__name__}: not a linear layer")


def unit_weight(root: torch.nn.Module, name: str) -> torch.Tensor:
    """The unit's dense weight: its members' weights stacked by rows."""
    return torch.cat([root.get_submodule(m).weight for m in member_names(name)])


def unit_bias(root: torch.nn.Module, name: str) -> torch.Tensor | None:
    biases = [root.get_submodule(m).bias for m in member_names(name)]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        raise ValueError(f"{name}: some members have a bias and some not; they cannot share one layer")
    return torch.cat(biases)


def install_unit(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Puts module in the place of the unit: itself for a single linear, a RowSlice of it for each member."""
    members = member_names(name)
    if len(members) == 1:
        _set_submodule(root, members[0], module)
        return
    start = 0
    for member, n in zip(members, unit_rows(root, name)):
        _set_submodule(root, member, RowSlice(module, start, start + n))
        start += n


def unit_module(root: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module installed for the unit (for a shared-input unit, the one its members' RowSlices share)."""
    first = root.get_submodule(member_names(name)[0])
    return first.unit if isinstance(first, RowSlice) else first


def unit_shape(root: torch.nn.Module, name: str) -> tuple[int, int]:
    """(d_out, d_in) of the unit, from its members' weights (which may still be shapes without data)."""
    weights = [root.get_submodule(m).weight for m in member_names(name)]
    return sum(w.shape[0] for w in weights), weights[0].shape[1]


def unit_preconditioners(stats: dict, name: str, gamma: float,
                         weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_in, D_out) of the unit whose dense weight is `weight`. Members share their input, so D_in is the first
    member's. Each member's D_out is its own output-gradient statistics, rescaled so that the member's weighted
    weight ||D_out W D_in||^2 is its share of the unit's weights: every member's relative error then counts by its
    size, as separate layers' bits do, and the gradient scales of q, k and v (which differ by orders of magnitude
    in a random model) do not decide which member the shared factors serve."""
    pairs = [stats[m].preconditioners(gamma) for m in member_names(name)]
    pre_in = pairs[0][0]
    if len(pairs) == 1:
        return pre_in, pairs[0][1]
    scaled, start = [], 0
    for _, pre_out in pairs:
        rows = weight[start:start + pre_out.shape[0]].float()
        start += pre_out.shape[0]
        norm = torch.linalg.norm(pre_out[:, None] * rows * pre_in[None, :]).clamp_min(1e-30)
        scaled.append(pre_out * (rows.numel() ** 0.5 / norm))
    return pre_in, torch.cat(scaled)
