// Port of PyTorch's test_fsdp_optim_state.py (2.x): the optim_state_dict API tests of
// PyTorch 2.0 on small models, and the project's "no error leaves the optimizer half loaded".
//
// Python test                              C++ (this file)
// ---------------------------------------  ------------------------------------------------------
// test_compatible_with_trec                TEST_P(CompatibleWithTrec, test_compatible_with_trec)
//   _NamedOptimizer (torchrec style, state keyed by FQN) is NamedOptimizer below: the adapter's
//   dict re-keyed by this rank's parameter names
// test_optim_state_without_param_groups    TEST_P(OptimStateWithoutParamGroups,
//                                            test_optim_state_without_param_groups)
// test_with_empty_optimizer_state          TEST_P(WithEmptyOptimizerState,
//                                            test_with_empty_optimizer_state)
// test_interface_arguments                 TEST_P(InterfaceArguments, test_interface_arguments)
//   `not is_cuda` (offload_to_cpu) is asserted as what offload means where the shards are on
//   the CPU already: CPU tensors that own their memory (a later step leaves the dict
//   unchanged), and without offload the local shards on the flat parameter's device. Python's
//   CUDA-to-CPU move itself needs FSDP on CUDA tensors, which this project does not shard yet
//   (its NCCL communicator, //comm:nccl, is not used by FSDP).
// test_state_dict_with_none_tensor_state   TEST_P(StateDictWithNoneTensorState,
//                                            test_state_dict_with_none_tensor_state)
//   subtests use_orig_params x optimizer_has_tensor_state (Adam / SGD)
// test_with_no_shard                       TEST_P(WithNoShard, test_with_no_shard)
//   subtests use_orig_params
// test_no_grad                             TEST_P(NoGrad, test_no_grad)
// (issue 4) no error leaves the optimizer  TEST_P(NoHalfLoad,
//   half loaded                              ErrorMidwayLeavesTheOptimizerUnchanged)
// Every test at world sizes 4 (PyTorch's) and 3.
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "comm/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/simple_models.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/state_dict_type.h"
#include "tests/optim_state/port_testutil.h"

namespace fsdp::optim_state::port {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

std::string WorldSizeName(const ::testing::TestParamInfo<int>& info) {
  return absl::StrCat("ws", info.param);
}

// torch.distributed.optim._NamedOptimizer's state-dict half: the optimizer's dict keyed by
// parameter names instead of IDs, and loading such a dict.
class NamedOptimizer {
 public:
  NamedOptimizer(OptimizerAdapter& adapter, const FullyShardedDataParallel& fsdp)
      : adapter_(adapter) {
    const auto names = FsdpParamNames(fsdp, FlatParamName::kUnitPrefixFlatParam);
    for (auto& group : adapter.optimizer().param_groups()) {
      for (auto& p : group.params()) names_.push_back(names.at(p.unsafeGetTensorImpl()));
    }
  }
  absl::StatusOr<OptimStateDict> StateDict() const {
    FSDP_ASSIGN_OR_RETURN(OptimStateDict by_id, adapter_.StateDict());
    OptimStateDict out;
    out.has_param_groups = by_id.has_param_groups;
    for (const auto& [key, state] : by_id.state) {
      out.state.Set(ParamKey::Fqn(names_.at(static_cast<size_t>(key.id()))), state);
    }
    for (const ParamGroup& g : by_id.param_groups) {
      ParamGroup named{g.hyper_params, {}};
      for (const ParamKey& k : g.params) {
        named.params.push_back(ParamKey::Fqn(names_.at(static_cast<size_t>(k.id()))));
      }
      out.param_groups.push_back(std::move(named));
    }
    return out;
  }
  absl::Status LoadStateDict(const OptimStateDict& named) {
    absl::flat_hash_map<std::string, int64_t> ids;
    for (size_t i = 0; i < names_.size(); ++i) ids.emplace(names_[i], static_cast<int64_t>(i));
    OptimStateDict by_id;
    by_id.has_param_groups = named.has_param_groups;
    for (const auto& [key, state] : named.state) {
      if (!key.is_fqn() || !ids.contains(key.fqn())) {
        return absl::InvalidArgumentError(absl::StrCat("unknown key ", key.ToString()));
      }
      by_id.state.Set(ParamKey::Id(ids.at(key.fqn())), state);
    }
    for (const ParamGroup& g : named.param_groups) {
      ParamGroup group{g.hyper_params, {}};
      for (const ParamKey& k : g.params) {
        if (!k.is_fqn() || !ids.contains(k.fqn())) {
          return absl::InvalidArgumentError(absl::StrCat("unknown key ", k.ToString()));
        }
        group.params.push_back(ParamKey::Id(ids.at(k.fqn())));
      }
      by_id.param_groups.push_back(std::move(group));
    }
    return adapter_.LoadStateDict(by_id);
  }

