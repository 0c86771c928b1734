// CPU emulation of the device primitives used by csrc/cuda/tra_kernels.cuh, for builds with
// -DTRA_EMULATE (see README.md beside this file for what is and is not emulated).
//
// A launch runs its blocks one after another, in an order given by the schedule policy, on one
// std::thread per CUDA thread of a block (the same threads for every block of the launch). A block
// runs under a cooperative scheduler: exactly one thread runs at a time, and it gives the CPU away
// only at a block barrier (tra_sync), a warp barrier (tra_syncwarp) or a warp collective
// (tra_shfl_xor, tra_mma: each lane publishes its operands in its warp's exchange buffer, waits at
// a warp barrier, then reads what it needs; the buffer has two halves used alternately, so a lane
// already at its next collective cannot overwrite what a slower lane still reads). Which runnable
// thread goes next is the policy: 0 lowest thread id first, 1 highest first, 2 random (seeded);
// blocks run in ascending, descending or shuffled order likewise. Code that is correct for every
// interleaving the CUDA execution model allows gives bitwise the same results under every policy;
// a missing barrier usually does not.
//
// Errors are C++ exceptions out of the launch (so a test fails, the process lives on):
//  * a deadlock: no thread runnable while some have not finished (a barrier not reached by every
//    thread of its block or warp, or a thread that returned before a barrier the others wait at);
//  * divergent warp collectives: lanes of one warp at different kinds of warp barrier at once
//    (e.g. some lanes in an mma, others in a shuffle), which the hardware forbids (.sync.aligned).
// Shared memory is malloc'd at exactly the launch's dynamic size (AddressSanitizer sees overflows)
// and filled with 0xFF bytes before each block, a NaN in float32, float16 and bfloat16: a read
// before a write (or of what an earlier block left) shows.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

// CUDA's 16-byte vector type (the kernels use it for 16-byte global/shared accesses).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

#define TRA_DEV inline
#define TRA_KERNEL(threads) inline void

