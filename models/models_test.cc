// Checks every reference model against PyTorch itself: testdata/reference_models.py builds the
// same model with Python's nn modules and seeds (PyTorch 2.13 from the project's venv,
// whose LibTorch we link) and dumps parameter names, shapes and values plus one forward pass; the
// tests below build the C++ model the same way and compare. Also checks the ModuleSlots each
// model exposes for FSDP wrapping.
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "fsdp/module_slot.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/char_lm.h"
#include "models/nested_model.h"
#include "models/simple_models.h"
#include "models/slot_containers.h"
#include "models/transformer.h"
#include "nlohmann/json.hpp"
#include "tools/python_testutil.h"

namespace fsdp::models {
namespace {

using ::nlohmann::json;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::Eq;
using ::testing::SizeIs;

// Construction draws the same random numbers as Python, so parameters (and seeded inputs)
// must be bit-identical. Forward results differ by float rounding where the kernels differ:
// PyTorch 2.x's nn.MultiheadAttention computes attention with scaled_dot_product_attention,
// LibTorch's C++ module with bmm and softmax (TransformerWithSharedParams: max 3.8e-6 on
// outputs up to 13.1, 2.9e-7 of the largest, a few float32 ulps). The other models agree bit
// for bit. So: within 1e-6 of the output's largest magnitude.
constexpr double kParameterTolerance = 0.0;
constexpr double kOutputRelativeTolerance = 1e-6;

// `actual` (any dtype) has `expected`'s shape and its values within `tolerance`.
MATCHER_P2(TensorNear, expected, tolerance,
           "has the expected shape and values within " + ::testing::PrintToString(tolerance)) {
  const torch::Tensor& actual = arg;
  if (actual.sizes() != expected.sizes()) {
    *result_listener << "has shape " << actual.sizes() << ", expected " << expected.sizes();
    return false;
  }
  if (actual.numel() == 0) return true;
  const torch::Tensor reference = expected;
  const double diff = (actual.detach().to(torch::kDouble) - reference).abs().max().item<double>();
  *result_listener << "max |difference| " << diff;
  return diff <= tolerance;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

// Runs the Python oracle for `model` and returns its JSON (empty, with a test failure, if the
// script fails).
json RunReference(const std::string& model) {
  torch::set_num_threads(1);  // as the script does: same reduction order on both sides
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* tmpdir = std::getenv("TEST_TMPDIR");
  if (srcdir == nullptr || tmpdir == nullptr) {
    ADD_FAILURE() << "TEST_SRCDIR and TEST_TMPDIR must be set (run under bazel test)";
    return json();
  }
  const std::string script = std::string(srcdir) + "/fsdp_cpp/models/testdata/reference_models.py";
  const std::string out = std::string(tmpdir) + "/reference_" + model + ".json";
  const std::string err = std::string(tmpdir) + "/reference_" + model + ".stderr";
  const std::string command = fsdp::testing::PythonCommand() + " '" + script + "' " + model + " '" +
                              out + "' 2>'" + err + "'";
  if (std::system(command.c_str()) != 0) {
    ADD_FAILURE() << "`" << command << "` failed:\n" << ReadFile(err);
    return json();
  }
  return json::parse(ReadFile(out));
}

// A dumped tensor as a double tensor of its shape (float32 values convert exactly).
torch::Tensor ToTensor(const json& entry) {
  const auto values = entry.at("values").get<std::vector<double>>();
  const auto shape = entry.at("shape").get<std::vector<int64_t>>();
  return torch::tensor(values, torch::kDouble).reshape(shape);
}

std::vector<std::string> NamesOf(const json& entries) {
  std::vector<std::string> names;
  for (const json& entry : entries) names.push_back(entry.at("name").get<std::string>());
  return names;
}

// Compares `entries` (dumped name/value pairs) with `actual`, in order.
void ExpectSameTensors(const json& entries,
                       const torch::OrderedDict<std::string, torch::Tensor>& actual,
                       bool check_requires_grad) {
  ASSERT_THAT(actual.keys(), ElementsAreArray(NamesOf(entries)));
  for (size_t i = 0; i < entries.size(); ++i) {
    const json& entry = entries[i];
    const torch::Tensor& tensor = actual[i].value();
    SCOPED_TRACE(actual[i].key());
    EXPECT_THAT(tensor, TensorNear(ToTensor(entry), kParameterTolerance));
    EXPECT_EQ(std::string(c10::toString(tensor.scalar_type())),
              entry.at("dtype").get<std::string>() == "float32" ? "Float" : "Long");
    if (check_requires_grad) {
      EXPECT_EQ(tensor.requires_grad(), entry.at("requires_grad").get<bool>());
    }
  }
}

// The checks every model gets: Python's parameters (each tensor once) and every registered
// name, buffers, the forward inputs (same random numbers), output and loss.
void ExpectMatchesReference(const json& ref, const torch::nn::Module& model,
                            const std::vector<torch::Tensor>& inputs, const torch::Tensor& output,
                            std::optional<torch::Tensor> loss = std::nullopt) {
  ASSERT_FALSE(ref.is_null());
  {
    SCOPED_TRACE("parameters");
    ExpectSameTensors(ref.at("parameters"), NamedParametersWithoutDuplicates(model),
                      /*check_requires_grad=*/true);
  }
  EXPECT_THAT(model.named_parameters().keys(),
              ElementsAreArray(ref.at("all_parameter_names").get<std::vector<std::string>>()));
  {
    SCOPED_TRACE("buffers");
    ExpectSameTensors(ref.at("buffers"), model.named_buffers(), /*check_requires_grad=*/false);
  }
  ASSERT_THAT(ref.at("inputs"), SizeIs(inputs.size()));
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_THAT(inputs[i], TensorNear(ToTensor(ref.at("inputs")[i]), kParameterTolerance))
        << "input " << i;
  }
  const torch::Tensor expected_output = ToTensor(ref.at("output"));
  const double output_scale =
      expected_output.numel() == 0 ? 1.0 : expected_output.abs().max().item<double>();
  EXPECT_THAT(output,
              TensorNear(expected_output, kOutputRelativeTolerance * std::max(1.0, output_scale)))
      << "forward output";
  if (loss.has_value()) {
    ASSERT_FALSE(ref.at("loss").is_null());
    EXPECT_NEAR(loss->item<double>(), ref.at("loss").get<double>(),
                kOutputRelativeTolerance * std::max(1.0, std::abs(ref.at("loss").get<double>())));
  }
}

// FQN of every module of `root` ("" for the root itself).
std::map<const torch::nn::Module*, std::string> ModuleNames(const torch::nn::Module& root) {
  std::map<const torch::nn::Module*, std::string> names;
  names[&root] = "";
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    names[item.value().get()] = item.key();
  }
  return names;
}

std::vector<std::string> SlotNames(const torch::nn::Module& root,
                                   const std::vector<fsdp::ModuleSlot*>& slots) {
  const auto names = ModuleNames(root);
  std::vector<std::string> out;
  for (const fsdp::ModuleSlot* slot : slots) {
    auto it = names.find(slot->module().get());
    out.push_back(it == names.end() ? "<not in model>" : it->second);
  }
  return out;
}

std::vector<std::string> NamesOfTensors(const torch::nn::Module& root,
                                        const std::vector<torch::Tensor>& tensors) {
  std::map<const c10::TensorImpl*, std::string> by_impl;
  for (const auto& item : NamedParametersWithoutDuplicates(root)) {
    by_impl[item.value().unsafeGetTensorImpl()] = item.key();
  }
  std::vector<std::string> names;
  for (const torch::Tensor& t : tensors) names.push_back(by_impl[t.unsafeGetTensorImpl()]);
  return names;
}

// Counts the calls FSDP would intercept and passes outputs through unchanged.
class CountingInterceptor : public fsdp::ForwardInterceptor {
 public:
  void PreForward() override { ++pre_forwards; }
  torch::Tensor PostForward(torch::Tensor output) override {
    ++post_forwards;
    return output;
  }
  int pre_forwards = 0;
  int post_forwards = 0;
};

// --- Oracle comparisons ---------------------------------------------------------------------

void CheckNestedModel(const std::string& reference_name, std::optional<bool> unmanaged_in_fsdp,
                      NestedModelDims dims = NestedModelDims::kPyTorch2) {
  const json ref = RunReference(reference_name);
  NestedModel model(dims);
  if (unmanaged_in_fsdp.has_value()) model->add_unmanaged_param(*unmanaged_in_fsdp);
  torch::manual_seed(0);  // as the test's _step_model does before get_input
  torch::Tensor input = model->get_input();
  torch::NoGradGuard no_grad;
  torch::Tensor output = model->forward(input);
  ExpectMatchesReference(ref, *model, {input}, output, model->get_loss(input, output));
  ASSERT_FALSE(ref.is_null());
  EXPECT_THAT(NamesOfTensors(*model, model->param_group0()),
              ElementsAreArray(ref.at("param_groups")[0].get<std::vector<std::string>>()));
  EXPECT_THAT(NamesOfTensors(*model, model->param_group1()),
              ElementsAreArray(ref.at("param_groups")[1].get<std::vector<std::string>>()));
}

TEST(NestedModel, MatchesPyTorchReference) { CheckNestedModel("nested", std::nullopt); }

TEST(NestedModel, PyTorch1_13DimsMatchPyTorch1_13Reference) {
  CheckNestedModel("nested_1.13", std::nullopt, NestedModelDims::kPyTorch1_13);
}

TEST(NestedModel, UnmanagedParamOnWrappedBlockMatchesPyTorchReference) {
  CheckNestedModel("nested_unmanaged_in_fsdp", true);
}

TEST(NestedModel, UnmanagedParamOnRootMatchesPyTorchReference) {
  CheckNestedModel("nested_unmanaged_in_root", false);
}

TEST(TransformerWithSharedParams, MatchesPyTorchReference) {
  const json ref = RunReference("transformer");
  TransformerWithSharedParams model(/*rank=*/0);
  auto input = model->get_input();
  torch::NoGradGuard no_grad;
  torch::Tensor output = model->forward(input.first, input.second);
  ExpectMatchesReference(ref, *model, {input.first, input.second}, output,
                         model->get_loss(input, output));
}

TEST(TestDummyModel, MatchesPyTorchReference) {
  const json ref = RunReference("test_dummy");
  TestDummyModel model;
  torch::manual_seed(0);
  torch::Tensor input = model->get_input();
  torch::NoGradGuard no_grad;
  ExpectMatchesReference(ref, *model, {input}, model->forward(input));
}

TEST(TestDummyModel, NoGradFormMatchesPyTorchReference) {
  const json ref = RunReference("test_dummy_no_grad");
  TestDummyModel model(/*no_grad=*/true);
  torch::manual_seed(0);
  torch::Tensor input = model->get_input();
  torch::NoGradGuard no_grad;
  ExpectMatchesReference(ref, *model, {input}, model->forward(input));
}

TEST(UnusedFirstLayerModel, MatchesPyTorchReferenceWhenSeededByCaller) {
  const json ref = RunReference("unused_first_layer");
  torch::manual_seed(0);
  UnusedFirstLayerModel model;
  torch::manual_seed(0);
  torch::Tensor input = torch::randn({2, 5});
  torch::NoGradGuard no_grad;
  ExpectMatchesReference(ref, *model, {input}, model->forward(input));
}

TEST(DenseModel, MatchesPyTorchReferenceWhenSeededByCaller) {
  const json ref = RunReference("dense");
  torch::manual_seed(0);
  DenseModel model;
  torch::manual_seed(0);
  torch::Tensor input = torch::rand({5, 8});
  torch::NoGradGuard no_grad;
  ExpectMatchesReference(ref, *model, {input}, model->forward(input));
}

void CheckFakeMPModel(int64_t rank) {
  const json ref = RunReference("fake_mp_rank" + std::to_string(rank));
  FakeMPModel model(rank);
  torch::manual_seed(0);
  torch::Tensor input = torch::rand({5, 8});
  torch::NoGradGuard no_grad;
  ExpectMatchesReference(ref, *model, {input}, model->forward(input));
}

TEST(FakeMPModel, Rank0MatchesPyTorchReference) { CheckFakeMPModel(0); }

TEST(FakeMPModel, Rank1MatchesPyTorchReference) { CheckFakeMPModel(1); }

TEST(SimpleModel, MatchesPyTorchReference) {
  const json ref = RunReference("simple");
  SimpleModel model;
  torch::manual_seed(0);
  torch::Tensor input = torch::rand({3, 2});
  torch::NoGradGuard no_grad;
  ExpectMatchesReference(ref, *model, {input}, model->forward(input));
}

// --- Slots for FSDP wrapping ----------------------------------------------------------------

TEST(CharTransformerLM, MatchesPyTorchReference) {
  const json ref = RunReference("char_lm");
  CharTransformerLM model(CharLMConfig{.vocab_size = 11,
                                       .context = 8,
                                       .d_model = 16,
                                       .nhead = 4,
                                       .num_layers = 2,
                                       .dim_feedforward = 32});
  torch::manual_seed(0);
  const torch::Tensor ids = torch::randint(11, {8, 3}, torch::kLong);
  torch::NoGradGuard no_grad;
  const torch::Tensor output = model->forward(ids);
  // Python takes the loss from the full sequence's first 7 positions; causal attention makes
  // them equal to a forward over the first 7 tokens alone.
  const torch::Tensor loss = model->loss(ids.slice(0, 0, 7), ids.slice(0, 1));
  ExpectMatchesReference(ref, *model, {ids}, output, loss);
}

TEST(CharTransformerLM, LayerSlotsAreTheTransformerLayersAndShareNoDraws) {
  CharTransformerLM model(CharLMConfig{.vocab_size = 5,
                                       .context = 4,
                                       .d_model = 8,
                                       .nhead = 2,
                                       .num_layers = 3,
                                       .dim_feedforward = 16});
  const std::vector<fsdp::ModuleSlot*> slots = model->layer_slots();
  ASSERT_THAT(slots, SizeIs(3));
  for (size_t i = 0; i < slots.size(); ++i) {
    EXPECT_EQ(slots[i]->module().get(), model->encoder->layers->slot(i).module().get());
  }
  // Layers start from one prototype, then xavier_uniform_ re-draws their matrices.
  auto weight = [&](size_t i) { return slots[i]->module()->named_parameters()["linear1.weight"]; };
  EXPECT_FALSE(torch::equal(weight(0), weight(1)));
  EXPECT_TRUE(model->output_proj->weight.is_same(model->embed_tokens->weight));
}

TEST(NestedModel, WrapSlotsHoldTheModulesPythonWraps) {
  NestedModel model;
  EXPECT_THAT(SlotNames(*model, model->wrap_slots()),
              ElementsAre("block1.bias_module0", "block1", "block2.1.bias_module0",
                          "block2.1.bias_module1", "block2.1", "block2.2"));
  EXPECT_THAT(SlotNames(*model, model->wrap_alt_slots()),
              ElementsAre("block0.bias_module0", "block0"));
  EXPECT_THAT(ModuleNames(*model).at(model->ignored_module().get()), Eq("block2.2.bias_module0"));
}

TEST(NestedModel, ForwardGoesThroughEveryWrappableSlot) {
  NestedModel model;
  torch::manual_seed(0);
  torch::Tensor input = model->get_input();
  torch::NoGradGuard no_grad;
  const torch::Tensor plain = model->forward(input);

  std::vector<fsdp::ModuleSlot*> slots = model->wrap_slots();
  for (fsdp::ModuleSlot* slot : model->wrap_alt_slots()) slots.push_back(slot);
  std::vector<std::shared_ptr<CountingInterceptor>> counters;
  for (fsdp::ModuleSlot* slot : slots) {
    counters.push_back(std::make_shared<CountingInterceptor>());
    slot->set_interceptor(counters.back());
  }
  EXPECT_TRUE(model->forward(input).equal(plain));
  for (size_t i = 0; i < counters.size(); ++i) {
    EXPECT_EQ(counters[i]->pre_forwards, 1) << SlotNames(*model, {slots[i]})[0];
    EXPECT_EQ(counters[i]->post_forwards, 1) << SlotNames(*model, {slots[i]})[0];
  }
}

TEST(NestedModel, AddedUnmanagedParamIsNamedAsInPython) {
  NestedModel on_block;
  on_block->add_unmanaged_param(/*add_to_fsdp_module=*/true);
  EXPECT_TRUE(on_block->named_parameters().contains("block2.2.unmanaged_param"));
  NestedModel on_root;
  on_root->add_unmanaged_param(/*add_to_fsdp_module=*/false);
  EXPECT_EQ(on_root->named_parameters()[1].key(), "unmanaged_param");
}

TEST(TransformerWithSharedParams, LayerSlotsAreTheAutoWrapUnits) {
  TransformerWithSharedParams model;
  EXPECT_THAT(SlotNames(*model, model->layer_slots()),
              ElementsAre("transformer.encoder.layers.0", "transformer.encoder.layers.1",
                          "transformer.decoder.layers.0", "transformer.decoder.layers.1"));
  EXPECT_EQ(ModuleNames(*model).at(model->ignored_module().get()), "transformer");

  std::vector<std::shared_ptr<CountingInterceptor>> counters;
  for (fsdp::ModuleSlot* slot : model->layer_slots()) {
    counters.push_back(std::make_shared<CountingInterceptor>());
    slot->set_interceptor(counters.back());
  }
  auto input = model->get_input();
  torch::NoGradGuard no_grad;
  model->forward(input.first, input.second);
  for (const auto& counter : counters) {
    EXPECT_EQ(counter->pre_forwards, 1);
    EXPECT_EQ(counter->post_forwards, 1);
  }
}

TEST(TransformerWithSharedParams, OutputProjectionSharesTheEmbeddingTensor) {
  TransformerWithSharedParams model;
  EXPECT_TRUE(model->output_proj->weight.is_same(model->embed_tokens->weight));
  const auto all = model->named_parameters();
  const auto unique = NamedParametersWithoutDuplicates(*model);
  // LibTorch lists the tied tensor under both names; Python (and the unique view) once.
  EXPECT_TRUE(all["output_proj.weight"].is_same(all["embed_tokens.weight"]));
  EXPECT_EQ(all.size(), unique.size() + 1);
  EXPECT_FALSE(unique.contains("output_proj.weight"));
  EXPECT_THAT(model->parameters(), SizeIs(all.size()));
}

TEST(TransformerWithSharedParams, LayersStartAsCopiesOfOnePrototype) {
  // Python deep-copies one layer into every position, then re-draws only >1-dim parameters.
  TransformerWithSharedParams model;
  auto& layers = model->transformer->encoder->layers;
  auto first = layers->child_as<TransformerEncoderLayerImpl>(0);
  auto second = layers->child_as<TransformerEncoderLayerImpl>(1);
  EXPECT_TRUE(first->linear1->bias.equal(second->linear1->bias));
  EXPECT_FALSE(first->linear1->weight.equal(second->linear1->weight));
}

TEST(FakeMPModel, AllReduceRunsBetweenSparseAndDense) {
  FakeMPModel model(/*rank=*/1);
  torch::manual_seed(0);
  torch::Tensor input = torch::rand({5, 8});
  torch::NoGradGuard no_grad;
  torch::Tensor hidden = model->sparse(input);
  const torch::Tensor expected = model->dense(hidden * 2);
  int calls = 0;
  model->all_reduce = [&calls](torch::Tensor& t) {
    ++calls;
    t.mul_(2);  // as if a second rank contributed the same values
  };
  EXPECT_TRUE(model->forward(input).equal(expected));
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(model->named_parameters().contains("sparse1.0.weight"));
}

TEST(SlotSequential, RegistersChildrenByIndexAndChainsThem) {
  torch::manual_seed(0);
  SlotSequential seq;
  seq->push_back(torch::nn::Linear(3, 4));
  seq->push_back(torch::nn::Linear(4, 2));
  EXPECT_THAT(seq->named_parameters().keys(),
              ElementsAre("0.weight", "0.bias", "1.weight", "1.bias"));
  torch::Tensor x = torch::ones({1, 3});
  auto first = seq->child_as<torch::nn::LinearImpl>(0);
  auto second = seq->child_as<torch::nn::LinearImpl>(1);
  EXPECT_TRUE(seq->forward(x).equal(second->forward(first->forward(x))));
  EXPECT_THROW(seq->slot(2), c10::Error);
  EXPECT_THROW(seq->child_as<torch::nn::ReLUImpl>(0), c10::Error);
}

}  // namespace
}  // namespace fsdp::models
