// Each reference model of PyTorch's FSDP optimizer-state tests (models/) trained under FSDP
// and, in the same process, unwrapped, as a PyTorch user checks a wrapping: per-step losses,
// gradients, the full state dict after training, and the memory each unit holds afterwards.
//
// Wrappings follow the Python tests (PyTorch 1.13 test_fsdp_optim_state.py and common_fsdp.py,
// and the later file for the small models):
//   Nested            NestedModel.wrap: six nested units, no root unit (block0 and `bias` stay
//                     local, unmanaged parameters)
//   NestedAlt         NestedModel.wrap_alt: block0.bias_module0 and block0, no root unit
//   NestedIgnored     NestedModel.wrap(ignore_modules=True): block2[2].bias_module0 ignored
//   NestedUnmanagedInUnit / NestedUnmanagedAtRoot
//                     wrap_with_unmanaged_params: an extra [5, 5] parameter that forward never
//                     uses, on block2[2] (inside a unit) or on the root (outside every unit)
//   Transformer       TransformerWithSharedParams, RECURSIVE: one unit per layer plus the root;
//                     embed_tokens.weight is output_proj.weight
//   UnusedFirstLayer  lin1, lin2 and the root; forward never calls lin1
//   DummyNoGrad       TestDummyModel(no_grad=True), root only; with use_orig_params the frozen
//                     layer's requires_grad is toggled every step as test_no_grad does
//   Simple            SimpleModel, root only
// Every rank sees the same batch, so FSDP's averaged gradients equal the unwrapped model's.
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "comm/status_macros.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "models/simple_models.h"
#include "models/transformer.h"

