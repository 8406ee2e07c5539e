// nanoquant._core: NQ1 packing and the NanoQuant low-rank product, run by the patched ggml itself.
#include "nq1.h"
#include "nq1-lowrank.h"
#include "nq1-lut-ggml.h"

#include "ggml.h"
#include "ggml-cpu.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

namespace py = pybind11;

extern "C" {
// from ggml-cpu (cpp/nq1-cpu.c): the selected kernel and the scalar reference
void ggml_vec_dot_nq1_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_nq1_q8_0_generic(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by,
                                   int nrc);
}

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using u8_array  = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

static void require(bool ok, const std::string & message) {
    if (!ok) {
        throw std::invalid_argument(message);
    }
}

static void require_2d(const py::array & a, const char * name) {
    require(a.ndim() == 2, std::string(name) + ": expected a 2-D array, got " + std::to_string(a.ndim()) + " dims");
}

static ggml_type checked_type(int type_id) {
    require(type_id >= 0 && type_id < GGML_TYPE_COUNT && ggml_blck_size((ggml_type) type_id) > 0,
            "unknown ggml type id " + std::to_string(type_id));
    return (ggml_type) type_id;
}

// rows of float -> rows of `type` blocks, with ggml's own quantizer; `imatrix` (one importance per column, llama.cpp's
// imatrix: the mean square of the layer's inputs) weights each column's error, and the I-quants that need it get it
static u8_array quantize_rows(const f32_array & x, int type_id, std::optional<f32_array> imatrix) {
    require_2d(x, "x");
    const ggml_type type = checked_type(type_id);
    const int64_t rows = x.shape(0), cols = x.shape(1);
    require(cols % ggml_blck_size(type) == 0, std::string("x: row length ") + std::to_string(cols) +
            " is not a multiple of the " + ggml_type_name(type) + " block size " + std::to_string(ggml_blck_size(type)));
    const float * weights = nullptr;
    if (imatrix) {
        require(imatrix->ndim() == 1 && imatrix->shape(0) == cols,
                "imatrix: expected one value per column (" + std::to_string(cols) + "), got shape " +
                (imatrix->ndim() == 1 ? std::to_string(imatrix->shape(0)) : std::to_string(imatrix->ndim()) + " dims"));
        weights = imatrix->data();
    }
    require(weights != nullptr || !ggml_quantize_requires_imatrix(type),
            std::string(ggml_type_name(type)) + " needs an importance matrix; give one or choose another type");
    const size_t row_size = ggml_row_size(type, cols);
    u8_array out({(py::ssize_t) rows, (py::ssize_t) row_size});
    ggml_quantize_init(type);
    ggml_quantize_chunk(type, x.data(), out.mutable_data(), 0, rows, cols, weights);
    return out;
}

// rows of `type` blocks -> rows of float, with ggml's own dequantizer (the C++ unpacker)
static f32_array dequantize_rows(const u8_array & data, int type_id, int64_t cols) {
    require_2d(data, "data");
    const ggml_type type = checked_type(type_id);
    require(cols % ggml_blck_size(type) == 0, "cols must be a multiple of the block size");
    const size_t row_size = ggml_row_size(type, cols);
    require((size_t) data.shape(1) == row_size, "data: expected " + std::to_string(row_size) + " bytes per row for " +
            std::to_string(cols) + " " + ggml_type_name(type) + " values, got " + std::to_string(data.shape(1)));
    const int64_t rows = data.shape(0);
    f32_array out({(py::ssize_t) rows, (py::ssize_t) cols});
    const auto * traits = ggml_get_type_traits(type);
    for (int64_t i = 0; i < rows; i++) {
        traits->to_float(data.data() + i * row_size, out.mutable_data() + i * cols, cols);
    }
    return out;
}

// dot products of NQ1 rows with Q8_0 rows, by the selected SIMD kernel or the scalar reference
static f32_array vec_dot_nq1_q8_0(const u8_array & signs, const u8_array & activations, int64_t n, bool reference) {
    require_2d(signs, "signs");
    require_2d(activations, "activations");
    require(n % NQ1_BLOCK_SIZE == 0, "n must be a multiple of 32");
    require((size_t) signs.shape(1) == ggml_row_size(GGML_TYPE_NQ1, n), "signs: wrong row size for n");
    require((size_t) activations.shape(1) == ggml_row_size(GGML_TYPE_Q8_0, n), "activations: wrong row size for n");
    const auto kernel = reference ? ggml_vec_dot_nq1_q8_0_generic : ggml_vec_dot_nq1_q8_0;
    f32_array out({signs.shape(0), activations.shape(0)});
    for (py::ssize_t i = 0; i < signs.shape(0); i++) {
        for (py::ssize_t j = 0; j < activations.shape(0); j++) {
            kernel((int) n, out.mutable_data(i, j), 0, signs.data(i, 0), 0, activations.data(j, 0), 0, 1);
        }
    }
    return out;
}

struct ggml_context_deleter {
    void operator()(ggml_context * ctx) const { ggml_free(ctx); }
};

static ggml_tensor * new_tensor_from(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, const void * src) {
    ggml_tensor * t = ne1 > 0 ? ggml_new_tensor_2d(ctx, type, ne0, ne1) : ggml_new_tensor_1d(ctx, type, ne0);
    std::memcpy(t->data, src, ggml_nbytes(t));
    return t;
}

