// FlatParamHandle on real Gloo groups: layout and padding, unshard/reshard, gradient reduction.
#include "fsdp/flat_param.h"

#include <ATen/ATen.h>

#include <cmath>

#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

using Case = ::fsdp::testing::StrategyCase;

// Three parameters of 15 + 5 + 7 = 27 elements: with 2 ranks shards are 14 (1 padding), with
// 3 ranks 9 (none), with 4 ranks 7 (1 padding).
std::vector<FlatParamEntry> MakeParams() {
  at::manual_seed(0);
  std::vector<FlatParamEntry> entries;
  entries.push_back({{"layer.weight"}, at::randn({3, 5}).set_requires_grad(true)});
  entries.push_back({{"layer.bias"}, at::randn({5}).set_requires_grad(true)});
  entries.push_back({{"head.weight", "embed.weight"}, at::randn({7}).set_requires_grad(true)});
  return entries;
}

at::Tensor Flattened(const std::vector<FlatParamEntry>& entries) {
  std::vector<at::Tensor> pieces;
  for (const auto& e : entries) pieces.push_back(e.param.detach().reshape({-1}).clone());
  return at::cat(pieces);
}

class FlatParamTest : public ::testing::TestWithParam<Case> {};

TEST_P(FlatParamTest, ShardsAreEqualPaddedSlicesOfTheFlatTensor) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    auto entries = MakeParams();
    const at::Tensor expected_flat = Flattened(entries);
    std::vector<at::Tensor> originals;
    for (const auto& e : entries) originals.push_back(e.param.detach().clone());
    auto group_ptr = Borrow(group);
    FSDP_ASSERT_OK_AND_ASSIGN(auto handle, FlatParamHandle::Create(entries, group_ptr, c.strategy,
                                                                   c.use_orig_params));
    EXPECT_EQ(handle->numel(), 27);
    EXPECT_EQ(handle->infos()[2].fqns, (std::vector<std::string>{"head.weight", "embed.weight"}));
    EXPECT_EQ(handle->infos()[1].offset, 15);
    if (c.strategy == ShardingStrategy::kNoShard) {
      EXPECT_EQ(handle->shard_numel(), 27);
      EXPECT_TRUE(at::equal(handle->flat_param(), expected_flat));
      return;
    }
    const int64_t shard = (27 + group.size() - 1) / group.size();
    EXPECT_EQ(handle->shard_numel(), shard);
    EXPECT_EQ(handle->padded_numel(), shard * group.size());
    at::Tensor padded = at::zeros({shard * group.size()});
    padded.narrow(0, 0, 27).copy_(expected_flat);
    EXPECT_TRUE(at::equal(handle->flat_param(), padded.narrow(0, group.rank() * shard, shard)));
    // Every element of every parameter lies in exactly one rank's shard.
    for (size_t i = 0; i < 3; ++i) {
      int64_t covered = 0;
      for (int r = 0; r < group.size(); ++r) {
        ParamShard part = handle->ShardOf(i, r);
        covered += part.numel;
        if (part.numel > 0) {
          EXPECT_TRUE(at::equal(
              padded.narrow(0, r * shard + part.shard_offset, part.numel),
              originals[i].reshape({-1}).narrow(0, part.param_offset, part.numel)));
        }
      }
      EXPECT_EQ(covered, handle->infos()[i].numel);
    }
  });
}

TEST_P(FlatParamTest, UnshardRestoresFullParametersInPlaceAndReshardFreesThem) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    auto entries = MakeParams();
    std::vector<at::Tensor> originals;
    for (const auto& e : entries) originals.push_back(e.param.detach().clone());
    const c10::TensorImpl* weight_impl = entries[0].param.unsafeGetTensorImpl();
    at::Tensor weight = entries[0].param;
    auto group_ptr = Borrow(group);
    FSDP_ASSERT_OK_AND_ASSIGN(auto handle, FlatParamHandle::Create(entries, group_ptr, c.strategy,
                                                                   c.use_orig_params));
    if (c.strategy != ShardingStrategy::kNoShard) {
      EXPECT_EQ(handle->full_buffer_bytes(), 0);
      const ParamShard local = handle->ShardOf(0, group.rank());
      EXPECT_THAT(weight.sizes().vec(),
                  ElementsAre(c.use_orig_params ? local.numel : 0));
    }
    FSDP_ASSERT_OK(handle->Unshard());
    EXPECT_EQ(handle->params()[0].unsafeGetTensorImpl(), weight_impl);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_TRUE(at::equal(handle->params()[i], originals[i])) << handle->infos()[i].fqns[0];
    }
    EXPECT_THAT(weight.sizes().vec(), ElementsAre(3, 5));
    if (c.strategy == ShardingStrategy::kNoShard) return;
    EXPECT_EQ(handle->full_buffer_bytes(), handle->padded_numel() * 4);
    handle->Reshard();
    EXPECT_EQ(handle->full_buffer_bytes(), 0);
    EXPECT_FALSE(handle->is_unsharded());
    // A second round trip gives the same values.
    FSDP_ASSERT_OK(handle->Unshard());
    EXPECT_TRUE(at::equal(weight, originals[0]));
    FSDP_ASSERT_OK_AND_ASSIGN(at::Tensor full, handle->GatherFullFlat());
    EXPECT_TRUE(at::equal(full, Flattened(MakeParams())));
  });
}

