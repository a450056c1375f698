// Row capacities up to which the CUDA linear ops run the GEMV (gemv.cu) instead of a tiled
// GEMM: decode batches. A header of its own, free of CUDA includes, so that registration.cpp
// exports the same constant in every build, CPU-only ones included
// (skipgpt_ext.CUDA_GEMV_MAX_ROWS: the layer picks its K/V path by it).
#pragma once
#include <cstdint>

namespace skipgpt::cuda {
constexpr int64_t kGemvMaxRows = 8;
}  // namespace skipgpt::cuda
