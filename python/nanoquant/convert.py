"""Hugging Face model (folder or GGUF) -> NanoQuant GGUF. The command line is convert/convert-hf-to-nq-gguf.py.

Pipeline per decoder block, in the method's layer order: (block reconstruction stages slot in around) the
Hessian-aware ADMM initialisation of each linear layer. Statistics come from calibration text once, up front.
"""
from __future__ import annotations

import argparse
import ctypes
import copy
import json
import shutil
import os
import re
import resource
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

from . import formats
from .admm import AdmmSettings, LowRankBinary, factorize, relative_error
from .architectures import (GGUF_MODEL_TYPES, Architecture, UnsupportedArchitecture, architecture_for, gguf_base_name,
                            gguf_row_permutation)
from .calibration import DEFAULT_CALIBRATION_TEXT, StatsCollector, calibration_windows, shrink
from .reconstruct import (RECOMPUTE_ABOVE_BYTES, DistillSettings, FrozenLowRankBinary, TrainableLowRankBinary,
                          TuneSettings, BlockData, capture_block_inputs, distill_scales, run_block_batched,
                          saved_activation_bytes, tune_block)
from .streaming import GGUFBlocks, SafetensorsBlocks, open_gguf_skeleton, open_skeleton
from .checkpoint import CheckpointError, WorkFolder, as_jsonable, file_identity
from .gguf_writer import NQLayerTensors, write_nq_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_DIR = Path(os.environ.get("NANOQUANT_LLAMA_CPP", REPO_ROOT / "vendor" / "llama.cpp"))


@dataclass(frozen=True)
class ConvertSettings:
    bpw: float = 1.0
    calib_text: Path = DEFAULT_CALIBRATION_TEXT
    calib_windows: int = 32
    calib_window_tokens: int = 512
    seed: int = 0
    shrinkage: float | None = None  # None: the architecture's value
    admm: AdmmSettings = AdmmSettings()
    tune: TuneSettings = TuneSettings()
    distill: DistillSettings = DistillSettings()
    mid_scale: bool = False  # a per-rank scale s_mid in the layers whose rank rounding leaves room for its bits
    other_type: str = "Q8_0"
    threads: int = 0
    effort_bpw: float | None = None        # rank_scaled_settings: the bpw the step counts below were sized for
    rank_scaled: tuple[str, ...] = ()      # which of RANK_BOUND_STEPS it may scale (not those set by the user)


PRESETS: dict[str, dict] = {
    # sized for SmolLM2-135M on a 2-core CPU (fast <= 10 min, standard <= 30 min; measured times in the README)
    # effort_bpw: the step counts are sized for this bpw; above it, the rank-bound stages get proportionally fewer
    # steps (see rank_scaled_settings), so a higher bpw costs about the same time
    "fast": dict(calib_windows=16, calib_window_tokens=512, admm_iterations=20, dense_steps=0, factor_steps=40,
                 distill_steps=0, distill_lr=1e-2, tune_batch=1, tune_scope="block", effort_bpw=1.0,
                 mid_scale=False),
    "standard": dict(calib_windows=32, calib_window_tokens=512, admm_iterations=60, dense_steps=20,
                     factor_steps=100, distill_steps=70, distill_lr=1e-2, tune_batch=1, tune_scope="block",
                     effort_bpw=1.0, mid_scale=False),
    # the reference's schedule (spec 3.5/3.6): per-layer tuning, 8 epochs over 128 windows of 2048 tokens
    "paper": dict(calib_windows=128, calib_window_tokens=2048, admm_iterations=400, dense_steps=256,
                  factor_steps=1024, distill_steps=1024, distill_lr=1e-3, tune_batch=1, tune_scope="layer",
                  effort_bpw=None, mid_scale=False),
}
# the stages whose cost per step grows with the rank: ADMM (m n r per iteration) and STE tuning (r (d_in + d_out) per
# token through each factorised layer). Distillation is not among them: a step runs the whole model, whose attention,
# head and softmax over the vocabulary do not grow with the rank (SmolLM2, measured: 5.0 s a step at 1.0 bpw, 6.3 s at
# 2.0, while the factorised layers cost 1.64x)
RANK_BOUND_STEPS = ("admm_iterations", "factor_steps")


