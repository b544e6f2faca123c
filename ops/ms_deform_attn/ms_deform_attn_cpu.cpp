// CPU kernels. Forward is parallel over (n, query); backward is parallel over
// (n, head) so that every task owns its slice value[n, :, m, :] of the value
// gradient and no atomics are needed: it is deterministic, whatever the thread
// count. The inner loops run over the D channels of a head, which are
// contiguous, so they vectorise.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <vector>

#include "bilinear.h"
#include "ms_deform_attn.h"

namespace detr_deform {
namespace {

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* output,
                    const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = d.num_heads * d.channels;
  // Taps outside a map read this row of zeros, which keeps the channel loop
  // branch-free.
  const std::vector<scalar_t> zeros(d.channels, scalar_t(0));
  const int64_t grain = std::max<int64_t>(1, 2048 / (d.num_heads * d.num_levels * d.num_points));
  at::parallel_for(0, d.batch * d.num_query, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d.channels);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / d.num_query;
      const scalar_t* value_n = value + n * d.num_value * pixel_stride;
      for (int64_t m = 0; m < d.num_heads; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t sample_base = (nq * d.num_heads + m) * d.num_levels * d.num_points;
        for (int64_t l = 0; l < d.num_levels; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const scalar_t* level_value = value_n + starts[l] * pixel_stride + m * d.channels;
          for (int64_t p = 0; p < d.num_points; ++p) {
            const int64_t s = sample_base + l * d.num_points + p;
            const auto taps = bilinear_taps<acc_t>(static_cast<acc_t>(locations[2 * s]),
                                                   static_cast<acc_t>(locations[2 * s + 1]),
                                                   height, width);
            if (!taps.inside) continue;
            const acc_t weight = static_cast<acc_t>(weights[s]);
            const scalar_t* __restrict__ t0 =
                taps.offset[0] >= 0 ? level_value + taps.offset[0] * pixel_stride : zeros.data();
            const scalar_t* __restrict__ t1 =
                taps.offset[1] >= 0 ? level_value + taps.offset[1] * pixel_stride : zeros.data();
            const scalar_t* __restrict__ t2 =
                taps.offset[2] >= 0 ? level_value + taps.offset[2] * pixel_stride : zeros.data();
            const scalar_t* __restrict__ t3 =
                taps.offset[3] >= 0 ? level_value + taps.offset[3] * pixel_stride : zeros.data();
            // Fold the attention weight into the tap weights once per sample.
            BilinearTaps<acc_t> weighted = taps;
            for (int i = 0; i < 4; ++i) weighted.weight[i] *= weight;
            acc_t* __restrict__ a = acc.data();
#pragma omp simd
            for (int64_t c = 0; c < d.channels; ++c) {
              a[c] += bilinear_value<acc_t>(weighted, t0[c], t1[c], t2[c], t3[c]);
            }
          }
        }
        scalar_t* out = output + (nq * d.num_heads + m) * d.channels;
        for (int64_t c = 0; c < d.channels; ++c) out[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                     at::opmath_type<scalar_t>* grad_value, scalar_t* grad_locations,
                     scalar_t* grad_weights, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = d.num_heads * d.channels;
  const std::vector<scalar_t> zeros(d.channels, scalar_t(0));
  at::parallel_for(0, d.batch * d.num_heads, 1, [&](int64_t begin, int64_t end) {
    // Gradients of taps outside the map land in this scratch row.
    // One scratch row per tap so the restrict-qualified rows below never alias.
    std::vector<acc_t> discard(4 * d.channels);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / d.num_heads, m = nm % d.num_heads;
      const scalar_t* value_n = value + n * d.num_value * pixel_stride;
      acc_t* grad_value_n = grad_value + n * d.num_value * pixel_stride;
      for (int64_t q = 0; q < d.num_query; ++q) {
        const int64_t nq = n * d.num_query + q;
        const scalar_t* go = grad_output + (nq * d.num_heads + m) * d.channels;
        const int64_t sample_base = (nq * d.num_heads + m) * d.num_levels * d.num_points;
        for (int64_t l = 0; l < d.num_levels; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const int64_t level_offset = starts[l] * pixel_stride + m * d.channels;
          for (int64_t p = 0; p < d.num_points; ++p) {
            const int64_t s = sample_base + l * d.num_points + p;
            const auto taps = bilinear_taps<acc_t>(static_cast<acc_t>(locations[2 * s]),
                                                   static_cast<acc_t>(locations[2 * s + 1]),
                                                   height, width);
            if (!taps.inside) {
              grad_weights[s] = scalar_t(0);
              grad_locations[2 * s] = scalar_t(0);
              grad_locations[2 * s + 1] = scalar_t(0);
              continue;
            }
            const acc_t weight = static_cast<acc_t>(weights[s]);
            const scalar_t* tap[4];
            acc_t* tap_grad_out[4];
            for (int i = 0; i < 4; ++i) {
              const bool ok = taps.offset[i] >= 0;
              tap[i] = ok ? value_n + level_offset + taps.offset[i] * pixel_stride : zeros.data();
              tap_grad_out[i] =
                  ok ? grad_value_n + level_offset + taps.offset[i] * pixel_stride
                     : discard.data() + i * d.channels;
            }
            const scalar_t* __restrict__ t0 = tap[0];
            const scalar_t* __restrict__ t1 = tap[1];
            const scalar_t* __restrict__ t2 = tap[2];
            const scalar_t* __restrict__ t3 = tap[3];
            // Taps are distinct pixels or distinct scratch rows, so these never overlap.
            acc_t* __restrict__ g0 = tap_grad_out[0];
            acc_t* __restrict__ g1 = tap_grad_out[1];
            acc_t* __restrict__ g2 = tap_grad_out[2];
            acc_t* __restrict__ g3 = tap_grad_out[3];
            const scalar_t* __restrict__ gout = go;
            const acc_t gw0 = weight * taps.weight[0], gw1 = weight * taps.weight[1],
                        gw2 = weight * taps.weight[2], gw3 = weight * taps.weight[3];
            acc_t grad_weight = 0, grad_h = 0, grad_w = 0;
#pragma omp simd reduction(+ : grad_weight, grad_h, grad_w)
            for (int64_t c = 0; c < d.channels; ++c) {
              const acc_t g = static_cast<acc_t>(gout[c]);
              const acc_t v0 = t0[c], v1 = t1[c], v2 = t2[c], v3 = t3[c];
              grad_weight += g * bilinear_value<acc_t>(taps, v0, v1, v2, v3);
              acc_t d_h, d_w;
              bilinear_coord_grad<acc_t>(taps, v0, v1, v2, v3, &d_h, &d_w);
              grad_h += g * d_h;
              grad_w += g * d_w;
              g0[c] += gw0 * g;
              g1[c] += gw1 * g;
              g2[c] += gw2 * g;
              g3[c] += gw3 * g;
            }
            grad_weights[s] = static_cast<scalar_t>(grad_weight);
            grad_locations[2 * s] = static_cast<scalar_t>(grad_w * weight * width);
            grad_locations[2 * s + 1] = static_cast<scalar_t>(grad_h * weight * height);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights,
                                      bool /*deterministic: always*/) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights);
  const Dims& d = in.dims;
  // Mixed precision (fp16/bf16 value, float32 locations and weights): the kernels read the value
  // in float anyway, and fp16/bf16 -> float is exact, so running the float kernel on the converted
  // value is the same arithmetic; the output is rounded to value's dtype once.
  const at::Tensor compute_value = in.value.to(in.sampling_locations.scalar_type());
  auto output = at::empty({d.batch, d.num_query, d.num_heads * d.channels}, compute_value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, compute_value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        forward_kernel<scalar_t>(
            compute_value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
            in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<scalar_t>(),
            in.attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), d);
      });
  return output.to(in.value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool /*deterministic: always*/) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights);
  const Dims& d = in.dims;
  // grad_output is rounded to value's dtype first (as the CUDA kernels read it), then, for mixed
  // precision, converted to float exactly, like the value (see the forward).
  const auto compute = in.sampling_locations.scalar_type();
  const auto grad_output = prepare_grad_output(grad_output_in, in).to(compute);
  const at::Tensor compute_value = in.value.to(compute);
  const auto acc_dtype = at::toOpMathType(compute);
  auto grad_value = at::zeros(in.value.sizes(), in.value.options().dtype(acc_dtype));
  auto grad_locations = at::empty_like(in.sampling_locations);
  auto grad_weights = at::empty_like(in.attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, compute, "ms_deform_attn_backward_cpu", [&] {
        backward_kernel<scalar_t>(
            grad_output.data_ptr<scalar_t>(), compute_value.data_ptr<scalar_t>(),
            in.spatial_shapes.data_ptr<int64_t>(), in.level_start_index.data_ptr<int64_t>(),
            in.sampling_locations.data_ptr<scalar_t>(), in.attention_weights.data_ptr<scalar_t>(),
            grad_value.data_ptr<at::opmath_type<scalar_t>>(), grad_locations.data_ptr<scalar_t>(),
            grad_weights.data_ptr<scalar_t>(), d);
      });
  return {grad_value.to(in.value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace detr_deform
