// ggml-cpu glue of the NQ1 table-lookup kernels (cpp/nq1-lut.c): NQ1 weights placed in the CPU_REPACK buffer are
// tiled at load time, and their mul_mat builds activation tables in the work buffer, then runs the selected GEMV.
// Compiled into ggml-cpu by the project's CMakeLists.txt; ggml_patches/0004 hooks it into repack.cpp.
#include "nq1-lut.h"

#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "repack.h"

#include <algorithm>

namespace {

class nq1_lut_traits : public ggml::cpu::repack::tensor_traits_base {
    bool work_size(int /* n_threads */, const ggml_tensor * op, size_t & size) override {
        if (op->op != GGML_OP_MUL_MAT) {
            return false;
        }
        size = nq1_lut_tables_size(op->src[0]->ne[0]) * (size_t) ggml_nrows(op->src[1]);
        return true;
    }

    bool compute_forward(ggml_compute_params * params, ggml_tensor * op) override {
        if (op->op != GGML_OP_MUL_MAT) {
            return false;
        }
        const ggml_tensor * w = op->src[0];
        const ggml_tensor * x = op->src[1];
        GGML_ASSERT(x->type == GGML_TYPE_F32 && x->nb[0] == sizeof(float) && op->nb[0] == sizeof(float));
        const int64_t k = w->ne[0], n_tiles = w->ne[1] / NQ1_LUT_TILE, n_blocks = k / NQ1_LUT_BLOCK;
        const int64_t n_cols = ggml_nrows(x);
        const size_t table_size = nq1_lut_tables_size(k);
        GGML_ASSERT(params->wsize >= table_size * (size_t) n_cols);
        char * tables = (char *) params->wdata;

        const auto column = [](const ggml_tensor * t, int64_t c) {  // column c of a [k, ne1, ne2, ne3] tensor
            const int64_t i1 = c % t->ne[1], i2 = c / t->ne[1] % t->ne[2], i3 = c / (t->ne[1] * t->ne[2]);
            return (char *) t->data + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
        };
        const auto share = [&](int64_t total, int64_t & begin, int64_t & end) {
            begin = total * params->ith / params->nth;
            end = total * (params->ith + 1) / params->nth;
        };

        // 1. tables: (column, block) pairs split evenly over the threads
        int64_t begin, end;
        share(n_cols * n_blocks, begin, end);
        for (int64_t c = begin / n_blocks; c < n_cols && c * n_blocks < end; c++) {
            const int64_t b0 = std::max(begin - c * n_blocks, (int64_t) 0), b1 = std::min(end - c * n_blocks, n_blocks);
            nq1_lut_build((const float *) column(x, c), k, b0, b1, tables + c * table_size);
        }
        ggml_barrier(params->threadpool);

        // 2. products: (column, tile) pairs split evenly; a thread's pairs are consecutive tiles of few columns
        share(n_cols * n_tiles, begin, end);
        for (int64_t c = begin / n_tiles; c < n_cols && c * n_tiles < end; c++) {
            const int64_t t0 = std::max(begin - c * n_tiles, (int64_t) 0), t1 = std::min(end - c * n_tiles, n_tiles);
            nq1_lut_gemv((const uint8_t *) w->data, k, t0, t1, tables + c * table_size,
                         (float *) column(op, c) + t0 * NQ1_LUT_TILE);
        }
        return true;
    }

    int repack(ggml_tensor * t, const void * data, size_t data_size) override {
        GGML_ASSERT(data_size == ggml_nbytes(t));
        nq1_lut_repack((const uint8_t *) data, (uint8_t *) t->data, t->ne[1], t->ne[0]);
        return 0;
    }
};

}  // namespace

const ggml::cpu::tensor_traits * ggml_nq1_lut_tensor_traits(const ggml_tensor * cur) {
    static const nq1_lut_traits traits;
    const bool fits = cur->ne[0] % NQ1_LUT_BLOCK == 0 && cur->ne[1] % NQ1_LUT_TILE == 0 && cur->ne[2] == 1 &&
                      cur->ne[3] == 1;
    return fits ? &traits : nullptr;
}
