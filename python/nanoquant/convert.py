"""Hugging Face model (folder or GGUF) -> NanoQuant GGUF. The command line is convert/convert-hf-to-nq-gguf.py.

Pipeline per decoder block, in the method's layer order: (block reconstruction stages slot in around) the
Hessian-aware ADMM initialisation of each linear layer. Statistics come from calibration text once, up front.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
from .reconstruct import (DistillSettings, FrozenLowRankBinary, TrainableLowRankBinary, TuneSettings,
                          capture_block_inputs, distill_scales, run_block_batched, tune_block)
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
    other_type: str = "Q8_0"
    threads: int = 0


PRESETS: dict[str, dict] = {
    # measured on a 2-core CPU with SmolLM2-135M: see README
    "fast": dict(calib_windows=16, calib_window_tokens=512, admm_iterations=40, dense_steps=0, factor_steps=0,
                 distill_steps=0),
    "standard": dict(calib_windows=64, calib_window_tokens=512, admm_iterations=100, dense_steps=0,
                     factor_steps=0, distill_steps=0),
    "paper": dict(calib_windows=128, calib_window_tokens=2048, admm_iterations=400, dense_steps=256,
                  factor_steps=1024, distill_steps=1024),
}


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


def load_source(model_path: Path, work_dir: Path) -> Source:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = architecture_for(_model_type(model_path))  # fail before any heavy work
    if model_path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = _base_gguf_from_hf(model_path, work_dir)
    else:  # a GGUF: its dequantised weights are the teacher, its metadata and small tensors the base
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
        base = model_path
    model.eval()
    return Source(model, tokenizer, model.config, arch, base)


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantize_model(source: Source, settings: ConvertSettings) -> tuple[list[NQLayerTensors], list[LayerReport]]:
    model, config, arch = source.model, source.config, source.arch
    model.requires_grad_(False)
    n_layers = config.num_hidden_layers
    names = [f"model.layers.{i}.{linear}" for i in range(n_layers) for linear in arch.linears]
    windows = calibration_windows(source.tokenizer, settings.calib_text, settings.calib_windows,
                                  settings.calib_window_tokens, settings.seed)
    stats = StatsCollector(names).collect(model, windows)
    gamma = arch.shrinkage if settings.shrinkage is None else settings.shrinkage
    tune = settings.tune
    data = capture_block_inputs(model, windows) if tune.enabled else None
    teacher = copy.deepcopy(model) if settings.distill.steps > 0 else None

    tensors, reports, originals = [], [], {}
    progress = tqdm(total=len(names), desc="quantize", unit="layer")
    for i in range(n_layers):
        block = model.model.layers[i]
        originals.update({f"model.layers.{i}.{linear}": block.get_submodule(linear).weight.detach().clone()
                          for linear in arch.linears})
        if data is not None:
            target = run_block_batched(copy.deepcopy(block), data.fp, data.kwargs)
            sensitivity = shrink(stats[f"model.layers.{i}.{arch.sensitivity_linear}"].output_moment, gamma)
            channel_weights = sensitivity / sensitivity.mean()
        for j, linear in enumerate(arch.linears):
            name = f"model.layers.{i}.{linear}"
            dense = block.get_submodule(linear)
            if data is not None and tune.dense_steps > 0:  # step 1: the still-dense layers absorb upstream error
                remaining = [block.get_submodule(other).weight for other in arch.linears[j:]]
                for w in remaining:
                    w.requires_grad_(True)
                tune_block(block, [{"params": remaining, "lr": tune.dense_lr}], data, target, channel_weights,
                           tune.dense_steps, tune.seed, tune.batch_windows)
                for w in remaining:
                    w.requires_grad_(False)
            weight = dense.weight.detach().float()
            rank = formats.rank_for_bpw(*weight.shape, settings.bpw)
            pre_in, pre_out = stats[name].preconditioners(gamma)
            layer = factorize(weight, rank, pre_in, pre_out, settings.admm)
            if data is not None and tune.factor_steps > 0:  # step 3: STE tuning of this layer's signs and scales
                trainable = TrainableLowRankBinary(layer, dense.bias)
                _set_submodule(block, linear, trainable)
                groups = [
                    {"params": [trainable.u_latent], "lr": tune.latent_lr * float(trainable.u_latent.abs().mean())},
                    {"params": [trainable.v_latent], "lr": tune.latent_lr * float(trainable.v_latent.abs().mean())},
                    {"params": [trainable.pre_offset, trainable.post_offset], "lr": tune.scale_lr},
                ]
                tune_block(block, groups, data, target, channel_weights, tune.factor_steps, tune.seed,
                           tune.batch_windows)
                layer = trainable.finalize()
            _set_submodule(block, linear, FrozenLowRankBinary(layer, dense.bias))
            progress.update(1)
        if data is not None:
            data.fp = target
            data.quantized = run_block_batched(block, data.quantized, data.kwargs)
    progress.close()
    if teacher is not None:  # model reconstruction of the scales against the teacher's logits
        losses = distill_scales(model, teacher, windows, settings.distill)
        print(f"scale distillation: KL {losses[0]:.4f} -> {sum(losses[-8:]) / len(losses[-8:]):.4f}")
        del teacher

    for name in names:
        layer = model.get_submodule(name).layer()
        w0, approx = originals[name].float(), layer.dense()
        pre_in, pre_out = stats[name].preconditioners(gamma)
        weighted = relative_error(pre_out[:, None] * w0 * pre_in[None, :], pre_out[:, None] * approx * pre_in[None, :])
        d_out, d_in = w0.shape
        bits = formats.LayerBits(d_out, d_in, layer.u.shape[1])
        reports.append(LayerReport(name, d_out, d_in, layer.u.shape[1], bits.bpw, relative_error(w0, approx), weighted))
        tensors.append(_to_file_order(arch, config, n_layers, name, name.split(".", 3)[3], layer))
    return tensors, reports


def _to_file_order(arch, config, n_layers, name, linear, layer: LowRankBinary) -> NQLayerTensors:
    u, s_post = layer.u.numpy(), layer.s_post.numpy()
    perm = gguf_row_permutation(arch, linear, u.shape[0], config)
    if perm is not None:
        u, s_post = u[perm], s_post[perm]
    return NQLayerTensors(base=gguf_base_name(arch, n_layers, name), u=u, v=layer.v.numpy(),
                          s_pre=layer.s_pre.numpy(), s_post=s_post)


def print_summary(reports: list[LayerReport], out: Path, seconds: float) -> None:
    print(f"\n{'layer':<34} {'shape':>11} {'rank':>5} {'bpw':>6} {'rel.err':>8} {'D-w.err':>8}")
    for r in reports:
        print(f"{r.name:<34} {f'{r.d_out}x{r.d_in}':>11} {r.rank:>5} {r.bpw:>6.3f} {r.rel_error:>8.4f} "
              f"{r.weighted_error:>8.4f}")
    bpw = formats.realized_bpw([formats.LayerBits(r.d_out, r.d_in, r.rank) for r in reports])
    mean_err = float(np.mean([r.rel_error for r in reports]))
    print(f"\nquantized layers: {len(reports)}, realized bpw {bpw:.4f}, mean relative error {mean_err:.4f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {out} ({out.stat().st_size:,} bytes) in {seconds:.0f} s, peak RSS {peak_mib:.0f} MiB")


def convert(model_path: Path, out_path: Path, settings: ConvertSettings) -> list[LayerReport]:
    start = time.time()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    other_type = gguf.GGMLQuantizationType[settings.other_type.upper()]
    with tempfile.TemporaryDirectory(prefix="nanoquant-") as tmp:
        source = load_source(model_path, Path(tmp))
        tensors, reports = quantize_model(source, settings)
        metadata = {
            formats.KEY_VERSION: (formats.FORMAT_VERSION, gguf.GGUFValueType.UINT32),
            formats.KEY_TARGET_BPW: (float(settings.bpw), gguf.GGUFValueType.FLOAT32),
        }
        write_nq_gguf(source.base_gguf, out_path, tensors, other_type, metadata)
    print_summary(reports, out_path, time.time() - start)
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
    p.add_argument("--distill-lr", type=float, default=DistillSettings.lr, help="on multiplicative scale offsets")
    p.add_argument("--tune-batch", type=int, default=TuneSettings.batch_windows, help="windows per tuning step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other-type", default="Q8_0", help="ggml type of the non-NanoQuant tensors (F32, F16, Q8_0, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def settings_from_args(args: argparse.Namespace) -> ConvertSettings:
    preset = dict(PRESETS[args.preset])
    for key in ("calib_windows", "calib_window_tokens", "admm_iterations", "dense_steps", "factor_steps",
                "distill_steps"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.other_type.upper() not in gguf.GGMLQuantizationType.__members__:
        raise ConversionError(f"--other-type: unknown ggml type '{args.other_type}'")
    return ConvertSettings(
        bpw=args.bpw, calib_text=args.calib or DEFAULT_CALIBRATION_TEXT, calib_windows=preset["calib_windows"],
        calib_window_tokens=preset["calib_window_tokens"], seed=args.seed, shrinkage=args.shrinkage,
        admm=AdmmSettings(iterations=preset["admm_iterations"], seed=args.seed),
        tune=TuneSettings(dense_steps=preset["dense_steps"], dense_lr=args.dense_lr, factor_steps=preset["factor_steps"],
                          latent_lr=args.latent_lr, scale_lr=args.scale_lr, batch_windows=args.tune_batch,
                          seed=args.seed),
        distill=DistillSettings(steps=preset["distill_steps"], lr=args.distill_lr, seed=args.seed),
        other_type=args.other_type,
        threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if not settings.calib_text.is_file():
            raise ConversionError(f"--calib: {settings.calib_text} not found")
        if args.outfile.parent and not args.outfile.parent.exists():
            args.outfile.parent.mkdir(parents=True)
        convert(args.model, args.outfile, settings)
    except (ConversionError, UnsupportedArchitecture, FileNotFoundError, ValueError) as e:
        print(f"convert-hf-to-nq-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0
