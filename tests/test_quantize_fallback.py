"""The non-NQ tensors without the native build: fileformat.writer.row_quantizer falls back to gguf-py's numpy quantizers
when nanoquant._core cannot be imported (a GPU machine given only the source tree). The fallback must write ggml's
very bytes, so a file converted there is the file a machine with _core writes."""
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

import nanoquant
from conftest import SMOL_GGUF
from nanoquant.convert import preflight
from nanoquant.fileformat.writer import _requantize, row_quantizer
from nanoquant.convert.settings import ConvertSettings

core = pytest.importorskip("nanoquant._core", reason="the comparison needs ggml's own quantizers (make builds _core)")

COLUMNS = (32, 64, 96, 576, 1536)  # one block, two, an odd count of blocks, SmolLM2's width and its FFN's


def awkward_rows(cols: int, seed: int) -> np.ndarray:
    """Random rows at very different magnitudes plus the cases rounding and scaling get wrong: zero rows and blocks,
    one outlier, exact halves (Q8_0's ties: a block whose maximum is 127 has scale 1), negative zero, F16's largest
    values, its subnormals and values between two of them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, cols)).astype(np.float32) * rng.choice([1e-6, 1e-3, 1.0, 300.0], (24, 1))
    x[0] = 0.0
    x[1, :32] = 0.0
    x[2, cols // 2] = 3e4
    x[3, :32] = np.concatenate([[127.0], np.arange(-15.5, 15.0, 1.0)])
    x[4, :32] = -0.0
    x[5] = rng.uniform(-65504.0, 65504.0, cols)
    x[6] = rng.uniform(-1, 1, cols) * 2.0 ** -20  # below F16's normal range
    x[7] = np.float32(1.0) + np.float32(2.0 ** -11) * rng.integers(-4, 5, cols)  # F16 ties around 1
    return x


@pytest.fixture
def without_core(monkeypatch):
    """`from . import _core` fails as on a machine without the build (the package attribute hides it otherwise)."""
    monkeypatch.setitem(sys.modules, "nanoquant._core", None)
    monkeypatch.delattr(nanoquant, "_core", raising=False)


@pytest.mark.parametrize("cols", COLUMNS)
def test_the_fallback_writes_ggml_bytes_for_q8_0_and_f16(cols, without_core):
    x = awkward_rows(cols, cols)
    quantize, note = row_quantizer(T.Q8_0)
    assert note is not None and "numpy" in note and "_core" in note
    packed = quantize(x)
    assert packed.dtype == np.uint8 and packed.shape == (x.shape[0], cols // 32 * 34)
    assert np.array_equal(packed, core.quantize_rows(x, int(T.Q8_0)))
    # F16 never needs _core: the writer converts with numpy (round to nearest even, as ggml's FP32_TO_FP16)
    f16 = x.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(f16, core.quantize_rows(x, int(T.F16)))


def test_with_core_the_writer_takes_ggml_quantizers():
    quantize, note = row_quantizer(T.Q4_K)  # no numpy quantizer exists for it
    assert note is None
    assert quantize(awkward_rows(256, 1)).shape == (24, 144)


def test_a_type_gguf_py_cannot_quantize_needs_core(without_core):
    with pytest.raises(ValueError, match=r"Q4_K: gguf-py has no quantizer .* nanoquant\._core"):
        row_quantizer(T.Q4_K)
    with pytest.raises(preflight.InputError, match="--other-type Q4_K"):  # before any work, not at the end
        preflight.check_settings(ConvertSettings(other_type="q4_k"))
    with pytest.raises(preflight.InputError, match="--output-tensor-type Q4_K"):
        preflight.check_settings(ConvertSettings(other_type="q8_0", token_embd_type="Q8_0", output_type="Q4_K"))
    with pytest.raises(preflight.InputError, match="--token-embedding-type Q2_K"):  # the default: a K-quant
        preflight.check_settings(ConvertSettings())
    preflight.check_settings(ConvertSettings(other_type="Q8_0", token_embd_type="Q8_0", output_type="Q8_0"))
    preflight.check_settings(ConvertSettings(other_type="F16", token_embd_type="F16", output_type="F16"))


@pytest.mark.skipif(not SMOL_GGUF.is_file(), reason=f"{SMOL_GGUF} is missing (make setup unpacks it)")
def test_the_teachers_tensors_requantize_to_the_same_bytes_without_core(monkeypatch):
    """SmolLM2's Q4_1 tensors requantized to Q8_0 (the default --other-type), with _core and without: attention
    weights (576 and 192 rows) and FFN weights (1536 columns and 1536 rows). Its embedding is Q8_0 already (copied as
    it is), and a conversion replaces these linears, so on SmolLM2 itself the fallback writes nothing; a model with
    other tensors (an untied output, F16 sources) takes it."""
    wanted = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "blk.29.ffn_up.weight")
    tensors = [t for t in GGUFReader(SMOL_GGUF).tensors if t.name in wanted]
    assert sorted(t.name for t in tensors) == sorted(wanted)
    assert all(t.tensor_type == T.Q4_1 for t in tensors)  # so that _requantize quantizes rather than copies
    with_core = [_requantize(t.name, t, T.Q8_0, row_quantizer(T.Q8_0)[0]) for t in tensors]
    monkeypatch.setitem(sys.modules, "nanoquant._core", None)
    monkeypatch.delattr(nanoquant, "_core", raising=False)
    quantize, note = row_quantizer(T.Q8_0)
    assert note is not None
    for t, (expected, dtype) in zip(tensors, with_core):
        data, fallback_dtype = _requantize(t.name, t, T.Q8_0, quantize)
        assert dtype == fallback_dtype == T.Q8_0
        assert data.shape == expected.shape and np.array_equal(data, expected), t.name
        # and the bytes hold the tensor: within half a Q8_0 step of the Q4_1 values, plus the F16 rounding of the
        # stored scale (at most 2^-11 of it, times up to 127 steps)
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, 32)
        back = dequantize(data, T.Q8_0).reshape(values.shape)
        step = np.abs(values).max(axis=1, keepdims=True) / 127
        assert (np.abs(back - values) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-30).all(), t.name
