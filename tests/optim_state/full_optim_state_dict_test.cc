// Port of PyTorch's test_fsdp_optim_state.py (2.x): full-dict keys and errors, unmanaged
// parameters, rekeying, the optim_input deprecation warning and a 0th parameter without state.
//
// Python test                                     C++ (this file)
// ----------------------------------------------  ----------------------------------------------
// test_full_optim_state_dict_keys                 TEST_P(FullOptimStateDictKeys,
//                                                   test_full_optim_state_dict_keys)
//   NestedModel.wrap(ignore_modules=True) with activation checkpointing of every nn.Sequential
//   (block2, with its FSDP units inside), as Python. Python's check (full optim
//   state dict keys == full model state dict keys) is kept, and the keys are compared with
//   those PyTorch 2.13's FSDP1 writes for the same configuration. Beyond Python: full
//   checkpoints from PyTorch 2.13 models with checkpoint_wrapper, torch.compile, DDP, FSDP1
//   (named_parameters() keys) and a user's wrapper load with checkpoint::KeyPrefixes, each
//   value on its parameter, and are refused without them
//   (tests/optim_state/wrapped_checkpoints.py writes them).
// test_full_optim_state_dict_nested_invalid       TEST_P(FullOptimStateDictNestedInvalid,
//                                                   test_full_optim_state_dict_nested_invalid)
// test_shard_full_optim_state_dict_unmanaged_     TEST_P(ShardFullOptimStateDictUnmanagedParams,
//   params                                          test_shard_full_..._unmanaged_params)
//   parametrize state_dict_type x add_to_fsdp_module; subtests use_optim_input (FULL only)
// test_rekey_optim_state_dict_to_ids              TEST_P(RekeyOptimStateDictToIds,
//                                                   test_rekey_optim_state_dict_to_ids)
//   parametrize state_dict_type x use_multiple_param_groups; subtests use_optim_input (FULL)
// test_rekey_optim_state_dict_to_names            TEST_P(RekeyOptimStateDictToNames,
//                                                   test_rekey_optim_state_dict_to_names)
//   subtests use_optim_input
// test_optim_input_warning                        TEST_P(OptimInputWarning,
//                                                   test_optim_input_warning)
//   LibTorch warning (TORCH_WARN) caught with c10::WarningUtils::WarningHandlerGuard; also checks
//   that the same calls without optim_input do not warn
// test_save_load_without_0th_param_state          TEST_P(SaveLoadWithout0thParamState,
//                                                   test_save_load_without_0th_param_state)
//   parametrize state_dict_type
// Every test at world sizes 4 (PyTorch's, the whole grid) and 3 (unmanaged params and rekey to
// IDs: two combinations of the grid, to keep the target short).
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/key_prefixes.h"
#include "checkpoint/load_full_checkpoint.h"
#include "comm/multiprocess_testutil.h"
#include "comm/status_macros.h"
#include "fsdp/activation_checkpointing.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "models/simple_models.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_input.h"
#include "optim_state/rekey.h"
#include "optim_state/state_dict_type.h"
#include "tests/optim_state/port_testutil.h"
#include "tools/python_testutil.h"

