// Per-thread bodies of the CUDA kernels and their launch configuration.
//
// Everything here is compiled twice: by nvcc for the GPU (the __global__
// kernels of ms_deform_attn_cuda.cu are one-line wrappers that call a
// *_thread function with blockIdx.x, threadIdx.x, blockDim.x, gridDim.x), and
// by the host C++ compiler for cuda_emulation.cpp, the test harness that runs
// every (block, thread) of the same launch configuration on the CPU. So the
// index decomposition, bounds handling, bilinear taps and gradient
// accumulation that the GPU runs are exercised by the normal test suite.
//
// Rules that keep the emulation faithful:
//  - no block-shared memory, no warp-level primitives, no __syncthreads: a
//    thread's result depends only on its own index and global memory, so
//    running the threads one after another (in any order) is a legal schedule;
//  - the only cross-thread interaction is the atomic add of the value
//    gradient, a template policy (gpuAtomicAdd on the device, += on the host);
//  - all index arithmetic is 64-bit, loops are grid-stride, and accumulation is
//    in at::opmath_type (float for fp16/bf16, cast once at the end).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "bilinear.h"
#include "dims.h"

namespace detr_deform {
namespace cuda_kernels {

constexpr int64_t kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;

struct LaunchConfig {
  int64_t blocks;
  int64_t threads;
};

// One thread per work item, capped at kMaxBlocks blocks (the grid-stride loops
// cover the rest). max_blocks lowers the cap; only the emulation tests do that,
// to make the grid-stride iterations run on small shapes.
inline LaunchConfig launch_config(int64_t work, int64_t max_blocks = kMaxBlocks) {
  const int64_t blocks = (work + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return {std::max<int64_t>(1, std::min<int64_t>(blocks, max_blocks)), kThreadsPerBlock};
}

// ---------------------------------------------------------------- forward --

template <typename scalar_t>
struct ForwardParams {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* output;
  Dims d;
};

// Output element index = ((n * Lq + q) * M + m) * D + c; channels are fastest
// so that the threads of a warp read neighbouring channels of one pixel.
template <typename scalar_t>
DD_HOST_DEVICE void forward_element(int64_t index, const ForwardParams<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t pixel_stride = d.num_heads * d.channels;
  const int64_t c = index % d.channels;
  const int64_t m = (index / d.channels) % d.num_heads;
  const int64_t nq = index / (d.channels * d.num_heads);
  const int64_t n = nq / d.num_query;
  const scalar_t* value_nm = p.value + n * d.num_value * pixel_stride + m * d.channels + c;
  const int64_t sample_base = (nq * d.num_heads + m) * d.num_levels * d.num_points;
  acc_t acc = 0;
  for (int64_t l = 0; l < d.num_levels; ++l) {
    const int64_t height = p.shapes[2 * l], width = p.shapes[2 * l + 1];
    const scalar_t* level_value = value_nm + p.starts[l] * pixel_stride;
    for (int64_t pt = 0; pt < d.num_points; ++pt) {
      const int64_t s = sample_base + l * d.num_points + pt;
      const auto taps =
          bilinear_taps<acc_t>(static_cast<acc_t>(p.locations[2 * s]),
                               static_cast<acc_t>(p.locations[2 * s + 1]), height, width);
      if (!taps.inside) continue;
      const acc_t v0 = load_tap<scalar_t, acc_t>(level_value, taps.offset[0], pixel_stride);
      const acc_t v1 = load_tap<scalar_t, acc_t>(level_value, taps.offset[1], pixel_stride);
      const acc_t v2 = load_tap<scalar_t, acc_t>(level_value, taps.offset[2], pixel_stride);
      const acc_t v3 = load_tap<scalar_t, acc_t>(level_value, taps.offset[3], pixel_stride);
      acc += static_cast<acc_t>(p.weights[s]) * bilinear_value<acc_t>(taps, v0, v1, v2, v3);
    }
  }
  p.output[index] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
DD_HOST_DEVICE void forward_thread(int64_t block, int64_t thread, int64_t block_dim,
                                   int64_t grid_dim, const ForwardParams<scalar_t>& p) {
  const Dims& d = p.d;
  const int64_t total = d.batch * d.num_query * d.num_heads * d.channels;
  for (int64_t index = block * block_dim + thread; index < total; index += block_dim * grid_dim) {
    forward_element(index, p);
  }
}

// --------------------------------------------------------------- backward --

template <typename scalar_t>
struct BackwardParams {
  const scalar_t* grad_output;
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* grad_locations;
  scalar_t* grad_weights;
  Dims d;
};

// Value-gradient policy of the atomic backward: every channel of every tap is
// added atomically into an accumulation-precision buffer (N, S, M, D).
template <typename scalar_t, typename AtomicAdd>
struct AtomicScatter {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* grad_value;

  DD_HOST_DEVICE void outside(int64_t /*s*/) const {}
  DD_HOST_DEVICE void sample(int64_t /*s*/, int64_t /*level_pos*/, int64_t /*m*/,
                             const BilinearTaps<acc_t>& /*taps*/, acc_t /*weight*/) const {}
  DD_HOST_DEVICE void channel(int64_t level_offset, int64_t c, const BilinearTaps<acc_t>& taps,
                              acc_t grad_times_weight, int64_t pixel_stride) const {
    acc_t* level_grad = grad_value + level_offset;
    for (int i = 0; i < 4; ++i) {
      if (taps.offset[i] >= 0) {
        AtomicAdd::add(level_grad + taps.offset[i] * pixel_stride + c,
                       grad_times_weight * taps.weight[i]);
      }
    }
  }
};

// Value-gradient policy of the deterministic backward: no value gradient is
// written here. For each of its 4 taps, the sample records the value row it
// feeds, key = (n * S + pixel) * M + m (a row of value viewed as (N*S*M, D);
// `sentinel` = N*S*M for a tap outside the map), and the coefficient
// attention_weight * tap_weight. Sorting the keys then lets one thread per
// (row, channel) sum its contributions in a fixed order (gather_thread).
template <typename scalar_t, typename key_t>
struct KeyedScatter {
  using acc_t = at::opmath_type<scalar_t>;
  key_t* keys;   // 4 per sample
  acc_t* coefs;  // 4 per sample
  int64_t num_heads;
  int64_t sentinel;

  DD_HOST_DEVICE void outside(int64_t s) const {
    for (int i = 0; i < 4; ++i) {
      keys[4 * s + i] = static_cast<key_t>(sentinel);
      coefs[4 * s + i] = acc_t(0);
    }
  }
  DD_HOST_DEVICE void sample(int64_t s, int64_t level_pos, int64_t m,
                             const BilinearTaps<acc_t>& taps, acc_t weight) const {
    for (int i = 0; i < 4; ++i) {
      const bool ok = taps.offset[i] >= 0;
      keys[4 * s + i] =
          static_cast<key_t>(ok ? (level_pos + taps.offset[i]) * num_heads + m : sentinel);
      coefs[4 * s + i] = ok ? weight * taps.weight[i] : acc_t(0);
    }
  }
  DD_HOST_DEVICE void channel(int64_t, int64_t, const BilinearTaps<acc_t>&, acc_t, int64_t) const {}
};

// One sample s = (((n * Lq + q) * M + m) * L + l) * P + p: its location and
// weight gradients (owned by this thread, reduced over channels in registers)
// and its value gradient through the Scatter policy.
template <typename scalar_t, typename Scatter>
DD_HOST_DEVICE void backward_sample(int64_t s, const BackwardParams<scalar_t>& p,
                                    const Scatter& scatter) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t pixel_stride = d.num_heads * d.channels;
  const int64_t l = (s / d.num_points) % d.num_levels;
  const int64_t m = (s / (d.num_points * d.num_levels)) % d.num_heads;
  const int64_t nq = s / (d.num_points * d.num_levels * d.num_heads);
  const int64_t n = nq / d.num_query;
  const int64_t height = p.shapes[2 * l], width = p.shapes[2 * l + 1];
  const auto taps = bilinear_taps<acc_t>(static_cast<acc_t>(p.locations[2 * s]),
                                         static_cast<acc_t>(p.locations[2 * s + 1]), height, width);
  if (!taps.inside) {
    p.grad_weights[s] = scalar_t(0);
    p.grad_locations[2 * s] = scalar_t(0);
    p.grad_locations[2 * s + 1] = scalar_t(0);
    scatter.outside(s);
    return;
  }
  const int64_t level_pos = n * d.num_value + p.starts[l];  // (n, first pixel of level l) in N*S
  const int64_t level_offset = level_pos * pixel_stride + m * d.channels;
  const scalar_t* level_value = p.value + level_offset;
  const scalar_t* go = p.grad_output + (nq * d.num_heads + m) * d.channels;
  const acc_t weight = static_cast<acc_t>(p.weights[s]);
  scatter.sample(s, level_pos, m, taps, weight);
  acc_t grad_weight = 0, grad_h = 0, grad_w = 0;
  for (int64_t c = 0; c < d.channels; ++c) {
    const acc_t g = static_cast<acc_t>(go[c]);
    const acc_t v0 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[0], pixel_stride);
    const acc_t v1 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[1], pixel_stride);
    const acc_t v2 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[2], pixel_stride);
    const acc_t v3 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[3], pixel_stride);
    grad_weight += g * bilinear_value<acc_t>(taps, v0, v1, v2, v3);
    acc_t d_h, d_w;
    bilinear_coord_grad<acc_t>(taps, v0, v1, v2, v3, &d_h, &d_w);
    grad_h += g * d_h;
    grad_w += g * d_w;
    scatter.channel(level_offset, c, taps, weight * g, pixel_stride);
  }
  p.grad_weights[s] = static_cast<scalar_t>(grad_weight);
  p.grad_locations[2 * s] = static_cast<scalar_t>(grad_w * weight * width);
  p.grad_locations[2 * s + 1] = static_cast<scalar_t>(grad_h * weight * height);
}

