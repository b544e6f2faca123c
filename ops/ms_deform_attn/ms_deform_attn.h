// Multi-scale deformable attention: kernel entry points and shared checks.
//
// Shapes (official semantics):
//   value               (N, S, M, D)      S = sum_l H_l * W_l
//   spatial_shapes      (L, 2) int64      (H_l, W_l)
//   level_start_index   (L,)   int64      offsets of each level inside S
//   sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y)
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
#pragma once

#include <torch/types.h>

#include <tuple>

namespace detr_deform {

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Validates ranks, sizes, dtypes, devices and the level layout; raises a
// c10::Error (a RuntimeError in Python) naming the offending argument.
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights);

}  // namespace detr_deform