namespace fsdp::optim_state::port {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

std::string WorldSizeName(const ::testing::TestParamInfo<int>& info) {
  return absl::StrCat("ws", info.param);
}

std::string TypeName(StateDictType type) {
  return type == StateDictType::kFullStateDict ? "Full" : "Sharded";
}

// ---------------------------------------------------------------- test_full_optim_state_dict_keys

// PyTorch 2.13's full checkpoints for this test (tests/optim_state/wrapped_checkpoints.py, whose
// docstring lists the cases and their key forms), written once per test process before its
// ranks start, under $TEST_TMPDIR/wrapped_checkpoints/<case>/: model.pt and optim.pt as the
// user saved them, expected_model.pt and expected_optim.pt under the unwrapped model's names.
std::string WrappedCheckpoints() {
  static const std::string dir = [] {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string out = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/wrapped_checkpoints");
    if (::fsdp::testing::IsRankProcess()) return out;  // the test process wrote them
    // The files must have this build's NestedModel shapes: block0 is BlockB(5, hidden).
    models::NestedModel model;
    const int64_t hidden = models::SlotAs<models::BlockBImpl>(model->block0)->weight.size(1);
    const ::fsdp::testing::CommandResult run = ::fsdp::testing::RunCommand(
        absl::StrCat(::fsdp::testing::PythonCommand(), " ",
                     ::fsdp::testing::Runfile("tests/optim_state/wrapped_checkpoints.py"), " ",
                     ::fsdp::testing::Runfile("models/testdata"), " ",
                     ::fsdp::testing::Runfile("examples/testdata"), " ", out, " ", hidden));
    EXPECT_EQ(run.exit_code, 0) << run.output;
    return out;
  }();
  return dir;
}

struct WrappedCase {
  std::string name;   // directory under WrappedCheckpoints()
  std::string strip;  // the key prefixes (checkpoint::ParseKeyPrefixes) that load it
  // Loads that must be refused: (key prefixes, what the error says after "<case dir>/"). ""
  // is no prefix at all: the load without the option.
  std::vector<std::pair<std::string, std::string>> refused;
};

std::vector<WrappedCase> WrappedCases() {
  const std::string model_key = "model.pt: key \"";
  const std::string optim_key = "optim.pt: state key \"";
  const std::string nothing = "\" names no parameter";
  return {
      // PyTorch's FSDP1 names the keys itself (the Python test's configuration).
      {"fsdp1_test_config", "", {}},
      // model.state_dict() is clean (the wrapper's hook), the optimizer's keys are not.
      {"checkpoint_wrapper",
       "pytorch",
       {{"", optim_key + "block2._checkpoint_wrapped_module.0.weight" + nothing}}},
      {"torch_compile",
       "pytorch",
       {{"", model_key + "_orig_mod.bias" + nothing},
        {"module.", model_key + "_orig_mod.bias" + nothing}}},
      {"ddp", "module.", {{"", model_key + "module.bias" + nothing}}},
      {"fsdp1_named_parameters",
       "pytorch",
       {{"", model_key + "_fsdp_wrapped_module.bias" + nothing}}},
      // DDP's "module." named, torch.compile's "_orig_mod." in front of it not.
      {"ddp_compile_checkpoint_wrapper",
       "pytorch",
       {{"", model_key + "_orig_mod.module.bias" + nothing},
        {"module.,._checkpoint_wrapped_module.", model_key + "_orig_mod.module.bias" + nothing}}},
      // A prefix no default strips: the caller names it.
      {"user_wrapper",
       "pytorch,net.",
       {{"", model_key + "net.bias" + nothing}, {"pytorch", model_key + "net.bias" + nothing}}},
  };
}

// The Python test's model: NestedModel.wrap(ignore_modules=True) without a root unit, Adam
// (lr 1e-3) over the FSDP parameters, activation checkpointing on block2. Python checkpoints
// every nn.Sequential, i.e. block2 as a whole; models/ calls block2 (a SlotSequential) directly,
// not through a slot, so its three children are checkpointed instead: the same modules are
// recomputed in backward. Checkpointing adds no name in either language (PyTorch strips its
// wrapper level from the full dicts, ours adds none).
struct KeysSetup {
  models::NestedModel model;
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> optim;
  std::unique_ptr<OptimizerAdapter> adapter;
};

absl::StatusOr<KeysSetup> InitKeysModel(comm::ProcessGroup& group) {
  KeysSetup s;
  FsdpOptions options;
  options.nested = s.model->wrap_slots();
  options.wrap_root = false;
  options.ignored_modules = {s.model->ignored_module()};
  FSDP_ASSIGN_OR_RETURN(s.fsdp, FullyShardedDataParallel::Wrap(s.model, Borrow(group), options));
  // Python: apply_activation_checkpointing(check_fn=isinstance(module, nn.Sequential)).
  FSDP_RETURN_IF_ERROR(ApplyActivationCheckpointing(s.model->block2_slot()));
  s.optim =
      std::make_unique<torch::optim::Adam>(s.fsdp->parameters(), torch::optim::AdamOptions(1e-3));
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter adapter, OptimizerAdapter::Create(*s.optim));
  s.adapter = std::make_unique<OptimizerAdapter>(std::move(adapter));
  return s;
}

std::set<std::string> StateKeys(const OptimStateDict& osd) {
  std::set<std::string> keys;
  for (const auto& [key, state] : osd.state) keys.insert(key.fqn());
  return keys;
}

template <typename Dict>
std::set<std::string> DictKeys(const Dict& dict) {
  std::set<std::string> keys;
  for (const auto& [key, tensor] : dict) keys.insert(key);
  return keys;
}

