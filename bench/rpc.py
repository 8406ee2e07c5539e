"""A model split over llama.cpp's RPC workers on this machine, and its speed against the same model run locally.

Workers are `ggml-rpc-server` processes on 127.0.0.1 (loopback only), each serving its CPU backend; the client
(`llama-bench`, `llama-completion`, `llama-server`) takes `--rpc host:port,...` and splits the layers over them. Each
worker here gets one of the machine's threads, so two workers use what one local run uses: the table measures what
the split and the transport cost, not more hardware.

    python -m bench.rpc MODEL.gguf [MODEL.gguf ...]   writes bench/results/rpc.{json,md}
"""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from bench.common import BIN, RESULTS, meta, write_result
from bench.serverload import free_port

START_TIMEOUT_S = 30
TOOL_TIMEOUT_S = 900


class WorkerFailed(RuntimeError):
    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


class Workers:
    """`count` ggml-rpc-server processes on 127.0.0.1 for the life of a `with` block; `.endpoints` is the value of
    `--rpc`. Entering waits until each accepts connections; leaving stops them all."""

    def __init__(self, server: Path, count: int = 2, threads: int = 1):
        self.server, self.count, self.threads = Path(server), count, threads
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen] = []

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def __enter__(self) -> Workers:
        import socket

        if not self.server.is_file():
            raise FileNotFoundError(f"{self.server} is missing: `make` builds it")
        for port in self.ports:
            self.procs.append(subprocess.Popen([str(self.server), "-H", "127.0.0.1", "-p", str(port),
                                                "-t", str(self.threads)], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.time() + START_TIMEOUT_S
        for proc, port in zip(self.procs, self.ports):
            while True:
                if proc.poll() is not None:
                    self.__exit__()
                    raise WorkerFailed(f"{self.server} on port {port} ended with {proc.returncode}",
                                       proc.stdout.read() if proc.stdout else "")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        self.__exit__()
                        raise WorkerFailed(f"{self.server} on port {port} did not listen in {START_TIMEOUT_S} s", "")
                    time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self.procs = []


def bench_row(model: Path, threads: int, rpc: str | None, pp: int, tg: int, reps: int) -> dict:
    """llama-bench's pp and tg for one model, local or over `rpc` (all layers offloaded to the workers)."""
    import json

    cmd = [str(BIN / "llama-bench"), "-m", str(model), "-p", str(pp), "-n", str(tg), "-r", str(reps),
           "-t", str(threads), "-o", "json"]
    if rpc is not None:
        cmd += ["--rpc", rpc, "-ngl", "99"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} ended with {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = json.loads(proc.stdout)
    speed = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return {"pp_tps": speed["pp"], "tg_tps": speed["tg"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "rpc.json")
    args = parser.parse_args(argv)

    rows = []
    for model in args.models:
        local = bench_row(model, 2, None, args.pp, args.tg, args.reps)
        with Workers(BIN / "ggml-rpc-server", count=2, threads=1) as workers:
            split = bench_row(model, 2, workers.endpoints, args.pp, args.tg, args.reps)
        rows.append({"model": model.name, "file_bytes": model.stat().st_size, "local": local, "two_workers": split,
                     "pp_ratio": split["pp_tps"] / local["pp_tps"], "tg_ratio": split["tg_tps"] / local["tg_tps"]})
        print(f"{model.name}: local pp{args.pp} {local['pp_tps']:.1f} tg{args.tg} {local['tg_tps']:.1f} t/s; "
              f"two workers pp {split['pp_tps']:.1f} tg {split['tg_tps']:.1f} t/s", flush=True)
    lines = [f"llama-bench pp{args.pp} / tg{args.tg}, {args.reps} repetitions: local with 2 threads against the same "
             "model split over two ggml-rpc-server workers on 127.0.0.1 with 1 thread each (-ngl 99).", "",
             "| model | file MB | local pp t/s | local tg t/s | 2 workers pp t/s | 2 workers tg t/s | pp ratio | tg ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['file_bytes'] / 1e6:,.1f} | {r['local']['pp_tps']:.1f} | "
                     f"{r['local']['tg_tps']:.1f} | {r['two_workers']['pp_tps']:.1f} | {r['two_workers']['tg_tps']:.1f} "
                     f"| {r['pp_ratio']:.2f} | {r['tg_ratio']:.2f} |")
    write_result(args.out, {"pp": args.pp, "tg": args.tg, "reps": args.reps, "rows": rows}, meta(argv),
                 "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
