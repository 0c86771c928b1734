// The instruction-set path of the CPU row kernels (tpc_common.h, HK_MULTIVERSION): the best this
// CPU supports, lowered by HOT_KERNELS_CPU_ISA (read at load) or set_cpu_isa (hot_kernels.use_cpu_isa).
#include "../hot_kernels.h"
#include "tpc_common.h"

#include <atomic>
#include <cstdlib>
#include <string>

namespace hot_kernels {
namespace tpc {
namespace cpu_isa {
namespace {

const char* const kNames[] = {"generic", "avx2", "avx512"};

int detect() {
#ifdef HK_ISA_CLONES
  __builtin_cpu_init();
  // The GCC arch levels the kernels are compiled for (x86-64-v4 needs AVX-512 F/BW/CD/DQ/VL).
  if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
  return kGeneric;
}

int parse(const std::string& name) {
  for (int l = kGeneric; l <= kAvx512; ++l)
    if (name == kNames[l]) return l;
  return -1;
}

int initial() {
  int l = detect();
  if (const char* env = std::getenv("HOT_KERNELS_CPU_ISA")) {
    const int want = parse(env);
    // An unknown name is reported by the Python side (hot_kernels.cpu_isa()), which reads the same
    // variable; here it leaves the best path in place.
    if (want >= 0 && want < l) l = want;
  }
  return l;
}

std::atomic<int>& current() {
  static std::atomic<int> level{initial()};
  return level;
}

}  // namespace

int level() { return current().load(std::memory_order_relaxed); }

}  // namespace cpu_isa
}  // namespace tpc

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> out;
  for (int l = tpc::cpu_isa::detect(); l >= 0; --l) out.push_back(tpc::cpu_isa::kNames[l]);
  return out;
}

std::string cpu_isa() { return tpc::cpu_isa::kNames[tpc::cpu_isa::level()]; }

std::string set_cpu_isa(const std::string& name) {
  const int want = tpc::cpu_isa::parse(name);
  TORCH_CHECK(want >= 0, "hot_kernels: unknown CPU instruction-set path '", name,
              "'; expected one of avx512, avx2, generic");
  TORCH_CHECK(want <= tpc::cpu_isa::detect(), "hot_kernels: this CPU cannot run the ", name,
              " path; it runs: ", tpc::cpu_isa::kNames[tpc::cpu_isa::detect()], " and below");
  return tpc::cpu_isa::kNames[tpc::cpu_isa::current().exchange(want)];
}

}  // namespace hot_kernels