namespace fsdp {
namespace {

using ::fsdp::testing::RunInRanks;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

constexpr int kSteps = 4;

enum class Model {
  kNested,
  kNestedAlt,
  kNestedIgnored,
  kNestedUnmanagedInUnit,
  kNestedUnmanagedAtRoot,
  kTransformer,
  kUnusedFirstLayer,
  kDummyNoGrad,
  kSimple,
};

std::string ModelName(Model model) {
  switch (model) {
    case Model::kNested:
      return "Nested";
    case Model::kNestedAlt:
      return "NestedAlt";
    case Model::kNestedIgnored:
      return "NestedIgnored";
    case Model::kNestedUnmanagedInUnit:
      return "NestedUnmanagedInUnit";
    case Model::kNestedUnmanagedAtRoot:
      return "NestedUnmanagedAtRoot";
    case Model::kTransformer:
      return "Transformer";
    case Model::kUnusedFirstLayer:
      return "UnusedFirstLayer";
    case Model::kDummyNoGrad:
      return "DummyNoGrad";
    case Model::kSimple:
      return "Simple";
  }
  return "?";
}

using ::fsdp::testing::MakeOptimizer;
using ::fsdp::testing::Optim;

struct Case {
  Model model;
  int world_size;
  ShardingStrategy strategy;
  bool use_orig_params;
  Optim optim;
};

std::string Describe(const Case& c) {
  return absl::StrCat(
      ModelName(c.model), "_ws", c.world_size, "_", std::string(ShardingStrategyName(c.strategy)),
      c.use_orig_params ? "_orig" : "", c.optim == Optim::kAdam ? "_Adam" : "_SgdMomentum");
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return Describe(info.param); }

void PrintTo(const Case& c, std::ostream* os) { *os << Describe(c); }

// Python's optimizer.zero_grad(set_to_none=True) (LibTorch 1.13's zero_grad only zeroes).
void SetGradsToNone(torch::optim::Optimizer& optim) {
  for (auto& group : optim.param_groups()) {
    for (auto& p : group.params()) p.mutable_grad() = at::Tensor();
  }
}

// One model trained unwrapped (`reference`) and the same model under FSDP, with what some
// models need besides.
struct Training : ::fsdp::testing::ReferenceAndFsdp {
  std::function<void(int step)> before_step;  // on both models; may be empty
  // Clear gradients to none between steps instead of zeroing them (see DummyNoGrad).
  bool grads_to_none = false;
};

FsdpOptions BaseOptions(const Case& c) {
  FsdpOptions options;
  options.sharding_strategy = c.strategy;
  options.use_orig_params = c.use_orig_params;
  return options;
}

absl::StatusOr<Training> BuildNested(const Case& c, std::shared_ptr<comm::ProcessGroup> group) {
  auto make = [&c] {
    models::NestedModel model;
    torch::manual_seed(1);  // add_unmanaged_param draws from the current generator state
    if (c.model == Model::kNestedUnmanagedInUnit) model->add_unmanaged_param(true);
    if (c.model == Model::kNestedUnmanagedAtRoot) model->add_unmanaged_param(false);
    return model;
  };
  models::NestedModel reference = make();
  models::NestedModel model = make();
  FsdpOptions options = BaseOptions(c);
  options.nested = c.model == Model::kNestedAlt ? model->wrap_alt_slots() : model->wrap_slots();
  options.wrap_root = false;  // neither wrap nor wrap_alt wraps the root
  if (c.model == Model::kNestedIgnored) options.ignored_modules = {model->ignored_module()};
  FSDP_ASSIGN_OR_RETURN(auto fsdp, FullyShardedDataParallel::Wrap(model, group, options));
  return Training{::fsdp::testing::NestedModelLosses(reference, model, std::move(fsdp))};
}

absl::StatusOr<Training> BuildTransformer(const Case& c,
                                          std::shared_ptr<comm::ProcessGroup> group) {
  models::TransformerWithSharedParams reference(/*rank=*/0, /*add_bn=*/true,
                                                /*deterministic=*/true);
  models::TransformerWithSharedParams model(/*rank=*/0, /*add_bn=*/true, /*deterministic=*/true);
  FsdpOptions options = BaseOptions(c);
  options.nested = model->layer_slots();
  FSDP_ASSIGN_OR_RETURN(auto fsdp, FullyShardedDataParallel::Wrap(model, group, options));
  return Training{::fsdp::testing::TransformerLosses(reference, model, std::move(fsdp))};
}

absl::StatusOr<Training> BuildUnusedFirstLayer(const Case& c,
                                               std::shared_ptr<comm::ProcessGroup> group) {
  torch::manual_seed(0);
  models::UnusedFirstLayerModel reference;
  torch::manual_seed(0);
  models::UnusedFirstLayerModel model;
  FsdpOptions options = BaseOptions(c);
  options.nested = {&model->lin1, &model->lin2};
  Training s;
  FSDP_ASSIGN_OR_RETURN(s.fsdp, FullyShardedDataParallel::Wrap(model, group, options));
  s.reference = reference.ptr();
  s.reference_loss = [reference](int step) mutable {
    torch::manual_seed(100 + step);
    return reference->forward(torch::randn({8, 5})).sum();
  };
  s.fsdp_loss = [fsdp = s.fsdp.get()](int step) {
    torch::manual_seed(100 + step);
    return fsdp->forward(torch::randn({8, 5})).sum();
  };
  return s;
}

absl::StatusOr<Training> BuildDummyNoGrad(const Case& c,
                                          std::shared_ptr<comm::ProcessGroup> group) {
  models::TestDummyModel reference(/*no_grad=*/true);
  models::TestDummyModel model(/*no_grad=*/true);
  Training s;
  FSDP_ASSIGN_OR_RETURN(s.fsdp, FullyShardedDataParallel::Wrap(model, group, BaseOptions(c)));
  s.reference = reference.ptr();
  s.reference_loss = [reference](int step) mutable {
    torch::manual_seed(100 + step);
    return reference->forward(reference->get_input()).sum();
  };
  s.fsdp_loss = [model, fsdp = s.fsdp.get()](int step) {
    torch::manual_seed(100 + step);
    return fsdp->forward(model->get_input()).sum();
  };
  if (c.use_orig_params) {
    // test_no_grad: net1[0] trains on odd steps only. Without use_orig_params a flat parameter
    // has one requires_grad, so the layer stays frozen throughout.
    s.before_step = [reference, model](int step) mutable {
      for (auto* m : {&reference, &model}) {
        auto first = (*m)->net1->child_as<torch::nn::LinearImpl>(0);
        first->weight.set_requires_grad(step % 2 == 1);
        first->bias.set_requires_grad(step % 2 == 1);
      }
    };
    // A frozen parameter's old gradient would otherwise stay (zeroed) in the unwrapped model
    // and keep Adam moving it, while FSDP, as PyTorch's, gives a frozen parameter none.
    s.grads_to_none = true;
  }
  return s;
}

absl::StatusOr<Training> BuildSimple(const Case& c, std::shared_ptr<comm::ProcessGroup> group) {
  models::SimpleModel reference;
  models::SimpleModel model;
  Training s;
  FSDP_ASSIGN_OR_RETURN(s.fsdp, FullyShardedDataParallel::Wrap(model, group, BaseOptions(c)));
  s.reference = reference.ptr();
  s.reference_loss = [reference](int step) mutable {
    torch::manual_seed(100 + step);
    return reference->forward(torch::rand({3, 2})).sum();
  };
  s.fsdp_loss = [fsdp = s.fsdp.get()](int step) {
    torch::manual_seed(100 + step);
    return fsdp->forward(torch::rand({3, 2})).sum();
  };
  return s;
}

absl::StatusOr<Training> Build(const Case& c, comm::ProcessGroup& group) {
  auto group_ptr = std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
  switch (c.model) {
    case Model::kNested:
    case Model::kNestedAlt:
    case Model::kNestedIgnored:
    case Model::kNestedUnmanagedInUnit:
    case Model::kNestedUnmanagedAtRoot:
      return BuildNested(c, group_ptr);
    case Model::kTransformer:
      return BuildTransformer(c, group_ptr);
    case Model::kUnusedFirstLayer:
      return BuildUnusedFirstLayer(c, group_ptr);
    case Model::kDummyNoGrad:
      return BuildDummyNoGrad(c, group_ptr);
    case Model::kSimple:
      return BuildSimple(c, group_ptr);
  }
  return absl::InvalidArgumentError("unknown model");
}

// Every name under which LibTorch reports a parameter (a tied one under each name).
std::map<std::string, at::Tensor> NamedParameters(const torch::nn::Module& module) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : module.named_parameters()) out[p.key()] = p.value();
  return out;
}

