#!/usr/bin/env python3
"""What bench/gpu_check.sh needs on a device machine beyond the tracked tree, as files the device tool can carry.

    .venv/bin/python bench/gpu_carry.py        (from the repository root, after `make`; ~2 minutes on 2 cores)

The device machine has no network, no llama.cpp, no `gguf` package and no nanoquant._core, and a call carries at most
64 MiB (the working tree included), so this writes the git-ignored folder .gpu-carry/:

  llama.cpp.tar.xz      the patched vendor/llama.cpp (stamp included) without what neither `make cuda` nor gguf-py
                        reads: models/, docs/, media/, benches/, CI and container files, the other ggml backends
  a/, b/                the SmolLM2 teacher GGUF in two parts, each folder with the whole file's sha256; the split
                        evens out the two calls
  b/chat-fast.jsonl     the calibration conversations of the fast preset (the teacher's seeded answers to
                        data/chat/calibration-instructions.txt), made by the converter's own chat_conversations, so
                        that `--calib-chat` with this file gives the windows `--calib-chat auto` gives here (it needs
                        _core, which the device machine lacks)
  manifest.json         the sizes of both calls and where every file came from

Device call 1 carries .gpu-carry/llama.cpp.tar.xz and .gpu-carry/a (build, test-backend-ops, llama-bench), call 2
.gpu-carry/llama.cpp.tar.xz and .gpu-carry/b (the conversion): the tarball travels twice so that call 2 can still
convert (gguf-py comes from the tree) on a fresh machine, if the one of call 1 was given back in between. README.md,
section GPU, has the two calls. --parts remakes only some of the files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "scripts"))
from vendor_llama_cpp import sha256_of  # noqa: E402  (the vendoring script's streamed file hash)

LIMIT_MIB = 64  # the device tool's limit on what one call carries, working tree included
MARGIN_MIB = 2  # kept free in each call: files the checkout gains before the calls (results, notes)
STAMP = ".nanoquant-patches.sha256"
# Not read by `make cuda` (configure, then llama-bench, llama-completion, llama-perplexity, test-backend-ops) nor by
# gguf-py: the top-level models/ holds vocabularies for llama.cpp's own tokenizer tests (their paths are only test
# arguments), docs/ and media/ are documentation, the rest CI, containers and editor settings. The ggml backends are
# added by ggml_add_backend only when their GGML_<NAME> option is on (make cuda turns on CUDA alone); ggml-cuda holds
# its own vendor headers, so ggml-hip and ggml-musa (which read ggml-cuda, not the other way) go too.
EXCLUDE = ("models", "docs", "media", "benches", ".devops", ".github", ".gemini", ".pi", "skills", "ci",
           *(f"ggml/src/ggml-{b}" for b in ("vulkan", "sycl", "metal", "opencl", "cann", "hexagon", "webgpu",
                                             "openvino", "et", "virtgpu", "zdnn", "zendnn", "musa", "hip")))


def fail(message: str) -> None:
    print(f"gpu_carry: error: {message}", file=sys.stderr)
    sys.exit(1)


def mib(n: int) -> float:
    return round(n / 2**20, 2)


def working_tree_bytes() -> int:
    """What every device call sends besides its carried paths: tracked and untracked-but-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    total = 0
    for name in filter(None, out.decode().split("\0")):
        path = REPO / name
        if path.is_symlink() or path.is_file():
            total += path.lstat().st_size
    return total


def write_tree(llama_cpp: Path, out: Path) -> None:
    """The trimmed tree under llama.cpp/, timestamps kept (make compares them), owners dropped."""
    if not (llama_cpp / STAMP).is_file():
        fail(f"{llama_cpp}/{STAMP} not found: run `make` first (the tree must be the patched one)")

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        rel = info.name.partition("/")[2]
        if rel in EXCLUDE or "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tmp = out.with_name(out.name + ".partial")
    start = time.time()
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        tar.add(llama_cpp, arcname="llama.cpp", filter=keep)  # a directory's entries are added in sorted order
    os.replace(tmp, out)
    print(f"gpu_carry: {out} {mib(out.stat().st_size)} MiB ({time.time() - start:.0f} s)")


def split_model(teacher: Path, out_dir: Path, first_bytes: int) -> dict:
    """teacher -> out_dir/a/<name>.part-a (first_bytes) and out_dir/b/<name>.part-b, and <name>.sha256 in both."""
    digest = sha256_of(teacher)
    parts = {}
    with teacher.open("rb") as src:
        for part, size in (("a", first_bytes), ("b", teacher.stat().st_size - first_bytes)):
            folder = out_dir / part
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.part-*"):
                old.unlink()
            path = folder / f"{teacher.name}.part-{part}"
            with path.open("wb") as dst:
                left = size
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    dst.write(chunk)
                    left -= len(chunk)
            (folder / f"{teacher.name}.sha256").write_text(f"{digest}  {teacher.name}\n")
            parts[part] = dict(file=str(path.relative_to(REPO)), bytes=size)
    print(f"gpu_carry: {teacher.name} ({mib(teacher.stat().st_size)} MiB, sha256 {digest[:16]}) split "
          f"{mib(parts['a']['bytes'])} + {mib(parts['b']['bytes'])} MiB")
    return dict(name=teacher.name, sha256=digest, bytes=teacher.stat().st_size, parts=parts)


class _InMemory:
    """chat_conversations' work folder, holding nothing: the conversations are made, not resumed."""

    def load_conversations(self):
        return None

    def save_conversations(self, conversations):
        pass


