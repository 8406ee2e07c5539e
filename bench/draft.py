"""NanoQuant files as draft models for speculative decoding of their own model's larger file.

For each draft, `llama-speculative` decodes greedily with the target and the draft (same vocabulary): the share of
drafted tokens the target accepts, and the end-to-end decode speed against the target decoding alone
(`llama-completion`, the same prompt and token count). Greedy decoding makes the speculative text the target's own,
which is checked. Prompts go through the target's chat template, as a user's chat would.

    python -m bench.draft --target TARGET.gguf --drafts DRAFT.gguf [...] [--tokens 128] [--draft-max 2 8]
    writes bench/results/draft-<target model>.{json,md}
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench.common import BIN, RESULTS, meta, run_streams, write_result
from bench.quality import model_name

PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a lighthouse keeper.",
    "List five uses of a paper clip and explain each one.",
)
TAIL_CHARS = 200


def chat_prompt(model: Path, instruction: str) -> str:
    from nanoquant import Model

    with Model(model, n_ctx=512) as m:
        return m.apply_chat_template([{"role": "user", "content": instruction}])


def _number(pattern: str, text: str, what: str) -> float:
    match = re.search(pattern, text)
    if not match:
        raise RuntimeError(f"no {what} in the output:\n{text[-3000:]}")
    return float(match.group(1))


def target_alone(target: Path, prompt: str, tokens: int, threads: int) -> tuple[float, str]:
    """The target's decode rate and its text (stdout: the prompt, then the answer)."""
    text, log = run_streams([BIN / "llama-completion", "-m", target, "-p", prompt, "-n", tokens, "--temp", 0,
                             "--ignore-eos", "-no-cnv", "-t", threads], f"llama-completion {target.name}")
    # the decode line, not "prompt eval time"
    return _number(r"(?<!prompt )eval time = .*?([0-9.]+) tokens per second", log, "decode speed"), text


def speculative(target: Path, draft: Path, prompt: str, tokens: int, draft_max: int, threads: int,
                alone_text: str) -> dict:
    """Speed, drafted and accepted tokens, and whether the greedy answer is the target's own (its last
    TAIL_CHARS characters found in the speculative text, which may run a few tokens past -n)."""
    text, log = run_streams([BIN / "llama-speculative", "-m", target, "-md", draft, "-p", prompt, "-n", tokens,
                             "--temp", 0, "--ignore-eos", "-t", threads, "--spec-draft-n-max", draft_max],
                            f"llama-speculative {target.name} drafted by {draft.name}")
    out = text + log
    return {"tps": _number(r"decoded\s+\d+ tokens in\s+[0-9.]+ seconds, speed:\s+([0-9.]+) t/s", out, "speed"),
            "drafted": int(_number(r"n_drafted\s*=\s*(\d+)", out, "n_drafted")),
            "accepted": int(_number(r"n_accept\s*=\s*(\d+)", out, "n_accept")),
            "same_text": alone_text.strip()[-TAIL_CHARS:] in text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--drafts", type=Path, nargs="+", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-max", type=int, nargs="+", default=[2, 8],
                        help="tokens drafted at most per step (--spec-draft-n-max), each value a row per draft")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    prompts = [chat_prompt(args.target, p) for p in PROMPTS]
    alone = [target_alone(args.target, p, args.tokens, args.threads) for p in prompts]
    alone_tps = sum(tps for tps, _ in alone) / len(alone)
    rows = [{"draft": None, "file_bytes": None, "tps": alone_tps, "acceptance": None, "speedup": 1.0}]
    print(f"{args.target.name} alone: {alone_tps:.2f} t/s", flush=True)
    for draft in args.drafts:
        for draft_max in args.draft_max:
            runs = [speculative(args.target, draft, p, args.tokens, draft_max, args.threads, text)
                    for p, (_, text) in zip(prompts, alone)]
            drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
            tps = sum(r["tps"] for r in runs) / len(runs)
            rows.append({"draft": draft.name, "draft_max": draft_max, "file_bytes": draft.stat().st_size,
                         "tps": tps, "acceptance": accepted / max(drafted, 1), "drafted": drafted, "accepted": accepted,
                         "speedup": tps / alone_tps, "same_text": sum(r["same_text"] for r in runs)})
            print(f"drafted by {draft.name}, at most {draft_max}: acceptance {accepted / max(drafted, 1):.1%}, "
                  f"{tps:.2f} t/s ({tps / alone_tps:.2f}x), the target's text in "
                  f"{rows[-1]['same_text']}/{len(prompts)}", flush=True)
    # the quality table's files sit in bench/results/<model>/ under their type's name; another file is named by its own
    target = args.target.resolve()
    name = target.parent.name if target.parent.parent == RESULTS else model_name(target)
    lines = [f"Target `{args.target.name}`; greedy, {args.tokens} tokens after each of {len(PROMPTS)} chat prompts, "
             f"{args.threads} threads; speed is the decode rate, averaged over prompts; draft max: llama-speculative's "
             "--spec-draft-n-max; acceptance: accepted / drafted tokens.",
             "same text: answers whose greedy text is the target's own (speculative decoding must not change it).", "",
             "| draft | draft MB | draft max | acceptance | tokens/s | speedup | same text |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 1e6:,.1f}"
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
        same = "-" if r["draft"] is None else f"{r['same_text']}/{len(PROMPTS)}"
        lines.append(f"| {r['draft'] or '(target alone)'} | {size} | {r.get('draft_max', '-')} | {acceptance} | "
                     f"{r['tps']:.2f} | {r['speedup']:.2f}x | {same} |")
    out = args.out or RESULTS / f"draft-{name}.json"
    write_result(out, {"target": args.target.name, "tokens": args.tokens, "threads": args.threads, "rows": rows},
                 meta(argv), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