// PyTorch's state_dict(): each module's parameters, then its buffers, then its children's.
std::vector<std::pair<std::string, at::Tensor>> StateDict(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& m : module.named_modules()) {
    const std::string prefix = m.key().empty() ? "" : m.key() + ".";
    for (const auto& p : m.value()->named_parameters(/*recurse=*/false)) {
      out.emplace_back(prefix + p.key(), p.value());
    }
    for (const auto& b : m.value()->named_buffers(/*recurse=*/false)) {
      out.emplace_back(prefix + b.key(), b.value());
    }
  }
  return out;
}

bool Close(const at::Tensor& actual, const at::Tensor& expected) {
  return actual.sizes() == expected.sizes() && at::allclose(actual, expected, 1e-4, 1e-5);
}

// After backward: each unit's gradient is this rank's part of the unwrapped model's (none
// where the unwrapped model has none), and unmanaged parameters carry the unwrapped gradient.
void ExpectGradientsMatch(const FullyShardedDataParallel& fsdp,
                          const std::map<std::string, at::Tensor>& reference, int step) {
  for (const auto& unit : fsdp.units()) {
    const FlatParamHandle* h = unit.handle;
    if (h == nullptr) continue;
    if (!h->use_orig_params()) {
      bool any_grad = false;
      at::Tensor padded = at::zeros({h->padded_numel()});
      for (const FlatParamInfo& info : h->infos()) {
        const at::Tensor& grad = reference.at(info.fqns[0]).grad();
        if (!grad.defined()) continue;
        any_grad = true;
        padded.narrow(0, info.offset, info.numel).copy_(grad.reshape({-1}));
      }
      const at::Tensor& flat_grad = h->flat_param().grad();
      EXPECT_EQ(flat_grad.defined(), any_grad)
          << "unit '" << unit.module_prefix << "' step " << step;
      if (!flat_grad.defined() || !any_grad) continue;
      at::Tensor expected = padded.narrow(0, h->rank() * h->shard_numel(), h->shard_numel());
      EXPECT_TRUE(Close(flat_grad, expected))
          << "unit '" << unit.module_prefix << "' step " << step;
      continue;
    }
    // As in PyTorch (FlatParamHandle._use_sharded_grad_views): once any parameter of a unit
    // has a gradient, each one that requires a gradient and has elements in this rank's shard
    // gets its slice, zeros for one that took no part in the forward; the others get none.
    bool unit_has_grad = false;
    for (const FlatParamInfo& info : h->infos()) {
      unit_has_grad |= reference.at(info.fqns[0]).grad().defined();
    }
    for (size_t i = 0; i < h->params().size(); ++i) {
      const std::string& fqn = h->infos()[i].fqns[0];
      const at::Tensor& grad = h->params()[i].grad();
      const at::Tensor& ref_grad = reference.at(fqn).grad();
      const ParamShard local = h->ShardOf(i, h->rank());
      const bool expect_grad = unit_has_grad && h->params()[i].requires_grad() && local.numel > 0;
      EXPECT_EQ(grad.defined(), expect_grad) << fqn << " step " << step;
      if (!grad.defined() || !expect_grad) continue;
      at::Tensor expected = ref_grad.defined()
                                ? ref_grad.reshape({-1}).narrow(0, local.param_offset, local.numel)
                                : at::zeros({local.numel});
      EXPECT_TRUE(Close(grad.reshape({-1}), expected)) << fqn << " step " << step;
    }
  }
  for (const auto& [fqn, param] : fsdp.unmanaged_parameters()) {
    const at::Tensor& ref_grad = reference.at(fqn).grad();
    EXPECT_EQ(param.grad().defined(), ref_grad.defined()) << fqn << " step " << step;
    if (param.grad().defined() && ref_grad.defined()) {
      EXPECT_TRUE(Close(param.grad(), ref_grad)) << fqn << " step " << step;
    }
  }
}

