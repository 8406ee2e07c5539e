// Table-lookup NQ1 GEMV and its table builder: scalar references, AVX-512 (VBMI + VNNI, GEMV only), AVX2 and NEON
// (aarch64), selected in nq1_lut_gemv and nq1_lut_build. See nq1-lut.h.
#include "nq1-lut.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NQ1_LUT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
#define NQ1_LUT_AVX512 1
#endif
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define NQ1_LUT_NEON 1
#endif

#define GROUP        4                        // activations per table
#define ENTRIES      16                       // 2^GROUP
#define GROUPS       (NQ1_LUT_BLOCK / GROUP)  // tables per scale
#define ALIGN        64
// Weight bytes of a row kept together in the tiled layout: the AVX-512 kernel reads a whole block of a row (4 bytes) as
// one 32-bit lane, the 16-byte-table kernels one byte column of the tile at a time.
#if defined(NQ1_LUT_AVX512)
#define CHUNK        (NQ1_LUT_BLOCK / 8)
#else
#define CHUNK        1
#endif
// How far ahead of its reads the AVX-512 GEMV prefetches weights. Its weights are one sequential stream per thread,
// yet the hardware prefetchers alone left one Zen 5 core at ~70% of its read bandwidth; 2-3 KB ahead gave ~80% in
// bench/kernels.py --shapes stream and ~8% more tokens/s in llama-bench tg64 of the synthetic 1B (1 thread; 512 B and
// 1 KB ahead did not help there).
#define PREFETCH_AHEAD 2048

// Table memory of a vector of length k: k/NQ1_LUT_BLOCK float scales, padded to ALIGN, then k/GROUP tables of
// ENTRIES int8 values (group g of block b at table index b*GROUPS + g).
static size_t scales_bytes(int64_t k) {
    const size_t raw = (size_t) (k / NQ1_LUT_BLOCK) * sizeof(float);
    return (raw + ALIGN - 1) / ALIGN * ALIGN;
}

size_t nq1_lut_tables_size(int64_t k) {
    return scales_bytes(k) + (size_t) (k / GROUP) * ENTRIES;
}

static const float * table_scales(const void * tables) {
    return (const float *) tables;
}

static const int8_t * table_entries(const void * tables, int64_t k) {
    return (const int8_t *) tables + scales_bytes(k);
}

// --- repacking ------------------------------------------------------------------------------------------------------
// Inside a tile, byte j of row i sits at chunk j / CHUNK: the chunks of all the tile's rows are contiguous.
static size_t tiled_offset(int64_t i, int64_t j) {
    return (size_t) ((j / CHUNK * NQ1_LUT_TILE + i) * CHUNK + j % CHUNK);
}

void nq1_lut_repack(const uint8_t * canonical, uint8_t * tiled, int64_t n_rows, int64_t k) {
    assert(n_rows % NQ1_LUT_TILE == 0 && k % NQ1_LUT_BLOCK == 0);
    const int64_t row_bytes = k / 8;
    for (int64_t t = 0; t < n_rows / NQ1_LUT_TILE; t++) {
        uint8_t * tile = tiled + t * NQ1_LUT_TILE * row_bytes;
        for (int64_t i = 0; i < NQ1_LUT_TILE; i++) {
            const uint8_t * row = canonical + (t * NQ1_LUT_TILE + i) * row_bytes;
            for (int64_t j = 0; j < row_bytes; j++) {
                tile[tiled_offset(i, j)] = row[j];
            }
        }
    }
}

void nq1_lut_unpack(const uint8_t * tiled, uint8_t * canonical, int64_t n_rows, int64_t k) {
    assert(n_rows % NQ1_LUT_TILE == 0 && k % NQ1_LUT_BLOCK == 0);
    const int64_t row_bytes = k / 8;
    for (int64_t t = 0; t < n_rows / NQ1_LUT_TILE; t++) {
        const uint8_t * tile = tiled + t * NQ1_LUT_TILE * row_bytes;
        for (int64_t i = 0; i < NQ1_LUT_TILE; i++) {
            uint8_t * row = canonical + (t * NQ1_LUT_TILE + i) * row_bytes;
            for (int64_t j = 0; j < row_bytes; j++) {
                row[j] = tile[tiled_offset(i, j)];
            }
        }
    }
}

