// ggml-cpu glue of the NQ1 table-lookup kernels (cpp/nq1-lut.c): NQ1 weights placed in the CPU_REPACK buffer are
// tiled at load time, and their mul_mat builds activation tables in the work buffer, then runs the selected GEMV.
// Decode-sized NanoQuant layers ([s_pre,] V, [s_mid,] U, [s_post]: the chain of nq1-lowrank.h) also run fused: one
// step with at most one barrier inside, where the four or five ops end in a barrier each and each product has one
// more; the scale vectors ride along in the table builds and the GEMV's stores. Compiled into ggml-cpu by the
// project's CMakeLists.txt; ggml_patches/0004 hooks the traits into repack.cpp, ggml_patches/0005 the fusion into
// ggml-cpu.c.
#include "nq1-lut-ggml.h"
#include "nq1-lowrank.h"
#include "nq1-lut.h"

#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "repack.h"

#include <algorithm>
#include <atomic>

namespace {

// Batches up to this many columns are fused: each thread then builds the whole activation tables itself, which at
// decode sizes costs less than the barrier a shared build needs.
constexpr int64_t FUSE_MAX_COLS = 8;
constexpr size_t ALIGN = 64;
// Fused layers whose sign bytes (times columns) are at most this run on one thread: on the 2-core development machine
// the barrier that splitting needs costs more than it saves up to SmolLM2's 576x576 layer at 1 bpw (36.9 KB; scratch
// measurements with thresholds 0, 12, 40 KB and unlimited: 40 KB was fastest on every SmolLM2 shape). Every thread
// repeating the V product and sharing only U's rows, with no barrier either, was no faster (bench/kernels.py run back
// to back, 2 threads: 192x576 3.2 us a layer against 3.1 us on one thread, 576x576 4.9 against 4.6).
constexpr size_t SOLO_MAX_BYTES = 40 * 1024;

size_t align_up(size_t n) {
    return (n + ALIGN - 1) / ALIGN * ALIGN;
}

// one thread's scratch in a fused layer: the tables of every column
size_t fused_thread_bytes(int64_t k, int64_t n_cols) {
    return align_up(nq1_lut_tables_size(k) * (size_t) n_cols);
}

// Work buffer of a fused layer: the rank-sized intermediate of all columns, then one scratch per thread. Each NQ1
// product reserves it for its own k and rows, so the V product covers step 1 and the U product step 2.
size_t fused_work_size(int64_t k, int64_t rows, int64_t n_cols, int n_threads) {
    return align_up((size_t) (n_cols * std::max(k, rows)) * sizeof(float)) +
           (size_t) n_threads * fused_thread_bytes(k, n_cols);
}

std::atomic<uint64_t> fused_layer_count{0};

// thread ith's part [begin, end) of `total` work items split evenly over nth threads
void thread_share(int64_t total, int ith, int nth, int64_t & begin, int64_t & end) {
    begin = total * ith / nth;
    end = total * (ith + 1) / nth;
}

class nq1_lut_traits : public ggml::cpu::repack::tensor_traits_base {
    bool work_size(int n_threads, const ggml_tensor * op, size_t & size) override {
        if (op->op != GGML_OP_MUL_MAT) {
            return false;
        }
        const int64_t k = op->src[0]->ne[0], rows = op->src[0]->ne[1], n_cols = ggml_nrows(op->src[1]);
        size = nq1_lut_tables_size(k) * (size_t) n_cols;
        if (n_cols <= FUSE_MAX_COLS) {
            size = std::max(size, fused_work_size(k, rows, n_cols, n_threads));
        }
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
            thread_share(total, params->ith, params->nth, begin, end);
        };

        // 1. tables: (column, block) pairs split evenly over the threads
        int64_t begin, end;
        share(n_cols * n_blocks, begin, end);
        for (int64_t c = begin / n_blocks; c < n_cols && c * n_blocks < end; c++) {
            const int64_t b0 = std::max(begin - c * n_blocks, (int64_t) 0), b1 = std::min(end - c * n_blocks, n_blocks);
            nq1_lut_build((const float *) column(x, c), nullptr, k, b0, b1, tables + c * table_size);
        }
        ggml_barrier(params->threadpool);

