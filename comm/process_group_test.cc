// Collectives of ProcessGroup on real Gloo groups of 1 to 4 rank processes. All-gather and
// reduce-scatter run under both implementations (CollectiveImpl kRing and kGloo).
#include "comm/process_group.h"

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

class CollectivesTest : public ::testing::TestWithParam<int> {};

// (world size, implementation) for the collectives that have two.
class ImplCollectivesTest
    : public ::testing::TestWithParam<std::tuple<int, CollectiveImpl>> {
 protected:
  int world_size() const { return std::get<0>(GetParam()); }
  CollectiveOptions options() const { return {.impl = std::get<1>(GetParam())}; }
};

// Rank r's contribution: values that identify both the rank and the position.
at::Tensor RankValues(int rank, int64_t n, at::ScalarType dtype) {
  return (at::arange(n, at::kDouble) + 1000.0 * rank).to(dtype);
}

TEST_P(ImplCollectivesTest, AllGatherIntoTensorConcatenatesInRankOrder) {
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kLong, at::kBFloat16, at::kShort}) {
      for (int64_t n : {0, 1, 7, 4099}) {
        at::Tensor input = RankValues(group.rank(), n, dtype);
        at::Tensor output = at::full({n * group.size()}, -1, input.options());
        FSDP_ASSERT_OK(group.AllGatherIntoTensor(output, input, options));
        std::vector<at::Tensor> expected;
        for (int r = 0; r < group.size(); ++r) expected.push_back(RankValues(r, n, dtype));
        EXPECT_TRUE(at::equal(output, at::cat(expected)))
            << "dtype " << dtype << " n " << n;
      }
    }
  });
}

TEST_P(ImplCollectivesTest, AllGatherIntoTensorWorksInPlaceOnItsOwnChunk) {
  // FSDP's unsharded flat parameter holds the local shard as a view of its own chunk.
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    const int64_t n = 33;
    at::Tensor flat = at::zeros({n * group.size()});
    at::Tensor shard = flat.narrow(0, group.rank() * n, n);
    shard.copy_(RankValues(group.rank(), n, at::kFloat));
    FSDP_ASSERT_OK(group.AllGatherIntoTensor(flat, shard, options));
    for (int r = 0; r < group.size(); ++r) {
      EXPECT_TRUE(at::equal(flat.narrow(0, r * n, n), RankValues(r, n, at::kFloat)));
    }
  });
}

TEST_P(ImplCollectivesTest, ReduceScatterTensorReducesEachChunk) {
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    const int ws = group.size();
    for (int64_t n : {1, 5, 10007}) {
      // Rank r contributes (r + 1) * [0, n * ws) + r: increasing in r at every position.
      at::Tensor input = at::arange(n * ws, at::kDouble) * (group.rank() + 1) + group.rank();
      at::Tensor base = at::arange(n * ws, at::kDouble).narrow(0, group.rank() * n, n);
      const double rank_sum = ws * (ws - 1) / 2.0;
      struct Case {
        ReduceOp op;
        at::Tensor expected;
      };
      std::vector<Case> cases = {
          {ReduceOp::kSum, base * (ws * (ws + 1) / 2) + rank_sum},
          {ReduceOp::kAvg, (base * (ws * (ws + 1) / 2) + rank_sum) / ws},
          {ReduceOp::kMax, base * ws + (ws - 1)},
          {ReduceOp::kMin, base},
      };
      for (const Case& c : cases) {
        at::Tensor output = at::full({n}, -7.0, at::kDouble);
        FSDP_ASSERT_OK(group.ReduceScatterTensor(output, input, c.op, options));
        EXPECT_TRUE(at::allclose(output, c.expected))
            << "op " << static_cast<int>(c.op) << " n " << n << "\n"
            << output.narrow(0, 0, std::min<int64_t>(n, 5)) << "\nexpected\n"
            << c.expected.narrow(0, 0, std::min<int64_t>(n, 5));
      }
    }
  });
}