// Python's values under the names they belong to (the case's expected_*.pt) against what the
// C++ model and optimizer hold: every parameter bit for bit, every parameter's optimizer state
// (exp_avg, exp_avg_sq, step) under that parameter's name.
void ExpectHoldsPythonValues(KeysSetup& s, const std::string& dir) {
  FSDP_ASSERT_OK_AND_ASSIGN(checkpoint::ModelStateDict expected_model,
                            checkpoint::ReadModelStateDict(dir + "/expected_model.pt"));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict expected_osd,
                            checkpoint::ReadOptimStateDict(dir + "/expected_optim.pt"));
  FSDP_ASSERT_OK_AND_ASSIGN(StateDict model_state, FullStateDict(*s.fsdp));
  EXPECT_EQ(DictKeys(model_state), DictKeys(expected_model));
  for (const auto& [name, expected] : expected_model) {
    for (const auto& [key, actual] : model_state) {
      if (key == name) {
        EXPECT_TRUE(torch::equal(actual, expected)) << name;
      }
    }
  }
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd,
                            FullOptimStateDict(*s.fsdp, *s.adapter, {.rank0_only = false}));
  EXPECT_EQ(StateKeys(osd), StateKeys(expected_osd));
  for (const auto& [key, expected] : expected_osd.state) {
    const ParamState* actual = osd.state.Find(key);
    ASSERT_NE(actual, nullptr) << key;
    for (const auto& [state_name, value] : expected) {
      const StateValue* mine = actual->Find(state_name);
      ASSERT_NE(mine, nullptr) << key << " " << state_name;
      EXPECT_EQ(DiffStateValues(value, *mine), "") << key << " " << state_name;
    }
  }
  // Hyper-parameters as Python's; "params" as sets (FSDP lists them in its own order).
  ExpectSameParamGroups(osd, expected_osd, /*check_same_param_keys=*/false);
  ASSERT_EQ(osd.param_groups.size(), expected_osd.param_groups.size());
  for (size_t g = 0; g < osd.param_groups.size(); ++g) {
    std::set<std::string> mine, python;
    for (const ParamKey& key : osd.param_groups[g].params) mine.insert(key.fqn());
    for (const ParamKey& key : expected_osd.param_groups[g].params) python.insert(key.fqn());
    EXPECT_EQ(mine, python) << "group " << g;
  }
  // The check above tells parameters apart: no two parameters have the same exp_avg (equal
  // shapes included: every Bias starts from the same seed).
  std::vector<std::pair<std::string, at::Tensor>> exp_avgs;
  for (const auto& [key, state] : expected_osd.state) {
    exp_avgs.emplace_back(key.fqn(), state.Find("exp_avg")->Get<at::Tensor>());
  }
  for (size_t i = 0; i < exp_avgs.size(); ++i) {
    for (size_t j = i + 1; j < exp_avgs.size(); ++j) {
      EXPECT_FALSE(exp_avgs[i].second.sizes() == exp_avgs[j].second.sizes() &&
                   torch::equal(exp_avgs[i].second, exp_avgs[j].second))
          << exp_avgs[i].first << " and " << exp_avgs[j].first << " cannot be told apart";
    }
  }
}

