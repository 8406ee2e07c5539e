// The fused NanoQuant layer on CUDA for decode batches (1..8 columns):
//
//     y = s_post * (U q(s_mid * (V q(s_pre * x))))      q(): int8 blocks of 32 with a float scale (nq1-cuda.cuh)
//
// in three kernels where the op chain takes seven (MUL, quantize, MMVQ, MUL, quantize, MMVQ, MUL):
//   1. quantize: s_pre folded into the quantization of x, one thread per block of 32 activations;
//   2. V: a CUDA block per 32 rows of V, a warp per row; the 32 results of a block are one quantization block of
//      V x, so s_mid is folded into their quantization there and V x never goes to memory in float;
//   3. U: a warp per row of U, s_post applied in the epilogue.
// Each warp's lanes take every 32nd sign block of a row and expand its signs once for all columns. The arithmetic is
// nq1-cuda.cuh's, which tests/kernels/nq1_cuda_test.cu checks against cpp/nq1-ref.c; the scalar reference of the
// whole layer is nq1_lowrank_ref. Compiled into ggml-cuda by the project's CMakeLists.txt, hooked into ggml-cuda's
// fusion step by ggml_patches/0006.
#include "common.cuh"

#include "nq1-cuda.cuh"
#include "nq1-cuda.h"
#include "nq1-lowrank.h"


static constexpr int WARPS_PER_BLOCK = 8;
static constexpr int QUANTIZE_THREADS = 128;

static __global__ void nq1_fused_quantize(const char * __restrict__ x, const int64_t x_stride,
                                          const float * __restrict__ s_pre, nq1_q8_block * __restrict__ xq,
                                          const int n_blocks, const int n_cols) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t) n_blocks * n_cols) {
        return;
    }
    const int64_t c = i / n_blocks, b = i % n_blocks;
    nq1_quantize_q8((const float *) (x + c * x_stride) + 32 * b, s_pre ? s_pre + 32 * b : nullptr, &xq[i]);
}

template <int n_cols>
static __global__ void nq1_fused_v(const uint32_t * __restrict__ v, const int64_t v_stride, const int n_words,
                            const nq1_q8_block * __restrict__ xq, const float * __restrict__ s_mid,
                            nq1_q8_block * __restrict__ tq, const int n_groups) {
    __shared__ float t[n_cols][32];
    const int group = blockIdx.x, lane = threadIdx.x;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        float acc[n_cols] = {};
        nq1_row_partial<n_cols>(v + (32 * (int64_t) group + i) * v_stride, xq, n_words, lane, 32, acc);
#pragma unroll
        for (int c = 0; c < n_cols; c++) {
            acc[c] = nq1_warp_sum(acc[c]);
        }
        if (lane == 0) {
#pragma unroll
            for (int c = 0; c < n_cols; c++) {
                t[c][i] = acc[c];
            }
        }
    }
    __syncthreads();
    if (threadIdx.y == 0 && lane < n_cols) {
        nq1_quantize_q8(t[lane], s_mid ? s_mid + 32 * group : nullptr, &tq[(int64_t) lane * n_groups + group]);
    }
}

template <int n_cols>
static __global__ void nq1_fused_u(const uint32_t * __restrict__ u, const int64_t u_stride, const int n_words,
                            const nq1_q8_block * __restrict__ tq, const float * __restrict__ s_post,
                            float * __restrict__ y, const int64_t y_stride, const int d_out) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= d_out) {
        return;  // the whole warp: row is the same on all its lanes
    }
    float acc[n_cols] = {};
    nq1_row_partial<n_cols>(u + row * u_stride, tq, n_words, threadIdx.x, 32, acc);
#pragma unroll
    for (int c = 0; c < n_cols; c++) {
        acc[c] = nq1_warp_sum(acc[c]);
    }
    if (threadIdx.x == 0) {
        const float scale = s_post ? s_post[row] : 1.0f;
#pragma unroll
        for (int c = 0; c < n_cols; c++) {
            y[c * y_stride + row] = s_post ? acc[c] * scale : acc[c];
        }
    }
}

struct fused_layer {
    const char * x;
    int64_t x_stride;  // bytes between columns
    const uint32_t * v;
    const uint32_t * u;
    int64_t v_stride, u_stride;  // words between rows
    const float * s_pre;
    const float * s_mid;
    const float * s_post;
    float * y;
    int64_t y_stride;  // floats between columns
    int d_in, rank, d_out, n_cols;
};

