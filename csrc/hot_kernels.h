// Declarations of every compiled kernel entry point of hot_kernels._C.
//
// Semantics of every op: ../shared/DESIGN.md and the docstrings of hot_kernels/reference.py (the
// oracle). Inputs reach these functions already validated by hot_kernels/_validate.py (shapes,
// dtypes, ranges, devices); the TORCH_CHECKs inside are a second line of defence that names the
// argument. Inputs may be non-contiguous: each entry point makes what it needs contiguous.
//
// Dtypes: float32 and float64 are computed in their own precision; float16/bfloat16 inputs are
// computed with float32 accumulation. Index outputs are int64.
#pragma once

#include <ATen/core/Tensor.h>  // declarations only: kept light so nvcc compiles csrc/cuda quickly

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace hot_kernels {

// ---- CPU (csrc/cpu/) -------------------------------------------------------------------------

// x (B, N, C), y (B, M, C) or none (= x, bit-symmetric, zero diagonal) -> D (B, N, M), dtype of x.
at::Tensor pairwise_distance_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y);
// grad (B, N, M), dist = forward output -> (grad_x (B, N, C), grad_y (B, M, C) or an empty tensor
// when y is none: then grad_x holds both roles of x). d|v|/dv at v = 0 is 0.
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& dist);

// x (B, N, C), token_mask (B, N) bool or none -> density (B, N) (float32 for half inputs), or the
// log-density when log is true.
at::Tensor knn_density_cpu(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& token_mask,
                           bool log);

// x (B, N, C), density (B, N) -> (delta (B, N), parent (B, N) int64).
std::tuple<at::Tensor, at::Tensor> dpc_delta_cpu(const at::Tensor& x, const at::Tensor& density,
                                                 const std::optional<at::Tensor>& token_mask);

// score (B, N), exclude (B,) int64 or none -> index (B, f) int64.
at::Tensor topf_select_cpu(const at::Tensor& score, int64_t f, bool sorted,
                           const std::optional<at::Tensor>& exclude);

// The fused TPC selection -> (index (B, f) int64, assignment (B, N) int64 or (B, 0) when not asked).
// x is (B, N, C), or (B, N, J, C): then the selection runs on the clip pooled over J (mean, in the
// compute precision), as token_pruning_cluster needs.
std::tuple<at::Tensor, at::Tensor> dpc_knn_cpu(const at::Tensor& x, int64_t f, int64_t k,
                                               const std::optional<at::Tensor>& token_mask,
                                               std::optional<int64_t> center, bool keep_center,
                                               bool sorted, bool return_assignment);

// token_pruning_cluster's gather: x (B, F, J, C), index (B, f) int64 (distinct per row), pos_embed
// (1 or B, f, C) or none -> out (B, f, J, C) = x[b, index[b, t]] (+ pos_embed[., t] over joints).
at::Tensor gather_frames_cpu(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& pos_embed);
// -> (grad_x (B, num_frames, J, C): grad scattered to the kept frames, zero elsewhere; grad_pos
// (pos_batch, f, C) = grad summed over J (and B when pos_batch == 1), or an empty tensor when
// pos_batch == 0).
std::tuple<at::Tensor, at::Tensor> gather_frames_backward_cpu(const at::Tensor& grad, const at::Tensor& index,
                                                             int64_t num_frames, int64_t pos_batch);

// Token recovering attention. query (1 or S, L, C), x (S, M, C), weights (C, C), biases (C) or none.
// Returns {out (S, L, C), lse (S, H, L) float32/float64, kv, o}: what the backward needs besides the
// inputs. With keep, kv (S*M, 2C) = [K | V] and o (S*L, C) (the attention output before the output
// projection, heads interleaved) in the compute dtype are kept so the backward need not recompute
// them; without, both are empty tensors.
std::vector<at::Tensor> token_recovering_attention_cpu(
    const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, int64_t num_heads, double scale, bool residual, bool keep);
// The forward with autograd as one C++ node (csrc/tra_autograd.cpp): out (S, L, C), differentiable in
// every tensor input; the backward is token_recovering_attention_backward_cpu on what the forward kept.
at::Tensor token_recovering_attention_autograd_cpu(
    const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
    const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bv, const at::Tensor& wo, const std::optional<at::Tensor>& bo,
    int64_t num_heads, double scale, bool residual);
// Returns {d_query (shape of query: summed over S when shared), d_x, d_wq, d_bq, d_wk, d_bk, d_wv,
// d_bv, d_wo, d_bo}; a bias gradient is an empty tensor when that bias is none. kv and o: the
// forward's kept tensors, or empty tensors (then recomputed).
std::vector<at::Tensor> token_recovering_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, const at::Tensor& lse, const at::Tensor& kv, const at::Tensor& o,
    int64_t num_heads, double scale, bool residual);