// --- tables ---------------------------------------------------------------------------------------------------------
// The scalar reference. Every SIMD build does the same IEEE operations on each value (no -ffast-math anywhere), so for
// finite activations all builds write identical tables.
#define MAX_BUILD_BLOCKS 2  // the most blocks one table-builder call takes

// blocks b .. b+n-1 of x, times the scale vector where one is given: each product rounded once, as a separate
// multiply would
static const float * scaled_blocks(const float * x, const float * scale, int64_t b, int n, float * buffer) {
    const float * xb = x + b * NQ1_LUT_BLOCK;
    if (!scale) {
        return xb;
    }
    for (int j = 0; j < n * NQ1_LUT_BLOCK; j++) {
        buffer[j] = xb[j] * scale[b * NQ1_LUT_BLOCK + j];
    }
    return buffer;
}

void nq1_lut_build_ref(const float * x, const float * scale, int64_t k, int64_t block_begin, int64_t block_end,
                       void * tables) {
    assert(k % NQ1_LUT_BLOCK == 0 && 0 <= block_begin && block_begin <= block_end && block_end <= k / NQ1_LUT_BLOCK);
    float * scales = (float *) tables;
    int8_t * entries = (int8_t *) tables + scales_bytes(k);
    for (int64_t b = block_begin; b < block_end; b++) {
        float buffer[NQ1_LUT_BLOCK];
        const float * xb = scaled_blocks(x, scale, b, 1, buffer);
        float sums[GROUPS][ENTRIES / 2];
        float amax = 0.0f;  // the largest |sum| of the block: rounding is monotonic, so no sum exceeds it
        for (int g = 0; g < GROUPS; g++) {
            const float * xg = xb + g * GROUP;
            const float abs_sum = ((fabsf(xg[3]) + fabsf(xg[2])) + fabsf(xg[1])) + fabsf(xg[0]);
            amax = abs_sum > amax ? abs_sum : amax;
            for (int n = 0; n < ENTRIES / 2; n++) {  // bit 3 clear: +x3; the other half is the negation
                float s = xg[3];
                s += (n & 4) ? -xg[2] : xg[2];
                s += (n & 2) ? -xg[1] : xg[1];
                s += (n & 1) ? -xg[0] : xg[0];
                sums[g][n] = s;
            }
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        scales[b] = amax / 127.0f;
        for (int g = 0; g < GROUPS; g++) {
            int8_t * table = entries + (b * GROUPS + g) * ENTRIES;
            for (int n = 0; n < ENTRIES / 2; n++) {
                const int8_t q = (int8_t) nearbyintf(sums[g][n] * inv);  // ties to even: symmetric, so -q is exact
                table[n] = q;
                table[ENTRIES - 1 - n] = (int8_t) -q;
            }
        }
    }
}

#if defined(NQ1_LUT_AVX2)
// The tables of one block with lanes = groups. Entry n of a group is ((x3 +- x2) +- x1) +- x0 as in the reference, and
// the reference's amax (the largest rounded sum of absolute values) is the largest |entry|: one entry of each group
// takes every term with the sign of x3 and so equals +-((|x3| + |x2|) + |x1|) + |x0| exactly, and rounding is
// monotonic, so no other entry exceeds it.
static void build_block_avx2(const float * xb, float * scale, int8_t * table) {
    const __m256 l0 = _mm256_loadu_ps(xb), l1 = _mm256_loadu_ps(xb + 8);
    const __m256 l2 = _mm256_loadu_ps(xb + 16), l3 = _mm256_loadu_ps(xb + 24);
    // in-lane 4x4 transpose: x_c holds element c of groups [0 2 4 6 | 1 3 5 7]
    const __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(l0, l1)), t1 = _mm256_castps_pd(_mm256_unpackhi_ps(l0, l1));
    const __m256d t2 = _mm256_castps_pd(_mm256_unpacklo_ps(l2, l3)), t3 = _mm256_castps_pd(_mm256_unpackhi_ps(l2, l3));
    const __m256 x0 = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2)), x1 = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
    const __m256 x2 = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3)), x3 = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
    // entries 0-7 (bit 3 clear); bit b set subtracts x_b
    const __m256 a[2] = { _mm256_add_ps(x3, x2), _mm256_sub_ps(x3, x2) };
    __m256 e[ENTRIES / 2];
    for (int n = 0; n < ENTRIES / 2; n += 2) {
        const __m256 b = (n & 2) ? _mm256_sub_ps(a[n >> 2], x1) : _mm256_add_ps(a[n >> 2], x1);
        e[n] = _mm256_add_ps(b, x0);
        e[n + 1] = _mm256_sub_ps(b, x0);
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 abs_e[ENTRIES / 2];
    for (int n = 0; n < ENTRIES / 2; n++) {
        abs_e[n] = _mm256_andnot_ps(sign, e[n]);
    }
    // a tree, not a chain; |entries| >= +0, so no -0 can become the scale
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(abs_e[0], abs_e[1]), _mm256_max_ps(abs_e[2], abs_e[3])),
                             _mm256_max_ps(_mm256_max_ps(abs_e[4], abs_e[5]), _mm256_max_ps(abs_e[6], abs_e[7])));
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1));
    // the reference's scalar divisions, done on all lanes: inv = 127 / amax, or 0 for an all-zero block
    const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.0f), m),
                                     _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_GT_OQ));
    *scale = _mm256_cvtss_f32(_mm256_div_ps(m, _mm256_set1_ps(127.0f)));
    // Quantise (cvtps rounds to nearest even, as nearbyintf does) four entries at a time into bytes [entry][group] per
    // lane, then reorder them [group][entry]. Entry 15-n is -entry n: the negated bytes of entries 0-3 are entries
    // 15-12, reordered with the entries reversed.
    const __m256i group_major = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i group_major_reversed = _mm256_setr_epi8(
        12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 15, 11, 7, 3, 12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 15, 11, 7, 3);
    __m256i r[4];  // r[i]: entries 4i..4i+3 of every group, [group][entry]
    for (int i = 0; i < 2; i++) {
        const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(e[4 * i], inv));
        const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(e[4 * i + 1], inv));
        const __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(e[4 * i + 2], inv));
        const __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(e[4 * i + 3], inv));
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        r[i] = _mm256_shuffle_epi8(p, group_major);
        r[3 - i] = _mm256_shuffle_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), p), group_major_reversed);
    }
    // 4x4 transpose of 4-entry pieces: each result holds the 16-entry tables of groups 2i (low lane) and 2i+1
    const __m256i u0 = _mm256_unpacklo_epi32(r[0], r[1]), u1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i u2 = _mm256_unpacklo_epi32(r[2], r[3]), u3 = _mm256_unpackhi_epi32(r[2], r[3]);
    _mm256_storeu_si256((__m256i *) table, _mm256_unpacklo_epi64(u0, u2));
    _mm256_storeu_si256((__m256i *) (table + 32), _mm256_unpackhi_epi64(u0, u2));
    _mm256_storeu_si256((__m256i *) (table + 64), _mm256_unpacklo_epi64(u1, u3));
    _mm256_storeu_si256((__m256i *) (table + 96), _mm256_unpackhi_epi64(u1, u3));
}
#endif