template <typename scalar_t, typename Scatter>
DD_HOST_DEVICE void backward_thread(int64_t block, int64_t thread, int64_t block_dim,
                                    int64_t grid_dim, const BackwardParams<scalar_t>& p,
                                    const Scatter& scatter) {
  const Dims& d = p.d;
  const int64_t total = d.batch * d.num_query * d.num_heads * d.num_levels * d.num_points;
  for (int64_t s = block * block_dim + thread; s < total; s += block_dim * grid_dim) {
    backward_sample(s, p, scatter);
  }
}

// ------------------------------------------- deterministic value gradient --

// After a stable sort of the keys and a run-length count: segment u covers the
// sorted entries [ends[u] - counts[u], ends[u]), all with key keys[u]; order[j]
// is the original entry index 4 * s + tap of sorted entry j.
template <typename scalar_t, typename key_t>
struct GatherParams {
  const key_t* keys;      // unique keys, ascending
  const int64_t* ends;    // inclusive prefix sums of counts
  const int64_t* counts;  // entries per key
  const int64_t* order;   // stable-sort permutation
  const at::opmath_type<scalar_t>* coefs;
  const scalar_t* grad_output;
  scalar_t* grad_value;  // zero-initialised (N, S, M, D)
  int64_t num_segments;
  int64_t channels;
  int64_t samples_per_row;  // L * P: samples of one (n, q, m) row of grad_output
  int64_t sentinel;
};

