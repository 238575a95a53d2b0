// NestedModel and its parts (Bias, BlockA, BlockB): the nested reference model of PyTorch's
// optimizer-state tests, for checking our FSDP optimizer-state code against PyTorch's.
//
// Source: test/distributed/fsdp/test_fsdp_optim_state.py (classes Bias, BlockA, BlockB,
// NestedModel) as PyTorch 2.x has it (pytorch/pytorch at 01d6a04a74d5, the file whose tests
// tests/optim_state/ ports); PyTorch 1.13's file had other dimensions for block0 and block1,
// kept as NestedModelDims::kPyTorch1_13 for checkpoints made from it. Construction draws from the
// default CPU generator in the same order and with the same seeds as Python (each Bias, BlockA and
// BlockB calls torch::manual_seed(0) first), so the parameters equal Python's bit for bit; the
// names are Python's named_parameters() names, in the same order (a module's own parameters come
// before its children's, in LibTorch as in Python):
//   bias [5]
//   block0.weight [5, 3]        block0.bias_module0.bias    block0.bias_module1.bias
//   block1.weight [3, 7]        block1.bias_module0.bias    block1.bias_module1.bias
//   block2.0.weight [7, 9]      block2.0.bias_module0.bias  block2.0.bias_module1.bias
//   block2.1.weight [9, 9]      block2.1.bias_module0.bias  block2.1.bias_module1.bias
//   block2.2.weight [9, 5]      block2.2.bias_module0.bias  block2.2.bias_module1.bias
// (1.13: block0.weight [5, 7], block1.weight [7, 7].)
//
// Wrappable children are fsdp::ModuleSlots (public members named as in Python), so FSDP can
// wrap them in place without changing any name. What each Python wrapping wraps, inner first:
//   NestedModel.wrap:      block1.bias_module0, block1, block2[1].bias_module0,
//                          block2[1].bias_module1, block2[1], block2[2]       -> wrap_slots()
//     with ignore_modules: block2[2] ignores block2[2].bias_module0 -> ignored_module()
//   NestedModel.wrap_alt:  block0.bias_module0, block0                        -> wrap_alt_slots()
//   wrap_with_unmanaged_params: add_unmanaged_param(...), then the `wrap` slots.
// The root itself is never wrapped by these (the test's model has a non-FSDP root).
#ifndef FSDP_CPP_MODELS_NESTED_MODEL_H_
#define FSDP_CPP_MODELS_NESTED_MODEL_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "fsdp/module_slot.h"
#include "models/slot_containers.h"

namespace fsdp::models {

// Adds a 1-D bias of size `dim`, drawn with torch::randn after torch::manual_seed(0).
class BiasImpl : public torch::nn::Module {
 public:
  explicit BiasImpl(int64_t dim);
  torch::Tensor forward(torch::Tensor x);

  torch::Tensor bias;
};
TORCH_MODULE(Bias);

// x @ weight, then bias_module0, ReLU, bias_module1. Registration (and parameter) order:
// bias_module0, weight, bias_module1, relu.
class BlockAImpl : public torch::nn::Module {
 public:
  BlockAImpl(int64_t in_dim, int64_t out_dim);
  torch::Tensor forward(torch::Tensor x);

  fsdp::ModuleSlot bias_module0;  // holds a BiasImpl
  torch::Tensor weight;           // [in_dim, out_dim]
  fsdp::ModuleSlot bias_module1;  // holds a BiasImpl
  torch::nn::ReLU relu{nullptr};
};
TORCH_MODULE(BlockA);

// Same computation as BlockA; registration order: weight, bias_module0, bias_module1, relu.
class BlockBImpl : public torch::nn::Module {
 public:
  BlockBImpl(int64_t in_dim, int64_t out_dim);
  torch::Tensor forward(torch::Tensor x);

  torch::Tensor weight;           // [in_dim, out_dim]
  fsdp::ModuleSlot bias_module0;  // holds a BiasImpl
  fsdp::ModuleSlot bias_module1;  // holds a BiasImpl
  torch::nn::ReLU relu{nullptr};
};
TORCH_MODULE(BlockB);

// Which version of PyTorch's test file NestedModel's block0 and block1 follow.
enum class NestedModelDims {
  kPyTorch2,     // block0 = BlockB(5, 3), block1 = BlockB(3, 7)
  kPyTorch1_13,  // block0 = BlockB(5, 7), block1 = BlockB(7, 7)
};

// relu(block0) -> relu(block1) -> relu(block2) -> + bias. Input [N, 5], output [N, 5].
class NestedModelImpl : public torch::nn::Module {
 public:
  explicit NestedModelImpl(NestedModelDims dims = NestedModelDims::kPyTorch2);
  torch::Tensor forward(torch::Tensor x);

  // Python's get_input: torch::randn({8, 5}) drawn on the CPU generator, then moved to
  // `device` (the test seeds with torch::manual_seed(0) before each step).
  torch::Tensor get_input(torch::Device device = torch::kCPU) const;
  // Python's get_loss: output.sum().
  torch::Tensor get_loss(const torch::Tensor& input, const torch::Tensor& output) const;

  // The test's two optimizer parameter groups (they leave out `bias` on purpose):
  // group 0 is block1's parameters, group 1 is block2's then block0's.
  std::vector<torch::Tensor> param_group0() const;
  std::vector<torch::Tensor> param_group1() const;

  // The slots NestedModel.wrap wraps, in Python's order (inner units first).
  std::vector<fsdp::ModuleSlot*> wrap_slots();
  // The slots NestedModel.wrap_alt wraps, in Python's order.
  std::vector<fsdp::ModuleSlot*> wrap_alt_slots();
  // The module NestedModel.wrap(ignore_modules=True) passes as ignored_modules to the FSDP
  // unit of block2[2]: block2[2].bias_module0.
  std::shared_ptr<torch::nn::Module> ignored_module();

  // wrap_with_unmanaged_params' first half: registers torch::randn({5, 5}) (drawn now, from
  // the generator's current state) as "unmanaged_param" on block2[2] if `add_to_fsdp_module`,
  // else on this root module, and returns it. Its name is "block2.2.unmanaged_param" (listed
  // right after block2.2.weight) or "unmanaged_param" (right after bias).
  torch::Tensor add_unmanaged_param(bool add_to_fsdp_module);

  fsdp::ModuleSlot block0;         // holds a BlockBImpl(5, 3) (1.13: (5, 7))
  fsdp::ModuleSlot block1;         // holds a BlockBImpl(3, 7) (1.13: (7, 7))
  torch::Tensor bias;              // [5]
  SlotSequential block2{nullptr};  // BlockA(7, 9), BlockA(9, 9), BlockB(9, 5); each child a slot
  torch::nn::ReLU relu{nullptr};

  // block2 as a whole, as forward calls it: the slot to checkpoint it (Python's
  // apply_activation_checkpointing with check_fn = isinstance(m, nn.Sequential)).
  fsdp::ModuleSlot& block2_slot() { return block2_slot_; }

 private:
  fsdp::ModuleSlot block2_slot_;
};
TORCH_MODULE(NestedModel);

}  // namespace fsdp::models

#endif  // FSDP_CPP_MODELS_NESTED_MODEL_H_