class FullOptimStateDictKeys : public ::testing::TestWithParam<int> {};
TEST_P(FullOptimStateDictKeys, test_full_optim_state_dict_keys) {
  const std::string checkpoints = WrappedCheckpoints();
  RunInRanks(GetParam(), [&checkpoints](comm::ProcessGroup& group) {
    // Python's test: after a step, the full optimizer state dict's keys are the full model
    // state dict's, with no checkpointing prefix. Here also: they are the keys PyTorch's FSDP1
    // gives the same configuration.
    {
      FSDP_ASSERT_OK_AND_ASSIGN(KeysSetup s, InitKeysModel(group));
      torch::manual_seed(0);
      s.optim->zero_grad();
      at::Tensor x = s.model->get_input();
      s.model->get_loss(x, s.fsdp->forward(x)).backward();
      FSDP_ASSERT_OK(s.adapter->Step());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd,
                                FullOptimStateDict(*s.fsdp, *s.adapter, {.rank0_only = false}));
      FSDP_ASSERT_OK_AND_ASSIGN(StateDict state_dict, FullStateDict(*s.fsdp));
      const std::string pytorch = checkpoints + "/fsdp1_test_config";
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict pytorch_osd,
                                checkpoint::ReadOptimStateDict(pytorch + "/optim.pt"));
      FSDP_ASSERT_OK_AND_ASSIGN(checkpoint::ModelStateDict pytorch_state_dict,
                                checkpoint::ReadModelStateDict(pytorch + "/model.pt"));
      EXPECT_EQ(StateKeys(osd), DictKeys(state_dict));
      EXPECT_EQ(StateKeys(osd), StateKeys(pytorch_osd));
      EXPECT_EQ(DictKeys(state_dict), DictKeys(pytorch_state_dict));
    }
    // What matters to a user: a full checkpoint written by a wrapped PyTorch model loads, with
    // the prefixes named, and each value lands on its parameter.
    for (const WrappedCase& c : WrappedCases()) {
      SCOPED_TRACE(c.name);
      const std::string dir = absl::StrCat(checkpoints, "/", c.name);
      FSDP_ASSERT_OK_AND_ASSIGN(KeysSetup s, InitKeysModel(group));
      FSDP_ASSERT_OK_AND_ASSIGN(StateDict before, FullStateDict(*s.fsdp));
      for (const auto& [spec, error] : c.refused) {
        SCOPED_TRACE(absl::StrCat("strip=\"", spec, "\""));
        FSDP_ASSERT_OK_AND_ASSIGN(checkpoint::KeyPrefixes prefixes,
                                  checkpoint::ParseKeyPrefixes(spec));
        EXPECT_THAT(
            checkpoint::LoadFullCheckpoint(dir, *s.fsdp, s.adapter.get(),
                                           {.strip_key_prefixes = prefixes}),
            StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(absl::StrCat(dir, "/", error))));
      }
      // Refusals changed nothing.
      FSDP_ASSERT_OK_AND_ASSIGN(StateDict after_refusals, FullStateDict(*s.fsdp));
      ASSERT_EQ(after_refusals.size(), before.size());
      for (size_t i = 0; i < before.size(); ++i) {
        EXPECT_TRUE(torch::equal(after_refusals[i].second, before[i].second)) << before[i].first;
      }
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict no_state, s.adapter->StateDict());
      EXPECT_TRUE(no_state.state.empty());

      FSDP_ASSERT_OK_AND_ASSIGN(checkpoint::KeyPrefixes prefixes,
                                checkpoint::ParseKeyPrefixes(c.strip));
      FSDP_ASSERT_OK(checkpoint::LoadFullCheckpoint(dir, *s.fsdp, s.adapter.get(),
                                                    {.strip_key_prefixes = prefixes}));
      ExpectHoldsPythonValues(s, dir);
    }
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, FullOptimStateDictKeys, ::testing::Values(4, 3),
                         WorldSizeName);

// ----------------------------------------------------------------
// test_full_optim_state_dict_nested_invalid

class FullOptimStateDictNestedInvalid : public ::testing::TestWithParam<int> {};
TEST_P(FullOptimStateDictNestedInvalid, test_full_optim_state_dict_nested_invalid) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    models::NestedModel model;
    FsdpOptions options;
    options.nested = model->wrap_slots();
    options.wrap_root = false;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(model, Borrow(group), options));
    std::vector<at::Tensor> optim_input = fsdp->parameters();
    // Exclude a parameter so that nonzero ranks are missing state.
    if (group.rank() != 0) optim_input.pop_back();
    torch::optim::Adam optim(optim_input, torch::optim::AdamOptions(1e-3));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
    torch::manual_seed(0);
    for (int i = 0; i < 3; ++i) {
      optim.zero_grad();
      at::Tensor x = model->get_input();
      model->get_loss(x, fsdp->forward(x)).backward();
      FSDP_ASSERT_OK(adapter.Step());
    }
    // The last of fsdp->parameters() is block2.2's flat parameter.
    std::string missing = "\nRank 1 is missing states for the parameters: [('block2.2.weight', ";
    EXPECT_THAT(FullOptimStateDict(*fsdp, adapter),
                StatusIs(absl::StatusCode::kFailedPrecondition,
                         ::testing::AllOf(
                             HasSubstr("FSDP currently requires each rank to have at least the "
                                       "optimizer states needed by rank 0's optimizer but some "
                                       "ranks are missing some of those states"),
                             HasSubstr(missing))));
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, FullOptimStateDictNestedInvalid, ::testing::Values(4, 3),
                         WorldSizeName);

// ---------------------------------------------------------------- unmanaged params

struct UnmanagedParams {
  int world_size;
  StateDictType state_dict_type;
  bool add_to_fsdp_module;
};

