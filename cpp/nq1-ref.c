// Reference (deterministic) NQ1 quantize/dequantize, compiled into ggml-base by the project's CMakeLists.txt.
#include "nq1.h"

#include "ggml-quants.h"

#include <assert.h>
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
    return (size_t) nrows * ggml_row_size(GGML_TYPE_NQ1, n_per_row);
}