class ConversionError(RuntimeError):
    pass


def _glibc(function: str, *args: int) -> None:
    """Calls a glibc allocator tuning function; elsewhere there is nothing to tune."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


# glibc serves buffers below a threshold that adapts up to 32 MiB from its heap and keeps them after a free. At 7B
# shapes the activations (8-22 MiB) then fragment the heap by ~180 MiB a block in distillation (bench/memory.py
# shapes, measured); fixed at 4 MiB they are mapped and returned on free, for 10-25% slower 7B-shaped steps. SmolLM2's
# buffers are under it. The setting is the process's from the first conversion on.
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 4 << 20


class StagePeaks:
    """Peak resident memory per conversion stage. Linux keeps a process's peak (VmHWM) and restarts it from the
    present size when 5 is written to /proc/self/clear_refs, so each stage gets its own peak, and a memory benchmark
    can extrapolate each stage to a deeper model on its own. Where that is missing, every stage reports the running
    peak of the process."""

    def __init__(self):
        self.overall_mib = 0.0
        self._restart()

    @staticmethod
    def _restart() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    @staticmethod
    def _peak_mib() -> float:
        try:
            return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def end_stage(self) -> str:
        """This stage's peak for its log line; the next stage counts from the present, trimmed size."""
        peak = self._peak_mib()
        self.overall_mib = max(self.overall_mib, peak)
        _glibc("malloc_trim", 0)  # a stage should not inherit the freed heap of the one before
        self._restart()
        return f"peak RSS {peak:.0f} MiB"


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
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type is None:
            raise ConversionError(f"{config_path}: has no model_type")
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


