// OptimizerAdapter against PyTorch itself: testdata/optimizer_oracle.py trains a small model
// with torch.optim (PyTorch 2.13, the project's venv: tools/python) and dumps each step's
// gradients and `optim.state_dict()`; the tests feed LibTorch's optimizers the same gradients
// and compare dicts (names, order, types, shapes, values, hyper-parameters, param_groups).
// Then: save -> load -> step equals continuing, extras survive, and every load error with its
// text, the optimizer unchanged afterwards.
#include "optim_state/optimizer_adapter.h"

#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "optim_state/optim_state_dict.h"
#include "tools/python_testutil.h"

namespace fsdp::optim_state {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::StatusIs;
using ::nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// LibTorch and torch.optim run the same float32 arithmetic (today bit for bit; the
// tolerance leaves room for other thread counts and kernels).
constexpr Tolerance kPythonTolerance{.rtol = 1e-6, .atol = 1e-6};

// ---------------------------------------------------------------------------------------
// The oracle's JSON

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

// Runs testdata/optimizer_oracle.py once per test binary; null (with a failure) if it fails.
const json& Oracle() {
  static const json* oracle = [] {
    torch::set_num_threads(1);  // as the script does
    const char* srcdir = std::getenv("TEST_SRCDIR");
    const char* tmpdir = std::getenv("TEST_TMPDIR");
    if (srcdir == nullptr || tmpdir == nullptr) {
      ADD_FAILURE() << "TEST_SRCDIR and TEST_TMPDIR must be set (run under bazel test)";
      return new json();
    }
    const std::string script =
        std::string(srcdir) + "/fsdp_cpp/optim_state/testdata/optimizer_oracle.py";
    const std::string out = std::string(tmpdir) + "/optimizer_oracle.json";
    const std::string err = std::string(tmpdir) + "/optimizer_oracle.stderr";
    const std::string command = fsdp::testing::PythonCommand() + " '" + script + "' '" + out + "' 2>'" + err + "'";
    if (std::system(command.c_str()) != 0) {
      ADD_FAILURE() << "`" << command << "` failed:\n" << ReadFile(err);
      return new json();
    }
    return new json(json::parse(ReadFile(out)));
  }();
  return *oracle;
}

at::ScalarType DtypeFromName(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float64") return at::kDouble;
  if (name == "int64") return at::kLong;
  if (name == "bool") return at::kBool;
  ADD_FAILURE() << "unexpected dtype " << name;
  return at::kFloat;
}

at::Tensor DecodeTensor(const json& j) {
  const auto values = j.at("values").get<std::vector<double>>();
  const auto shape = j.at("shape").get<std::vector<int64_t>>();
  return torch::tensor(values, torch::kDouble)
      .to(DtypeFromName(j.at("dtype").get<std::string>()))
      .reshape(shape);
}

StateValue DecodeValue(const json& j) {
  const std::string type = j.at("type").get<std::string>();
  if (type == "none") return StateValue::None();
  if (type == "bool") return j.at("value").get<bool>();
  if (type == "int") return j.at("value").get<int64_t>();
  if (type == "float") return j.at("value").get<double>();
  if (type == "str") return j.at("value").get<std::string>();
  if (type == "tensor") return DecodeTensor(j);
  std::vector<StateValue> items;
  for (const json& item : j.at("items")) items.push_back(DecodeValue(item));
  return type == "tuple" ? StateValue::Tuple(std::move(items)) : StateValue::List(std::move(items));
}

OptimStateDict DecodeStateDict(const json& j) {
  OptimStateDict dict;
  for (const json& entry : j.at("state")) {
    ParamState state;
    for (const json& named : entry.at(1)) {
      state.Set(named.at(0).get<std::string>(), DecodeValue(named.at(1)));
    }
    dict.state.Set(ParamKey::Id(entry.at(0).get<int64_t>()), std::move(state));
  }
  for (const json& g : j.at("param_groups")) {
    ParamGroup group;
    for (const json& named : g.at("hyper")) {
      group.hyper_params.Set(named.at(0).get<std::string>(), DecodeValue(named.at(1)));
    }
    for (const json& id : g.at("params")) group.params.push_back(ParamKey::Id(id.get<int64_t>()));
    dict.param_groups.push_back(std::move(group));
  }
  return dict;
}

// ---------------------------------------------------------------------------------------
// The model and optimizers (mirrors CASES in optimizer_oracle.py)

// 0.weight [4, 3], 0.bias [4], 2.weight [2, 4], 2.bias [2], frozen [3] (never has a gradient).
constexpr int kNumParams = 5;

struct OptimizerCase {
  std::string name;
  // Builds the optimizer over groups [params 0-1] (defaults) and [params 2-4] (overrides).
  std::function<std::unique_ptr<torch::optim::Optimizer>(const std::vector<at::Tensor>&)> make;
};

template <typename Optim, typename Options>
std::unique_ptr<torch::optim::Optimizer> MakeTwoGroups(const std::vector<at::Tensor>& params,
                                                       const Options& defaults,
                                                       const Options& group1) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<at::Tensor>{params[0], params[1]});
  groups.emplace_back(std::vector<at::Tensor>{params[2], params[3], params[4]},
                      std::make_unique<Options>(group1));
  return std::make_unique<Optim>(std::move(groups), defaults);
}