#if defined(NQ1_LUT_AVX512)
// The tables of two blocks at once, the same operations per value as build_block_avx2 (see there) with lanes =
// 16 groups: after the in-lane transpose 128-bit lane L holds groups L, 4+L (first block) and 8+L, 12+L (second), so
// each block's amax is the max over two positions of all four lanes, and the four stores come out in group order.
static void build_pair_avx512(const float * xb, float * scale, int8_t * table) {
    const __m512 l0 = _mm512_loadu_ps(xb), l1 = _mm512_loadu_ps(xb + 16);
    const __m512 l2 = _mm512_loadu_ps(xb + 32), l3 = _mm512_loadu_ps(xb + 48);
    const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(l0, l1)), t1 = _mm512_castps_pd(_mm512_unpackhi_ps(l0, l1));
    const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(l2, l3)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(l2, l3));
    const __m512 x0 = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)), x1 = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    const __m512 x2 = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)), x3 = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    const __m512 a[2] = { _mm512_add_ps(x3, x2), _mm512_sub_ps(x3, x2) };
    __m512 e[ENTRIES / 2];
    for (int n = 0; n < ENTRIES / 2; n += 2) {
        const __m512 b = (n & 2) ? _mm512_sub_ps(a[n >> 2], x1) : _mm512_add_ps(a[n >> 2], x1);
        e[n] = _mm512_add_ps(b, x0);
        e[n + 1] = _mm512_sub_ps(b, x0);
    }
    __m512 abs_e[ENTRIES / 2];
    for (int n = 0; n < ENTRIES / 2; n++) {
        abs_e[n] = _mm512_abs_ps(e[n]);
    }
    __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_max_ps(abs_e[0], abs_e[1]), _mm512_max_ps(abs_e[2], abs_e[3])),
                             _mm512_max_ps(_mm512_max_ps(abs_e[4], abs_e[5]), _mm512_max_ps(abs_e[6], abs_e[7])));
    m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0x4E));  // over the four lanes
    m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xB1));
    m = _mm512_max_ps(m, _mm512_shuffle_ps(m, m, 0xB1));     // positions 0-1: first block, 2-3: second
    const __mmask16 nonzero = _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(127.0f), m);
    const __m128 d = _mm_div_ps(_mm512_castps512_ps128(m), _mm_set1_ps(127.0f));
    scale[0] = _mm_cvtss_f32(d);
    scale[1] = _mm_cvtss_f32(_mm_movehl_ps(d, d));
    const __m512i group_major = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i group_major_reversed = _mm512_broadcast_i32x4(
        _mm_setr_epi8(12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 15, 11, 7, 3));
    __m512i r[4];  // r[i]: entries 4i..4i+3 of every group, [group][entry] per lane
    for (int i = 0; i < 2; i++) {
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(e[4 * i], inv));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(e[4 * i + 1], inv));
        const __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(e[4 * i + 2], inv));
        const __m512i q3 = _mm512_cvtps_epi32(_mm512_mul_ps(e[4 * i + 3], inv));
        const __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(q0, q1), _mm512_packs_epi32(q2, q3));
        r[i] = _mm512_shuffle_epi8(p, group_major);
        r[3 - i] = _mm512_shuffle_epi8(_mm512_sub_epi8(_mm512_setzero_si512(), p), group_major_reversed);
    }
    const __m512i u0 = _mm512_unpacklo_epi32(r[0], r[1]), u1 = _mm512_unpackhi_epi32(r[0], r[1]);
    const __m512i u2 = _mm512_unpacklo_epi32(r[2], r[3]), u3 = _mm512_unpackhi_epi32(r[2], r[3]);
    _mm512_storeu_si512(table, _mm512_unpacklo_epi64(u0, u2));
    _mm512_storeu_si512(table + 64, _mm512_unpackhi_epi64(u0, u2));
    _mm512_storeu_si512(table + 128, _mm512_unpacklo_epi64(u1, u3));
    _mm512_storeu_si512(table + 192, _mm512_unpackhi_epi64(u1, u3));
}
#endif

