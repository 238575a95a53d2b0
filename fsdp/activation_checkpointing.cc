#include "fsdp/activation_checkpointing.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "absl/strings/str_cat.h"
#include "fsdp/internal/outer_backward_callback.h"

namespace fsdp {
namespace {

// Carries the forward to recompute from the autograd function's forward to its backward.
struct Recompute : torch::CustomClassHolder {
  explicit Recompute(TensorForward f) : forward(std::move(f)) {}
  TensorForward forward;
};

// Inputs: [dummy that requires grad, the child's tensor arguments...]. The dummy makes the
// output require grad even when no argument does (the child's parameters still need theirs).
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                c10::intrusive_ptr<Recompute> recompute,
                                                at::TensorList inputs) {
    ctx->saved_data["recompute"] = c10::IValue::make_capsule(recompute);
    ctx->save_for_backward(inputs.vec());
    std::vector<at::Tensor> args(inputs.begin() + 1, inputs.end());
    return {recompute->forward(args)};  // autograd is off inside a custom forward
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto recompute =
        c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data["recompute"].toCapsule());
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    std::vector<at::Tensor> args;
    for (size_t i = 1; i < saved.size(); ++i) {
      args.push_back(saved[i].detach().requires_grad_(saved[i].requires_grad()));
    }
    at::Tensor output;
    {
      at::AutoGradMode enable_grad(true);
      output = recompute->forward(args);
    }
    if (output.requires_grad()) {
      internal::NestedBackwardScope nested;
      torch::autograd::backward({output}, {grad_outputs[0]});
    }
    // One gradient per input of forward: none for the recompute closure and the dummy.
    torch::autograd::variable_list grads = {at::Tensor(), at::Tensor()};
    for (const at::Tensor& arg : args)
      grads.push_back(arg.requires_grad() ? arg.grad() : at::Tensor());
    return grads;
  }
};

class CheckpointRunner : public ForwardRunner {
 public:
  torch::Tensor Run(const TensorForward& forward,
                    const std::vector<torch::Tensor>& inputs) override {
    if (!at::GradMode::is_enabled()) return forward(inputs);
    std::vector<at::Tensor> all = {at::empty({0}).requires_grad_(true)};
    all.insert(all.end(), inputs.begin(), inputs.end());
    // Passed as a TensorList so that autograd sees each element as an input.
    return CheckpointFunction::apply(c10::make_intrusive<Recompute>(forward),
                                     at::TensorList(all))[0];
  }
};

}  // namespace

absl::Status ApplyActivationCheckpointing(ModuleSlot& slot) {
  if (slot.is_empty()) {
    return absl::InvalidArgumentError("activation checkpointing: the slot is empty");
  }
  if (slot.runner() != nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "activation checkpointing: ", slot.module()->name(), " is already checkpointed"));
  }
  slot.set_runner(std::make_shared<CheckpointRunner>());
  return absl::OkStatus();
}

}  // namespace fsdp
