// Multi-scale deformable attention: entry points and their shared opening block.
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

#include "dims.h"

namespace detr_deform {

// The five inputs after validation, made contiguous, with their sizes.
struct PreparedInputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  Dims dims;
};

// Whether the level-layout check may skip a layout that passed just before
// (see check_level_layout_once): on a device only, or always (the CUDA
// emulation, which runs the CUDA path's host code on CPU tensors).
enum class LayoutMemory { kOnDevice, kAlways };

// The opening block of every entry point (CPU, CUDA and the CUDA emulation):
// validates the inputs (check_ms_deform_attn_inputs), makes them contiguous
// and reads the sizes.
PreparedInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights,
                              LayoutMemory memory = LayoutMemory::kOnDevice);

// Checks grad_output against the prepared inputs (shape (N, Lq, M*D), same
// device) and returns it contiguous, in value's dtype.
at::Tensor prepare_grad_output(const at::Tensor& grad_output, const PreparedInputs& inputs);

// Validates ranks, sizes (no zero heads, channels, levels or points), dtypes,
// devices and the level layout, before any kernel runs. Raises a ValueError /
// TypeError (metadata) or RuntimeError (level layout) naming the argument, with
// the same texts as the Python checks of the reference path (_checks.py).
void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 LayoutMemory memory = LayoutMemory::kOnDevice);

// `deterministic` is part of both schemas so that autograd can hand it from
// the forward call to the backward; the CPU kernels are deterministic anyway.
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, bool deterministic);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic);

}  // namespace detr_deform
