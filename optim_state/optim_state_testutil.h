// Shared pieces of the optimizer-state API tests: NestedModel (PyTorch's wrap, no root unit)
// or TransformerWithSharedParams under FSDP side by side with the same model unwrapped, both
// trained with Adam through OptimizerAdapters; and a canonical ordering of state dicts for
// comparisons.
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
#include "fsdp/fully_sharded_data_parallel.h"
#include "models/nested_model.h"
#include "models/transformer.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state::testing {

enum class Model { kNested, kTransformer };

struct Case {
  Model model;
  int world_size;
  bool use_orig_params = false;
};

inline std::string Describe(const Case& c) {
  return absl::StrCat(c.model == Model::kNested ? "Nested" : "Transformer",
                      "_ws", c.world_size, c.use_orig_params ? "_orig" : "");
}

inline std::unique_ptr<torch::optim::Optimizer> MakeAdam(
    std::vector<at::Tensor> params) {
  // eps 1e-3: see tests/fsdp_models_parity_test.cc (rounding-level gradients).
  return std::make_unique<torch::optim::Adam>(
      std::move(params), torch::optim::AdamOptions(0.01).eps(1e-3));
}

// The model under FSDP and, unwrapped, the same model; their losses on step
// `step`'s batch.
struct Training {
  std::shared_ptr<torch::nn::Module> reference;
  std::function<at::Tensor(int step)> reference_loss;
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::function<at::Tensor(int step)> fsdp_loss;
};

inline absl::StatusOr<Training> Build(const Case& c, comm::ProcessGroup& group) {
  auto group_ptr =
      std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
  FsdpOptions options;
  options.use_orig_params = c.use_orig_params;
  Training s;
  if (c.model == Model::kNested) {
    models::NestedModel reference;
    models::NestedModel model;
    options.nested = model->wrap_slots();
    options.wrap_root = false;
    FSDP_ASSIGN_OR_RETURN(
        s.fsdp, FullyShardedDataParallel::Wrap(model, group_ptr, options));
    s.reference = reference.ptr();
    s.reference_loss = [reference](int step) mutable {
      torch::manual_seed(100 + step);
      at::Tensor x = reference->get_input();
      return reference->get_loss(x, reference->forward(x));
    };
    s.fsdp_loss = [model, fsdp = s.fsdp.get()](int step) {
      torch::manual_seed(100 + step);
      at::Tensor x = model->get_input();
      return model->get_loss(x, fsdp->forward(x));
    };
    return s;
  }
  models::TransformerWithSharedParams reference(0, true, true);
  models::TransformerWithSharedParams model(0, true, true);
  options.nested = model->layer_slots();
  FSDP_ASSIGN_OR_RETURN(
      s.fsdp, FullyShardedDataParallel::Wrap(model, group_ptr, options));
  s.reference = reference.ptr();
  s.reference_loss = [reference](int) mutable {
    auto input = reference->get_input();
    return reference->get_loss(input,
                               reference->forward(input.first, input.second));
  };
  s.fsdp_loss = [model, fsdp = s.fsdp.get()](int) {
    auto input = model->get_input();
    return model->get_loss(input, fsdp->forward(input.first, input.second));
  };
  return s;
}

// Both models with their Adam optimizers (adapters), after training.
struct Trained {
  Training s;
  std::unique_ptr<torch::optim::Optimizer> reference_optim;
  std::unique_ptr<OptimizerAdapter> reference_adapter;
  std::unique_ptr<torch::optim::Optimizer> optim;
  std::unique_ptr<OptimizerAdapter> adapter;
};

inline absl::Status Step(Training& s, OptimizerAdapter& reference,
                  OptimizerAdapter& fsdp, int step) {
  reference.optimizer().zero_grad();
  fsdp.optimizer().zero_grad();
  s.reference_loss(step).backward();
  s.fsdp_loss(step).backward();
  FSDP_RETURN_IF_ERROR(reference.Step());
  return fsdp.Step();
}

inline absl::StatusOr<Trained> Train(const Case& c, comm::ProcessGroup& group,
                              int steps) {
  Trained t;
  FSDP_ASSIGN_OR_RETURN(t.s, Build(c, group));
  t.reference_optim = MakeAdam(
      models::NamedParametersWithoutDuplicates(*t.s.reference).values());
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter ra,
                        OptimizerAdapter::Create(*t.reference_optim));
  t.reference_adapter = std::make_unique<OptimizerAdapter>(std::move(ra));
  t.optim = MakeAdam(t.s.fsdp->parameters());
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter fa,
                        OptimizerAdapter::Create(*t.optim));
  t.adapter = std::make_unique<OptimizerAdapter>(std::move(fa));
  for (int step = 0; step < steps; ++step) {
    FSDP_RETURN_IF_ERROR(Step(t.s, *t.reference_adapter, *t.adapter, step));
  }
  return t;
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
  for (ParamGroup& g : out.param_groups)
    std::sort(g.params.begin(), g.params.end());
  return out;
}

// gtest prints parameters with it (found by argument-dependent lookup).
inline void PrintTo(const Case& c, std::ostream* os) { *os << Describe(c); }

}  // namespace fsdp::optim_state::testing

#endif  // FSDP_CPP_OPTIM_STATE_OPTIM_STATE_TESTUTIL_H_
