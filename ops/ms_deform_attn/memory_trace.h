// Global-memory access trace of the emulated kernels, for tools/kernel_report.py.
//
// The kernel bodies mark every global load, store and atomic with DD_TRACE.
// On the GPU and in the normal emulation the macro is empty; the emulation's
// "trace" flavour (compiled with -DDD_TRACE_MEMORY) records each access with
// the lane that made it. A warp-wide memory instruction is the k-th execution,
// by the lanes of one warp, of one access site (source line and sub-index,
// e.g. the tap): at the end of each warp (forward, gather: 32 consecutive
// threads; backward: each lockstep phase) the harness flushes, counting the
// distinct 32-byte sectors that each such instruction touched -- what a GPU's
// memory system transfers for it.
#pragma once

#include <cstdint>

namespace detr_deform {
namespace trace {

enum Kind : int { kValueRead = 0, kGradValue = 1, kOtherRead = 2, kOtherWrite = 3, kKinds = 4 };

}  // namespace trace
}  // namespace detr_deform

#if defined(DD_TRACE_MEMORY) && !defined(__CUDACC__)

#include <array>
#include <map>
#include <set>
#include <utility>

namespace detr_deform {
namespace trace {

constexpr int kKernels = 3;  // forward, backward, gather

struct State {
  bool enabled = false;
  int lane = 0;
  int kernel = 0;
  // (site, occurrence) -> (kind, sectors touched by the warp's lanes)
  std::map<std::pair<int64_t, int64_t>, std::pair<int, std::set<uint64_t>>> pending;
  std::array<std::map<int64_t, int64_t>, 32> occurrences;  // per lane: site -> executions so far
  std::array<std::array<double, kKinds>, kKernels> sectors{};       // per kernel and kind
  std::array<std::array<int64_t, kKinds>, kKernels> instructions{};  // warp-wide, per kernel and kind
  std::array<int64_t, kKernels> atomics{};                          // lane-level atomic operations
};

inline State& state() {
  static State s;  // the emulation runs one launch at a time, on one thread
  return s;
}

inline void set_lane(int lane) { state().lane = lane; }
inline void set_kernel(int kernel) { state().kernel = kernel; }

inline void access(int kind, int64_t site, const void* pointer, int64_t bytes, bool atomic) {
  State& s = state();
  if (!s.enabled) return;
  const int64_t occurrence = s.occurrences[s.lane][site]++;
  auto& entry = s.pending[{site, occurrence}];
  entry.first = kind;
  const auto address = reinterpret_cast<uint64_t>(pointer);
  for (uint64_t sector = address / 32; sector <= (address + bytes - 1) / 32; ++sector) {
    entry.second.insert(sector);
  }
  if (atomic) ++s.atomics[s.kernel];
}

inline void flush_warp() {
  State& s = state();
  if (!s.enabled) return;
  for (const auto& [key, entry] : s.pending) {
    s.sectors[s.kernel][entry.first] += static_cast<double>(entry.second.size());
    s.instructions[s.kernel][entry.first] += 1;
  }
  s.pending.clear();
  for (auto& lane : s.occurrences) lane.clear();
}

}  // namespace trace
}  // namespace detr_deform

#define DD_TRACE(kind, site, pointer, bytes) \
  ::detr_deform::trace::access(kind, site, pointer, bytes, false)
#define DD_TRACE_ATOMIC(kind, site, pointer, bytes) \
  ::detr_deform::trace::access(kind, site, pointer, bytes, true)

#else

#define DD_TRACE(kind, site, pointer, bytes) ((void)0)
#define DD_TRACE_ATOMIC(kind, site, pointer, bytes) ((void)0)

#endif
