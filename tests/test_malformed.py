"""Malformed NQ files, one defect each, made from a valid tiny NQ GGUF: the loader refuses every one with a reason
that names the tensor, in llama.cpp's tools and in nanoquant.Model, and never aborts (a signal) or serves NaN."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import load_in_child, rewrite_gguf, run_tool
from nanoquant import formats


def _find(tensors, name):
    return next(t for t in tensors if t[0] == name)


def _set(name, fn):
    def edit(tensors):
        t = _find(tensors, name)
        t[1], t[2] = fn(t[1], t[2])
    return edit


def _drop(name):
    return lambda tensors: tensors.remove(_find(tensors, name))


def _copy_as(name, new_name):
    def edit(tensors):
        t = _find(tensors, name)
        tensors.append([new_name, t[1].copy(), t[2]])
    return edit


def _value_at(index, value):
    def fn(data, dtype):
        data = data.copy()
        data.reshape(-1)[index] = value
        return data, dtype
    return fn


def _as_f16(data, dtype):
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _unpacked_signs(data, dtype):
    """NQ1 bytes -> the same signs as F32 +-1 values, the shape the format names but the wrong type."""
    return formats.unpack_signs(data, data.shape[1] * 8), gguf.GGMLQuantizationType.F32


def _dense_beside(base):
    def edit(tensors):
        v = _find(tensors, f"{base}.nq_v")[1]
        u = _find(tensors, f"{base}.nq_u")[1]
        d_in, d_out = v.shape[1] * 8, u.shape[0]
        tensors.append([f"{base}.weight", np.zeros((d_out, d_in), np.float32), gguf.GGMLQuantizationType.F32])
    return edit


# name -> (edit, the tensor the refusal must name)
DEFECTS = {
    "scale-f16": (_set("blk.0.attn_q.nq_s_pre", _as_f16), "blk.0.attn_q.nq_s_pre"),
    "factor-f32": (_set("blk.0.attn_q.nq_v", _unpacked_signs), "blk.0.attn_q.nq_v"),
    "missing-v": (_drop("blk.0.attn_q.nq_v"), "blk.0.attn_q.nq_v"),
    "missing-u": (_drop("blk.1.ffn_down.nq_u"), "blk.1.ffn_down.nq_u"),
    "dense-beside-nq": (_dense_beside("blk.0.attn_output"), "blk.0.attn_output.weight"),
    "nq-on-a-norm": (_copy_as("blk.0.attn_q.nq_v", "blk.0.attn_norm.nq_v"), "blk.0.attn_norm"),
    "nq-beyond-last-block": (_copy_as("blk.1.attn_q.nq_v", "blk.7.attn_q.nq_v"), "blk.7.attn_q.nq_v"),
    "nan-scale": (_set("blk.1.attn_v.nq_s_post", _value_at(5, np.nan)), "blk.1.attn_v.nq_s_post"),
    "inf-scale": (_set("blk.0.ffn_up.nq_s_pre", _value_at(0, np.inf)), "blk.0.ffn_up.nq_s_pre"),
    "nan-norm": (_set("blk.0.attn_norm.weight", _value_at(2, np.nan)), "blk.0.attn_norm.weight"),
    "norm-f16": (_set("blk.1.ffn_norm.weight", _as_f16), "blk.1.ffn_norm.weight"),
}


@pytest.fixture(scope="module")
def malformed(tiny_nq_models, tmp_path_factory) -> dict[str, Path]:
    src = tiny_nq_models["llama"]
    folder = tmp_path_factory.mktemp("malformed")
    return {name: rewrite_gguf(src, folder / f"{name}.gguf", edit) for name, (edit, _) in DEFECTS.items()}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("tool", ["llama-completion", "llama-bench"])
def test_tools_refuse_with_the_tensors_name(tool, defect, malformed):
    path = malformed[defect]
    args = ["-m", path, "-p", "hi", "-n", "2", "-no-cnv", "-t", "2"] if tool == "llama-completion" else \
        ["-m", path, "-p", "8", "-n", "2", "-r", "1", "-t", "2"]
    proc = run_tool(tool, *args, timeout=300)
    assert proc.returncode > 0, f"{defect}: exit {proc.returncode} (negative: a signal)\n{proc.stderr[-2000:]}"
    assert DEFECTS[defect][1] in proc.stderr, f"{defect}: the reason is missing\n{proc.stderr[-2000:]}"


def test_python_raises_with_the_tensors_name(malformed):
    """All defects loaded by nanoquant.Model in one child interpreter, so an abort fails the test with its signal."""
    for name, (kind, message) in load_in_child(malformed).items():
        assert kind == "ModelLoadError", (name, kind, message)
        assert DEFECTS[name][1] in message and str(malformed[name]) in message, (name, message)


def test_nanoquant_info_refuses_a_nan_scale(malformed):
    proc = subprocess.run([sys.executable, "-m", "nanoquant", "info", str(malformed["nan-scale"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "blk.1.attn_v.nq_s_post" in proc.stderr and "non-finite" in proc.stderr, proc.stderr[-2000:]
