// Bodies of the CUDA kernels and their launch configuration.
//
// Everything here is compiled twice: by nvcc for the GPU (the __global__
// kernels of ms_deform_attn_cuda.cu are one-line wrappers that call a
// *_thread function with blockIdx.x, threadIdx.x, blockDim.x, gridDim.x), and
// by the host C++ compiler for cuda_emulation.cpp, the test harness that runs
// every (block, thread) -- for the backward every (block, warp) with its 32
// lanes -- of the same launch configuration on the CPU. So the index
// decomposition, bounds handling, bilinear taps, warp reductions and gradient
// accumulation that the GPU runs are exercised by the normal test suite.
//
// Thread mapping (docs/operator.md, "Design"):
//  - forward: one thread per V consecutive channels of one output row
//    (n, q, m); channels fastest, so the lanes of a warp read neighbouring
//    channels of the same taps (one 32-channel fp32 row: 4 sectors per tap);
//    V = 16 bytes' worth (float4, 8 halves) when D and the pointers allow,
//    else 1; 32-bit index arithmetic when every flat index fits, else 64-bit;
//  - backward: lanes over channels too. A group of G lanes (G = D rounded up
//    to a power of two, at most 32) shares one sample (n, q, m, l, p); lane g
//    of the group handles channels g, g + G, ...: its value reads and its
//    value-gradient atomics are channel-contiguous rows (coalesced), and the
//    sample's location and weight gradients are summed across the group's
//    lanes with a butterfly of warp shuffles, then written by lane 0.
//
// Rules that keep the emulation faithful:
//  - no block-shared memory and no __syncthreads; the only warp-level
//    primitive is the butterfly sum of a Warp policy (DeviceWarp: shuffles;
//    the emulation's warp: the same butterfly over 32 lane registers), and it
//    is reached by all 32 lanes of a warp together by construction: the
//    backward body is written as phases over the lanes (Warp::for_each_lane)
//    separated by the warp sums, and lanes without work (past the end, or an
//    outside-the-map sample) only contribute zeros to them. Running the lanes
//    of a phase one after another, in any order, is then a legal schedule;
//  - the only cross-thread interaction through memory is the atomic add of
//    the value gradient, a template policy (gpuAtomicAdd on the device, += on
//    the host);
//  - loops are grid-stride (over warps for the backward), and accumulation is
//    in at::opmath_type (float for fp16/bf16, cast once at the end).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "bilinear.h"
#include "dims.h"
#include "memory_trace.h"

