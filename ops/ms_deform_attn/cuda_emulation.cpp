// CPU emulation of the CUDA kernels, for the test suite (no GPU, no nvcc).
//
// Compiled by the host C++ compiler from the same sources the GPU build uses:
// the kernel bodies (cuda_kernels.h) and the host driver (cuda_driver.h),
// with an EmulatedLauncher in place of the CUDA one. A "launch" runs the body
// for EVERY (block, thread) pair of the launch configuration the driver
// computed (grid-stride iterations included), either in the natural order or
// in a seeded random permutation, which is what a GPU's scheduler does to the
// order of atomic adds. The backward runs warp by warp: an EmulatedWarp holds
// the 32 lanes' registers, runs each phase of the kernel body for all 32 lanes
// (in a seeded random lane order too) before the next, and performs the
// butterfly warp sums on the 32 registers exactly as the shuffles do, so the
// lanes move in lockstep from one warp sum to the next. Atomics become plain
// adds: lanes run one at a time, so each add is indivisible, as an atomic is.
//
// Differences from the GPU, on purpose:
//  - outputs that the kernels must overwrite completely (output,
//    grad_locations, grad_weights) start as NaN instead of uninitialised
//    memory, so an element no thread wrote shows up in the tests;
//  - zero-initialised buffers of 256 MiB or more are anonymous
//    mmap(MAP_NORESERVE) pages, so a test can use index ranges beyond 2^31
//    elements without the memory (untouched pages read as zero for free).
//
// Registered as torch.ops.detr_deform_emulation.* (its own library, loaded by
// detr_deform.ops.emulation); nothing here is part of the operator itself.
#include <sys/mman.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_driver.h"
#include "ms_deform_attn.h"

namespace detr_deform {
namespace emulation {
namespace {

using namespace cuda_kernels;

constexpr int64_t kMmapThresholdBytes = int64_t(256) << 20;
constexpr int64_t kTestChunkEntries = 62;  // 15 samples per chunk (60 entries): many chunks, uneven last

struct HostAtomicAdd {
  template <typename T>
  static void add(T* address, T value) {
    *address += value;
  }
};

at::Tensor huge_zeros(at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t bytes = std::max<size_t>(1, static_cast<size_t>(numel) * c10::elementSize(dtype));
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(data != MAP_FAILED, "detr_deform emulation: mmap(MAP_NORESERVE) of ", bytes,
              " bytes failed (is vm.overcommit_memory = 2 on this machine?)");
  return at::from_blob(
      data, sizes, [bytes](void* pointer) { munmap(pointer, bytes); },
      at::TensorOptions().dtype(dtype));
}

// What the last emulated call launched: kernel, blocks, threads per block, how
// many (block, thread) bodies ran, and the variant (forward: index type and
// vector width, e.g. i32v4; backward: lanes per sample, e.g. g32).
struct LaunchRecord {
  std::string kernel;
  int64_t blocks, threads, bodies;
  std::string variant;
};
std::mutex g_records_mutex;
std::vector<LaunchRecord> g_records;

void record(const char* kernel, const LaunchConfig& config, int64_t bodies,
            const std::string& variant = "-") {
  const std::lock_guard<std::mutex> lock(g_records_mutex);
  g_records.push_back({kernel, config.blocks, config.threads, bodies, variant});
}

// A seeded random permutation of 0..count-1 (identity for seed 0), drawn from
// std::mt19937_64 (fully specified by the standard, so portable).
std::vector<int64_t> permutation(int64_t count, std::mt19937_64* rng) {
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), int64_t(0));
  if (rng == nullptr) return order;
  for (int64_t i = count - 1; i > 0; --i) {
    std::swap(order[i], order[static_cast<int64_t>((*rng)() % static_cast<uint64_t>(i + 1))]);
  }
  return order;
}

// The backward's Warp policy in the emulation: one object per warp holding the
// 32 lanes' registers. A phase runs for every lane (in `order`) before the
// next phase starts; sum_groups is the shuffles' butterfly on the registers:
// at each step every lane adds its partner's value from before the step.
struct EmulatedWarp {
  std::array<int, kWarpSize> order;

