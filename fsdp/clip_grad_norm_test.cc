// ClipGradNorm on real ranks: the parts PyTorch's FSDP1 cannot be compared on here (a model
// without a root unit, whose unmanaged parameters count once) and the refused arguments.
// Against PyTorch FSDP1 itself, bit for bit: //tests/pytorch_peer:gradient_reduction_peer_test.
#include "fsdp/clip_grad_norm.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

class ClipGradNormTest : public ::testing::TestWithParam<double> {};

// NestedModel.wrap has no root unit: block0 and `bias` stay unmanaged and whole on every rank.
// Every rank draws the same batch, so the averaged gradients are the unwrapped model's and the
// total norm must be torch::nn::utils::clip_grad_norm_'s on it (up to the grouping of the
// per-tensor norms); after clipping, the norm is max_norm.
TEST_P(ClipGradNormTest, CountsUnmanagedParametersOnceAndClipsToMaxNorm) {
  const double norm_type = GetParam();
  RunInRanks(2, [norm_type](comm::ProcessGroup& group) {
    models::NestedModel reference;
    models::NestedModel net;
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto fsdp, FullyShardedDataParallel::Wrap(
                       net, Borrow(group), {.nested = net->wrap_slots(), .wrap_root = false}));
    ASSERT_FALSE(fsdp->unmanaged_parameters().empty());
    torch::manual_seed(0);
    const at::Tensor x = net->get_input();
    fsdp->forward(x).sum().backward();
    reference->forward(x).sum().backward();
    constexpr double kMaxNorm = 0.5;
    const double expected =
        torch::nn::utils::clip_grad_norm_(reference->parameters(), kMaxNorm, norm_type);
    FSDP_ASSERT_OK_AND_ASSIGN(at::Tensor total, ClipGradNorm(*fsdp, kMaxNorm, norm_type));
    EXPECT_EQ(total.scalar_type(), at::kFloat);
    EXPECT_NEAR(total.item<double>(), expected, 1e-6 * expected);
    ASSERT_GT(expected, kMaxNorm) << "the case must clip";
    // Clipped: the norm over every rank's shards and the unmanaged parameters is max_norm (an
    // infinite max_norm measures without clipping).
    FSDP_ASSERT_OK_AND_ASSIGN(
        at::Tensor after, ClipGradNorm(*fsdp, std::numeric_limits<double>::infinity(), norm_type));
    EXPECT_NEAR(after.item<double>(), kMaxNorm, 1e-5);
  });
}

INSTANTIATE_TEST_SUITE_P(NormTypes, ClipGradNormTest,
                         ::testing::Values(2.0, 1.0, std::numeric_limits<double>::infinity()),
                         [](const ::testing::TestParamInfo<double>& info) {
                           return std::isinf(info.param) ? std::string("inf")
                                                         : absl::StrCat("p", info.param);
                         });

TEST(ClipGradNorm, RefusesANormTypeOrMaxNormItCannotUse) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    models::NestedModel net;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(net, Borrow(group)));
    EXPECT_THAT(ClipGradNorm(*fsdp, 1.0, 0.0),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("norm_type 0")));
    EXPECT_THAT(ClipGradNorm(*fsdp, 1.0, std::nan("")),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("norm_type")));
    EXPECT_THAT(ClipGradNorm(*fsdp, -1.0),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_norm -1")));
  });
}

}  // namespace
}  // namespace fsdp
