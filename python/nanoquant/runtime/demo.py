"""`make demo`: a converted NanoQuant GGUF beside its teacher: the same questions answered by both, the file sizes,
perplexity on a few chunks of WikiText-2 test and decode speed (llama-bench), so what one bit per weight does to the
model is plain to see."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from nanoquant.fileformat.info import describe
from nanoquant.runtime.model import Model

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
PROMPTS = (DEFAULT_PROMPT, "How many legs does a spider have?", "Name three colours of the rainbow.")
ANSWER_TOKENS = 48
PPL_CHUNKS = 8


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


def answers(model: Path, prompts: tuple[str, ...], threads: int) -> list[str]:
    """Greedy chat answers under the file's own chat template, through nanoquant.Model (the same libllama)."""
    with Model(model, n_ctx=1024, n_threads=threads) as m:
        return [m.chat([{"role": "user", "content": p}], max_tokens=ANSWER_TOKENS, temperature=0).strip()
                for p in prompts]


def perplexity(model: Path, text: str, threads: int) -> float:
    with Model(model, n_ctx=512, n_threads=threads) as m:
        return m.perplexity(text, n_ctx=512, n_chunks=PPL_CHUNKS)


def decode_speed(bin_dir: Path, model: Path, threads: int) -> float:
    """llama-bench tg32 tokens per second (one repetition: a demo, not a benchmark; bench/decode.py measures)."""
    proc = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", "32", "-r", "1",
                           "-t", str(threads), "-o", "json"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {model} ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout[proc.stdout.index("["):])[0]["avg_ts"])


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text) or "(nothing)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="the NanoQuant GGUF")
    p.add_argument("--teacher", type=Path, required=True, help="the GGUF it was converted from")
    p.add_argument("--bin", type=Path, default=Path("build/bin"), help="the patched llama.cpp tools")
    p.add_argument("--text", type=Path, help="text for the perplexity line (WikiText-2 test); none: no such line")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for path in (args.model, args.teacher):
        if not path.is_file():
            p.error(f"{path}: no such file")
    info = describe(args.model)
    files = {"teacher": args.teacher, "NanoQuant": args.model}
    print(f"{'':<10} {'file':<44} {'size':>9} {'decode t/s':>11}")
    speed = {}
    for label, path in files.items():
        speed[label] = decode_speed(args.bin, path, args.threads)
        print(f"{label:<10} {path.name:<44} {path.stat().st_size / 1e6:>7.1f} MB {speed[label]:>11.1f}")
    print(f"\nThe NanoQuant file: {len(info.layers)} factorised layers at {info.bpw_linear:.3f} bits per weight, "
          f"{info.bpw_file:.2f} bits per parameter over the whole file; decodes {speed['NanoQuant'] / speed['teacher']:.2f}x "
          f"as fast as its teacher here (llama-bench tg32, {args.threads} threads).")
    if args.text:
        text = args.text.read_text(encoding="utf-8")
        ppl = {label: perplexity(path, text, args.threads) for label, path in files.items()}
        print(f"Perplexity on {PPL_CHUNKS} chunks of {args.text.name}: teacher {ppl['teacher']:.2f}, NanoQuant "
              f"{ppl['NanoQuant']:.2f} ({ppl['NanoQuant'] / ppl['teacher']:.1f}x).")
    replies = {label: answers(path, PROMPTS, args.threads) for label, path in files.items()}
    for i, prompt in enumerate(PROMPTS):
        print(f"\nQ: {prompt}")
        for label in files:
            print(textwrap.fill(one_line(replies[label][i]), width=116, initial_indent=f"  {label + ':':<11}",
                                subsequent_indent=" " * 13))
    print(f"\nChat with it: {args.bin / 'llama-cli'} -m {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
