// Input validation shared by every entry point (CPU, CUDA, CUDA emulation).
//
// These are the only checks on the compiled path: the Python wrapper checks
// nothing but that the arguments are tensors. The texts are those of the
// Python checks of the reference path (detr_deform/ops/_checks.py), so a user
// sees the same message whichever implementation runs: shapes print as Python
// tuples and dtypes as torch.<name>. Metadata errors raise ValueError /
// TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE); level-layout
// errors stay RuntimeError, as they always were for direct torch.ops callers.
#include <torch/types.h>

#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"

namespace detr_deform {
namespace {

// A shape as Python prints a tuple: (2, 3), (3,), ().
std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  if (sizes.size() == 1) out << ",";
  out << ")";
  return out.str();
}

// A dtype as Python prints it: torch.float32.
std::string dtype_str(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return "torch.float64";
    case at::kFloat:
      return "torch.float32";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return std::string("torch.") + c10::toString(type);
  }
}

void check_ranks_and_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index,
                           const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ",
                    shape_str(value.sizes()));
  const auto loc = sampling_locations.sizes();
  TORCH_CHECK_VALUE(loc.size() == 6 && loc[5] == 2,
                    "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
                    shape_str(loc));
  TORCH_CHECK_VALUE(
      attention_weights.sizes() == loc.slice(0, 5), "ms_deform_attn: attention_weights shape ",
      shape_str(attention_weights.sizes()),
      " must equal sampling_locations shape without the last axis, ", shape_str(loc.slice(0, 5)));
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must be (L, 2) as (H, W), got shape ",
                    shape_str(spatial_shapes.sizes()));
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
                    "ms_deform_attn: level_start_index must be (L,) with L = ", num_levels,
                    ", got shape ", shape_str(level_start_index.sizes()));
  TORCH_CHECK_VALUE(loc[0] == value.size(0) && loc[2] == value.size(2) && loc[3] == num_levels,
                    "ms_deform_attn: sampling_locations ", shape_str(loc),
                    " does not match value (N, S, M, D) = ", shape_str(value.sizes()),
                    " and L = ", num_levels, " levels");
  // Zero heads, channels, levels or points have no meaning (and the kernels
  // divide by them); zero batch or zero queries are legitimate empty calls.
  TORCH_CHECK_VALUE(num_levels > 0,
                    "ms_deform_attn: spatial_shapes has L = 0 levels; need at least one level");
  TORCH_CHECK_VALUE(loc[4] > 0,
                    "ms_deform_attn: sampling_locations has P = 0 points per level (shape ",
                    shape_str(loc), "); need at least one point");
  TORCH_CHECK_VALUE(value.size(2) > 0, "ms_deform_attn: value has M = 0 heads (shape ",
                    shape_str(value.sizes()), "); need at least one head");
  TORCH_CHECK_VALUE(value.size(3) > 0, "ms_deform_attn: value has D = 0 channels per head (shape ",
                    shape_str(value.sizes()), "); need at least one channel");
}

void check_dtypes_and_devices(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  TORCH_CHECK_TYPE(at::isFloatingType(value.scalar_type()),
                   "ms_deform_attn: value must be floating point, got ",
                   dtype_str(value.scalar_type()));
  // Mixed precision: a float16 / bfloat16 value with float32 locations and weights (AMP).
  const auto coords = sampling_locations.scalar_type();
  const bool half_value = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(
      attention_weights.scalar_type() == coords &&
          (coords == value.scalar_type() || (half_value && coords == at::kFloat)),
      "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype "
      "(or a float16 / bfloat16 value with float32 sampling_locations and attention_weights), "
      "got ",
      dtype_str(value.scalar_type()), ", ", dtype_str(sampling_locations.scalar_type()), ", ",
      dtype_str(attention_weights.scalar_type()));
  TORCH_CHECK_TYPE(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
      dtype_str(spatial_shapes.scalar_type()), " and ", dtype_str(level_start_index.scalar_type()));
  const auto device = value.device();
  TORCH_CHECK_VALUE(
      spatial_shapes.device() == device && level_start_index.device() == device &&
          sampling_locations.device() == device && attention_weights.device() == device,
      "ms_deform_attn: all inputs must be on one device, got value on ", device,
      ", spatial_shapes on ", spatial_shapes.device(), ", level_start_index on ",
      level_start_index.device(), ", sampling_locations on ", sampling_locations.device(),
      ", attention_weights on ", attention_weights.device());
}

// The level layout decides every memory read, so it is checked on the host
// (L is at most a handful of levels; on CUDA this is a tiny copy).
void check_level_layout(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index) {
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t num_value = value.size(1);
  int64_t total = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "ms_deform_attn: level ", l,
                " has non-positive spatial shape (", hw[2 * l], ", ", hw[2 * l + 1], ")");
    TORCH_CHECK(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", total, " positions");
    // Huge shapes must not wrap around to a sum that happens to equal S.
    int64_t area = 0;
    const bool overflow = __builtin_mul_overflow(hw[2 * l], hw[2 * l + 1], &area) ||
                          __builtin_add_overflow(total, area, &total);
    TORCH_CHECK(!overflow, "ms_deform_attn: spatial_shapes sum to more than ",
                std::numeric_limits<int64_t>::max(),
                " positions (sum of H*W) but value has S = ", num_value);
  }
  TORCH_CHECK(total == num_value, "ms_deform_attn: spatial_shapes sum to ", total,
              " positions (sum of H*W) but value has S = ", num_value);
}

