// ModuleSlot: a child module whose forward FSDP can intercept.
//
// LibTorch modules have no forward hooks, so a parent that wants a child wrappable by FSDP
// holds it in a ModuleSlot and calls it through the slot:
//
//   struct BlockImpl : torch::nn::Module {
//     BlockImpl() : inner(register_module("inner", torch::nn::Linear(5, 3))) {}
//     torch::Tensor forward(torch::Tensor x) { return inner.forward(x); }
//     fsdp::ModuleSlot inner;
//   };
//
// The child stays registered under its own name, so parameter names (FQNs) never change when
// FSDP wraps it: FSDP attaches a ForwardInterceptor to the slot instead of replacing the child.
// Without an interceptor a slot is a plain call of the child's forward. Activation
// checkpointing attaches a ForwardRunner instead, which sits inside FSDP's interceptor (as
// PyTorch's FSDP(checkpoint_wrapper(layer))).
//
// Preconditions: the child's forward returns a torch::Tensor (the type FSDP intercepts).
// Errors: an interceptor that fails (for example a collective that timed out) throws
// c10::Error from forward(): forward is the edge where LibTorch code calls us.
#ifndef FSDP_CPP_FSDP_MODULE_SLOT_H_
#define FSDP_CPP_FSDP_MODULE_SLOT_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fsdp {

// What FSDP does around a wrapped child's forward. Implemented by FSDP units.
class ForwardInterceptor {
 public:
  virtual ~ForwardInterceptor() = default;
  // Before the child's forward (FSDP: gather the full parameters). Throws c10::Error.
  virtual void PreForward() = 0;
  // After it, given the output (FSDP: free parameters, hook the output for backward).
  // Returns the output the caller sees.
  virtual torch::Tensor PostForward(torch::Tensor output) = 0;
  // The dtype the child's floating-point tensor arguments are cast to (FSDP's mixed-precision
  // input casting), or none to pass them as they are.
  virtual std::optional<at::ScalarType> ForwardInputDtype() const { return std::nullopt; }
};

// The child's forward as a function of its tensor arguments, so that it can be run again on
// other (detached) tensors: what activation checkpointing recomputes.
using TensorForward = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// How the child's forward itself is run (activation checkpointing runs it without keeping
// activations and again during backward). Sits inside the ForwardInterceptor.
class ForwardRunner {
 public:
  virtual ~ForwardRunner() = default;
  // Runs `forward` on `inputs` and returns its output. Throws c10::Error.
  virtual torch::Tensor Run(const TensorForward& forward,
                            const std::vector<torch::Tensor>& inputs) = 0;
};

class ModuleSlot {
 public:
  ModuleSlot() = default;

  template <typename ModuleType>
  ModuleSlot(torch::nn::ModuleHolder<ModuleType> holder)  // NOLINT: implicit by design
      : module_(holder.ptr()), any_(std::move(holder)) {}

  template <typename ModuleType>
  ModuleSlot(std::shared_ptr<ModuleType> module)  // NOLINT: implicit by design
      : module_(module), any_(std::move(module)) {}

  template <typename... Args>
  torch::Tensor forward(Args&&... args) {
    if (interceptor_ == nullptr) return RunChild(std::forward<Args>(args)...);
    interceptor_->PreForward();
    const std::optional<at::ScalarType> dtype = interceptor_->ForwardInputDtype();
    torch::Tensor output = dtype.has_value()
                               ? RunChild(CastFloatingTensor(std::forward<Args>(args), *dtype)...)
                               : RunChild(std::forward<Args>(args)...);
    return interceptor_->PostForward(std::move(output));
  }

  template <typename... Args>
  torch::Tensor operator()(Args&&... args) {
    return forward(std::forward<Args>(args)...);
  }

  bool is_empty() const { return module_ == nullptr; }
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }

  // The interceptor attached by FSDP, if any.
  const std::shared_ptr<ForwardInterceptor>& interceptor() const { return interceptor_; }
  void set_interceptor(std::shared_ptr<ForwardInterceptor> interceptor) {
    interceptor_ = std::move(interceptor);
  }
  // The runner attached by activation checkpointing, if any.
  const std::shared_ptr<ForwardRunner>& runner() const { return runner_; }
  void set_runner(std::shared_ptr<ForwardRunner> runner) { runner_ = std::move(runner); }

 private:
  template <typename... Args>
  torch::Tensor RunChild(Args&&... args) {
    if (runner_ == nullptr) return any_.forward<torch::Tensor>(std::forward<Args>(args)...);
    if constexpr ((std::is_same_v<std::decay_t<Args>, torch::Tensor> && ...)) {
      return runner_->Run(
          [this](const std::vector<torch::Tensor>& inputs) {
            return CallWithTensors(inputs, std::index_sequence_for<Args...>{});
          },
          {args...});
    } else {
      TORCH_CHECK(false,
                  "activation checkpointing needs a forward whose arguments are all "
                  "tensors; ",
                  module_->name(), "'s are not");
    }
  }

  // A floating-point tensor argument in `dtype` (PyTorch's `_cast_forward_inputs`); any other
  // argument as it is.
  template <typename T>
  static decltype(auto) CastFloatingTensor(T&& arg, at::ScalarType dtype) {
    if constexpr (std::is_same_v<std::decay_t<T>, torch::Tensor>) {
      const bool cast = arg.defined() && arg.is_floating_point() && arg.scalar_type() != dtype;
      return cast ? arg.to(dtype) : torch::Tensor(arg);
    } else {
      return std::forward<T>(arg);
    }
  }

  template <size_t... I>
  torch::Tensor CallWithTensors(const std::vector<torch::Tensor>& inputs,
                                std::index_sequence<I...>) {
    return any_.forward<torch::Tensor>(inputs[I]...);
  }

  std::shared_ptr<torch::nn::Module> module_;
  torch::nn::AnyModule any_;
  std::shared_ptr<ForwardInterceptor> interceptor_;
  std::shared_ptr<ForwardRunner> runner_;
};

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_MODULE_SLOT_H_
