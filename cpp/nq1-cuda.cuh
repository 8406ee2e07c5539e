// NQ1 on CUDA: the per-block arithmetic shared by ggml-cuda's generic paths (GET_ROWS and the cuBLAS conversions
// through dequantize_nq1, MMVQ through vec_dot_nq1_q8_1; registered by ggml_patches/0006) and by the fused
// NanoQuant layer of nq1-cuda.cu. Every function here is __host__ __device__ and takes the same path on both sides,
// so tests/kernels/nq1_cuda_test.cu checks it on the host against cpp/nq1-ref.c bit for bit.
//
// Device-only differences, and why they do not change results: ggml-cuda compiles with -use_fast_math, so plain
// division and reciprocals would be approximate on the device; the quantizer below uses the IEEE intrinsics
// __fdiv_rn/__frcp_rn there instead, and fmaf, not a * b + c, wherever a sum must round the same on both sides. One
// difference remains: -use_fast_math flushes subnormal floats to zero on the device (activations below 1.2e-38).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef GGML_COMMON_DECL  // ggml-cuda's common.cuh has included it already
#define GGML_COMMON_DECL_CUDA
#include "ggml-common.h"
#endif

#include "nq1.h"

#define QI_NQ1 (QK_NQ1 / 32)  // 32-bit words of signs per block
#define QR_NQ1 1              // values per dequantized element pair step (as Q8_0: no nibble split)
#define VDR_NQ1_Q8_1_MMVQ 1   // one block (32 signs against 32 int8) per thread and step

#define NQ1_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define NQ1_UNROLL _Pragma("unroll")
#else
#define NQ1_UNROLL  // the host compiler has no unroll pragma and warns about one
#endif

// ---- the sign block against int8 activations ------------------------------------------------------------------------

// CUDA's __byte_perm (PTX prmt, default mode): byte n of the result is byte (s >> 4n) & 7 of the 8 bytes y:x.
static NQ1_HD uint32_t nq1_byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
    return __byte_perm(x, y, s);