 private:
  OptimizerAdapter& adapter_;
  std::vector<std::string> names_;
};

// Python's `param.grad = zeros_like(param)` for every parameter that requires grad, then
// optim.step(): every parameter gains state.
absl::Status EagerInit(OptimizerAdapter& adapter) {
  for (auto& group : adapter.optimizer().param_groups()) {
    for (auto& p : group.params()) {
      if (p.requires_grad()) p.mutable_grad() = torch::zeros_like(p);
    }
  }
  return adapter.Step();
}

// ---------------------------------------------------------------- test_compatible_with_trec

class CompatibleWithTrec : public ::testing::TestWithParam<int> {};
TEST_P(CompatibleWithTrec, test_compatible_with_trec) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    struct Trained {
      models::FakeMPModel model{nullptr};
      std::unique_ptr<FullyShardedDataParallel> fsdp;
      std::unique_ptr<torch::optim::Adam> optim;
      std::unique_ptr<OptimizerAdapter> adapter;
    };
    std::vector<Trained> models(2);
    for (Trained& t : models) {
      t.model = models::FakeMPModel(group.rank());
      // As c10d's all_reduce: in place, outside autograd (gradients pass through unchanged).
      t.model->all_reduce = [&group](torch::Tensor& x) {
        at::Tensor data = x.detach();
        if (!group.AllReduce(data).ok()) throw std::runtime_error("all_reduce failed");
      };
      FsdpOptions options;
      options.use_orig_params = true;
      options.wrap_root = false;
      options.nested = {&t.model->dense};
      FSDP_ASSERT_OK_AND_ASSIGN(t.fsdp,
                                FullyShardedDataParallel::Wrap(t.model, Borrow(group), options));
      t.optim = std::make_unique<torch::optim::Adam>(t.fsdp->parameters(),
                                                     torch::optim::AdamOptions(1e-2));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(*t.optim));
      t.adapter = std::make_unique<OptimizerAdapter>(std::move(adapter));
    }
    NamedOptimizer named(*models[1].adapter, *models[1].fsdp);
    const StateDictSettings settings;  // FULL_STATE_DICT, rank0_only=False
    std::vector<OptimStateDict> state_dicts;
    // Train one batch and see whether the optim_state_dicts are the same.
    at::Tensor batch = torch::rand({5, 8});
    for (size_t i = 0; i < models.size(); ++i) {
      Trained& t = models[i];
      FSDP_ASSERT_OK(EagerInit(*t.adapter));
      t.fsdp->forward(batch).sum().backward();
      FSDP_ASSERT_OK(t.adapter->Step());
      OptimStateDict osd;
      if (i == 0) {
        FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*t.fsdp, *t.adapter, settings));
      } else {
        FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict own, named.StateDict());
        ASSERT_TRUE(own.state.at_index(0).first.is_fqn());
        FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*t.fsdp, *t.adapter, settings, own));
      }
      state_dicts.push_back(CloneOptimStateDict(osd));
    }
    // The rank-local part keeps its own name on each rank.
    const std::string sparse = group.rank() == 0 ? "sparse0.0.weight" : "sparse1.0.weight";
    EXPECT_NE(state_dicts[1].state.Find(ParamKey::Fqn(sparse)), nullptr);
    EXPECT_NE(state_dicts[1].state.Find(ParamKey::Fqn("dense.net1.0.weight")), nullptr);
    ExpectSameParamGroups(state_dicts[0], state_dicts[1], /*check_same_param_keys=*/false);
    ExpectSameState(state_dicts[0], state_dicts[1]);

    // Give the named optimizer a different state.
    for (int i = 0; i < 5; ++i) {
      models[1].fsdp->forward(torch::rand({5, 8})).sum().backward();
      FSDP_ASSERT_OK(models[1].adapter->Step());
    }
    // Load the state back.
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict to_load,
        OptimStateDictToLoad(*models[1].fsdp, *models[1].adapter, state_dicts[1], settings,
                             {.is_named_optimizer = true}));
    for (const auto& [key, state] : to_load.state) EXPECT_TRUE(key.is_fqn()) << key;
    FSDP_ASSERT_OK(named.LoadStateDict(to_load));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict own, named.StateDict());
    FSDP_ASSERT_OK_AND_ASSIGN(
        state_dicts[1], GetOptimStateDict(*models[1].fsdp, *models[1].adapter, settings, own));
    ExpectSameParamGroups(state_dicts[0], state_dicts[1], /*check_same_param_keys=*/false);
    ExpectSameState(state_dicts[0], state_dicts[1]);
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, CompatibleWithTrec, ::testing::Values(4, 3), WorldSizeName);