template <int n_cols>
static void launch_products(const fused_layer & l, const nq1_q8_block * xq, nq1_q8_block * tq, cudaStream_t stream) {
    const dim3 warps(32, WARPS_PER_BLOCK);
    nq1_fused_v<n_cols><<<l.rank / 32, warps, 0, stream>>>(l.v, l.v_stride, l.d_in / 32, xq, l.s_mid, tq, l.rank / 32);
    nq1_fused_u<n_cols><<<(l.d_out + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK, warps, 0, stream>>>(
        l.u, l.u_stride, l.rank / 32, tq, l.s_post, l.y, l.y_stride, l.d_out);
}

static bool is_f32_vector(const ggml_tensor * s) {
    return s == nullptr || (s->type == GGML_TYPE_F32 && ggml_is_contiguous(s));
}

static bool is_sign_matrix(const ggml_tensor * w) {
    return w->type == GGML_TYPE_NQ1 && ggml_is_contiguous(w) && w->ne[2] == 1 && w->ne[3] == 1 &&
           w->ne[0] % 32 == 0 && w->ne[0] <= INT32_MAX && w->ne[1] <= INT32_MAX;
}

// the chain's tensors as the kernels take them: F32 columns in and out, contiguous sign rows, at most 8 columns
static bool fits(const nq1_lowrank_chain & c) {
    const nq1_lowrank_layer & l = c.layer;
    const ggml_tensor * x = l.x;
    return x->type == GGML_TYPE_F32 && x->nb[0] == sizeof(float) && x->ne[2] == 1 && x->ne[3] == 1 &&
           x->ne[1] >= 1 && x->ne[1] <= NQ1_CUDA_FUSE_MAX_COLS && is_sign_matrix(l.v) && is_sign_matrix(l.u) &&
           l.v->ne[0] == x->ne[0] && l.u->ne[0] == l.v->ne[1] && is_f32_vector(l.s_pre) && is_f32_vector(l.s_mid) &&
           is_f32_vector(l.s_post) && c.out->type == GGML_TYPE_F32 && ggml_is_contiguous(c.out) &&
           c.out->ne[0] == l.u->ne[1] && c.out->ne[1] == x->ne[1];
}


int ggml_cuda_nq1_fuse_lowrank(ggml_backend_cuda_context & ctx, ggml_cgraph * cgraph, int first) {
    nq1_lowrank_chain chain;
    if (!nq1_lowrank_match(cgraph, first, &chain) || !fits(chain)) {
        return 0;
    }
    const nq1_lowrank_layer & l = chain.layer;
    const auto data_of = [](const ggml_tensor * s) { return s ? (const float *) s->data : nullptr; };
    fused_layer f;
    f.x = (const char *) l.x->data;
    f.x_stride = l.x->nb[1];
    f.v = (const uint32_t *) l.v->data;
    f.u = (const uint32_t *) l.u->data;
    f.v_stride = l.v->nb[1] / sizeof(uint32_t);
    f.u_stride = l.u->nb[1] / sizeof(uint32_t);
    f.s_pre = data_of(l.s_pre);
    f.s_mid = data_of(l.s_mid);
    f.s_post = data_of(l.s_post);
    f.y = (float *) chain.out->data;
    f.y_stride = chain.out->nb[1] / sizeof(float);
    f.d_in = (int) l.v->ne[0];
    f.rank = (int) l.v->ne[1];
    f.d_out = (int) l.u->ne[1];
    f.n_cols = (int) l.x->ne[1];

    // x is read only by the first kernel, which ends before the last one writes y: the allocator may let y reuse
    // x's memory
    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<nq1_q8_block> xq(ctx.pool(), (size_t) f.n_cols * (f.d_in / 32));
    ggml_cuda_pool_alloc<nq1_q8_block> tq(ctx.pool(), (size_t) f.n_cols * (f.rank / 32));
    const int n_blocks = f.d_in / 32;
    const int quantize_grid = (f.n_cols * n_blocks + QUANTIZE_THREADS - 1) / QUANTIZE_THREADS;
    nq1_fused_quantize<<<quantize_grid, QUANTIZE_THREADS, 0, stream>>>(f.x, f.x_stride, f.s_pre, xq.get(), n_blocks,
                                                                      f.n_cols);
    switch (f.n_cols) {
        case 1: launch_products<1>(f, xq.get(), tq.get(), stream); break;
        case 2: launch_products<2>(f, xq.get(), tq.get(), stream); break;
        case 3: launch_products<3>(f, xq.get(), tq.get(), stream); break;
        case 4: launch_products<4>(f, xq.get(), tq.get(), stream); break;
        case 5: launch_products<5>(f, xq.get(), tq.get(), stream); break;
        case 6: launch_products<6>(f, xq.get(), tq.get(), stream); break;
        case 7: launch_products<7>(f, xq.get(), tq.get(), stream); break;
        case 8: launch_products<8>(f, xq.get(), tq.get(), stream); break;
        default: GGML_ABORT("NanoQuant layer with %d columns", f.n_cols);  // fits() allows 1..8
    }
    CUDA_CHECK(cudaGetLastError());
    return chain.n_nodes - 1;
}
