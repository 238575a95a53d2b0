// The small models of PyTorch's optimizer-state tests: TestDummyModel, the model whose first
// Linear is unused, DenseModel, FakeMPModel and SimpleModel, for checking our FSDP
// optimizer-state code against PyTorch's on corner cases (frozen or unused parameters,
// non-FSDP roots, a rank-dependent submodule).
//
// Source: test/distributed/fsdp/test_fsdp_optim_state.py. None of these exists in the
// PyTorch 1.13 version of that file; they are ported from the later version that has them all
// (the one importing DEVICEInitMode from common_fsdp, PyTorch 2.4 era):
//   TestDummyModel        module-level class TestDummyModel(no_grad)
//   UnusedFirstLayerModel class Model in test_save_load_without_0th_param_state
//   DenseModel            class DenseModel in test_compatible_with_trec
//   FakeMPModel           class FakeMPModel in test_compatible_with_trec
//   SimpleModel           class SimpleModel in test_optim_state_without_param_groups
// Every torch::nn::Linear draws exactly as Python's nn.Linear (LibTorch's default init is the
// same kaiming_uniform_(a=sqrt(5)) then bias uniform_(+-1/sqrt(fan_in)), checked by
// models_test), so with the same seeds the parameters equal Python's bit for bit.
//
// Wrapping in those tests (children wrapped by FSDP are fsdp::ModuleSlots):
//   TestDummyModel, SimpleModel: only the root is wrapped (FSDP(model)); no slots.
//   UnusedFirstLayerModel: lin1, lin2, then the root.
//   FakeMPModel: dense (FSDP(DenseModel(), use_orig_params=True)); the root stays unwrapped.
//   DenseModel: only as FakeMPModel's dense.
#ifndef FSDP_CPP_MODELS_SIMPLE_MODELS_H_
#define FSDP_CPP_MODELS_SIMPLE_MODELS_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>

#include "fsdp/module_slot.h"
#include "models/slot_containers.h"

namespace fsdp::models {

// net1 = [Linear(8, 16), ReLU], net2 = [Linear(16, 32), ReLU], net3 = Linear(32, 64),
// net4 = [ReLU, Linear(64, 8)]; forward chains them. The constructor seeds with
// torch::manual_seed(0). With `no_grad`, net1.0.weight and net1.0.bias do not require grad
// (test_no_grad then toggles them through net1->child_as<torch::nn::LinearImpl>(0)).
class TestDummyModelImpl : public torch::nn::Module {
 public:
  explicit TestDummyModelImpl(bool no_grad = false);
  torch::Tensor forward(torch::Tensor x);
  // Python's get_input: torch.rand(8, 8) on `device`. Python draws it on CUDA, whose
  // generator differs from the CPU one, so values only agree with Python on the same device.
  torch::Tensor get_input(torch::Device device = torch::kCPU) const;

  SlotSequential net1{nullptr};
  SlotSequential net2{nullptr};
  torch::nn::Linear net3{nullptr};
  SlotSequential net4{nullptr};
};
TORCH_MODULE(TestDummyModel);

// lin1 = Linear(5, 5), lin2 = Linear(5, 5), relu; forward is relu(lin2(x)): lin1 never gets a
// gradient, so it never gets optimizer state. Does not seed (neither does Python's).
class UnusedFirstLayerModelImpl : public torch::nn::Module {
 public:
  UnusedFirstLayerModelImpl();
  torch::Tensor forward(torch::Tensor x);

  fsdp::ModuleSlot lin1;  // holds a torch::nn::LinearImpl(5, 5)
  fsdp::ModuleSlot lin2;  // holds a torch::nn::LinearImpl(5, 5)
  torch::nn::ReLU relu{nullptr};
};
TORCH_MODULE(UnusedFirstLayerModel);

// TestDummyModel's layers without the seed and without no_grad.
class DenseModelImpl : public torch::nn::Module {
 public:
  DenseModelImpl();
  torch::Tensor forward(torch::Tensor x);

  SlotSequential net1{nullptr};
  SlotSequential net2{nullptr};
  torch::nn::Linear net3{nullptr};
  SlotSequential net4{nullptr};
};
TORCH_MODULE(DenseModel);

// A model-parallel stand-in: seeds with torch::manual_seed(0), builds `dense` (a DenseModel),
// then a rank-local [Linear(8, 8), ReLU] registered as "sparse0" on rank 0 and "sparse1" on
// other ranks. forward: sparse(x), all-reduced across ranks (Python: dist.all_reduce, a sum),
// then dense. The models have no communication of their own: set `all_reduce` to the
// collective; while it is empty the sum is over one rank (the tensor passes unchanged).
class FakeMPModelImpl : public torch::nn::Module {
 public:
  explicit FakeMPModelImpl(int64_t rank);
  torch::Tensor forward(torch::Tensor x);

  int64_t rank() const { return rank_; }

  fsdp::ModuleSlot dense;          // holds a DenseModelImpl
  SlotSequential sparse{nullptr};  // registered as "sparse0" (rank 0) or "sparse1"
  // In-place sum across ranks of its argument, called between sparse and dense.
  std::function<void(torch::Tensor&)> all_reduce;

 private:
  int64_t rank_;
};
TORCH_MODULE(FakeMPModel);

// net1 = [Linear(2, 4), ReLU]; the constructor seeds with torch::manual_seed(0).
class SimpleModelImpl : public torch::nn::Module {
 public:
  SimpleModelImpl();
  torch::Tensor forward(torch::Tensor x);

  SlotSequential net1{nullptr};
};
TORCH_MODULE(SimpleModel);

}  // namespace fsdp::models

#endif  // FSDP_CPP_MODELS_SIMPLE_MODELS_H_