TEST_P(FlatParamTest, ReduceGradientsAveragesAndShardsThem) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    auto entries = MakeParams();
    auto group_ptr = Borrow(group);
    FSDP_ASSERT_OK_AND_ASSIGN(auto handle, FlatParamHandle::Create(entries, group_ptr, c.strategy,
                                                                   c.use_orig_params));
    FSDP_ASSERT_OK(handle->Unshard());
    // Rank r's gradient of element k is (r + 1) * k, except that the middle parameter gets
    // none (as if unused): its flat gradient is zero.
    at::Tensor rank_grad = at::arange(27, at::kFloat) * (group.rank() + 1);
    for (size_t i : {0, 2}) {
      const FlatParamInfo& info = handle->infos()[i];
      handle->params()[i].mutable_grad() =
          rank_grad.narrow(0, info.offset, info.numel).view(info.shape).clone();
    }
    FSDP_ASSERT_OK(handle->ReduceGradients());
    const double mean_factor = (group.size() + 1) / 2.0;
    at::Tensor expected_full = at::arange(27, at::kFloat) * mean_factor;
    expected_full.narrow(0, 15, 5).zero_();
    at::Tensor padded = at::zeros({handle->padded_numel()});
    padded.narrow(0, 0, 27).copy_(expected_full);
    const at::Tensor expected_shard =
        padded.narrow(0, handle->rank() * handle->shard_numel(), handle->shard_numel());
    if (!c.use_orig_params) {
      ASSERT_TRUE(handle->flat_param().grad().defined());
      EXPECT_TRUE(at::allclose(handle->flat_param().grad(), expected_shard));
      for (const at::Tensor& p : handle->params()) EXPECT_FALSE(p.grad().defined());
      return;
    }
    handle->Reshard();
    for (size_t i = 0; i < 3; ++i) {
      const ParamShard local = handle->ShardOf(i, handle->rank());
      const at::Tensor& grad = handle->params()[i].grad();
      if (local.numel == 0) {
        EXPECT_FALSE(grad.defined());
        continue;
      }
      ASSERT_TRUE(grad.defined()) << handle->infos()[i].fqns[0];
      EXPECT_EQ(grad.sizes(), handle->params()[i].sizes());
      EXPECT_TRUE(at::allclose(grad.reshape({-1}),
                               expected_shard.narrow(0, local.shard_offset, local.numel)));
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, FlatParamTest,
    ::testing::Values(Case{1, ShardingStrategy::kFullShard, false},
                      Case{2, ShardingStrategy::kFullShard, false},
                      Case{3, ShardingStrategy::kFullShard, true},
                      Case{4, ShardingStrategy::kFullShard, false},
                      Case{4, ShardingStrategy::kShardGradOp, true},
                      Case{2, ShardingStrategy::kNoShard, false},
                      Case{2, ShardingStrategy::kNoShard, true}),
    ::fsdp::testing::StrategyCaseName);

// The average divides part of the way before the sum, as PyTorch FSDP1 does (2 before and 1
// after at 2 ranks, 2 and 2 at 4): gradients whose sum over the ranks exceeds float's range
// still average to a finite value, where summing first and dividing once gives inf. Every
// rank's gradient is v = 1.5 * 2^127 / (ws / 2); the sum of ws * v / 2 is 1.5 * 2^127, below
// float's largest 1.99 * 2^127, and every step is exact, so the average is v exactly.
class GradientDivideTest : public ::testing::TestWithParam<Case> {};