  template <typename T>
  struct Lanes {
    std::array<T, kWarpSize> value{};
    T& operator[](int lane) { return value[lane]; }
  };
  template <typename F>
  void for_each_lane(F&& phase) {
    for (const int lane : order) {
#if defined(DD_TRACE_MEMORY)
      trace::set_lane(lane);
#endif
      phase(lane);
    }
#if defined(DD_TRACE_MEMORY)
    trace::flush_warp();  // a phase's accesses are the warp's memory instructions
#endif
  }
  template <typename T>
  void sum_groups(Lanes<T>& x, int group) {
    for (int offset = group / 2; offset > 0; offset /= 2) {
      const std::array<T, kWarpSize> before = x.value;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        x.value[lane] = butterfly_add(before[lane], before[lane ^ offset]);
      }
    }
  }
};

// Runs body(block, thread) for every pair of the grid; seed 0 is the natural
// order (block by block), any other seed a Fisher-Yates permutation.
// The trace's kernel index of a launch (forward 0, backward 1, gather 2).
void trace_kernel(const char* kernel) {
#if defined(DD_TRACE_MEMORY)
  const std::string name(kernel);
  trace::set_kernel(name == "forward" ? 0 : name == "backward" ? 1 : 2);
#else
  (void)kernel;
#endif
}

template <typename Body>
void run_grid(const char* kernel, const LaunchConfig& config, uint64_t seed, const Body& body,
              const std::string& variant = "-") {
  trace_kernel(kernel);
  const int64_t count = config.blocks * config.threads;
  if (seed == 0) {  // no permutation vector: grids can be large
    for (int64_t pair = 0; pair < count; ++pair) {
#if defined(DD_TRACE_MEMORY)
      trace::set_lane(static_cast<int>(pair % kWarpSize));
#endif
      body(pair / config.threads, pair % config.threads);
#if defined(DD_TRACE_MEMORY)
      if (pair % kWarpSize == kWarpSize - 1) trace::flush_warp();  // 32 consecutive threads: a warp
#endif
    }
  } else {
    std::mt19937_64 rng(seed);
    for (const int64_t pair : permutation(count, &rng)) {
      body(pair / config.threads, pair % config.threads);
    }
  }
  record(kernel, config, count, variant);
}

// Runs body(block, warp_in_block, warp) for every warp of the grid, warps and
// the lanes inside each warp in natural or seeded random order.
template <typename Body>
void run_warps(const char* kernel, const LaunchConfig& config, uint64_t seed, const Body& body,
               const std::string& variant) {
  TORCH_CHECK(config.threads % kWarpSize == 0, "emulation: blocks of whole warps only");
  trace_kernel(kernel);
  const int64_t per_block = config.threads / kWarpSize;
  const int64_t count = config.blocks * per_block;
  std::mt19937_64 rng(seed);
  std::mt19937_64* random = seed == 0 ? nullptr : &rng;
  const std::vector<int64_t> warps = random ? permutation(count, random) : std::vector<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t pair = random ? warps[i] : i;
    EmulatedWarp warp;
    const auto lanes = permutation(kWarpSize, random);
    for (int lane = 0; lane < kWarpSize; ++lane) warp.order[lane] = static_cast<int>(lanes[lane]);
    body(pair / per_block, pair % per_block, warp);
  }
  record(kernel, config, config.blocks * config.threads, variant);
}

struct EmulatedLauncher {
  uint64_t seed;
  int64_t block_cap;
  bool force_wide_index = false;
  bool force_narrow_vectors = false;
  int64_t chunk_entries = kSortChunkEntries;