namespace detr_deform {
namespace cuda_kernels {

constexpr int64_t kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;
constexpr int kWarpSize = 32;

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

// Lanes per backward sample: D rounded up to a power of two, at most a warp.
DD_HOST_DEVICE int lanes_per_sample(int64_t channels) {
  int group = 1;
  while (group < channels && group < kWarpSize) group *= 2;
  return group;
}

// Threads of the backward launch: whole warps, each covering 32 / G samples
// (host and device: the kernel's grid-stride loop needs it too).
DD_HOST_DEVICE int64_t backward_threads(int64_t samples, int64_t channels) {
  const int64_t per_warp = kWarpSize / lanes_per_sample(channels);
  return kWarpSize * ((samples + per_warp - 1) / per_warp);
}

// The same butterfly step on the GPU (register + shuffled partner) and in the
// emulation (lane register + partner lane's register): one addition, so the
// summation order -- and with it every bit of the result -- is the same.
template <typename T>
DD_HOST_DEVICE T butterfly_add(T mine, T partner) {
  return mine + partner;
}

// ---------------------------------------------------------------- forward --

template <typename scalar_t, typename coord_t>
struct ForwardParams {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const coord_t* locations;
  const coord_t* weights;
  scalar_t* output;
  Dims d;
};

// V consecutive elements, loaded and stored as one access (ld/st.global.v2/v4).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Vector width of the forward: 16 bytes when D divides by it and the value and
// output pointers are 16-byte aligned, else 1.
template <typename scalar_t>
constexpr int kWideVector = static_cast<int>(16 / sizeof(scalar_t));

// Whether every flat index of the forward (value, output and location
// elements, plus one grid stride beyond) fits in int32.
inline bool forward_fits_int32(const Dims& d) {
  const int64_t value = d.batch * d.num_value * d.num_heads * d.channels;
  const int64_t output = d.batch * d.num_query * d.num_heads * d.channels;
  const int64_t locations = 2 * d.batch * d.num_query * d.num_heads * d.num_levels * d.num_points;
  const int64_t stride = kThreadsPerBlock * kMaxBlocks;
  return std::max({value, output, locations}) + stride < std::numeric_limits<int32_t>::max();
}

// Thread `index` covers channels [c, c + V) of output row (n, q, m):
// index = ((n * Lq + q) * M + m) * (D / V) + c / V.
template <typename index_t, int V, typename scalar_t, typename coord_t>
DD_HOST_DEVICE void forward_element(index_t index, const ForwardParams<scalar_t, coord_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t channels = static_cast<index_t>(p.d.channels);
  const index_t heads = static_cast<index_t>(p.d.num_heads);
  const index_t levels = static_cast<index_t>(p.d.num_levels);
  const index_t points = static_cast<index_t>(p.d.num_points);
  const index_t groups = channels / V;
  const index_t pixel_stride = heads * channels;
  const index_t c = (index % groups) * V;
  const index_t m = (index / groups) % heads;
  const index_t nq = index / (groups * heads);
  const index_t n = nq / static_cast<index_t>(p.d.num_query);
  const scalar_t* value_nm =
      p.value + n * static_cast<index_t>(p.d.num_value) * pixel_stride + m * channels + c;
  const index_t sample_base = (nq * heads + m) * levels * points;
  acc_t acc[V];
  for (int i = 0; i < V; ++i) acc[i] = acc_t(0);
  for (index_t l = 0; l < levels; ++l) {
    const index_t height = static_cast<index_t>(p.shapes[2 * l]);
    const index_t width = static_cast<index_t>(p.shapes[2 * l + 1]);
    const scalar_t* level_value = value_nm + static_cast<index_t>(p.starts[l]) * pixel_stride;
    for (index_t pt = 0; pt < points; ++pt) {
      const index_t s = sample_base + l * points + pt;
      DD_TRACE(trace::kOtherRead, 1, p.locations + 2 * s, 2 * sizeof(coord_t));
      const auto taps = bilinear_taps<acc_t, index_t>(static_cast<acc_t>(p.locations[2 * s]),
                                                      static_cast<acc_t>(p.locations[2 * s + 1]),
                                                      height, width);
      if (!taps.inside) continue;
      DD_TRACE(trace::kOtherRead, 2, p.weights + s, sizeof(coord_t));
      const acc_t weight = static_cast<acc_t>(p.weights[s]);
      Pack<scalar_t, V> tap[4];
      for (int t = 0; t < 4; ++t) {
        if (taps.offset[t] >= 0) {
          DD_TRACE(trace::kValueRead, 10 + t, level_value + taps.offset[t] * pixel_stride,
                   sizeof(Pack<scalar_t, V>));
          tap[t] = *reinterpret_cast<const Pack<scalar_t, V>*>(level_value +
                                                              taps.offset[t] * pixel_stride);
        } else {
          for (int i = 0; i < V; ++i) tap[t].v[i] = scalar_t(0);
        }
      }
      for (int i = 0; i < V; ++i) {
        acc[i] += weight * bilinear_value<acc_t>(
                               taps, static_cast<acc_t>(tap[0].v[i]), static_cast<acc_t>(tap[1].v[i]),
                               static_cast<acc_t>(tap[2].v[i]), static_cast<acc_t>(tap[3].v[i]));
      }
    }
  }
  Pack<scalar_t, V> out;
  for (int i = 0; i < V; ++i) out.v[i] = static_cast<scalar_t>(acc[i]);
  DD_TRACE(trace::kOtherWrite, 3, p.output + (nq * heads + m) * channels + c, sizeof(out));
  *reinterpret_cast<Pack<scalar_t, V>*>(p.output + (nq * heads + m) * channels + c) = out;
}

// A tag that selects the index type and vector width of a forward launch.
template <typename index_t, int V>
struct ForwardVariant {};

template <typename index_t, int V, typename scalar_t, typename coord_t>
DD_HOST_DEVICE void forward_thread(int64_t block, int64_t thread, int64_t block_dim,
                                   int64_t grid_dim, ForwardVariant<index_t, V>,
                                   const ForwardParams<scalar_t, coord_t>& p) {
  const Dims& d = p.d;
  const index_t total =
      static_cast<index_t>(d.batch * d.num_query * d.num_heads * (d.channels / V));
  const index_t stride = static_cast<index_t>(block_dim * grid_dim);
  for (index_t index = static_cast<index_t>(block * block_dim + thread); index < total;
       index += stride) {
    forward_element<index_t, V>(index, p);
  }
}

// --------------------------------------------------------------- backward --

template <typename scalar_t, typename coord_t>
struct BackwardParams {
  const scalar_t* grad_output;
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const coord_t* locations;
  const coord_t* weights;
  coord_t* grad_locations;
  coord_t* grad_weights;
  Dims d;
  int64_t first_sample;  // this launch covers samples [first_sample, first_sample + sample_count)
  int64_t sample_count;
};

// Value-gradient policy of the atomic backward: every channel of every tap is
// added atomically into an accumulation-precision buffer (N, S, M, D); the
// lanes of a sample's group add neighbouring channels of one row together.
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
        DD_TRACE_ATOMIC(trace::kGradValue, 40 + i, level_grad + taps.offset[i] * pixel_stride + c,
                        sizeof(acc_t));
        AtomicAdd::add(level_grad + taps.offset[i] * pixel_stride + c,
                       grad_times_weight * taps.weight[i]);
      }
    }
  }
};

