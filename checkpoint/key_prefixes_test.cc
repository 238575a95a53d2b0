#include "checkpoint/key_prefixes.h"

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::StatusIs;
using optim_state::OptimStateDict;
using optim_state::ParamGroup;
using optim_state::ParamKey;
using optim_state::ParamState;
using optim_state::StateValue;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// NestedModel's names (models/nested_model.h) and a buffer.
ModelNames Nested() {
  ModelNames names;
  for (const char* name :
       {"bias", "block0.weight", "block0.bias_module0.bias", "block1.weight",
        "block1.bias_module0.bias", "block2.0.weight", "block2.1.bias_module1.bias"}) {
    names.parameters.insert(name);
  }
  names.buffers.insert("block2.0.running_mean");
  return names;
}

ModelStateDict ModelDict(const std::vector<std::string>& keys) {
  ModelStateDict dict;
  for (size_t i = 0; i < keys.size(); ++i) {
    dict.emplace_back(keys[i], torch::full({2}, static_cast<double>(i)));
  }
  return dict;
}

std::vector<std::string> Keys(const ModelStateDict& dict) {
  std::vector<std::string> keys;
  for (const auto& [key, tensor] : dict) keys.push_back(key);
  return keys;
}

// Adam-like state for `state_keys`, one group listing `group_keys`.
OptimStateDict OptimDict(const std::vector<std::string>& state_keys,
                         const std::vector<std::string>& group_keys) {
  OptimStateDict dict;
  for (size_t i = 0; i < state_keys.size(); ++i) {
    ParamState state;
    state.Set("exp_avg", StateValue(torch::full({2}, static_cast<double>(i))));
    dict.state.Set(ParamKey::Fqn(state_keys[i]), std::move(state));
  }
  ParamGroup group;
  group.hyper_params.Set("lr", StateValue(1e-3));
  for (const std::string& key : group_keys) group.params.push_back(ParamKey::Fqn(key));
  dict.param_groups.push_back(std::move(group));
  return dict;
}

std::vector<std::string> StateKeys(const OptimStateDict& dict) {
  std::vector<std::string> keys;
  for (const auto& [key, state] : dict.state) keys.push_back(key.fqn());
  return keys;
}

std::vector<std::string> GroupKeys(const OptimStateDict& dict, size_t g = 0) {
  std::vector<std::string> keys;
  for (const ParamKey& key : dict.param_groups[g].params) keys.push_back(key.fqn());
  return keys;
}

// The key forms PyTorch 2.13 gives NestedModel under each wrapper, as measured (see
// tests/optim_state/wrapped_checkpoints.py), each mapped back by the defaults.
TEST(StripKeyPrefixes, EveryPyTorchWrapperFormMapsToTheModelsName) {
  const std::vector<std::pair<std::string, std::string>> forms = {
      {"module.block0.weight", "block0.weight"},                          // DDP
      {"_orig_mod.block0.weight", "block0.weight"},                       // compile
      {"block2._checkpoint_wrapped_module.0.weight", "block2.0.weight"},  // ckpt wrapper
      {"_fsdp_wrapped_module.block1._fsdp_wrapped_module.bias_module0._fsdp_wrapped_module.bias",
       "block1.bias_module0.bias"},  // FSDP1
      {"_orig_mod.module.block2._checkpoint_wrapped_module.0.weight", "block2.0.weight"},
      {"module._orig_mod.bias", "bias"},
      {"block1._orig_mod.weight", "block1.weight"},  // torch.compile of a submodule
  };
  for (const auto& [key, name] : forms) {
    SCOPED_TRACE(key);
    FSDP_ASSERT_OK_AND_ASSIGN(
        ModelStateDict model,
        StripKeyPrefixes(ModelDict({key}), PyTorchKeyPrefixes(), Nested(), "m.pt"));
    EXPECT_THAT(Keys(model), ElementsAre(name));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict optim,
        StripKeyPrefixes(OptimDict({key}, {key}), PyTorchKeyPrefixes(), Nested(), "o.pt"));
    EXPECT_THAT(StateKeys(optim), ElementsAre(name));
    EXPECT_THAT(GroupKeys(optim), ElementsAre(name));
  }
}