// NestedModel.add_unmanaged_param_entry: an Adam entry for the unmanaged parameter under the
// ID the flattened dict skipped (single parameter group).
void AddUnmanagedParamEntry(OptimStateDict& osd, const at::Tensor& unmanaged_param, int step) {
  std::vector<ParamKey>& ids = osd.param_groups[0].params;
  int64_t unmanaged_id = -1;
  for (size_t i = 1; i < ids.size(); ++i) {
    const int64_t diff = ids[i].id() - ids[i - 1].id();
    if (diff != 1) {
      ASSERT_GT(diff, 1);
      unmanaged_id = ids[i - 1].id() + 1;
      break;
    }
  }
  if (unmanaged_id == -1) unmanaged_id = static_cast<int64_t>(ids.size());
  ParamState state;
  state.Set("step", StateValue(at::scalar_tensor(static_cast<double>(step), at::kFloat)));
  state.Set("exp_avg", StateValue(torch::randn(unmanaged_param.sizes())));
  state.Set("exp_avg_sq", StateValue(torch::randn(unmanaged_param.sizes())));
  osd.state.Set(ParamKey::Id(unmanaged_id), std::move(state));
  ids.insert(std::upper_bound(ids.begin(), ids.end(), ParamKey::Id(unmanaged_id)),
             ParamKey::Id(unmanaged_id));
}

class ShardFullOptimStateDictUnmanagedParams : public ::testing::TestWithParam<UnmanagedParams> {};
TEST_P(ShardFullOptimStateDictUnmanagedParams, test_shard_full_optim_state_dict_unmanaged_params) {
  const UnmanagedParams p = GetParam();
  RunInRanks(p.world_size, [p](comm::ProcessGroup& group) {
    const bool full = p.state_dict_type == StateDictType::kFullStateDict;
    for (bool use_optim_input : {false, true}) {
      if (use_optim_input && !full) continue;  // Python: [False] for SHARDED_STATE_DICT
      SCOPED_TRACE(absl::StrCat("use_optim_input=", use_optim_input));
      constexpr int kNumIters = 1;
      FSDP_ASSERT_OK_AND_ASSIGN(port::Setup model1,
                                InitNested({.wrap = true, .group = Borrow(group)}));
      FSDP_ASSERT_OK(StepModel(model1, kNumIters).status());
      OptimStateDict fsdp_osd;
      if (full) {
        FullOptimStateDictOptions options{.rank0_only = false};
        if (use_optim_input) options.optim_input = model1.optim_input;
        FSDP_ASSERT_OK_AND_ASSIGN(fsdp_osd,
                                  FullOptimStateDict(*model1.fsdp, *model1.adapter, options));
      } else {
        FSDP_ASSERT_OK_AND_ASSIGN(fsdp_osd, ShardedOptimStateDict(*model1.fsdp, *model1.adapter));
      }
      // The model to load into: the same structure with an unmanaged parameter.
      models::NestedModel model;
      at::Tensor unmanaged_param = model->add_unmanaged_param(p.add_to_fsdp_module);
      FsdpOptions options;
      options.nested = model->wrap_slots();
      options.wrap_root = false;
      FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                                FullyShardedDataParallel::Wrap(model, Borrow(group), options));
      const OptimInput optim_input = OptimInput::FromParams(fsdp->parameters());
      torch::optim::Adam optim(optim_input.Params(), torch::optim::AdamOptions(1e-3));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
      auto flatten = [&]() -> absl::StatusOr<OptimStateDict> {
        if (!full) return FlattenShardedOptimStateDict(fsdp_osd, *fsdp, adapter);
        if (use_optim_input) return ShardFullOptimStateDict(fsdp_osd, *fsdp, optim_input);
        return ShardFullOptimStateDict(fsdp_osd, *fsdp, adapter);
      };
      if (p.add_to_fsdp_module) {
        // block2.2's flat parameter now holds an original parameter without Adam's `step`.
        EXPECT_THAT(flatten(), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("All unflattened parameters comprising a "
                                                  "single flat parameter must have scalar state "
                                                  "with the same value and dtype")));
        continue;
      }
      // A parameter outside every unit is left alone (model parallelism).
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict flattened_osd, flatten());
      AddUnmanagedParamEntry(flattened_osd, unmanaged_param, kNumIters);
      FSDP_EXPECT_OK(adapter.LoadStateDict(flattened_osd));
    }
  });
}
INSTANTIATE_TEST_SUITE_P(
    All, ShardFullOptimStateDictUnmanagedParams,
    ::testing::Values(UnmanagedParams{4, StateDictType::kFullStateDict, false},
                      UnmanagedParams{4, StateDictType::kFullStateDict, true},
                      UnmanagedParams{4, StateDictType::kShardedStateDict, false},
                      UnmanagedParams{4, StateDictType::kShardedStateDict, true},
                      UnmanagedParams{3, StateDictType::kFullStateDict, true},
                      UnmanagedParams{3, StateDictType::kShardedStateDict, false}),
    [](const ::testing::TestParamInfo<UnmanagedParams>& info) {
      return absl::StrCat("ws", info.param.world_size, "_", TypeName(info.param.state_dict_type),
                          info.param.add_to_fsdp_module ? "_AddToFsdpModule" : "_OutsideFsdp");
    });

