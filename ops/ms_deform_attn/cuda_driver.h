// Host side of the CUDA operator: allocation, launch configuration, and the
// sort / run-length steps of the deterministic backward, written once against
// a Launcher that either launches the real kernels (CudaLauncher in
// ms_deform_attn_cuda.cu) or runs every thread of them on the CPU
// (EmulatedLauncher in cuda_emulation.cpp). A Launcher provides
//   int64_t max_blocks();
//   bool wide_index(), narrow_vectors();   // force the forward's 64-bit / scalar variant (tests)
//   at::Tensor zeros(sizes, options), empty(sizes, options);
//   void forward(LaunchConfig, ForwardVariant<index_t, V>, ForwardParams<scalar_t, coord_t>);
//   void backward(LaunchConfig, BackwardParams<scalar_t, coord_t>, Scatter);  // Atomic- or KeyedScatter
//   void gather(LaunchConfig, GatherParams<scalar_t>);
//   int64_t sort_chunk_entries();            // entries per sort (kSortChunkEntries; tests: fewer)
//   void sort_keys(packed, sorted, n, end_bit);  // ascending, bits [0, end_bit) of int64 keys
// The sort is cub's radix sort of the keys' bits on the GPU and at::sort on
// the CPU (the order of distinct int64 values is the same).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cuda_kernels.h"
#include "ms_deform_attn.h"

namespace detr_deform {
namespace cuda_kernels {

// The deterministic backward runs when asked for explicitly or when torch's
// global deterministic mode is on (torch.use_deterministic_algorithms, which
// runtime.deterministic=true switches on).
inline bool use_deterministic(bool requested) {
  return requested || at::globalContext().deterministicAlgorithms();
}

inline bool aligned_16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

template <typename index_t, int V, typename scalar_t, typename coord_t, typename Launcher>
void launch_forward(const ForwardParams<scalar_t, coord_t>& params, Launcher& launcher) {
  const Dims& d = params.d;
  const int64_t work = d.batch * d.num_query * d.num_heads * (d.channels / V);
  launcher.forward(launch_config(work, launcher.max_blocks()), ForwardVariant<index_t, V>{}, params);
}

// The forward's variant: 32-bit index arithmetic when every flat index fits
// (else 64-bit), 16-byte vector accesses when D and the pointers allow (else
// one channel per thread).
template <typename scalar_t, typename coord_t, typename Launcher>
void dispatch_forward(const ForwardParams<scalar_t, coord_t>& params, Launcher& launcher) {
  constexpr int kWide = kWideVector<scalar_t>;
  const bool vectors = !launcher.narrow_vectors() && params.d.channels % kWide == 0 &&
                       aligned_16(params.value) && aligned_16(params.output);
  if (forward_fits_int32(params.d) && !launcher.wide_index()) {
    vectors ? launch_forward<int32_t, kWide>(params, launcher)
            : launch_forward<int32_t, 1>(params, launcher);
  } else {
    vectors ? launch_forward<int64_t, kWide>(params, launcher)
            : launch_forward<int64_t, 1>(params, launcher);
  }
}

// Calls fn(coord_t{}) with the dtype of the locations and weights: value's own,
// or float for mixed precision (fp16 / bf16 value, float32 locations and
// weights; prepare_inputs allowed nothing else).
template <typename scalar_t, typename Fn>
void with_coord_type(const PreparedInputs& in, const Fn& fn) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (in.sampling_locations.scalar_type() == at::kFloat) {
      fn(float{});
      return;
    }
  }
  fn(scalar_t{});
}

template <typename Launcher>
at::Tensor forward(const PreparedInputs& in, Launcher& launcher) {
  const Dims& d = in.dims;
  at::Tensor output =
      launcher.empty({d.batch, d.num_query, d.num_heads * d.channels}, in.value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward", [&] {
        with_coord_type<scalar_t>(in, [&](auto coord) {
          using coord_t = decltype(coord);
          const ForwardParams<scalar_t, coord_t> params{in.value.data_ptr<scalar_t>(),
                                                        in.spatial_shapes.data_ptr<int64_t>(),
                                                        in.level_start_index.data_ptr<int64_t>(),
                                                        in.sampling_locations.data_ptr<coord_t>(),
                                                        in.attention_weights.data_ptr<coord_t>(),
                                                        output.data_ptr<scalar_t>(),
                                                        d};
          dispatch_forward(params, launcher);
        });
      });
  return output;
}

template <typename scalar_t, typename coord_t>
BackwardParams<scalar_t, coord_t> backward_params(const PreparedInputs& in,
                                                  const at::Tensor& grad_output,
                                                  at::Tensor& grad_locations,
                                                  at::Tensor& grad_weights) {
  return {grad_output.data_ptr<scalar_t>(),
          in.value.data_ptr<scalar_t>(),
          in.spatial_shapes.data_ptr<int64_t>(),
          in.level_start_index.data_ptr<int64_t>(),
          in.sampling_locations.data_ptr<coord_t>(),
          in.attention_weights.data_ptr<coord_t>(),
          grad_locations.data_ptr<coord_t>(),
          grad_weights.data_ptr<coord_t>(),
          in.dims,
          0,
          in.attention_weights.numel()};
}