namespace tra_emu {

// Set from the test between launches (never while a launch runs).
inline int g_policy = 0;     // 0 low id first, 1 high id first, 2 random
inline uint64_t g_seed = 1;  // policy 2
struct Stats {
  int64_t launches = 0, blocks = 0, switches = 0;
  size_t max_smem = 0;  // largest dynamic shared memory of one launch, bytes
};
inline Stats g_stats;
// The device's opt-in limit of dynamic shared memory per block, as the host code reads it (a test
// lowers it to take the kernels' compact tiles): an H100/H200's 227 KB unless set.
inline size_t g_smem_optin = 227 * 1024;

constexpr int kWarpSize = 32;
constexpr int kSlots = 6;  // words per lane in the warp exchange buffer (an mma's a[4], b[2])

enum class Kind { kSyncwarp, kShfl, kMma };
inline const char* kind_name(Kind k) {
  return k == Kind::kSyncwarp ? "__syncwarp" : k == Kind::kShfl ? "__shfl_xor_sync" : "mma.sync";
}

struct Aborted {};  // unwinds the threads of a block that failed

// A launch's state: its threads run the blocks one after another (the same std::threads for every
// block of the launch), `index` counting the blocks done.
struct Block {
  int n = 0;
  const std::vector<int64_t>* order = nullptr;  // block ids in the order they run
  size_t index = 0;                             // position in `order` of the block now running
  int64_t bid = 0;                              // = (*order)[index]
  size_t smem_bytes = 0;
  unsigned char* smem = nullptr;
  std::mutex mu;
  std::vector<std::unique_ptr<std::condition_variable>> cv;
  std::vector<int> state;  // 0 runnable, 1 blocked at a barrier, 2 finished
  int current = -1;        // the one thread allowed to run
  int policy = 0;
  std::mt19937_64 rng;
  std::vector<int> block_waiters;
  std::vector<std::vector<int>> warp_waiters;
  std::vector<Kind> warp_kind;             // kind of the warp barrier being gathered
  std::vector<std::vector<uint32_t>> xbuf;  // per warp: 2 halves x 32 lanes x kSlots words
  std::vector<int> xhalf;                   // per thread: the half its next collective uses
  bool failed = false;
  std::string error;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_tid = 0;

inline int pick_next(Block& b) {
  int first = -1, last = -1, count = 0;
  for (int i = 0; i < b.n; ++i) {
    if (b.state[i] != 0) continue;
    if (first < 0) first = i;
    last = i;
    ++count;
  }
  if (count == 0 || b.policy == 0) return first;
  if (b.policy == 1) return last;
  int k = static_cast<int>(b.rng() % static_cast<uint64_t>(count));
  for (int i = 0; i < b.n; ++i)
    if (b.state[i] == 0 && k-- == 0) return i;
  return first;
}

// With the lock held: mark the block failed and wake every thread (each then throws Aborted).
inline void fail(Block& b, const std::string& why) {
  if (!b.failed) {
    b.failed = true;
    b.error = why;
  }
  for (auto& c : b.cv) c->notify_one();
}

// With the lock held: make block `index` of the launch the running one (fresh scheduler state and
// shared memory poison) and wake its first thread; past the last block, wake every thread to exit.
inline void start_block(Block& b, size_t index) {
  b.index = index;
  if (index >= b.order->size()) {
    b.current = -1;
    for (auto& c : b.cv) c->notify_one();
    return;
  }
  ++g_stats.blocks;
  b.bid = (*b.order)[index];
  b.rng.seed(g_seed * 1000003ull + static_cast<uint64_t>(b.bid));
  if (b.smem_bytes > 0) std::memset(b.smem, 0xFF, b.smem_bytes);
  b.state.assign(b.n, 0);
  b.block_waiters.clear();
  for (auto& w : b.warp_waiters) w.clear();
  b.xhalf.assign(b.n, 0);
  b.current = pick_next(b);
  b.cv[b.current]->notify_one();
}

// Thread `me` (lock held, own state already updated) hands the CPU to the next runnable thread and,
// unless it has finished, waits for its turn again.
inline void switch_away(Block& b, std::unique_lock<std::mutex>& lk, int me) {
  const int nxt = pick_next(b);
  if (nxt < 0) {
    for (int i = 0; i < b.n; ++i) {
      if (b.state[i] != 2) {
        fail(b, "tra_emu: deadlock in block " + std::to_string(b.bid) + ": thread " + std::to_string(i) +
                    " waits at a barrier that not every thread of its block/warp reaches");
        if (b.state[me] != 2) throw Aborted{};
        return;
      }
    }
    start_block(b, b.index + 1);  // every thread has finished this block
    return;
  }
  b.current = nxt;
  if (nxt != me) {
    ++g_stats.switches;
    b.cv[nxt]->notify_one();
  }
  if (b.state[me] == 2) return;
  b.cv[me]->wait(lk, [&] { return b.current == me || b.failed; });
  if (b.failed) throw Aborted{};
}

// Block barrier (warp < 0) or a barrier of the given warp.
inline void barrier(int warp, Kind kind = Kind::kSyncwarp) {
  Block& b = *tl_block;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.failed) throw Aborted{};
  const int me = tl_tid;
  auto& waiters = warp < 0 ? b.block_waiters : b.warp_waiters[warp];
  const int expected = warp < 0 ? b.n : std::min(kWarpSize, b.n - warp * kWarpSize);
  if (warp >= 0) {
    if (waiters.empty()) {
      b.warp_kind[warp] = kind;
    } else if (b.warp_kind[warp] != kind) {
      fail(b, std::string("tra_emu: divergent warp collectives in block ") + std::to_string(b.bid) + ", warp " +
                  std::to_string(warp) + ": lane " + std::to_string(me & 31) + " is at " + kind_name(kind) +
                  " while lane " + std::to_string(waiters.front() & 31) + " is at " + kind_name(b.warp_kind[warp]));
      throw Aborted{};
    }
  }
  b.state[me] = 1;
  waiters.push_back(me);
  if (static_cast<int>(waiters.size()) == expected) {
    for (int w : waiters) b.state[w] = 0;
    waiters.clear();
  }
  switch_away(b, lk, me);
}

// Runs `fn` as `blocks` blocks of `threads` threads with `smem_bytes` of dynamic shared memory.
// Throws std::runtime_error if a block deadlocks, diverges at a warp collective or throws.
inline void launch(int64_t blocks, int threads, size_t smem_bytes, const std::function<void()>& fn) {
  ++g_stats.launches;
  g_stats.max_smem = std::max(g_stats.max_smem, smem_bytes);
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (g_policy == 1) std::reverse(order.begin(), order.end());
  if (g_policy == 2) {
    std::mt19937_64 rng(g_seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(g_stats.launches));
    std::shuffle(order.begin(), order.end(), rng);
  }
  if (blocks <= 0) return;
  Block b;
  b.n = threads;
  b.order = &order;
  b.policy = g_policy;
  b.smem_bytes = smem_bytes;
  std::unique_ptr<unsigned char, decltype(&std::free)> smem(nullptr, &std::free);
  if (smem_bytes > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 16, smem_bytes) != 0) throw std::bad_alloc();
    smem.reset(static_cast<unsigned char*>(p));
    b.smem = smem.get();
  }
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  for (int i = 0; i < threads; ++i) b.cv.emplace_back(new std::condition_variable());
  b.state.assign(threads, 2);
  b.warp_waiters.resize(warps);
  b.warp_kind.assign(warps, Kind::kSyncwarp);
  b.xbuf.assign(warps, std::vector<uint32_t>(2 * kWarpSize * kSlots, 0));
  b.xhalf.assign(threads, 0);
  auto worker = [&b, &fn](int i) {
    tl_block = &b;
    tl_tid = i;
    std::unique_lock<std::mutex> lk(b.mu);
    for (size_t k = 0;; ++k) {  // k: the block this thread runs next
      b.cv[i]->wait(lk, [&] { return b.failed || b.index >= b.order->size() || (b.index == k && b.current == i); });
      if (b.failed || b.index >= b.order->size()) return;
      lk.unlock();
      try {
        fn();
        lk.lock();
      } catch (const Aborted&) {
        lk.lock();
      } catch (const std::exception& e) {
        lk.lock();
        fail(b, std::string("tra_emu: thread ") + std::to_string(i) + " of block " + std::to_string(b.bid) +
                    " threw: " + e.what());
      }
      if (b.failed) return;
      b.state[i] = 2;
      switch_away(b, lk, i);  // finished: hands over (or starts the next block) and returns
    }
  };
  std::vector<std::thread> th;
  th.reserve(threads);
  for (int i = 0; i < threads; ++i) {
    try {
      th.emplace_back(worker, i);
    } catch (const std::system_error& e) {  // e.g. a limit on threads per process
      {
        std::unique_lock<std::mutex> lk(b.mu);
        fail(b, std::string("tra_emu: cannot start thread ") + std::to_string(i) + ": " + e.what());
      }
      for (auto& t : th) t.join();  // none has run yet: each wakes, sees the failure and exits
      throw std::runtime_error(b.error);
    }
  }
  {
    std::unique_lock<std::mutex> lk(b.mu);
    start_block(b, 0);
  }
  for (auto& t : th) t.join();
  if (b.failed) throw std::runtime_error(b.error);
}

