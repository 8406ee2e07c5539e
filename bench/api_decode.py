"""Decode speed through the Python API (nanoquant.Model) against llama-bench tg on the same file and threads.

    .venv/bin/python bench/api_decode.py [MODEL.gguf] [--reps 5] [--threads 1 2] [--tokens 64]

llama-bench `-p 0 -n N -r 1` decodes N tokens one at a time from an empty context; the API side generates N tokens
greedily after a one-token prompt (BOS) with end-of-generation tokens banned, timing the N steps after the first, so
each of its tokens pays what a script pays: a sample over the whole vocabulary, the decode, the piece of text, and
Python's loop. Repetitions alternate the two sides; medians. MODEL defaults to the quality table's SmolLM2 NQ 1.0
file, or (if bench/quality.py has not made it) a file with random signs at the same ranks.
Writes bench/results/api_decode.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import BIN, DEFAULT_MODEL, RESULTS, meta, run, write_result
from bench.decode import synthetic_nq
from bench.quality import Bench


def default_model() -> Path:
    bench = Bench(DEFAULT_MODEL, 150, 2, "standard")
    converted = bench.dir / "NQ-1.0.gguf"
    return converted if converted.is_file() else synthetic_nq(bench.f32(), bench.dir /
                                                               "decode-NQ-1.0-random-signs.gguf", 1.0, "q8_0")


def llama_bench_tg(model: Path, threads: int, tokens: int) -> float:
    text = run([BIN / "llama-bench", "-m", model, "-p", 0, "-n", tokens, "-t", threads, "-r", 1, "-o", "json"],
               f"llama-bench {model.name}")
    return float(json.loads(text[text.index("["): text.rindex("]") + 1])[0]["avg_ts"])


def api_tg(model, tokens: int) -> float:
    engine = model._engine
    pieces = model.stream([engine.bos], max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    next(pieces)  # prompt and first step: not timed, as llama-bench's tg times no prompt
    start, first = time.perf_counter(), engine.n_cached
    for _ in pieces:
        pass
    return (engine.n_cached - first) / (time.perf_counter() - start)


def main(argv=None) -> int:
    from nanoquant import Model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)
    path = args.model or default_model()
    if not path.is_file():
        p.error(f"{path}: no such file")

    models = {t: Model(path, n_ctx=4 * args.tokens, n_threads=t) for t in args.threads}
    for model in models.values():
        api_tg(model, 8)  # warm-up, as llama-bench does its own
    samples: dict[tuple, list[float]] = {}
    for rep in range(args.reps):
        for threads, model in models.items():
            samples.setdefault(("llama-bench", threads), []).append(llama_bench_tg(path, threads, args.tokens))
            samples.setdefault(("api", threads), []).append(api_tg(model, args.tokens))
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    for model in models.values():
        model.close()

    made = meta(argv)
    rows = []
    for threads in args.threads:
        bench, api = (statistics.median(samples[(side, threads)]) for side in ("llama-bench", "api"))
        rows.append({"model": path.name, "threads": threads, "tokens": args.tokens, "llama_bench_tg_tps": bench,
                     "api_tg_tps": api, "api_over_llama_bench": api / bench,
                     "samples": {side: samples[(side, threads)] for side in ("llama-bench", "api")},
                     "machine": made["machine"]})
    write_result(RESULTS / "api_decode.json", {"rows": rows}, made)
    print(f"{path.name}, tg{args.tokens}, medians of {args.reps} interleaved repetitions ({made['machine']})")
    print("| threads | llama-bench t/s | nanoquant.Model t/s | API / llama-bench |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['llama_bench_tg_tps']:.1f} | {r['api_tg_tps']:.1f} | "
              f"{r['api_over_llama_bench']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