#else
    const uint64_t bytes = ((uint64_t) y << 32) | x;
    uint32_t r = 0;
    for (int n = 0; n < 4; n++) {
        r |= (uint32_t) ((bytes >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
    }
    return r;
#endif
}

// dot product of 4 signed bytes, accumulated: __dp4a on the device
static NQ1_HD int nq1_dp4a(uint32_t a, uint32_t b, int c) {
#ifdef __CUDA_ARCH__
    return __dp4a((int) a, (int) b, c);
#else
    for (int k = 0; k < 4; k++) {
        c += (int) (int8_t) (a >> (8 * k)) * (int) (int8_t) (b >> (8 * k));
    }
    return c;
#endif
}

// 16 signs (bits 0..15 of `bits`, bit 1 = -1) as 4 words of +-1 bytes, element k in byte k % 4 of word k / 4.
// Q1_0's expansion (ggml-cuda vecdotq.cuh) with the sign the other way round: prmt spreads 2-bit crumbs into nibble
// selectors, then a second prmt picks 0x01 (+1) or 0xFF (-1) per selector; 10 prmt for 16 signs.
static NQ1_HD void nq1_expand_signs16(uint32_t bits, uint32_t out[4]) {
    const uint32_t n0 = nq1_byte_perm(0x11100100u, 0x11100100u, bits >> 0);  // bits 0 1 4 5 | 8 9 12 13
    const uint32_t n1 = nq1_byte_perm(0x11100100u, 0x11100100u, bits >> 2);  // bits 2 3 6 7 | 10 11 14 15
    const uint32_t s0 = nq1_byte_perm(0xFF01u, 0xFF01u, n0 >> 0);
    const uint32_t s1 = nq1_byte_perm(0xFF01u, 0xFF01u, n1 >> 0);
    const uint32_t s2 = nq1_byte_perm(0xFF01u, 0xFF01u, n0 >> 16);
    const uint32_t s3 = nq1_byte_perm(0xFF01u, 0xFF01u, n1 >> 16);
    out[0] = nq1_byte_perm(s0, s1, 0x5410);
    out[1] = nq1_byte_perm(s0, s1, 0x7632);
    out[2] = nq1_byte_perm(s2, s3, 0x5410);
    out[3] = nq1_byte_perm(s2, s3, 0x7632);
}

// the 32 signs of one NQ1 block as 8 words of +-1 bytes
static NQ1_HD void nq1_expand_signs(uint32_t signs, uint32_t out[8]) {
    nq1_expand_signs16(signs & 0xFFFFu, out);
    nq1_expand_signs16(signs >> 16, out + 4);
}

// sum_k sign_k * q_k over one block: exact (|sum| <= 32 * 128)
static NQ1_HD int nq1_dot_expanded(const uint32_t expanded[8], const int32_t q[8]) {
    int sum = 0;
NQ1_UNROLL
    for (int j = 0; j < 8; j++) {
        sum = nq1_dp4a(expanded[j], (uint32_t) q[j], sum);
    }
    return sum;
}

static NQ1_HD int nq1_dot_q8(uint32_t signs, const int32_t q[8]) {
    uint32_t expanded[8];
    nq1_expand_signs(signs, expanded);
    return nq1_dot_expanded(expanded, q);
}

// a 4-byte aligned word (NQ1 rows are whole words; Q8 quants start 4 bytes into their block); memcpy on the host,
// where reading bytes through an int pointer breaks C++'s aliasing rules
static NQ1_HD uint32_t nq1_load_word(const void * p) {
#ifdef __CUDA_ARCH__
    return *(const uint32_t *) p;
#else
    uint32_t w;
    memcpy(&w, p, sizeof(w));
    return w;
#endif
}

static NQ1_HD uint32_t nq1_load_signs(const block_nq1 * b) {  // the little-endian word of the block's 32 signs
    return nq1_load_word(b->qs);
}

// ---- ggml-cuda's type interfaces (dequantize_kernel_t, vec_dot_q_cuda_t) --------------------------------------------

// elements iqs and iqs + 1 of block ib as +-1 (qk = 32, qr = 1: pairs of neighbours, as Q8_0)
static NQ1_HD void dequantize_nq1(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const uint32_t signs = nq1_load_signs((const block_nq1 *) vx + ib);
    v.x = (signs >> iqs) & 1 ? -1.0f : 1.0f;
    v.y = (signs >> (iqs + 1)) & 1 ? -1.0f : 1.0f;
}

// block kbx of an NQ1 row against one Q8_1 block of activations (iqs is 0: a block is one word, VDR 1). The integer
// sum is exact, so Q8_1's approximate block sum (ds.y, the rounded sum of the unquantized values) is not used.
static NQ1_HD float vec_dot_nq1_q8_1(const void * __restrict__ vbq, const block_q8_1 * __restrict__ bq8_1,
                                     const int & kbx, const int & iqs) {
    (void) iqs;
    int32_t q[8];
NQ1_UNROLL
    for (int j = 0; j < 8; j++) {
        q[j] = (int32_t) nq1_load_word(bq8_1->qs + 4 * j);
    }
    const uint32_t signs = nq1_load_signs((const block_nq1 *) vbq + kbx);
    return __low2float(bq8_1->ds) * (float) nq1_dot_q8(signs, q);
}

// ---- the fused layer's activation blocks ----------------------------------------------------------------------------

// 32 activations quantized to int8 with a float scale: value_k ~ d * q_k. The fused layer's own format (Q8_1 keeps d
// in half precision, and its sum is not needed), 4-byte aligned so the quants load as words.
struct nq1_q8_block {
    float d;
    int32_t qs[8];  // 32 int8, element k in byte k % 4 of word k / 4
};

// x[0..31] (times scale[0..31] when given: s_pre or s_mid folded in) as one block. The rule of ggml's Q8_0 reference
// quantizer with d kept in float: d = amax / 127, q = round(value / d) computed as value * (1 / d).
static NQ1_HD void nq1_quantize_q8(const float * x, const float * scale, nq1_q8_block * out) {
    float values[32];
    float amax = 0.0f;
    for (int k = 0; k < 32; k++) {
        values[k] = scale ? x[k] * scale[k] : x[k];
        amax = fmaxf(amax, fabsf(values[k]));
    }
#ifdef __CUDA_ARCH__
    const float d = __fdiv_rn(amax, 127.0f);
    const float id = d != 0.0f ? __frcp_rn(d) : 0.0f;
#else
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
#endif
    out->d = d;
    for (int j = 0; j < 8; j++) {
        uint32_t word = 0;
        for (int b = 0; b < 4; b++) {
            const int q = (int) roundf(values[4 * j + b] * id);
            word |= (uint32_t) (uint8_t) (int8_t) q << (8 * b);
        }
        out->qs[j] = (int32_t) word;
    }
}

// ---- the fused layer's rows -----------------------------------------------------------------------------------------

// Lane `lane` of `n_lanes`' share of n_cols rows-by-column products: blocks lane, lane + n_lanes, ... of the sign row
// against the same blocks of each column's activations (column c's blocks start at xq + c * n_blocks). The signs are
// expanded once per block for all columns. acc[c] += d * sum in block order, by fmaf, so a host loop over the lanes
// followed by nq1_warp_sum's order gives the device's bits.
template <int n_cols>
static NQ1_HD void nq1_row_partial(const uint32_t * row, const nq1_q8_block * xq, int n_blocks, int lane, int n_lanes,
                                   float acc[n_cols]) {
    for (int b = lane; b < n_blocks; b += n_lanes) {
        uint32_t expanded[8];
        nq1_expand_signs(row[b], expanded);
NQ1_UNROLL
        for (int c = 0; c < n_cols; c++) {
            const nq1_q8_block & blk = xq[(int64_t) c * n_blocks + b];
            acc[c] = fmaf(blk.d, (float) nq1_dot_expanded(expanded, blk.qs), acc[c]);
        }
    }
}

// The butterfly the device's warp sum runs (__shfl_xor_sync, offsets 16 .. 1), over 32 lanes' values on the host.
static inline __host__ void nq1_warp_sum_host(float lanes[32]) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float next[32];
        for (int l = 0; l < 32; l++) {
            next[l] = lanes[l] + lanes[l ^ offset];
        }
        for (int l = 0; l < 32; l++) {
            lanes[l] = next[l];
        }
    }
}

#ifdef __CUDACC__
static __device__ __forceinline__ float nq1_warp_sum(float v) {
NQ1_UNROLL
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xFFFFFFFFu, v, offset, 32);
    }
    return v;
}
#endif