std::vector<OptimizerCase> Cases() {
  using namespace torch::optim;  // NOLINT
  using Params = std::vector<at::Tensor>;
  return {
      {"Adam",
       [](const Params& p) {
         return MakeTwoGroups<Adam>(p, AdamOptions(0.01), AdamOptions(0.02).weight_decay(0.1));
       }},
      {"AdamAmsgrad",
       [](const Params& p) {
         return MakeTwoGroups<Adam>(p, AdamOptions(0.01).amsgrad(true),
                                    AdamOptions(0.01).amsgrad(true).weight_decay(0.1));
       }},
      {"AdamW",
       [](const Params& p) {
         return MakeTwoGroups<AdamW>(p, AdamWOptions(0.01), AdamWOptions(0.01).weight_decay(0.05));
       }},
      {"AdamWAmsgrad",
       [](const Params& p) {
         return MakeTwoGroups<AdamW>(p, AdamWOptions(0.01).amsgrad(true),
                                     AdamWOptions(0.02).amsgrad(true));
       }},
      {"SGD",
       [](const Params& p) {
         return MakeTwoGroups<SGD>(p, SGDOptions(0.1), SGDOptions(0.05).weight_decay(0.1));
       }},
      {"SGDMomentum",
       [](const Params& p) {
         return MakeTwoGroups<SGD>(p, SGDOptions(0.1).momentum(0.9).dampening(0.1),
                                   SGDOptions(0.1).momentum(0.9).dampening(0.1).weight_decay(0.1));
       }},
      {"SGDNesterov",
       [](const Params& p) {
         return MakeTwoGroups<SGD>(p, SGDOptions(0.1).momentum(0.9).nesterov(true),
                                   SGDOptions(0.05).momentum(0.9).nesterov(true));
       }},
      {"Adagrad",
       [](const Params& p) {
         auto defaults = AdagradOptions(0.1).lr_decay(0.01).initial_accumulator_value(0.1);
         auto group1 = defaults;
         group1.weight_decay(0.1);
         return MakeTwoGroups<Adagrad>(p, defaults, group1);
       }},
      {"RMSprop",
       [](const Params& p) {
         return MakeTwoGroups<RMSprop>(p, RMSpropOptions(0.01),
                                       RMSpropOptions(0.01).weight_decay(0.1));
       }},
      {"RMSpropCenteredMomentum",
       [](const Params& p) {
         return MakeTwoGroups<RMSprop>(
             p, RMSpropOptions(0.01).momentum(0.9).centered(true),
             RMSpropOptions(0.01).momentum(0.9).centered(true).alpha(0.9));
       }},
  };
}

const OptimizerCase& CaseNamed(const std::string& name) {
  static const auto* cases = new std::vector<OptimizerCase>(Cases());
  for (const OptimizerCase& c : *cases) {
    if (c.name == name) return c;
  }
  ADD_FAILURE() << "no case " << name;
  return cases->front();
}

// Leaf parameters with the oracle's values (`which`: "initial_params", "params", ...).
std::vector<at::Tensor> ParamsFrom(const json& oracle_case, const std::string& which) {
  std::vector<at::Tensor> params;
  for (int i = 0; i < kNumParams; ++i) {
    at::Tensor p = DecodeTensor(oracle_case.at(which).at(i)).detach().clone();
    p.set_requires_grad(i != kNumParams - 1);  // the last one is frozen
    params.push_back(p);
  }
  return params;
}

// A model's parameters and an optimizer with its adapter.
struct Trainer {
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<OptimizerAdapter> adapter;
};

Trainer MakeTrainer(const std::string& case_name, std::vector<at::Tensor> params) {
  Trainer t;
  t.params = std::move(params);
  t.optimizer = CaseNamed(case_name).make(t.params);
  auto adapter = OptimizerAdapter::Create(*t.optimizer);
  EXPECT_THAT(adapter, IsOk());
  if (adapter.ok()) t.adapter = std::make_unique<OptimizerAdapter>(std::move(adapter).value());
  return t;
}

// Steps [from, to) of the oracle's gradients.
void RunSteps(Trainer& t, const json& oracle_case, int from, int to) {
  for (int step = from; step < to; ++step) {
    for (int i = 0; i < kNumParams; ++i) {
      const json& g = oracle_case.at("grads").at(step).at(i);
      t.params[i].mutable_grad() = g.is_null() ? at::Tensor() : DecodeTensor(g);
    }
    ASSERT_THAT(t.adapter->Step(), IsOk());
  }
}

OptimStateDict SavedCopy(const OptimizerAdapter& adapter) {
  auto dict = adapter.StateDict();
  EXPECT_THAT(dict, IsOk());
  return dict.ok() ? CloneOptimStateDict(*dict) : OptimStateDict();
}

