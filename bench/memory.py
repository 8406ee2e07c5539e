"""Peak memory of the converter on a synthetic Llama-2-7B-shaped model, extrapolated to all 32 blocks.

    .venv/bin/python bench/memory.py [--blocks 2 4] [--bpw 1.0]

A random model with Llama-2-7B's block shapes (hidden 4096, MLP 11008, 32 heads; the vocabulary is the SmolLM2
tokenizer's 49152, larger than Llama-2's 32000) but only a few decoder blocks is written as a bf16 safetensors
folder and converted with the whole method at token effort (two windows and a step or two per stage: memory, not
quality, is measured), with the standard preset's window length. Distillation recomputes block activations in
its backward, as `--distill-recompute auto` does for a 32-block 7B model (the converter's measured activations,
scaled to 32 blocks, are checked against the converter's threshold and reported). The converter prints the peak
RSS of each stage on its own (loading, statistics, blocks, distillation, writing); each stage is extrapolated
linearly from the two block counts to 32 blocks, and the largest is the projection. Calibration streams
(3 x windows x tokens x hidden x 4 bytes) scale with the number of windows, not with depth, and are added for the
`standard` preset's calibration tokens.
Writes bench/results/memory.json.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)
FULL_DEPTH = 32

from nanoquant.convert.reconstruct import RECOMPUTE_ABOVE_BYTES
from nanoquant.convert.settings import PRESETS

from bench.common import REPO, RESULTS, meta, write_result
STAGE_PEAK = re.compile(r"^([a-z ]+):.*?peak RSS (\d+) MiB$", re.MULTILINE)  # the converter's stage lines
STAGES = {"loading", "calibration", "statistics", "rank allocation", "blocks", "scale distillation", "writing"}
ACTIVATIONS = re.compile(r"activations through all blocks take ([0-9.]+) GiB")


def make_model(folder: Path, n_blocks: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=n_blocks, **SHAPE)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    gguf = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the calibration text is tokenized by it
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(folder)
    del model


def convert(folder: Path, out: Path, bpw: float) -> dict:
    window = PRESETS["standard"].calib_window_tokens
    cmd = [sys.executable, str(REPO / "convert" / "convert-hf-to-nq-gguf.py"), str(folder), "--outfile", str(out),
           "--bpw", str(bpw), "--calib-windows", "2", "--calib-window-tokens", str(window), "--admm-iterations", "2",
           "--dense-steps", "1", "--factor-steps", "1", "--distill-steps", "2", "--tune-batch", "1",
           "--distill-recompute", "on"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{proc.stderr[-3000:]}")
    stages = {m.group(1): float(m.group(2)) for m in STAGE_PEAK.finditer(proc.stdout)}
    missing = STAGES - set(stages)
    if missing:
        raise RuntimeError(f"the converter printed no peak RSS for {sorted(missing)}:\n{proc.stdout[-3000:]}")
    activations = ACTIVATIONS.search(proc.stdout)
    if activations is None:
        raise RuntimeError(f"the converter did not report distillation's activations:\n{proc.stdout[-3000:]}")
    return {"stage_peak_rss_mib": stages, "activations_gib": float(activations.group(1)),
            "seconds": time.time() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs=2, default=[2, 4])
    p.add_argument("--bpw", type=float, default=1.0)
    args = p.parse_args(argv)
    runs = []
    for n in args.blocks:
        with tempfile.TemporaryDirectory(prefix="nq-7b-shape-") as tmp:
            folder = Path(tmp) / "hf"
            make_model(folder, n)
            result = convert(folder, Path(tmp) / "out.gguf", args.bpw)
        runs.append({"blocks": n, **result})
        peaks = ", ".join(f"{stage} {mib:.0f}" for stage, mib in result["stage_peak_rss_mib"].items())
        print(f"{n} blocks in {result['seconds']:.0f} s, peak RSS by stage (MiB): {peaks}", flush=True)
    (a, b) = runs
    activations_full_gib = b["activations_gib"] / b["blocks"] * FULL_DEPTH
    if activations_full_gib * 2**30 <= RECOMPUTE_ABOVE_BYTES:
        raise RuntimeError(f"at {FULL_DEPTH} blocks --distill-recompute auto would not recompute "
                           f"({activations_full_gib:.1f} GiB of activations): this run does not show what it does")
    per_block, projected_stages = {}, {}
    for stage, peak_a in a["stage_peak_rss_mib"].items():
        per_block[stage] = (b["stage_peak_rss_mib"][stage] - peak_a) / (b["blocks"] - a["blocks"])
        projected_stages[stage] = peak_a + per_block[stage] * (FULL_DEPTH - a["blocks"])
    standard = PRESETS["standard"]
    calib_tokens = standard.calib_windows * standard.calib_window_tokens
    streams_mib = 3 * calib_tokens * SHAPE["hidden_size"] * 4 / 2**20
    peak_stage = max(projected_stages, key=projected_stages.get)
    projected = projected_stages[peak_stage] + streams_mib
    report = {"shape": SHAPE, "bpw": args.bpw, "runs": runs, "per_block_mib": per_block,
              "projected_stage_mib": projected_stages, "standard_calibration_tokens": calib_tokens,
              "standard_streams_mib": streams_mib, "distill_activations_32_blocks_gib": activations_full_gib,
              "peak_stage": peak_stage, "projected_32_blocks_mib": projected}
    write_result(RESULTS / "memory.json", report, meta(argv))
    print(f"distillation's activations at {FULL_DEPTH} blocks: {activations_full_gib:.1f} GiB a window, so "
          f"--distill-recompute auto recomputes them")
    for stage, mib in projected_stages.items():
        print(f"{stage}: {per_block[stage]:.0f} MiB per block, {mib / 1024:.1f} GiB at 32 blocks")
    print(f"projected for 32 blocks with {calib_tokens} calibration tokens: {projected / 1024:.1f} GiB, in the "
          f"{peak_stage} stage (limit 24 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