// Atomic value gradient: into an opmath (float for fp16/bf16) buffer, cast once.
template <typename scalar_t, typename coord_t, typename AtomicAdd, typename Launcher>
at::Tensor atomic_value_grad(const PreparedInputs& in,
                             const BackwardParams<scalar_t, coord_t>& params, Launcher& launcher) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_options = in.value.options().dtype(at::toOpMathType(in.value.scalar_type()));
  at::Tensor grad_value = launcher.zeros(in.value.sizes(), acc_options);
  const AtomicScatter<scalar_t, AtomicAdd> scatter{grad_value.template data_ptr<acc_t>()};
  launcher.backward(launch_config(backward_threads(in.attention_weights.numel(), in.dims.channels),
                                  launcher.max_blocks()),
                    params, scatter);
  return grad_value.to(in.value.scalar_type());
}

// Entries (4 per sample) per sort of the deterministic backward: 2^22, i.e.
// 32 MiB of packed keys, 32 MiB sorted, 16 MiB of coefficients and cub's
// double buffer (~32 MiB) -- whatever the batch (docs/operator.md).
constexpr int64_t kSortChunkEntries = int64_t(1) << 22;

// Bits needed for the values 0..max_value.
inline int bits_for(int64_t max_value) {
  int bits = 1;
  while (bits < 63 && (max_value >> bits) != 0) ++bits;
  return bits;
}

// Deterministic value gradient, chunk by chunk of at most sort_chunk_entries()
// entries: (a) the per-sample kernel, launched for the chunk's samples, writes
// their location and weight gradients and records 4 packed (key, entry) values
// and coefficients per sample; (b) a sort of the packed values on key_bits +
// index_bits bits; (c) one thread per (entry, channel) sums each run in entry
// order and adds it to an opmath buffer (zero-initialised; cast once at the
// end). No atomics, no device-to-host synchronisation, and no single sort
// larger than a chunk, so no limit from the sort's int32 sizes.
template <typename scalar_t, typename coord_t, typename Launcher>
at::Tensor keyed_value_grad(const PreparedInputs& in, const at::Tensor& grad_output,
                            const BackwardParams<scalar_t, coord_t>& params, Launcher& launcher) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = in.dims;
  const int64_t samples = in.attention_weights.numel();
  const int64_t sentinel = d.batch * d.num_value * d.num_heads;
  const int64_t chunk_samples =
      std::max<int64_t>(1, std::min(samples, launcher.sort_chunk_entries() / 4));
  const int index_bits = bits_for(4 * chunk_samples - 1);
  const int key_bits = bits_for(sentinel);
  TORCH_CHECK(key_bits + index_bits <= 63, "ms_deform_attn backward: N*S*M = ", sentinel,
              " value rows are too many for the deterministic backward's 63-bit sort keys");
  const auto options = in.value.options();
  const auto acc_options = options.dtype(at::toOpMathType(in.value.scalar_type()));
  at::Tensor grad_value = launcher.zeros(in.value.sizes(), acc_options);
  at::Tensor packed = at::empty({4 * chunk_samples}, options.dtype(at::kLong));
  at::Tensor sorted = at::empty({4 * chunk_samples}, options.dtype(at::kLong));
  at::Tensor coefs = at::empty({4 * chunk_samples}, acc_options);
  for (int64_t first = 0; first < samples; first += chunk_samples) {
    const int64_t count = std::min(chunk_samples, samples - first);
    const KeyedScatter<scalar_t> scatter{packed.data_ptr<int64_t>(), coefs.data_ptr<acc_t>(),
                                         d.num_heads,                sentinel,
                                         first,                      index_bits};
    BackwardParams<scalar_t, coord_t> chunk = params;
    chunk.first_sample = first;
    chunk.sample_count = count;
    launcher.backward(launch_config(backward_threads(count, d.channels), launcher.max_blocks()),
                      chunk, scatter);
    launcher.sort_keys(packed, sorted, 4 * count, key_bits + index_bits);
    const GatherParams<scalar_t> gather{sorted.data_ptr<int64_t>(),
                                        coefs.data_ptr<acc_t>(),
                                        grad_output.data_ptr<scalar_t>(),
                                        grad_value.data_ptr<acc_t>(),
                                        4 * count,
                                        index_bits,
                                        first,
                                        d.channels,
                                        d.num_levels * d.num_points,
                                        sentinel};
    launcher.gather(launch_config(4 * count * d.channels, launcher.max_blocks()), gather);
  }
  return grad_value.to(in.value.scalar_type());
}

// `deterministic` selects the keyed backward (else atomics); the emulation's
// tests shrink its sort chunks through the Launcher (sort_chunk_entries).
template <typename AtomicAdd, typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const PreparedInputs& in,
                                                        const at::Tensor& grad_output,
                                                        bool deterministic, Launcher& launcher) {
  at::Tensor grad_locations =
      launcher.empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  at::Tensor grad_weights =
      launcher.empty(in.attention_weights.sizes(), in.attention_weights.options());
  if (in.attention_weights.numel() == 0) {  // no samples (N = 0 or Lq = 0): nothing to launch
    return {launcher.zeros(in.value.sizes(), in.value.options()), grad_locations, grad_weights};
  }
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward", [&] {
        with_coord_type<scalar_t>(in, [&](auto coord) {
          using coord_t = decltype(coord);
          const auto params =
              backward_params<scalar_t, coord_t>(in, grad_output, grad_locations, grad_weights);
          grad_value = deterministic
                           ? keyed_value_grad<scalar_t>(in, grad_output, params, launcher)
                           : atomic_value_grad<scalar_t, coord_t, AtomicAdd>(in, params, launcher);
        });
      });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace cuda_kernels
}  // namespace detr_deform
