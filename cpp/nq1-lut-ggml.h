// Entry points of cpp/nq1-lut-ggml.cpp besides its tensor traits (declared in ggml-cpu's repack.h by
// ggml_patches/0004): the fused-layer hook that ggml_patches/0005 calls from ggml-cpu.c, which declares it itself
// with the same signature, and a counter of fused layers for the tests.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;
struct ggml_cgraph;

// Runs the NanoQuant layer whose chain starts at node_n as one step; returns the nodes it covered beyond the first,
// 0 where no chain starts there or it does not fit the fused kernels.
int ggml_nq1_lut_fuse_lowrank(const struct ggml_compute_params * params, const struct ggml_cgraph * cgraph, int node_n);

// NanoQuant layers run as one fused step in this process so far
uint64_t ggml_nq1_lut_fused_layers(void);

#ifdef __cplusplus
}
#endif