void ExpectParamsNear(const std::vector<at::Tensor>& params, const json& expected,
                      Tolerance tolerance) {
  for (int i = 0; i < kNumParams; ++i) {
    EXPECT_EQ(DiffStateValues(DecodeTensor(expected.at(i)), params[i].detach(), tolerance), "")
        << "parameter " << i;
  }
}

// ---------------------------------------------------------------------------------------
// Parametrized over the optimizers

class OptimizerAdapterTest : public ::testing::TestWithParam<std::string> {
 protected:
  const json& OracleCase() const { return Oracle().at("cases").at(GetParam()); }
  int Steps() const { return Oracle().at("steps").get<int>(); }
};

TEST_P(OptimizerAdapterTest, StateDictMatchesPythonAfterSteps) {
  ASSERT_FALSE(Oracle().is_null());
  Trainer t = MakeTrainer(GetParam(), ParamsFrom(OracleCase(), "initial_params"));
  ASSERT_NE(t.adapter, nullptr);
  RunSteps(t, OracleCase(), 0, Steps());
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict dict, t.adapter->StateDict());
  const OptimStateDict expected = DecodeStateDict(OracleCase().at("state_dict"));
  EXPECT_EQ(DiffOptimStateDicts(expected, dict, kPythonTolerance), "")
      << "C++:    " << dict << "\nPython: " << expected;
  ExpectParamsNear(t.params, OracleCase().at("params"), kPythonTolerance);
}

TEST_P(OptimizerAdapterTest, LoadsPythonStateDictAndContinuesLikePython) {
  ASSERT_FALSE(Oracle().is_null());
  Trainer t = MakeTrainer(GetParam(), ParamsFrom(OracleCase(), "params"));
  ASSERT_NE(t.adapter, nullptr);
  const OptimStateDict python = DecodeStateDict(OracleCase().at("state_dict"));
  ASSERT_THAT(t.adapter->LoadStateDict(python), IsOk());
  // Saving right away gives back exactly what Python saved.
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict reloaded, t.adapter->StateDict());
  EXPECT_EQ(DiffOptimStateDicts(python, reloaded), "");
  // One more step matches Python's next step.
  RunSteps(t, OracleCase(), Steps(), Steps() + 1);
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict next, t.adapter->StateDict());
  EXPECT_EQ(DiffOptimStateDicts(DecodeStateDict(OracleCase().at("state_dict_next")), next,
                                kPythonTolerance),
            "");
  ExpectParamsNear(t.params, OracleCase().at("params_next"), kPythonTolerance);
}

TEST_P(OptimizerAdapterTest, SaveLoadIntoFreshOptimizerThenStepEqualsContinuing) {
  ASSERT_FALSE(Oracle().is_null());
  Trainer original = MakeTrainer(GetParam(), ParamsFrom(OracleCase(), "initial_params"));
  ASSERT_NE(original.adapter, nullptr);
  RunSteps(original, OracleCase(), 0, Steps());
  const OptimStateDict saved = SavedCopy(*original.adapter);

  std::vector<at::Tensor> copies;
  for (const at::Tensor& p : original.params) {
    copies.push_back(p.detach().clone().set_requires_grad(p.requires_grad()));
  }
  Trainer fresh = MakeTrainer(GetParam(), std::move(copies));
  ASSERT_NE(fresh.adapter, nullptr);
  ASSERT_THAT(fresh.adapter->LoadStateDict(saved), IsOk());
  EXPECT_EQ(DiffOptimStateDicts(saved, SavedCopy(*fresh.adapter)), "");

  RunSteps(original, OracleCase(), Steps(), Steps() + 1);
  RunSteps(fresh, OracleCase(), Steps(), Steps() + 1);
  EXPECT_EQ(DiffOptimStateDicts(SavedCopy(*original.adapter), SavedCopy(*fresh.adapter)), "");
  for (int i = 0; i < kNumParams; ++i) {
    EXPECT_TRUE(original.params[i].equal(fresh.params[i])) << "parameter " << i;
  }
}

