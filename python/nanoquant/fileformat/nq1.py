"""The NQ1 storage format and the bit accounting of NanoQuant layers.

NQ1 (see cpp/nq1.h): rows of signs, 32 per 4-byte block, element k of a block in bit k of the little-endian word,
bit 1 = -1. A NanoQuant layer ``W (d_out x d_in)`` is stored as GGUF tensors next to its base name:

=============  =================  ===========  ==========================================
suffix         ggml shape (ne)    type         meaning
=============  =================  ===========  ==========================================
``nq_v``       [d_in, r]          NQ1          V, r x d_in signs (one row per rank)
``nq_u``       [r, d_out]         NQ1          U, d_out x r signs
``nq_s_pre``   [d_in]             F32          input-channel scale (optional)
``nq_s_mid``   [r]                F32          rank scale (optional: --mid-scale on)
``nq_s_post``  [d_out]            F32          output-channel scale (optional)
=============  =================  ===========  ==========================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

NQ1 = GGMLQuantizationType.NQ1
NQ1_FTYPE = LlamaFileType.MOSTLY_NQ1
BLOCK = 32
RANK_MULTIPLE = 32
SCALE_TYPE = GGMLQuantizationType.F32
SCALE_BITS = 32  # CPU ggml_mul cannot take F16 scales against F32 activations, so scales are stored as F32

SUFFIX_V, SUFFIX_U = "nq_v", "nq_u"
SUFFIX_S_PRE, SUFFIX_S_MID, SUFFIX_S_POST = "nq_s_pre", "nq_s_mid", "nq_s_post"
SUFFIXES = (SUFFIX_V, SUFFIX_U, SUFFIX_S_PRE, SUFFIX_S_MID, SUFFIX_S_POST)
SCALE_SUFFIXES = (SUFFIX_S_PRE, SUFFIX_S_MID, SUFFIX_S_POST)

# the layout of the tensors above is versioned: every file with NanoQuant tensors carries the version it was written
# in, and readers (llama.cpp's loader: LLAMA_NQ_FORMAT_VERSION in ggml_patches/0002; fileformat.info) refuse a file
# whose version they do not read, or that has none
KEY_FORMAT_VERSION = "nanoquant.format_version"
FORMAT_VERSION = 1
READABLE_FORMAT_VERSIONS = (1,)
KEY_TARGET_BPW = "nanoquant.target_bpw"
KEY_SETTINGS = "nanoquant.settings"  # JSON: the conversion settings as run (step counts after rank scaling)
# the largest scale magnitude readers accept: the kernels round the scaled activations into blocks whose scales are
# F16, whose largest value is 65504 (a scale of 3e38 is finite and makes every logit NaN)
SCALE_MAX = 65504.0


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """(rows, cols) array of signs (negative -> bit 1; zero counts as +1) -> (rows, cols/8) uint8 NQ1 rows."""
    signs = np.asarray(signs)
    if signs.ndim != 2 or signs.shape[1] % BLOCK:
        raise ValueError(f"pack_signs: expected a 2-D array with a multiple of {BLOCK} columns, got {signs.shape}")
    return np.packbits(signs < 0, axis=1, bitorder="little")


def unpack_signs(packed: np.ndarray, cols: int, dtype=np.float32) -> np.ndarray:
    """(rows, cols/8) uint8 NQ1 rows -> (rows, cols) array of +-1 (float32 unless told: int8 is a quarter of it)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] * 8 != cols:
        raise ValueError(f"unpack_signs: expected {cols // 8} bytes per row for {cols} signs, got {packed.shape}")
    bits = np.unpackbits(packed, axis=1, bitorder="little")
    return (1 - 2 * bits.astype(np.int8)).astype(dtype, copy=False)


def rank_for_bpw(d_out: int, d_in: int, bpw: float, scale_bits: int = SCALE_BITS, n_scales: int = 2) -> int:
    """The method's rank rule, counting the scales at the width they are stored with, so realized bpw <= target.

    r = floor32(bpw * m n / (m + n) - scale_bits), at least 32. Unlike the method's rule, r is not capped at
    min(m, n): a sum of r > min(m, n) sign outer products is still a richer matrix than one of min(m, n), and the
    cap would leave a 2.0-bpw budget unspent in every layer whose shape reaches it (SmolLM2: 1.56 bpw realized).
    """
    if bpw <= 0:
        raise ValueError(f"bpw must be positive, got {bpw}")
    if n_scales == 2:
        r_real = bpw * d_out * d_in / (d_out + d_in) - scale_bits
    else:  # with s_mid: b m n = r (m + n) + bits (m + n + r)
        r_real = (bpw * d_out * d_in - scale_bits * (d_out + d_in)) / (d_out + d_in + scale_bits)
    return max(RANK_MULTIPLE, int(math.floor(r_real / RANK_MULTIPLE)) * RANK_MULTIPLE)


@dataclass(frozen=True)
class LayerBits:
    d_out: int
    d_in: int
    rank: int
    has_s_pre: bool = True
    has_s_mid: bool = False
    has_s_post: bool = True

    @property
    def bits(self) -> int:
        signs = self.rank * (self.d_out + self.d_in)
        scales = SCALE_BITS * (self.d_in * self.has_s_pre + self.rank * self.has_s_mid + self.d_out * self.has_s_post)
        return signs + scales

    @property
    def weights(self) -> int:
        return self.d_out * self.d_in

    @property
    def bpw(self) -> float:
        return self.bits / self.weights

