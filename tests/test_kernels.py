"""NQ1 kernels of ggml-cpu: the SIMD vec_dot equals the scalar reference, and the low-rank graph is right."""
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from nanoquant import _core
from nanoquant.fileformat import nq1


def _signs(rows, cols, rng):
    s = np.where(rng.standard_normal((rows, cols)) < 0, -1.0, 1.0).astype(np.float32)
    s[0] = -1.0  # all -1
    if rows > 1:
        s[1] = 1.0  # all +1
    return s


@pytest.mark.parametrize("n", [32, 96, 576, 1536])
def test_simd_vec_dot_equals_scalar_reference(n):
    rng = np.random.default_rng(n)
    signs = _signs(9, n, rng)
    acts = rng.standard_normal((5, n)).astype(np.float32) * rng.uniform(0.01, 10, (5, 1)).astype(np.float32)
    acts[0] = 0.0
    packed = nq1.pack_signs(signs)
    q8 = _core.quantize_rows(acts, _core.Q8_0_TYPE_ID)
    simd = _core.vec_dot_nq1_q8_0(packed, q8, n)
    scalar = _core.vec_dot_nq1_q8_0(packed, q8, n, reference=True)
    np.testing.assert_array_equal(simd, scalar)
    # and both equal the exact dot product with the dequantised activations
    exact = signs.astype(np.float64) @ _core.dequantize_rows(q8, _core.Q8_0_TYPE_ID, n).astype(np.float64).T
    np.testing.assert_allclose(scalar, exact, rtol=1e-5, atol=1e-4 * np.abs(exact).max())


@pytest.mark.parametrize("d_out,d_in,rank,tokens,with_mid", [
    (576, 576, 256, 1, False), (192, 576, 32, 3, False), (1536, 576, 160, 17, True), (96, 1536, 32, 2, False),
    (32, 96, 160, 5, True),
])
def test_lowrank_binary_matmul_matches_float64(d_out, d_in, rank, tokens, with_mid):
    rng = np.random.default_rng(d_out + d_in + rank)
    v, u = _signs(rank, d_in, rng), _signs(d_out, rank, rng)
    s_pre = rng.uniform(0.5, 2.0, d_in).astype(np.float32)
    s_mid = rng.uniform(0.5, 2.0, rank).astype(np.float32) if with_mid else None
    s_post = rng.uniform(0.001, 0.01, d_out).astype(np.float32)
    x = rng.standard_normal((tokens, d_in)).astype(np.float32)
    y = _core.lowrank_binary_matmul(x, nq1.pack_signs(v), nq1.pack_signs(u), s_pre, s_mid, s_post, 2)
    t = (x.astype(np.float64) * s_pre) @ v.T.astype(np.float64)
    if with_mid:
        t = t * s_mid
    ref = (t @ u.T.astype(np.float64)) * s_post
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel < 0.03, rel  # two Q8_0 activation quantizations, about 1% each


@pytest.mark.parametrize("d_out,d_in,rank,batch,threads", [
    (576, 576, 288, 1, 1), (576, 576, 32, 3, 2), (192, 576, 96, 17, 2), (1536, 576, 416, 2, 1), (576, 1536, 416, 8, 2),
    (64, 96, 32, 5, 2),
])
def test_table_lookup_path_matches_the_vec_dot_path(d_out, d_in, rank, batch, threads):
    """ggml's mul_mat with the NQ1 weights repacked (table lookup, cpp/nq1-lut*.c) against the plain NQ1 x Q8_0 path on
    the same random layer: two different activation roundings, so they agree to about a percent, not bit for bit."""
    x = np.random.default_rng(batch).standard_normal((batch, d_in)).astype(np.float32)
    x[:, 7] *= 40.0  # an outlier channel, as LLM activations have
    lut = _core.MulMatBench(_core.NQ1_TYPE_ID, d_out, d_in, batch, threads, True, rank, seed=3)
    plain = _core.MulMatBench(_core.NQ1_TYPE_ID, d_out, d_in, batch, threads, False, rank, seed=3)
    assert lut.repacked and not plain.repacked
    y_lut, y_plain = lut.run(x), plain.run(x)
    rel = np.linalg.norm(y_lut - y_plain) / np.linalg.norm(y_plain)
    assert rel < 0.03, rel  # measured 1.2-1.6% with the outlier channel
    np.testing.assert_array_equal(lut.run(x), y_lut)  # deterministic across runs and thread interleavings


FUSION_CASES = [  # d_out, d_in, rank, batch, threads, scales present (cpp/nq1-lowrank.h: s_pre, s_mid, s_post)
    (576, 576, 288, 1, 1, "pre,post"), (576, 576, 32, 1, 2, "pre,mid,post"), (192, 576, 96, 3, 2, "pre,post"),
    (1536, 576, 416, 8, 2, "pre,mid,post"), (576, 1536, 416, 2, 3, "pre,post"), (64, 96, 32, 5, 2, "pre,mid,post"),
    (192, 576, 96, 1, 2, ""), (192, 576, 64, 2, 1, "mid"), (576, 192, 64, 1, 2, "post"), (96, 64, 32, 3, 2, "pre"),
    (192, 576, 96, 9, 2, "pre,post"),  # above the decode batches (cpp/nq1-lut-ggml.cpp FUSE_MAX_COLS): not fused
]
FUSED_MAX_BATCH = 8
FUSION_COPIES = 3


