"""End-to-end speed: llama-bench pp128 and tg64, NanoQuant files against llama.cpp's types, repetitions interleaved.

    .venv/bin/python bench/decode.py [--models smollm2 synthetic-1b qwen2.5-coder-1.5b] [--reps 3] [--threads 1 2]
                                     [--head q8_0] [--out FILE.json]

Models: (a) SmolLM2-135M-Instruct: NQ-1.0 and NQ-0.55 are the quality table's files where bench/quality.py has made them,
else files with random signs at the same ranks (the file name says so); the llama.cpp types are made from the F32
teacher. (b) synthetic-1b: a Llama-shaped
model of about 1.1B parameters (hidden 2048, MLP 5632, 22 blocks, 32 heads / 4 KV heads, SmolLM2's tokenizer) with
RANDOM weights: its numbers are about speed only. Its NQ files carry random signs at the method's ranks.
(c) qwen2.5-coder-1.5b (`make models-1.5b`, not a default): the files bench/quality.py made for that model's table,
as a user runs them (each with its own embedding and head types); alone it writes
decode-Qwen2.5-Coder-1.5B-Instruct.json / .md.
Every file of (a) and (b) keeps its token embedding / output head at one type, `--head` (default Q8_0, the converter's default
`--other-type`), so the heads cost the same on both sides. Both models tie the head to the embedding, so a token reads
every byte of a file: when every type runs at the memory bound, the tg64 ratio is the ratio of file sizes, which the
table shows ("size ratio"). With another `--head` the SmolLM2 NQ files are random signs at the same ranks, and the
results go to decode-head-<type>.json / .md. IQ1_S takes an importance matrix from llama-imatrix on the calibration
text (2 chunks for the synthetic model).
Each repetition runs every (file, threads) pair once with `llama-bench -r 1`, in turn; the table gives medians.
Writes bench/results/decode.json ({meta, rows}) and decode.md, or `--out FILE.json` and its .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import common
from bench.common import BIN, CALIB_TEXT, DEFAULT_MODEL, REPO, RESULTS, finish, partial, run
from bench.gpu_models import add_llama_hparams
from bench.quality import Bench, slug

LLAMA_TYPES = ["Q4_0", "Q8_0", "Q2_K", "IQ1_S", "TQ1_0"]
@dataclass(frozen=True)
class NQVariant:
    bpw: float
    quality_row: str          # the bench/quality.py row whose converted file is used where it exists
    shared_v: str = "none"    # --shared-v of the converter: "qkv" stores q/k/v as one fused attn_qkv layer


NQ_VARIANTS = {
    "NQ-1.0": NQVariant(1.0, "NQ 1.0"),
    "NQ-0.55": NQVariant(0.55, "NQ 0.55"),
    "NQ-1.0-shared-qkv": NQVariant(1.0, "ablation 1.0: shared q/k/v V", shared_v="qkv"),
}
DEFAULT_HEAD = "q8_0"
SYNTH = dict(hidden=2048, ffn=5632, blocks=22, heads=32, kv_heads=4, ctx=2048)


def quantize(src: Path, out: Path, type_name: str, imatrix: Path | None, threads: int, head: str) -> Path:
    if not out.is_file():
        cmd = [BIN / "llama-quantize", "--allow-requantize", "--token-embedding-type", head,
               "--output-tensor-type", head]
        if imatrix is not None:
            cmd += ["--imatrix", imatrix]
        run(cmd + [src, partial(out), type_name, threads], f"llama-quantize {type_name}")
        finish(out)
    return out


def make_imatrix(model: Path, out: Path, chunks: int, threads: int) -> Path:
    if not out.is_file():
        run([BIN / "llama-imatrix", "-m", model, "-f", CALIB_TEXT, "-c", 512, "--chunks", chunks, "-t", threads,
             "-o", partial(out)], "llama-imatrix")
        finish(out)
    return out


def head_suffix(head: str) -> str:
    return "" if head == DEFAULT_HEAD else f"-head-{head}"


def smollm2_files(threads: int, head: str) -> dict[str, Path]:
    """The quality table's NQ files where they exist with this head; otherwise random signs at the same ranks (the
    kernels do the same work whatever the signs)."""
    bench = Bench(DEFAULT_MODEL, 150, threads, "standard")
    files = {}
    for name, variant in NQ_VARIANTS.items():
        converted = bench.dir / f"{slug(variant.quality_row)}.gguf"
        files[name] = converted if converted.is_file() and head == DEFAULT_HEAD else synthetic_nq(
            bench.f32(), bench.dir / f"decode-{name}-random-signs{head_suffix(head)}.gguf", variant.bpw, head,
            variant.shared_v)
    for t in LLAMA_TYPES:
        imatrix = bench.imatrix() if t.startswith("IQ") else None
        files[t] = quantize(bench.f32(), bench.dir / f"decode-{t}{head_suffix(head)}.gguf", t, imatrix, threads, head)
    return files


QWEN15 = REPO / "models" / "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"  # `make models-1.5b`
# the quality table's rows of the real-size model whose files are timed, under this bench's type names
QWEN15_ROWS = {"NQ-1.0": "NQ 1.0", "NQ-0.55": "NQ 0.55", "Q4_0": "Q4_0", "Q2_K": "Q2_K", "IQ1_S": "IQ1_S",
               "IQ1_M": "IQ1_M", "Q1_0": "Q1_0", "TQ1_0": "TQ1_0"}


def qwen15_files(threads: int, head: str) -> dict[str, Path]:
    """Qwen2.5-Coder-1.5B-Instruct: the files bench/quality.py made for its table, each with the embedding and head
    types it was made with (`--head` does not apply: these are the files a user would run)."""
    if not QWEN15.is_file():
        raise SystemExit(f"{QWEN15}: not found; `make models-1.5b` fetches it")
    bench = Bench(QWEN15, None, threads, "standard")
    files = {name: bench.dir / f"{slug(row)}.gguf" for name, row in QWEN15_ROWS.items()}
    missing = [f'"{QWEN15_ROWS[n]}"' for n, path in files.items() if not path.is_file()]
    if missing:
        raise SystemExit(f"qwen2.5-coder-1.5b: make the quality table's files first: .venv/bin/python bench/quality.py "
                         f"{QWEN15.relative_to(REPO)} --rows {' '.join(missing)}")
    return files


# --- the synthetic model ------------------------------------------------------------------------------------------
def synthetic_base(folder: Path) -> Path:
    """An F16 Llama GGUF with random weights (std 0.02) and SmolLM2's tokenizer."""
    import gguf
    from nanoquant.fileformat.writer import copy_metadata, finish_gguf

    out = folder / "F16.gguf"
    if out.is_file():
        return out
    s, rng = SYNTH, np.random.default_rng(0)
    head_dim = s["hidden"] // s["heads"]
    teacher = gguf.GGUFReader(DEFAULT_MODEL)
    tmp = partial(out)
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("synthetic-llama-1b (random weights, speed only)")
    copy_metadata(teacher, w, skip={f.name for f in teacher.fields.values() if not f.name.startswith("tokenizer.")})
    vocab = len(teacher.fields["tokenizer.ggml.tokens"].contents())
    add_llama_hparams(w, s, head_dim, vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    def rand(*shape):  # numpy order: (rows, cols) = (d_out, d_in)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", rand(vocab, s["hidden"]))
    w.add_tensor("output_norm.weight", np.ones(s["hidden"], np.float32))
    kv = s["kv_heads"] * head_dim
    for i in range(s["blocks"]):
        for name, shape in (("attn_q", (s["hidden"], s["hidden"])), ("attn_k", (kv, s["hidden"])),
                            ("attn_v", (kv, s["hidden"])), ("attn_output", (s["hidden"], s["hidden"])),
                            ("ffn_gate", (s["ffn"], s["hidden"])), ("ffn_up", (s["ffn"], s["hidden"])),
                            ("ffn_down", (s["hidden"], s["ffn"]))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(s["hidden"], np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(s["hidden"], np.float32))
    finish_gguf(w, tmp, out)
    return out


def synthetic_nq(base: Path, out: Path, bpw: float, head: str, shared_v: str = "none") -> Path:
    """Random signs at the method's ranks for every decoder linear layer; everything else from the base, in `head`.
    s_post = rms(base weight) / sqrt(rank) gives each layer the output scale of the base layer, so attention sees
    activations of the same size on both sides (10x larger ones sent libm's expf into its slow underflow path and
    made flash attention a tenth of the NQ model's token time at tg64, against 1% for Q4_0). shared_v "qkv": each
    block's q, k and v as one fused attn_qkv layer at the rank of their stacked shape, as `--shared-v qkv` writes."""
    import gguf
    from nanoquant.fileformat import nq1
    from nanoquant.fileformat.info import DECODER_LINEAR
    from nanoquant.fileformat.writer import NQLayerTensors, TensorTypes, write_nq_gguf

    if out.is_file():
        return out
    rng = np.random.default_rng(1)
    signs = lambda *shape: np.where(rng.random(shape, np.float32) < 0.5, -1, 1).astype(np.int8)  # noqa: E731
    fused = {"none": {}, "qkv": {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv"}}[shared_v]
    groups: dict[str, list] = {}  # layer base -> the dense tensors it replaces
    for t in gguf.GGUFReader(base).tensors:
        if t.name.endswith(".weight") and DECODER_LINEAR.search(t.name[: -len(".weight")]):
            block, _, linear = t.name[: -len(".weight")].rpartition(".")
            groups.setdefault(f"{block}.{fused.get(linear, linear)}", []).append(t)
    layers = []
    for name, tensors in groups.items():
        d_in, d_out = int(tensors[0].shape[0]), sum(int(t.shape[1]) for t in tensors)
        rank = nq1.rank_for_bpw(d_out, d_in, bpw)
        post = np.concatenate([np.full(int(t.shape[1]), np.sqrt(np.mean(np.square(t.data, dtype=np.float64))) /
                                       np.sqrt(rank), np.float32) for t in tensors])
        layers.append(NQLayerTensors(base=name, u=signs(d_out, rank), v=signs(rank, d_in),
                                     s_pre=np.ones(d_in, np.float32), s_post=post,
                                     replaces=tuple(t.name[: -len(".weight")] for t in tensors)))
    meta = {nq1.KEY_TARGET_BPW: (float(bpw), gguf.GGUFValueType.FLOAT32)}
    write_nq_gguf(base, out, layers, TensorTypes.every(gguf.GGMLQuantizationType[head.upper()]), meta)
    return out


def synthetic_files(threads: int, head: str) -> dict[str, Path]:
    folder = RESULTS / "synthetic-llama-1b"
    folder.mkdir(parents=True, exist_ok=True)
    base = synthetic_base(folder)
    suffix = head_suffix(head)
    files = {name: synthetic_nq(base, folder / f"{name}{suffix}.gguf", v.bpw, head, v.shared_v)
             for name, v in NQ_VARIANTS.items()}
    for t in LLAMA_TYPES:
        imatrix = make_imatrix(base, folder / "imatrix.gguf", 2, threads) if t.startswith("IQ") else None
        files[t] = quantize(base, folder / f"{t}{suffix}.gguf", t, imatrix, threads, head)
    return files


# --- measuring ----------------------------------------------------------------------------------------------------
def llama_bench(model: Path, threads: int) -> dict[str, float]:
    text = run([BIN / "llama-bench", "-m", model, "-p", 128, "-n", 64, "-t", threads, "-r", 1, "-o", "json"],
               f"llama-bench {model.name}")
    results = json.loads(text[text.index("["): text.rindex("]") + 1])
    return {("pp128" if r["n_prompt"] else "tg64"): float(r["avg_ts"]) for r in results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "synthetic-1b"],
                   choices=["smollm2", "synthetic-1b", "qwen2.5-coder-1.5b"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--head", default=DEFAULT_HEAD, type=str.lower,
                   help="ggml type of every file's token embedding / output head (default q8_0)")
    p.add_argument("--out", type=Path, help="results JSON (and its .md beside it); default "
                   "bench/results/decode.json, decode-head-<type>.json with another --head")
    args = p.parse_args(argv)
    import gguf
    if args.head.upper() not in gguf.GGMLQuantizationType.__members__:
        p.error(f"--head: unknown ggml type '{args.head}'")
    build = {"smollm2": smollm2_files, "synthetic-1b": synthetic_files, "qwen2.5-coder-1.5b": qwen15_files}
    files = {(m, name): path for m in args.models for name, path in build[m](max(args.threads), args.head).items()}

    samples: dict[tuple, list[float]] = {}
    for rep in range(args.reps):
        for (model, name), path in files.items():
            for threads in args.threads:
                for test, tps in llama_bench(path, threads).items():
                    samples.setdefault((model, name, threads, test), []).append(tps)
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)

    from nanoquant.fileformat.info import decoder_linear_bits
    bpw = {key: (lambda b: b[0] / b[1])(decoder_linear_bits(path)) for key, path in files.items()}
    made = common.meta(argv)
    rows = [{"model": m, "type": n, "file": files[(m, n)].name, "file_bytes": files[(m, n)].stat().st_size,
             "head": "as made" if m == "qwen2.5-coder-1.5b" else args.head, "bpw_linear": bpw[(m, n)],
             "threads": t, "test": test, "tokens_per_s": statistics.median(v), "samples": v, "machine": made["machine"]}
            for (m, n, t, test), v in samples.items()]
    default_name = ("decode-Qwen2.5-Coder-1.5B-Instruct" if args.models == ["qwen2.5-coder-1.5b"]
                    else f"decode{head_suffix(args.head)}")
    out = args.out or RESULTS / f"{default_name}.json"
    table = markdown(rows)
    common.write_result(out, {"rows": rows}, made, table)
    print(table)
    return 0


def markdown(rows: list[dict]) -> str:
    lines = [f"llama-bench pp128 / tg64, tokens per second (median of interleaved repetitions); ratio = NQ-1.0 / type; "
             f"size ratio = file bytes / NQ-1.0's (the tg ratio where both are memory-bound). Heads: "
             f"{rows[0]['head'].upper()}. Machine: {rows[0]['machine']}.", "",
             "| model | type | bpw_linear | threads | pp128 t/s | tg64 t/s | NQ-1.0 pp ratio | NQ-1.0 tg ratio "
             "| size ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    index = {(r["model"], r["type"], r["threads"], r["test"]): r["tokens_per_s"] for r in rows}
    size = {(r["model"], r["type"]): r["file_bytes"] for r in rows}
    for (model, name, threads) in dict.fromkeys((r["model"], r["type"], r["threads"]) for r in rows):
        pp, tg = index[(model, name, threads, "pp128")], index[(model, name, threads, "tg64")]
        nq_pp, nq_tg = index[(model, "NQ-1.0", threads, "pp128")], index[(model, "NQ-1.0", threads, "tg64")]
        bpw = next(r["bpw_linear"] for r in rows if (r["model"], r["type"]) == (model, name))
        lines.append(f"| {model} | {name} | {bpw:.3f} | {threads} | {pp:.1f} | {tg:.1f} | {nq_pp / pp:.2f} | "
                     f"{nq_tg / tg:.2f} | {size[(model, name)] / size[(model, 'NQ-1.0')]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
