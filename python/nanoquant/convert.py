"""Hugging Face model (folder or GGUF) -> NanoQuant GGUF: the method's pipeline. The command line is
convert/convert-hf-to-nq-gguf.py; the settings, presets and options are in settings.py.

Calibration windows (raw text and, for a chat model, conversations the teacher answers), statistics, then per
decoder block in the method's layer order: dense tuning, Hessian-aware ADMM, STE tuning; then scale distillation
against the teacher's logits, and the GGUF.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from . import formats, preflight
from . import ranks as ranks_module
from .admm import LowRankBinary, factorize, relative_error
from .architectures import (GGUF_MODEL_TYPES, Architecture, UnsupportedArchitecture, architecture_for,
                            check_llama_cpp_agrees, gguf_base_name, gguf_row_permutation)
from .calibration import (DEFAULT_CHAT_INSTRUCTIONS, CalibrationError, StatsCollector, chat_windows,
                          read_conversations, read_instructions, shrink, teacher_conversations, text_windows,
                          window_bos)
from .checkpoint import CheckpointError, WorkFolder, as_jsonable, file_identity
from .gguf_writer import NQLayerTensors, TensorTypes, write_nq_gguf
from .memory import StagePeaks, return_freed_memory_to_the_system
from .reconstruct import (RECOMPUTE_ABOVE_BYTES, BlockData, BlockLoss, DistillSettings, FrozenLowRankBinary,
                          TrainableLowRankBinary, TuneSettings, block_loss, capture_block_inputs, distill_scales,
                          run_block_batched, saved_activation_bytes, tune_block)
from .settings import (CHAT_AUTO, CHAT_NONE, DEFAULT_PRESET, DEVICE_AUTO, PRESETS, WRITE_ONLY, ConvertSettings,
                       add_options, resolved, settings_from_args, torch_device)
from .streaming import GGUFBlocks, SafetensorsBlocks, open_gguf_skeleton, open_skeleton, place_skeleton
from .units import (HEAD, install_unit, member_names, unit_bias, unit_module, unit_preconditioners, unit_rows,
                    unit_shape, unit_weight)

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_DIR = Path(os.environ.get("NANOQUANT_LLAMA_CPP", REPO_ROOT / "vendor" / "llama.cpp"))
LLAMA_QUANTIZE = REPO_ROOT / "build" / "bin" / "llama-quantize"
LOG_WINDOWS = 4  # the tuning log reads each block's loss on this many fixed windows, the same before and after


def fixed_log_windows(n_windows: int) -> torch.Tensor:
    """The windows the log reads before and after a stage: spread evenly over the calibration set (text, then
    conversations), the same for every block and for distillation."""
    return torch.linspace(0, n_windows - 1, min(LOG_WINDOWS, n_windows)).round().long()


class ConversionError(RuntimeError):
    pass


@dataclass
class LayerReport:
    name: str
    d_out: int
    d_in: int
    rank: int
    bpw: float
    rel_error: float
    weighted_error: float


@dataclass
class Source:
    model: torch.nn.Module
    tokenizer: object
    config: object
    arch: Architecture
    base_gguf: Path
    path: Path
    blocks: SafetensorsBlocks | GGUFBlocks


def _model_type(model_path: Path) -> str:
    if model_path.is_dir():
        config_path = model_path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{model_path}: not a Hugging Face model folder (no config.json)")
        config = json.loads(config_path.read_text())
        model_type = config.get("model_type")
        if model_type is None:
            raise ConversionError(f"{config_path}: has no model_type")
        try:
            check_llama_cpp_agrees(model_type, config)
        except UnsupportedArchitecture as e:
            raise ConversionError(f"{config_path}: {e}") from None
        return model_type
    if model_path.is_file():
        try:
            reader = gguf.GGUFReader(model_path)
            gguf_arch = reader.fields["general.architecture"].contents()
        except Exception as e:
            raise ConversionError(f"{model_path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        return GGUF_MODEL_TYPES.get(gguf_arch, gguf_arch)
    raise ConversionError(f"{model_path}: no such file or folder")


def _base_gguf_from_hf(model_path: Path, work_dir: Path) -> Path:
    """llama.cpp's own converter gives the metadata, tokenizer, embeddings and norms exactly as llama.cpp wants them."""
    script = LLAMA_CPP_DIR / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ConversionError(f"{script} not found: run `make setup` (or set NANOQUANT_LLAMA_CPP)")
    out = work_dir / "base-f32.gguf"
    cmd = [sys.executable, str(script), str(model_path), "--outtype", "f32", "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConversionError(f"{model_path}: llama.cpp's convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
    return out


def load_source(model_path: Path, work_dir: Path, arch: Architecture, device: torch.device) -> Source:
    """Blocks stream from a HF folder's safetensors or from a GGUF (dequantised one block at a time; the GGUF's
    dequantisation is the teacher, its metadata and small tensors the base file); the model computes on `device`."""
    from transformers import AutoTokenizer

    if model_path.is_dir():
        model, blocks = open_skeleton(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = _base_gguf_from_hf(model_path, work_dir)
    else:
        model, blocks = open_gguf_skeleton(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
        base = model_path
    place_skeleton(model, blocks, device)
    return Source(model, tokenizer, model.config, arch, base, model_path, blocks)


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
    cost = lambda bpw: sum(formats.rank_for_bpw(o, i, bpw) * (o + i) for o, i in shapes)  # noqa: E731
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
    bits = formats.LayerBits(d_out, d_in, layer.u.shape[1], has_s_mid=layer.s_mid is not None)
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


def chat_conversations(source: Source, settings: ConvertSettings, work: WorkFolder, tokens_needed: int):
    """The calibration conversations: none, a user's own (--calib-chat FILE), or ("auto", for a model with a chat
    template) the teacher's answers to the project's instruction list, made once and kept in the work folder."""
    if settings.calib_chat == CHAT_NONE or tokens_needed == 0:
        return []
    if not getattr(source.tokenizer, "chat_template", None):
        if settings.calib_chat == CHAT_AUTO:
            print("calibration: the model has no chat template; raw text only")
            return []
        raise ConversionError(f"--calib-chat {settings.calib_chat}: {source.path} has no chat template to render "
                              "conversations with")
    if settings.calib_chat != CHAT_AUTO:
        return read_conversations(Path(settings.calib_chat))
    conversations = work.load_conversations()
    if conversations is None:
        clock = time.time()
        conversations = teacher_conversations(_answering_teacher(source), read_instructions(DEFAULT_CHAT_INSTRUCTIONS),
                                              tokens_needed, source.tokenizer, settings.seed, settings.threads)
        work.save_conversations(conversations)
        print(f"calibration: the teacher answered {len(conversations)} instructions in {time.time() - clock:.0f} s")
    return conversations


def _answering_teacher(source: Source) -> Path:
    """The GGUF that writes the calibration answers: a GGUF source itself; for a Hugging Face folder a Q8_0 copy of
    the F32 base file, as an F32 7B model (28 GB) would not fit in memory beside the converter."""
    if source.base_gguf == source.path:
        return source.path
    out = source.base_gguf.with_name("teacher-q8_0.gguf")
    if not out.is_file():
        if not LLAMA_QUANTIZE.is_file():
            raise ConversionError(f"{LLAMA_QUANTIZE} not found: run `make setup` (or pass --calib-chat none)")
        proc = subprocess.run([str(LLAMA_QUANTIZE), str(source.base_gguf), str(out), "Q8_0"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise ConversionError(f"{source.path}: llama-quantize could not make the answering teacher:\n"
                                  f"{proc.stderr[-3000:]}")
    return out


def chat_window_count(settings: ConvertSettings) -> int:
    """How many calibration windows are conversations, where the model has any (bench/gpu_carry.py reads it too, to
    make the conversations a run of these settings would)."""
    return 0 if settings.calib_chat == CHAT_NONE else round(settings.calib_windows * settings.chat_share)


def calibration(source: Source, settings: ConvertSettings, work: WorkFolder) -> torch.Tensor:
    """All calibration windows, raw text first, then conversations; every window starts as the model is used."""
    bos = window_bos(source.base_gguf, source.tokenizer)
    n, length = settings.calib_windows, settings.calib_window_tokens
    n_chat = chat_window_count(settings)
    conversations = chat_conversations(source, settings, work, n_chat * length)
    n_chat = n_chat if conversations else 0
    windows = torch.cat([text_windows(source.tokenizer, settings.calib_text, n - n_chat, length, settings.seed, bos),
                         chat_windows(source.tokenizer, conversations, n_chat, length, settings.seed, bos)])
    print(f"calibration: {n - n_chat} windows of {settings.calib_text.name} and {n_chat} of conversations, "
          f"{length} tokens each, {'starting with BOS' if bos is not None else 'without BOS'} (token {bos})")
    return windows


def allocate_ranks(model, source: Source, stats, names: list[str], settings: ConvertSettings) -> dict[str, int]:
    """Every layer's rank at the target's total bits (ranks.py). The sensitivity allocation reads the singular values
    of each layer's weight in its Fisher-diagonal norm, one block's weights in memory at a time."""
    layers = [ranks_module.LayerShape(name, *unit_shape(model, name), has_s_mid=settings.mid_scale) for name in names]
    if settings.rank_allocation == ranks_module.UNIFORM:
        ranks = ranks_module.uniform_ranks(layers, settings.bpw)
    else:
        gamma = source.arch.shrinkage if settings.shrinkage is None else settings.shrinkage
        curves = {}
        for i in tqdm(range(len(model.model.layers)), desc="rank allocation", unit="block"):
            source.blocks.load(model, i)
            for name in (n for n in names if n.startswith(f"model.layers.{i}.")):
                weight = unit_weight(model, name).detach().float()
                pre_in, pre_out = unit_preconditioners(stats, name, gamma, weight)
                weighted = pre_out[:, None] * weight * pre_in[None, :]
                curves[name] = ranks_module.error_curve(torch.linalg.svdvals(weighted).cpu())
            source.blocks.release(model, i)
        if HEAD in names:  # the head is outside the blocks, always in memory
            weight = unit_weight(model, HEAD).detach().float()
            pre_in, pre_out = unit_preconditioners(stats, HEAD, gamma, weight)
            curves[HEAD] = ranks_module.error_curve(
                torch.linalg.svdvals(pre_out[:, None] * weight * pre_in[None, :]).cpu())
        ranks = ranks_module.sensitivity_ranks(layers, settings.bpw, curves, settings.rank_spread)
    by_type: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        by_type.setdefault(name.split(".", 3)[-1], []).append(rank)
    spread = ", ".join(f"{t.split('.')[-1]} {min(r)}-{max(r)}" for t, r in by_type.items())
    realized = ranks_module.realized_bpw(layers, ranks)
    floor = " (rank 32, the floor, in every layer)" if realized > settings.bpw else ""
    print(f"rank allocation ({settings.rank_allocation}): {realized:.4f} bpw of {settings.bpw} target{floor}; "
          f"ranks {spread}")
    return ranks


def quantize_model(source: Source, settings: ConvertSettings, work: WorkFolder,
                   peaks: StagePeaks) -> tuple[list[NQLayerTensors], list[LayerReport], ConvertSettings]:
    """The file's tensors, a report per layer, the settings as run (step counts after rank scaling) and the output
    head's importance per input column (None for statistics made before they kept it)."""
    model, config, arch = source.model, source.config, source.arch
    model.requires_grad_(False)
    settings = rank_scaled_settings(settings, model.model.layers[0], arch)
    n_layers = config.num_hidden_layers
    names = [f"model.layers.{i}.{unit}" for i in range(n_layers) for unit in arch.units(settings.shared_v)]
    if settings.nq_head:
        if getattr(config, "tie_word_embeddings", False):
            raise ConversionError(f"--nq-head on: {source.path} ties its output head to the token embedding, which "
                                  "llama.cpp reads as a table; a model with a head of its own is needed")
        names.append(HEAD)
    linears = [f"model.layers.{i}.{linear}" for i in range(n_layers) for linear in arch.linears]
    device = source.blocks.device
    windows = calibration(source, settings, work).to(device)
    print(f"calibration: {peaks.end_stage()}")
    clock = time.time()
    stats = work.load_stats()
    if stats is None:
        scratch = work.path / "scratch"
        stats = StatsCollector(linears, settings.matmul).collect(model, source.blocks, windows, scratch)
        scratch.rmdir()
        work.save_stats(stats)
        print(f"statistics: {time.time() - clock:.0f} s, {peaks.end_stage()}")
    stats = {name: s.to(device) for name, s in stats.items()}
    ranks = work.load_ranks()
    if ranks is None:
        clock = time.time()
        ranks = allocate_ranks(model, source, stats, names, settings)
        work.save_ranks(ranks)
        print(f"rank allocation: {time.time() - clock:.0f} s, {peaks.end_stage()}")
    head = stats.get(HEAD)
    head_imatrix = None if head is None else head.input_moment.cpu().numpy()
    final_key = as_jsonable(asdict(replace(settings.distill, recompute="")))
    final = work.load_final(final_key, NQLayerTensors)
    if final is not None:
        print(f"the layers after model reconstruction are checkpointed in {work.path}: writing the file")
        return *final, settings, head_imatrix
    # the streams are needed by block tuning, and by distillation (the teacher's logits come from the FP stream)
    data = capture_block_inputs(model, windows) if settings.tune.enabled or settings.distill.steps > 0 else None
    first = work.finished_blocks()
    if first:
        print(f"resuming after block {first - 1}: {first} of {n_layers} blocks are checkpointed in {work.path}")
    if first and data is not None:
        stream = work.load_stream()
        data.fp, data.quantized = stream["fp"].to(device), stream["quantized"].to(device)

    reports: list[LayerReport] = []
    clock = time.time()
    in_blocks = [name for name in names if name != HEAD]
    progress = tqdm(total=len(in_blocks), desc="quantize", unit="layer",
                    initial=first * len(in_blocks) // n_layers)
    for i in range(n_layers):
        source.blocks.load(model, i)  # the dense block (norms stay; factorised linears replace the rest)
        if i < first:  # finished by an earlier run
            layers, block_reports = work.load_block(i)
            for name, (layer, bias) in layers.items():
                install_unit(model, name, FrozenLowRankBinary(layer, bias).to(device))
        else:
            layers, block_reports = quantize_block(model, i, source, stats, ranks, settings, data, progress)
            stream = {} if data is None else {"fp": data.fp, "quantized": data.quantized}
            work.save_block(i, layers, block_reports, stream)
        reports += block_reports
        # the block's float factors and latents (16 bytes a weight: 3 GB for a 7B block) must not live on
        # through the next block; the model keeps int8 signs
        del layers
    progress.close()
    print(f"blocks: {time.time() - clock:.0f} s, {peaks.end_stage()}")
    teacher_head = None
    if HEAD in names:  # after the blocks: no block reconstruction; distillation tunes its scales with the others
        teacher_head = model.lm_head
        clock = time.time()
        layer, report = work.load_head() or quantize_head(model, stats, ranks[HEAD], source.arch, settings, work)
        install_unit(model, HEAD, FrozenLowRankBinary(layer, None).to(device))
        reports.append(report)
        print(f"output head: rank {ranks[HEAD]}, D-weighted error {report.weighted_error:.4f}, "
              f"in {time.time() - clock:.0f} s, {peaks.end_stage()}")
    if settings.distill.steps > 0:  # model reconstruction of the scales against the teacher's logits
        clock = time.time()
        recompute = _distill_recompute(settings.distill.recompute, model.model.layers, data)
        fixed = fixed_log_windows(windows.shape[0])
        result = distill_scales(model, data.fp, windows, settings.distill, recompute, settings.seed, fixed,
                                teacher_head, settings.matmul)
        print(f"scale distillation: KL on {len(fixed)} fixed windows {result.kl_before:.4f} "
              f"-> {result.kl_after:.4f}"
              f"{' (not lower: the scales before distillation are kept)' if result.reverted else ''}, "
              f"in {time.time() - clock:.0f} s, {peaks.end_stage()}")
    tensors = [_to_file_order(arch, config, n_layers, name, unit_module(model, name).layer(),
                              unit_module(model, name).bias, unit_rows(model, name)) for name in names]
    work.save_final(tensors, reports, final_key)
    return tensors, reports, settings, head_imatrix


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


def _distill_recompute(setting: str, blocks, data: BlockData) -> bool:
    """Whether distillation recomputes block activations in its backward: always, never, or ("auto") when a
    window's activations through all blocks, measured on the first block, pass RECOMPUTE_ABOVE_BYTES."""
    saved = len(blocks) * saved_activation_bytes(blocks[0], data.fp[:1], data.layer_kwargs[0])
    recompute = setting == "on" or (setting == "auto" and saved > RECOMPUTE_ABOVE_BYTES)
    print(f"scale distillation: a window's activations through all blocks take {saved / 2**30:.2f} GiB; "
          f"{'recomputed in the backward' if recompute else 'kept for the backward'} (--distill-recompute {setting})")
    return recompute


def _to_file_order(arch, config, n_layers, name, layer: LowRankBinary, bias: torch.Tensor | None,
                   rows: list[int]) -> NQLayerTensors:
    """The unit's tensors in llama.cpp's row order, each member's rows permuted as llama.cpp's converter permutes
    that linear; a shared-input unit's tuned biases stay its members' own tensors (llama.cpp adds them to the fused
    product as they are)."""
    host = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    u, s_post, bias = host(layer.u), host(layer.s_post), host(bias)
    bounds = np.cumsum([0, *rows])
    order, biases, replaces = [], {}, []
    for member, start, stop in zip(member_names(name), bounds[:-1], bounds[1:]):
        perm = gguf_row_permutation(arch, member.split(".", 3)[-1], int(stop - start), config)
        rows_in_file = np.arange(start, stop) if perm is None else start + perm
        order.append(rows_in_file)
        base = gguf_base_name(arch, n_layers, member)
        replaces.append(base)
        if bias is not None:
            biases[f"{base}.bias"] = bias[rows_in_file]
    order = np.concatenate(order)
    return NQLayerTensors(base=gguf_base_name(arch, n_layers, name), u=u[order], v=host(layer.v),
                          s_pre=host(layer.s_pre), s_post=s_post[order], biases=biases, replaces=tuple(replaces),
                          s_mid=host(layer.s_mid))


def print_summary(reports: list[LayerReport], out: Path, seconds: float, peak_mib: float) -> None:
    print(f"\n{'layer':<34} {'shape':>11} {'rank':>5} {'bpw':>6} {'rel.err':>8} {'D-w.err':>8}")
    for r in reports:
        print(f"{r.name:<34} {f'{r.d_out}x{r.d_in}':>11} {r.rank:>5} {r.bpw:>6.3f} {r.rel_error:>8.4f} "
              f"{r.weighted_error:>8.4f}")
    bpw = sum(r.bpw * r.d_out * r.d_in for r in reports) / sum(r.d_out * r.d_in for r in reports)  # all bits / weights
    mean_err = float(np.mean([r.rel_error for r in reports]))
    print(f"\nquantized layers: {len(reports)}, realized bpw {bpw:.4f}, mean relative error {mean_err:.4f}")
    print(f"wrote {out} ({out.stat().st_size:,} bytes) in {seconds:.0f} s, peak RSS {peak_mib:.0f} MiB")


def settings_record(settings: ConvertSettings) -> str:
    """The settings a file was made with, as the JSON its metadata keeps: every method setting and step count, the
    calibration text and conversations by name (a local path says nothing on another machine), not the thread count,
    the device nor activation recomputation (speed and memory only)."""
    chat = settings.calib_chat if settings.calib_chat in (CHAT_AUTO, CHAT_NONE) else Path(settings.calib_chat).name
    record = as_jsonable(asdict(replace(settings, calib_text=Path(settings.calib_text.name), calib_chat=chat)))
    del record["threads"], record["device"], record["distill"]["recompute"]  # memory and speed only
    return json.dumps(record, sort_keys=True)


def _identity(model_path: Path, settings: ConvertSettings) -> dict:
    """What a work folder belongs to: the source files and every setting that changes what it holds. Distillation
    (model reconstruction) runs after the last checkpoint, so its settings are left out: a kept work folder can be
    resumed with other distillation settings, on another device, and written with other tensor types."""
    files = sorted(p for p in model_path.iterdir() if p.is_file()) if model_path.is_dir() else [model_path]
    checkpointed = asdict(replace(settings, distill=DistillSettings(), device=DEVICE_AUTO))
    for name in ("matmul", *WRITE_ONLY):  # the machine's speed, and how the file is written: not what is kept
        checkpointed.pop(name)
    return {"source": [file_identity(f) for f in files], "settings": as_jsonable(checkpointed),
            "torch_threads": torch.get_num_threads(), "format_version": formats.FORMAT_VERSION}


def tensor_types(settings: ConvertSettings) -> TensorTypes:
    """The non-NanoQuant tensors' types by role (the head None: llama-quantize's low-bit choice, see TensorTypes)."""
    named = lambda name: None if name is None else gguf.GGMLQuantizationType[name.upper()]  # noqa: E731
    return TensorTypes(other=named(settings.other_type), token_embd=named(settings.token_embd_type),
                       output=named(settings.output_type))


def convert(model_path: Path, out_path: Path, settings: ConvertSettings, work_dir: Path | None = None,
            resume: bool = False, keep_work: bool = False) -> list[LayerReport]:
    start = time.time()
    return_freed_memory_to_the_system()
    device = torch_device(settings.device)
    settings = resolved(settings, device)
    peaks = StagePeaks(device)
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    types = tensor_types(settings)
    arch = architecture_for(_model_type(model_path))  # an unsupported model fails before a work folder appears
    work_path = work_dir or out_path.with_name(out_path.name + ".work")
    work = WorkFolder(work_path, _identity(model_path, settings), resume)
    try:
        with tempfile.TemporaryDirectory(prefix="nanoquant-") as tmp:
            source = load_source(model_path, Path(tmp), arch, device)
            print(f"loading: on {device}, {peaks.end_stage()}")
            tensors, reports, as_run, head_imatrix = quantize_model(source, settings, work, peaks)
            metadata = {
                formats.KEY_VERSION: (formats.FORMAT_VERSION, gguf.GGUFValueType.UINT32),
                formats.KEY_TARGET_BPW: (float(settings.bpw), gguf.GGUFValueType.FLOAT32),
                formats.KEY_SETTINGS: (settings_record(as_run), gguf.GGUFValueType.STRING),
            }
            write_nq_gguf(source.base_gguf, out_path, tensors, types, metadata, head_imatrix)
            print(f"writing: {peaks.end_stage()}")
            if work.computed:  # the conversion's cost, over every run that computed in this work folder
                work.record_time()
            spent = work.spent()
            print(f"conversion: {spent['seconds']:.0f} s, peak RSS {spent['peak_rss_mib']:.0f} MiB over every run "
                  f"that computed in {work_path}{'' if work.computed else ' (none now: the file was written again)'}")
    except BaseException:
        # a folder that holds nothing --resume could use (no statistics, no block) is this run's litter
        if not resume and not work.holds_progress():
            shutil.rmtree(work_path, ignore_errors=True)
        raise
    if not keep_work:
        shutil.rmtree(work_path)
    print_summary(reports, out_path, time.time() - start, peaks.overall_mib)
    return reports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a Hugging Face model (folder or GGUF) into a NanoQuant GGUF.")
    p.add_argument("model", type=Path, help="Hugging Face model folder (config, safetensors, tokenizer) or a GGUF file")
    p.add_argument("--outfile", type=Path, required=True, help="output GGUF path")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="calibration and tuning effort; every option below overrides its value")
    add_options(p)
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoint folder (default OUTFILE.work)")
    p.add_argument("--resume", action="store_true", help="continue the conversion checkpointed in the work folder")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    return p


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # a log redirected to a file shows each stage as it ends
    args = build_parser().parse_args(argv)
    # a kill (SIGTERM) unwinds like an error, so convert() removes a work folder that holds no progress
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        settings = settings_from_args(args)
        preflight.check_settings(settings)
        preflight.check_output(args.outfile)
        if args.model.is_dir():
            preflight.check_model_folder(args.model)
        if not settings.calib_text.is_file():
            raise ConversionError(f"--calib: {settings.calib_text} not found")
        if settings.calib_chat not in (CHAT_AUTO, CHAT_NONE) and not Path(settings.calib_chat).is_file():
            raise ConversionError(f"--calib-chat: {settings.calib_chat} not found (expected 'auto', 'none' or a "
                                  "JSONL file)")
        if args.outfile.parent and not args.outfile.parent.exists():
            args.outfile.parent.mkdir(parents=True)
        convert(args.model, args.outfile, settings, args.work_dir, args.resume, args.keep_work)
    except (ConversionError, CheckpointError, CalibrationError, UnsupportedArchitecture, FileNotFoundError,
            ValueError) as e:  # preflight.InputError is a ValueError
        print(f"convert-hf-to-nq-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0