TEST_P(ImplCollectivesTest, ReduceScatterOfChunksSplitIntoSeveralPipelinedPieces) {
  // Chunks over 4 MiB travel in several pieces per ring step; the last piece is short.
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    const int64_t n = (2 << 20) + 3;  // floats: 8 MiB + 12 bytes per chunk
    at::Tensor input = at::arange(n * group.size(), at::kFloat).fmod(1000) + group.rank();
    at::Tensor expected = (at::arange(n * group.size(), at::kFloat).fmod(1000) * group.size() +
                           group.size() * (group.size() - 1) / 2.0)
                              .narrow(0, group.rank() * n, n);
    for (int repeat = 0; repeat < 2; ++repeat) {  // the second call reuses the scratch buffers
      at::Tensor output = at::empty({n});
      FSDP_ASSERT_OK(group.ReduceScatterTensor(output, input, ReduceOp::kSum, options));
      EXPECT_TRUE(at::equal(output, expected)) << "repeat " << repeat;
    }
  });
}

TEST_P(ImplCollectivesTest, ReduceScatterLeavesInputUnchanged) {
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    at::Tensor input = at::randn({group.size() * 64});
    at::Tensor before = input.clone();
    at::Tensor output = at::empty({64});
    FSDP_ASSERT_OK(group.ReduceScatterTensor(output, input, ReduceOp::kAvg, options));
    EXPECT_TRUE(at::equal(input, before));
  });
}

TEST_P(CollectivesTest, AllReduceSumAvgMax) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    const int ws = group.size();
    at::Tensor t = at::full({3, 5}, static_cast<float>(group.rank() + 1));
    FSDP_ASSERT_OK(group.AllReduce(t, ReduceOp::kSum));
    EXPECT_TRUE(at::equal(t, at::full({3, 5}, ws * (ws + 1) / 2.0f)));
    at::Tensor a = at::full({4}, static_cast<double>(group.rank()), at::kDouble);
    FSDP_ASSERT_OK(group.AllReduce(a, ReduceOp::kAvg));
    EXPECT_TRUE(at::allclose(a, at::full({4}, (ws - 1) / 2.0, at::kDouble)));
    at::Tensor m = at::full({2}, static_cast<int64_t>(group.rank()), at::kLong);
    FSDP_ASSERT_OK(group.AllReduce(m, ReduceOp::kMax));
    EXPECT_EQ(m[1].item<int64_t>(), ws - 1);
  });
}

TEST_P(CollectivesTest, BroadcastFromEveryRoot) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    for (int root = 0; root < group.size(); ++root) {
      at::Tensor t = group.rank() == root ? RankValues(root, 257, at::kFloat) : at::zeros({257});
      FSDP_ASSERT_OK(group.Broadcast(t, root));
      EXPECT_TRUE(at::equal(t, RankValues(root, 257, at::kFloat))) << "root " << root;
    }
  });
}

TEST_P(CollectivesTest, BarrierAndSendRecvRing) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    FSDP_ASSERT_OK(group.Barrier());
    if (group.size() == 1) return;
    const int next = (group.rank() + 1) % group.size();
    const int prev = (group.rank() + group.size() - 1) % group.size();
    at::Tensor received = at::empty({9});
    if (group.rank() % 2 == 0) {
      FSDP_ASSERT_OK(group.Send(RankValues(group.rank(), 9, at::kFloat), next, 3));
      FSDP_ASSERT_OK(group.Recv(received, prev, 3));
    } else {
      FSDP_ASSERT_OK(group.Recv(received, prev, 3));
      FSDP_ASSERT_OK(group.Send(RankValues(group.rank(), 9, at::kFloat), next, 3));
    }
    EXPECT_TRUE(at::equal(received, RankValues(prev, 9, at::kFloat)));
  });
}

TEST_P(CollectivesTest, MismatchedSizesAreRefusedBeforeAnythingIsSent) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    at::Tensor input = at::zeros({4});
    at::Tensor output = at::zeros({4 * group.size() + 1});
    EXPECT_THAT(group.AllGatherIntoTensor(output, input),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("all_gather_into_tensor on rank "),
                               HasSubstr("of group 'default'"),
                               HasSubstr("output must hold size * input.numel()"))));
    at::Tensor small = at::zeros({3});
    EXPECT_THAT(group.ReduceScatterTensor(small, at::zeros({3 * group.size() + 2})),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("reduce_scatter_tensor on rank ")));
    EXPECT_THAT(group.ReduceScatterTensor(small, at::zeros({3 * group.size()}, at::kDouble)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("Double")));
    at::Tensor strided = at::zeros({4, 4}).t();
    EXPECT_THAT(group.Broadcast(strided, 0),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not contiguous")));
    at::Tensor t = at::zeros({2});
    EXPECT_THAT(group.Broadcast(t, group.size()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("root")));
    at::Tensor ints = at::zeros({2}, at::kLong);
    EXPECT_THAT(group.AllReduce(ints, ReduceOp::kAvg),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("floating-point")));
    // The group still works after refused calls.
    FSDP_EXPECT_OK(group.Barrier());
  });
}

