// NQ1 x Q8_0 dot products for ggml-cpu, compiled into it by the project's CMakeLists.txt.
// One place picks the kernel: AVX2, NEON (aarch64), else the scalar reference. Every path forms the exact integer
// sum of each 32-block and accumulates the per-block products in the same order, so all paths agree bit for bit.
#include "nq1.h"

#include "ggml-common.h"
#include "ggml-quants.h"
#include "ggml-impl.h"
#include "ggml-cpu.h"
#include "simd-mappings.h"
#include "quants.h"

#include <assert.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

void quantize_row_nq1(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_nq1_ref(x, (block_nq1 *) y, k);
}

static inline uint32_t nq1_load_bits(const block_nq1 * b) {
    return (uint32_t) b->qs[0] | (uint32_t) b->qs[1] << 8 | (uint32_t) b->qs[2] << 16 | (uint32_t) b->qs[3] << 24;
}

void ggml_vec_dot_nq1_q8_0_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                   size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(n % QK_NQ1 == 0);
    assert(nrc == 1);
    (void) bs; (void) bx; (void) by; (void) nrc;
    const block_nq1 * GGML_RESTRICT x = vx;
    const block_q8_0 * GGML_RESTRICT y = vy;
    const int nb = n / QK_NQ1;

    float sumf = 0.0f;
    for (int i = 0; i < nb; i++) {
        const uint32_t bits = nq1_load_bits(&x[i]);
        int sumi = 0;
        for (int j = 0; j < QK_NQ1; j++) {
            const int q = y[i].qs[j];
            sumi += (bits >> j) & 1 ? -q : q;
        }
        const float term = (float) sumi * GGML_CPU_FP16_TO_FP32(y[i].d);
        sumf += term;
    }
    *s = sumf;
}

#if defined(__AVX2__)
// 32 signs -> 32 byte masks (0xFF where the sign is -1)
static inline __m256i nq1_masks_avx2(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit_of_lane = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int) bits), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit_of_lane), bit_of_lane);
}

static inline int hsum_i32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}
#endif

void ggml_vec_dot_nq1_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                           const void * GGML_RESTRICT vy, size_t by, int nrc) {
#if defined(__AVX2__)
    assert(n % QK_NQ1 == 0);
    (void) bs; (void) bx; (void) by; (void) nrc;
    const block_nq1 * GGML_RESTRICT x = vx;
    const block_q8_0 * GGML_RESTRICT y = vy;
    const int nb = n / QK_NQ1;
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);

    float sumf = 0.0f;
    for (int i = 0; i < nb; i++) {
        const __m256i neg = nq1_masks_avx2(nq1_load_bits(&x[i]));
        const __m256i q = _mm256_loadu_si256((const __m256i *) y[i].qs);
        // q8_0 values lie in [-127, 127], so negation by (q ^ m) - m cannot overflow
        const __m256i signed_q = _mm256_sub_epi8(_mm256_xor_si256(q, neg), neg);
        const __m256i sum32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, signed_q), ones16);
        const float term = (float) hsum_i32_avx2(sum32) * GGML_CPU_FP16_TO_FP32(y[i].d);
        sumf += term;
    }
    *s = sumf;
#elif defined(__ARM_NEON) && defined(__aarch64__)
    assert(n % QK_NQ1 == 0);
    (void) bs; (void) bx; (void) by; (void) nrc;
    const block_nq1 * GGML_RESTRICT x = vx;
    const block_q8_0 * GGML_RESTRICT y = vy;
    const int nb = n / QK_NQ1;
    const uint8x16_t bit_of_lane = { 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128 };

    float sumf = 0.0f;
    for (int i = 0; i < nb; i++) {
        const uint32_t bits = nq1_load_bits(&x[i]);
        const uint8x16_t lo = vcombine_u8(vdup_n_u8((uint8_t) bits), vdup_n_u8((uint8_t) (bits >> 8)));
        const uint8x16_t hi = vcombine_u8(vdup_n_u8((uint8_t) (bits >> 16)), vdup_n_u8((uint8_t) (bits >> 24)));
        const int8x16_t neg_lo = vreinterpretq_s8_u8(vtstq_u8(lo, bit_of_lane));
        const int8x16_t neg_hi = vreinterpretq_s8_u8(vtstq_u8(hi, bit_of_lane));
        const int8x16_t q_lo = vld1q_s8(y[i].qs);
        const int8x16_t q_hi = vld1q_s8(y[i].qs + 16);
        const int8x16_t s_lo = vsubq_s8(veorq_s8(q_lo, neg_lo), neg_lo);
        const int8x16_t s_hi = vsubq_s8(veorq_s8(q_hi, neg_hi), neg_hi);
        const int16x8_t pairs = vaddq_s16(vpaddlq_s8(s_lo), vpaddlq_s8(s_hi));
        const float term = (float) vaddvq_s32(vpaddlq_s16(pairs)) * GGML_CPU_FP16_TO_FP32(y[i].d);
        sumf += term;
    }
    *s = sumf;
#else
    ggml_vec_dot_nq1_q8_0_generic(n, s, bs, vx, bx, vy, by, nrc);
#endif
}
