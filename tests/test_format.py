"""The NQ1 format: one id everywhere, and the Python packer and ggml's C++ (un)packer agree bit for bit."""
import gguf
import numpy as np
import pytest

from nanoquant import _core
from nanoquant.fileformat import nq1

SHAPES = [(1, 32), (3, 96), (7, 576), (5, 1536), (160, 576), (32, 160)]


def test_type_ids_agree():
    assert _core.NQ1_TYPE_ID == int(gguf.GGMLQuantizationType.NQ1) == int(nq1.NQ1)
    assert _core.NQ1_LLAMA_FTYPE_ID == int(gguf.LlamaFileType.MOSTLY_NQ1)
    assert _core.type_name(_core.NQ1_TYPE_ID) == "nq1"
    assert gguf.GGML_QUANT_SIZES[nq1.NQ1] == (_core.NQ1_BLOCK_SIZE, _core.NQ1_BLOCK_BYTES) == (32, 4)


def _sign_matrix(rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0] = -1.0  # a row of all -1
    if rows > 2:
        x[1] = 0.0  # zero counts as +1
    return x


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_python_packer_matches_ggml(rows, cols):
    x = _sign_matrix(rows, cols, rows * 1000 + cols)
    packed = nq1.pack_signs(x)
    assert packed.shape == (rows, cols // 8)
    np.testing.assert_array_equal(packed, _core.quantize_rows(x, _core.NQ1_TYPE_ID))
    unpacked = _core.dequantize_rows(packed, _core.NQ1_TYPE_ID, cols)
    np.testing.assert_array_equal(unpacked, np.where(x < 0, -1.0, 1.0))
    np.testing.assert_array_equal(nq1.unpack_signs(packed, cols), unpacked)


def test_bit_layout_is_lsb_first_and_one_means_minus_one():
    x = np.ones((1, 32), dtype=np.float32)
    x[0, 0] = x[0, 9] = x[0, 31] = -1
    word = int.from_bytes(nq1.pack_signs(x).tobytes(), "little")
    assert word == (1 << 0) | (1 << 9) | (1 << 31)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        nq1.pack_signs(np.ones((2, 40)))
    with pytest.raises(ValueError, match="multiple of"):
        _core.quantize_rows(np.ones((2, 40), dtype=np.float32), _core.NQ1_TYPE_ID)
    with pytest.raises(ValueError, match="importance matrix"):
        _core.quantize_rows(np.ones((2, 256), dtype=np.float32), int(gguf.GGMLQuantizationType.IQ2_XXS))
    with pytest.raises(ValueError, match="bytes per row"):
        _core.dequantize_rows(np.zeros((2, 3), dtype=np.uint8), _core.NQ1_TYPE_ID, 32)


@pytest.mark.parametrize("d_out,d_in,bpw,expected", [
    (576, 576, 1.0, 256), (192, 576, 1.0, 96), (1536, 576, 1.0, 384), (576, 1536, 1.0, 384),
    (192, 576, 0.55, 32), (4096, 4096, 1.0, 2016), (64, 64, 8.0, 224),  # no cap at min(d_out, d_in)
])
def test_rank_rule(d_out, d_in, bpw, expected):
    r = nq1.rank_for_bpw(d_out, d_in, bpw)
    assert r == expected and r % 32 == 0
    if r > 32:
        assert nq1.LayerBits(d_out, d_in, r).bpw <= bpw
