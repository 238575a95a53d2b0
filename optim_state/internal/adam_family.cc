// Adam and AdamW (optimizer_family.h): PyTorch 2.13's AdamW is Adam with
// decoupled_weight_decay=True, and LibTorch's two share their options' and state's fields, so
// one description serves both.
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/optimizer_family.h"

namespace fsdp::optim_state::internal {
namespace {

// Adam's `defaults`; AdamW's differ in weight_decay and decoupled_weight_decay (which its
// __setstate__ forces to True).
std::vector<HyperSpec> AdamHyperSpecs(StateValue weight_decay, bool decoupled_weight_decay) {
  std::vector<HyperSpec> specs =
      WithPythonOnlyFlags({Number("lr", 1e-3),
                           {"betas", HyperType::kBetas, StateValue::Tuple({0.9, 0.999}), false},
                           Number("eps", 1e-8),
                           Number("weight_decay", std::move(weight_decay)),
                           Flag("amsgrad")},
                          {"maximize", "foreach", "capturable", "differentiable", "fused"});
  specs.push_back(PythonOnly("decoupled_weight_decay", decoupled_weight_decay));
  return specs;
}

template <typename Options>
HeldField AdamField(OptimizerOptions& options, const std::string& name) {
  auto& o = static_cast<Options&>(options);
  return FindField(name, "lr", &o.lr(), "betas", &o.betas(), "eps", &o.eps(), "weight_decay",
                   &o.weight_decay(), "amsgrad", &o.amsgrad());
}

template <typename State>
ParamState AdamStateValues(const OptimizerParamState& state) {
  const auto& s = static_cast<const State&>(state);
  return DefinedTensors("step", StepTensor(s.step()), "exp_avg", s.exp_avg(), "exp_avg_sq",
                        s.exp_avg_sq(), "max_exp_avg_sq", s.max_exp_avg_sq());
}

template <OptimizerKind kKind, typename Options, typename State>
absl::StatusOr<std::unique_ptr<OptimizerParamState>> LoadAdam(const ParamStateLoader& loader,
                                                              const OptimizerOptions& options,
                                                              ParamState* extras) {
  if (!loader.HasAny({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})) return nullptr;
  const std::string needs =
      absl::StrCat(OptimizerKindName(kKind),
                   " keeps 'step', 'exp_avg', 'exp_avg_sq' and, with amsgrad, "
                   "'max_exp_avg_sq'");
  FSDP_RETURN_IF_ERROR(loader.Require({"step", "exp_avg", "exp_avg_sq"}, needs));
  if (static_cast<const Options&>(options).amsgrad()) {
    FSDP_RETURN_IF_ERROR(loader.Require({"max_exp_avg_sq"}, needs));
  }
  auto state = std::make_unique<State>();
  FSDP_ASSIGN_OR_RETURN(state->step(), loader.Step());
  FSDP_RETURN_IF_ERROR(loader.TensorsInto("exp_avg", state->exp_avg(), "exp_avg_sq",
                                          state->exp_avg_sq(), "max_exp_avg_sq",
                                          state->max_exp_avg_sq()));
  return std::unique_ptr<OptimizerParamState>(std::move(state));
}

const std::vector<std::string>& AdamStateNames() {
  static const auto* names =
      new std::vector<std::string>{"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  return *names;
}

}  // namespace

const OptimizerFamily& AdamFamily() {
  using Options = torch::optim::AdamOptions;
  using State = torch::optim::AdamParamState;
  static const auto* family = new OptimizerFamily{
      .hyper_specs = AdamHyperSpecs(0, false),
      .state_names = AdamStateNames(),
      .field = &AdamField<Options>,
      .state_values = &AdamStateValues<State>,
      .load = &LoadAdam<OptimizerKind::kAdam, Options, State>,
  };
  return *family;
}

const OptimizerFamily& AdamWFamily() {
  using Options = torch::optim::AdamWOptions;
  using State = torch::optim::AdamWParamState;
  static const auto* family = new OptimizerFamily{
      .hyper_specs = AdamHyperSpecs(1e-2, true),
      .state_names = AdamStateNames(),
      .field = &AdamField<Options>,
      .state_values = &AdamStateValues<State>,
      .load = &LoadAdam<OptimizerKind::kAdamW, Options, State>,
  };
  return *family;
}

}  // namespace fsdp::optim_state::internal