// index = u * D + c: one thread per (segment, channel), channels fastest, so a
// warp reads one segment's entries (the same addresses: broadcast) and
// neighbouring channels of grad_output rows (coalesced), and writes one
// contiguous row of grad_value. Each element of grad_value has exactly one
// writer and its contributions are summed in ascending entry order, so the
// result does not depend on scheduling. Accumulation in opmath, cast once.
template <typename scalar_t, typename key_t>
DD_HOST_DEVICE void gather_element(int64_t index, const GatherParams<scalar_t, key_t>& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = index / g.channels;
  const int64_t c = index % g.channels;
  const int64_t key = static_cast<int64_t>(g.keys[u]);
  if (key >= g.sentinel) return;  // taps outside the map
  const int64_t end = g.ends[u];
  acc_t acc = 0;
  for (int64_t j = end - g.counts[u]; j < end; ++j) {
    const int64_t entry = g.order[j];
    const int64_t row = (entry / 4) / g.samples_per_row;
    acc += g.coefs[entry] * static_cast<acc_t>(g.grad_output[row * g.channels + c]);
  }
  g.grad_value[key * g.channels + c] = static_cast<scalar_t>(acc);
}

template <typename scalar_t, typename key_t>
DD_HOST_DEVICE void gather_thread(int64_t block, int64_t thread, int64_t block_dim,
                                  int64_t grid_dim, const GatherParams<scalar_t, key_t>& g) {
  const int64_t total = g.num_segments * g.channels;
  for (int64_t index = block * block_dim + thread; index < total; index += block_dim * grid_dim) {
    gather_element(index, g);
  }
}

}  // namespace cuda_kernels
}  // namespace detr_deform