#if defined(NQ1_LUT_NEON)
// The tables of one block with lanes = groups, the same operations as build_block_avx2 (see there).
static void build_block_neon(const float * xb, float * scale, int8_t * table) {
    const float32x4x4_t x[2] = { vld4q_f32(xb), vld4q_f32(xb + 16) };  // x[h].val[c]: element c of groups 4h..4h+3
    float32x4_t e[2][ENTRIES / 2];  // entries 0-7 (bit 3 clear); bit b set subtracts x_b
    float32x4_t m = vdupq_n_f32(0.0f);
    for (int h = 0; h < 2; h++) {
        const float32x4_t a[2] = { vaddq_f32(x[h].val[3], x[h].val[2]), vsubq_f32(x[h].val[3], x[h].val[2]) };
        for (int n = 0; n < ENTRIES / 2; n += 2) {
            const float32x4_t b = (n & 2) ? vsubq_f32(a[n >> 2], x[h].val[1]) : vaddq_f32(a[n >> 2], x[h].val[1]);
            e[h][n] = vaddq_f32(b, x[h].val[0]);
            e[h][n + 1] = vsubq_f32(b, x[h].val[0]);
            m = vmaxq_f32(m, vmaxq_f32(vabsq_f32(e[h][n]), vabsq_f32(e[h][n + 1])));
        }
    }
    const float amax = vmaxvq_f32(m);
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *scale = amax / 127.0f;
    int8x16x4_t q;  // q.val[i]: entries 2i and 2i+1 of groups 0-7 (vcvtn rounds to nearest even, as nearbyintf does)
    for (int i = 0; i < 4; i++) {
        int8x8_t pair[2];
        for (int j = 0; j < 2; j++) {
            const int n = 2 * i + j;
            pair[j] = vqmovn_s16(vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(e[0][n], inv))),
                                              vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(e[1][n], inv)))));
        }
        q.val[i] = vcombine_s8(pair[0], pair[1]);
    }
    // entry n of group g is byte 8n + g of q: gather entries 0-7 of groups g and g+1, then entries 15-8 = -(0-7)
    static const uint8_t first_pair[16] = { 0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57 };
    const uint8x16_t first = vld1q_u8(first_pair);
    for (int g = 0; g < GROUPS; g += 2) {
        const int8x16_t low = vqtbl4q_s8(q, vaddq_u8(first, vdupq_n_u8((uint8_t) g)));
        const int64x2_t high = vreinterpretq_s64_s8(vrev64q_s8(vnegq_s8(low)));
        vst1q_s8(table + g * ENTRIES, vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(low), high)));
        vst1q_s8(table + (g + 1) * ENTRIES, vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(low), high)));
    }
}
#endif