TEST(StripKeyPrefixes, KeepsOrderValuesAndEverythingElse) {
  ModelStateDict in = ModelDict({"module.bias", "module.block0.weight", "module.block2.0.weight"});
  FSDP_ASSERT_OK_AND_ASSIGN(ModelStateDict out,
                            StripKeyPrefixes(in, PyTorchKeyPrefixes(), Nested(), "m.pt"));
  EXPECT_THAT(Keys(out), ElementsAre("bias", "block0.weight", "block2.0.weight"));
  for (size_t i = 0; i < in.size(); ++i) EXPECT_TRUE(out[i].second.is_same(in[i].second));

  OptimStateDict optim = OptimDict({"module.block1.weight", "module.bias"},
                                   {"module.bias", "module.block0.weight", "module.block1.weight"});
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict stripped,
                            StripKeyPrefixes(optim, PyTorchKeyPrefixes(), Nested(), "o.pt"));
  EXPECT_THAT(StateKeys(stripped), ElementsAre("block1.weight", "bias"));
  EXPECT_THAT(GroupKeys(stripped), ElementsAre("bias", "block0.weight", "block1.weight"));
  // The state that was under "module.block1.weight" is under "block1.weight".
  EXPECT_TRUE(stripped.state.Find(ParamKey::Fqn("block1.weight"))
                  ->Find("exp_avg")
                  ->Get<at::Tensor>()
                  .is_same(optim.state.at_index(0).second.Find("exp_avg")->Get<at::Tensor>()));
  EXPECT_EQ(stripped.param_groups[0].hyper_params.size(), 1u);
}

// A model whose own child is called "module" keeps it: an exact name is never stripped, and a
// leading prefix is removed only as far as needed.
TEST(StripKeyPrefixes, TheModelsOwnNamesWin) {
  ModelNames names;
  names.parameters = {"module.weight"};
  const KeyPrefixes ddp = {.leading = {"module."}, .levels = {}};
  FSDP_ASSERT_OK_AND_ASSIGN(ModelStateDict kept,
                            StripKeyPrefixes(ModelDict({"module.weight"}), ddp, names, "m.pt"));
  EXPECT_THAT(Keys(kept), ElementsAre("module.weight"));
  FSDP_ASSERT_OK_AND_ASSIGN(
      ModelStateDict stripped,
      StripKeyPrefixes(ModelDict({"module.module.weight"}), ddp, names, "m.pt"));
  EXPECT_THAT(Keys(stripped), ElementsAre("module.weight"));
  // Several leading prefixes in a row are each removed.
  names.parameters = {"weight"};
  FSDP_ASSERT_OK_AND_ASSIGN(
      ModelStateDict twice,
      StripKeyPrefixes(ModelDict({"module.module.weight"}), ddp, names, "m.pt"));
  EXPECT_THAT(Keys(twice), ElementsAre("weight"));
}

TEST(StripKeyPrefixes, TwoKeysThatBecomeOneNameAreRefused) {
  EXPECT_THAT(StripKeyPrefixes(ModelDict({"bias", "module.bias"}), PyTorchKeyPrefixes(), Nested(),
                               "ckpt/model.pt"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("ckpt/model.pt: keys \"bias\" and \"module.bias\" both name "
                                 "\"bias\"")));
}

TEST(StripKeyPrefixes, LeadingPrefixesOnlyAtTheStartLevelsOnlyAsWholeComponents) {
  ModelNames names;
  names.parameters = {"block.module.weight", "x_orig_mod.weight"};
  FSDP_ASSERT_OK_AND_ASSIGN(
      ModelStateDict out, StripKeyPrefixes(ModelDict({"block.module.weight", "x_orig_mod.weight"}),
                                           PyTorchKeyPrefixes(), names, "m.pt"));
  EXPECT_THAT(Keys(out), ElementsAre("block.module.weight", "x_orig_mod.weight"));
  // "module." inside a key is not DDP's: not removed, so the key names nothing.
  EXPECT_THAT(
      StripKeyPrefixes(ModelDict({"block0.module.weight"}), PyTorchKeyPrefixes(), Nested(), "m.pt"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("m.pt: key \"block0.module.weight\" names no parameter or "
                         "buffer of the model")));
}

