// The NanoQuant layer as a chain of stock ggml ops, written down once:
//
//     y = s_post * (U (s_mid * (V (s_pre * x))))
//
//     step    op        operands                     present
//     s_pre   MUL       (x, s_pre)                   when the layer has s_pre
//     V       MUL_MAT   (V, previous)                always
//     s_mid   MUL       (previous, s_mid)            when the layer has s_mid
//     U       MUL_MAT   (U, previous)                always
//     s_post  MUL       (previous, s_post)           when the layer has s_post
//
// x is F32 [d_in, n_cols], V NQ1 [d_in, r], U NQ1 [r, d_out], each scale an F32 vector broadcast over the columns.
// nq1_lowrank_build() emits the chain (llama.cpp's graph through ggml_patches/0002, the bindings' graphs) and
// nq1_lowrank_match() finds it again in a graph for a backend's fusion step (ggml-cpu: cpp/nq1-lut-ggml.cpp,
// ggml-cuda: cpp/nq1-cuda.cu). Both read the one step table in nq1-lowrank.c, so a change of the chain changes what
// the fusions look for. Compiled into ggml-base by the project's CMakeLists.txt.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// The tensors of one layer; a scale that the layer does not have is NULL.
struct nq1_lowrank_layer {
    struct ggml_tensor * x;       // the input the chain starts from
    struct ggml_tensor * v;
    struct ggml_tensor * u;
    struct ggml_tensor * s_pre;
    struct ggml_tensor * s_mid;
    struct ggml_tensor * s_post;
};

// A chain found in a graph: the nodes first .. first + n_nodes - 1, in graph order, of which only `out` is used
// outside the chain.
struct nq1_lowrank_chain {
    struct nq1_lowrank_layer layer;
    int first;
    int n_nodes;
    struct ggml_tensor * v_product;  // MUL_MAT(V, .)
    struct ggml_tensor * u_input;    // what U multiplies: v_product, or MUL(v_product, s_mid)
    struct ggml_tensor * out;        // the layer's output, the last node
};

// Adds the layer's chain to ctx's graph and returns its output.
GGML_API struct ggml_tensor * nq1_lowrank_build(struct ggml_context * ctx, const struct nq1_lowrank_layer * layer);

// Whether a chain starts at node `first` of the graph (the longest one when several would); fills *chain if so.
// Checks the ops, how they connect, that V is NQ1 (which turns other nodes away at once: backends ask at every node),
// that each scale is one row as wide as what it scales, and that only the last node is used outside; the other types,
// layouts and sizes are the backend's to check.
GGML_API bool nq1_lowrank_match(const struct ggml_cgraph * cgraph, int first, struct nq1_lowrank_chain * chain);

#ifdef __cplusplus
}
#endif
