// Operator schema and the CPU registration. The CUDA kernels register
// themselves from ms_deform_attn_cuda.cu when built; the input checks shared by
// all entry points are in ms_deform_attn_checks.cpp.
#include <torch/library.h>
#include <torch/types.h>

#include "ms_deform_attn.h"

// `deterministic` selects the atomic-free value gradient on CUDA (the CUDA
// backward also follows torch.use_deterministic_algorithms). The forward takes
// it only so that autograd can hand it on to the backward.
TORCH_LIBRARY(detr_deform, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool deterministic=False) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "bool deterministic=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(detr_deform, CPU, m) {
  m.impl("ms_deform_attn_forward", &detr_deform::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &detr_deform::ms_deform_attn_backward_cpu);
}
