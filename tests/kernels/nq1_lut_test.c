// Standalone check of cpp/nq1-lut.c, built natively and for aarch64 (run under qemu) by tests/test_lut_kernels.py.
// For random and awkward shapes: repack/unpack round trip, the selected kernel equals the scalar reference bit for
// bit, and both stay within the table quantisation bound of the exact float product. Prints one line per shape.
#include "nq1-lut.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint32_t next_u32(void) {  // xorshift64*: the same stream on every platform
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t) ((rng_state * 0x2545F4914F6CDD1DULL) >> 32);
}

static float next_normal(void) {
    const float u1 = ((float) next_u32() + 1.0f) / 4294967296.0f, u2 = (float) next_u32() / 4294967296.0f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

// ties: small integers and signed zeros, the first group of each block summing to 254 in absolute value, so that
// table entries land exactly halfway between integers (rounded to even by every builder)
static float tie_value(int64_t j) {
    if (j % NQ1_LUT_BLOCK < 4) {
        return (j % 2 ? -1.0f : 1.0f) * (j % 4 < 2 ? 127.0f : 0.0f);
    }
    const int v = (int) (next_u32() % 17) - 8;
    return v == 0 && (next_u32() & 1) ? -0.0f : (float) v;
}

// scaled: the activations times a scale vector and the rows times another, as the fused layer passes s_pre and s_post
static int check(int64_t n_rows, int64_t k, int outliers, int zeros, int ties, int scaled) {
    const int64_t row_bytes = k / 8;
    uint8_t * canonical = malloc(n_rows * row_bytes), * tiled = malloc(n_rows * row_bytes);
    uint8_t * back = malloc(n_rows * row_bytes);
    float * x = malloc(k * sizeof(float)), * y = malloc(n_rows * sizeof(float)), * y_ref = malloc(n_rows * sizeof(float));
    void * tables = malloc(nq1_lut_tables_size(k)), * tables_ref = malloc(nq1_lut_tables_size(k));
    float * scale = malloc(k * sizeof(float)), * row_scale = malloc(n_rows * sizeof(float));
    float * xs = malloc(k * sizeof(float));  // the activations the tables stand for
    for (int64_t i = 0; i < n_rows * row_bytes; i++) {
        canonical[i] = (uint8_t) next_u32();
    }
    for (int64_t j = 0; j < k; j++) {
        // all-zero blocks give a zero scale
        x[j] = zeros && j % 64 < 32 ? 0.0f : ties ? tie_value(j) : next_normal();
        if (outliers && next_u32() % 97 == 0) {
            x[j] *= 60.0f;
        }
        scale[j] = scaled ? next_normal() : 1.0f;
        xs[j] = x[j] * scale[j];
    }
    for (int64_t i = 0; i < n_rows; i++) {
        row_scale[i] = scaled ? next_normal() : 1.0f;
    }
    const float * build_scale = scaled ? scale : NULL, * gemv_scale = scaled ? row_scale : NULL;
    nq1_lut_repack(canonical, tiled, n_rows, k);
    nq1_lut_unpack(tiled, back, n_rows, k);
    int ok = memcmp(canonical, back, n_rows * row_bytes) == 0;
    if (!ok) {
        printf("FAIL repack round trip n_rows=%lld k=%lld\n", (long long) n_rows, (long long) k);
    }
    // tables built in two pieces (as two threads would) by the selected builder equal the reference's, byte for byte
    const size_t table_bytes = nq1_lut_tables_size(k);
    memset(tables, 0x5A, table_bytes);
    memset(tables_ref, 0xA5, table_bytes);  // different fill: padding bytes are not compared
    nq1_lut_build(x, build_scale, k, 0, k / NQ1_LUT_BLOCK / 2, tables);
    nq1_lut_build(x, build_scale, k, k / NQ1_LUT_BLOCK / 2, k / NQ1_LUT_BLOCK, tables);
    nq1_lut_build_ref(x, build_scale, k, 0, k / NQ1_LUT_BLOCK, tables_ref);
    const size_t scale_bytes = (size_t) (k / NQ1_LUT_BLOCK) * sizeof(float), entry_bytes = (size_t) k / 4 * 16;
    if (memcmp(tables, tables_ref, scale_bytes) != 0 ||
        memcmp((char *) tables + table_bytes - entry_bytes, (char *) tables_ref + table_bytes - entry_bytes,
               entry_bytes) != 0) {
        ok = 0;
        printf("FAIL %s tables != scalar reference tables (n_rows=%lld k=%lld)\n", nq1_lut_kernel_name(),
               (long long) n_rows, (long long) k);
    }
    const int64_t n_tiles = n_rows / NQ1_LUT_TILE, split = n_tiles / 2;
    nq1_lut_gemv_ref(tiled, k, 0, n_tiles, tables, gemv_scale, y_ref);
    nq1_lut_gemv(tiled, k, 0, split, tables, gemv_scale, y);  // two calls, as two threads would make them
    nq1_lut_gemv(tiled, k, split, n_tiles, tables, scaled ? row_scale + split * NQ1_LUT_TILE : NULL,
                 y + split * NQ1_LUT_TILE);
    if (memcmp(y, y_ref, n_rows * sizeof(float)) != 0) {
        ok = 0;
        for (int64_t i = 0; i < n_rows; i++) {
            if (y[i] != y_ref[i]) {
                printf("FAIL %s != scalar at row %lld: %.9g vs %.9g (n_rows=%lld k=%lld)\n", nq1_lut_kernel_name(),
                       (long long) i, y[i], y_ref[i], (long long) n_rows, (long long) k);
                break;
            }
        }
    }
    // against the exact product: each table entry is off by at most half a step, one per group of 4
    double worst = 0.0;
    for (int64_t i = 0; i < n_rows; i++) {
        double exact = 0.0, bound = 0.0;
        for (int64_t b = 0; b < k / NQ1_LUT_BLOCK; b++) {
            double amax = 0.0;
            for (int64_t g = 0; g < NQ1_LUT_BLOCK / 4; g++) {
                double s = 0.0;
                for (int e = 0; e < 4; e++) {
                    s += fabs(xs[b * NQ1_LUT_BLOCK + 4 * g + e]);
                }
                amax = s > amax ? s : amax;
            }
            bound += (NQ1_LUT_BLOCK / 4) * 0.5 * amax / 127.0 * 1.0001 + 1e-5 * amax;
        }
        for (int64_t j = 0; j < k; j++) {
            const int neg = (canonical[i * row_bytes + j / 8] >> (j % 8)) & 1;
            exact += neg ? -xs[j] : xs[j];
        }
        exact *= row_scale[i];
        bound *= fabs(row_scale[i]) * 1.0001;
        const double err = fabs(exact - y_ref[i]);
        if (err > bound) {
            ok = 0;
            printf("FAIL row %lld: |%.6g - %.6g| > bound %.3g\n", (long long) i, exact, y_ref[i], bound);
            break;
        }
        worst = err / (bound > 0 ? bound : 1) > worst ? err / (bound > 0 ? bound : 1) : worst;
    }
    printf("%s n_rows=%lld k=%lld outliers=%d zeros=%d ties=%d scaled=%d: %s (worst error %.2f of the bound)\n",
           nq1_lut_kernel_name(), (long long) n_rows, (long long) k, outliers, zeros, ties, scaled,
           ok ? "ok" : "FAILED", worst);
    free(canonical); free(tiled); free(back); free(x); free(y); free(y_ref); free(tables); free(tables_ref);
    free(scale); free(row_scale); free(xs);
    return ok;
}

int main(void) {
    // SmolLM2 (576, 1536, rank 288...), r = 32, the smallest legal sizes, odd multiples of 32, a 7B-sized row
    static const int64_t shapes[][2] = {
        {32, 32}, {32, 576}, {576, 32}, {64, 96}, {96, 160}, {288, 576}, {576, 288}, {1536, 576}, {576, 1536},
        {192, 576}, {160, 4096}, {32, 11008},
    };
    int ok = 1;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        ok &= check(shapes[s][0], shapes[s][1], 0, 0, 0, 0);
        ok &= check(shapes[s][0], shapes[s][1], 1, 1, 0, 0);
        ok &= check(shapes[s][0], shapes[s][1], 0, 0, 1, 0);
        ok &= check(shapes[s][0], shapes[s][1], 1, 0, 0, 1);
    }
    for (int r = 0; r < 20; r++) {  // random multiples of 32
        const int64_t n_rows = 32 * (1 + next_u32() % 24), k = 32 * (1 + next_u32() % 48);
        const int outliers = (int) (next_u32() & 1), zeros = (int) (next_u32() & 1);
        const int ties = (int) (next_u32() % 3 == 0), scaled = (int) (next_u32() & 1);
        ok &= check(n_rows, k, outliers, zeros, ties, scaled);
    }
    printf(ok ? "all ok\n" : "SOME CHECKS FAILED\n");
    return ok ? 0 : 1;
}
