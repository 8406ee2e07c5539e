"""Hugging Face model (folder or GGUF) -> NanoQuant GGUF: the method's stages in order, each in a module of its own.

    source      the model, its tokenizer, its blocks streamed one at a time, the base file (source.py)
    windows     calibration windows: raw text and the teacher's own conversations (windows.py)
    statistics  every layer's input and output-gradient moments (calibration.StatsCollector)
    ranks       every layer's rank from the bit budget (ranks.allocate_ranks)
    blocks      per decoder block: dense tuning, Hessian-aware ADMM, STE tuning (blocks.py)
    distill     the scales against the teacher's logits (reconstruct.distill_scales)
    output      the GGUF (output.py, fileformat.writer)

Each stage's result is checkpointed in the work folder (checkpoint.py). The command line is
convert/convert-hf-to-nq-gguf.py; the settings, presets and options are in settings.py.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import gguf
import torch
from tqdm import tqdm

from nanoquant.convert import preflight
from nanoquant.convert.architectures import UnsupportedArchitecture, architecture_for
from nanoquant.convert.blocks import LayerReport, fixed_log_windows, quantize_block, quantize_head, rank_scaled_settings
from nanoquant.convert.calibration import CalibrationError, StatsCollector
from nanoquant.convert.checkpoint import CheckpointError, WorkFolder, as_jsonable, work_identity
from nanoquant.convert.memory import StagePeaks, return_freed_memory_to_the_system
from nanoquant.convert.output import print_summary, settings_record, tensor_types, to_file_order
from nanoquant.convert.ranks import allocate_ranks
from nanoquant.convert.reconstruct import FrozenLowRankBinary, capture_block_inputs, distill_recompute, distill_scales
from nanoquant.convert.settings import (CHAT_AUTO, CHAT_NONE, ConvertSettings, DEFAULT_PRESET, PRESETS, add_options,
                                        resolved, settings_from_args, torch_device)
from nanoquant.convert.source import ConversionError, Source, load_source, model_type
from nanoquant.convert.units import HEAD, install_unit, unit_module, unit_rows
from nanoquant.convert.windows import calibration_windows
from nanoquant.fileformat import nq1
from nanoquant.fileformat.writer import NQLayerTensors, write_nq_gguf


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
    windows = calibration_windows(source, settings, work).to(device)
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
        recompute = distill_recompute(settings.distill.recompute, model.model.layers, data)
        fixed = fixed_log_windows(windows.shape[0])
        result = distill_scales(model, data.fp, windows, settings.distill, recompute, settings.seed, fixed,
                                teacher_head, settings.matmul)
        print(f"scale distillation: KL on {len(fixed)} fixed windows {result.kl_before:.4f} "
              f"-> {result.kl_after:.4f}"
              f"{' (not lower: the scales before distillation are kept)' if result.reverted else ''}, "
              f"in {time.time() - clock:.0f} s, {peaks.end_stage()}")
    tensors = [to_file_order(arch, config, n_layers, name, unit_module(model, name).layer(),
                              unit_module(model, name).bias, unit_rows(model, name)) for name in names]
    work.save_final(tensors, reports, final_key)
    return tensors, reports, settings, head_imatrix


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
    arch = architecture_for(model_type(model_path))  # an unsupported model fails before a work folder appears
    work_path = work_dir or out_path.with_name(out_path.name + ".work")
    work = WorkFolder(work_path, work_identity(model_path, settings), resume)
    try:
        with tempfile.TemporaryDirectory(prefix="nanoquant-") as tmp:
            source = load_source(model_path, Path(tmp), arch, device)
            print(f"loading: on {device}, {peaks.end_stage()}")
            tensors, reports, as_run, head_imatrix = quantize_model(source, settings, work, peaks)
            metadata = {
                nq1.KEY_TARGET_BPW: (float(settings.bpw), gguf.GGUFValueType.FLOAT32),
                nq1.KEY_SETTINGS: (settings_record(as_run), gguf.GGUFValueType.STRING),
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