// y = s_post * (U (s_mid * (V (s_pre * x)))) through ggml's CPU backend: the graph llama.cpp builds for an NQ layer
static f32_array lowrank_binary_matmul(const f32_array & x, const u8_array & v_signs, const u8_array & u_signs,
                                       const f32_array & s_pre, const std::optional<f32_array> & s_mid,
                                       const f32_array & s_post, int n_threads) {
    require_2d(x, "x");
    require_2d(v_signs, "v_signs");
    require_2d(u_signs, "u_signs");
    const int64_t tokens = x.shape(0), d_in = x.shape(1);
    const int64_t rank = v_signs.shape(0), d_out = u_signs.shape(0);
    require(d_in % 32 == 0 && rank % 32 == 0, "d_in and the rank must be multiples of 32");
    require((size_t) v_signs.shape(1) == ggml_row_size(GGML_TYPE_NQ1, d_in), "v_signs: expected d_in/8 bytes per row");
    require((size_t) u_signs.shape(1) == ggml_row_size(GGML_TYPE_NQ1, rank), "u_signs: expected rank/8 bytes per row");
    require(s_pre.size() == d_in, "s_pre: expected d_in values");
    require(s_post.size() == d_out, "s_post: expected d_out values");
    require(!s_mid || s_mid->size() == rank, "s_mid: expected rank values");

    f32_array y({(py::ssize_t) tokens, (py::ssize_t) d_out});
    const size_t mem = 1024 * 1024 +
                       4 * sizeof(float) * (size_t) (tokens * (d_in + rank + d_out) + d_in + rank + d_out) +
                       v_signs.nbytes() + u_signs.nbytes() + 2 * ggml_graph_overhead();
    {
        py::gil_scoped_release release;
        ggml_init_params params = { mem, nullptr, false };
        std::unique_ptr<ggml_context, ggml_context_deleter> ctx(ggml_init(params));
        if (!ctx) {
            throw std::runtime_error("ggml_init failed");
        }
        ggml_context * c = ctx.get();
        ggml_tensor * tx = new_tensor_from(c, GGML_TYPE_F32, d_in, tokens, x.data());
        ggml_tensor * tv = new_tensor_from(c, GGML_TYPE_NQ1, d_in, rank, v_signs.data());
        ggml_tensor * tu = new_tensor_from(c, GGML_TYPE_NQ1, rank, d_out, u_signs.data());
        const nq1_lowrank_layer layer = {
            tx, tv, tu, new_tensor_from(c, GGML_TYPE_F32, d_in, 0, s_pre.data()),
            s_mid ? new_tensor_from(c, GGML_TYPE_F32, rank, 0, s_mid->data()) : nullptr,
            new_tensor_from(c, GGML_TYPE_F32, d_out, 0, s_post.data()) };
        ggml_tensor * t = nq1_lowrank_build(c, &layer);
        ggml_cgraph * graph = ggml_new_graph(c);
        ggml_build_forward_expand(graph, t);
        if (ggml_graph_compute_with_ctx(c, graph, n_threads) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error("ggml graph compute failed");
        }
        std::memcpy(y.mutable_data(), t->data, ggml_nbytes(t));
    }
    return y;
}


void register_mul_mat_bench(py::module_ & m);  // mul_mat_bench.cpp
void register_engine(py::module_ & m);         // model.cpp

PYBIND11_MODULE(_core, m) {
    m.doc() = "NQ1 packing and low-rank binary products through the patched ggml";
    ggml_cpu_init();  // fills the fp16 conversion tables the kernels read
    m.attr("NQ1_TYPE_ID") = NQ1_GGML_TYPE_ID;
    m.attr("NQ1_LLAMA_FTYPE_ID") = NQ1_LLAMA_FTYPE_ID;
    m.attr("NQ1_BLOCK_SIZE") = NQ1_BLOCK_SIZE;
    m.attr("NQ1_BLOCK_BYTES") = NQ1_BLOCK_BYTES;
    m.attr("Q8_0_TYPE_ID") = (int) GGML_TYPE_Q8_0;
    m.def("type_name", [](int type_id) { return std::string(ggml_type_name(checked_type(type_id))); },
          "ggml's name for a type id");
    m.def("quantize_rows", &quantize_rows, py::arg("x"), py::arg("type_id"), py::arg("imatrix") = py::none(),
          "float32 rows -> packed rows of a ggml type, by ggml's quantizer (with an importance per column if given)");
    m.def("dequantize_rows", &dequantize_rows, py::arg("data"), py::arg("type_id"), py::arg("cols"),
          "packed rows of a ggml type -> float32 rows, by ggml's dequantizer");
    m.def("vec_dot_nq1_q8_0", &vec_dot_nq1_q8_0, py::arg("signs"), py::arg("activations"), py::arg("n"),
          py::arg("reference") = false, "all dot products of NQ1 rows with Q8_0 rows");
    m.def("lowrank_binary_matmul", &lowrank_binary_matmul, py::arg("x"), py::arg("v_signs"), py::arg("u_signs"),
          py::arg("s_pre"), py::arg("s_mid"), py::arg("s_post"), py::arg("n_threads") = 1,
          "y = s_post * (U (s_mid * (V (s_pre * x)))) on ggml's CPU backend; x is [tokens, d_in]");
    m.def("nq1_fused_layers", &ggml_nq1_lut_fused_layers,
          "NanoQuant layers ggml's CPU backend has run as one fused step in this process (cpp/nq1-lut-ggml.cpp)");
    register_mul_mat_bench(m);
    register_engine(m);
}
