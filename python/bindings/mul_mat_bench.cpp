// nanoquant._core.MulMatBench: matrix products on ggml's CPU backend, set up once and timed on demand, for
// bench/kernels.py. A dense layer is mul_mat(W, x) with W of any ggml type; a NanoQuant layer is the graph llama.cpp
// builds for it (cpp/nq1-lowrank.h; s_pre, V, U, s_post: the converter's default; s_mid when asked; s_pre and
// s_post may be left out). With repack on, weights go to the CPU_REPACK buffer when ggml has a repacked kernel for
// them (Q4_0 x8, NQ1 tables), as llama.cpp places them.
// One graph holds `copies` such layers, each with its own weights, all reading the same input (as q, k and v do):
// inside llama.cpp a product is one of hundreds in a token's graph, so the cost of starting a graph (waking the
// threads) is not the product's; copies > 1 spreads it as a model does.
#include "nq1-lowrank.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

class MulMatBench {
  public:
    MulMatBench(int type_id, int64_t d_out, int64_t d_in, int64_t batch, int n_threads, bool repack, int64_t rank,
                uint64_t seed, int copies, bool mid, bool pre, bool post)
        : d_out_(d_out), d_in_(d_in), batch_(batch), copies_(copies) {
        if (copies < 1) {
            throw std::invalid_argument("copies must be at least 1, got " + std::to_string(copies));
        }
        if (type_id < 0 || type_id >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type_id) <= 0) {
            throw std::invalid_argument("unknown ggml type id " + std::to_string(type_id));
        }
        const ggml_type type = (ggml_type) type_id;
        const bool lowrank = rank > 0;
        if (lowrank && type != GGML_TYPE_NQ1) {
            throw std::invalid_argument("a rank is given only for NQ1 layers");
        }
        if ((mid || !pre || !post) && !lowrank) {
            throw std::invalid_argument("scales are chosen only for NQ1 layers (with a rank)");
        }
        for (int64_t width : lowrank ? std::vector<int64_t>{d_in, rank} : std::vector<int64_t>{d_in}) {
            if (width % ggml_blck_size(type) != 0) {
                throw std::invalid_argument(std::string(ggml_type_name(type)) + ": row length " +
                                            std::to_string(width) + " is not a multiple of its block size " +
                                            std::to_string(ggml_blck_size(type)));
            }
        }
        backend_ = ggml_backend_cpu_init();
        ggml_backend_cpu_set_n_threads(backend_, n_threads);
        ggml_backend_dev_t dev = ggml_backend_get_device(backend_);