  int64_t max_blocks() const { return block_cap; }
  bool wide_index() const { return force_wide_index; }
  bool narrow_vectors() const { return force_narrow_vectors; }
  int64_t sort_chunk_entries() const { return chunk_entries; }
  // The order of distinct int64 values is the same whichever sort: at::sort here.
  void sort_keys(const at::Tensor& packed, at::Tensor& sorted, int64_t n, int end_bit) {
    TORCH_CHECK(end_bit >= 1 && end_bit <= 63, "emulation: sort on ", end_bit, " bits");
    const auto keys = packed.narrow(0, 0, n);
    TORCH_CHECK(keys.ge(0).all().item<bool>() && keys.lt(int64_t(1) << end_bit).all().item<bool>(),
                "emulation: keys outside [0, 2^", end_bit,
                ") would be mis-sorted by the GPU's radix sort on ", end_bit, " bits");
    sorted.narrow(0, 0, n).copy_(std::get<0>(at::sort(keys)));
  }
  at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize()) >=
        kMmapThresholdBytes) {
      return huge_zeros(sizes, options.dtype().toScalarType());
    }
    return at::zeros(sizes, options);
  }
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize()) >=
        kMmapThresholdBytes) {
      return huge_zeros(sizes, options.dtype().toScalarType());
    }
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }

  template <typename index_t, int V, typename scalar_t, typename coord_t>
  void forward(const LaunchConfig& c, ForwardVariant<index_t, V> variant,
               const ForwardParams<scalar_t, coord_t>& p) {
    const std::string name = std::string(sizeof(index_t) == 4 ? "i32" : "i64") + "v" +
                             std::to_string(V);
    run_grid(
        "forward", c, seed,
        [&](int64_t block, int64_t thread) {
          forward_thread(block, thread, c.threads, c.blocks, variant, p);
        },
        name);
  }
  template <typename scalar_t, typename coord_t, typename Scatter>
  void backward(const LaunchConfig& c, const BackwardParams<scalar_t, coord_t>& p,
                const Scatter& scatter) {
    run_warps(
        "backward", c, seed,
        [&](int64_t block, int64_t warp_in_block, EmulatedWarp& warp) {
          backward_warps(block, warp_in_block, c.threads, c.blocks, warp, p, scatter);
        },
        "g" + std::to_string(lanes_per_sample(p.d.channels)));
  }
  template <typename scalar_t>
  void gather(const LaunchConfig& c, const GatherParams<scalar_t>& g) {
    run_grid("gather", c, seed, [&](int64_t block, int64_t thread) {
      gather_thread(block, thread, c.threads, c.blocks, g);
    });
  }
};

EmulatedLauncher make_launcher(int64_t shuffle_seed, int64_t max_blocks, bool wide_index = false,
                               bool narrow_vectors = false) {
  TORCH_CHECK_VALUE(max_blocks >= 0,
                    "detr_deform emulation: max_blocks must be >= 0 (0: the real cap), got ",
                    max_blocks);
  {
    const std::lock_guard<std::mutex> lock(g_records_mutex);
    g_records.clear();
  }
  return EmulatedLauncher{static_cast<uint64_t>(shuffle_seed),
                          max_blocks == 0 ? kMaxBlocks : max_blocks, wide_index, narrow_vectors};
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights, int64_t shuffle_seed, int64_t max_blocks,
                   bool wide_index, bool narrow_vectors) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights,
                                           LayoutMemory::kAlways);  // as the CUDA path does
  EmulatedLauncher launcher = make_launcher(shuffle_seed, max_blocks, wide_index, narrow_vectors);
  return cuda_kernels::forward(in, launcher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic, int64_t shuffle_seed,
    int64_t max_blocks, bool wide_keys) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights,
                                           LayoutMemory::kAlways);  // as the CUDA path does
  const auto grad = prepare_grad_output(grad_output, in);
  EmulatedLauncher launcher = make_launcher(shuffle_seed, max_blocks);
  // wide_keys: sort chunks of kTestChunkEntries entries, so that small inputs take the path of
  // inputs with more entries than one sort takes (many chunks, grad_value accumulated over them).
  if (wide_keys) launcher.chunk_entries = kTestChunkEntries;
  // Same selection as the CUDA entry point, global deterministic flag included.
  return cuda_kernels::backward<HostAtomicAdd>(in, grad, use_deterministic(deterministic),
                                               launcher);
}