// kSum from both implementations on random values drawn per rank (different on every rank),
// compared bit for bit on every rank. Sums of three or more floats depend on their order; the
// ring adds in Gloo's all-reduce order (comm/process_group.h), so the two agree exactly at
// every world size, for chunk sizes that Gloo's segments do not divide (n = 1, 5, 1001) and
// for chunks of several of Gloo's 1 MiB segments and of our 4 MiB pieces.
class ReduceScatterOrderTest : public ::testing::TestWithParam<int> {};

TEST_P(ReduceScatterOrderTest, RingSumsEqualGlooBitForBit) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    const int ws = group.size();
    struct Case {
      at::ScalarType dtype;
      int64_t n;
    };
    std::vector<Case> cases;
    for (int64_t n : {1, 2, 5, 1000, 1001, 4097, (1 << 20) + 3}) cases.push_back({at::kFloat, n});
    for (int64_t n : {7, 300001}) {
      cases.push_back({at::kDouble, n});
      cases.push_back({at::kBFloat16, n});
    }
    for (const Case& c : cases) {
      at::manual_seed(1234 + group.rank());
      at::Tensor input = (at::randn({c.n * ws}) * 100).to(c.dtype);
      at::Tensor ring = at::empty({c.n}, input.options());
      at::Tensor gloo = at::empty({c.n}, input.options());
      FSDP_ASSERT_OK(group.ReduceScatterTensor(ring, input, ReduceOp::kSum,
                                               {.impl = CollectiveImpl::kRing}));
      FSDP_ASSERT_OK(
          group.ReduceScatterTensor(gloo, input, ReduceOp::kSum, {.impl = CollectiveImpl::kGloo}));
      const at::Tensor differ = ring.ne(gloo);
      EXPECT_EQ(differ.sum().item<int64_t>(), 0)
          << c10::toString(c.dtype) << " n " << c.n << " on rank " << group.rank() << " of " << ws
          << ": elements that differ, of " << c.n << "; largest |ring - gloo| "
          << (ring.to(at::kDouble) - gloo.to(at::kDouble)).abs().max().item<double>();
    }
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ReduceScatterOrderTest, ::testing::Values(2, 3, 4, 8),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "ws" + std::to_string(info.param);
                         });

// The default (the ring) reduces any dtype at::add and friends take; Gloo's reductions take
// fewer (not int16, for one).
TEST_P(CollectivesTest, DefaultReduceScatterTakesDtypesGlooDoesNot) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    const int ws = group.size();
    at::Tensor input = at::arange(3 * ws, at::kShort) + static_cast<int16_t>(group.rank());
    at::Tensor output = at::empty({3}, at::kShort);
    FSDP_ASSERT_OK(group.ReduceScatterTensor(output, input, ReduceOp::kMax));
    EXPECT_TRUE(at::equal(output, at::arange(3, at::kShort) + 3 * group.rank() + (ws - 1)));
  });
}

// All-gather only copies: both implementations give the same bytes.
TEST_P(CollectivesTest, AllGatherOfGlooMatchesTheRingBitForBit) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    at::manual_seed(99 + group.rank());
    at::Tensor input = at::randn({(1 << 18) + 5});
    at::Tensor ring = at::empty({input.numel() * group.size()});
    at::Tensor other = at::empty({input.numel() * group.size()});
    FSDP_ASSERT_OK(group.AllGatherIntoTensor(ring, input, {.impl = CollectiveImpl::kRing}));
    FSDP_ASSERT_OK(group.AllGatherIntoTensor(other, input, {.impl = CollectiveImpl::kGloo}));
    EXPECT_TRUE(at::equal(ring, other));
  });
}

INSTANTIATE_TEST_SUITE_P(
    WorldSizes, ImplCollectivesTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4),
                       ::testing::Values(CollectiveImpl::kRing, CollectiveImpl::kGloo)),
    [](const ::testing::TestParamInfo<std::tuple<int, CollectiveImpl>>& info) {
      return "ws" + std::to_string(std::get<0>(info.param)) + "_" +
             std::string(CollectiveImplName(std::get<1>(info.param)));
    });

INSTANTIATE_TEST_SUITE_P(WorldSizes, CollectivesTest, ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "ws" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace fsdp::comm
