"""Peak memory of the converter on a synthetic Llama-2-7B-shaped model, extrapolated to all 32 blocks.

    .venv/bin/python bench/memory.py [--blocks 2 3] [--bpw 1.0]

A random model with Llama-2-7B's block shapes (hidden 4096, MLP 11008, 32 heads; the vocabulary is the SmolLM2
tokenizer's 49152, larger than Llama-2's 32000) but only a few decoder blocks is written as a bf16 safetensors
folder and converted with the whole method at token effort (a few windows and steps: memory, not quality, is
measured). The converter streams blocks from safetensors, so its peak RSS grows only by what each finished block
leaves behind (its int8 signs); the slope between two block counts gives the 32-block figure. Calibration streams
(3 x windows x tokens x hidden x 4 bytes) scale with the calibration effort, not with depth, and are added for
the `standard` preset's calibration tokens.
Writes bench/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)
FULL_DEPTH = 32


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
    cmd = [sys.executable, str(REPO / "convert" / "convert-hf-to-nq-gguf.py"), str(folder), "--outfile", str(out),
           "--bpw", str(bpw), "--calib-windows", "2", "--calib-window-tokens", "128", "--admm-iterations", "2",
           "--dense-steps", "1", "--factor-steps", "1", "--distill-steps", "1", "--tune-batch", "1"]
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"peak_rss_mib": peak_kib / 1024, "seconds": time.time() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs=2, default=[2, 3])
    p.add_argument("--bpw", type=float, default=1.0)
    args = p.parse_args(argv)
    runs = []
    for n in args.blocks:
        with tempfile.TemporaryDirectory(prefix="nq-7b-shape-") as tmp:
            folder = Path(tmp) / "hf"
            make_model(folder, n)
            result = convert(folder, Path(tmp) / "out.gguf", args.bpw)
        runs.append({"blocks": n, **result})
        print(f"{n} blocks: peak RSS {result['peak_rss_mib']:.0f} MiB in {result['seconds']:.0f} s", flush=True)
    (a, b) = runs
    per_block = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["blocks"] - a["blocks"])
    sys.path.insert(0, str(REPO / "python"))
    from nanoquant.convert import PRESETS
    standard = PRESETS["standard"]
    calib_tokens = standard["calib_windows"] * standard["calib_window_tokens"]
    streams_mib = 3 * calib_tokens * SHAPE["hidden_size"] * 4 / 2**20
    projected = a["peak_rss_mib"] + per_block * (FULL_DEPTH - a["blocks"]) + streams_mib
    report = {"shape": SHAPE, "bpw": args.bpw, "runs": runs, "per_block_mib": per_block,
              "standard_calibration_tokens": calib_tokens, "standard_streams_mib": streams_mib,
              "projected_32_blocks_mib": projected}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"per block {per_block:.0f} MiB; projected for 32 blocks with {calib_tokens} calibration tokens: "
          f"{projected / 1024:.1f} GiB (limit 24 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