// ----------------------------------------------------------------
// test_optim_state_without_param_groups

class OptimStateWithoutParamGroups : public ::testing::TestWithParam<int> {};
TEST_P(OptimStateWithoutParamGroups, test_optim_state_without_param_groups) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    models::SimpleModel model;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(model, Borrow(group)));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
    const StateDictSettings settings;
    // One step for the original state dict and param groups.
    at::Tensor batch = torch::rand({3, 2});
    FSDP_ASSERT_OK(EagerInit(adapter));
    fsdp->forward(batch).sum().backward();
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, adapter.StateDict());
    const OptimStateDict original_osd = CloneOptimStateDict(saved);
    OptimStateDict no_param_groups = CloneOptimStateDict(original_osd);
    const std::vector<ParamGroup> original_param_groups = no_param_groups.param_groups;
    no_param_groups.param_groups.clear();
    no_param_groups.has_param_groups = false;
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict fsdp_osd,
                              GetOptimStateDict(*fsdp, adapter, settings, no_param_groups));
    const OptimStateDict original_fsdp_osd = CloneOptimStateDict(fsdp_osd);
    // The dict FSDP made has no param_groups either.
    EXPECT_FALSE(original_fsdp_osd.has_param_groups);
    EXPECT_TRUE(original_fsdp_osd.param_groups.empty());
    // Another step, for a different state.
    FSDP_ASSERT_OK(EagerInit(adapter));
    fsdp->forward(batch).sum().backward();
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict to_load,
                              OptimStateDictToLoad(*fsdp, adapter, original_fsdp_osd, settings));
    EXPECT_FALSE(to_load.has_param_groups);
    to_load.param_groups = original_param_groups;
    to_load.has_param_groups = true;
    FSDP_ASSERT_OK(adapter.LoadStateDict(to_load));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict loaded, adapter.StateDict());
    EXPECT_EQ(PyDictDiff(original_osd, loaded), "");
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict fsdp_optim_state,
                              GetOptimStateDict(*fsdp, adapter, settings));
    ExpectSameState(original_fsdp_osd, fsdp_optim_state);
    ASSERT_EQ(loaded.param_groups.size(), original_param_groups.size());
    OptimStateDict expected_groups;
    expected_groups.param_groups = original_param_groups;
    ExpectSameParamGroups(loaded, expected_groups, /*check_same_param_keys=*/true);
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, OptimStateWithoutParamGroups, ::testing::Values(4, 3),
                         WorldSizeName);

// ---------------------------------------------------------------- test_with_empty_optimizer_state

class WithEmptyOptimizerState : public ::testing::TestWithParam<int> {};
TEST_P(WithEmptyOptimizerState, test_with_empty_optimizer_state) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    models::TestDummyModel model;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(model, Borrow(group)));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict state_dict, adapter.StateDict());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict gathered,
                              GetOptimStateDict(*fsdp, adapter, StateDictSettings{}));
    EXPECT_TRUE(state_dict.state.empty());
    EXPECT_TRUE(gathered.state.empty());
    EXPECT_EQ(gathered.param_groups.size(), 1u);
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, WithEmptyOptimizerState, ::testing::Values(4, 3),
                         WorldSizeName);

// ---------------------------------------------------------------- test_interface_arguments