// Value-gradient policy of the deterministic backward: no value gradient is
// written here. For each of its 4 taps, the sample (lane 0 of its group)
// records the value row it feeds, key = (n * S + pixel) * M + m (a row of value
// viewed as (N*S*M, D); `sentinel` = N*S*M for a tap outside the map), and the
// coefficient attention_weight * tap_weight. The launch covers one chunk of
// samples starting at `first`; entry e = 4 * (s - first) + tap is packed with
// its key as (key << index_bits) | e, so that one sort of the packed values
// (keys only, key_bits + index_bits bits) orders the entries by row and, within
// a row, by entry: the stable order, without a separate permutation array.
template <typename scalar_t>
struct KeyedScatter {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t* packed;  // 4 per sample of the chunk
  acc_t* coefs;     // 4 per sample of the chunk
  int64_t num_heads;
  int64_t sentinel;
  int64_t first;
  int index_bits;

  DD_HOST_DEVICE void outside(int64_t s) const {
    for (int i = 0; i < 4; ++i) {
      const int64_t e = 4 * (s - first) + i;
      DD_TRACE(trace::kOtherWrite, 50 + i, packed + e, sizeof(int64_t));
      DD_TRACE(trace::kOtherWrite, 54 + i, coefs + e, sizeof(acc_t));
      packed[e] = (sentinel << index_bits) | e;
      coefs[e] = acc_t(0);
    }
  }
  DD_HOST_DEVICE void sample(int64_t s, int64_t level_pos, int64_t m,
                             const BilinearTaps<acc_t>& taps, acc_t weight) const {
    for (int i = 0; i < 4; ++i) {
      const int64_t e = 4 * (s - first) + i;
      const bool ok = taps.offset[i] >= 0;
      const int64_t key = ok ? (level_pos + taps.offset[i]) * num_heads + m : sentinel;
      DD_TRACE(trace::kOtherWrite, 50 + i, packed + e, sizeof(int64_t));
      DD_TRACE(trace::kOtherWrite, 54 + i, coefs + e, sizeof(acc_t));
      packed[e] = (key << index_bits) | e;
      coefs[e] = ok ? weight * taps.weight[i] : acc_t(0);
    }
  }
  DD_HOST_DEVICE void channel(int64_t, int64_t, const BilinearTaps<acc_t>&, acc_t, int64_t) const {}
};

