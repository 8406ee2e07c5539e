// Host test of the NQ1 CUDA device functions (cpp/nq1-cuda.cuh), compiled by nvcc and run without a GPU: each
// __host__ __device__ function against the scalar references of cpp/nq1-ref.c, bit for bit, and the fused layer's
// schedule (the lanes and warp sums of cpp/nq1-cuda.cu, replayed on the host) against nq1_lowrank_ref.
// Prints one line per check and "all ok" last; exits 1 at the first mismatch.
#include "nq1-cuda.cuh"
#include "nq1-ref.h"

#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

extern "C" void dequantize_row_nq1(const block_nq1 * x, float * y, int64_t k);  // cpp/nq1-ref.c

namespace {

std::mt19937 rng(22);

[[noreturn]] void fail(const char * what, long long at) {
    std::printf("FAIL %s at %lld\n", what, at);
    std::exit(1);
}

bool same_bits(float a, float b) {
    return std::memcmp(&a, &b, sizeof(float)) == 0;
}

// sign words: random, and the awkward ones (none, all, alternating, single bits at the ends and the middle)
std::vector<uint32_t> sign_words(int n_random) {
    std::vector<uint32_t> words = { 0u, 0xFFFFFFFFu, 0x55555555u, 0xAAAAAAAAu, 1u, 0x80000000u, 0x00010000u, 0x8000u,
                                    0x0000FFFFu, 0xFFFF0000u, 0x0F0F0F0Fu };
    for (int i = 0; i < n_random; i++) {
        words.push_back(rng());
    }
    return words;
}

void pack_word(uint32_t w, uint8_t out[4]) {
    for (int b = 0; b < 4; b++) {
        out[b] = (uint8_t) (w >> (8 * b));
    }
}

void check_expand_and_dequantize() {
    const std::vector<uint32_t> words = sign_words(2000);
    // a row of 18 blocks (d_in 576) holding the words in turn
    const int n_blocks = 18;
    for (size_t w0 = 0; w0 < words.size(); w0 += n_blocks) {
        std::vector<uint8_t> row(4 * n_blocks);
        for (int b = 0; b < n_blocks; b++) {
            pack_word(words[(w0 + b) % words.size()], &row[4 * b]);
        }
        std::vector<float> ref(32 * n_blocks);
        dequantize_row_nq1((const block_nq1 *) row.data(), ref.data(), 32 * n_blocks);
        for (int b = 0; b < n_blocks; b++) {
            for (int iqs = 0; iqs < 32; iqs += 2) {
                float2 v;
                dequantize_nq1(row.data(), b, iqs, v);
                if (!same_bits(v.x, ref[32 * b + iqs]) || !same_bits(v.y, ref[32 * b + iqs + 1])) {
                    fail("dequantize_nq1", 32 * b + iqs);
                }
            }
            uint32_t expanded[8];
            nq1_expand_signs(words[(w0 + b) % words.size()], expanded);
            for (int k = 0; k < 32; k++) {
                const int8_t byte = (int8_t) (expanded[k / 4] >> (8 * (k % 4)));
                if (byte != (int8_t) ref[32 * b + k]) {
                    fail("nq1_expand_signs", k);
                }
            }
        }
    }
    std::printf("dequantize_nq1, nq1_expand_signs: %zu sign words equal dequantize_row_nq1\n", words.size());
}

void random_int8(int8_t * q, int n, int case_no) {
    std::uniform_int_distribution<int> any(-128, 127);
    for (int k = 0; k < n; k++) {
        switch (case_no % 4) {
            case 0: q[k] = (int8_t) any(rng); break;
            case 1: q[k] = 127; break;                              // the largest products
            case 2: q[k] = -128; break;                             // never a quantizer's output, still exact
            default: q[k] = (int8_t) (k % 2 ? 127 : -127); break;  // alternating extremes
        }
    }
}

void check_dots() {
    const std::vector<uint32_t> words = sign_words(4000);
    for (size_t i = 0; i < words.size(); i++) {
        int8_t q[32];
        random_int8(q, 32, (int) i);
        int32_t q_words[8];
        std::memcpy(q_words, q, sizeof(q));
        uint8_t signs[4];
        pack_word(words[i], signs);
        const int32_t ref = nq1_dot_i8_ref(signs, q);
        if (nq1_dot_q8(words[i], q_words) != ref) {
            fail("nq1_dot_q8", (long long) i);
        }
        // ggml's MMVQ interface: the same sum times the Q8_1 block's scale
        block_q8_1 b8;
        const float d = std::ldexp((float) (1 + (int) (rng() % 1000)), -(int) (rng() % 20));
        b8.ds = __floats2half2_rn(d, 1000.0f);  // ds.y (the block's sum) must not matter
        std::memcpy(b8.qs, q, sizeof(q));
        const int kbx = 0, iqs = 0;
        const float got = vec_dot_nq1_q8_1(signs, &b8, kbx, iqs);
        if (!same_bits(got, __low2float(b8.ds) * (float) ref)) {
            fail("vec_dot_nq1_q8_1", (long long) i);
        }
    }
    std::printf("nq1_dot_q8, vec_dot_nq1_q8_1: %zu blocks equal nq1_dot_i8_ref\n", words.size());
}

// activations with the awkward cases: zeros, an outlier, ties at .5 after scaling, negative scales, tiny values
std::vector<float> activations(int n, int case_no) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n);
    for (int k = 0; k < n; k++) {
        x[k] = normal(rng);
    }
    switch (case_no % 5) {
        case 1: std::fill(x.begin(), x.end(), 0.0f); break;
        case 2: x[n / 2] = 3.0e4f; break;
        case 3: for (int k = 0; k < n; k++) x[k] = (float) (k % 255 - 127) + 0.5f; break;  // .5 ties
        case 4: for (int k = 0; k < n; k++) x[k] *= 1.0e-30f; break;  // small, still normal after the scaling
        default: break;
    }
    return x;
}