class InterfaceArguments : public ::testing::TestWithParam<int> {};
TEST_P(InterfaceArguments, test_interface_arguments) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    models::TestDummyModel model;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(model, Borrow(group)));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
    auto step = [&] {
      at::Tensor out = fsdp->forward(model->get_input());
      out.backward(out.detach());
      return adapter.Step();
    };
    StateDictSettings settings;
    FSDP_ASSERT_OK(step());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, adapter.StateDict());
    const OptimStateDict original_osd = CloneOptimStateDict(saved);
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd,
                              GetOptimStateDict(*fsdp, adapter, settings, original_osd));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict own, GetOptimStateDict(*fsdp, adapter, settings));
    ExpectSameState(own, osd);
    FSDP_ASSERT_OK(step());
    FSDP_ASSERT_OK(
        OptimStateDictToLoad(*fsdp, adapter, osd, settings, {.load_directly = true}).status());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict loaded, adapter.StateDict());
    ExpectSameState(loaded, original_osd);

    // Where the state lives: what a step does next must not reach a dict already taken.
    // (Every rank steps: a step is collective.)
    auto expect_detached = [&](const OptimStateDict& dict, const char* what) {
      const OptimStateDict before = CloneOptimStateDict(dict);
      ASSERT_TRUE(step().ok());
      EXPECT_EQ(DiffOptimStateDicts(before, dict), "") << what << " changed with the next step";
    };
    // The flat parameters' device: where FSDP keeps shards and their optimizer state.
    const at::Device shard_device = fsdp->parameters().front().device();

    // The default setting (FULL_STATE_DICT, offload_to_cpu): whole tensors on the CPU that own
    // their memory, as PyTorch's .cpu() copies of device tensors.
    FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*fsdp, adapter, settings, original_osd));
    for (const auto& [key, state] : osd.state) {
      for (const auto& [name, value] : state) {
        EXPECT_FALSE(value.Is<ShardedTensorValue>()) << key << " " << name;
        ASSERT_TRUE(value.Is<at::Tensor>()) << key << " " << name;
        EXPECT_TRUE(value.Get<at::Tensor>().device().is_cpu()) << key << " " << name;
      }
    }
    FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*fsdp, adapter, settings));
    expect_detached(osd, "the full dict (offload_to_cpu)");
    // Sharded with offload_to_cpu: CPU shards, detached from the optimizer's state.
    {
      ScopedStateDictType scoped(settings, ShardedOptimStateDictConfig{.offload_to_cpu = true});
      FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*fsdp, adapter, settings));
      for (const auto& [key, state] : osd.state) {
        for (const auto& [name, value] : state) {
          if (const ShardedTensorValue* v = value.GetIf<ShardedTensorValue>(); v != nullptr) {
            EXPECT_TRUE(v->local.device().is_cpu()) << key << " " << name;
          }
        }
      }
      expect_detached(osd, "the sharded dict (offload_to_cpu)");
    }
    // Sharded without offload_to_cpu: every positive-dimension value is sharded, its local
    // shard on the flat parameter's own device.
    {
      ScopedStateDictType scoped(settings, ShardedOptimStateDictConfig{.offload_to_cpu = false});
      FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*fsdp, adapter, settings, original_osd));
      for (const auto& [key, state] : osd.state) {
        for (const auto& [name, value] : state) {
          if (const at::Tensor* t = value.GetIf<at::Tensor>(); t != nullptr && t->dim() == 0)
            continue;
          ASSERT_TRUE(value.Is<ShardedTensorValue>()) << key << " " << name;
          const at::Tensor& local = value.Get<ShardedTensorValue>().local;
          if (local.defined() && local.numel() > 0) {
            EXPECT_EQ(local.device(), shard_device) << key << " " << name;
          }
        }
      }
    }
    // Full with rank0_only.
    {
      ScopedStateDictType scoped(
          settings, FullOptimStateDictConfig{.offload_to_cpu = true, .rank0_only = true});
      FSDP_ASSERT_OK_AND_ASSIGN(osd, GetOptimStateDict(*fsdp, adapter, settings, original_osd));
      if (group.rank() > 0) {
        EXPECT_TRUE(osd.state.empty());
        EXPECT_FALSE(osd.has_param_groups);
      } else {
        EXPECT_FALSE(osd.state.empty());
        for (const auto& [key, state] : osd.state) {
          for (const auto& [name, value] : state) {
            EXPECT_FALSE(value.Is<ShardedTensorValue>()) << key << " " << name;
            if (const at::Tensor* t = value.GetIf<at::Tensor>(); t != nullptr) {
              EXPECT_TRUE(t->device().is_cpu()) << key << " " << name;
            }
          }
        }
      }
      expect_detached(osd, "the full dict (rank0_only, offload_to_cpu)");
    }
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, InterfaceArguments, ::testing::Values(4, 3), WorldSizeName);

