// PyTorch's model-parallel stand-in (test_compatible_with_trec's FakeMPModel): a rank-local
// sparse layer whose output is all-reduced, then a dense part wrapped by FSDP. Trained on real
// ranks, it must match one process that applies the same sum (N copies of identical layers).
#include <torch/torch.h>

#include <map>

#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/simple_models.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StrategyCase;
using ::testing::ElementsAre;

class FakeMPModelTest : public ::testing::TestWithParam<StrategyCase> {};

TEST_P(FakeMPModelTest, DenseUnderFsdpTrainsLikeOneProcess) {
  const StrategyCase c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    const int n = group.size();
    // One process: the all-reduce of N identical sparse outputs is N times one of them, and,
    // like c10d's all_reduce, it passes gradients through unchanged.
    models::FakeMPModel reference(0);
    // variable_data() has its own version counter: like the collective, the scaling is not an
    // in-place change autograd would refuse (ReLU saved this output).
    reference->all_reduce = [n](torch::Tensor& t) { t.variable_data().mul_(n); };
    models::FakeMPModel net(group.rank());
    net->all_reduce = [&group](torch::Tensor& t) {
      at::Tensor data = t.detach();
      FSDP_ASSERT_OK(group.AllReduce(data));
    };
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto fsdp, FullyShardedDataParallel::Wrap(net, Borrow(group),
                                                  {.sharding_strategy = c.strategy,
                                                   .use_orig_params = c.use_orig_params,
                                                   .nested = {&net->dense},
                                                   .wrap_root = false}));
    // The sparse layer stays local (outside every unit) under its rank's name.
    std::vector<std::string> unmanaged;
    for (const auto& [name, param] : fsdp->unmanaged_parameters()) unmanaged.push_back(name);
    const std::string sparse = group.rank() == 0 ? "sparse0" : "sparse1";
    EXPECT_THAT(unmanaged, ElementsAre(sparse + ".0.weight", sparse + ".0.bias"));

    torch::optim::Adam ref_optim(reference->parameters(), torch::optim::AdamOptions(1e-2));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(1e-2));
    for (int step = 0; step < 3; ++step) {
      torch::manual_seed(step);
      at::Tensor x = torch::rand({5, 8});
      ref_optim.zero_grad();
      optim.zero_grad();
      at::Tensor ref_loss = reference->forward(x).pow(2).sum();
      at::Tensor loss = fsdp->forward(x).pow(2).sum();
      EXPECT_NEAR(loss.item<double>(), ref_loss.item<double>(),
                  1e-5 * std::max(1.0, std::abs(ref_loss.item<double>())))
          << "step " << step;
      ref_loss.backward();
      loss.backward();
      ref_optim.step();
      optim.step();
    }
    FSDP_ASSERT_OK_AND_ASSIGN(auto state, fsdp::FullStateDict(*fsdp));
    std::map<std::string, at::Tensor> expected;
    for (const auto& p : reference->named_parameters()) {
      std::string name = p.key();
      if (name.rfind("sparse0.", 0) == 0) name = sparse + name.substr(7);
      expected[name] = p.value();
    }
    ASSERT_EQ(state.size(), expected.size());
    for (const auto& [name, value] : state) {
      ASSERT_TRUE(expected.count(name)) << name;
      EXPECT_TRUE(at::allclose(value, expected.at(name), 1e-5, 1e-6)) << name;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, FakeMPModelTest,
    ::testing::Values(StrategyCase{2, ShardingStrategy::kFullShard, true},
                      StrategyCase{3, ShardingStrategy::kFullShard, true},
                      StrategyCase{4, ShardingStrategy::kShardGradOp, true},
                      StrategyCase{2, ShardingStrategy::kFullShard, false},
                      StrategyCase{3, ShardingStrategy::kNoShard, false}),
    ::fsdp::testing::StrategyCaseName);

}  // namespace
}  // namespace fsdp