// ---------------------------------------------------------------- rekey

struct RekeyParams {
  int world_size;
  StateDictType state_dict_type;
  bool use_multiple_param_groups;
};

class RekeyOptimStateDictToIds : public ::testing::TestWithParam<RekeyParams> {};
TEST_P(RekeyOptimStateDictToIds, test_rekey_optim_state_dict_to_ids) {
  const RekeyParams p = GetParam();
  RunInRanks(p.world_size, [p](comm::ProcessGroup& group) {
    const bool full = p.state_dict_type == StateDictType::kFullStateDict;
    for (bool use_optim_input : {false, true}) {
      if (use_optim_input && !full) continue;  // Python: [False] for SHARDED_STATE_DICT
      SCOPED_TRACE(absl::StrCat("use_optim_input=", use_optim_input));
      constexpr int kNumIters = 3;
      FSDP_ASSERT_OK_AND_ASSIGN(port::Setup model1, InitNested({.wrap = true,
                                                                .group = Borrow(group),
                                                                .use_multiple_param_groups =
                                                                    p.use_multiple_param_groups}));
      FSDP_ASSERT_OK(StepModel(model1, kNumIters).status());
      OptimStateDict fsdp_osd;
      if (full) {
        FullOptimStateDictOptions options;  // rank0_only, as Python's default
        if (use_optim_input) options.optim_input = model1.optim_input;
        FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict on_rank0,
                                  FullOptimStateDict(*model1.fsdp, *model1.adapter, options));
        FSDP_ASSERT_OK_AND_ASSIGN(
            fsdp_osd,
            BroadcastFullOsd(on_rank0, group, absl::StrCat("rekey_to_ids_", use_optim_input)));
      } else {
        FSDP_ASSERT_OK_AND_ASSIGN(fsdp_osd, ShardedOptimStateDict(*model1.fsdp, *model1.adapter));
      }
      FSDP_ASSERT_OK_AND_ASSIGN(port::Setup model2, InitNested({.wrap = false,
                                                                .group = Borrow(group),
                                                                .use_multiple_param_groups =
                                                                    p.use_multiple_param_groups}));
      FSDP_ASSERT_OK(StepModel(model2, kNumIters).status());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict rekeyed_osd,
                                use_optim_input
                                    ? RekeyOptimStateDict(fsdp_osd, OptimStateKeyType::kParamId,
                                                          *model2.module, model2.optim_input)
                                    : RekeyOptimStateDict(fsdp_osd, OptimStateKeyType::kParamId,
                                                          *model2.module, *model2.adapter));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd, model2.adapter->StateDict());
      ExpectSameParamGroups(rekeyed_osd, osd, /*check_same_param_keys=*/true);
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict gathered, GatherShardedValues(rekeyed_osd, group));
      ExpectSameState(gathered, osd);
      if (full) {
        FSDP_ASSERT_OK(model2.adapter->LoadStateDict(rekeyed_osd));
        FSDP_ASSERT_OK(StepModel(model2, kNumIters).status());
      }
    }
  });
}
INSTANTIATE_TEST_SUITE_P(
    All, RekeyOptimStateDictToIds, ::testing::ValuesIn([] {
      std::vector<RekeyParams> out;
      for (StateDictType t : {StateDictType::kFullStateDict, StateDictType::kShardedStateDict}) {
        for (bool groups : {false, true}) out.push_back(RekeyParams{4, t, groups});
      }
      out.push_back(RekeyParams{3, StateDictType::kFullStateDict, false});
      out.push_back(RekeyParams{3, StateDictType::kShardedStateDict, true});
      return out;
    }()),
    [](const ::testing::TestParamInfo<RekeyParams>& info) {
      return absl::StrCat("ws", info.param.world_size, "_", TypeName(info.param.state_dict_type),
                          info.param.use_multiple_param_groups ? "_MultipleGroups" : "_OneGroup");
    });