def write_conversations(teacher: Path, out: Path) -> dict:
    """The fast preset's calibration conversations, through the converter's own code: its parser and preset, its
    chat window count, chat_conversations (the teacher's answers, seeded, through llama.cpp and _core)."""
    from transformers import AutoTokenizer

    from nanoquant.convert.calibration import DEFAULT_CHAT_INSTRUCTIONS, read_conversations
    from nanoquant.convert.pipeline import build_parser
    from nanoquant.convert.source import Source
    from nanoquant.convert.windows import chat_conversations, chat_window_count
    from nanoquant.convert.settings import settings_from_args

    settings = settings_from_args(build_parser().parse_args([str(teacher), "--outfile", "unused.gguf",
                                                             "--preset", "fast"]))
    tokenizer = AutoTokenizer.from_pretrained(teacher.parent, gguf_file=teacher.name)
    # chat_conversations reads only the tokenizer and the paths of a Source (a GGUF answers as itself)
    source = Source(model=None, tokenizer=tokenizer, config=None, arch=None, base_gguf=teacher, path=teacher,
                    blocks=None)
    tokens = chat_window_count(settings) * settings.calib_window_tokens
    conversations = chat_conversations(source, settings, _InMemory(), tokens)
    if not conversations:
        fail(f"{teacher}: the converter made no conversations (no chat template?)")
    tmp = out.with_name(out.name + ".partial")
    # the layout of WorkFolder.save_conversations, which --calib-chat auto keeps in a work folder
    tmp.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations),
                   encoding="utf-8")
    os.replace(tmp, out)
    # --calib-chat FILE reads them back with read_conversations: the same lists, so chat_windows (which reads only
    # the conversations, the tokenizer, the window count and length, the seed and BOS) makes the same windows
    if read_conversations(out) != conversations:
        fail(f"{out}: reading the conversations back gives other ones")
    print(f"gpu_carry: {out}: {len(conversations)} conversations for {chat_window_count(settings)} windows of "
          f"{settings.calib_window_tokens} tokens (seed {settings.seed})")
    return dict(file=str(out.relative_to(REPO)), conversations=len(conversations), preset="fast",
                chat_windows=chat_window_count(settings), window_tokens=settings.calib_window_tokens,
                seed=settings.seed, tokens_needed=tokens, instructions=DEFAULT_CHAT_INSTRUCTIONS.name,
                instructions_sha256=sha256_of(DEFAULT_CHAT_INSTRUCTIONS), bytes=out.stat().st_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, default=REPO / "vendor" / "llama.cpp", help="the patched tree")
    p.add_argument("--teacher", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--out", type=Path, default=REPO / ".gpu-carry")
    p.add_argument("--parts", default="tree,model,chat",
                   help="which files to (re)make: tree, model, chat (comma-separated; the others are kept)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"tree", "model", "chat"}:
        fail(f"--parts: unknown {', '.join(sorted(parts - {'tree', 'model', 'chat'}))} (expected tree, model, chat)")
    if not args.teacher.is_file():
        fail(f"--teacher: {args.teacher} not found (make setup unpacks it)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tree, chat = out / "llama.cpp.tar.xz", out / "b" / "chat-fast.jsonl"
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    if "tree" in parts:
        write_tree(args.llama_cpp.resolve(), tree)
        manifest["tree"] = dict(file=str(tree.relative_to(REPO)), bytes=tree.stat().st_size,
                                stamp=(args.llama_cpp / STAMP).read_text().strip(), excluded=list(EXCLUDE))
    if not tree.is_file():
        fail(f"{tree} not found: run with --parts tree")
    if "chat" in parts:
        (out / "b").mkdir(parents=True, exist_ok=True)
        manifest["chat"] = write_conversations(args.teacher.resolve(), chat)
    chat_bytes = chat.stat().st_size if chat.is_file() else 0

    # the split that makes both calls equally large: call 1 = working tree + tarball + part a, call 2 = working
    # tree + tarball + part b + conversations
    work_tree, tree_bytes, model_bytes = working_tree_bytes(), tree.stat().st_size, args.teacher.stat().st_size
    first = (model_bytes + chat_bytes) // 2
    if "model" in parts or "model" not in manifest:
        manifest["model"] = split_model(args.teacher.resolve(), out, first)
    calls = {
        "1": dict(carry=[str(tree.relative_to(REPO)), str((out / "a").relative_to(REPO))],
                  bytes=work_tree + tree_bytes + manifest["model"]["parts"]["a"]["bytes"]),
        "2": dict(carry=[str(tree.relative_to(REPO)), str((out / "b").relative_to(REPO))],
                  bytes=work_tree + tree_bytes + manifest["model"]["parts"]["b"]["bytes"] + chat_bytes),
    }
    manifest.update(working_tree_bytes=work_tree, limit_mib=LIMIT_MIB, calls=calls)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    for n, call in calls.items():
        print(f"gpu_carry: call {n} carries {' '.join(call['carry'])}: {mib(call['bytes'])} MiB with the working "
              f"tree ({mib(work_tree)} MiB) of {LIMIT_MIB} MiB")
    over = [n for n, call in calls.items() if call["bytes"] > (LIMIT_MIB - MARGIN_MIB) * 2**20]
    if over:
        fail(f"call {', '.join(over)} would carry more than {LIMIT_MIB - MARGIN_MIB} MiB "
             f"({LIMIT_MIB} MiB less {MARGIN_MIB} kept free)")


if __name__ == "__main__":
    main()
