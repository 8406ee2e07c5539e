"""`make demo`: describe a converted NanoQuant GGUF and answer one chat prompt with patched llama-cli."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .fileinfo import describe

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def chat_once(bin_dir: Path, model: Path, prompt: str, n_predict: int = 64, threads: int = 2) -> str:
    """One non-interactive chat turn through llama-cli (the GGUF's chat template), greedy; returns the answer."""
    cmd = [str(bin_dir / "llama-cli"), "-m", str(model), "-p", prompt, "-n", str(n_predict), "-st",
           "--temp", "0", "-t", str(threads), "--no-display-prompt", "--simple-io", "--no-show-timings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-cli failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    # llama-cli prints a banner, then "> prompt", the answer, and "Exiting..."
    out = proc.stdout
    marker = f"> {prompt}"
    start = out.find(marker)
    answer = out[start + len(marker):] if start >= 0 else out
    return answer.split("Exiting...")[0].strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--bin", type=Path, default=Path("build/bin"))
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = p.parse_args(argv)
    info = describe(args.model)
    print(f"file:            {info.path}")
    print(f"size:            {info.size_bytes:,} bytes ({info.size_bytes / 2**20:.1f} MiB)")
    print(f"NanoQuant layers: {len(info.layers)}, realized bpw {info.bpw_linear:.4f} (signs + F32 scales per weight)")
    print(f"whole file:      {info.bpw_file:.3f} bits per parameter of the dense model")
    print(f"prompt:          {args.prompt}")
    print(f"answer:          {chat_once(args.bin, args.model, args.prompt)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
