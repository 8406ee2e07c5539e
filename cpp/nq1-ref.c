// Reference (deterministic) NQ1 quantize/dequantize, and the scalar references of nq1-ref.h; compiled into ggml-base
// by the project's CMakeLists.txt.
#include "nq1.h"
#include "nq1-ref.h"

#include "ggml-quants.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(GGML_TYPE_NQ1 == NQ1_GGML_TYPE_ID, "ggml.h and cpp/nq1.h disagree on the NQ1 type id");
_Static_assert(GGML_FTYPE_MOSTLY_NQ1 == NQ1_LLAMA_FTYPE_ID, "ggml.h and cpp/nq1.h disagree on the NQ1 ftype");
_Static_assert(QK_NQ1 == NQ1_BLOCK_SIZE && sizeof(block_nq1) == NQ1_BLOCK_BYTES, "NQ1 block layout mismatch");

// sign(0) := +1, as NanoQuant's sign_ste; NaN is treated like a non-negative value
void quantize_row_nq1_ref(const float * GGML_RESTRICT x, block_nq1 * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_NQ1 == 0);
    const int64_t nb = k / QK_NQ1;
    for (int64_t i = 0; i < nb; i++) {
        uint32_t bits = 0;
        for (int j = 0; j < QK_NQ1; j++) {
            bits |= (uint32_t) (x[i * QK_NQ1 + j] < 0.0f) << j;
        }
        for (int b = 0; b < 4; b++) {
            y[i].qs[b] = (uint8_t) (bits >> (8 * b));
        }
    }
}

void dequantize_row_nq1(const block_nq1 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_NQ1 == 0);
    const int64_t nb = k / QK_NQ1;
    for (int64_t i = 0; i < nb; i++) {
        for (int j = 0; j < QK_NQ1; j++) {
            y[i * QK_NQ1 + j] = (x[i].qs[j >> 3] >> (j & 7)) & 1 ? -1.0f : 1.0f;
        }
    }
}

// signs carry no magnitude, so an importance matrix cannot change the result
size_t quantize_nq1(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row,
                    const float * imatrix) {
    (void) imatrix;
    quantize_row_nq1_ref(src, (block_nq1 *) dst, nrows * n_per_row);
    return (size_t) (nrows * (n_per_row / QK_NQ1)) * sizeof(block_nq1);  // ggml_row_size, without ggml.c
}

// ---- references of the CUDA kernels' arithmetic (nq1-ref.h) ----

int32_t nq1_dot_i8_ref(const uint8_t signs[NQ1_BLOCK_BYTES], const int8_t q[NQ1_BLOCK_SIZE]) {
    float s[QK_NQ1];
    dequantize_row_nq1((const block_nq1 *) signs, s, QK_NQ1);
    int32_t sum = 0;
    for (int k = 0; k < QK_NQ1; k++) {
        sum += (int32_t) s[k] * q[k];
    }
    return sum;
}

void nq1_quantize_i8_ref(const float * x, const float * scale, int64_t n, float * d, int8_t * q) {
    assert(n % QK_NQ1 == 0);
    for (int64_t b = 0; b < n / QK_NQ1; b++) {
        float values[QK_NQ1];
        float amax = 0.0f;
        for (int k = 0; k < QK_NQ1; k++) {
            const int64_t i = b * QK_NQ1 + k;
            values[k] = scale ? x[i] * scale[i] : x[i];
            amax = fabsf(values[k]) > amax ? fabsf(values[k]) : amax;
        }
        d[b] = amax / 127.0f;
        const float id = d[b] != 0.0f ? 1.0f / d[b] : 0.0f;
        for (int k = 0; k < QK_NQ1; k++) {
            q[b * QK_NQ1 + k] = (int8_t) roundf(values[k] * id);
        }
    }
}

// rows x sign rows of k signs: out[r] = sum over blocks of d[b] * (sign row r . q block b), in double
static void nq1_rows_times_i8_ref(const uint8_t * rows, int64_t n_rows, int64_t k, const float * d, const int8_t * q,
                                  float * out) {
    const size_t row_bytes = (size_t) k / 8;
    for (int64_t r = 0; r < n_rows; r++) {
        double sum = 0.0;
        for (int64_t b = 0; b < k / QK_NQ1; b++) {
            sum += (double) d[b] * nq1_dot_i8_ref(rows + r * row_bytes + b * NQ1_BLOCK_BYTES, q + b * QK_NQ1);
        }
        out[r] = (float) sum;
    }
}

void nq1_lowrank_ref(const float * x, int64_t n_cols, int64_t d_in, int64_t rank, int64_t d_out, const uint8_t * v,
                     const uint8_t * u, const float * s_pre, const float * s_mid, const float * s_post, float * y) {
    const int64_t k_max = d_in > rank ? d_in : rank;
    float * d = (float *) malloc(sizeof(float) * (size_t) (k_max / QK_NQ1));
    int8_t * q = (int8_t *) malloc((size_t) k_max);
    float * t = (float *) malloc(sizeof(float) * (size_t) rank);
    for (int64_t c = 0; c < n_cols; c++) {
        nq1_quantize_i8_ref(x + c * d_in, s_pre, d_in, d, q);
        nq1_rows_times_i8_ref(v, rank, d_in, d, q, t);
        nq1_quantize_i8_ref(t, s_mid, rank, d, q);
        float * yc = y + c * d_out;
        nq1_rows_times_i8_ref(u, d_out, rank, d, q, yc);
        for (int64_t r = 0; s_post && r < d_out; r++) {
            yc[r] *= s_post[r];
        }
    }
    free(d);
    free(q);
    free(t);
}