TEST_P(OptimizerAdapterTest, ExtrasSurviveSaveLoadSaveAndSteps) {
  ASSERT_FALSE(Oracle().is_null());
  Trainer original = MakeTrainer(GetParam(), ParamsFrom(OracleCase(), "initial_params"));
  ASSERT_NE(original.adapter, nullptr);
  RunSteps(original, OracleCase(), 0, Steps());
  // As PyTorch's test: `for state in optim.state.values(): state["value1"] = 2.74; ...`.
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict before, original.adapter->StateDict());
  for (int i = 0; i < kNumParams; ++i) {
    if (!before.state.Contains(ParamKey::Id(i))) continue;
    ASSERT_THAT(original.adapter->SetExtraState(original.params[i], "value1", 2.74), IsOk());
    ASSERT_THAT(original.adapter->SetExtraState(original.params[i], "value2", StateValue::None()),
                IsOk());
  }
  ASSERT_THAT(original.adapter->SetExtraHyperParam(1, "initial_lr", 0.5), IsOk());
  const OptimStateDict saved = SavedCopy(*original.adapter);
  ASSERT_EQ(saved.state.Keys(), before.state.Keys());
  for (const auto& [key, state] : saved.state) {
    std::vector<std::string> names = before.state.Find(key)->Keys();
    names.push_back("value1");
    names.push_back("value2");
    EXPECT_EQ(state.Keys(), names) << "parameter " << key.ToString();
    EXPECT_EQ(*state.Find("value1"), StateValue(2.74));
    EXPECT_TRUE(state.Find("value2")->IsNone());
  }
  EXPECT_EQ(saved.param_groups[1].hyper_params.Keys().back(), "initial_lr");

  Trainer fresh = MakeTrainer(GetParam(), ParamsFrom(OracleCase(), "params"));
  ASSERT_NE(fresh.adapter, nullptr);
  ASSERT_THAT(fresh.adapter->LoadStateDict(saved), IsOk());
  EXPECT_EQ(DiffOptimStateDicts(saved, SavedCopy(*fresh.adapter)), "");
  // (SGD without momentum keeps no state in PyTorch 2.x, so no parameter got extras.)
  if (saved.state.Contains(ParamKey::Id(1))) {
    const StateValue* value1 = fresh.adapter->FindExtraState(fresh.params[1], "value1");
    ASSERT_NE(value1, nullptr);
    EXPECT_EQ(*value1, StateValue(2.74));
  }

  // A step changes the optimizer's own state, not the extras.
  RunSteps(fresh, OracleCase(), Steps(), Steps() + 1);
  const OptimStateDict after = SavedCopy(*fresh.adapter);
  for (const auto& [key, state] : saved.state) {
    const ParamState* now = after.state.Find(key);
    ASSERT_NE(now, nullptr);
    EXPECT_EQ(now->Keys(), state.Keys());
    EXPECT_EQ(*now->Find("value1"), StateValue(2.74));
  }
  EXPECT_EQ(*after.param_groups[1].hyper_params.Find("initial_lr"), StateValue(0.5));
}

INSTANTIATE_TEST_SUITE_P(Optimizers, OptimizerAdapterTest,
                         ::testing::Values("Adam", "AdamAmsgrad", "AdamW", "AdamWAmsgrad", "SGD",
                                           "SGDMomentum", "SGDNesterov", "Adagrad", "RMSprop",
                                           "RMSpropCenteredMomentum"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// ---------------------------------------------------------------------------------------
// Specific behaviour

TEST(OptimizerAdapterStateDict, ListsParametersInTheOrderTheyGainedState) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("Adam");
  Trainer t = MakeTrainer("Adam", ParamsFrom(c, "initial_params"));
  ASSERT_NE(t.adapter, nullptr);
  RunSteps(t, c, 0,
           2);  // 0.weight has no gradient at the first step; frozen never has one
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict dict, t.adapter->StateDict());
  EXPECT_THAT(dict.state.Keys(),
              ElementsAre(ParamKey::Id(1), ParamKey::Id(2), ParamKey::Id(3), ParamKey::Id(0)));
  EXPECT_EQ(*dict.state.Find(ParamKey::Id(0))->Find("step"), StateValue(at::scalar_tensor(1.0)));
  EXPECT_EQ(*dict.state.Find(ParamKey::Id(1))->Find("step"), StateValue(at::scalar_tensor(2.0)));
  ASSERT_EQ(dict.param_groups.size(), 2u);
  EXPECT_THAT(dict.param_groups[1].params,
              ElementsAre(ParamKey::Id(2), ParamKey::Id(3), ParamKey::Id(4)));
}

// PyTorch 2.x: SGD without momentum keeps no state (1.13 recorded momentum_buffer=None).
TEST(OptimizerAdapterStateDict, SgdWithoutMomentumKeepsNoState) {
  at::Tensor p = torch::ones({2}, torch::requires_grad());
  at::Tensor q = torch::ones({2}, torch::requires_grad());
  torch::optim::SGD sgd(std::vector<at::Tensor>{p, q}, torch::optim::SGDOptions(0.1));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(sgd));
  p.mutable_grad() = torch::ones({2});
  ASSERT_THAT(adapter.Step(), IsOk());
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict dict, adapter.StateDict());
  EXPECT_THAT(dict.state.Keys(), ::testing::IsEmpty());
  EXPECT_EQ(*dict.param_groups[0].hyper_params.Find("momentum"),
            StateValue(0));  // an int
}

