// Build probe for the CUDA half of hot_kernels._C: a trivial kernel that proves the .cu sources
// were compiled for this machine's archs, linked into the same extension, and can launch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/empty.h>

#include "../hot_kernels.h"

namespace hot_kernels {
namespace {

__global__ void iota_kernel(int64_t* __restrict__ out, int64_t n) {
  // 64-bit index: n may exceed 2^31.
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

}  // namespace

at::Tensor cuda_iota(int64_t n) {
  TORCH_CHECK(n >= 0, "cuda_iota: n must be >= 0, got ", n);
  auto out = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= 0x7fffffff, "cuda_iota: n = ", n, " is too large for one launch");
  iota_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace hot_kernels