TEST_P(GradientDivideTest, GradientsDividedBeforeTheSumDoNotOverflow) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    const float v = std::ldexp(1.5f, 127) / (group.size() / 2);
    ASSERT_TRUE(std::isinf(v * group.size())) << "a sum before dividing must overflow";
    auto group_ptr = Borrow(group);
    at::Tensor param = at::zeros({7}).set_requires_grad(true);
    FSDP_ASSERT_OK_AND_ASSIGN(auto handle, FlatParamHandle::Create({{{"w"}, param}}, group_ptr,
                                                                   c.strategy, c.use_orig_params));
    FSDP_ASSERT_OK(handle->Unshard());
    param.mutable_grad() = at::full({7}, v);
    FSDP_ASSERT_OK(handle->ReduceGradients());
    handle->Reshard();
    const at::Tensor grad = c.use_orig_params ? param.grad() : handle->flat_param().grad();
    ASSERT_TRUE(grad.defined());
    // The padding of a sharded flat gradient (7 elements over 2 or 4 ranks) stays zero.
    const int64_t valid =
        c.use_orig_params ? grad.numel() : handle->ShardOf(0, handle->rank()).numel;
    EXPECT_TRUE(at::equal(grad.narrow(0, 0, valid), at::full({valid}, v))) << grad;
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, GradientDivideTest,
                         ::testing::Values(Case{2, ShardingStrategy::kFullShard, false},
                                           Case{4, ShardingStrategy::kFullShard, true},
                                           Case{4, ShardingStrategy::kShardGradOp, false},
                                           Case{2, ShardingStrategy::kNoShard, true},
                                           Case{4, ShardingStrategy::kNoShard, false}),
                         ::fsdp::testing::StrategyCaseName);

TEST(FlatParamHandle, RanksWhoseShardIsAllPaddingStillTakePart) {
  // Two elements over four ranks: shards of one element, ranks 2 and 3 hold only padding.
  RunInRanks(4, [](comm::ProcessGroup& group) {
    auto group_ptr = Borrow(group);
    at::Tensor param = at::tensor({3.0f, 4.0f}).set_requires_grad(true);
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto handle,
        FlatParamHandle::Create({{{"tiny"}, param}}, group_ptr, ShardingStrategy::kFullShard,
                                /*use_orig_params=*/true));
    EXPECT_EQ(handle->shard_numel(), 1);
    const ParamShard local = handle->ShardOf(0, group.rank());
    EXPECT_EQ(local.numel, group.rank() < 2 ? 1 : 0);
    EXPECT_EQ(param.numel(), local.numel) << "use_orig_params: the slice, possibly empty";
    FSDP_ASSERT_OK(handle->Unshard());
    EXPECT_TRUE(at::equal(param, at::tensor({3.0f, 4.0f})));
    param.mutable_grad() = at::full({2}, static_cast<float>(group.rank()));
    FSDP_ASSERT_OK(handle->ReduceGradients());
    handle->Reshard();
    if (group.rank() < 2) {
      ASSERT_TRUE(param.grad().defined());
      EXPECT_FLOAT_EQ(param.grad().item<float>(), 1.5f);  // mean of 0, 1, 2, 3
    } else {
      EXPECT_FALSE(param.grad().defined());
      EXPECT_EQ(param.numel(), 0);
    }
  });
}

TEST(FlatParamHandle, RefusesMixedDtypesNamingBothParameters) {
  RunInRanks(1, [](comm::ProcessGroup& group) {
    auto group_ptr = Borrow(group);
    std::vector<FlatParamEntry> entries;
    entries.push_back({{"a.weight"}, at::zeros({2})});
    entries.push_back({{"b.weight"}, at::zeros({2}, at::kDouble)});
    EXPECT_THAT(FlatParamHandle::Create(entries, group_ptr, ShardingStrategy::kFullShard, false),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         ::testing::AllOf(HasSubstr("b.weight is Double"),
                                          HasSubstr("a.weight is Float"))));
    at::Tensor shared = at::zeros({2});
    EXPECT_THAT(FlatParamHandle::Create({{{"x"}, shared}, {{"y"}, shared}}, group_ptr,
                                        ShardingStrategy::kFullShard, false),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("y is listed twice")));
    EXPECT_THAT(FlatParamHandle::Create({}, group_ptr, ShardingStrategy::kFullShard, false),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no parameters")));
  });
}

}  // namespace
}  // namespace fsdp