// What one lane accumulates for its sample over its channels, summed across
// the sample's group of lanes afterwards.
template <typename acc_t>
struct LanePartials {
  acc_t weight = 0, h = 0, w = 0;
  bool inside = false;  // the lane's sample exists and lies (partly) on the map
};

// Sample s = (((n * Lq + q) * M + m) * L + l) * P + p, lane g of its group of
// G lanes: the lane's share (channels g, g + G, ...) of the sample's location
// and weight gradients, and its value gradient through the Scatter policy.
template <typename scalar_t, typename coord_t, typename Scatter>
DD_HOST_DEVICE LanePartials<at::opmath_type<scalar_t>> backward_lane(
    int64_t s, int g, int group, const BackwardParams<scalar_t, coord_t>& p,
    const Scatter& scatter) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = p.d;
  LanePartials<acc_t> part;
  if (s >= p.first_sample + p.sample_count) return part;
  const int64_t pixel_stride = d.num_heads * d.channels;
  const int64_t l = (s / d.num_points) % d.num_levels;
  const int64_t m = (s / (d.num_points * d.num_levels)) % d.num_heads;
  const int64_t nq = s / (d.num_points * d.num_levels * d.num_heads);
  const int64_t n = nq / d.num_query;
  DD_TRACE(trace::kOtherRead, 21, p.locations + 2 * s, 2 * sizeof(coord_t));
  const auto taps = bilinear_taps<acc_t>(static_cast<acc_t>(p.locations[2 * s]),
                                         static_cast<acc_t>(p.locations[2 * s + 1]),
                                         p.shapes[2 * l], p.shapes[2 * l + 1]);
  if (!taps.inside) {
    if (g == 0) scatter.outside(s);
    return part;
  }
  part.inside = true;
  const int64_t level_pos = n * d.num_value + p.starts[l];  // (n, first pixel of level l) in N*S
  const int64_t level_offset = level_pos * pixel_stride + m * d.channels;
  const scalar_t* level_value = p.value + level_offset;
  const scalar_t* go = p.grad_output + (nq * d.num_heads + m) * d.channels;
  DD_TRACE(trace::kOtherRead, 22, p.weights + s, sizeof(coord_t));
  const acc_t weight = static_cast<acc_t>(p.weights[s]);
  if (g == 0) scatter.sample(s, level_pos, m, taps, weight);
  for (int64_t c = g; c < d.channels; c += group) {
    DD_TRACE(trace::kOtherRead, 23, go + c, sizeof(scalar_t));
    for (int i = 0; i < 4; ++i) {
      if (taps.offset[i] >= 0) {
        DD_TRACE(trace::kValueRead, 30 + i, level_value + c + taps.offset[i] * pixel_stride,
                 sizeof(scalar_t));
      }
    }
    const acc_t grad = static_cast<acc_t>(go[c]);
    const acc_t v0 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[0], pixel_stride);
    const acc_t v1 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[1], pixel_stride);
    const acc_t v2 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[2], pixel_stride);
    const acc_t v3 = load_tap<scalar_t, acc_t>(level_value + c, taps.offset[3], pixel_stride);
    part.weight += grad * bilinear_value<acc_t>(taps, v0, v1, v2, v3);
    acc_t d_h, d_w;
    bilinear_coord_grad<acc_t>(taps, v0, v1, v2, v3, &d_h, &d_w);
    part.h += grad * d_h;
    part.w += grad * d_w;
    scatter.channel(level_offset, c, taps, weight * grad, pixel_stride);
  }
  return part;
}

