#include "fsdp/fsdp_testutil.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::testing {

std::string StrategyCaseName(const ::testing::TestParamInfo<StrategyCase>& info) {
  return absl::StrCat("ws", info.param.world_size, "_",
                      std::string(ShardingStrategyName(info.param.strategy)),
                      info.param.use_orig_params ? "_orig" : "");
}

std::shared_ptr<comm::ProcessGroup> Borrow(comm::ProcessGroup& group) {
  return std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
}

InnerImpl::InnerImpl()
    : a(register_module("a", torch::nn::Linear(6, 7))),
      b(register_module("b", torch::nn::Linear(7, 5))) {}

torch::Tensor InnerImpl::forward(torch::Tensor x) { return b.forward(torch::tanh(a.forward(x))); }

// Registration order is the draw order from the generator (and the state-dict order): the
// modules, then scale, then shift.
NetImpl::NetImpl(NetOptions options)
    : l0(register_module("l0", torch::nn::Linear(4, 6))),
      inner(register_module("inner", Inner())),
      head(register_module("head", torch::nn::Linear(5, 3))),
      extra(options.with_unmanaged ? register_module("extra", torch::nn::Linear(3, 3))
                                   : torch::nn::Linear(nullptr)) {
  if (!options.with_unmanaged) {
    scale = register_parameter("scale", torch::ones({3}));
    return;
  }
  scale = register_parameter("scale", torch::rand({3}) + 0.5);
  shift = register_buffer("shift", torch::randn({3}) * 0.1);
}

torch::Tensor NetImpl::forward(torch::Tensor x) {
  torch::Tensor y = head->forward(inner.forward(torch::relu(l0.forward(x)))) * scale;
  if (extra.is_empty()) return y;
  return extra->forward(y) + shift;
}

absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> WrapNet(
    Net net, std::shared_ptr<comm::ProcessGroup> group, const StrategyCase& c, bool nest_inner_b,
    ParamInitFn param_init_fn) {
  auto inner = std::dynamic_pointer_cast<InnerImpl>(net->inner.module());
  std::vector<ModuleSlot*> nested = {&net->l0, &net->inner};
  if (nest_inner_b) nested.push_back(&inner->b);
  FsdpOptions options{
      .sharding_strategy = c.strategy, .use_orig_params = c.use_orig_params, .nested = nested};
  if (!net->extra.is_empty()) options.ignored_modules = {net->extra.ptr()};
  options.param_init_fn = std::move(param_init_fn);
  return FullyShardedDataParallel::Wrap(net, std::move(group), std::move(options));
}

at::Tensor Batch(int step) {
  torch::manual_seed(100 + step);
  return torch::randn({8, 4});
}

absl::StatusOr<NetPair> MakeNetPair(comm::ProcessGroup& group, const StrategyCase& c,
                                    NetOptions options) {
  NetPair pair;
  pair.reference = Seeded<Net>(0, options);
  FSDP_ASSIGN_OR_RETURN(pair.fsdp, WrapNet(Seeded<Net>(0, options), Borrow(group), c));
  pair.reference_optim = std::make_unique<torch::optim::Adam>(pair.reference->parameters(),
                                                              torch::optim::AdamOptions(0.01));
  pair.optim = std::make_unique<torch::optim::Adam>(pair.fsdp->parameters(),
                                                    torch::optim::AdamOptions(0.01));
  return pair;
}

StepLosses TrainBoth(NetPair& pair, int step) {
  StepLosses losses;
  losses.reference = TrainStep(*pair.reference, *pair.reference_optim, step);
  losses.fsdp = TrainStep(*pair.fsdp, *pair.optim, step);
  return losses;
}

std::unique_ptr<torch::optim::Optimizer> MakeOptimizer(Optim optim,
                                                       std::vector<at::Tensor> params) {
  if (optim == Optim::kAdam) {
    return std::make_unique<torch::optim::Adam>(std::move(params),
                                                torch::optim::AdamOptions(0.01).eps(1e-3));
  }
  return std::make_unique<torch::optim::SGD>(std::move(params),
                                             torch::optim::SGDOptions(0.01).momentum(0.9));
}

ReferenceAndFsdp NestedModelLosses(models::NestedModel reference, models::NestedModel model,
                                   std::unique_ptr<FullyShardedDataParallel> fsdp) {
  ReferenceAndFsdp s;
  s.fsdp = std::move(fsdp);
  s.reference = reference.ptr();
  s.reference_loss = [reference](int step) mutable {
    torch::manual_seed(100 + step);
    at::Tensor x = reference->get_input();
    return reference->get_loss(x, reference->forward(x));
  };
  s.fsdp_loss = [model, fsdp = s.fsdp.get()](int step) {
    torch::manual_seed(100 + step);
    at::Tensor x = model->get_input();
    return model->get_loss(x, fsdp->forward(x));
  };
  return s;
}

ReferenceAndFsdp TransformerLosses(models::TransformerWithSharedParams reference,
                                   models::TransformerWithSharedParams model,
                                   std::unique_ptr<FullyShardedDataParallel> fsdp) {
  ReferenceAndFsdp s;
  s.fsdp = std::move(fsdp);
  s.reference = reference.ptr();
  s.reference_loss = [reference](int) mutable {
    auto input = reference->get_input();
    return reference->get_loss(input, reference->forward(input.first, input.second));
  };
  s.fsdp_loss = [model, fsdp = s.fsdp.get()](int) {
    auto input = model->get_input();
    return model->get_loss(input, fsdp->forward(input.first, input.second));
  };
  return s;
}

}  // namespace fsdp::testing
