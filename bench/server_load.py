"""llama-server under load: aggregate decode tokens/s at 1, 2 and 4 slots, the NQ file against Q4_0 of the same
model, both served by the same patched llama-server on this machine one after the other; and the robustness run
(4 slots, 8 clients, streamed and plain requests, some dropped mid-stream).

    .venv/bin/python bench/server_load.py [--nq FILE] [--q4 FILE] [--requests 4] [--max-tokens 64]

Throughput: as many clients as slots, each sending --requests plain chat completions of exactly --max-tokens tokens
(ignore_eos, greedy), so every run decodes the same number of tokens; tokens/s = completion tokens / wall time,
prompt processing included. Defaults: the fast-preset NQ file of bench/quality.py and a Q4_0 made from the embedded
Q4_1 teacher by llama-quantize. Writes bench/results/server-load.json and .md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench import serverload
from bench.common import BIN, DEFAULT_MODEL, RESULTS, meta, write_result
from bench.malformed import DEFAULT_NQ

TEACHER = DEFAULT_MODEL
SLOTS = (1, 2, 4)


def q4_0(out: Path) -> Path:
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        subprocess.run([str(BIN / "llama-quantize"), "--allow-requantize", str(TEACHER), str(tmp), "Q4_0", "2"],
                       check=True, capture_output=True)
        tmp.replace(out)
    return out


def throughput(model: Path, slots: int, requests: int, max_tokens: int) -> dict:
    with serverload.Server(BIN, model, slots=slots) as server:
        serverload.lone_tokens(server, serverload.PROMPTS[0], 4)  # warm-up: first-use allocations out of the timing
        report = serverload.run_load(server, slots, requests, max_tokens, ignore_eos=True)
    if report.failures:
        raise RuntimeError(f"{model.name}, {slots} slots: " + "; ".join(report.failures))
    return {"slots": slots, "tokens": sum(r.completion_tokens for r in report.requests),
            "seconds": round(report.seconds, 2), "tokens_per_s": round(report.tokens_per_s, 1)}


def robustness(model: Path) -> dict:
    with serverload.Server(BIN, model, slots=4) as server:
        lone = serverload.lone_tokens(server, serverload.PROMPTS[0], 16)
        report = serverload.run_load(server, 8, 4, 48, drop_every=2)
        same = [r.tokens[:16] == lone[:16] for r in report.requests
                if r.prompt == serverload.PROMPTS[0] and r.outcome == "completed"]
    return {"requests": len(report.requests), "completed": report.count("completed"),
            "cancelled": report.count("cancelled"), "failed": len(report.failures), "failures": report.failures,
            "server_alive_after": report.server_alive_after, "seconds": round(report.seconds, 1),
            "lone_vs_batched_first_16_tokens_agree": f"{sum(same)}/{len(same)}"}


def markdown(report: dict) -> str:
    lines = [f"llama-server load (`bench/server_load.py`), {report['machine']}, -t 2, "
             f"{report['requests']} requests of {report['max_tokens']} tokens per client, clients = slots.", "",
             "| slots | " + " | ".join(f"{name} tok/s" for name in report["throughput"]) + " | NQ / Q4_0 |",
             "|---:|" + "---:|" * (len(report["throughput"]) + 1)]
    nq, q4 = report["throughput"].values()
    for a, b in zip(nq, q4):
        lines.append(f"| {a['slots']} | {a['tokens_per_s']} | {b['tokens_per_s']} | "
                     f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
    r = report["robustness"]
    lines += ["", f"Robustness (NQ, 4 slots, 8 clients x 4 requests, every 2nd streamed request dropped after 3 "
                  f"chunks): {r['completed']} completed, {r['cancelled']} cancelled, {r['failed']} failed, server "
                  f"alive after: {r['server_alive_after']}; lone vs batched greedy answers, first 16 tokens equal: "
                  f"{r['lone_vs_batched_first_16_tokens_agree']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nq", type=Path, default=DEFAULT_NQ)
    parser.add_argument("--q4", type=Path, default=None, help="a Q4_0 GGUF (default: made from the teacher)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.nq.is_file():
        sys.exit(f"{args.nq}: no such file (the default is made by `bench/quality.py --rows 'NQ 1.0 (fast preset)'`)")
    q4 = args.q4 or q4_0(RESULTS / "SmolLM2-135M-Instruct" / "Q4_0.gguf")
    made = meta(argv)
    report = {"machine": made["machine"],
              "requests": args.requests, "max_tokens": args.max_tokens, "throughput": {}}
    for name, model in ((f"NQ ({args.nq.name})", args.nq), (f"Q4_0 ({q4.name})", q4)):
        report["throughput"][name] = []
        for slots in SLOTS:
            row = throughput(model, slots, args.requests, args.max_tokens)
            print(f"{name}, {slots} slots: {row['tokens_per_s']} tok/s", flush=True)
            report["throughput"][name].append(row)
    report["robustness"] = robustness(args.nq)
    write_result(RESULTS / "server-load.json", report, made, markdown(report))
    print(markdown(report))
    return 0 if report["robustness"]["failed"] == 0 and report["robustness"]["server_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