// The first key (in the file's order) that names nothing is refused, with what it became and
// the prefixes that were stripped; nothing strips without being asked.
TEST(StripKeyPrefixes, RefusesTheFirstKeyThatNamesNothing) {
  EXPECT_THAT(StripKeyPrefixes(ModelDict({"bias", "_orig_mod.block0.weight", "_orig_mod.nope"}),
                               KeyPrefixes{}, Nested(), "ckpt/model.pt"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("ckpt/model.pt: key \"_orig_mod.block0.weight\" names no "
                                 "parameter or buffer of the model; key prefixes stripped: none")));
  EXPECT_THAT(
      StripKeyPrefixes(ModelDict({"net.block0.weight"}), PyTorchKeyPrefixes(), Nested(), "m.pt"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("key prefixes stripped: module.,._orig_mod.,._checkpoint_wrapped_module."
                         ",._fsdp_wrapped_module.")));
  EXPECT_THAT(
      StripKeyPrefixes(ModelDict({"module.block9.weight"}), PyTorchKeyPrefixes(), Nested(), "m.pt"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("\"module.block9.weight\" names no parameter or buffer of the "
                         "model (stripped to \"block9.weight\")")));
  // Optimizer dicts: "state" first, then each group's "params"; buffers are no parameters.
  EXPECT_THAT(StripKeyPrefixes(OptimDict({"bias"}, {"bias", "module.block0.weight", "x"}),
                               KeyPrefixes{}, Nested(), "ckpt/optim.pt"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("ckpt/optim.pt: param_groups[0]['params'][1] "
                                 "\"module.block0.weight\" names no parameter of the model")));
  EXPECT_THAT(StripKeyPrefixes(OptimDict({"bias", "module.block0.weight"}, {"y"}), KeyPrefixes{},
                               Nested(), "o.pt"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("o.pt: state key \"module.block0.weight\" names no parameter")));
  EXPECT_THAT(
      StripKeyPrefixes(OptimDict({"block2.0.running_mean"}, {}), KeyPrefixes{}, Nested(), "o.pt"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("\"block2.0.running_mean\" names no parameter of the model")));
  FSDP_EXPECT_OK(
      StripKeyPrefixes(ModelDict({"block2.0.running_mean"}), KeyPrefixes{}, Nested(), "m.pt"));
}

TEST(StripKeyPrefixes, RefusesParameterIdsAndMalformedPrefixes) {
  OptimStateDict by_id;
  by_id.state.Set(ParamKey::Id(0), ParamState{});
  EXPECT_THAT(StripKeyPrefixes(by_id, PyTorchKeyPrefixes(), Nested(), "o.pt"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("o.pt: state key 0 is a parameter ID")));
  for (const KeyPrefixes& bad : {KeyPrefixes{{"module"}, {}}, KeyPrefixes{{}, {""}},
                                 KeyPrefixes{{"a..b."}, {}}, KeyPrefixes{{}, {".x."}}}) {
    EXPECT_THAT(StripKeyPrefixes(ModelDict({"bias"}), bad, Nested(), "m.pt"),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("key prefix \"")));
  }
}

TEST(ParseKeyPrefixes, Syntax) {
  FSDP_ASSERT_OK_AND_ASSIGN(KeyPrefixes none, ParseKeyPrefixes(""));
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(KeyPrefixesToString(none), "none");
  FSDP_ASSERT_OK_AND_ASSIGN(KeyPrefixes pytorch, ParseKeyPrefixes("pytorch"));
  EXPECT_EQ(pytorch.leading, PyTorchKeyPrefixes().leading);
  EXPECT_EQ(pytorch.levels, PyTorchKeyPrefixes().levels);
  FSDP_ASSERT_OK_AND_ASSIGN(KeyPrefixes mixed,
                            ParseKeyPrefixes("net.,pytorch,._my_wrapped.,module.,outer.inner."));
  EXPECT_THAT(mixed.leading, ElementsAre("net.", "module.", "outer.inner."));
  EXPECT_THAT(mixed.levels, ElementsAre("_orig_mod.", "_checkpoint_wrapped_module.",
                                        "_fsdp_wrapped_module.", "_my_wrapped."));
  // The string form reads back as the same prefixes.
  FSDP_ASSERT_OK_AND_ASSIGN(KeyPrefixes again, ParseKeyPrefixes(KeyPrefixesToString(mixed)));
  EXPECT_EQ(again.leading, mixed.leading);
  EXPECT_EQ(again.levels, mixed.levels);
  for (const char* bad : {"net", "pytorch,.x", "..x.", "a..b.", "torch"}) {
    EXPECT_THAT(ParseKeyPrefixes(bad),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("cannot read")))
        << bad;
  }
}

// Names from a real LibTorch module: parameters and buffers under every name, recursively.
TEST(ModelNames, OfAModule) {
  struct Inner : torch::nn::Module {
    Inner() {
      register_parameter("weight", torch::ones({2}));
      register_buffer("count", torch::zeros({1}));
    }
  };
  struct Outer : torch::nn::Module {
    Outer() {
      register_parameter("scale", torch::ones({1}));
      register_module("module", std::make_shared<Inner>());
    }
  };
  const ModelNames names = ModelNames::Of(Outer());
  EXPECT_THAT(names.parameters, ::testing::UnorderedElementsAre("scale", "module.weight"));
  EXPECT_THAT(names.buffers, ::testing::UnorderedElementsAre("module.count"));
}

}  // namespace
}  // namespace fsdp::checkpoint