def load_source(model_path: Path, work_dir: Path, arch: Architecture) -> Source:
    """Blocks stream from a HF folder's safetensors or from a GGUF (dequantised one block at a time; the GGUF's
    dequantisation is the teacher, its metadata and small tensors the base file)."""
    from transformers import AutoTokenizer

    if model_path.is_dir():
        model, blocks = open_skeleton(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = _base_gguf_from_hf(model_path, work_dir)
    else:
        model, blocks = open_gguf_skeleton(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
        base = model_path
    return Source(model, tokenizer, model.config, arch, base, model_path, blocks)


def rank_scaled_settings(settings: ConvertSettings, block: torch.nn.Module, arch: Architecture) -> ConvertSettings:
    """A preset's step counts are sized for `effort_bpw`; at a higher bpw the ranks grow, and with them the cost of
    each ADMM iteration and STE step. Those counts shrink by the ratio of the per-token cost of one block's factorised
    layers, sum r (d_in + d_out), so that the conversion takes about the same time."""
    if settings.effort_bpw is None or settings.bpw <= settings.effort_bpw or not settings.rank_scaled:
        return settings
    shapes = [tuple(block.get_submodule(linear).weight.shape) for linear in arch.linears]
    cost = lambda bpw: sum(formats.rank_for_bpw(o, i, bpw) * (o + i) for o, i in shapes)  # noqa: E731
    ratio = cost(settings.effort_bpw) / cost(settings.bpw)
    if ratio >= 1.0:
        return settings
    scaled = lambda n: max(1, round(n * ratio)) if n > 0 else 0  # noqa: E731
    admm, tune = settings.admm, settings.tune
    if "admm_iterations" in settings.rank_scaled:
        admm = replace(admm, iterations=scaled(admm.iterations))
    if "factor_steps" in settings.rank_scaled:
        tune = replace(tune, factor_steps=scaled(tune.factor_steps))
    print(f"effort: ranks at {settings.bpw} bpw cost {1 / ratio:.2f}x those at {settings.effort_bpw}: ADMM "
          f"{admm.iterations} iterations, {tune.factor_steps} STE steps ({settings.distill.steps} distillation steps)")
    return replace(settings, admm=admm, tune=tune)


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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


def quantize_block(model, index: int, source: Source, stats, settings: ConvertSettings, data: BlockData | None,
                   progress) -> tuple[dict, list[LayerReport]]:
    """Factorise one decoder block (steps 1-3 of the method) and advance the activation streams past it.

    scope "layer" interleaves dense tuning, ADMM and STE tuning per linear in the method's order (the reference
    code); scope "block" tunes the dense block once, factorises all its linears, then tunes them together (the
    paper's Algorithm 1), which costs one seventh of the steps."""
    arch, tune = source.arch, settings.tune
    gamma = arch.shrinkage if settings.shrinkage is None else settings.shrinkage
    block = model.model.layers[index]
    prefix = f"model.layers.{index}."
    originals = {linear: block.get_submodule(linear).weight.detach().clone() for linear in arch.linears}
    if data is not None:
        data.index = index
        target = run_block_batched(copy.deepcopy(block), data.fp, data.kwargs)
        sensitivity = shrink(stats[prefix + arch.sensitivity_linear].output_moment, gamma)
        channel_weights = sensitivity / sensitivity.mean()
    groups = [[linear] for linear in arch.linears] if tune.scope == "layer" else [list(arch.linears)]
    finished: dict[str, tuple[LowRankBinary, torch.Tensor | None]] = {}
    for g, group in enumerate(groups):
        if data is not None and tune.dense_steps > 0:  # step 1: the still-dense layers absorb upstream error
            remaining = [block.get_submodule(linear).weight for later in groups[g:] for linear in later]
            for w in remaining:
                w.requires_grad_(True)
            tune_block(block, [{"params": remaining, "lr": tune.dense_lr}], data, target, channel_weights,
                       tune.dense_steps, tune.seed, tune.batch_windows)
            for w in remaining:
                w.requires_grad_(False)
        layers = {}
        for linear in group:  # step 2: LB-ADMM on the (tuned) dense weight
            dense = block.get_submodule(linear)
            weight = dense.weight.detach().float()
            pre_in, pre_out = stats[prefix + linear].preconditioners(gamma)
            rank, has_mid = formats.layer_plan(*weight.shape, settings.bpw, settings.mid_scale)
            layers[linear] = factorize(weight, rank, pre_in, pre_out, settings.admm, mid_scale=has_mid)
        biases = {linear: block.get_submodule(linear).bias for linear in group}
        if data is not None and tune.factor_steps > 0:  # step 3: STE tuning of the new factors' signs and scales
            trainables = {linear: TrainableLowRankBinary(layers[linear], biases[linear]) for linear in group}
            for linear, t in trainables.items():
                _set_submodule(block, linear, t)
            first, last = tune_block(block, _tuning_groups(list(trainables.values()), tune), data, target,
                                     channel_weights, tune.factor_steps, tune.seed, tune.batch_windows)
            label = group[0] if len(group) == 1 else "all linears"
            tqdm.write(f"block {index} ({label}): STE tuning, block loss {first:.4g} -> {last:.4g}")
            for linear, t in trainables.items():
                layers[linear] = t.finalize()
                biases[linear] = None if t.bias is None else t.bias.detach().clone()
        for linear in group:
            _set_submodule(block, linear, FrozenLowRankBinary(layers[linear], biases[linear]))
            finished[prefix + linear] = (layers[linear], biases[linear])
            progress.update(1)
    if data is not None:
        data.fp = target
        data.quantized = run_block_batched(block, data.quantized, data.kwargs)
    reports = [_layer_report(prefix + linear, originals[linear], finished[prefix + linear][0],
                             *stats[prefix + linear].preconditioners(gamma)) for linear in arch.linears]
    return finished, reports


def quantize_model(source: Source, settings: ConvertSettings, work: WorkFolder,
                   peaks: StagePeaks) -> tuple[list[NQLayerTensors], list[LayerReport], ConvertSettings]:
    """The file's tensors, a report per layer, and the settings as run (step counts after rank scaling)."""
    model, config, arch = source.model, source.config, source.arch
    model.requires_grad_(False)
    settings = rank_scaled_settings(settings, model.model.layers[0], arch)
    n_layers = config.num_hidden_layers
    names = [f"model.layers.{i}.{linear}" for i in range(n_layers) for linear in arch.linears]
    windows = calibration_windows(source.tokenizer, settings.calib_text, settings.calib_windows,
                                  settings.calib_window_tokens, settings.seed)
    clock = time.time()
    stats = work.load_stats()
    if stats is None:
        scratch = work.path / "scratch"
        stats = StatsCollector(names).collect(model, source.blocks, windows, scratch)
        scratch.rmdir()
        work.save_stats(stats)
        print(f"statistics: {time.time() - clock:.0f} s, {peaks.end_stage()}")
    # the streams are needed by block tuning, and by distillation (the teacher's logits come from the FP stream)
    data = capture_block_inputs(model, windows) if settings.tune.enabled or settings.distill.steps > 0 else None
    first = work.finished_blocks()
    if first:
        print(f"resuming after block {first - 1}: {first} of {n_layers} blocks are checkpointed in {work.path}")
    if first and data is not None:
        stream = work.load_stream()
        data.fp, data.quantized = stream["fp"], stream["quantized"]

    reports: list[LayerReport] = []
    clock = time.time()
    progress = tqdm(total=len(names), desc="quantize", unit="layer", initial=first * len(arch.linears))
    for i in range(n_layers):
        source.blocks.load(model, i)  # the dense block (norms stay; factorised linears replace the rest)
        if i < first:  # finished by an earlier run
            layers, block_reports = work.load_block(i)
            for name, (layer, bias) in layers.items():
                _set_submodule(model, name, FrozenLowRankBinary(layer, bias))
        else:
            layers, block_reports = quantize_block(model, i, source, stats, settings, data, progress)
            stream = {} if data is None else {"fp": data.fp, "quantized": data.quantized}
            work.save_block(i, layers, block_reports, stream)
        reports += block_reports
        # the block's float factors and latents (16 bytes a weight: 3 GB for a 7B block) must not live on
        # through the next block; the model keeps int8 signs
        del layers
    progress.close()
    print(f"blocks: {time.time() - clock:.0f} s, {peaks.end_stage()}")
    if settings.distill.steps > 0:  # model reconstruction of the scales against the teacher's logits
        clock = time.time()
        recompute = _distill_recompute(settings.distill.recompute, model.model.layers, data)
        losses = distill_scales(model, data.fp, windows, settings.distill, recompute)
        print(f"scale distillation: KL {losses[0]:.4f} -> {sum(losses[-8:]) / len(losses[-8:]):.4f} "
              f"in {time.time() - clock:.0f} s, {peaks.end_stage()}")
    tensors = [_to_file_order(arch, config, n_layers, name, name.split(".", 3)[3], model.get_submodule(name).layer(),
                              model.get_submodule(name).bias) for name in names]
    return tensors, reports, settings


def _distill_recompute(setting: str, blocks, data: BlockData) -> bool:
    """Whether distillation recomputes block activations in its backward: always, never, or ("auto") when a
    window's activations through all blocks, measured on the first block, pass RECOMPUTE_ABOVE_BYTES."""
    saved = len(blocks) * saved_activation_bytes(blocks[0], data.fp[:1], data.layer_kwargs[0])
    recompute = setting == "on" or (setting == "auto" and saved > RECOMPUTE_ABOVE_BYTES)
    print(f"scale distillation: a window's activations through all blocks take {saved / 2**30:.2f} GiB; "
          f"{'recomputed in the backward' if recompute else 'kept for the backward'} (--distill-recompute {setting})")
    return recompute


def _to_file_order(arch, config, n_layers, name, linear, layer: LowRankBinary,
                   bias: torch.Tensor | None) -> NQLayerTensors:
    u, s_post = layer.u.numpy(), layer.s_post.numpy()
    bias = None if bias is None else bias.detach().numpy()
    perm = gguf_row_permutation(arch, linear, u.shape[0], config)
    if perm is not None:
        u, s_post = u[perm], s_post[perm]
        bias = None if bias is None else bias[perm]
    return NQLayerTensors(base=gguf_base_name(arch, n_layers, name), u=u, v=layer.v.numpy(),
                          s_pre=layer.s_pre.numpy(), s_post=s_post, bias=bias,
                          s_mid=None if layer.s_mid is None else layer.s_mid.numpy())


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
    calibration text by name (a local path says nothing on another machine), not the thread count nor activation
    recomputation (speed and memory only)."""
    record = as_jsonable(asdict(replace(settings, calib_text=Path(settings.calib_text.name))))
    del record["threads"], record["distill"]["recompute"]  # memory and speed only: the results are the same
    return json.dumps(record, sort_keys=True)


def _identity(model_path: Path, settings: ConvertSettings) -> dict:
    """What a work folder belongs to: the source files and every setting that changes what it holds. Distillation
    (model reconstruction) runs after the last checkpoint, so its settings are left out: a kept work folder can be
    resumed with other distillation settings."""
    files = sorted(p for p in model_path.iterdir() if p.is_file()) if model_path.is_dir() else [model_path]
    checkpointed = replace(settings, distill=DistillSettings())
    return {"source": [file_identity(f) for f in files], "settings": as_jsonable(asdict(checkpointed)),
            "torch_threads": torch.get_num_threads(), "format_version": formats.FORMAT_VERSION}


def convert(model_path: Path, out_path: Path, settings: ConvertSettings, work_dir: Path | None = None,
            resume: bool = False, keep_work: bool = False) -> list[LayerReport]:
    start = time.time()
    _glibc("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    peaks = StagePeaks()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    other_type = gguf.GGMLQuantizationType[settings.other_type.upper()]
    arch = architecture_for(_model_type(model_path))  # an unsupported model fails before a work folder appears
    work_path = work_dir or out_path.with_name(out_path.name + ".work")
    work = WorkFolder(work_path, _identity(model_path, settings), resume)
    with tempfile.TemporaryDirectory(prefix="nanoquant-") as tmp:
        source = load_source(model_path, Path(tmp), arch)
        print(f"loading: {peaks.end_stage()}")
        tensors, reports, as_run = quantize_model(source, settings, work, peaks)
        metadata = {
            formats.KEY_VERSION: (formats.FORMAT_VERSION, gguf.GGUFValueType.UINT32),
            formats.KEY_TARGET_BPW: (float(settings.bpw), gguf.GGUFValueType.FLOAT32),
            formats.KEY_SETTINGS: (settings_record(as_run), gguf.GGUFValueType.STRING),
        }
        write_nq_gguf(source.base_gguf, out_path, tensors, other_type, metadata)
        print(f"writing: {peaks.end_stage()}")
    if not keep_work:
        shutil.rmtree(work_path)
    print_summary(reports, out_path, time.time() - start, peaks.overall_mib)
    return reports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a Hugging Face model (folder or GGUF) into a NanoQuant GGUF.")
    p.add_argument("model", type=Path, help="Hugging Face model folder (config, safetensors, tokenizer) or a GGUF file")
    p.add_argument("--outfile", type=Path, required=True, help="output GGUF path")
    p.add_argument("--bpw", type=float, default=1.0, help="target bits per weight of the decoder linear layers")
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast", help="calibration and ADMM effort")
    p.add_argument("--calib", type=Path, default=None, help=f"calibration text (default {DEFAULT_CALIBRATION_TEXT})")
    p.add_argument("--calib-windows", type=int, default=None, help="number of calibration windows")
    p.add_argument("--calib-window-tokens", type=int, default=None, help="tokens per calibration window")
    p.add_argument("--admm-iterations", type=int, default=None, help="ADMM outer iterations")
    p.add_argument("--shrinkage", type=float, default=None, help="Hessian-diagonal shrinkage (default: per family)")
    p.add_argument("--dense-steps", type=int, default=None, help="block tuning steps of the dense layers per layer")
    p.add_argument("--factor-steps", type=int, default=None, help="STE tuning steps of each factorised layer")
    p.add_argument("--dense-lr", type=float, default=TuneSettings.dense_lr)
    p.add_argument("--latent-lr", type=float, default=TuneSettings.latent_lr, help="relative to mean |latent|")
    p.add_argument("--scale-lr", type=float, default=TuneSettings.scale_lr, help="on multiplicative scale offsets")
    p.add_argument("--distill-steps", type=int, default=None, help="scale-only KL distillation steps (model recon.)")
    p.add_argument("--distill-lr", type=float, default=None, help="on multiplicative scale offsets")
    p.add_argument("--distill-recompute", choices=("auto", "on", "off"), default="auto",
                   help="recompute block activations in distillation's backward: less memory, ~30%% more time; auto: "
                        f"when a window's activations through all blocks pass {RECOMPUTE_ABOVE_BYTES / 2**30:g} GiB")
    p.add_argument("--tune-batch", type=int, default=None, help="windows per tuning step")
    p.add_argument("--tune-scope", choices=("block", "layer"), default=None,
                   help="block: tune once per block (paper Algorithm 1); layer: per linear (reference code, 7x cost)")
    p.add_argument("--mid-scale", choices=("on", "off"), default=None,
                   help="a per-rank scale s_mid (32 bits a rank) in layers whose rank rounding leaves room for it")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoint folder (default OUTFILE.work)")
    p.add_argument("--resume", action="store_true", help="continue the conversion checkpointed in the work folder")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other-type", default="Q8_0", help="ggml type of the non-NanoQuant tensors (F32, F16, Q8_0, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def settings_from_args(args: argparse.Namespace) -> ConvertSettings:
    preset = dict(PRESETS[args.preset])
    for key in ("calib_windows", "calib_window_tokens", "admm_iterations", "dense_steps", "factor_steps",
                "distill_steps", "distill_lr", "tune_batch", "tune_scope"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.mid_scale is not None:
        preset["mid_scale"] = args.mid_scale == "on"
    rank_scaled = tuple(key for key in RANK_BOUND_STEPS if getattr(args, key) is None)
    if args.other_type.upper() not in gguf.GGMLQuantizationType.__members__:
        raise ConversionError(f"--other-type: unknown ggml type '{args.other_type}'")
    return ConvertSettings(
        bpw=args.bpw, calib_text=args.calib or DEFAULT_CALIBRATION_TEXT, calib_windows=preset["calib_windows"],
        calib_window_tokens=preset["calib_window_tokens"], seed=args.seed, shrinkage=args.shrinkage,
        admm=AdmmSettings(iterations=preset["admm_iterations"], seed=args.seed),
        tune=TuneSettings(dense_steps=preset["dense_steps"], dense_lr=args.dense_lr, factor_steps=preset["factor_steps"],
                          latent_lr=args.latent_lr, scale_lr=args.scale_lr, batch_windows=preset["tune_batch"],
                          scope=preset["tune_scope"], seed=args.seed),
        distill=DistillSettings(steps=preset["distill_steps"], lr=preset["distill_lr"], seed=args.seed,
                                recompute=args.distill_recompute),
        mid_scale=preset["mid_scale"],
        other_type=args.other_type,
        threads=args.threads,
        effort_bpw=preset["effort_bpw"],
        rank_scaled=rank_scaled)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if not settings.calib_text.is_file():
            raise ConversionError(f"--calib: {settings.calib_text} not found")
        if args.outfile.parent and not args.outfile.parent.exists():
            args.outfile.parent.mkdir(parents=True)
        convert(args.model, args.outfile, settings, args.work_dir, args.resume, args.keep_work)
    except (ConversionError, CheckpointError, UnsupportedArchitecture, FileNotFoundError, ValueError) as e:
        print(f"convert-hf-to-nq-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0