TEST(OptimizerAdapterCreate, RefusesUnsupportedOptimizer) {
  at::Tensor p = torch::ones({2}, torch::requires_grad());
  torch::optim::LBFGS lbfgs(std::vector<at::Tensor>{p});
  EXPECT_THAT(OptimizerAdapter::Create(lbfgs),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unsupported optimizer")));
}

TEST(OptimizerAdapterExtras, RefusesOptimizerStateNamesAndForeignTensors) {
  at::Tensor p = torch::ones({2}, torch::requires_grad());
  torch::optim::Adam adam(std::vector<at::Tensor>{p});
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(adam));
  EXPECT_THAT(
      adapter.SetExtraState(p, "exp_avg", 1.0),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'exp_avg' is optimizer state")));
  EXPECT_THAT(adapter.SetExtraState(torch::ones({2}), "value1", 1.0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a parameter")));
  EXPECT_THAT(adapter.SetExtraHyperParam(0, "lr", 1.0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("held by LibTorch")));
  EXPECT_THAT(adapter.SetExtraHyperParam(0, "maximize", true),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("can only minimize")));
  EXPECT_THAT(adapter.SetExtraHyperParam(1, "initial_lr", 1.0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
}

// ---------------------------------------------------------------------------------------
// Load errors: each refused with its text, the optimizer unchanged

struct LoadErrorCase {
  std::string name;
  std::function<void(OptimStateDict&)> corrupt;  // applied to a valid Adam dict
  std::string message;
};

class OptimizerAdapterLoadErrorTest : public ::testing::TestWithParam<LoadErrorCase> {};

TEST_P(OptimizerAdapterLoadErrorTest, RefusesAndLeavesOptimizerUnchanged) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("Adam");
  // The target has state (and differs from the dict) so that any change would show.
  Trainer t = MakeTrainer("Adam", ParamsFrom(c, "initial_params"));
  ASSERT_NE(t.adapter, nullptr);
  RunSteps(t, c, 0, 1);
  ASSERT_THAT(t.adapter->SetExtraState(t.params[1], "value1", 1.5), IsOk());
  const OptimStateDict before = SavedCopy(*t.adapter);

  OptimStateDict dict = DecodeStateDict(c.at("state_dict"));
  GetParam().corrupt(dict);
  EXPECT_THAT(t.adapter->LoadStateDict(dict),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("LoadStateDict (Adam): " + GetParam().message)));
  EXPECT_EQ(DiffOptimStateDicts(before, SavedCopy(*t.adapter)), "");
}

at::Tensor Zeros(std::vector<int64_t> shape) { return torch::zeros(shape); }

INSTANTIATE_TEST_SUITE_P(
    Corruptions, OptimizerAdapterLoadErrorTest,
    ::testing::Values(
        LoadErrorCase{"DifferentNumberOfGroups",
                      [](OptimStateDict& d) { d.param_groups.pop_back(); },
                      "loaded state dict has a different number of parameter groups"},
        LoadErrorCase{"GroupSizeMismatch",
                      [](OptimStateDict& d) { d.param_groups[1].params.pop_back(); },
                      "loaded state dict contains a parameter group that doesn't match "
                      "the size "
                      "of optimizer's group"},
        LoadErrorCase{"WrongShape",
                      [](OptimStateDict& d) {
                        d.state.Find(ParamKey::Id(0))->Set("exp_avg_sq", Zeros({3, 4}));
                      },
                      "parameter 0: state 'exp_avg_sq' has shape [3, 4], but the "
                      "parameter has "
                      "shape [4, 3]"},
        LoadErrorCase{"MissingState",
                      [](OptimStateDict& d) { d.state.Find(ParamKey::Id(3))->Erase("exp_avg"); },
                      "parameter 3: state 'exp_avg' is missing"},
        LoadErrorCase{"NotATensor",
                      [](OptimStateDict& d) { d.state.Find(ParamKey::Id(0))->Set("exp_avg", "x"); },
                      "parameter 0: state 'exp_avg' must be a tensor, got str ('x')"},
        LoadErrorCase{
            "IntegerTensor",
            [](OptimStateDict& d) {
              d.state.Find(ParamKey::Id(2))->Set("exp_avg", torch::zeros({2, 4}, torch::kLong));
            },
            "parameter 2: state 'exp_avg' must be a floating-point "
            "tensor, got int64"},
        LoadErrorCase{"FractionalStep",
                      [](OptimStateDict& d) { d.state.Find(ParamKey::Id(0))->Set("step", 2.5); },
                      "parameter 0: state 'step' must be a non-negative whole number"},
        LoadErrorCase{"OtherOptimizersState",
                      [](OptimStateDict& d) {
                        d.state.Find(ParamKey::Id(0))->Set("momentum_buffer", Zeros({4, 3}));
                      },
                      "parameter 0: state 'momentum_buffer' is not state of Adam"},
        LoadErrorCase{"StateKeyedByName",
                      [](OptimStateDict& d) { d.state.Set(ParamKey::Fqn("0.weight"), {}); },
                      "state is keyed by parameter name '0.weight'"},
        LoadErrorCase{"StateOfUnknownId",
                      [](OptimStateDict& d) { d.state.Set(ParamKey::Id(9), {}); },
                      "state has parameter ID 9, which is in no parameter group"},
        LoadErrorCase{"DuplicateIdInGroups",
                      [](OptimStateDict& d) { d.param_groups[1].params[2] = ParamKey::Id(0); },
                      "parameter ID 0 appears more than once in param_groups"},
        LoadErrorCase{"HyperParamOfWrongType",
                      [](OptimStateDict& d) { d.param_groups[1].hyper_params.Set("lr", "fast"); },
                      "param_groups[1]['lr'] must be a number, got str ('fast')"},
        LoadErrorCase{"BetasNotAPair",
                      [](OptimStateDict& d) {
                        d.param_groups[1].hyper_params.Set("betas", StateValue::Tuple({0.9}));
                      },
                      "param_groups[1]['betas'] must be a pair of numbers, got "
                      "tuple ((0.9,))"},
        LoadErrorCase{
            "Maximize",
            [](OptimStateDict& d) { d.param_groups[1].hyper_params.Set("maximize", true); },
            "param_groups[1]['maximize'] is True, but LibTorch's "
            "Adam can only minimize"},
        LoadErrorCase{"MissingLearningRate",
                      [](OptimStateDict& d) { d.param_groups[1].hyper_params.Erase("lr"); },
                      "param_groups[1] has no 'lr', which Adam needs"},
        LoadErrorCase{
            "AmsgradWithoutMaxExpAvgSq",
            [](OptimStateDict& d) { d.param_groups[1].hyper_params.Set("amsgrad", true); },
            "parameter 2: state 'max_exp_avg_sq' is missing"}),
    [](const ::testing::TestParamInfo<LoadErrorCase>& info) { return info.param.name; });

TEST(OptimizerAdapterLoad, RefusesAdamStateIntoSgdNamingParameterAndState) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("SGDMomentum");
  Trainer t = MakeTrainer("SGDMomentum", ParamsFrom(c, "initial_params"));
  ASSERT_NE(t.adapter, nullptr);
  RunSteps(t, c, 0, 2);
  const OptimStateDict before = SavedCopy(*t.adapter);
  const OptimStateDict adam = DecodeStateDict(Oracle().at("cases").at("Adam").at("state_dict"));
  EXPECT_THAT(t.adapter->LoadStateDict(adam),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("LoadStateDict (SGD): parameter 1: state 'step' is not state of "
                                 "SGD (SGD keeps 'momentum_buffer'); is this another "
                                 "optimizer's state dict?")));
  EXPECT_EQ(DiffOptimStateDicts(before, SavedCopy(*t.adapter)), "");
}

