// CUDA kernels: thin __global__ wrappers around the per-thread bodies of
// cuda_kernels.h, which the CPU emulation harness (cuda_emulation.cpp) runs in
// the test suite; the host side (allocation, launch configuration, the sort of
// the deterministic backward) is cuda_driver.h, shared with the harness too.
//
// Forward: one thread per V channels of an output row (n, q, m), 32- or 64-bit
// indices. Backward: lanes over channels, a group of lanes per sample
// (n, q, m, l, p), whose location and weight gradients are summed across the
// group with warp shuffles (DeviceWarp); the value gradient is either added
// with coalesced atomics into an opmath buffer (fast, not run-to-run
// deterministic) or, in deterministic mode, recorded as (key, coefficient)
// pairs that are sorted and summed by one thread per value element (see
// cuda_kernels.h, cuda_driver.h and docs/operator.md).
//
// Kernel parameters are individual __restrict__ pointers (the param structs
// are built inside the kernel), so that nvcc knows the inputs never alias the
// outputs, as in the hand-written kernels this replaces.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/cub.h>

#include "cuda_driver.h"
#include "ms_deform_attn.h"

namespace detr_deform {
namespace {

using namespace cuda_kernels;

struct DeviceAtomicAdd {
  template <typename T>
  DD_HOST_DEVICE static void add(T* address, T value) {
#if defined(__CUDA_ARCH__)
    gpuAtomicAdd(address, value);
#endif
  }
};

// The backward's Warp policy on the GPU: one object per thread. A Lanes<T> is
// the thread's own register, for_each_lane runs the phase for the thread's
// lane, and sum_groups is a butterfly of __shfl_xor_sync over aligned groups
// of `group` lanes (all 32 lanes take part: the kernel body guarantees it).
struct DeviceWarp {
  int lane = 0;

  template <typename T>
  struct Lanes {
    T value;
    DD_HOST_DEVICE T& operator[](int) { return value; }
  };
  template <typename F>
  DD_HOST_DEVICE void for_each_lane(F&& phase) {
    phase(lane);
  }
  template <typename T>
  DD_HOST_DEVICE void sum_groups(Lanes<T>& x, int group) {
#if defined(__CUDA_ARCH__)
    for (int offset = group / 2; offset > 0; offset /= 2) {
      x.value = butterfly_add(x.value, __shfl_xor_sync(0xffffffffu, x.value, offset));
    }
#endif
  }
};

template <typename index_t, int V, typename scalar_t, typename coord_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const coord_t* __restrict__ locations,
                               const coord_t* __restrict__ weights, scalar_t* __restrict__ output,
                               Dims d) {
  forward_thread(blockIdx.x, threadIdx.x, blockDim.x, gridDim.x, ForwardVariant<index_t, V>{},
                 ForwardParams<scalar_t, coord_t>{value, shapes, starts, locations, weights, output, d});
}

template <typename scalar_t, typename coord_t, typename Scatter>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const coord_t* __restrict__ locations,
                                const coord_t* __restrict__ weights,
                                coord_t* __restrict__ grad_locations,
                                coord_t* __restrict__ grad_weights, Dims d, Scatter scatter) {
  backward_thread(blockIdx.x, threadIdx.x, blockDim.x, gridDim.x, DeviceWarp{},
                  BackwardParams<scalar_t, coord_t>{grad_output, value, shapes, starts, locations,
                                                    weights, grad_locations, grad_weights, d},
                  scatter);
}

template <typename scalar_t>
__global__ void gather_kernel(const int64_t* __restrict__ sorted,
                              const at::opmath_type<scalar_t>* __restrict__ coefs,
                              const scalar_t* __restrict__ grad_output,
                              at::opmath_type<scalar_t>* __restrict__ grad_value, int64_t entries,
                              int index_bits, int64_t first_sample, int64_t channels,
                              int64_t samples_per_row, int64_t sentinel) {
  gather_thread(blockIdx.x, threadIdx.x, blockDim.x, gridDim.x,
                GatherParams<scalar_t>{sorted, coefs, grad_output, grad_value, entries, index_bits,
                                       first_sample, channels, samples_per_row, sentinel});
}

struct CudaLauncher {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  int64_t max_blocks() const { return kMaxBlocks; }
  bool wide_index() const { return false; }
  bool narrow_vectors() const { return false; }
  int64_t sort_chunk_entries() const { return kSortChunkEntries; }
  // cub's radix sort on the low end_bit bits (the keys are non-negative).
  void sort_keys(const at::Tensor& packed, at::Tensor& sorted, int64_t n, int end_bit) {
    at::cuda::cub::radix_sort_keys<int64_t>(packed.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
                                            n, /*descending=*/false, /*begin_bit=*/0, end_bit);
  }
  at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::zeros(sizes, options);
  }
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  template <typename index_t, int V, typename scalar_t, typename coord_t>
  void forward(const LaunchConfig& c, ForwardVariant<index_t, V>,
               const ForwardParams<scalar_t, coord_t>& p) {
    forward_kernel<index_t, V, scalar_t, coord_t><<<c.blocks, c.threads, 0, stream>>>(
        p.value, p.shapes, p.starts, p.locations, p.weights, p.output, p.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t, typename coord_t, typename Scatter>
  void backward(const LaunchConfig& c, const BackwardParams<scalar_t, coord_t>& p,
                const Scatter& scatter) {
    backward_kernel<scalar_t, coord_t, Scatter><<<c.blocks, c.threads, 0, stream>>>(
        p.grad_output, p.value, p.shapes, p.starts, p.locations, p.weights, p.grad_locations,
        p.grad_weights, p.d, scatter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename scalar_t>
  void gather(const LaunchConfig& c, const GatherParams<scalar_t>& g) {
    gather_kernel<scalar_t><<<c.blocks, c.threads, 0, stream>>>(
        g.sorted, g.coefs, g.grad_output, g.grad_value, g.entries, g.index_bits, g.first_sample,
        g.channels, g.samples_per_row, g.sentinel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       bool /*deterministic: always*/) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights);
  const c10::cuda::OptionalCUDAGuard device_guard(in.value.device());
  CudaLauncher launcher;
  return cuda_kernels::forward(in, launcher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights);
  const c10::cuda::OptionalCUDAGuard device_guard(in.value.device());
  const auto grad = prepare_grad_output(grad_output, in);
  CudaLauncher launcher;
  return cuda_kernels::backward<DeviceAtomicAdd>(in, grad, use_deterministic(deterministic),
                                                 launcher);
}

}  // namespace detr_deform

TORCH_LIBRARY_IMPL(detr_deform, CUDA, m) {
  m.impl("ms_deform_attn_forward", &detr_deform::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &detr_deform::ms_deform_attn_backward_cuda);
}
