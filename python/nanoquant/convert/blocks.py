"""Stage 4, block reconstruction: per decoder block, dense tuning, Hessian-aware ADMM and STE tuning of the factors
against the full-precision block (and the output head's factors with --nq-head); the per-layer reports."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from nanoquant.convert.admm import LowRankBinary, factorize, relative_error
from nanoquant.convert.architectures import Architecture
from nanoquant.convert.calibration import shrink
from nanoquant.convert.checkpoint import WorkFolder
from nanoquant.convert.reconstruct import (BlockData, BlockLoss, FrozenLowRankBinary, TrainableLowRankBinary,
                                           TuneSettings, block_loss, run_block_batched, tune_block)
from nanoquant.convert.settings import ConvertSettings
from nanoquant.convert.source import Source
from nanoquant.convert.units import (HEAD, install_unit, member_names, unit_bias, unit_preconditioners, unit_shape,
                                     unit_weight)
from nanoquant.fileformat import nq1

LOG_WINDOWS = 4  # the tuning log reads each block's loss on this many fixed windows, the same before and after


def fixed_log_windows(n_windows: int) -> torch.Tensor:
    """The windows the log reads before and after a stage: spread evenly over the calibration set (text, then
    conversations), the same for every block and for distillation."""
    return torch.linspace(0, n_windows - 1, min(LOG_WINDOWS, n_windows)).round().long()


@dataclass
class LayerReport:
    name: str
    d_out: int
    d_in: int
    rank: int
    bpw: float
    rel_error: float
    weighted_error: float


MAX_STEP_GROWTH = 2.0


def rank_scaled_settings(settings: ConvertSettings, block: torch.nn.Module, arch: Architecture) -> ConvertSettings:
    """A preset's step counts are sized for `effort_bpw`; below it the ranks, and with them the cost of each ADMM
    iteration and STE step, are smaller, and those counts grow by the ratio of the per-token cost of one block's
    factorised layers, sum r (d_in + d_out), so that the conversion takes about the same time (at most
    MAX_STEP_GROWTH times as many: the rest of a step does not shrink with the rank). Above it they stay: more bits
    cost more time, never fewer steps (cutting them made the fast preset's 2.0-bpw file worse than its 1.0 one:
    SmolLM2, 40 chunks, 319.0 against 191.6 with ADMM 19 / STE 9 against 40 / 20)."""
    if settings.effort_bpw is None or not settings.rank_scaled:
        return settings
    shapes = [unit_shape(block, unit) for unit in arch.units(settings.shared_v)]
    cost = lambda bpw: sum(nq1.rank_for_bpw(o, i, bpw) * (o + i) for o, i in shapes)  # noqa: E731
    relative_cost = cost(settings.bpw) / cost(settings.effort_bpw)
    ratio = min(max(1.0 / relative_cost, 1.0), MAX_STEP_GROWTH)
    if ratio == 1.0:
        return settings
    scaled = lambda n: max(1, round(n * ratio)) if n > 0 else 0  # noqa: E731
    admm, tune = settings.admm, settings.tune
    if "admm.iterations" in settings.rank_scaled:
        admm = replace(admm, iterations=scaled(admm.iterations))
    if "tune.factor_steps" in settings.rank_scaled:
        tune = replace(tune, factor_steps=scaled(tune.factor_steps))
    print(f"effort: ranks at {settings.bpw} bpw cost {relative_cost:.2f}x those at {settings.effort_bpw}: ADMM "
          f"{admm.iterations} iterations, {tune.factor_steps} STE steps ({settings.distill.steps} distillation steps)")
    return replace(settings, admm=admm, tune=tune)


def _layer_report(name: str, original: torch.Tensor, layer: LowRankBinary, pre_in, pre_out) -> LayerReport:
    w0, approx = original.float(), layer.dense()
    weighted = relative_error(pre_out[:, None] * w0 * pre_in[None, :], pre_out[:, None] * approx * pre_in[None, :])
    d_out, d_in = w0.shape
    bits = nq1.LayerBits(d_out, d_in, layer.u.shape[1], has_s_mid=layer.s_mid is not None)
    return LayerReport(name, d_out, d_in, layer.u.shape[1], bits.bpw, relative_error(w0, approx), weighted)


def _tuning_groups(trainables: list[TrainableLowRankBinary], tune: TuneSettings) -> list[dict]:
    groups = []
    for t in trainables:
        # latent steps relative to each factor's mean |latent|, so one rate means the same for every layer
        groups.append({"params": [t.u_latent], "lr": tune.latent_lr * float(t.u_latent.detach().abs().mean())})
        groups.append({"params": [t.v_latent], "lr": tune.latent_lr * float(t.v_latent.detach().abs().mean())})
        scales = t.scale_offsets() + ([t.bias] if t.bias is not None else [])
        groups.append({"params": scales, "lr": tune.scale_lr})
    return groups


class BlockClock:
    """Seconds per stage of one block, for its log line."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.time()

    def lap(self, stage: str) -> None:
        now = time.time()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{stage} {s:.1f} s" for stage, s in self.seconds.items())