TEST(OptimizerAdapterLoad, RefusesSgdStateIntoAdam) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("Adam");
  Trainer t = MakeTrainer("Adam", ParamsFrom(c, "initial_params"));
  ASSERT_NE(t.adapter, nullptr);
  const OptimStateDict sgd =
      DecodeStateDict(Oracle().at("cases").at("SGDMomentum").at("state_dict"));
  EXPECT_THAT(t.adapter->LoadStateDict(sgd),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("parameter 1: state 'momentum_buffer' is not state of Adam")));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after, t.adapter->StateDict());
  EXPECT_TRUE(after.state.empty());
}

TEST(OptimizerAdapterLoad, AdagradNeedsStateForEveryParameter) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("Adagrad");
  Trainer t = MakeTrainer("Adagrad", ParamsFrom(c, "initial_params"));
  ASSERT_NE(t.adapter, nullptr);
  const OptimStateDict before = SavedCopy(*t.adapter);
  OptimStateDict dict = DecodeStateDict(c.at("state_dict"));
  dict.state.Erase(ParamKey::Id(4));
  EXPECT_THAT(t.adapter->LoadStateDict(dict),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("LoadStateDict (Adagrad): parameter 4: state 'sum' is missing")));
  EXPECT_EQ(DiffOptimStateDicts(before, SavedCopy(*t.adapter)), "");
}

// With use_orig_params, a rank's slice of a parameter held wholly by other ranks is empty and
// FSDP's dicts give it no state; Adagrad (which keeps state for every parameter) starts it
// afresh instead of refusing the dict.
TEST(OptimizerAdapterLoad, AdagradGivesAnEmptyParameterWithoutStateItsInitialState) {
  at::Tensor full = torch::ones({3}, torch::requires_grad());
  at::Tensor empty = torch::ones({0}, torch::requires_grad());
  torch::optim::Adagrad adagrad(std::vector<at::Tensor>{full, empty},
                                torch::optim::AdagradOptions(0.1));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(adagrad));
  OptimStateDict dict = SavedCopy(adapter);
  ParamState loaded;
  loaded.Set("step", StateValue(torch::tensor(4.0f)));
  loaded.Set("sum", StateValue(torch::full({3}, 2.0f)));
  dict.state = {};
  dict.state.Set(ParamKey::Id(0), std::move(loaded));
  ASSERT_THAT(adapter.LoadStateDict(dict), IsOk());
  full.mutable_grad() = torch::ones({3});
  empty.mutable_grad() = torch::ones({0});
  ASSERT_THAT(adapter.Step(), IsOk());
  const OptimStateDict after = SavedCopy(adapter);
  EXPECT_EQ(after.state.Find(ParamKey::Id(0))->Find("step")->GetIf<at::Tensor>()->item<float>(),
            5.0f);
  const ParamState* started = after.state.Find(ParamKey::Id(1));
  ASSERT_NE(started, nullptr);
  EXPECT_EQ(started->Find("sum")->GetIf<at::Tensor>()->numel(), 0);
}