std::vector<float> scales(int n, bool negative) {
    std::uniform_real_distribution<float> uniform(0.25f, 4.0f);
    std::vector<float> s(n);
    for (int k = 0; k < n; k++) {
        s[k] = uniform(rng) * (negative && k % 3 == 0 ? -1.0f : 1.0f);
    }
    return s;
}

void check_quantize() {
    int n_checked = 0;
    for (int case_no = 0; case_no < 500; case_no++) {
        const int n = 32 * (1 + case_no % 7);
        const std::vector<float> x = activations(n, case_no);
        const std::vector<float> s = scales(n, case_no % 2);
        const bool with_scale = case_no % 3 != 0;
        std::vector<float> d(n / 32);
        std::vector<int8_t> q(n);
        nq1_quantize_i8_ref(x.data(), with_scale ? s.data() : nullptr, n, d.data(), q.data());
        for (int b = 0; b < n / 32; b++) {
            nq1_q8_block blk;
            nq1_quantize_q8(&x[32 * b], with_scale ? &s[32 * b] : nullptr, &blk);
            if (!same_bits(blk.d, d[b]) || std::memcmp(blk.qs, &q[32 * b], 32) != 0) {
                fail("nq1_quantize_q8", case_no);
            }
            n_checked++;
        }
    }
    std::printf("nq1_quantize_q8: %d blocks equal nq1_quantize_i8_ref (d and quants)\n", n_checked);
}

// The fused layer as cpp/nq1-cuda.cu schedules it, on the host: same device functions, 32 lanes a warp, the
// device's butterfly for every warp sum.
template <int n_cols>
void warp_row(const uint32_t * row, const nq1_q8_block * xq, int n_blocks, float sums[n_cols]) {
    float lanes[n_cols][32];
    for (int lane = 0; lane < 32; lane++) {
        float acc[n_cols] = {};
        nq1_row_partial<n_cols>(row, xq, n_blocks, lane, 32, acc);
        for (int j = 0; j < n_cols; j++) {
            lanes[j][lane] = acc[j];
        }
    }
    for (int j = 0; j < n_cols; j++) {
        nq1_warp_sum_host(lanes[j]);
        sums[j] = lanes[j][0];
    }
}

template <int n_cols>
void fused_layer_on_host(const float * x, int d_in, int rank, int d_out, const uint32_t * v, const uint32_t * u,
                         const float * s_pre, const float * s_mid, const float * s_post, float * y) {
    const int nb_in = d_in / 32, n_groups = rank / 32;
    std::vector<nq1_q8_block> xq(n_cols * nb_in), tq(n_cols * n_groups);
    for (int i = 0; i < n_cols * nb_in; i++) {  // kernel 1
        const int c = i / nb_in, b = i % nb_in;
        nq1_quantize_q8(x + (size_t) c * d_in + 32 * b, s_pre ? s_pre + 32 * b : nullptr, &xq[i]);
    }
    for (int g = 0; g < n_groups; g++) {  // kernel 2
        float t[n_cols][32];
        for (int i = 0; i < 32; i++) {
            float sums[n_cols];
            warp_row<n_cols>(v + (size_t) (32 * g + i) * nb_in, xq.data(), nb_in, sums);
            for (int c = 0; c < n_cols; c++) {
                t[c][i] = sums[c];
            }
        }
        for (int c = 0; c < n_cols; c++) {
            nq1_quantize_q8(t[c], s_mid ? s_mid + 32 * g : nullptr, &tq[c * n_groups + g]);
        }
    }
    for (int r = 0; r < d_out; r++) {  // kernel 3
        float sums[n_cols];
        warp_row<n_cols>(u + (size_t) r * n_groups, tq.data(), n_groups, sums);
        for (int c = 0; c < n_cols; c++) {
            y[(size_t) c * d_out + r] = s_post ? sums[c] * s_post[r] : sums[c];
        }
    }
}