// the one place that picks the table builder
void nq1_lut_build(const float * x, const float * scale, int64_t k, int64_t block_begin, int64_t block_end,
                   void * tables) {
#if defined(NQ1_LUT_AVX2) || defined(NQ1_LUT_NEON)
    // widest first: each takes as many blocks at a time as it can, the next one the rest
    static const struct {
        void (*build)(const float * xb, float * scales, int8_t * tables);
        int blocks;
    } builders[] = {
#if defined(NQ1_LUT_AVX512)
        { build_pair_avx512, 2 },
#endif
#if defined(NQ1_LUT_AVX2)
        { build_block_avx2, 1 },
#else
        { build_block_neon, 1 },
#endif
    };
    assert(k % NQ1_LUT_BLOCK == 0 && 0 <= block_begin && block_begin <= block_end && block_end <= k / NQ1_LUT_BLOCK);
    float * scales = (float *) tables;
    int8_t * entries = (int8_t *) tables + scales_bytes(k);
    int64_t b = block_begin;
    for (size_t i = 0; i < sizeof(builders) / sizeof(builders[0]); i++) {
        for (const int n = builders[i].blocks; b + n <= block_end; b += n) {
            float buffer[MAX_BUILD_BLOCKS * NQ1_LUT_BLOCK];
            builders[i].build(scaled_blocks(x, scale, b, n, buffer), scales + b, entries + b * GROUPS * ENTRIES);
        }
    }
#else
    nq1_lut_build_ref(x, scale, k, block_begin, block_end, tables);
#endif
}

// --- kernels --------------------------------------------------------------------------------------------------------
void nq1_lut_gemv_ref(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                      const float * row_scale, float * y) {
    const int64_t row_bytes = k / 8, n_blocks = k / NQ1_LUT_BLOCK;
    const float * scales = table_scales(tables);
    const int8_t * entries = table_entries(tables, k);
    for (int64_t t = tile_begin; t < tile_end; t++) {
        const uint8_t * tile = tiled + t * NQ1_LUT_TILE * row_bytes;
        for (int i = 0; i < NQ1_LUT_TILE; i++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < n_blocks; b++) {
                int sum = 0;  // exact: at most GROUPS * 127 in magnitude
                for (int jj = 0; jj < NQ1_LUT_BLOCK / 8; jj++) {
                    const int64_t j = b * (NQ1_LUT_BLOCK / 8) + jj;
                    const uint8_t byte = tile[tiled_offset(i, j)];
                    sum += entries[(2 * j) * ENTRIES + (byte & 15)] + entries[(2 * j + 1) * ENTRIES + (byte >> 4)];
                }
                acc = fmaf(scales[b], (float) sum, acc);
            }
            const int64_t out = (t - tile_begin) * NQ1_LUT_TILE + i;
            y[out] = row_scale ? acc * row_scale[out] : acc;
        }
    }
}