// token_recovering_interpolation (csrc/cpu/interp_merge.cpp): x (B, f, C) or (B, f, J, C) kept frames,
// index (B, f) int64 ascending -> (B, F, [J,] C): frame t linearly interpolated between the kept frames
// around it (frames before the first / after the last kept one copy it). Backward -> grad_x (B, f, ...):
// each kept frame gathers its weighted share of the output gradients (deterministic, no atomics).
at::Tensor token_recovering_interpolation_cpu(const at::Tensor& x, const at::Tensor& index, int64_t num_frames);
at::Tensor token_recovering_interpolation_backward_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t f);
// merge_tokens: x (B, N, C), assignment (B, N) int64 in [0, f), f clusters, weight (B, N) or none ->
// (out (B, f, C) = each cluster's weighted mean, 0 for a cluster whose weights sum to 0; wsum (B, f) the
// weight sums, float32 (float64 for float64 x)). Backward -> (grad_x (B, N, C), grad_weight (B, N), or
// (0, 0) when weight_grad is false).
std::tuple<at::Tensor, at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& assignment, int64_t f,
                                                    const std::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor> merge_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& assignment,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& out, const at::Tensor& wsum,
                                                             bool weight_grad);

// Instruction-set path of the CPU row kernels (csrc/cpu/cpu_isa.cpp): "avx512", "avx2" or
// "generic". cpu_isas_supported(): the paths this CPU runs, best first; set_cpu_isa returns the
// previous path and refuses a path the CPU cannot run.
std::vector<std::string> cpu_isas_supported();
std::string cpu_isa();
std::string set_cpu_isa(const std::string& name);

#ifdef HOT_KERNELS_WITH_CUDA
// ---- CUDA (csrc/cuda/) -----------------------------------------------------------------------
// Build probe: out[i] = i for i in [0, n), int64 on the current CUDA device. Proves that the
// CUDA half of the extension was compiled, linked and can launch a kernel.
at::Tensor cuda_iota(int64_t n);

// The TPC ops on CUDA tensors: same signatures and semantics as the *_cpu entry points above.
// Inputs float16, bfloat16 or float32 (float32 accumulation; float64 is refused with a message);
// no host synchronisation (CUDA-graph safe), deterministic. dpc_knn: 2 launches (3 with
// return_assignment), no B x N x N tensor; knn_density / dpc_knn need k <= 32.
at::Tensor pairwise_distance_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y);
std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& dist);
at::Tensor knn_density_cuda(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& token_mask,
                            bool log);
std::tuple<at::Tensor, at::Tensor> dpc_delta_cuda(const at::Tensor& x, const at::Tensor& density,
                                                  const std::optional<at::Tensor>& token_mask);
at::Tensor topf_select_cuda(const at::Tensor& score, int64_t f, bool sorted,
                            const std::optional<at::Tensor>& exclude);
std::tuple<at::Tensor, at::Tensor> dpc_knn_cuda(const at::Tensor& x, int64_t f, int64_t k,
                                                const std::optional<at::Tensor>& token_mask,
                                                std::optional<int64_t> center, bool keep_center,
                                                bool sorted, bool return_assignment);
at::Tensor gather_frames_cuda(const at::Tensor& x, const at::Tensor& index,
                              const std::optional<at::Tensor>& pos_embed);
std::tuple<at::Tensor, at::Tensor> gather_frames_backward_cuda(const at::Tensor& grad, const at::Tensor& index,
                                                              int64_t num_frames, int64_t pos_batch);

// Token recovering attention on CUDA tensors (csrc/cuda/token_recovering_attention.cu): same
// signatures and results as the *_cpu entry points; float16/bfloat16 (sm_80+) or float32, lse
// float32. Projections are ATen GEMMs, the attention core is fused (online softmax, lse saved,
// recomputed in backward); deterministic, no host synchronisation.
std::vector<at::Tensor> token_recovering_attention_cuda(
    const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, int64_t num_heads, double scale, bool residual);
std::vector<at::Tensor> token_recovering_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, const at::Tensor& lse, int64_t num_heads, double scale,
    bool residual);
// token_recovering_interpolation and merge_tokens on CUDA tensors (csrc/cuda/interp_merge.cu): same
// signatures and results as the *_cpu entry points; float16/bfloat16/float32, float32 accumulation,
// deterministic (gathers, no atomics), no host synchronisation.
at::Tensor token_recovering_interpolation_cuda(const at::Tensor& x, const at::Tensor& index, int64_t num_frames);
at::Tensor token_recovering_interpolation_backward_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t f);
std::tuple<at::Tensor, at::Tensor> merge_tokens_cuda(const at::Tensor& x, const at::Tensor& assignment, int64_t f,
                                                     const std::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor> merge_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& assignment,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& out, const at::Tensor& wsum,
                                                              bool weight_grad);
#endif

}  // namespace hot_kernels