// PyTorch 2.x: Adam with decoupled_weight_decay=True is AdamW, which LibTorch's Adam is not;
// AdamW's own dicts always say True after a load (AdamW.__setstate__).
TEST(OptimizerAdapterLoad, DecoupledWeightDecayIsRefusedByAdamAndForcedByAdamW) {
  at::Tensor p = torch::ones({2}, torch::requires_grad());
  torch::optim::Adam adam(std::vector<at::Tensor>{p}, torch::optim::AdamOptions(0.1));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adam_adapter, OptimizerAdapter::Create(adam));
  OptimStateDict dict = SavedCopy(adam_adapter);
  dict.param_groups[0].hyper_params.Set("decoupled_weight_decay", true);
  EXPECT_THAT(adam_adapter.LoadStateDict(dict),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("param_groups[0]['decoupled_weight_decay'] is True, but "
                                 "LibTorch's Adam couples weight decay")));

  torch::optim::AdamW adamw(std::vector<at::Tensor>{p}, torch::optim::AdamWOptions(0.1));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adamw_adapter, OptimizerAdapter::Create(adamw));
  dict = SavedCopy(adamw_adapter);
  EXPECT_EQ(*dict.param_groups[0].hyper_params.Find("decoupled_weight_decay"), StateValue(true));
  dict.param_groups[0].hyper_params.Set("decoupled_weight_decay", false);
  ASSERT_THAT(adamw_adapter.LoadStateDict(dict), IsOk());
  EXPECT_EQ(*SavedCopy(adamw_adapter).param_groups[0].hyper_params.Find("decoupled_weight_decay"),
            StateValue(true));
}

TEST(OptimizerAdapterLoad, DictWithoutParamGroupsKeepsHyperParameters) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("Adam");
  Trainer t = MakeTrainer("Adam", ParamsFrom(c, "params"));
  ASSERT_NE(t.adapter, nullptr);
  OptimStateDict dict = DecodeStateDict(c.at("state_dict"));
  const std::vector<ParamGroup> groups = dict.param_groups;
  dict.param_groups.clear();
  dict.has_param_groups = false;
  ASSERT_THAT(t.adapter->LoadStateDict(dict), IsOk());
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, t.adapter->StateDict());
  dict.param_groups = groups;
  dict.has_param_groups = true;
  EXPECT_EQ(DiffOptimStateDicts(dict, saved), "");
}

// The rvalue LoadStateDict takes the dict's tensors as the optimizer's state (no copy), the
// const& one copies them; a tensor given for two states is taken once and copied for the other,
// so two states never share memory (Adam would update both through one buffer).
TEST(OptimizerAdapterLoad, RvalueLoadAdoptsTensorsButNeverSharesOneBetweenStates) {
  ASSERT_FALSE(Oracle().is_null());
  const json& c = Oracle().at("cases").at("Adam");
  auto exp_avg_of = [](const OptimStateDict& d, const ParamKey& key, const char* name) {
    return d.state.Find(key)->Find(name)->Get<at::Tensor>();
  };
  Trainer copied = MakeTrainer("Adam", ParamsFrom(c, "params"));
  Trainer adopted = MakeTrainer("Adam", ParamsFrom(c, "params"));
  ASSERT_NE(copied.adapter, nullptr);
  ASSERT_NE(adopted.adapter, nullptr);
  OptimStateDict dict = DecodeStateDict(c.at("state_dict"));
  const ParamKey key = ParamKey::Id(0);
  ASSERT_NE(dict.state.Find(key), nullptr);
  // Parameter 0's exp_avg_sq is given the very tensor of its exp_avg.
  const at::Tensor shared = exp_avg_of(dict, key, "exp_avg");
  dict.state.Find(key)->Set("exp_avg_sq", StateValue(shared));
  const void* exp_avg_1 = exp_avg_of(dict, ParamKey::Id(1), "exp_avg").data_ptr();

  ASSERT_THAT(copied.adapter->LoadStateDict(dict), IsOk());
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict from_copy, copied.adapter->StateDict());
  EXPECT_NE(exp_avg_of(from_copy, ParamKey::Id(1), "exp_avg").data_ptr(), exp_avg_1);

  OptimStateDict expected = CloneOptimStateDict(dict);
  ASSERT_THAT(adopted.adapter->LoadStateDict(std::move(dict)), IsOk());
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict from_move, adopted.adapter->StateDict());
  EXPECT_EQ(exp_avg_of(from_move, ParamKey::Id(1), "exp_avg").data_ptr(), exp_avg_1);
  const at::Tensor avg = exp_avg_of(from_move, key, "exp_avg");
  const at::Tensor avg_sq = exp_avg_of(from_move, key, "exp_avg_sq");
  EXPECT_NE(avg.data_ptr(), avg_sq.data_ptr());
  EXPECT_EQ(DiffOptimStateDicts(expected, from_move), "");
  EXPECT_EQ(DiffOptimStateDicts(from_copy, from_move), "");
}