#if defined(NQ1_LUT_AVX512)
// One 32-bit lane holds a row's 4 bytes of a block; byte q carries groups 2q (low nibble) and 2q+1 (high nibble).
// vpermi2b looks each nibble up in the block's 8 tables (128 bytes, two registers), the index's bits 4-6 naming the
// group, and leaves a row's 8 entries of the block in its own lane, where vpdpbusd adds them exactly into int32.
static void gemv_avx512(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                        const float * row_scale, float * y) {
    const int64_t row_bytes = k / 8, n_blocks = k / NQ1_LUT_BLOCK;
    const float * scales = table_scales(tables);
    const int8_t * entries = table_entries(tables, k);
    const __m512i low_nibble = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi8(1);
    const __m512i group_lo = _mm512_set1_epi32(0x60402000), group_hi = _mm512_set1_epi32(0x70503010);
    const int nibble_or_group = 0xEA;  // vpternlog: (a & b) | c
    for (int64_t t = tile_begin; t < tile_end; t++) {
        const uint8_t * tile = tiled + t * NQ1_LUT_TILE * row_bytes;
        __m512 acc[2] = { _mm512_setzero_ps(), _mm512_setzero_ps() };  // rows 0-15, 16-31
        for (int64_t b = 0; b < n_blocks; b++) {
            const __m512i t0 = _mm512_loadu_si512(entries + b * GROUPS * ENTRIES);
            const __m512i t1 = _mm512_loadu_si512(entries + b * GROUPS * ENTRIES + 64);
            const __m512 d = _mm512_set1_ps(scales[b]);
            const uint8_t * block = tile + tiled_offset(0, b * CHUNK);  // 128 bytes: two cache lines
            _mm_prefetch((const char *) block + PREFETCH_AHEAD, _MM_HINT_T0);
            _mm_prefetch((const char *) block + PREFETCH_AHEAD + 64, _MM_HINT_T0);
            for (int h = 0; h < 2; h++) {
                const __m512i w = _mm512_loadu_si512(tile + tiled_offset(16 * h, b * CHUNK));
                const __m512i idx_lo = _mm512_ternarylogic_epi32(w, low_nibble, group_lo, nibble_or_group);
                const __m512i idx_hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low_nibble, group_hi,
                                                                 nibble_or_group);
                const __m512i v_lo = _mm512_permutex2var_epi8(t0, idx_lo, t1);
                const __m512i v_hi = _mm512_permutex2var_epi8(t0, idx_hi, t1);
                const __m512i sum_lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v_lo);
                const __m512i sum = _mm512_dpbusd_epi32(sum_lo, ones, v_hi);
                acc[h] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), acc[h]);
            }
        }
        const int64_t out = (t - tile_begin) * NQ1_LUT_TILE;
        for (int h = 0; h < 2; h++) {
            const __m512 s = row_scale ? _mm512_loadu_ps(row_scale + out + 16 * h) : _mm512_set1_ps(1.0f);
            _mm512_storeu_ps(y + out + 16 * h, _mm512_mul_ps(acc[h], s));
        }
    }
}
#elif defined(NQ1_LUT_AVX2)
static void gemv_avx2(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                      const float * row_scale, float * y) {
    const int64_t row_bytes = k / 8, n_blocks = k / NQ1_LUT_BLOCK;
    const float * scales = table_scales(tables);
    const int8_t * entries = table_entries(tables, k);
    const __m256i low_nibble = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t t = tile_begin; t < tile_end; t++) {
        const uint8_t * tile = tiled + t * NQ1_LUT_TILE * row_bytes;
        // rows 0-7, 8-15, 16-23, 24-31
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
        for (int64_t b = 0; b < n_blocks; b++) {
            // interleaving the lookups of a byte's two nibbles lets maddubs add them into int16 per row:
            // sum_a holds rows 0-7 | 16-23, sum_b rows 8-15 | 24-31
            __m256i sum_a = _mm256_setzero_si256(), sum_b = _mm256_setzero_si256();
            for (int jj = 0; jj < NQ1_LUT_BLOCK / 8; jj++) {
                const int64_t j = b * (NQ1_LUT_BLOCK / 8) + jj;
                const __m256i w = _mm256_loadu_si256((const __m256i *) (tile + tiled_offset(0, j)));
                const __m256i lo = _mm256_and_si256(w, low_nibble);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low_nibble);
                const __m256i t_lo = _mm256_broadcastsi128_si256(
                    _mm_loadu_si128((const __m128i *) (entries + (2 * j) * ENTRIES)));
                const __m256i t_hi = _mm256_broadcastsi128_si256(
                    _mm_loadu_si128((const __m128i *) (entries + (2 * j + 1) * ENTRIES)));
                const __m256i v_lo = _mm256_shuffle_epi8(t_lo, lo);
                const __m256i v_hi = _mm256_shuffle_epi8(t_hi, hi);
                sum_a = _mm256_add_epi16(sum_a, _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(v_lo, v_hi)));
                sum_b = _mm256_add_epi16(sum_b, _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(v_lo, v_hi)));
            }
            const __m256 d = _mm256_set1_ps(scales[b]);
            acc0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum_a))), acc0);
            acc2 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum_a, 1))), acc2);
            acc1 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum_b))), acc1);
            acc3 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum_b, 1))), acc3);
        }
        const int64_t out = (t - tile_begin) * NQ1_LUT_TILE;
        const __m256 acc[4] = { acc0, acc1, acc2, acc3 };
        for (int q = 0; q < 4; q++) {
            const __m256 s = row_scale ? _mm256_loadu_ps(row_scale + out + 8 * q) : _mm256_set1_ps(1.0f);
            _mm256_storeu_ps(y + out + 8 * q, _mm256_mul_ps(acc[q], s));
        }
    }
}
#endif