class RekeyOptimStateDictToNames : public ::testing::TestWithParam<int> {};
TEST_P(RekeyOptimStateDictToNames, test_rekey_optim_state_dict_to_names) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    for (bool use_optim_input : {false, true}) {
      SCOPED_TRACE(absl::StrCat("use_optim_input=", use_optim_input));
      constexpr int kNumIters = 3;
      FSDP_ASSERT_OK_AND_ASSIGN(port::Setup model1,
                                InitNested({.wrap = true, .group = Borrow(group)}));
      FSDP_ASSERT_OK(StepModel(model1, kNumIters).status());
      FSDP_ASSERT_OK_AND_ASSIGN(port::Setup model2,
                                InitNested({.wrap = false, .group = Borrow(group)}));
      FSDP_ASSERT_OK(StepModel(model2, kNumIters).status());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd2, model2.adapter->StateDict());
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict rekeyed_osd,
                                use_optim_input
                                    ? RekeyOptimStateDict(osd2, OptimStateKeyType::kParamName,
                                                          *model2.module, model2.optim_input)
                                    : RekeyOptimStateDict(osd2, OptimStateKeyType::kParamName,
                                                          *model2.module, *model2.adapter));
      FSDP_ASSERT_OK_AND_ASSIGN(
          OptimStateDict sharded_osd,
          use_optim_input ? ShardFullOptimStateDict(rekeyed_osd, *model1.fsdp, model1.optim_input)
                          : ShardFullOptimStateDict(rekeyed_osd, *model1.fsdp, *model1.adapter));
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd1, model1.adapter->StateDict());
      ExpectSameParamGroups(sharded_osd, osd1, /*check_same_param_keys=*/true);
      ExpectSameState(sharded_osd, osd1);
      FSDP_ASSERT_OK(model1.adapter->LoadStateDict(sharded_osd));
      FSDP_ASSERT_OK(StepModel(model1, kNumIters).status());
    }
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, RekeyOptimStateDictToNames, ::testing::Values(4, 3),
                         WorldSizeName);

// ---------------------------------------------------------------- test_optim_input_warning

class OptimInputWarning : public ::testing::TestWithParam<int> {};
TEST_P(OptimInputWarning, test_optim_input_warning) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    // `call` warns exactly once with PyTorch's text.
    auto expect_warns = [](const std::string& method, const std::function<absl::Status()>& call) {
      WarningCapture capture;
      {
        c10::WarningUtils::WarningHandlerGuard guard(&capture);
        FSDP_EXPECT_OK(call()) << method;
      }
      EXPECT_THAT(capture.messages(),
                  ::testing::ElementsAre(HasSubstr("`optim_input` argument is deprecated")))
          << method;
      EXPECT_THAT(capture.messages(),
                  ::testing::Contains(std::string(kOptimInputDeprecationWarning)))
          << method;
    };
    auto expect_silent = [](const std::string& method, const std::function<absl::Status()>& call) {
      WarningCapture capture;
      {
        c10::WarningUtils::WarningHandlerGuard guard(&capture);
        FSDP_EXPECT_OK(call()) << method;
      }
      EXPECT_THAT(capture.messages(), ::testing::IsEmpty()) << method;
    };
    FSDP_ASSERT_OK_AND_ASSIGN(port::Setup wrapped,
                              InitNested({.wrap = true, .group = Borrow(group)}));
    FSDP_ASSERT_OK(StepModel(wrapped, 2).status());
    // sharded_optim_state_dict / flatten_sharded_optim_state_dict take no optim_input.
    OptimStateDict sharded;
    expect_silent("sharded_optim_state_dict", [&]() -> absl::Status {
      FSDP_ASSIGN_OR_RETURN(sharded, ShardedOptimStateDict(*wrapped.fsdp, *wrapped.adapter));
      return absl::OkStatus();
    });
    expect_silent("flatten_sharded_optim_state_dict", [&] {
      return FlattenShardedOptimStateDict(sharded, *wrapped.fsdp, *wrapped.adapter).status();
    });
    OptimStateDict fsdp_osd;
    expect_warns("full_optim_state_dict", [&]() -> absl::Status {
      FSDP_ASSIGN_OR_RETURN(
          fsdp_osd, FullOptimStateDict(*wrapped.fsdp, *wrapped.adapter,
                                       {.rank0_only = false, .optim_input = wrapped.optim_input}));
      return absl::OkStatus();
    });
    expect_silent("full_optim_state_dict without optim_input", [&] {
      return FullOptimStateDict(*wrapped.fsdp, *wrapped.adapter, {.rank0_only = false}).status();
    });
    expect_warns("shard_full_optim_state_dict", [&] {
      return ShardFullOptimStateDict(fsdp_osd, *wrapped.fsdp, wrapped.optim_input).status();
    });
    expect_silent("shard_full_optim_state_dict with optim", [&] {
      return ShardFullOptimStateDict(fsdp_osd, *wrapped.fsdp, *wrapped.adapter).status();
    });
    expect_warns("scatter_full_optim_state_dict", [&] {
      return ScatterFullOptimStateDict(fsdp_osd, *wrapped.fsdp, wrapped.optim_input).status();
    });
    FSDP_ASSERT_OK_AND_ASSIGN(port::Setup nonwrapped,
                              InitNested({.wrap = false, .group = Borrow(group)}));
    expect_warns("rekey_optim_state_dict to IDs", [&] {
      return RekeyOptimStateDict(fsdp_osd, OptimStateKeyType::kParamId, *nonwrapped.module,
                                 nonwrapped.optim_input)
          .status();
    });
    FSDP_ASSERT_OK(StepModel(nonwrapped, 2).status());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd, nonwrapped.adapter->StateDict());
    expect_warns("rekey_optim_state_dict to names", [&] {
      return RekeyOptimStateDict(osd, OptimStateKeyType::kParamName, *nonwrapped.module,
                                 nonwrapped.optim_input)
          .status();
    });
    // An empty optim_input is refused with PyTorch's text (after the warning); one that lists
    // fewer parameters than the optimizer's state names is refused too (1.13: a KeyError).
    WarningCapture capture;
    c10::WarningUtils::WarningHandlerGuard guard(&capture);
    OptimInput short_input = wrapped.optim_input;
    short_input.groups[0].pop_back();
    EXPECT_THAT(FullOptimStateDict(*wrapped.fsdp, *wrapped.adapter,
                                   {.rank0_only = false, .optim_input = short_input}),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("is not a parameter ID of the optim_input")));
    EXPECT_THAT(ShardFullOptimStateDict(fsdp_osd, *wrapped.fsdp, OptimInput{}),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("Optimizer input should not be empty")));
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, OptimInputWarning, ::testing::Values(4, 3), WorldSizeName);

