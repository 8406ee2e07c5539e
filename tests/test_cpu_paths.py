"""The stated accuracy of both CPU paths of an NQ file, held against the F32 product of its factors.

llama.cpp multiplies NQ1 signs by quantized activations, never by F32 ones: the plain path (vec_dot, weights in an
ordinary buffer) rounds each 32 activations to Q8_0; the repacked path (table lookup, cpp/nq1-lut*.c) rounds them to
int8 per row of the table. Each rounding moves a layer's output by about 1% (relative L2, tests/test_kernels.py);
through a whole model that is what is left to compare, and it is what the tolerances below allow:

- per layer: plain within 3% of the float64 product (test_kernels.test_lowrank_binary_matmul_matches_float64), the
  repacked path within 3% of the plain one (test_kernels.test_table_lookup_path_matches_the_vec_dot_path), so within
  6% of the product;
- per logit, against the F32 product of the factors: the file densified to F32 layers (reference.densify_gguf) and run
  through llama.cpp's own F32 matmuls, everything else equal; at every position the root mean square of the logit
  error stays within LOGIT_RMS of the F32 logits' standard deviation, and on a real model the top token agrees at TOP1
  of the positions at least; a real model is also held against nanoquant.reference's forward (torch, F32 factors).
  Measured on SmolLM2 (fast preset, 200 tokens of WikiText-2 test), worst position: repacked 0.155 / plain 0.188 of
  the std against the densified file (top-1 0.975 / 0.995), 0.126 / 0.164 against the reference forward (top-1 0.98),
  where the densified file itself is 0.055 off (Q8_0 activations of the ordinary matmuls, the F16 KV cache); the
  tiny models 0.012-0.036. The tiny models are held to the densified file here; tests/test_tiny_models.py holds each
  family's llama.cpp forward to the reference forward.
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
    """Both paths against the F32 product of the factors: the file densified to F32 weights through llama.cpp's own
    F32 matmuls (everything else the same), and on a real model also against the Python reference forward."""
    tokens = _tokens(path)
    runs = {}
    for repack in (True, False):
        with Model(path, n_ctx=512, n_threads=2, repack=repack) as model:
            runs["repacked" if repack else "plain"] = model.logits(tokens)
    with Model(densify_gguf(path, tmp_path / "dense.gguf"), n_ctx=512, n_threads=2) as model:
        dense = model.logits(tokens)
    measured = {f"{name} vs densified": _errors(logits, dense) for name, logits in runs.items()}
    if real_model:
        reference = _reference_logits(path, tokens)
        runs["densified"] = dense
        measured.update({f"{name} vs reference": _errors(logits, reference) for name, logits in runs.items()})
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
