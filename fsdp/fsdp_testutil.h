// Shared pieces of the FSDP tests (testonly):
//   * the (world size, strategy, use_orig_params) grid that the parametrized suites run, its
//     test-name generator, and borrowing RunInRanks' group;
//   * `Net`, the small nested model of the FSDP unit tests, and WrapNet, its wrapping;
//     `NormNet`, a model with BatchNorm buffers;
//   * `NetPair`: the "reference + wrapped + optimizer" set-up, Net from one seed twice, one
//     copy unwrapped and one under FSDP, each with Adam, and TrainStep, one step on a batch
//     every rank draws alike;
//   * `ReferenceAndFsdp`: the same pairing for the reference models of PyTorch's tests
//     (NestedModel, TransformerWithSharedParams, ...), a step's loss as a function of the step.
// Preconditions: the group is a real group (RunInRanks'); every rank builds the same models.
// Errors: MakeNetPair and WrapNet return FullyShardedDataParallel::Wrap's status.
#ifndef FSDP_CPP_FSDP_FSDP_TESTUTIL_H_
#define FSDP_CPP_FSDP_FSDP_TESTUTIL_H_

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/flat_param.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/module_slot.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "models/transformer.h"

namespace fsdp::testing {

struct StrategyCase {
  int world_size;
  ShardingStrategy strategy;
  bool use_orig_params;
};

// "ws3_FULL_SHARD_orig"
std::string StrategyCaseName(const ::testing::TestParamInfo<StrategyCase>& info);

// RunInRanks owns the group; FSDP APIs take a shared_ptr: share it without owning it.
std::shared_ptr<comm::ProcessGroup> Borrow(comm::ProcessGroup& group);

// A module of type `Module` built right after torch::manual_seed(seed): two calls with one seed
// give two equal models.
template <typename Module, typename... Args>
Module Seeded(uint64_t seed, Args&&... args) {
  torch::manual_seed(seed);
  return Module(std::forward<Args>(args)...);
}

// A model with floating-point buffers (BatchNorm's running statistics), for mixed precision's
// buffer_dtype and sync_module_states: Linear(4, 3), BatchNorm1d(3), Linear(3, 2).
struct NormNetImpl : torch::nn::Module {
  NormNetImpl()
      : in(register_module("in", torch::nn::Linear(4, 3))),
        norm(register_module("norm", torch::nn::BatchNorm1d(3))),
        out(register_module("out", torch::nn::Linear(3, 2))) {}
  torch::Tensor forward(torch::Tensor x) { return out(norm(in(x))); }
  torch::nn::Linear in;
  torch::nn::BatchNorm1d norm;
  torch::nn::Linear out;
};
TORCH_MODULE(NormNet);

struct NetOptions {
  // Adds what FSDP leaves alone, for the state-dict tests: `extra` (a Linear passed as an
  // ignored module) and `shift` (a buffer); `scale` is then drawn at random instead of ones.
  bool with_unmanaged = false;
};

// inner: a -> tanh -> b, both slots (wrappable).
struct InnerImpl : torch::nn::Module {
  InnerImpl();
  torch::Tensor forward(torch::Tensor x);
  ModuleSlot a;
  ModuleSlot b;
};
TORCH_MODULE(Inner);

// l0 -> relu -> inner -> head -> * scale, and with_unmanaged: -> extra -> + shift. Sizes are
// odd so that flat parameters split unevenly; everything depends on the seed. The class keeps
// the name NetImpl: state-dict errors quote it, as Python quotes the class name.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(NetOptions options = {});
  torch::Tensor forward(torch::Tensor x);
  ModuleSlot l0;
  ModuleSlot inner;
  torch::nn::Linear head;
  torch::nn::Linear extra{nullptr};  // with_unmanaged only
  torch::Tensor scale;
  torch::Tensor shift;  // with_unmanaged only
};
TORCH_MODULE(Net);

// Units at l0, inner and inner.b inside the root unit; `extra`, if present, ignored. With
// `nest_inner_b` false, inner.b belongs to inner's unit (another wrapping). `param_init_fn`:
// FsdpOptions'.
absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> WrapNet(
    Net net, std::shared_ptr<comm::ProcessGroup> group, const StrategyCase& c,
    bool nest_inner_b = true, ParamInitFn param_init_fn = nullptr);

// The batch of step `step`, the same on every rank: randn({8, 4}) right after seed 100 + step.
at::Tensor Batch(int step);

// One optimizer step of `model` (an unwrapped Net or FSDP) on Batch(step), loss sum(out^2);
// returns the loss.
template <typename Model>
double TrainStep(Model& model, torch::optim::Optimizer& optim, int step) {
  optim.zero_grad();
  at::Tensor loss = model.forward(Batch(step)).pow(2).sum();
  loss.backward();
  optim.step();
  return loss.item<double>();
}

// Net from seed 0 twice: `reference` unwrapped, `fsdp` its copy under WrapNet; each with
// Adam (lr 0.01).
struct NetPair {
  Net reference{nullptr};
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> reference_optim;
  std::unique_ptr<torch::optim::Adam> optim;
};
absl::StatusOr<NetPair> MakeNetPair(comm::ProcessGroup& group, const StrategyCase& c,
                                    NetOptions options = {});

// The two losses of TrainBoth.
struct StepLosses {
  double reference;
  double fsdp;
};
// TrainStep of the reference, then of the FSDP copy, each with its own optimizer.
StepLosses TrainBoth(NetPair& pair, int step);

// The optimizers the reference-model tests train with, on both sides alike.
enum class Optim { kAdam, kSgdMomentum };

// kAdam: Adam, lr 0.01, eps 1e-3. Adam divides by |gradient| + eps. With the default eps
// (1e-8), gradients that are zero but for rounding (an attention key bias's: softmax ignores
// it) take full steps in a direction rounding picks, and rounding differs between any two ways
// of computing them; 1e-3 keeps such steps negligible while real gradients (>= 1e-2 here)
// still take ~lr. kSgdMomentum: SGD, lr 0.01, momentum 0.9.
std::unique_ptr<torch::optim::Optimizer> MakeOptimizer(Optim optim, std::vector<at::Tensor> params);

// A model trained unwrapped (`reference`) and the same model under FSDP: each one's loss on
// step `step`'s batch (its forward, then the model's loss).
struct ReferenceAndFsdp {
  std::shared_ptr<torch::nn::Module> reference;
  std::function<at::Tensor(int step)> reference_loss;
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::function<at::Tensor(int step)> fsdp_loss;
};

// `reference` and `fsdp` (wrapping `model`): NestedModel's get_input drawn right after seed
// 100 + step (the same on every rank), then get_loss.
ReferenceAndFsdp NestedModelLosses(models::NestedModel reference, models::NestedModel model,
                                   std::unique_ptr<FullyShardedDataParallel> fsdp);
// `reference` and `fsdp` (wrapping `model`): TransformerWithSharedParams' get_input (it seeds
// itself: every step has the same batch), then get_loss.
ReferenceAndFsdp TransformerLosses(models::TransformerWithSharedParams reference,
                                   models::TransformerWithSharedParams model,
                                   std::unique_ptr<FullyShardedDataParallel> fsdp);

}  // namespace fsdp::testing

#endif  // FSDP_CPP_FSDP_FSDP_TESTUTIL_H_
