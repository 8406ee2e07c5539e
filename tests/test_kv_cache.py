"""Quantized KV cache and flash attention with NanoQuant layers (bench.kvcache's settings): every setting runs and its
perplexity stays within a stated bound of the F16 cache without flash attention; generation runs on the smallest."""
from __future__ import annotations

from bench import kvcache
from conftest import run_tool

CHUNKS = 4
# the largest relative perplexity change allowed per cache type (the coarser of K and V decides); measured on the
# SmolLM2 fast file over these 4 chunks: see bench/results/kvcache.md for 40 chunks
BOUND = {"f16": 0.005, "q8_0": 0.01, "q4_0": 0.05}
ORDER = ("f16", "q8_0", "q4_0")


def test_every_cache_setting_runs_and_agrees_with_f16(smol_nq, eval_text):
    (k0, v0, fa0), *others = kvcache.SETTINGS
    base = kvcache.perplexity(smol_nq, k0, v0, fa0, CHUNKS, eval_text)
    changes = {}
    for k, v, fa in others:
        coarser = max(k, v, key=ORDER.index)
        changes[kvcache.label(k, v, fa)] = (kvcache.perplexity(smol_nq, k, v, fa, CHUNKS, eval_text) / base - 1,
                                            BOUND[coarser])
    assert all(abs(change) <= bound for change, bound in changes.values()), changes


def test_generation_runs_with_a_q4_0_cache_and_flash_attention(smol_nq):
    proc = run_tool("llama-completion", "-m", smol_nq, "-p", "The capital of France is", "-n", "16", "--temp", "0",
                    "-no-cnv", "-t", "2", "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.split()) > 5, proc.stdout