def fusion_case_outputs() -> list[np.ndarray]:
    """Each case's layer output from one graph of FUSION_COPIES NanoQuant layers (the chain llama.cpp builds)."""
    outputs = []
    for d_out, d_in, rank, batch, threads, scales in FUSION_CASES:
        x = np.random.default_rng(batch + d_out).standard_normal((batch, d_in)).astype(np.float32)
        x[:, 7] *= 40.0
        bench = _core.MulMatBench(_core.NQ1_TYPE_ID, d_out, d_in, batch, threads, True, rank, seed=11,
                                  copies=FUSION_COPIES, mid="mid" in scales, pre="pre" in scales,
                                  post="post" in scales)
        outputs.append(bench.run(x))
    return outputs


def test_fused_lowrank_layer_equals_the_unfused_ops(tmp_path):
    """ggml-cpu runs a decode-sized NanoQuant layer ([MUL,] MUL_MAT, [MUL,] MUL_MAT, [MUL]: any of the scales may be
    missing) as one fused step (ggml_patches/0005): bit-identical to the ops that GGML_CPU_DISABLE_FUSION=1 runs one
    by one."""
    child = ("import numpy as np; from tests.test_kernels import fusion_case_outputs; from nanoquant import _core; "
             f"np.savez({str(tmp_path / 'unfused.npz')!r}, *fusion_case_outputs()); print(_core.nq1_fused_layers())")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GGML_CPU_DISABLE_FUSION": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "0"  # the switch is honoured: nothing fused in the child

    before = _core.nq1_fused_layers()
    fused = fusion_case_outputs()
    expected = FUSION_COPIES * sum(batch <= FUSED_MAX_BATCH for _, _, _, batch, _, _ in FUSION_CASES)
    assert _core.nq1_fused_layers() - before == expected
    unfused = np.load(tmp_path / "unfused.npz")
    for i, case in enumerate(FUSION_CASES):
        np.testing.assert_array_equal(fused[i], unfused[f"arr_{i}"], err_msg=str(case))
        assert np.linalg.norm(fused[i]) > 0


@pytest.mark.parametrize("type_name", ["NQ1", "Q4_0"])
def test_mul_mat_bench_copies_share_one_graph(type_name):
    """bench/kernels.py puts several layers in one timed graph: each copy has its own weights, all read the input."""
    type_id = _core.NQ1_TYPE_ID if type_name == "NQ1" else int(gguf.GGMLQuantizationType.Q4_0)
    rank = 96 if type_name == "NQ1" else 0
    x = np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32)
    one = _core.MulMatBench(type_id, 192, 576, 3, 2, True, rank, seed=5)
    many = _core.MulMatBench(type_id, 192, 576, 3, 2, True, rank, seed=5, copies=9)
    y_one, y_many = one.run(x), many.run(x)
    assert y_many.shape == (3, 192) and np.isfinite(y_many).all()
    assert np.linalg.norm(y_many) > 0 and many.time(2) > 0
    with pytest.raises(ValueError, match="copies must be at least 1"):
        _core.MulMatBench(type_id, 192, 576, 3, 2, True, rank, copies=0)
    assert y_one.shape == y_many.shape


def test_mul_mat_bench_refuses_bad_shapes():
    with pytest.raises(ValueError, match="not a multiple of its block size"):
        _core.MulMatBench(_core.NQ1_TYPE_ID, 576, 100, 1, 1, True, 32)
    with pytest.raises(ValueError, match="rank is given only for NQ1"):
        _core.MulMatBench(_core.Q8_0_TYPE_ID, 576, 576, 1, 1, True, 32)
    with pytest.raises(ValueError, match="scales are chosen only for NQ1"):
        _core.MulMatBench(_core.Q8_0_TYPE_ID, 576, 576, 1, 1, True, 0, pre=False)


@pytest.mark.parametrize("op,pattern", [("MUL_MAT", "type_a=nq1"), ("GET_ROWS", "type=nq1")])
def test_backend_ops_cover_nq1(op, pattern):
    """llama.cpp's own op tests run their NQ1 cases (patch 0001 adds the type to their lists) on the CPU backend."""
    from conftest import run_tool
    proc = run_tool("test-backend-ops", "test", "-b", "CPU", "-o", op, "-p", pattern)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cases = [line for line in proc.stdout.splitlines() if f"{op}(" in line and "nq1" in line]
    passed = [line for line in cases if "OK" in line]
    failed = [line for line in cases if "OK" not in line and "not supported" not in line]  # f16 activations: unsupported
    assert len(passed) >= 8 and not failed, failed[:5]