        // 2. products: (column, tile) pairs split evenly; a thread's pairs are consecutive tiles of few columns
        share(n_cols * n_tiles, begin, end);
        for (int64_t c = begin / n_tiles; c < n_cols && c * n_tiles < end; c++) {
            const int64_t t0 = std::max(begin - c * n_tiles, (int64_t) 0), t1 = std::min(end - c * n_tiles, n_tiles);
            nq1_lut_gemv((const uint8_t *) w->data, k, t0, t1, tables + c * table_size, nullptr,
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

const nq1_lut_traits lut_traits;

bool is_tiled_nq1(const ggml_tensor * w) {
    return w->type == GGML_TYPE_NQ1 && w->extra == (const void *) &lut_traits;
}

// a scale vector broadcast along the columns of `of`: F32, contiguous, one row of of->ne[0] values
bool is_row_scale(const ggml_tensor * s, const ggml_tensor * of) {
    return s->type == GGML_TYPE_F32 && ggml_is_contiguous(s) && s->ne[0] == of->ne[0] && ggml_nrows(s) == 1;
}

bool is_f32_columns(const ggml_tensor * t) {  // columns of F32 values, 2D
    return t->type == GGML_TYPE_F32 && t->nb[0] == sizeof(float) && t->ne[2] == 1 && t->ne[3] == 1;
}

// a NanoQuant layer (nq1-lowrank.h) that the fused kernels can run: F32 columns in and out, table-lookup weights
bool fits_fused(const nq1_lowrank_chain & c) {
    const nq1_lowrank_layer & l = c.layer;
    const auto scale_fits = [](const ggml_tensor * s, const ggml_tensor * of) { return !s || is_row_scale(s, of); };
    return is_f32_columns(l.x) && l.x->ne[1] <= FUSE_MAX_COLS && scale_fits(l.s_pre, l.x) &&
           is_tiled_nq1(l.v) && l.v->ne[0] == l.x->ne[0] && scale_fits(l.s_mid, c.v_product) &&
           is_tiled_nq1(l.u) && l.u->ne[0] == l.v->ne[1] && scale_fits(l.s_post, c.out) &&
           c.out->type == GGML_TYPE_F32 && ggml_is_contiguous(c.out);
}

// Same arithmetic as the unfused ops (the scale products are single roundings either way), so the fused layer is
// bit-identical to the five ops.
void compute_fused(const ggml_compute_params * params, const nq1_lowrank_chain & c) {
    const ggml_tensor * x = c.layer.x;
    const ggml_tensor * v = c.layer.v;
    const ggml_tensor * u = c.layer.u;
    const auto data_of = [](const ggml_tensor * s) { return s ? (const float *) s->data : nullptr; };
    const float * s_pre = data_of(c.layer.s_pre);
    const float * s_mid = data_of(c.layer.s_mid);
    const float * s_post = data_of(c.layer.s_post);
    const int64_t d_in = v->ne[0], rank = v->ne[1], d_out = u->ne[1], n_cols = x->ne[1];
    // a layer this small costs less on one thread than the barrier that splitting it needs
    const bool solo = (size_t) n_cols * (ggml_nbytes(v) + ggml_nbytes(u)) <= SOLO_MAX_BYTES;
    if (solo && params->ith != 0) {
        return;
    }
    const int ith = solo ? 0 : params->ith, nth = solo ? 1 : params->nth;
    char * const wdata = (char *) params->wdata;
    float * const t = (float *) wdata;  // n_cols x rank
    const size_t t_bytes = align_up((size_t) (n_cols * rank) * sizeof(float));
    char * const scratch_base = wdata + t_bytes;
    GGML_ASSERT(params->wsize >= t_bytes + (size_t) params->nth * fused_thread_bytes(std::max(d_in, rank), n_cols));

    const auto share = [&](int64_t total, int64_t & begin, int64_t & end) {
        thread_share(total, ith, nth, begin, end);
    };
    // every thread builds the tables of all columns of `in` (scaled by `scale` when given) in its own scratch
    const auto build_tables = [&](const char * in, size_t in_stride, const float * scale, int64_t k) -> char * {
        char * tables = scratch_base + (size_t) ith * fused_thread_bytes(k, n_cols);
        for (int64_t col = 0; col < n_cols; col++) {
            nq1_lut_build((const float *) (in + col * in_stride), scale, k, 0, k / NQ1_LUT_BLOCK,
                          tables + col * nq1_lut_tables_size(k));
        }
        return tables;
    };
    // this thread's (column, tile) pairs of W times the tables, each output row times `scale`
    const auto products = [&](const ggml_tensor * w, const char * tables, float * out, int64_t out_rows,
                              const float * scale) {
        const int64_t k = w->ne[0], n_tiles = w->ne[1] / NQ1_LUT_TILE;
        int64_t begin, end;
        share(n_cols * n_tiles, begin, end);
        for (int64_t col = begin / n_tiles; col < n_cols && col * n_tiles < end; col++) {
            const int64_t t0 = std::max(begin - col * n_tiles, (int64_t) 0);
            const int64_t t1 = std::min(end - col * n_tiles, n_tiles);
            nq1_lut_gemv((const uint8_t *) w->data, k, t0, t1, tables + col * nq1_lut_tables_size(k),
                         scale ? scale + t0 * NQ1_LUT_TILE : nullptr, out + col * out_rows + t0 * NQ1_LUT_TILE);
        }
    };

    products(v, build_tables((const char *) x->data, x->nb[1], s_pre, d_in), t, rank, s_mid);
    if (!solo) {
        ggml_barrier(params->threadpool);  // U's tables read every row of t
    }
    products(u, build_tables((const char *) t, rank * sizeof(float), nullptr, rank), (float *) c.out->data, d_out,
             s_post);
    if (ith == 0) {
        fused_layer_count.fetch_add(1, std::memory_order_relaxed);
    }
}

}  // namespace

const ggml::cpu::tensor_traits * ggml_nq1_lut_tensor_traits(const ggml_tensor * cur) {
    const bool fits = cur->ne[0] % NQ1_LUT_BLOCK == 0 && cur->ne[1] % NQ1_LUT_TILE == 0 && cur->ne[2] == 1 &&
                      cur->ne[3] == 1;
    return fits ? &lut_traits : nullptr;
}

extern "C" int ggml_nq1_lut_fuse_lowrank(const ggml_compute_params * params, const ggml_cgraph * cgraph, int node_n) {
    nq1_lowrank_chain chain;
    if (!nq1_lowrank_match(cgraph, node_n, &chain) || !fits_fused(chain)) {
        return 0;
    }
    compute_fused(params, chain);
    return chain.n_nodes - 1;
}

extern "C" uint64_t ggml_nq1_lut_fused_layers(void) {
    return fused_layer_count.load(std::memory_order_relaxed);
}