// Lane 0 of a group writes its sample's gradients (sums over the group).
template <typename scalar_t, typename coord_t>
DD_HOST_DEVICE void backward_write(int64_t s, const LanePartials<at::opmath_type<scalar_t>>& sum,
                                   const BackwardParams<scalar_t, coord_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = p.d;
  if (s >= p.first_sample + p.sample_count) return;
  DD_TRACE(trace::kOtherWrite, 60, p.grad_weights + s, sizeof(coord_t));
  DD_TRACE(trace::kOtherWrite, 61, p.grad_locations + 2 * s, 2 * sizeof(coord_t));
  if (!sum.inside) {  // exactly zero, whatever the weight (NaN included)
    p.grad_weights[s] = coord_t(0);
    p.grad_locations[2 * s] = coord_t(0);
    p.grad_locations[2 * s + 1] = coord_t(0);
    return;
  }
  const int64_t l = (s / d.num_points) % d.num_levels;
  DD_TRACE(trace::kOtherRead, 62, p.weights + s, sizeof(coord_t));
  const acc_t weight = static_cast<acc_t>(p.weights[s]);
  p.grad_weights[s] = static_cast<coord_t>(sum.weight);
  p.grad_locations[2 * s] = static_cast<coord_t>(sum.w * weight * p.shapes[2 * l + 1]);
  p.grad_locations[2 * s + 1] = static_cast<coord_t>(sum.h * weight * p.shapes[2 * l]);
}

// One warp-iteration of the backward: 32 / G samples, each on G lanes.
// Phase 1 (every lane): its partial sums and value-gradient contributions;
// warp sums within each group (butterfly, all 32 lanes); phase 2 (lane 0 of
// each group): the writes.
template <typename Warp, typename scalar_t, typename coord_t, typename Scatter>
DD_HOST_DEVICE void backward_warp(int64_t warp_index, Warp& warp,
                                  const BackwardParams<scalar_t, coord_t>& p,
                                  const Scatter& scatter) {
  using acc_t = at::opmath_type<scalar_t>;
  const int group = lanes_per_sample(p.d.channels);
  const int64_t first = p.first_sample + warp_index * (kWarpSize / group);
  typename Warp::template Lanes<acc_t> sum_weight, sum_h, sum_w;
  typename Warp::template Lanes<bool> inside;
  warp.for_each_lane([&](int lane) {
    const auto part = backward_lane(first + lane / group, lane % group, group, p, scatter);
    sum_weight[lane] = part.weight;
    sum_h[lane] = part.h;
    sum_w[lane] = part.w;
    inside[lane] = part.inside;
  });
  warp.sum_groups(sum_weight, group);
  warp.sum_groups(sum_h, group);
  warp.sum_groups(sum_w, group);
  warp.for_each_lane([&](int lane) {
    if (lane % group != 0) return;
    LanePartials<acc_t> sum;
    sum.weight = sum_weight[lane];
    sum.h = sum_h[lane];
    sum.w = sum_w[lane];
    sum.inside = inside[lane];
    backward_write(first + lane / group, sum, p);
  });
}

// Grid-stride loop over warps (uniform across a warp's lanes, so that all 32
// reach the warp sums together).
template <typename Warp, typename scalar_t, typename coord_t, typename Scatter>
DD_HOST_DEVICE void backward_warps(int64_t block, int64_t warp_in_block, int64_t block_dim,
                                   int64_t grid_dim, Warp& warp,
                                   const BackwardParams<scalar_t, coord_t>& p,
                                   const Scatter& scatter) {
  const int64_t warps = backward_threads(p.sample_count, p.d.channels) / kWarpSize;
  const int64_t warps_per_block = block_dim / kWarpSize;
  for (int64_t w = block * warps_per_block + warp_in_block; w < warps;
       w += warps_per_block * grid_dim) {
    backward_warp(w, warp, p, scatter);
  }
}

