// Sizes of one multi-scale deformable attention call, shared by the CPU
// kernels, the CUDA kernels and their CPU emulation. Plain values only, so
// that it can be passed to a CUDA kernel inside its parameter struct.
#pragma once

#include <cstdint>

namespace detr_deform {

struct Dims {
  int64_t batch;       // N
  int64_t num_value;   // S = sum_l H_l * W_l
  int64_t num_heads;   // M
  int64_t channels;    // D, channels per head
  int64_t num_levels;  // L
  int64_t num_query;   // Lq
  int64_t num_points;  // P, sampling points per head and level
};

}  // namespace detr_deform
