// Table-lookup GEMV/GEMM for NQ1 sign matrices (T-MAC style), free of ggml so it can be tested on its own.
//
// Activations: every group of 4 consecutive values becomes a 16-entry table of all sums +-x0 +-x1 +-x2 +-x3, indexed
// by the 4 sign bits of a weight nibble (bit b set = -x_b, as in NQ1). Entry 15-n is minus entry n, so only 8 sums per
// group are computed. Tables are int8 with one float scale per NQ1_LUT_BLOCK activations.
//
// Weights: the canonical NQ1 rows are repacked into tiles of NQ1_LUT_TILE rows; inside a tile, chunk c (bytes
// c*CHUNK .. c*CHUNK+CHUNK-1 of a row) of all its rows is contiguous. For the 16-byte table lookups (pshufb / tbl) a
// chunk is one byte, so one lookup serves 16 rows at once; for AVX-512 (vpermi2b over a block's 8 tables) a chunk is
// one block, 4 bytes. The layout is thus fixed by the kernel the build selects, and only nq1_lut_* read it.
//
// Every path forms the same exact integer sum per row and block (int16 or int32, as the kernel's width allows; the
// value is the same) and accumulates the blocks with fused multiply-adds in the same order, so SIMD results equal the
// scalar reference bit for bit.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NQ1_LUT_TILE  32   // rows per repacked tile
#define NQ1_LUT_BLOCK 32   // activations per table scale (8 groups of 4)

// bytes of the tables of one activation vector of length k (k a multiple of NQ1_LUT_BLOCK)
size_t nq1_lut_tables_size(int64_t k);

// canonical NQ1 rows (n_rows x k/8 bytes, n_rows a multiple of NQ1_LUT_TILE) <-> tiled layout of the same size
void nq1_lut_repack(const uint8_t * canonical, uint8_t * tiled, int64_t n_rows, int64_t k);
void nq1_lut_unpack(const uint8_t * tiled, uint8_t * canonical, int64_t n_rows, int64_t k);

// tables of blocks [block_begin, block_end) of one activation vector x of length k (finite values), or of x times the
// vector `scale` (of length k; NULL: none), each product rounded once as a separate multiply would
void nq1_lut_build(const float * x, const float * scale, int64_t k, int64_t block_begin, int64_t block_end,
                   void * tables);
// the scalar reference of nq1_lut_build: every build writes the same bytes
void nq1_lut_build_ref(const float * x, const float * scale, int64_t k, int64_t block_begin, int64_t block_end,
                       void * tables);

// y[i] = row_scale[i] * sum_j sign(W[tile_begin*TILE + i, j]) * x[j] for the rows of tiles [tile_begin, tile_end),
// from one vector's tables; y and row_scale (NULL: none) have (tile_end - tile_begin) * NQ1_LUT_TILE values.
void nq1_lut_gemv(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                  const float * row_scale, float * y);
// the scalar reference of nq1_lut_gemv
void nq1_lut_gemv_ref(const uint8_t * tiled, int64_t k, int64_t tile_begin, int64_t tile_end, const void * tables,
                      const float * row_scale, float * y);

// which nq1_lut_gemv this build selected: "avx512", "avx2", "neon" or "scalar"
const char * nq1_lut_kernel_name(void);

#ifdef __cplusplus
}
#endif
