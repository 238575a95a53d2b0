// Adagrad (optimizer_family.h).
#include <torch/optim/adagrad.h>

#include "comm/status_macros.h"
#include "optim_state/internal/optimizer_family.h"

namespace fsdp::optim_state::internal {
namespace {

HeldField AdagradField(OptimizerOptions& options, const std::string& name) {
  auto& o = static_cast<torch::optim::AdagradOptions&>(options);
  return FindField(name, "lr", &o.lr(), "lr_decay", &o.lr_decay(), "eps", &o.eps(), "weight_decay",
                   &o.weight_decay(), "initial_accumulator_value", &o.initial_accumulator_value());
}

ParamState AdagradStateValues(const OptimizerParamState& state) {
  const auto& s = static_cast<const torch::optim::AdagradParamState&>(state);
  return DefinedTensors("step", StepTensor(s.step()), "sum", s.sum());
}

absl::StatusOr<std::unique_ptr<OptimizerParamState>> LoadAdagrad(const ParamStateLoader& loader,
                                                                 const OptimizerOptions& options,
                                                                 ParamState* extras) {
  if (!loader.HasAny({"step", "sum"})) return nullptr;
  FSDP_RETURN_IF_ERROR(loader.Require({"step", "sum"}, "Adagrad keeps 'step' and 'sum'"));
  auto state = std::make_unique<torch::optim::AdagradParamState>();
  FSDP_ASSIGN_OR_RETURN(state->step(), loader.Step());
  FSDP_RETURN_IF_ERROR(loader.TensorsInto("sum", state->sum()));
  return std::unique_ptr<OptimizerParamState>(std::move(state));
}

}  // namespace

const OptimizerFamily& AdagradFamily() {
  static const auto* family = new OptimizerFamily{
      .hyper_specs =
          WithPythonOnlyFlags({Number("lr", 1e-2), Number("lr_decay", 0), Number("eps", 1e-10),
                               Number("weight_decay", 0), Number("initial_accumulator_value", 0)},
                              {"foreach", "maximize", "differentiable", "fused"}),
      .state_names = {"step", "sum"},
      .field = &AdagradField,
      .state_values = &AdagradStateValues,
      .load = &LoadAdagrad,
  };
  return *family;
}

}  // namespace fsdp::optim_state::internal
