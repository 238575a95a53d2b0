#include "models/simple_models.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <string>

namespace fsdp::models {
namespace {

// Python's nn.Sequential(nn.Linear(in, out), nn.ReLU()).
SlotSequential LinearRelu(int64_t in, int64_t out) {
  SlotSequential seq;
  seq->push_back(torch::nn::Linear(in, out));
  seq->push_back(torch::nn::ReLU());
  return seq;
}

// Python's nn.Sequential(nn.ReLU(), nn.Linear(in, out)).
SlotSequential ReluLinear(int64_t in, int64_t out) {
  SlotSequential seq;
  seq->push_back(torch::nn::ReLU());
  seq->push_back(torch::nn::Linear(in, out));
  return seq;
}

}  // namespace

TestDummyModelImpl::TestDummyModelImpl(bool no_grad) {
  torch::manual_seed(0);
  net1 = register_module("net1", LinearRelu(8, 16));
  auto first = net1->child_as<torch::nn::LinearImpl>(0);
  first->weight.set_requires_grad(!no_grad);
  first->bias.set_requires_grad(!no_grad);
  net2 = register_module("net2", LinearRelu(16, 32));
  net3 = register_module("net3", torch::nn::Linear(32, 64));
  net4 = register_module("net4", ReluLinear(64, 8));
}

torch::Tensor TestDummyModelImpl::forward(torch::Tensor x) { return net4(net3(net2(net1(x)))); }

torch::Tensor TestDummyModelImpl::get_input(torch::Device device) const {
  return torch::rand({8, 8}, torch::TensorOptions().device(device));
}

UnusedFirstLayerModelImpl::UnusedFirstLayerModelImpl() {
  lin1 = register_module("lin1", torch::nn::Linear(5, 5));
  lin2 = register_module("lin2", torch::nn::Linear(5, 5));
  relu = register_module("relu", torch::nn::ReLU());
}

torch::Tensor UnusedFirstLayerModelImpl::forward(torch::Tensor x) { return relu(lin2(x)); }

DenseModelImpl::DenseModelImpl() {
  net1 = register_module("net1", LinearRelu(8, 16));
  net2 = register_module("net2", LinearRelu(16, 32));
  net3 = register_module("net3", torch::nn::Linear(32, 64));
  net4 = register_module("net4", ReluLinear(64, 8));
}

torch::Tensor DenseModelImpl::forward(torch::Tensor x) { return net4(net3(net2(net1(x)))); }

FakeMPModelImpl::FakeMPModelImpl(int64_t rank) : rank_(rank) {
  torch::manual_seed(0);
  dense = register_module("dense", DenseModel());
  sparse = register_module(rank == 0 ? "sparse0" : "sparse1", LinearRelu(8, 8));
}

torch::Tensor FakeMPModelImpl::forward(torch::Tensor x) {
  torch::Tensor hidden = sparse(x);
  if (all_reduce) all_reduce(hidden);
  return dense(hidden);
}

SimpleModelImpl::SimpleModelImpl() {
  torch::manual_seed(0);
  net1 = register_module("net1", LinearRelu(2, 4));
}

torch::Tensor SimpleModelImpl::forward(torch::Tensor x) { return net1(x); }

}  // namespace fsdp::models
