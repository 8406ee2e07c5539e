"""The stated accuracy of both CPU paths of an NQ file, held against the F32 product of its factors.

llama.cpp multiplies NQ1 signs by quantized activations, never by F32 ones: the plain path (vec_dot, weights in an
ordinary buffer) rounds each 32 activations to Q8_0; the repacked path (table lookup, cpp/nq1-lut*.c) rounds them to
int8 per row of the table. Each rounding moves a layer's output by about 1% (relative L2, tests/test_kernels.py);
through a whole model that is what is left to compare, and it is what the tolerances below allow:

- per layer: plain within 3% of the float64 product (test_kernels.test_lowrank_binary_matmul_matches_float64), the
  repacked path within 3% of the plain one (test_kernels.test_table_lookup_path_matches_the_vec_dot_path), so within
  6% of the product;
- per logit, against nanoquant.reference's forward of the same file (F32 factors, torch): at every position the root
  mean square of the logit error stays within LOGIT_RMS of the reference logits' standard deviation, and on a real
  model the top token agrees at TOP1 of the positions at least. Measured on SmolLM2 (fast preset, 200 tokens of
  WikiText-2 test): worst position 0.13 (repacked) and 0.16 (plain), top-1 agreement 0.98 for both. The reference
  also differs from llama.cpp in the ordinary parts (Q8_0 activations of the other matmuls, the F16 KV cache), so
  the file densified to F32 layers and run through stock llama.cpp kernels is held to the same bound.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEST_TEXT
from nanoquant import Model
from nanoquant.reference import densify_gguf, load_reference_model

LOGIT_RMS = 0.25
TOP1 = 0.95
N_TOKENS = 200


def _tokens(path) -> list[int]:
    text = TEST_TEXT.read_text(encoding="utf-8")[2000:8000]
    with Model(path, n_ctx=512, n_threads=2) as model:
        return model.tokenize(text)[:N_TOKENS]


def _reference_logits(path, tokens) -> np.ndarray:
    model, _, _ = load_reference_model(path)
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].double().numpy()


def _errors(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(worst position's rms logit error / std of the reference logits there, top-1 agreement)"""
    spread = reference.std(axis=1)
    rms = np.sqrt(((logits - reference) ** 2).mean(axis=1))
    return float((rms / spread).max()), float((logits.argmax(1) == reference.argmax(1)).mean())


def _check(path, real_model: bool, tmp_path) -> dict:
    tokens = _tokens(path)
    reference = _reference_logits(path, tokens)
    runs = {}
    for repack in (True, False):
        with Model(path, n_ctx=512, n_threads=2, repack=repack) as model:
            runs["repacked" if repack else "plain"] = model.logits(tokens)
    with Model(densify_gguf(path, tmp_path / "dense.gguf"), n_ctx=512, n_threads=2) as model:
        runs["densified F32"] = model.logits(tokens)
    measured = {name: _errors(logits, reference) for name, logits in runs.items()}
    for name, (rms, top1) in measured.items():
        assert rms <= LOGIT_RMS, (path.name, name, measured)
        if real_model:
            assert top1 >= TOP1, (path.name, name, measured)
    return measured


def test_smollm2_both_paths_within_the_stated_tolerance(smol_nq, tmp_path):
    _check(smol_nq, True, tmp_path)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3"])
def test_awkward_shapes_both_paths_within_the_stated_tolerance(kind, tiny_nq_models, tmp_path):
    """96-wide random models: rank 32, d_in 96 and 224, s_mid (llama) and a shared q/k/v V (mistral, gemma3)."""
    _check(tiny_nq_models[kind], False, tmp_path)