        // weights
        ggml_init_params wp = { (size_t) (3 * copies + 2) * ggml_tensor_overhead(), nullptr, true };
        ctx_w_ = ggml_init(wp);
        ctx_s_ = ggml_init(wp);
        std::vector<ggml_tensor *> matrices, vectors;
        layers_.resize(copies);
        for (Layer & l : layers_) {
            if (lowrank) {
                l.v = ggml_new_tensor_2d(ctx_w_, type, d_in, rank);
                l.u = ggml_new_tensor_2d(ctx_w_, type, rank, d_out);
                // scales in a plain buffer of their own: the repack buffer takes only matrices it has a kernel for
                matrices.insert(matrices.end(), { l.v, l.u });
                for (auto [wanted, scale, width] : { std::tuple(pre, &l.s_pre, d_in), std::tuple(mid, &l.s_mid, rank),
                                                     std::tuple(post, &l.s_post, d_out) }) {
                    if (wanted) {
                        *scale = ggml_new_tensor_1d(ctx_s_, GGML_TYPE_F32, width);
                        vectors.push_back(*scale);
                    }
                }
            } else {
                l.w = ggml_new_tensor_2d(ctx_w_, type, d_in, d_out);
                matrices.push_back(l.w);
            }
        }
        ggml_backend_buffer_type_t weight_buft = ggml_backend_get_default_buffer_type(backend_);
        if (repack) {
            auto reg = ggml_backend_dev_backend_reg(dev);
            auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
                reg, "ggml_backend_dev_get_extra_bufts");
            for (auto * b = get_extra ? get_extra(dev) : nullptr; b && *b; b++) {
                if (std::string(ggml_backend_buft_name(*b)) == "CPU_REPACK") {
                    weight_buft = *b;
                }
            }
        }
        if (weight_buft != ggml_backend_get_default_buffer_type(backend_) &&
            !repack_supported(dev, weight_buft, matrices)) {
            weight_buft = ggml_backend_get_default_buffer_type(backend_);  // no repacked kernel: as llama.cpp does
        }
        buf_w_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w_, weight_buft);
        if (lowrank) {
            buf_s_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_s_, ggml_backend_get_default_buffer_type(backend_));
        }
        repacked_ = weight_buft != ggml_backend_get_default_buffer_type(backend_);
        std::mt19937_64 rng(seed);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
        for (ggml_tensor * m : matrices) {
            const int64_t n_per_row = m->ne[0], rows = m->ne[1];
            std::vector<float> values(n_per_row * rows);
            for (float & f : values) {
                f = normal(rng);
            }
            std::vector<float> imatrix(n_per_row, 1.0f);  // the IQ types insist on one; speed does not depend on it
            std::vector<uint8_t> data(ggml_nbytes(m));
            ggml_quantize_init(m->type);
            if (ggml_is_quantized(m->type)) {
                ggml_quantize_chunk(m->type, values.data(), data.data(), 0, rows, n_per_row, imatrix.data());
            } else if (m->type == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(values.data(), (ggml_fp16_t *) data.data(), (int64_t) values.size());
            } else if (m->type == GGML_TYPE_F32) {
                std::memcpy(data.data(), values.data(), data.size());
            } else {
                throw std::invalid_argument(std::string("no filler for type ") + ggml_type_name(m->type));
            }
            ggml_backend_tensor_set(m, data.data(), 0, data.size());
        }
        for (ggml_tensor * s : vectors) {
            std::vector<float> values(s->ne[0]);
            for (float & f : values) {
                f = uniform(rng);
            }
            ggml_backend_tensor_set(s, values.data(), 0, ggml_nbytes(s));
        }

        // graph
        ggml_init_params gp = { (size_t) (8 * copies + 8) * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr,
                                true };
        ctx_g_ = ggml_init(gp);
        x_ = ggml_new_tensor_2d(ctx_g_, GGML_TYPE_F32, d_in, batch);
        ggml_set_input(x_);
        graph_ = ggml_new_graph(ctx_g_);
        for (Layer & l : layers_) {
            if (lowrank) {
                const nq1_lowrank_layer layer = { x_, l.v, l.u, l.s_pre, l.s_mid, l.s_post };
                l.y = nq1_lowrank_build(ctx_g_, &layer);
            } else {
                l.y = ggml_mul_mat(ctx_g_, l.w, x_);
            }
            ggml_set_output(l.y);
            ggml_build_forward_expand(graph_, l.y);
        }
        alloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
        if (!ggml_gallocr_alloc_graph(alloc_, graph_)) {
            throw std::runtime_error("could not allocate the graph");
        }
        std::vector<float> x(d_in * batch);
        for (float & f : x) {
            f = normal(rng);
        }
        set_input(x.data());
    }

    ~MulMatBench() {
        ggml_gallocr_free(alloc_);
        ggml_free(ctx_g_);
        ggml_backend_buffer_free(buf_w_);
        ggml_backend_buffer_free(buf_s_);
        ggml_free(ctx_w_);
        ggml_free(ctx_s_);
        ggml_backend_free(backend_);
    }

    MulMatBench(const MulMatBench &) = delete;
    MulMatBench & operator=(const MulMatBench &) = delete;

    void set_input(const float * x) { ggml_backend_tensor_set(x_, x, 0, ggml_nbytes(x_)); }

    // seconds per product, averaged over `iterations` back-to-back runs of the graph and its copies
    double time(int iterations) {
        py::gil_scoped_release release;
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iterations; i++) {
            if (ggml_backend_graph_compute(backend_, graph_) != GGML_STATUS_SUCCESS) {
                throw std::runtime_error("graph compute failed");
            }
        }
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
               ((double) iterations * copies_);
    }

    // the product of the first copy for x [batch, d_in]
    py::array_t<float> run(const py::array_t<float, py::array::c_style | py::array::forcecast> & x) {
        if (x.ndim() != 2 || x.shape(0) != batch_ || x.shape(1) != d_in_) {
            throw std::invalid_argument("x: expected shape (" + std::to_string(batch_) + ", " + std::to_string(d_in_) +
                                        ")");
        }
        set_input(x.data());
        time(1);
        py::array_t<float> y({(py::ssize_t) batch_, (py::ssize_t) d_out_});
        ggml_backend_tensor_get(layers_[0].y, y.mutable_data(), 0, ggml_nbytes(layers_[0].y));
        return y;
    }

    bool repacked() const { return repacked_; }

  private:
    // llama.cpp's test: the product with the weight in an empty buffer of that type is supported
    bool repack_supported(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft,
                          const std::vector<ggml_tensor *> & matrices) {
        ggml_init_params p = { (3 * matrices.size() + 1) * ggml_tensor_overhead(), nullptr, true };
        ggml_context * ctx = ggml_init(p);
        ggml_backend_buffer_t probe_buffer = ggml_backend_buft_alloc_buffer(buft, 0);
        bool ok = true;
        for (ggml_tensor * m : matrices) {
            ggml_tensor * w = ggml_dup_tensor(ctx, m);
            w->buffer = probe_buffer;
            ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, m->ne[0], batch_);
            ok = ok && ggml_backend_dev_supports_op(dev, ggml_mul_mat(ctx, w, x));
        }
        ggml_backend_buffer_free(probe_buffer);
        ggml_free(ctx);
        return ok;
    }

    struct Layer {
        ggml_tensor * w = nullptr, * v = nullptr, * u = nullptr, * s_pre = nullptr, * s_mid = nullptr, * s_post = nullptr,
                    * y = nullptr;
    };

    int64_t d_out_, d_in_, batch_;
    int copies_;
    std::vector<Layer> layers_;
    bool repacked_ = false;
    ggml_backend_t backend_ = nullptr;
    ggml_context * ctx_w_ = nullptr, * ctx_s_ = nullptr, * ctx_g_ = nullptr;
    ggml_backend_buffer_t buf_w_ = nullptr, buf_s_ = nullptr;
    ggml_gallocr_t alloc_ = nullptr;
    ggml_cgraph * graph_ = nullptr;
    ggml_tensor * x_ = nullptr;
};

}  // namespace

void register_mul_mat_bench(py::module_ & m) {
    py::class_<MulMatBench>(m, "MulMatBench",
                            "[batch, d_in] -> [batch, d_out] products (`copies` layers in one graph) on ggml's CPU "
                            "backend, for timing")
        .def(py::init<int, int64_t, int64_t, int64_t, int, bool, int64_t, uint64_t, int, bool, bool, bool>(),
             py::arg("type_id"),
             py::arg("d_out"), py::arg("d_in"), py::arg("batch") = 1, py::arg("n_threads") = 1,
             py::arg("repack") = true, py::arg("rank") = 0, py::arg("seed") = 0, py::arg("copies") = 1,
             py::arg("mid") = false, py::arg("pre") = true, py::arg("post") = true)
        .def("time", &MulMatBench::time, py::arg("iterations"), "seconds per product, averaged over the iterations")
        .def("run", &MulMatBench::run, py::arg("x"), "the product for x [batch, d_in]")
        .def_property_readonly("repacked", &MulMatBench::repacked, "whether the weights sit in CPU_REPACK");
}
