"""Quantized KV cache and flash attention on NanoQuant files: llama-perplexity on WikiText-2 test (ctx 512) for each
cache setting, against the F16 cache without flash attention.

llama.cpp quantizes the K cache with or without flash attention; a quantized V cache needs flash attention. The
settings are the ones users pick to fit longer contexts: -ctk/-ctv f16, q8_0, q4_0, -fa on/off.

    python -m bench.kvcache MODEL.gguf [MODEL.gguf ...] [--chunks 40]   writes bench/results/kvcache.{json,md}
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import BIN, RESULTS, TEST_TEXT, final_perplexity, meta, run, write_result

# (K cache type, V cache type, flash attention); the first is the reference
SETTINGS = (("f16", "f16", False), ("f16", "f16", True), ("q8_0", "f16", False), ("q8_0", "q8_0", True),
            ("q4_0", "f16", False), ("q4_0", "q4_0", True))


def label(k: str, v: str, fa: bool) -> str:
    return f"K {k}, V {v}, flash attention {'on' if fa else 'off'}"


def perplexity(model: Path, k: str, v: str, fa: bool, chunks: int, text: Path = TEST_TEXT, threads: int = 2) -> float:
    what = f"llama-perplexity {model.name} {label(k, v, fa)}"
    out = run([BIN / "llama-perplexity", "-m", model, "-f", text, "-c", 512, "--chunks", chunks, "-t", threads,
               "-ctk", k, "-ctv", v, "-fa", "on" if fa else "off"], what)
    return final_perplexity(out, what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS / "kvcache.json")
    args = parser.parse_args(argv)

    rows = []
    for model in args.models:
        results = [(k, v, fa, perplexity(model, k, v, fa, args.chunks)) for k, v, fa in SETTINGS]
        base = results[0][3]
        for k, v, fa, ppl in results:
            rows.append({"model": model.name, "ctk": k, "ctv": v, "flash_attn": fa, "ppl": ppl,
                         "change": ppl / base - 1})
            print(f"{model.name}: {label(k, v, fa)}: PPL {ppl:.3f} ({(ppl / base - 1) * 100:+.2f}%)", flush=True)
    lines = [f"llama-perplexity, WikiText-2 test, ctx 512, {args.chunks} chunks; change against K f16, V f16 without "
             "flash attention.", "", "| model | K cache | V cache | flash attention | PPL | change |",
             "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['ctk']} | {r['ctv']} | {'on' if r['flash_attn'] else 'off'} | {r['ppl']:.3f} | "
              f"{r['change'] * 100:+.2f}% |" for r in rows]
    write_result(args.out, {"chunks": args.chunks, "rows": rows}, meta(argv), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
