// Shared pieces of the optimizer-state API tests (testonly): NestedModel (PyTorch's wrap, no
// root unit) or TransformerWithSharedParams under FSDP side by side with the same model
// unwrapped, both trained with Adam (or SGD with momentum) through OptimizerAdapters; and a
// canonical ordering of state dicts for comparisons.
// Preconditions: every rank of the group calls Build / Train alike.
// Errors: Build and Train return FSDP's and OptimizerAdapter's statuses.
#ifndef FSDP_CPP_OPTIM_STATE_OPTIM_STATE_TESTUTIL_H_
#define FSDP_CPP_OPTIM_STATE_OPTIM_STATE_TESTUTIL_H_

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "comm/process_group.h"
#include "comm/status_macros.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "models/nested_model.h"
#include "models/transformer.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state::testing {

enum class Model { kNested, kTransformer };
using ::fsdp::testing::MakeOptimizer;
using ::fsdp::testing::Optim;

struct Case {
  Model model;
  int world_size;
  bool use_orig_params = false;
};

inline std::string Describe(const Case& c) {
  return absl::StrCat(c.model == Model::kNested ? "Nested" : "Transformer", "_ws", c.world_size,
                      c.use_orig_params ? "_orig" : "");
}

// What Build and Train set up: the model, its FSDP options and the optimizer.
struct TrainingSpec {
  Model model;
  bool use_orig_params = false;
  ShardingStrategy strategy = ShardingStrategy::kFullShard;
  Optim optim = Optim::kAdam;
};

inline TrainingSpec SpecOf(const Case& c) {
  return TrainingSpec{.model = c.model, .use_orig_params = c.use_orig_params};
}

inline std::unique_ptr<torch::optim::Optimizer> MakeAdam(std::vector<at::Tensor> params) {
  return MakeOptimizer(Optim::kAdam, std::move(params));
}

// The model under FSDP and, unwrapped, the same model; their losses on step
// `step`'s batch.
using Training = ::fsdp::testing::ReferenceAndFsdp;

// Copies `from`'s parameter values into `to` (the same model type).
inline void CopyParameters(const torch::nn::Module& from, torch::nn::Module& to) {
  at::NoGradGuard no_grad;
  auto source = models::NamedParametersWithoutDuplicates(from);
  for (auto& item : models::NamedParametersWithoutDuplicates(to)) {
    item.value().detach().copy_(source[item.key()]);
  }
}

// NestedModel (NestedModel.wrap: no root unit) or TransformerWithSharedParams (a
// unit per layer and the root), under FSDP over `group` and unwrapped.
// `init_from`: a model of the same type whose parameter values the FSDP model
// starts from.
inline absl::StatusOr<Training> Build(const TrainingSpec& spec, comm::ProcessGroup& group,
                                      const torch::nn::Module* init_from = nullptr) {
  auto group_ptr = ::fsdp::testing::Borrow(group);
  FsdpOptions options;
  options.sharding_strategy = spec.strategy;
  options.use_orig_params = spec.use_orig_params;
  if (spec.model == Model::kNested) {
    models::NestedModel reference;
    models::NestedModel model;
    if (init_from != nullptr) CopyParameters(*init_from, *model);
    options.nested = model->wrap_slots();
    options.wrap_root = false;
    FSDP_ASSIGN_OR_RETURN(auto fsdp, FullyShardedDataParallel::Wrap(model, group_ptr, options));
    return ::fsdp::testing::NestedModelLosses(reference, model, std::move(fsdp));
  }
  models::TransformerWithSharedParams reference(0, true, true);
  models::TransformerWithSharedParams model(0, true, true);
  if (init_from != nullptr) CopyParameters(*init_from, *model);
  options.nested = model->layer_slots();
  FSDP_ASSIGN_OR_RETURN(auto fsdp, FullyShardedDataParallel::Wrap(model, group_ptr, options));
  return ::fsdp::testing::TransformerLosses(reference, model, std::move(fsdp));
}

inline absl::StatusOr<Training> Build(const Case& c, comm::ProcessGroup& group) {
  return Build(SpecOf(c), group);
}

// Both models with their optimizers (adapters), after training.
struct Trained {
  Training s;
  std::vector<std::string> reference_fqns;  // reference optimizer's parameter IDs -> FQN
  std::unique_ptr<torch::optim::Optimizer> reference_optim;
  std::unique_ptr<OptimizerAdapter> reference_adapter;
  std::unique_ptr<torch::optim::Optimizer> optim;
  std::unique_ptr<OptimizerAdapter> adapter;
};

// One step of both models on step `step`'s batch, through their adapters.
inline absl::Status Step(Training& s, OptimizerAdapter& reference, OptimizerAdapter& fsdp,
                         int step) {
  reference.optimizer().zero_grad();
  fsdp.optimizer().zero_grad();
  s.reference_loss(step).backward();
  s.fsdp_loss(step).backward();
  FSDP_RETURN_IF_ERROR(reference.Step());
  return fsdp.Step();
}

// Build, each model's optimizer, then `steps` steps.
inline absl::StatusOr<Trained> Train(const TrainingSpec& spec, comm::ProcessGroup& group,
                                     int steps) {
  Trained t;
  FSDP_ASSIGN_OR_RETURN(t.s, Build(spec, group));
  auto named = models::NamedParametersWithoutDuplicates(*t.s.reference);
  t.reference_fqns = named.keys();
  t.reference_optim = MakeOptimizer(spec.optim, named.values());
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter ra, OptimizerAdapter::Create(*t.reference_optim));
  t.reference_adapter = std::make_unique<OptimizerAdapter>(std::move(ra));
  t.optim = MakeOptimizer(spec.optim, t.s.fsdp->parameters());
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter fa, OptimizerAdapter::Create(*t.optim));
  t.adapter = std::make_unique<OptimizerAdapter>(std::move(fa));
  for (int step = 0; step < steps; ++step) {
    FSDP_RETURN_IF_ERROR(Step(t.s, *t.reference_adapter, *t.adapter, step));
  }
  return t;
}

inline absl::StatusOr<Trained> Train(const Case& c, comm::ProcessGroup& group, int steps) {
  return Train(SpecOf(c), group, steps);
}

// `dict` with "state" sorted by key, each parameter's state names sorted and
// each group's "params" sorted: the full dict orders these as 1.13 does, the
// unwrapped optimizer as it gained state.
inline OptimStateDict Canonical(const OptimStateDict& dict) {
  OptimStateDict out;
  out.has_param_groups = dict.has_param_groups;
  std::vector<ParamKey> keys = dict.state.Keys();
  std::sort(keys.begin(), keys.end());
  for (const ParamKey& key : keys) {
    const ParamState& state = *dict.state.Find(key);
    std::vector<std::string> names = state.Keys();
    std::sort(names.begin(), names.end());
    ParamState sorted;
    for (const std::string& name : names) sorted.Set(name, *state.Find(name));
    out.state.Set(key, std::move(sorted));
  }
  out.param_groups = dict.param_groups;
  for (ParamGroup& g : out.param_groups) std::sort(g.params.begin(), g.params.end());
  return out;
}

// gtest prints parameters with it (found by argument-dependent lookup).
inline void PrintTo(const Case& c, std::ostream* os) { *os << Describe(c); }

}  // namespace fsdp::optim_state::testing

#endif  // FSDP_CPP_OPTIM_STATE_OPTIM_STATE_TESTUTIL_H_