std::vector<int64_t> launch_config_op(int64_t work, int64_t max_blocks) {
  const LaunchConfig config = launch_config(work, max_blocks == 0 ? kMaxBlocks : max_blocks);
  return {config.blocks, config.threads};
}

// The memory trace (the trace flavour only, -DDD_TRACE_MEMORY; natural thread order):
// trace_start() zeroes and enables it, trace_stop() returns sectors per kind (value reads,
// grad_value, other reads, other writes), warp-wide instructions per kind, and lane atomics.
void trace_start() {
#if defined(DD_TRACE_MEMORY)
  trace::state() = trace::State{};
  trace::state().enabled = true;
#else
  TORCH_CHECK(false, "detr_deform emulation: this build has no memory trace (build it with "
              "detr_deform.ops._build.build_and_load_emulation(trace=True))");
#endif
}

std::vector<double> trace_stop() {
  std::vector<double> out;
#if defined(DD_TRACE_MEMORY)
  trace::flush_warp();
  trace::State& s = trace::state();
  s.enabled = false;
  for (int kernel = 0; kernel < trace::kKernels; ++kernel) {  // forward, backward, gather
    for (int k = 0; k < trace::kKinds; ++k) out.push_back(s.sectors[kernel][k]);
    for (int k = 0; k < trace::kKinds; ++k) {
      out.push_back(static_cast<double>(s.instructions[kernel][k]));
    }
    out.push_back(static_cast<double>(s.atomics[kernel]));
  }
#endif
  return out;
}

int64_t sort_chunk_entries_op(bool wide_keys) {
  return wide_keys ? kTestChunkEntries : kSortChunkEntries;
}

int64_t backward_threads_op(int64_t samples, int64_t channels) {
  return backward_threads(samples, channels);
}

// "kernel blocks threads bodies variant" per launch, one launch per line.
std::string last_launches() {
  const std::lock_guard<std::mutex> lock(g_records_mutex);
  std::ostringstream out;
  for (const auto& r : g_records)
    out << r.kernel << " " << r.blocks << " " << r.threads << " " << r.bodies << " " << r.variant
        << "\n";
  return out.str();
}

at::Tensor huge_zeros_op(at::IntArrayRef sizes, at::ScalarType dtype) {
  return huge_zeros(sizes, dtype);
}

}  // namespace
}  // namespace emulation
}  // namespace detr_deform

TORCH_LIBRARY(detr_deform_emulation, m) {
  m.def(
      "forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor "
      "sampling_locations, "
      "Tensor attention_weights, int shuffle_seed=0, int max_blocks=0, bool wide_index=False, "
      "bool narrow_vectors=False) -> Tensor");
  m.def(
      "backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool deterministic=False, int "
      "shuffle_seed=0, "
      "int max_blocks=0, bool wide_keys=False) -> (Tensor, Tensor, Tensor)");
  m.def("launch_config(int work, int max_blocks=0) -> int[]",
        &detr_deform::emulation::launch_config_op);
  m.def("trace_start() -> ()", &detr_deform::emulation::trace_start);
  m.def("trace_stop() -> float[]", &detr_deform::emulation::trace_stop);
  m.def("sort_chunk_entries(bool wide_keys=False) -> int",
        &detr_deform::emulation::sort_chunk_entries_op);
  m.def("backward_threads(int samples, int channels) -> int",
        &detr_deform::emulation::backward_threads_op);
  m.def("last_launches() -> str", &detr_deform::emulation::last_launches);
  m.def("huge_zeros(int[] size, ScalarType dtype) -> Tensor",
        &detr_deform::emulation::huge_zeros_op);
}

TORCH_LIBRARY_IMPL(detr_deform_emulation, CPU, m) {
  m.impl("forward", &detr_deform::emulation::forward);
  m.impl("backward", &detr_deform::emulation::backward);
}