inline uint32_t fbits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float bitsf(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// The low (hi = 0) or high 16-bit half of a register as T (bfloat16 or float16), widened.
template <typename T>
inline float decode(uint32_t word, int hi) {
  const uint16_t bits = hi ? static_cast<uint16_t>(word >> 16) : static_cast<uint16_t>(word & 0xffffu);
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  } else {
    static_assert(std::is_same<T, c10::Half>::value, "mma operands are bfloat16 or float16");
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
}

// The exchange half of the calling thread's warp for its next collective (lane j's slots at
// j * kSlots); each lane alternates halves from one collective to the next.
inline uint32_t* exchange_half(Block& b, int warp) {
  int& h = b.xhalf[tl_tid];
  uint32_t* base = b.xbuf[warp].data() + h * kWarpSize * kSlots;
  h ^= 1;
  return base;
}

}  // namespace tra_emu

// ---- the primitives tra_kernels.cuh declares for the device build ---------------------------
namespace hot_kernels {
namespace tra {

inline int min(int a, int b) { return a < b ? a : b; }
inline int tra_tid() { return tra_emu::tl_tid; }
inline int64_t tra_bid() { return tra_emu::tl_block->bid; }
inline unsigned char* tra_smem() { return tra_emu::tl_block->smem; }
inline void tra_sync() { tra_emu::barrier(-1); }
inline void tra_syncwarp() { tra_emu::barrier(tra_emu::tl_tid / tra_emu::kWarpSize); }
inline float tra_exp2(float x) { return std::exp2(x); }
inline float tra_log2(float x) { return std::log2(x); }

// __shfl_xor_sync(0xffffffff, v, mask): every lane publishes v, then reads lane ^ mask's.
inline float tra_shfl_xor(float v, int mask) {
  auto& b = *tra_emu::tl_block;
  const int warp = tra_emu::tl_tid / tra_emu::kWarpSize, lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  uint32_t* x = tra_emu::exchange_half(b, warp);
  x[lane * tra_emu::kSlots] = tra_emu::fbits(v);
  tra_emu::barrier(warp, tra_emu::Kind::kShfl);
  return tra_emu::bitsf(x[((lane ^ mask) & 31) * tra_emu::kSlots]);
}

// __floats2bfloat162_rn / __floats2half2_rn: round to nearest even, lo in the low 16 bits.
template <typename T>
inline uint32_t tra_pack2(float lo, float hi) {
  const T l(lo), h(hi);
  return static_cast<uint32_t>(l.x) | (static_cast<uint32_t>(h.x) << 16);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: c (16 x 8) += A (16 x 16) B (16 x 8), each lane
// holding its fragments in the PTX ISA layouts (lane = 4g + t):
//   A: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C: c[0..1] = C[g][2t, 2t+1], c[2..3] = C[g+8][2t, 2t+1]
// (the lower k index in the low 16 bits). Products are exact; the 16-term sum is formed in double
// and rounded once when added to c: the hardware's internal order and rounding are unspecified,
// so float results may differ from a GPU's in the last bits (the tests' tolerances allow for it).
template <typename T>
inline void tra_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto& blk = *tra_emu::tl_block;
  const int warp = tra_emu::tl_tid / tra_emu::kWarpSize, lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  uint32_t* x = tra_emu::exchange_half(blk, warp);
  uint32_t* mine = x + lane * tra_emu::kSlots;
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  tra_emu::barrier(warp, tra_emu::Kind::kMma);
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1);  // row of C
    const int n = 2 * t + (e & 1);   // column of C
    double acc = 0;
    for (int k = 0; k < 16; ++k) {
      // A[r][k]: lane 4 (r % 8) + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2.
      const uint32_t* la = &x[((r % 8) * 4 + (k % 8) / 2) * tra_emu::kSlots];
      const float av = tra_emu::decode<T>(la[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
      // B[k][n]: lane 4 n + (k % 8) / 2, register (k >= 8), half k % 2.
      const uint32_t* lb = &x[(n * 4 + (k % 8) / 2) * tra_emu::kSlots];
      const float bv = tra_emu::decode<T>(lb[4 + (k >= 8 ? 1 : 0)], k & 1);
      acc += static_cast<double>(av) * static_cast<double>(bv);
    }
    c[e] = static_cast<float>(static_cast<double>(c[e]) + acc);
  }
}

}  // namespace tra
}  // namespace hot_kernels
