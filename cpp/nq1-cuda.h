// ggml-cuda's entry into the fused NanoQuant layer of cpp/nq1-cuda.cu (called from ggml_cuda_try_fuse by
// ggml_patches/0006). Host code only.
#pragma once

struct ggml_backend_cuda_context;
struct ggml_cgraph;

// Runs the NanoQuant layer whose op chain (cpp/nq1-lowrank.h) starts at node `first` as three kernels when it has
// 1..NQ1_CUDA_FUSE_MAX_COLS columns; returns the nodes it covered beyond the first, 0 where none was run.
int ggml_cuda_nq1_fuse_lowrank(ggml_backend_cuda_context & ctx, ggml_cgraph * cgraph, int first);

#define NQ1_CUDA_FUSE_MAX_COLS 8  // decode batches; larger ones go op by op (MMVQ up to 8, cuBLAS above)