// On a GPU the layout check needs a device-to-host copy, i.e. a synchronisation. A model
// passes the same spatial_shapes / level_start_index tensors to every attention layer of a
// forward (and autograd to every backward), so the last layout that passed is remembered
// (per thread): one synchronisation per forward, not one per call. The memory is a weak
// reference to each tensor's storage, so a tensor freed and re-allocated at the same address
// never matches (a live weak reference keeps the storage object's address from being
// reused), plus the data pointer, the strides, the version counter (bumped by in-place
// writes) and the sizes. Always checked: inference tensors (torch.inference_mode: no
// version counter), and CPU tensors (no synchronisation involved) except in the CUDA
// emulation, which runs this memory on the CPU so that CI tests it.
struct LayoutKey {
  c10::weak_intrusive_ptr<c10::StorageImpl> shapes_storage, starts_storage;
  const void* shapes_data;
  const void* starts_data;
  std::vector<int64_t> shapes_strides, starts_strides;  // a view of other strides reads other values
  int64_t shapes_version, starts_version, levels, num_value;

  static LayoutKey of(const at::Tensor& value, const at::Tensor& shapes,
                      const at::Tensor& starts) {
    return LayoutKey{shapes.storage().getWeakStorageImpl(),
                     starts.storage().getWeakStorageImpl(),
                     shapes.data_ptr(),
                     starts.data_ptr(),
                     shapes.strides().vec(),
                     starts.strides().vec(),
                     static_cast<int64_t>(shapes._version()),
                     static_cast<int64_t>(starts._version()),
                     shapes.size(0),
                     value.size(1)};
  }
  bool same_as(const LayoutKey& o) const {
    return !shapes_storage.expired() && !starts_storage.expired() &&
           shapes_storage._unsafe_get_target() == o.shapes_storage._unsafe_get_target() &&
           starts_storage._unsafe_get_target() == o.starts_storage._unsafe_get_target() &&
           shapes_data == o.shapes_data && starts_data == o.starts_data &&
           shapes_strides == o.shapes_strides && starts_strides == o.starts_strides &&
           shapes_version == o.shapes_version && starts_version == o.starts_version &&
           levels == o.levels && num_value == o.num_value;
  }
};

void check_level_layout_once(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, LayoutMemory memory) {
  const bool remember = memory == LayoutMemory::kAlways || !spatial_shapes.is_cpu();
  // Inference tensors (torch.inference_mode) have no version counter: nothing to key on.
  if (!remember || !spatial_shapes.has_storage() || !level_start_index.has_storage() ||
      spatial_shapes.is_inference() || level_start_index.is_inference()) {
    check_level_layout(value, spatial_shapes, level_start_index);
    return;
  }
  thread_local std::optional<LayoutKey> last;
  LayoutKey key = LayoutKey::of(value, spatial_shapes, level_start_index);
  if (last && last->same_as(key)) return;
  check_level_layout(value, spatial_shapes, level_start_index);  // raises: `last` is kept
  last.emplace(std::move(key));
}

}  // namespace

void check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, LayoutMemory memory) {
  check_ranks_and_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights);
  check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights);
  check_level_layout_once(value, spatial_shapes, level_start_index, memory);
}

PreparedInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, LayoutMemory memory) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, memory);
  PreparedInputs in{value.contiguous(),
                    spatial_shapes.contiguous(),
                    level_start_index.contiguous(),
                    sampling_locations.contiguous(),
                    attention_weights.contiguous(),
                    Dims{}};
  in.dims = Dims{in.value.size(0),
                 in.value.size(1),
                 in.value.size(2),
                 in.value.size(3),
                 in.sampling_locations.size(3),
                 in.sampling_locations.size(1),
                 in.sampling_locations.size(4)};
  return in;
}

at::Tensor prepare_grad_output(const at::Tensor& grad_output, const PreparedInputs& in) {
  const Dims& d = in.dims;
  TORCH_CHECK(
      grad_output.sizes() == at::IntArrayRef({d.batch, d.num_query, d.num_heads * d.channels}),
      "ms_deform_attn backward: grad_output has shape ", grad_output.sizes(),
      ", expected (N, Lq, M*D)");
  TORCH_CHECK(grad_output.device() == in.value.device(),
              "ms_deform_attn backward: grad_output is on ", grad_output.device(),
              " but value is on ", in.value.device());
  return grad_output.contiguous().to(in.value.scalar_type());
}

}  // namespace detr_deform
