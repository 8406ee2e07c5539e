"""Kernel benchmark: one layer's product, NanoQuant against llama.cpp's types, on ggml's CPU backend in this process.

    .venv/bin/python bench/kernels.py [--reps 7] [--threads 1 2] [--batches 1 128] [--shapes smollm2 large stream]
                                      [--copies 8] [--out FILE]
    .venv/bin/python bench/kernels.py --table FILE     # the README's markdown table of a results file

A NanoQuant layer of d_out x d_in at a given bpw is the graph llama.cpp runs for it (s_pre, V, U, s_post as the
converter writes by default; rank from the method's rank rule); a llama.cpp type is one mul_mat of the dense
d_out x d_in weight (types whose block does not divide d_in are left out). Weights are random (speed only) and placed
as llama.cpp places them with repacking on (CPU_REPACK where ggml has a repacked kernel: Q4_0, NQ1). Every repetition
runs every configuration once, in turn, so drift on the machine hits all of them alike; the table gives medians.
Memory bandwidth is measured by numpy threads each summing 512 MiB, and reported with the large shapes.
Each timed graph holds `--copies` layers of the SmolLM2 shapes (each with its own weights, all on the same input, as
q/k/v are) and one of the large shapes: inside llama.cpp a product is one of hundreds in a token's graph, so the cost
of starting a graph (waking the threads, some microseconds) is not the product's; with one small product per graph it
would be most of what is timed. The time per product is the graph's time divided by its copies. `--copies 1` gives
the one-product-per-graph figures. One large layer at 1 bpw (2-6 MB) can stay in a big last-level cache from one
repetition to the next; the "stream" shapes (4096x4096, 32 copies, NQ and Q4_0, batch 1) read from memory.
Writes bench/results/kernels.json (or --out): {read_bandwidth_gbs, machine, rows: a list of {shape, d_out, d_in, type,
bpw, threads, batch, median_us, repacked, copies, rank}}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gguf import GGMLQuantizationType as T

from nanoquant import _core
from nanoquant.fileformat.nq1 import LayerBits, rank_for_bpw

from bench.common import RESULTS, meta, write_result

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "large": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "stream": [(4096, 4096)],
}
# layers per timed graph (see above); --copies overrides the SmolLM2 shapes'. "stream": 32 layers of NQ-1.0 are 64 MiB,
# twice a 32 MiB L3, so each product reads its weights from memory, not from a cache the last repetition filled
COPIES = {"smollm2": 8, "large": 1, "stream": 32}
STREAM_TYPES = ["NQ-1.0", "NQ-0.55", "Q4_0"]  # the "stream" group's types, batch 1 only
LLAMA_TYPES = ["F16", "Q8_0", "Q4_0", "Q2_K", "TQ1_0", "TQ2_0", "IQ1_S", "Q1_0"]
NQ_BPW = {"NQ-1.0": 1.0, "NQ-0.55": 0.55}
BLOCK = {name: T[name] for name in LLAMA_TYPES}
MIN_SECONDS = 0.02  # each timed call runs long enough for the clock


def bits_per_weight(type_name: str) -> float:
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[T[type_name]]
    return 8 * size / block


def configs(shapes, threads, batches):
    from gguf.constants import GGML_QUANT_SIZES
    for group in shapes:
        stream = group == "stream"
        for d_out, d_in in SHAPES[group]:
            for n_threads in threads:
                for batch in [1] if stream else batches:
                    label = f"{d_out}x{d_in}" + (f" x{COPIES[group]} copies" if stream else "")
                    base = {"shape": label, "d_out": d_out, "d_in": d_in, "threads": n_threads,
                            "batch": batch, "group": group, "copies": COPIES[group]}
                    for name, bpw in NQ_BPW.items():
                        rank = rank_for_bpw(d_out, d_in, bpw)
                        yield {**base, "type": name, "bpw": LayerBits(d_out, d_in, rank).bpw, "rank": rank}
                    for name in LLAMA_TYPES:
                        if (not stream or name in STREAM_TYPES) and d_in % GGML_QUANT_SIZES[T[name]][0] == 0:
                            yield {**base, "type": name, "bpw": bits_per_weight(name), "rank": 0}


def make(cfg):
    type_id = _core.NQ1_TYPE_ID if cfg["type"].startswith("NQ") else int(T[cfg["type"]])
    return _core.MulMatBench(type_id, cfg["d_out"], cfg["d_in"], cfg["batch"], cfg["threads"], True, cfg["rank"],
                             copies=cfg["copies"])


def read_bandwidth_gbs(threads: int) -> float:
    """`threads` numpy threads each summing its own 512 MiB int64 buffer (numpy drops the GIL there), best of 5:
    the read bandwidth a GEMV streaming its weights can hope for."""
    from concurrent.futures import ThreadPoolExecutor
    bufs = [np.ones(1 << 26, dtype=np.int64) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        best = min(_timed(lambda: list(pool.map(np.sum, bufs))) for _ in range(5))
    return sum(b.nbytes for b in bufs) / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--copies", type=int, default=COPIES["smollm2"], help="layers per timed graph, SmolLM2 shapes")
    p.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    p.add_argument("--table", type=Path, metavar="JSON",
                   help="time nothing: print the markdown table of a results file this script wrote")
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())), end="")
        return 0
    COPIES["smollm2"] = args.copies

    cfgs = list(configs(args.shapes, args.threads, args.batches))
    print(f"{len(cfgs)} configurations, {args.reps} interleaved repetitions", flush=True)
    benches, iters = [], []
    for cfg in cfgs:  # one object per configuration, built once; calibrate the iteration count
        b = make(cfg)
        cfg["repacked"] = b.repacked
        once = b.time(1)
        benches.append(b)
        iters.append(max(1, int(MIN_SECONDS / max(once, 1e-7))))
    samples = [[] for _ in cfgs]
    for rep in range(args.reps):
        for i, b in enumerate(benches):
            samples[i].append(b.time(iters[i]))
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    rows = []
    for cfg, s in zip(cfgs, samples):
        rows.append({k: cfg[k] for k in ("shape", "d_out", "d_in", "type", "bpw", "threads", "batch", "repacked",
                                         "copies")}
                    | {"median_us": statistics.median(s) * 1e6, "rank": cfg["rank"]})
    bandwidth = {t: read_bandwidth_gbs(t) for t in args.threads}
    report(rows, bandwidth)
    made = meta(argv)
    write_result(args.out, {"read_bandwidth_gbs": bandwidth, "machine": made["machine"], "rows": rows}, made)
    print(f"wrote {args.out}")
    return 0


def report(rows, bandwidth):
    by_key = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["threads"], r["batch"]), {})[r["type"]] = r
    print("\nmedian microseconds per product; ratio = type's time / NQ-1.0's time (>1: NQ-1.0 faster)")
    print("read bandwidth (numpy sums of 512 MiB per thread): " +
          ", ".join(f"{t} thread(s) {gbs:.1f} GB/s" for t, gbs in bandwidth.items()) + "\n")
    for (shape, threads, batch), group in by_key.items():
        nq = group["NQ-1.0"]["median_us"]
        cells = [f"{t} {r['median_us']:.1f}us ({r['median_us'] / nq:.2f}x)" for t, r in group.items()]
        print(f"{shape:>11} t{threads} b{batch:<4} " + " | ".join(cells))
        if batch == 1 and group["NQ-1.0"]["d_out"] * group["NQ-1.0"]["d_in"] >= 1 << 24:
            nq_row = group["NQ-1.0"]
            weight_bytes = nq_row["bpw"] * nq_row["d_out"] * nq_row["d_in"] / 8
            where = "from memory" if nq_row["copies"] > 1 else "(one layer: it may stay in the last-level cache)"
            print(f"{'':>21} NQ-1.0 reads {weight_bytes / nq / 1e3:.1f} GB/s of weights {where} "
                  f"({100 * weight_bytes / nq / 1e3 / bandwidth[threads]:.0f}% of the measured {threads}-thread read "
                  f"bandwidth)")


TABLE_TYPES = ["Q4_0", "TQ1_0", "IQ1_S", "Q1_0"]  # ratio columns: NQ-1.0 against these


def markdown(results: dict) -> str:
    """The README's table of a results file: NQ times, Q4_0's, and the ratios (type's time / NQ-1.0's)."""
    bandwidth = ", ".join(f"{t} thread(s) {gbs:.1f} GB/s" for t, gbs in results["read_bandwidth_gbs"].items())
    lines = [f"Median microseconds per product; ratio = type's time / NQ-1.0's (\"-\": the type's block does not "
             f"divide d_in). Machine: {results.get('machine', 'not recorded')}; numpy read {bandwidth}.", "",
             "| shape (d_out x d_in) | threads | batch | NQ-1.0 us | NQ-0.55 us | Q4_0 us | "
             + " | ".join(f"{t} / NQ-1.0" for t in TABLE_TYPES) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(TABLE_TYPES)]
    groups = {}
    for r in results["rows"]:
        groups.setdefault((r["shape"], r["threads"], r["batch"]), {})[r["type"]] = r["median_us"]
    order = sorted(groups, key=lambda key: (key[2], key[1]))  # batch, then threads; shapes in run order
    for shape, threads, batch in order:
        us = groups[(shape, threads, batch)]
        ratios = [f"{us[t] / us['NQ-1.0']:.2f}" if t in us else "-" for t in TABLE_TYPES]
        lines.append(f"| {shape} | {threads} | {batch} | {us['NQ-1.0']:.1f} | {us['NQ-0.55']:.1f} | {us['Q4_0']:.1f} | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
