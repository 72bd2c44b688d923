// The instruction sets the dispatched kernels (int8, int4 and w8a8) have paths for, and which
// one runs: the best the CPU has, or the one `use_isa` forced (for tests and measurements).
// Shared by cpu_kernels.cpp and w8a8_kernels.cpp, so one setting forces both.
#pragma once

#include <atomic>

namespace fusionlm_isa {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

inline bool cpu_runs(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
#else
  return isa == Isa::kScalar;
#endif
}

inline std::atomic<int> forced_isa{-1};  // an Isa, or -1: the best the CPU runs

inline Isa active_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  for (const Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_runs(isa)) return isa;
  }
  return Isa::kScalar;
}

}  // namespace fusionlm_isa
