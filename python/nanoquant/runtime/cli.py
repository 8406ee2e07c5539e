"""`nanoquant generate|chat|info MODEL.gguf`: the Python API from a shell.

    nanoquant generate MODEL.gguf -p "Once upon a time" -n 64 --temp 0
    echo "What is 2+2?" | nanoquant chat MODEL.gguf          # one reply per input line, history kept
    nanoquant info MODEL.gguf [--json]

Errors (a missing or invalid file, bad arguments) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from nanoquant.runtime.model import Model

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="GGUF file")
        q.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens")
        q.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")

    def sampling_args(q: argparse.ArgumentParser, max_tokens: int) -> None:
        q.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
        q.add_argument("--temp", dest="temperature", type=float, default=0.8, help="0 = greedy")
        q.add_argument("--top-k", type=int, default=40)
        q.add_argument("--top-p", type=float, default=0.95)
        q.add_argument("--min-p", type=float, default=0.05)
        q.add_argument("--repeat-penalty", type=float, default=1.0)
        q.add_argument("-s", "--seed", type=int, default=None)
        q.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")

    g = sub.add_parser("generate", help="continue a prompt")
    model_args(g)
    sampling_args(g, 128)
    g.add_argument("-p", "--prompt", required=True)

    c = sub.add_parser("chat", help="chat under the model's template: one reply per line of standard input")
    model_args(c)
    sampling_args(c, 256)
    c.add_argument("--system", default=None, help="system message")

    i = sub.add_parser("info", help="architecture, sizes and NanoQuant layers")
    model_args(i)
    i.add_argument("--json", action="store_true", help="print the whole description as JSON")
    return p


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, **{k: getattr(args, k) for k in SAMPLING}}


def _print_info(info: dict) -> None:
    print(f"file:          {info['path']} ({info['file_bytes']:,} bytes)")
    print(f"architecture:  {info['architecture']} ({info['description']})")
    print(f"parameters:    {info['n_params']:,}; layers {info['n_layer']}, width {info['n_embd']}, "
          f"vocabulary {info['n_vocab']:,}, trained context {info['n_ctx_train']:,}")
    layers = info["nq_layers"]
    if not layers:
        print("NanoQuant:     no NanoQuant layers")
        return
    print(f"NanoQuant:     {len(layers)} layers, {info['bpw_linear']:.4f} bits per weight (signs and scales)")
    shapes: dict[tuple, list] = {}
    for layer in layers:
        shapes.setdefault((layer["d_out"], layer["d_in"], layer["rank"]), []).append(layer)
    for (d_out, d_in, rank), group in sorted(shapes.items()):
        print(f"  {len(group):4d} x {d_out}x{d_in} rank {rank}: {group[0]['bpw']:.4f} bpw (e.g. {group[0]['name']})")
    s = info["conversion_settings"]
    if s:
        print(f"converted:     {s['bpw']} bpw target; calibration {s['calib_windows']} x {s['calib_window_tokens']} "
              f"tokens of {s['calib_text']} and conversations ({s.get('calib_chat', 'none')}, share "
              f"{s.get('chat_share', 0):g}); ADMM {s['admm']['iterations']} iterations; dense "
              f"{s['tune']['dense_steps']} and STE {s['tune']['factor_steps']} steps per block; distillation "
              f"{s['distill']['steps']} steps at lr {s['distill']['lr']:g}; seed {s['seed']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with Model(args.model, n_ctx=args.ctx_size, n_threads=args.threads) as model:
            if args.command == "info":
                info = model.info()
                print(json.dumps(info, indent=1)) if args.json else _print_info(info)
            elif args.command == "generate":
                for piece in model.stream(args.prompt, **_sampling(args)):
                    print(piece, end="", flush=True)
                print()
            else:
                messages = [{"role": "system", "content": args.system}] if args.system else []
                for line in sys.stdin:
                    messages.append({"role": "user", "content": line.rstrip("\n")})
                    reply = []
                    for piece in model.chat(messages, stream=True, **_sampling(args)):
                        reply.append(piece)
                        print(piece, end="", flush=True)
                    print()
                    messages.append({"role": "assistant", "content": "".join(reply)})
    except (OSError, ValueError, RuntimeError) as e:
        print(f"nanoquant: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