// ----------------------------------------------------------------
// test_state_dict_with_none_tensor_state

class StateDictWithNoneTensorState : public ::testing::TestWithParam<int> {};
TEST_P(StateDictWithNoneTensorState, test_state_dict_with_none_tensor_state) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    for (bool use_orig_params : {false, true}) {
      for (bool optimizer_has_tensor_state : {false, true}) {
        SCOPED_TRACE(absl::StrCat("use_orig_params=", use_orig_params,
                                  " optimizer_has_tensor_state=", optimizer_has_tensor_state));
        models::TestDummyModel model;
        FsdpOptions options;
        options.use_orig_params = use_orig_params;
        FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                                  FullyShardedDataParallel::Wrap(model, Borrow(group), options));
        std::unique_ptr<torch::optim::Optimizer> optim;
        if (optimizer_has_tensor_state) {
          optim = std::make_unique<torch::optim::Adam>(fsdp->parameters(),
                                                       torch::optim::AdamOptions(1e-2));
        } else {
          optim = std::make_unique<torch::optim::SGD>(fsdp->parameters(),
                                                      torch::optim::SGDOptions(1e-2));
        }
        FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(*optim));
        at::Tensor out = fsdp->forward(model->get_input());
        out.backward(out.detach());
        FSDP_ASSERT_OK(adapter.Step());
        FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, adapter.StateDict());
        OptimStateDict original_osd = CloneOptimStateDict(saved);
        for (size_t i = 0; i < original_osd.state.size(); ++i) {
          ParamState* state = original_osd.state.Find(original_osd.state.at_index(i).first);
          state->Set("value1", StateValue(2.74));
          state->Set("value2", StateValue::None());
        }
        const StateDictSettings settings;
        FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd,
                                  GetOptimStateDict(*fsdp, adapter, settings, original_osd));
        FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict to_load,
                                  OptimStateDictToLoad(*fsdp, adapter, osd, settings));
        EXPECT_EQ(to_load.state.size(), saved.state.size());
        for (const auto& [key, state] : to_load.state) {
          const StateValue* v1 = state.Find("value1");
          const StateValue* v2 = state.Find("value2");
          ASSERT_NE(v1, nullptr) << key;
          ASSERT_NE(v2, nullptr) << key;
          EXPECT_EQ(*v1, StateValue(2.74)) << key;
          EXPECT_TRUE(v2->IsNone()) << key;
        }
        FSDP_ASSERT_OK(group.Barrier());
      }
    }
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, StateDictWithNoneTensorState, ::testing::Values(4, 3),
                         WorldSizeName);

// ---------------------------------------------------------------- test_with_no_shard

class WithNoShard : public ::testing::TestWithParam<int> {};
TEST_P(WithNoShard, test_with_no_shard) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    for (bool use_orig_params : {false, true}) {
      SCOPED_TRACE(absl::StrCat("use_orig_params=", use_orig_params));
      models::TestDummyModel model;
      FsdpOptions options;
      options.sharding_strategy = ShardingStrategy::kNoShard;
      options.use_orig_params = use_orig_params;
      FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                                FullyShardedDataParallel::Wrap(model, Borrow(group), options));
      torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
      at::Tensor out = fsdp->forward(model->get_input());
      out.backward(out.detach());
      FSDP_ASSERT_OK(adapter.Step());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, adapter.StateDict());
      const OptimStateDict original_osd = CloneOptimStateDict(saved);
      const StateDictSettings settings;
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd, GetOptimStateDict(*fsdp, adapter, settings));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict to_load,
                                OptimStateDictToLoad(*fsdp, adapter, osd, settings));
      FSDP_ASSERT_OK(adapter.LoadStateDict(to_load));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict new_osd, adapter.StateDict());
      EXPECT_EQ(PyDictDiff(original_osd, new_osd), "");
    }
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, WithNoShard, ::testing::Values(4, 3), WorldSizeName);

// ---------------------------------------------------------------- test_no_grad

