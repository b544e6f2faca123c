// Operator schema, input validation and the CPU registration. The CUDA
// kernels register themselves from ms_deform_attn_cuda.cu when built.
#include <torch/library.h>
#include <torch/types.h>

#include "ms_deform_attn.h"

namespace detr_deform {

void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got shape ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) holding (H, W), got shape ",
              spatial_shapes.sizes());
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", num_levels,
              " levels, got shape ", level_start_index.sizes());
  const auto& ls = sampling_locations.sizes();
  TORCH_CHECK(ls[0] == value.size(0) && ls[2] == value.size(2) && ls[3] == num_levels,
              "ms_deform_attn: sampling_locations ", ls,
              " does not match value (N, S, M, D) = ", value.sizes(), " and L = ", num_levels,
              " levels");
  TORCH_CHECK(attention_weights.sizes() == ls.slice(0, 5),
              "ms_deform_attn: attention_weights shape ", attention_weights.sizes(),
              " must equal sampling_locations shape without the last axis, ", ls.slice(0, 5));
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_attn: value must be floating point, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn: all inputs must be on one device; value is on ", device,
              ", spatial_shapes on ", spatial_shapes.device(), ", level_start_index on ",
              level_start_index.device(), ", sampling_locations on ",
              sampling_locations.device(), ", attention_weights on ",
              attention_weights.device());
  // The level layout decides every memory read, so it is checked on the host
  // (L is at most a handful of levels; on CUDA this is a tiny copy).
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "ms_deform_attn: level ", l,
                " has non-positive spatial shape (", hw[2 * l], ", ", hw[2 * l + 1], ")");
    TORCH_CHECK(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", total, " positions");
    total += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK(total == value.size(1), "ms_deform_attn: spatial_shapes sum to ", total,
              " positions (sum of H*W) but value has S = ", value.size(1));
}

}  // namespace detr_deform

TORCH_LIBRARY(detr_deform, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(detr_deform, CPU, m) {
  m.impl("ms_deform_attn_forward", &detr_deform::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &detr_deform::ms_deform_attn_backward_cpu);
}
