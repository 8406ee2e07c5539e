// Scalar references of NQ1 arithmetic beyond ggml's row (de)quantizers (cpp/nq1-ref.c): the spec that the CUDA
// device functions (cpp/nq1-cuda.cuh) are tested against, bit for bit, by tests/kernels/nq1_cuda_test.cu.
#pragma once

#include "nq1.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// sum_k sign_k * q_k over one block: 32 signs packed as NQ1 (bit 1 = -1) against 32 int8 values
int32_t nq1_dot_i8_ref(const uint8_t signs[NQ1_BLOCK_BYTES], const int8_t q[NQ1_BLOCK_SIZE]);

// The fused layers' activation quantization: x[0..n) times scale[0..n) (NULL: no scale), n a multiple of 32, in
// blocks of 32 as d[b] = amax / 127 and q = round(value * (1 / d[b])) (ggml's Q8_0 reference rule, d kept in float).
void nq1_quantize_i8_ref(const float * x, const float * scale, int64_t n, float * d, int8_t * q);

// The fused NanoQuant layer y = s_post * (U q(s_mid * (V q(s_pre * x)))) with q() the quantization above, for n_cols
// columns of x [n_cols][d_in] into y [n_cols][d_out]. v: rank rows of d_in signs, u: d_out rows of rank signs (NQ1
// rows); any scale may be NULL. Sums of a row are exact integers per block, added over the blocks in double.
void nq1_lowrank_ref(const float * x, int64_t n_cols, int64_t d_in, int64_t rank, int64_t d_out, const uint8_t * v,
                     const uint8_t * u, const float * s_pre, const float * s_mid, const float * s_post, float * y);

#ifdef __cplusplus
}
#endif
