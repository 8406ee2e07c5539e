"""Synthetic Llama-shaped GGUFs for GPU speed checks (bench/gpu_check.sh): NQ-1.0 and Q4_0 files of one shape, with
RANDOM weights (their numbers are about speed only), in seconds even at 7B.

    python3 bench/gpu_models.py OUT_DIR [--shapes synthetic-1b synthetic-7b]

Shapes: synthetic-1b is bench/decode.py's (hidden 2048, MLP 5632, 22 blocks, 32 heads / 4 KV heads, SmolLM2's
vocabulary size); synthetic-7b is Llama-2-7B's (hidden 4096, MLP 11008, 32 blocks, 32 heads, vocabulary 32000).
Unlike bench/decode.py (which quantizes an F16 base with llama-quantize, too slow at 7B for a 10-minute device
check), the files are written directly: Q4_0 and Q8_0 blocks of random quants with one fixed scale, NQ1 factors of
random packed signs at the method's ranks (nanoquant.fileformat.nq1.rank_for_bpw), s_post sized like bench/decode.py's so
activations keep their scale, a synthetic SentencePiece vocabulary. Both files of a shape share the head type (Q8_0)
and the attention and norm tensors' layout, so their difference is the linear layers. Needs numpy and the patched
gguf-py of vendor/llama.cpp only (no torch, no nanoquant extension), so it runs on a device machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "vendor" / "llama.cpp" / "gguf-py"))
import gguf  # noqa: E402  (the patched gguf-py: it knows NQ1)


def _load_formats():
    """nanoquant/fileformat/nq1.py alone (numpy and gguf only): the package's __init__ loads the CPU extension."""
    spec = importlib.util.spec_from_file_location("nanoquant_formats", REPO / "python" / "nanoquant" / "fileformat" / "nq1.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


formats = _load_formats()

SHAPES = {
    "synthetic-1b": dict(hidden=2048, ffn=5632, blocks=22, heads=32, kv_heads=4, vocab=49152, ctx=2048),
    "synthetic-7b": dict(hidden=4096, ffn=11008, blocks=32, heads=32, kv_heads=32, vocab=32000, ctx=4096),
}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HEAD = gguf.GGMLQuantizationType.Q8_0


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:  # name -> (d_out, d_in)
    kv = s["kv_heads"] * (s["hidden"] // s["heads"])
    h, f = s["hidden"], s["ffn"]
    return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
            "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}


def random_blocks(rng: np.random.Generator, qtype, rows: int, cols: int, scale: float) -> np.ndarray:
    """rows x cols values of a ggml block type with random quants and every block scale `scale` (F16 first)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    data[:, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return data.reshape(rows, cols // block * size)


def add_llama_hparams(w: gguf.GGUFWriter, s: dict, head_dim: int, vocab: int) -> None:
    """The llama hyperparameters of a synthetic shape (bench/decode.py's shapes too)."""
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["blocks"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)


def writer(out: Path, s: dict, name: str, file_type) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(out, "llama")
    w.add_name(f"{name} (random weights, speed only)")
    add_llama_hparams(w, s, s["hidden"] // s["heads"], s["vocab"])
    w.add_file_type(file_type)
    # a SentencePiece vocabulary: unk, bos, eos, the 256 byte tokens, then word pieces
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(s["vocab"] - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (s["vocab"] - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1.0] * 256 + [-float(i) for i in range(s["vocab"] - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    return w


def write_model(out: Path, s: dict, name: str, nq_bpw: float | None) -> Path:
    """Q4_0 linears when nq_bpw is None, else NQ1 factors at that bpw; Q8_0 embeddings (tied head)."""
    if out.is_file():
        return out
    rng = np.random.default_rng(0)
    tmp = out.with_name(out.name + ".partial")
    file_type = gguf.LlamaFileType.MOSTLY_Q4_0 if nq_bpw is None else gguf.LlamaFileType.MOSTLY_NQ1
    w = writer(tmp, s, name, file_type)
    w.add_tensor("token_embd.weight", random_blocks(rng, HEAD, s["vocab"], s["hidden"], 2e-4), raw_dtype=HEAD)
    w.add_tensor("output_norm.weight", np.ones(s["hidden"], np.float32))
    for i in range(s["blocks"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(s["hidden"], np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(s["hidden"], np.float32))
        for linear, (d_out, d_in) in linear_shapes(s).items():
            base = f"blk.{i}.{linear}"
            if nq_bpw is None:  # quants -8..7 (std 4.6) at scale 4.3e-3: entries of std 0.02, as bench/decode.py's
                q4 = gguf.GGMLQuantizationType.Q4_0
                w.add_tensor(f"{base}.weight", random_blocks(rng, q4, d_out, d_in, 4.3e-3), raw_dtype=q4)
                continue
            rank = formats.rank_for_bpw(d_out, d_in, nq_bpw)
            nq1 = gguf.GGMLQuantizationType.NQ1
            v = rng.integers(0, 256, (rank, d_in // 8), dtype=np.uint8)
            u = rng.integers(0, 256, (d_out, rank // 8), dtype=np.uint8)
            w.add_tensor(f"{base}.{formats.SUFFIX_V}", v, raw_dtype=nq1)
            w.add_tensor(f"{base}.{formats.SUFFIX_U}", u, raw_dtype=nq1)
            w.add_tensor(f"{base}.{formats.SUFFIX_S_PRE}", np.ones(d_in, np.float32))
            # the output scale of a dense layer with entries of std 0.02 (bench/decode.py's rms / sqrt(rank))
            w.add_tensor(f"{base}.{formats.SUFFIX_S_POST}", np.full(d_out, 0.02 / np.sqrt(rank), np.float32))
    if nq_bpw is not None:
        w.add_uint32(formats.KEY_FORMAT_VERSION, formats.FORMAT_VERSION)
        w.add_float32(formats.KEY_TARGET_BPW, float(nq_bpw))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        for kind, bpw in (("NQ-1.0", 1.0), ("Q4_0", None)):
            path = write_model(args.out_dir / f"{shape}-{kind}.gguf", SHAPES[shape], f"{shape} {kind}", bpw)
            print(f"gpu_models: {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
