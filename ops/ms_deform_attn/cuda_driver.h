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
//   void gather(LaunchConfig, GatherParams<scalar_t, key_t>);
// The ATen calls (sort, unique_consecutive, cumsum) are the same on both: on
// the GPU they run on CUDA tensors, in the emulation on CPU tensors.
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
          in.dims};
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

// Deterministic value gradient: (a) the per-sample kernel records 4 (key,
// coefficient) pairs per sample; (b) a stable sort of the keys; (c) run
// lengths of equal keys; (d) one thread per (key, channel) sums its run in
// sorted (= original entry) order and writes grad_value once. No atomics.
template <typename scalar_t, typename key_t, typename coord_t, typename Launcher>
at::Tensor keyed_value_grad(const PreparedInputs& in, const at::Tensor& grad_output,
                            const BackwardParams<scalar_t, coord_t>& params, Launcher& launcher) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = in.dims;
  const int64_t samples = in.attention_weights.numel();
  const int64_t sentinel = d.batch * d.num_value * d.num_heads;
  const auto options = in.value.options();
  auto keys = at::empty({4 * samples}, options.dtype(c10::CppTypeToScalarType<key_t>::value));
  auto coefs = at::empty({4 * samples}, options.dtype(at::toOpMathType(in.value.scalar_type())));
  const KeyedScatter<scalar_t, key_t> scatter{
      keys.template data_ptr<key_t>(), coefs.template data_ptr<acc_t>(), d.num_heads, sentinel};
  launcher.backward(launch_config(backward_threads(samples, d.channels), launcher.max_blocks()),
                    params, scatter);
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto runs =
      at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false, /*return_counts=*/true);
  const at::Tensor& unique_keys = std::get<0>(runs);
  const at::Tensor& counts = std::get<2>(runs);
  const auto ends = counts.cumsum(0);
  at::Tensor grad_value = launcher.zeros(in.value.sizes(), options);
  const int64_t work = unique_keys.numel() * d.channels;
  if (work == 0) return grad_value;
  const GatherParams<scalar_t, key_t> gather{unique_keys.template data_ptr<key_t>(),
                                             ends.template data_ptr<int64_t>(),
                                             counts.template data_ptr<int64_t>(),
                                             std::get<1>(sorted).template data_ptr<int64_t>(),
                                             coefs.template data_ptr<acc_t>(),
                                             grad_output.template data_ptr<scalar_t>(),
                                             grad_value.template data_ptr<scalar_t>(),
                                             unique_keys.numel(),
                                             d.channels,
                                             d.num_levels * d.num_points,
                                             sentinel};
  launcher.gather(launch_config(work, launcher.max_blocks()), gather);
  return grad_value;
}

// 32-bit keys halve the sort's work; 64-bit ones are used when N*S*M rows (and
// the sentinel) do not fit, or when the emulation tests ask for them.
template <typename AtomicAdd, typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const PreparedInputs& in,
                                                        const at::Tensor& grad_output,
                                                        bool deterministic, bool wide_keys,
                                                        Launcher& launcher) {
  const Dims& d = in.dims;
  at::Tensor grad_locations =
      launcher.empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  at::Tensor grad_weights =
      launcher.empty(in.attention_weights.sizes(), in.attention_weights.options());
  if (in.attention_weights.numel() == 0) {  // no samples (N = 0 or Lq = 0): nothing to launch
    return {launcher.zeros(in.value.sizes(), in.value.options()), grad_locations, grad_weights};
  }
  const bool wide =
      wide_keys || d.batch * d.num_value * d.num_heads >= std::numeric_limits<int32_t>::max();
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward", [&] {
        with_coord_type<scalar_t>(in, [&](auto coord) {
          using coord_t = decltype(coord);
          const auto params =
              backward_params<scalar_t, coord_t>(in, grad_output, grad_locations, grad_weights);
          if (!deterministic) {
            grad_value = atomic_value_grad<scalar_t, coord_t, AtomicAdd>(in, params, launcher);
          } else if (wide) {
            grad_value = keyed_value_grad<scalar_t, int64_t>(in, grad_output, params, launcher);
          } else {
            grad_value = keyed_value_grad<scalar_t, int32_t>(in, grad_output, params, launcher);
          }
        });
      });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace cuda_kernels
}  // namespace detr_deform