// Between steps a sharded unit holds its shard only: no full buffer, a shard-sized flat
// parameter, and original parameters that are empty (or their slice of the shard).
void ExpectUnitsHoldOnlyTheirShard(const FullyShardedDataParallel& fsdp, int step) {
  for (const auto& unit : fsdp.units()) {
    const FlatParamHandle* h = unit.handle;
    if (h == nullptr) continue;
    if (!h->sharded()) {
      EXPECT_EQ(h->flat_param().numel(), h->numel()) << unit.module_prefix;
      continue;
    }
    EXPECT_FALSE(h->is_unsharded()) << "unit '" << unit.module_prefix << "' step " << step;
    EXPECT_EQ(h->full_buffer_bytes(), 0) << "unit '" << unit.module_prefix << "' step " << step;
    EXPECT_EQ(h->flat_param().numel(), h->shard_numel())
        << "unit '" << unit.module_prefix << "' step " << step;
    for (size_t i = 0; i < h->params().size(); ++i) {
      const int64_t expected = h->use_orig_params() ? h->ShardOf(i, h->rank()).numel : 0;
      EXPECT_EQ(h->params()[i].numel(), expected) << h->infos()[i].fqns[0] << " step " << step;
    }
  }
}

class FsdpModelsParityTest : public ::testing::TestWithParam<Case> {};

TEST_P(FsdpModelsParityTest, TrainsLikeTheUnwrappedModel) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Training s, Build(c, group));
    FullyShardedDataParallel& fsdp = *s.fsdp;

    // Each tensor once: LibTorch's parameters() lists a tied weight twice, and an optimizer
    // given it twice would step it twice.
    std::vector<at::Tensor> ref_params =
        models::NamedParametersWithoutDuplicates(*s.reference).values();
    std::vector<at::Tensor> fsdp_params = fsdp.parameters();
    std::unordered_set<const c10::TensorImpl*> distinct;
    for (const at::Tensor& p : fsdp_params) distinct.insert(p.unsafeGetTensorImpl());
    EXPECT_EQ(distinct.size(), fsdp_params.size()) << "FSDP parameters() lists a tensor twice";
    auto ref_optim = MakeOptimizer(c.optim, ref_params);
    auto optim = MakeOptimizer(c.optim, fsdp_params);
    const std::map<std::string, at::Tensor> reference = NamedParameters(*s.reference);

    for (int step = 0; step < kSteps; ++step) {
      if (s.before_step) s.before_step(step);
      if (s.grads_to_none) {
        SetGradsToNone(*ref_optim);
        SetGradsToNone(*optim);
      } else {
        ref_optim->zero_grad();
        optim->zero_grad();
      }
      at::Tensor ref_loss = s.reference_loss(step);
      at::Tensor loss = s.fsdp_loss(step);
      const double expected = ref_loss.item<double>();
      EXPECT_NEAR(loss.item<double>(), expected, 1e-5 * std::abs(expected)) << "step " << step;
      ref_loss.backward();
      loss.backward();
      ExpectGradientsMatch(fsdp, reference, step);
      ref_optim->step();
      optim->step();
      ExpectUnitsHoldOnlyTheirShard(fsdp, step);
    }

    FSDP_ASSERT_OK_AND_ASSIGN(auto state, fsdp::FullStateDict(fsdp));
    const auto expected_state = StateDict(*s.reference);
    std::vector<std::string> names, expected_names;
    for (const auto& entry : state) names.push_back(entry.first);
    for (const auto& entry : expected_state) expected_names.push_back(entry.first);
    ASSERT_THAT(names, ElementsAreArray(expected_names));
    for (size_t i = 0; i < state.size(); ++i) {
      const at::Tensor& actual = state[i].second;
      const at::Tensor& want = expected_state[i].second;
      ASSERT_EQ(actual.sizes(), want.sizes()) << state[i].first;
      ASSERT_EQ(actual.scalar_type(), want.scalar_type()) << state[i].first;
      // atol 1e-5: a thousandth of one step's update (lr 0.01), above what the attention key
      // biases' rounding-level gradients move (see MakeOptimizer).
      EXPECT_TRUE(at::allclose(actual, want, 1e-5, 1e-5))
          << state[i].first << ": max |difference| " << (actual - want).abs().max().item<double>();
    }
  });
}