// ----------------------------------------------------------------
// test_save_load_without_0th_param_state

struct ZerothParams {
  int world_size;
  StateDictType state_dict_type;
};

class SaveLoadWithout0thParamState : public ::testing::TestWithParam<ZerothParams> {};
TEST_P(SaveLoadWithout0thParamState, test_save_load_without_0th_param_state) {
  const ZerothParams p = GetParam();
  RunInRanks(p.world_size, [p](comm::ProcessGroup& group) {
    models::UnusedFirstLayerModel model;
    FsdpOptions options;
    options.nested = {&model->lin1, &model->lin2};
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(model, Borrow(group), options));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(optim));
    auto step = [&] {
      optim.zero_grad();
      fsdp->forward(torch::randn({2, 5})).sum().backward();
      return adapter.Step();
    };
    FSDP_ASSERT_OK(step());
    OptimStateDict flattened_osd;
    if (p.state_dict_type == StateDictType::kFullStateDict) {
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict fsdp_osd,
                                FullOptimStateDict(*fsdp, adapter, {.rank0_only = false}));
      // Neither optim nor optim_input: the model's parameters() order, as PyTorch.
      FSDP_ASSERT_OK_AND_ASSIGN(flattened_osd, ShardFullOptimStateDict(fsdp_osd, *fsdp));
    } else {
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict fsdp_osd, ShardedOptimStateDict(*fsdp, adapter));
      FSDP_ASSERT_OK_AND_ASSIGN(flattened_osd,
                                FlattenShardedOptimStateDict(fsdp_osd, *fsdp, adapter));
    }
    // lin1 (the 0th unit's flat parameter) has no state.
    EXPECT_EQ(flattened_osd.state.Find(ParamKey::Id(0)), nullptr);
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict before, adapter.StateDict());
    FSDP_ASSERT_OK(adapter.LoadStateDict(flattened_osd));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after, adapter.StateDict());
    // (Not compared for order: the full dict lists positive-dimension state first, as 1.13.)
    ExpectSameState(after, before);
    FSDP_ASSERT_OK(step());
  });
}
INSTANTIATE_TEST_SUITE_P(All, SaveLoadWithout0thParamState,
                         ::testing::Values(ZerothParams{4, StateDictType::kFullStateDict},
                                           ZerothParams{4, StateDictType::kShardedStateDict},
                                           ZerothParams{3, StateDictType::kFullStateDict},
                                           ZerothParams{3, StateDictType::kShardedStateDict}),
                         [](const ::testing::TestParamInfo<ZerothParams>& info) {
                           return absl::StrCat("ws", info.param.world_size, "_",
                                               TypeName(info.param.state_dict_type));
                         });

}  // namespace
}  // namespace fsdp::optim_state::port
