"""What every benchmark shares: the checkout's paths, the machine and commit a result was made on, running a tool,
and writing a result file that records how it was made.

A result file is JSON: an object whose "meta" holds {commit, machine, command, date} of the run that wrote it
(bench/results/README.md is generated from these by bench/results_index.py). Files whose rows accumulate over many
runs (the quality tables) also keep commit, machine, date and command in each row."""
from __future__ import annotations

import json
import re
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "build" / "bin"
RESULTS = REPO / "bench" / "results"
TEST_TEXT = REPO / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB_TEXT = REPO / "data" / "wikitext-2" / "valid.txt"
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# the widest vector extension the NQ1 table-lookup kernel uses on this CPU (cpp/nq1-lut.c), by /proc/cpuinfo flags
SIMD_LEVELS = (("AVX-512", {"avx512vbmi", "avx512_vnni"}), ("AVX2", {"avx2", "fma"}), ("NEON", {"asimd"}))


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), []))
    simd = next((name for name, needed in SIMD_LEVELS if needed <= flags), "no SIMD")
    return f"{cpu}, {os.cpu_count()} cores, {simd}"


def git_commit() -> str:
    """HEAD's short hash, "+uncommitted" when tracked files differ from it."""
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("+uncommitted" if dirty else "") if proc.returncode == 0 else "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script, as one would type it in the checkout: `.venv/bin/python bench/X.py ARGS`."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", str(shown), *map(shlex.quote, map(str, args))])


def meta(argv: list[str] | None = None, command: str | None = None) -> dict:
    """How a result was made: commit, machine, command and date (UTC)."""
    return {"commit": git_commit(), "machine": machine(), "command": command or command_line(argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def partial(path: Path) -> Path:
    """Tools write here first; a file under its final name is always complete, so a killed run is never reused."""
    return path.with_name(path.name + ".partial")


def finish(path: Path) -> Path:
    partial(path).replace(path)
    return path


def write_result(path: Path, payload: dict, made: dict, markdown: str | None = None) -> Path:
    """Write a result file (payload with "meta": made first) through its partial name, and its .md beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial(path).write_text(json.dumps({"meta": made, **payload}, indent=1) + "\n")
    finish(path)
    if markdown is not None:
        md = path.with_suffix(".md")
        partial(md).write_text(markdown)
        finish(md)
    return path


def read_result(path: Path) -> dict:
    """A result file as {"meta": ..., ...}; a bare list of rows (older files) reads as {"meta": {}, "rows": list}."""
    data = json.loads(path.read_text())
    return {"meta": {}, "rows": data} if isinstance(data, list) else data


def run_streams(cmd: list, what: str, peak: dict | None = None) -> tuple[str, str]:
    """The command's stdout and stderr; it must succeed. peak: gets "mib", the process's own peak RSS."""
    print("+", " ".join(map(str, cmd)), flush=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource use, peak RSS included
        proc.returncode = os.waitstatus_to_exitcode(status)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{''.join(texts)[-3000:]}")
    if peak is not None:
        peak["mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return texts[0], texts[1]


def run(cmd: list, what: str, peak: dict | None = None) -> str:
    """The command's output, stdout then stderr; it must succeed. peak: as for run_streams."""
    return "".join(run_streams(cmd, what, peak))


def final_perplexity(output: str, what: str) -> float:
    """llama-perplexity's final estimate from its output; what names the run in the error."""
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if not match:
        raise RuntimeError(f"{what}: no final perplexity in llama-perplexity's output:\n{output[-3000:]}")
    return float(match.group(1))