constexpr ShardingStrategy kFull = ShardingStrategy::kFullShard;
constexpr ShardingStrategy kGradOp = ShardingStrategy::kShardGradOp;
constexpr ShardingStrategy kNone = ShardingStrategy::kNoShard;
constexpr Optim kAdam = Optim::kAdam;
constexpr Optim kSgd = Optim::kSgdMomentum;

// The full grid: every model (and wrapping) at world sizes 1 to 4, each strategy, with and
// without use_orig_params. The optimizer alternates between Adam and SGD with momentum so that
// each model meets both at every world size.
std::vector<Case> FullGrid(std::initializer_list<Model> models) {
  std::vector<Case> cases;
  for (Model model : models) {
    for (int world_size = 1; world_size <= 4; ++world_size) {
      for (ShardingStrategy strategy : {kFull, kGradOp, kNone}) {
        for (bool use_orig_params : {false, true}) {
          const Optim optim = (cases.size() % 2 == 0) ? kAdam : kSgd;
          cases.push_back(Case{model, world_size, strategy, use_orig_params, optim});
        }
      }
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(
    NestedModel, FsdpModelsParityTest,
    ::testing::ValuesIn(FullGrid({Model::kNested, Model::kNestedAlt, Model::kNestedIgnored,
                                  Model::kNestedUnmanagedInUnit, Model::kNestedUnmanagedAtRoot})),
    CaseName);

INSTANTIATE_TEST_SUITE_P(Transformer, FsdpModelsParityTest,
                         ::testing::ValuesIn(FullGrid({Model::kTransformer})), CaseName);

INSTANTIATE_TEST_SUITE_P(SmallModels, FsdpModelsParityTest,
                         ::testing::ValuesIn(FullGrid({Model::kUnusedFirstLayer,
                                                       Model::kDummyNoGrad, Model::kSimple})),
                         CaseName);

TEST(FsdpTransformerWithSharedParams, FlattensTheTiedWeightOnceUnderBothNames) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    models::TransformerWithSharedParams model;
    auto group_ptr = std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
    FsdpOptions options;
    options.nested = model->layer_slots();
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(model, group_ptr, options));
    int found = 0;
    for (const auto& unit : fsdp->units()) {
      ASSERT_NE(unit.handle, nullptr) << unit.module_prefix;
      for (const FlatParamInfo& info : unit.handle->infos()) {
        const bool tied =
            std::find(info.fqns.begin(), info.fqns.end(), "embed_tokens.weight") !=
                info.fqns.end() ||
            std::find(info.fqns.begin(), info.fqns.end(), "output_proj.weight") != info.fqns.end();
        if (!tied) continue;
        ++found;
        EXPECT_EQ(unit.module_prefix, "");
        EXPECT_THAT(info.fqns, ElementsAre("embed_tokens.weight", "output_proj.weight"));
        EXPECT_THAT(info.shape, ElementsAre(23, 16));
      }
    }
    EXPECT_EQ(found, 1);
    FSDP_ASSERT_OK_AND_ASSIGN(auto state, fsdp::FullStateDict(*fsdp));
    std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
    ASSERT_EQ(by_name.count("embed_tokens.weight"), 1u);
    ASSERT_EQ(by_name.count("output_proj.weight"), 1u);
    EXPECT_TRUE(at::equal(by_name.at("embed_tokens.weight"), by_name.at("output_proj.weight")));
  });
}

}  // namespace
}  // namespace fsdp
