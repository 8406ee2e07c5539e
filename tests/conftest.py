"""Shared fixtures: paths of the build, the embedded model, tiny random models converted by the real converter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import final_perplexity

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "build" / "bin"
# the converter run in-process takes llama.cpp's Hugging Face converter from the checkout's patched tree, as the
# checkout's command line does (an installed wheel carries its own: tests/test_wheel.py)
os.environ.setdefault("NANOQUANT_LLAMA_CPP", str(REPO / "vendor" / "llama.cpp"))
SMOL_GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_TEXT = REPO / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB_TEXT = REPO / "data" / "wikitext-2" / "valid.txt"
CONVERTER = REPO / "convert" / "convert-hf-to-nq-gguf.py"
# tiny model kind -> the general.architecture llama.cpp uses for it
# qwen2 is absent: transformers 5 wraps SmolLM2's vocabulary in Qwen2Tokenizer for a qwen2 config, whose pre-tokenizer
# hash llama.cpp's convert_hf_to_gguf.py does not know, so a tiny qwen2 cannot be made offline (real Qwen2 models are fine)
TINY_ARCHS = {"llama": "llama", "qwen3": "qwen3", "mistral": "llama", "gemma3": "gemma3"}
# the whole method at token effort: dense tuning, ADMM, STE tuning (q/k/v biases too on qwen2), scale distillation
TINY_METHOD_ARGS = ("--calib-windows", "4", "--calib-window-tokens", "256", "--admm-iterations", "20",
                    "--dense-steps", "2", "--factor-steps", "3", "--distill-steps", "2", "--tune-batch", "2")
TINY_TRAIN_STEPS = 25
# one family also carries the per-rank scale s_mid, so llama.cpp's and the reference's handling of it are compared;
# two store q, k and v as one shared-input layer (llama.cpp's fused attn_qkv): mistral with RoPE-permuted q/k rows,
# gemma3 with q/k norms after the fused product
TINY_EXTRA_ARGS = {"llama": ("--mid-scale", "on"), "mistral": ("--shared-v", "qkv"), "gemma3": ("--shared-v", "qkv")}


def run_tool(tool: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    path = BIN / tool
    assert path.is_file(), f"{path} is missing: `make test` builds it"
    # random tiny models can emit bytes that are not UTF-8
    return subprocess.run([str(path), *map(str, args)], capture_output=True, text=True, errors="replace",
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_converter(*args: str, timeout: int = 1800, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The converter's command line; env: variables set for this run on top of the test's own."""
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def llama_perplexity(model: Path, text_file: Path, n_ctx: int, chunks: int, *extra: str) -> float:
    proc = run_tool("llama-perplexity", "-m", model, "-f", text_file, "-c", n_ctx, "--chunks", chunks,
                    "-t", "2", "-b", n_ctx, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_perplexity(proc.stdout + proc.stderr, f"llama-perplexity {model}")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOL_GGUF.parent, gguf_file=SMOL_GGUF.name)


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """The start of WikiText-2 test: enough for a few 512-token chunks and quick to score."""
    path = tmp_path_factory.mktemp("text") / "wiki-test-head.raw"
    path.write_text(TEST_TEXT.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    return path


def train_briefly(model, tokenizer, steps: int, seq: int = 64, batch: int = 4) -> None:
    """A few AdamW steps on the calibration text, enough that the model's next-token distributions are peaked (the
    top logits stand several units above the rest), so comparing two forwards of it tells a wrong one apart."""
    import torch

    ids = tokenizer(CALIB_TEXT.read_text(encoding="utf-8")[:200_000], add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def make_tiny_model(kind: str, out_dir: Path, tokenizer, seed: int = 0, n_layers: int = 2,
                    train_steps: int = 0) -> Path:
    """A model (2 blocks unless told) whose dims are multiples of 32 but not of 128, with SmolLM2's tokenizer: random,
    or trained `train_steps` steps on the calibration text."""
    import torch
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig,
                              Qwen2Config, Qwen3Config)

    common = dict(hidden_size=96, intermediate_size=224, num_hidden_layers=n_layers, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common),
        "mistral": lambda: MistralConfig(**common),
        "gemma3": lambda: Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=32),  # = head_dim, as llama.cpp assumes
        "gpt2": lambda: GPT2Config(n_embd=96, n_layer=2, n_head=3, vocab_size=len(tokenizer)),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[kind]())
    if train_steps:
        train_briefly(model, tokenizer, train_steps)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_nq_models(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    """Tiny models of each supported family, trained briefly, converted at 1.0 bpw by the converter's command line."""
    out = {}
    for kind in TINY_ARCHS:
        work = tmp_path_factory.mktemp(f"tiny-{kind}")
        hf_dir = make_tiny_model(kind, work / "hf", smol_tokenizer, train_steps=TINY_TRAIN_STEPS)
        nq = work / f"{kind}-nq.gguf"
        proc = run_converter(hf_dir, "--outfile", nq, "--bpw", "1.0", *TINY_METHOD_ARGS,
                             *TINY_EXTRA_ARGS.get(kind, ()))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = nq
    return out


@pytest.fixture(scope="session")
def smol_nq(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct at 1.0 bpw with `make demo`'s setting (the fast preset), shared by the tools', the API's
    and the demo's tests."""
    out = tmp_path_factory.mktemp("smol") / "smollm2-nq-1.0.gguf"
    proc = run_converter(SMOL_GGUF, "--outfile", out, "--bpw", "1.0", "--preset", "fast")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "realized bpw" in proc.stdout
    return out


_LOAD_SCRIPT = """
import json, sys
from nanoquant import Model
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        Model(path, n_ctx=128).close()
        out[name] = ["no exception", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def load_in_child(paths: dict[str, Path]) -> dict[str, list[str]]:
    """name -> [exception type, message] of nanoquant.Model loading each file, in a child interpreter: a crash fails
    the calling test with its signal instead of ending the whole test run."""
    import json

    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, json.dumps({k: str(v) for k, v in paths.items()})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the interpreter ended with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])