void fused_layer_dispatch(int n_cols, const float * x, int d_in, int rank, int d_out, const uint32_t * v,
                          const uint32_t * u, const float * s_pre, const float * s_mid, const float * s_post,
                          float * y) {
    switch (n_cols) {
        case 1: fused_layer_on_host<1>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 2: fused_layer_on_host<2>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 3: fused_layer_on_host<3>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 4: fused_layer_on_host<4>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 5: fused_layer_on_host<5>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 6: fused_layer_on_host<6>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 7: fused_layer_on_host<7>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        case 8: fused_layer_on_host<8>(x, d_in, rank, d_out, v, u, s_pre, s_mid, s_post, y); break;
        default: fail("n_cols", n_cols);
    }
}

struct layer_case {
    int d_in, rank, d_out, n_cols;
    bool pre, mid, post;
};

void check_fused_layer() {
    // SmolLM2's 576, rank 32, odd and tiny output counts, each scale missing in turn, 1..8 columns
    const layer_case cases[] = {
        { 576, 32, 576, 1, true, false, true },   { 576, 160, 1536, 3, true, true, true },
        { 1536, 416, 576, 8, true, false, true },  { 96, 64, 33, 5, true, true, true },
        { 32, 32, 1, 2, false, false, false },     { 576, 96, 192, 4, false, true, true },
        { 192, 64, 97, 7, true, true, false },     { 64, 32, 32, 6, false, false, true },
        { 1024, 256, 1000, 2, true, true, true },
    };
    for (const layer_case & lc : cases) {
        std::vector<float> x;
        for (int c = 0; c < lc.n_cols; c++) {
            const std::vector<float> col = activations(lc.d_in, c == 1 ? 2 : 0);  // column 1 has an outlier
            x.insert(x.end(), col.begin(), col.end());
        }
        std::vector<uint32_t> v(lc.rank * (lc.d_in / 32)), u(lc.d_out * (lc.rank / 32));
        for (uint32_t & w : v) w = rng();
        for (uint32_t & w : u) w = rng();
        u[0] = 0xFFFFFFFFu;  // a row starting all -1
        const std::vector<float> s_pre = scales(lc.d_in, true), s_mid = scales(lc.rank, false);
        std::vector<float> s_post = scales(lc.d_out, true);
        for (float & s : s_post) s *= 1e-2f;
        const float * pre = lc.pre ? s_pre.data() : nullptr;
        const float * mid = lc.mid ? s_mid.data() : nullptr;
        const float * post = lc.post ? s_post.data() : nullptr;

        std::vector<float> y(lc.n_cols * lc.d_out), ref(lc.n_cols * lc.d_out);
        fused_layer_dispatch(lc.n_cols, x.data(), lc.d_in, lc.rank, lc.d_out, v.data(), u.data(), pre, mid, post,
                             y.data());
        std::vector<uint8_t> v_bytes(4 * v.size()), u_bytes(4 * u.size());
        for (size_t i = 0; i < v.size(); i++) pack_word(v[i], &v_bytes[4 * i]);
        for (size_t i = 0; i < u.size(); i++) pack_word(u[i], &u_bytes[4 * i]);
        nq1_lowrank_ref(x.data(), lc.n_cols, lc.d_in, lc.rank, lc.d_out, v_bytes.data(), u_bytes.data(), pre, mid,
                        post, ref.data());
        // the sums of V x differ from the reference's in the last bit (float in lane order vs double), which can move
        // a quantized value of V x by one step: a relative error of ~1e-3 at rank 32, per step moved
        double err = 0.0, norm = 0.0;
        for (size_t i = 0; i < y.size(); i++) {
            err += ((double) y[i] - ref[i]) * ((double) y[i] - ref[i]);
            norm += (double) ref[i] * ref[i];
        }
        const double rel = std::sqrt(err / norm);
        std::printf("fused layer d_in %d rank %d d_out %d cols %d scales %s%s%s: relative error %.2e\n", lc.d_in,
                    lc.rank, lc.d_out, lc.n_cols, lc.pre ? "pre " : "", lc.mid ? "mid " : "", lc.post ? "post" : "",
                    rel);
        if (!(norm > 0.0) || !(rel < 1e-3)) {
            fail("fused layer against nq1_lowrank_ref", lc.d_out);
        }
    }
}

}  // namespace

int main() {
    check_expand_and_dequantize();
    check_dots();
    check_quantize();
    check_fused_layer();
    std::printf("all ok\n");
    return 0;
}
