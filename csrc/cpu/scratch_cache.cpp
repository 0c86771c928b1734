// The CPU scratch cache (scratch_cache.h).
#include "scratch_cache.h"

#include <cstdlib>
#include <limits>
#include <mutex>
#include <vector>

namespace hot_kernels {
namespace scratch_cache {
namespace {

constexpr int64_t kDefaultLimitMB = 64;

int64_t initial_limit() {
  if (const char* env = std::getenv("HOT_KERNELS_CPU_CACHE_MB")) {
    // A malformed value is reported by the Python side (a warning when hot_kernels is imported),
    // which reads the same variable; here it leaves the default.
    int64_t mb = 0;
    const char* c = env;
    for (; *c >= '0' && *c <= '9' && mb <= (int64_t(1) << 30); ++c) mb = mb * 10 + (*c - '0');
    if (c != env && *c == '\0' && mb <= (int64_t(1) << 30)) return mb << 20;
  }
  return kDefaultLimitMB << 20;
}

struct Cache {
  std::mutex mutex;
  std::vector<at::Tensor> buffers;  // 1-D, each of one dtype; in use while its storage has other owners
  int64_t bytes = 0;
  int64_t limit = initial_limit();
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors must not be freed after libtorch at exit
  return *c;
}

bool in_use(const at::Tensor& b) { return b.storage().use_count() > 1; }

// Frees, in order, every buffer not in use for which drop(buffer) holds (checked as the cache
// shrinks); returns the bytes freed. The caller holds the mutex.
template <class Drop>
int64_t free_unused(Cache& c, const Drop& drop) {
  int64_t freed = 0;
  for (auto it = c.buffers.begin(); it != c.buffers.end();) {
    if (!in_use(*it) && drop(*it)) {
      freed += it->nbytes();
      c.bytes -= it->nbytes();
      it = c.buffers.erase(it);
    } else {
      ++it;
    }
  }
  return freed;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const auto opt = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t need = numel * static_cast<int64_t>(c10::elementSize(dtype));
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  // The smallest free buffer of this dtype that is large enough.
  at::Tensor* best = nullptr;
  for (auto& b : c.buffers)
    if (b.scalar_type() == dtype && b.numel() >= numel && !in_use(b) && (!best || b.numel() < best->numel()))
      best = &b;
  if (!best) {
    // Free buffers of this dtype too small for the request make room for it.
    free_unused(c, [&](const at::Tensor& b) { return b.scalar_type() == dtype && b.numel() < numel; });
    if (need == 0 || c.bytes + need > c.limit) return at::empty(sizes, opt);
    c.buffers.push_back(at::empty({numel}, opt));
    c.bytes += need;
    best = &c.buffers.back();
  }
  auto t = best->narrow(0, 0, numel).view(sizes);
  // As at::empty does under torch.use_deterministic_algorithms with fill_uninitialized_memory (the
  // tests' poison): a cached buffer would otherwise hold the last call's values.
  auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() && at::isFloatingType(dtype))
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype) { return empty(sizes, dtype).zero_(); }

int64_t cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes;
}

int64_t release() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return free_unused(c, [](const at::Tensor&) { return true; });
}

int64_t limit() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.limit;
}

int64_t set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "hot_kernels: the CPU cache limit must be >= 0 bytes, got ", bytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t previous = c.limit;
  c.limit = bytes;
  free_unused(c, [&](const at::Tensor&) { return c.bytes > c.limit; });  // until within the new limit
  return previous;
}

}  // namespace scratch_cache

}  // namespace hot_kernels