class NoGrad : public ::testing::TestWithParam<int> {};
TEST_P(NoGrad, test_no_grad) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    models::TestDummyModel model(/*no_grad=*/true);
    FsdpOptions options;
    options.use_orig_params = true;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(model, Borrow(group), options));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
    auto linear = model->net1->child_as<torch::nn::LinearImpl>(0);
    const StateDictSettings settings;
    for (int i = 0; i < 5; ++i) {
      SCOPED_TRACE(absl::StrCat("iteration ", i));
      linear->weight.set_requires_grad(i % 2 == 1);
      linear->bias.set_requires_grad(i % 2 == 1);
      fsdp->forward(model->get_input()).sum().backward();
      FSDP_ASSERT_OK(adapter.Step());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, adapter.StateDict());
      const OptimStateDict orig_state_dict = CloneOptimStateDict(saved);
      FSDP_ASSERT_OK(GetOptimStateDict(*fsdp, adapter, settings).status());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd, GetOptimStateDict(*fsdp, adapter, settings));
      FSDP_ASSERT_OK(
          OptimStateDictToLoad(*fsdp, adapter, osd, settings, {.load_directly = true}).status());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict loaded, adapter.StateDict());
      ExpectSameState(loaded, orig_state_dict);
    }
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, NoGrad, ::testing::Values(4, 3), WorldSizeName);

// ---------------------------------------------------------------- no half load (issue 4)

// A load that fails on a later parameter, after earlier ones would have loaded, changes
// nothing: OptimStateDictToLoad(load_directly) and the adapter check everything first.
class NoHalfLoad : public ::testing::TestWithParam<int> {};
TEST_P(NoHalfLoad, ErrorMidwayLeavesTheOptimizerUnchanged) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(port::Setup trained,
                              InitNested({.wrap = true, .group = Borrow(group)}));
    FSDP_ASSERT_OK(StepModel(trained, 2).status());
    const StateDictSettings settings;
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict full,
                              GetOptimStateDict(*trained.fsdp, *trained.adapter, settings));
    // A second optimizer with its own, different state.
    FSDP_ASSERT_OK_AND_ASSIGN(port::Setup other,
                              InitNested({.wrap = true, .group = Borrow(group)}));
    FSDP_ASSERT_OK(StepModel(other, 1).status());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict before_dict, other.adapter->StateDict());
    const OptimStateDict before = CloneOptimStateDict(before_dict);
    auto expect_unchanged = [&] {
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after, other.adapter->StateDict());
      EXPECT_EQ(DiffOptimStateDicts(before, after), "");
    };
    // (1) block2.2.weight is the last parameter the optimizer holds; a wrong shape of its
    // (unflattened) state fails during flattening.
    {
      OptimStateDict bad = CloneOptimStateDict(full);
      bad.state.Find(ParamKey::Fqn("block2.2.weight"))
          ->Set("exp_avg", StateValue(torch::zeros({2, 2})));
      EXPECT_THAT(
          OptimStateDictToLoad(*other.fsdp, *other.adapter, bad, settings, {.load_directly = true}),
          StatusIs(absl::StatusCode::kInvalidArgument,
                   HasSubstr("Tensor optimizer state does not have same shape as its "
                             "parameter: torch.Size([2, 2]) torch.Size([9, 5])")));
      expect_unchanged();
    }
    // (2) block2.0.weight is not managed by FSDP (carried as it is) and comes after the units
    // of block1 in the optimizer: the flattening succeeds and the adapter refuses the load.
    {
      OptimStateDict bad = CloneOptimStateDict(full);
      bad.state.Find(ParamKey::Fqn("block2.0.weight"))
          ->Set("exp_avg_sq", StateValue(torch::zeros({3})));
      EXPECT_THAT(
          OptimStateDictToLoad(*other.fsdp, *other.adapter, bad, settings, {.load_directly = true}),
          StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exp_avg_sq")));
      expect_unchanged();
    }
    // (3) A hyper-parameter of the wrong type in the last group.
    {
      OptimStateDict bad = CloneOptimStateDict(full);
      bad.param_groups.back().hyper_params.Set("lr", StateValue("fast"));
      EXPECT_THAT(
          OptimStateDictToLoad(*other.fsdp, *other.adapter, bad, settings, {.load_directly = true}),
          StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lr")));
      expect_unchanged();
    }
    // And the unchanged dict loads.
    FSDP_ASSERT_OK(
        OptimStateDictToLoad(*other.fsdp, *other.adapter, full, settings, {.load_directly = true})
            .status());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict loaded, other.adapter->StateDict());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict expected, trained.adapter->StateDict());
    ExpectSameState(loaded, expected);
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, NoHalfLoad, ::testing::Values(4, 3), WorldSizeName);

}  // namespace
}  // namespace fsdp::optim_state::port
