#include "models/nested_model.h"

#include <c10/util/Exception.h>
#include <torch/nn/modules/activation.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <memory>
#include <vector>

namespace fsdp::models {
namespace {

void AppendParameters(const torch::nn::Module& module, std::vector<torch::Tensor>& out) {
  for (const torch::Tensor& p : module.parameters()) out.push_back(p);
}

}  // namespace

BiasImpl::BiasImpl(int64_t dim) {
  TORCH_CHECK(dim > 0, "Bias: dim must be positive, got ", dim);
  torch::manual_seed(0);
  bias = register_parameter("bias", torch::randn({dim}));
}

torch::Tensor BiasImpl::forward(torch::Tensor x) { return x + bias; }

// Each block re-seeds before its own draws, and each Bias re-seeds again, so statements stay
// in Python's order: that order decides which random numbers each tensor gets.
BlockAImpl::BlockAImpl(int64_t in_dim, int64_t out_dim) {
  TORCH_CHECK(in_dim > 0 && out_dim > 0, "BlockA: dims must be positive");
  torch::manual_seed(0);
  bias_module0 = register_module("bias_module0", Bias(out_dim));
  weight = register_parameter("weight", torch::randn({in_dim, out_dim}));
  bias_module1 = register_module("bias_module1", Bias(out_dim));
  relu = register_module("relu", torch::nn::ReLU());
}

torch::Tensor BlockAImpl::forward(torch::Tensor x) {
  x = x.matmul(weight);
  x = bias_module0(x);
  x = relu(x);  // the two biases get different gradients
  return bias_module1(x);
}

BlockBImpl::BlockBImpl(int64_t in_dim, int64_t out_dim) {
  TORCH_CHECK(in_dim > 0 && out_dim > 0, "BlockB: dims must be positive");
  torch::manual_seed(0);
  weight = register_parameter("weight", torch::randn({in_dim, out_dim}));
  bias_module0 = register_module("bias_module0", Bias(out_dim));
  bias_module1 = register_module("bias_module1", Bias(out_dim));
  relu = register_module("relu", torch::nn::ReLU());
}

torch::Tensor BlockBImpl::forward(torch::Tensor x) {
  x = x.matmul(weight);
  x = bias_module0(x);
  x = relu(x);
  return bias_module1(x);
}

NestedModelImpl::NestedModelImpl(NestedModelDims dims) {
  const int64_t hidden = dims == NestedModelDims::kPyTorch2 ? 3 : 7;
  block0 = register_module("block0", BlockB(5, hidden));
  block1 = register_module("block1", BlockB(hidden, 7));
  // No seed of its own: continues from the generator state block1's last Bias left.
  bias = register_parameter("bias", torch::randn({5}));
  block2 = register_module("block2", SlotSequential());
  block2->push_back(BlockA(7, 9));
  block2->push_back(BlockA(9, 9));
  block2->push_back(BlockB(9, 5));
  block2_slot_ = fsdp::ModuleSlot(block2);
  relu = register_module("relu", torch::nn::ReLU());
}

torch::Tensor NestedModelImpl::forward(torch::Tensor x) {
  x = relu(block0(x));
  x = relu(block1(x));
  x = relu(block2_slot_(x));
  return x + bias;
}

torch::Tensor NestedModelImpl::get_input(torch::Device device) const {
  return torch::randn({8, 5}).to(device);
}

torch::Tensor NestedModelImpl::get_loss(const torch::Tensor& /*input*/,
                                        const torch::Tensor& output) const {
  return output.sum();
}

std::vector<torch::Tensor> NestedModelImpl::param_group0() const {
  std::vector<torch::Tensor> group;
  AppendParameters(*block1.module(), group);
  return group;
}

std::vector<torch::Tensor> NestedModelImpl::param_group1() const {
  std::vector<torch::Tensor> group;
  AppendParameters(*block2, group);
  AppendParameters(*block0.module(), group);
  return group;
}

std::vector<fsdp::ModuleSlot*> NestedModelImpl::wrap_slots() {
  auto b1 = SlotAs<BlockBImpl>(block1);
  auto b21 = block2->child_as<BlockAImpl>(1);
  return {&b1->bias_module0,  &block1,          &b21->bias_module0,
          &b21->bias_module1, &block2->slot(1), &block2->slot(2)};
}

std::vector<fsdp::ModuleSlot*> NestedModelImpl::wrap_alt_slots() {
  return {&SlotAs<BlockBImpl>(block0)->bias_module0, &block0};
}

std::shared_ptr<torch::nn::Module> NestedModelImpl::ignored_module() {
  return block2->child_as<BlockBImpl>(2)->bias_module0.module();
}

torch::Tensor NestedModelImpl::add_unmanaged_param(bool add_to_fsdp_module) {
  torch::Tensor param = torch::randn({5, 5});
  torch::nn::Module& owner = add_to_fsdp_module
                                 ? static_cast<torch::nn::Module&>(*block2->child_as<BlockBImpl>(2))
                                 : static_cast<torch::nn::Module&>(*this);
  return owner.register_parameter("unmanaged_param", param);
}

}  // namespace fsdp::models