TEST(OptimizerAdapterLoad, KeepsUnknownHyperParametersAndFillsPythonDefaults) {
  at::Tensor p = torch::ones({2}, torch::requires_grad());
  torch::optim::SGD sgd(std::vector<at::Tensor>{p}, torch::optim::SGDOptions(0.1).momentum(0.5));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(sgd));
  // A PyTorch 1.12-style group: no 'differentiable' or 'fused', an LR scheduler's 'initial_lr'
  // first. PyTorch 2.13's SGD.__setstate__ fills in differentiable=False and fused=False.
  OptimStateDict dict;
  ParamGroup group;
  group.hyper_params.Set("initial_lr", 1);
  group.hyper_params.Set("lr", 0.25);
  group.hyper_params.Set("momentum", 0.75);
  group.hyper_params.Set("dampening", 0);
  group.hyper_params.Set("weight_decay", 0);
  group.hyper_params.Set("nesterov", false);
  group.params.push_back(ParamKey::Id(0));
  dict.param_groups.push_back(group);
  ASSERT_THAT(adapter.LoadStateDict(dict), IsOk());
  const auto& options =
      static_cast<const torch::optim::SGDOptions&>(sgd.param_groups()[0].options());
  EXPECT_EQ(options.lr(), 0.25);
  EXPECT_EQ(options.momentum(), 0.75);
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved, adapter.StateDict());
  EXPECT_EQ(saved.param_groups[0].hyper_params.Keys(),
            (std::vector<std::string>{"initial_lr", "lr", "momentum", "dampening", "weight_decay",
                                      "nesterov", "maximize", "foreach", "differentiable",
                                      "fused"}));
  EXPECT_EQ(*saved.param_groups[0].hyper_params.Find("initial_lr"), StateValue(1));
  EXPECT_EQ(*saved.param_groups[0].hyper_params.Find("fused"), StateValue(false));
  EXPECT_TRUE(saved.param_groups[0].hyper_params.Find("foreach")->IsNone());
}

// ---------------------------------------------------------------------------------------
// The value type

TEST(OptimStateDict, OrderedMapKeepsInsertionOrderAndPositionOnReassign) {
  ParamState state;
  state.Set("b", 1);
  state.Set("a", 2);
  state.Set("b", 3);
  EXPECT_EQ(state.Keys(), (std::vector<std::string>{"b", "a"}));
  EXPECT_EQ(*state.Find("b"), StateValue(3));
  EXPECT_TRUE(state.Erase("b"));
  EXPECT_EQ(state.Keys(), (std::vector<std::string>{"a"}));
  EXPECT_EQ(state.Find("b"), nullptr);
}

TEST(OptimStateDict, DiffIsStrictAboutTypesAndUsesTolerance) {
  EXPECT_NE(DiffStateValues(StateValue(0), StateValue(0.0)), "");
  EXPECT_NE(DiffStateValues(StateValue::Tuple({0.9}), StateValue::List({0.9})), "");
  EXPECT_NE(DiffStateValues(StateValue(at::scalar_tensor(1.0)), StateValue(torch::ones({1}))), "");
  EXPECT_EQ(DiffStateValues(StateValue(torch::ones({2})), StateValue(torch::ones({2}) + 1e-7),
                            {.atol = 1e-6}),
            "");
  EXPECT_THAT(DiffStateValues(StateValue(torch::ones({2})), StateValue(torch::ones({2}) * 2)),
              HasSubstr("values differ at flat index 0"));
}

TEST(OptimStateDict, DebugStringReadsLikePython) {
  OptimStateDict dict;
  ParamState state;
  state.Set("step", at::scalar_tensor(3.0));
  state.Set("value2", StateValue::None());
  dict.state.Set(ParamKey::Id(0), state);
  ParamGroup group;
  group.hyper_params.Set("lr", 0.01);
  group.hyper_params.Set("betas", StateValue::Tuple({0.9, 0.999}));
  group.hyper_params.Set("weight_decay", 0);
  group.params = {ParamKey::Id(0)};
  dict.param_groups.push_back(group);
  EXPECT_EQ(DebugString(dict),
            "{'state': {0: {'step': tensor(3.0, dtype=float32), 'value2': None}}, "
            "'param_groups': [{'lr': 0.01, 'betas': (0.9, 0.999), 'weight_decay': 0, "
            "'params': [0]}]}");
}

TEST(OptimStateDict, CloneCopiesTensorData) {
  OptimStateDict dict;
  at::Tensor t = torch::zeros({2});
  ParamState state;
  state.Set("exp_avg", t);
  dict.state.Set(ParamKey::Fqn("a.weight"), state);
  const OptimStateDict copy = CloneOptimStateDict(dict);
  t.add_(1);
  EXPECT_EQ(*copy.state.Find(ParamKey::Fqn("a.weight"))->Find("exp_avg"),
            StateValue(torch::zeros({2})));
  EXPECT_NE(copy, dict);
}

}  // namespace
}  // namespace fsdp::optim_state