// The device entry: the thread's warp and lane (Warp: DeviceWarp).
template <typename Warp, typename scalar_t, typename coord_t, typename Scatter>
DD_HOST_DEVICE void backward_thread(int64_t block, int64_t thread, int64_t block_dim,
                                    int64_t grid_dim, Warp warp,
                                    const BackwardParams<scalar_t, coord_t>& p,
                                    const Scatter& scatter) {
  warp.lane = static_cast<int>(thread % kWarpSize);
  backward_warps(block, thread / kWarpSize, block_dim, grid_dim, warp, p, scatter);
}

// ------------------------------------------- deterministic value gradient --

// After the sort of one chunk's packed entries: sorted[j] = (key << index_bits)
// | e, ascending, so equal keys (one value row) form runs in entry order.
template <typename scalar_t>
struct GatherParams {
  const int64_t* sorted;  // entries of the chunk, sorted
  const at::opmath_type<scalar_t>* coefs;
  const scalar_t* grad_output;
  at::opmath_type<scalar_t>* grad_value;  // zero-initialised (N, S, M, D), accumulated over chunks
  int64_t entries;        // of this chunk
  int index_bits;
  int64_t first_sample;   // of this chunk
  int64_t channels;
  int64_t samples_per_row;  // L * P: samples of one (n, q, m) row of grad_output
  int64_t sentinel;
};

// index = j * D + c: one thread per (sorted entry, channel), channels fastest.
// The thread of the first entry of a run sums the run's contributions to
// channel c in entry order and adds the sum to grad_value[key, c]; the others
// return at once. A warp (D = 32) shares one entry: the run's entries and
// coefficients are the same addresses for all its lanes (broadcast), its
// grad_output reads and its grad_value row are contiguous (coalesced). Each
// element of grad_value has exactly one writer per chunk and the chunks run
// one after another, so the result does not depend on scheduling.
template <typename scalar_t>
DD_HOST_DEVICE void gather_element(int64_t index, const GatherParams<scalar_t>& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = index / g.channels;
  const int64_t c = index % g.channels;
  DD_TRACE(trace::kOtherRead, 70, g.sorted + j, sizeof(int64_t));
  const int64_t key = g.sorted[j] >> g.index_bits;
  if (key >= g.sentinel) return;  // taps outside the map
  if (j > 0) DD_TRACE(trace::kOtherRead, 71, g.sorted + j - 1, sizeof(int64_t));
  if (j > 0 && (g.sorted[j - 1] >> g.index_bits) == key) return;  // not the start of its run
  const int64_t mask = (int64_t(1) << g.index_bits) - 1;
  acc_t acc = 0;
  for (int64_t k = j; k < g.entries && (g.sorted[k] >> g.index_bits) == key; ++k) {
    DD_TRACE(trace::kOtherRead, 72, g.sorted + k, sizeof(int64_t));
    const int64_t e = g.sorted[k] & mask;
    const int64_t row = (g.first_sample + e / 4) / g.samples_per_row;
    DD_TRACE(trace::kOtherRead, 73, g.coefs + e, sizeof(acc_t));
    DD_TRACE(trace::kOtherRead, 74, g.grad_output + row * g.channels + c, sizeof(scalar_t));
    acc += g.coefs[e] * static_cast<acc_t>(g.grad_output[row * g.channels + c]);
  }
  DD_TRACE(trace::kGradValue, 75, g.grad_value + key * g.channels + c, sizeof(acc_t));
  g.grad_value[key * g.channels + c] += acc;
}

template <typename scalar_t>
DD_HOST_DEVICE void gather_thread(int64_t block, int64_t thread, int64_t block_dim,
                                  int64_t grid_dim, const GatherParams<scalar_t>& g) {
  const int64_t total = g.entries * g.channels;
  for (int64_t index = block * block_dim + thread; index < total; index += block_dim * grid_dim) {
    gather_element(index, g);
  }
}

}  // namespace cuda_kernels
}  // namespace detr_deform
