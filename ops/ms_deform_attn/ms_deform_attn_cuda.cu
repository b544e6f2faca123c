// CUDA kernels. Forward: one thread per output element (n, q, m, c).
// Backward: one thread per sample (n, q, m, l, p); it owns that sample's
// location and weight gradients and adds its value gradient with atomics into
// an accumulation-precision buffer. All index arithmetic is 64-bit, loops are
// grid-stride without pointer mutation, and any batch size works.
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "bilinear.h"
#include "ms_deform_attn.h"

namespace detr_deform {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 8));
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ output,
                               int64_t batch, int64_t num_value, int64_t num_heads,
                               int64_t channels, int64_t num_levels, int64_t num_query,
                               int64_t num_points) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = batch * num_query * num_heads * channels;
  const int64_t pixel_stride = num_heads * channels;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = index % channels;
    const int64_t m = (index / channels) % num_heads;
    const int64_t nq = index / (channels * num_heads);
    const int64_t n = nq / num_query;
    const scalar_t* value_nm = value + n * num_value * pixel_stride + m * channels + c;
    const int64_t sample_base = (nq * num_heads + m) * num_levels * num_points;
    acc_t acc = 0;
    for (int64_t l = 0; l < num_levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* level_value = value_nm + starts[l] * pixel_stride;
      for (int64_t p = 0; p < num_points; ++p) {
        const int64_t s = sample_base + l * num_points + p;
        const auto taps = bilinear_taps<acc_t>(static_cast<acc_t>(locations[2 * s]),
                                               static_cast<acc_t>(locations[2 * s + 1]), height,
                                               width);
        if (!taps.inside) continue;
        const acc_t v0 = load_tap<scalar_t, acc_t>(level_value, taps.offset[0], pixel_stride);
        const acc_t v1 = load_tap<scalar_t, acc_t>(level_value, taps.offset[1], pixel_stride);
        const acc_t v2 = load_tap<scalar_t, acc_t>(level_value, taps.offset[2], pixel_stride);
        const acc_t v3 = load_tap<scalar_t, acc_t>(level_value, taps.offset[3], pixel_stride);
        acc += static_cast<acc_t>(weights[s]) * bilinear_value<acc_t>(taps, v0, v1, v2, v3);
      }
    }
    output[index] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_weights, int64_t batch,
                                int64_t num_value, int64_t num_heads, int64_t channels,
                                int64_t num_levels, int64_t num_query, int64_t num_points) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = batch * num_query * num_heads * num_levels * num_points;
  const int64_t pixel_stride = num_heads * channels;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < total;
       s += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (s / num_points) % num_levels;
    const int64_t m = (s / (num_points * num_levels)) % num_heads;
    const int64_t nq = s / (num_points * num_levels * num_heads);
    const int64_t n = nq / num_query;
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const auto taps = bilinear_taps<acc_t>(static_cast<acc_t>(locations[2 * s]),
                                           static_cast<acc_t>(locations[2 * s + 1]), height,
                                           width);
    if (!taps.inside) {
      grad_weights[s] = scalar_t(0);
      grad_locations[2 * s] = scalar_t(0);
      grad_locations[2 * s + 1] = scalar_t(0);
      continue;
    }
    const int64_t level_offset = n * num_value * pixel_stride + starts[l] * pixel_stride +
                                 m * channels;
    const scalar_t* level_value = value + level_offset;
    acc_t* level_grad = grad_value + level_offset;
    const scalar_t* go = grad_output + (nq * num_heads + m) * channels;
    const acc_t weight = static_cast<acc_t>(weights[s]);
    acc_t grad_weight = 0, grad_h = 0, grad_w = 0;
    for (int64_t c = 0; c < channels; ++c) {
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
      const acc_t gw = weight * g;
      for (int i = 0; i < 4; ++i) {
        if (taps.offset[i] >= 0) {
          gpuAtomicAdd(level_grad + taps.offset[i] * pixel_stride + c, gw * taps.weight[i]);
        }
      }
    }
    grad_weights[s] = static_cast<scalar_t>(grad_weight);
    grad_locations[2 * s] = static_cast<scalar_t>(grad_w * weight * width);
    grad_locations[2 * s + 1] = static_cast<scalar_t>(grad_h * weight * height);
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations_in,
                                       const at::Tensor& attention_weights_in) {
  check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index, sampling_locations_in,
                              attention_weights_in);
  const c10::cuda::OptionalCUDAGuard device_guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto locations = sampling_locations_in.contiguous();
  const auto weights = attention_weights_in.contiguous();
  const int64_t batch = value.size(0), num_value = value.size(1), num_heads = value.size(2),
                channels = value.size(3);
  const int64_t num_query = locations.size(1), num_levels = locations.size(3),
                num_points = locations.size(4);
  auto output = at::empty({batch, num_query, num_heads * channels}, value.options());
  const int64_t work = output.numel();
  if (work == 0) return output;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        forward_kernel<scalar_t><<<num_blocks(work), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
            output.data_ptr<scalar_t>(), batch, num_value, num_heads, channels, num_levels,
            num_query, num_points);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in) {
  check_ms_deform_attn_inputs(value_in, spatial_shapes, level_start_index, sampling_locations_in,
                              attention_weights_in);
  const c10::cuda::OptionalCUDAGuard device_guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto locations = sampling_locations_in.contiguous();
  const auto weights = attention_weights_in.contiguous();
  const int64_t batch = value.size(0), num_value = value.size(1), num_heads = value.size(2),
                channels = value.size(3);
  const int64_t num_query = locations.size(1), num_levels = locations.size(3),
                num_points = locations.size(4);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({batch, num_query, num_heads * channels}),
              "ms_deform_attn backward: grad_output has shape ", grad_output_in.sizes(),
              ", expected (N, Lq, M*D)");
  TORCH_CHECK(grad_output_in.device() == value.device(),
              "ms_deform_attn backward: grad_output is on ", grad_output_in.device(),
              " but value is on ", value.device());
  const auto grad_output = grad_output_in.contiguous().to(value.scalar_type());
  const auto acc_dtype = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_locations = at::empty_like(locations);
  auto grad_weights = at::empty_like(weights);
  const int64_t work = weights.numel();
  if (work > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          backward_kernel<scalar_t><<<num_blocks(work), kThreads, 0, stream>>>(
              grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
              shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
              locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
              grad_value.data_ptr<at::opmath_type<scalar_t>>(),
              grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(), batch,
              num_value, num_heads, channels, num_levels, num_query, num_points);
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace detr_deform

TORCH_LIBRARY_IMPL(detr_deform, CUDA, m) {
  m.impl("ms_deform_attn_forward", &detr_deform::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &detr_deform::ms_deform_attn_backward_cuda);
}