def quantize_block(model, index: int, source: Source, stats, ranks: dict[str, int], settings: ConvertSettings,
                   data: BlockData | None, progress) -> tuple[dict, list[LayerReport]]:
    """Factorise one decoder block (steps 1-3 of the method) and advance the activation streams past it.

    scope "layer" interleaves dense tuning, ADMM and STE tuning per linear in the method's order (the reference
    code); scope "block" tunes the dense block once, factorises all its linears, then tunes them together (the
    paper's Algorithm 1), which costs one seventh of the steps."""
    arch, tune, seed = source.arch, settings.tune, settings.seed
    gamma = arch.shrinkage if settings.shrinkage is None else settings.shrinkage
    block = model.model.layers[index]
    prefix = f"model.layers.{index}."
    units = arch.units(settings.shared_v)
    originals = {unit: unit_weight(block, unit).detach().clone() for unit in units}
    clock = BlockClock()
    if data is not None:
        data.index = index
        target = run_block_batched(copy.deepcopy(block), data.fp, data.kwargs)
        sensitivity = shrink(stats[prefix + arch.sensitivity_linear].output_moment, gamma)
        loss_fn = BlockLoss(sensitivity / sensitivity.mean(), relative=tune.loss == "relative")
        fixed = fixed_log_windows(data.fp.shape[0])
        loss = lambda: block_loss(block, data, target, loss_fn, fixed)  # noqa: E731
        clock.lap("targets")
    groups = [[unit] for unit in units] if tune.scope == "layer" else [list(units)]
    finished: dict[str, tuple[LowRankBinary, torch.Tensor | None]] = {}
    for g, group in enumerate(groups):
        if data is not None and tune.dense_steps > 0:  # step 1: the still-dense layers absorb upstream error
            remaining = [block.get_submodule(member).weight for later in groups[g:] for unit in later
                         for member in member_names(unit)]
            for w in remaining:
                w.requires_grad_(True)
            tune_block(block, [{"params": remaining, "lr": tune.dense_lr}], data, target, loss_fn,
                       tune.dense_steps, seed, tune.batch_windows, settings.matmul)
            for w in remaining:
                w.requires_grad_(False)
            clock.lap("dense tuning")
        layers = {}
        for unit in group:  # step 2: LB-ADMM on the (tuned) dense weight
            weight = unit_weight(block, unit).detach().float()
            pre_in, pre_out = unit_preconditioners(stats, prefix + unit, gamma, weight)
            layers[unit] = factorize(weight, ranks[prefix + unit], pre_in, pre_out, settings.admm,
                                     mid_scale=settings.mid_scale, seed=seed, matmul=settings.matmul)
        clock.lap("ADMM")
        biases = {unit: unit_bias(block, unit) for unit in group}
        if data is not None and tune.factor_steps > 0:  # step 3: STE tuning of the new factors' signs and scales
            trainables = {unit: TrainableLowRankBinary(layers[unit], biases[unit]) for unit in group}
            for unit, t in trainables.items():
                install_unit(block, unit, t)
            after_admm = loss()
            clock.lap("ADMM")
            tune_block(block, _tuning_groups(list(trainables.values()), tune), data, target, loss_fn,
                       tune.factor_steps, seed, tune.batch_windows, settings.matmul)
            clock.lap("STE tuning")
            label = group[0] if len(group) == 1 else "all linears"
            tqdm.write(f"block {index} ({label}): block loss on {len(fixed)} fixed windows after ADMM "
                       f"{after_admm:.4g}, after STE tuning {loss():.4g}")
            for unit, t in trainables.items():
                layers[unit] = t.finalize()
                biases[unit] = None if t.bias is None else t.bias.detach().clone()
        for unit in group:
            install_unit(block, unit, FrozenLowRankBinary(layers[unit], biases[unit]))
            finished[prefix + unit] = (layers[unit], biases[unit])
            progress.update(1)
    if data is not None:
        data.fp = target
        data.quantized = run_block_batched(block, data.quantized, data.kwargs)
        clock.lap("streams")
    tqdm.write(f"block {index}: {clock}")
    reports = [_layer_report(prefix + unit, originals[unit], finished[prefix + unit][0],
                             *unit_preconditioners(stats, prefix + unit, gamma, originals[unit]))
               for unit in units]
    return finished, reports


def quantize_head(model, stats, rank: int, arch: Architecture, settings: ConvertSettings,
                  work: WorkFolder) -> tuple[LowRankBinary, LayerReport]:
    """The output head's factors by the same Hessian-aware ADMM (D_in: the mean square of its inputs, D_out: of the
    loss gradient at the logits), checkpointed in the work folder."""
    gamma = arch.shrinkage if settings.shrinkage is None else settings.shrinkage
    weight = unit_weight(model, HEAD).detach().float()
    pre_in, pre_out = unit_preconditioners(stats, HEAD, gamma, weight)
    layer = factorize(weight, rank, pre_in, pre_out, settings.admm, mid_scale=settings.mid_scale, seed=settings.seed,
                      matmul=settings.matmul)
    report = _layer_report(HEAD, weight, layer, pre_in, pre_out)
    work.save_head(layer, report)
    return layer, report
