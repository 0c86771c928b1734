// The eager path's TRA autograd node on CPU, in C++ (hot_kernels/_eager.py's token_recovering_attention
// when the backward will run, on the cpu backend).
//
// hot_kernels/_eager.py wraps every differentiable op in a Python torch.autograd.Function. For TRA at
// B = 1 that Python (Function.apply, the Python backward node, our backward glue) ran cold after the
// kernels and cost about 0.6-1.0 ms per forward+backward on a 2-core Xeon, 5-9 % of the step. This
// node runs the same kernels with the same saved tensors and the same backward formula, so its
// outputs and gradients are bitwise those of the Python path (tests/test_eager.py), and it keeps
// that path's behaviour:
//  * a backward with create_graph=True gives gradients whose own backward raises the error of
//    Python's @once_differentiable (the TRA backward has no derivative of its own);
//  * a backward that is being transformed (gradients batched by autograd.grad(is_grads_batched=True)
//    or jacobian(vectorize=True)), or that runs under a dispatch or torch-function mode, a functorch
//    transform, jit tracing or with tensor subclasses, calls the registered op
//    hot_kernels::token_recovering_attention_backward through the dispatcher, which can batch or
//    trace it;
//  * under torch.profiler the forward and backward show as hot_kernels::token_recovering_attention
//    and hot_kernels::token_recovering_attention_backward.
#include "hot_kernels.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <array>

namespace hot_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kInputs = 10;  // query, x, wq, bq, wk, bk, wv, bv, wo, bo

// Identity on the gradients of a create_graph backward, linked to grad_out: differentiating them
// again raises, as Python's @once_differentiable makes it.
struct OnceDifferentiable : public torch::autograd::Function<OnceDifferentiable> {
  static variable_list forward(AutogradContext*, at::TensorList grads, const at::Tensor&) { return grads.vec(); }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "trying to differentiate twice a function that was marked with @once_differentiable");
  }
};

// Whether the backward may call the kernels directly: a dense CPU grad_out without a Python key
// (no subclass, not batched by functorch) and nothing observing the call (the checks of
// hot_kernels/_eager.py's applies()).
bool plain_backward(const at::Tensor& g) {
  const auto keys = g.key_set();
  if (!keys.has(c10::DispatchKey::CPU) || keys.has(c10::DispatchKey::Python) ||
      keys.has(c10::DispatchKey::FuncTorchBatched) || keys.has(c10::DispatchKey::FuncTorchGradWrapper))
    return false;
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && at::impl::PythonTorchFunctionTLS::stack_len() == 0 &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !torch::jit::tracer::isTracing();
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The registered backward op through the dispatcher (boxed): its 10 gradients.
std::vector<at::Tensor> backward_op(const at::Tensor& g, const std::array<at::Tensor, kInputs>& a,
                                    const at::Tensor& lse, const at::Tensor& kv, const at::Tensor& o, int64_t heads,
                                    double scale, bool residual) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("hot_kernels::token_recovering_attention_backward", "");
  torch::jit::Stack stack;
  stack.emplace_back(g);
  for (const auto& t : a) stack.emplace_back(t.defined() ? c10::IValue(t) : c10::IValue());
  stack.emplace_back(lse);
  stack.emplace_back(kv);
  stack.emplace_back(o);
  stack.emplace_back(heads);
  stack.emplace_back(scale);
  stack.emplace_back(residual);
  stack.emplace_back(std::string("cpu"));
  op.callBoxed(&stack);
  std::vector<at::Tensor> grads;
  for (auto& v : stack) grads.push_back(v.toTensor());
  return grads;
}

// The 10 tensor inputs (query, x, wq, bq, wk, bk, wv, bv, wo, bo) from the defined ones and the bitmask
// of which are present (absent biases cannot be autograd inputs).
std::array<at::Tensor, kInputs> unpack(at::TensorList defined, int64_t present) {
  std::array<at::Tensor, kInputs> all;
  for (int i = 0, k = 0; i < kInputs; ++i)
    if (present >> i & 1) all[i] = defined[k++];
  return all;
}

struct TokenRecoveringAttention : public torch::autograd::Function<TokenRecoveringAttention> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList inputs, int64_t present, int64_t num_heads,
                            double scale, bool residual) {
    RECORD_FUNCTION("hot_kernels::token_recovering_attention", std::vector<c10::IValue>());
    const auto a = unpack(inputs, present);
    auto r = token_recovering_attention_cpu(a[0], a[1], a[2], opt(a[3]), a[4], opt(a[5]), a[6], opt(a[7]), a[8],
                                            opt(a[9]), num_heads, scale, residual, /*keep=*/true);
    variable_list saved(inputs.begin(), inputs.end());
    saved.insert(saved.end(), {r[1], r[2], r[3]});
    ctx->save_for_backward(saved);
    ctx->saved_data["present"] = present;
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["residual"] = residual;
    return r[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t present = ctx->saved_data["present"].toInt();
    const int64_t heads = ctx->saved_data["num_heads"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool residual = ctx->saved_data["residual"].toBool();
    const size_t n = saved.size() - 3;  // the defined inputs; then lse, kv, o
    const auto a = unpack(saved, present);
    const at::Tensor &lse = saved[n], &kv = saved[n + 1], &o = saved[n + 2];
    const at::Tensor& g = grad_outputs[0];
    const bool create_graph = at::GradMode::is_enabled();
    std::vector<at::Tensor> grads;
    {
      at::AutoGradMode no_grad(false);
      if (plain_backward(g)) {
        RECORD_FUNCTION("hot_kernels::token_recovering_attention_backward", std::vector<c10::IValue>());
        grads = token_recovering_attention_backward_cpu(g.contiguous(), a[0], a[1], a[2], opt(a[3]), a[4], opt(a[5]),
                                                        a[6], opt(a[7]), a[8], opt(a[9]), lse, kv, o, heads, scale,
                                                        residual);
      } else {
        grads = backward_op(g, a, lse, kv, o, heads, scale, residual);
      }
    }
    variable_list defined;  // the gradients of the defined inputs, in order
    for (int i = 0; i < kInputs; ++i)
      if (present >> i & 1) defined.push_back(grads[i]);
    if (create_graph && g.requires_grad()) defined = OnceDifferentiable::apply(at::TensorList(defined), g);
    defined.resize(n + 4);  // present, num_heads, scale, residual: no gradient
    return defined;
  }
};

}  // namespace

at::Tensor token_recovering_attention_autograd_cpu(const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
                                                   const std::optional<at::Tensor>& bq, const at::Tensor& wk,
                                                   const std::optional<at::Tensor>& bk, const at::Tensor& wv,
                                                   const std::optional<at::Tensor>& bv, const at::Tensor& wo,
                                                   const std::optional<at::Tensor>& bo, int64_t num_heads,
                                                   double scale, bool residual) {
  TORCH_CHECK(x.is_cpu(), "token_recovering_attention_autograd_cpu: CPU tensors only");
  const std::optional<at::Tensor> all[kInputs] = {query, x, wq, bq, wk, bk, wv, bv, wo, bo};
  variable_list defined;
  int64_t present = 0;
  for (int i = 0; i < kInputs; ++i)
    if (all[i].has_value() && all[i]->defined()) defined.push_back(*all[i]), present |= int64_t(1) << i;
  return TokenRecoveringAttention::apply(at::TensorList(defined), present, num_heads, scale, residual);
}

}  // namespace hot_kernels