#if defined(NQ1_LUT_NEON)
static inline float32x4_t fma_i32(float32x4_t acc, int32x4_t v, float d) {
    return vfmaq_f32(acc, vdupq_n_f32(d), vcvtq_f32_s32(v));
}

static void gemv_neon(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                      const float * row_scale, float * y) {
    const int64_t row_bytes = k / 8, n_blocks = k / NQ1_LUT_BLOCK;
    const float * scales = table_scales(tables);
    const int8_t * entries = table_entries(tables, k);
    const uint8x16_t low_nibble = vdupq_n_u8(0x0F);
    for (int64_t t = tile_begin; t < tile_end; t++) {
        const uint8_t * tile = tiled + t * NQ1_LUT_TILE * row_bytes;
        float32x4_t acc[8];
        for (int q = 0; q < 8; q++) {
            acc[q] = vdupq_n_f32(0.0f);
        }
        for (int64_t b = 0; b < n_blocks; b++) {
            int16x8_t sum[4] = { vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0) };  // rows 8q..8q+7
            for (int jj = 0; jj < NQ1_LUT_BLOCK / 8; jj++) {
                const int64_t j = b * (NQ1_LUT_BLOCK / 8) + jj;
                const int8x16_t t_lo = vld1q_s8(entries + (2 * j) * ENTRIES);
                const int8x16_t t_hi = vld1q_s8(entries + (2 * j + 1) * ENTRIES);
                for (int h = 0; h < 2; h++) {  // rows 16h .. 16h+15
                    const uint8x16_t w = vld1q_u8(tile + tiled_offset(16 * h, j));
                    const int8x16_t v_lo = vqtbl1q_s8(t_lo, vandq_u8(w, low_nibble));
                    const int8x16_t v_hi = vqtbl1q_s8(t_hi, vshrq_n_u8(w, 4));
                    sum[2 * h] = vaddq_s16(sum[2 * h], vaddl_s8(vget_low_s8(v_lo), vget_low_s8(v_hi)));
                    sum[2 * h + 1] = vaddq_s16(sum[2 * h + 1], vaddl_high_s8(v_lo, v_hi));
                }
            }
            for (int q = 0; q < 4; q++) {
                acc[2 * q] = fma_i32(acc[2 * q], vmovl_s16(vget_low_s16(sum[q])), scales[b]);
                acc[2 * q + 1] = fma_i32(acc[2 * q + 1], vmovl_high_s16(sum[q]), scales[b]);
            }
        }
        const int64_t out = (t - tile_begin) * NQ1_LUT_TILE;
        for (int q = 0; q < 8; q++) {
            const float32x4_t s = row_scale ? vld1q_f32(row_scale + out + 4 * q) : vdupq_n_f32(1.0f);
            vst1q_f32(y + out + 4 * q, vmulq_f32(acc[q], s));
        }
    }
}
#endif

// the one place that picks the kernel
void nq1_lut_gemv(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                  const float * row_scale, float * y) {
#if defined(NQ1_LUT_AVX512)
    gemv_avx512(tiled, k, tile_begin, tile_end, tables, row_scale, y);
#elif defined(NQ1_LUT_AVX2)
    gemv_avx2(tiled, k, tile_begin, tile_end, tables, row_scale, y);
#elif defined(NQ1_LUT_NEON)
    gemv_neon(tiled, k, tile_begin, tile_end, tables, row_scale, y);
#else
    nq1_lut_gemv_ref(tiled, k, tile_begin, tile_end, tables, row_scale, y);
#endif
}

const char * nq1_lut_kernel_name(void) {
#if defined(NQ1_LUT_AVX512)
    return "avx512";
#elif defined(NQ1_LUT_AVX2)
    return "avx2";
#elif defined(NQ1_LUT_NEON)
    return "neon";
#else
    return "scalar";
#endif
}
