// ProcessGroup::AllGatherIntoTensorAsync on real Gloo groups of 1 to 3 rank processes: the
// same bytes as the blocking call, several in flight among blocking collectives, and errors
// (bad tensors, a silent peer, a dead peer) reported by Wait(), never a hang.
#include <ATen/ATen.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/multiprocess_testutil.h"
#include "comm/process_group.h"
#include "comm/work.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

// (world size, implementation).
class AsyncAllGatherTest : public ::testing::TestWithParam<std::tuple<int, CollectiveImpl>> {
 protected:
  int world_size() const { return std::get<0>(GetParam()); }
  CollectiveOptions options() const { return {.impl = std::get<1>(GetParam())}; }
};

at::Tensor RankValues(int rank, int64_t n, at::ScalarType dtype) {
  return (at::rand({n}, at::kDouble) * 100 + 1000.0 * rank).to(dtype);
}

TEST_P(AsyncAllGatherTest, EqualsTheBlockingCall) {
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    at::manual_seed(group.rank());
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
      for (int64_t n : {0, 1, 4099, 300000}) {
        at::Tensor input = RankValues(group.rank(), n, dtype);
        at::Tensor blocking = at::empty({n * group.size()}, input.options());
        FSDP_ASSERT_OK(group.AllGatherIntoTensor(blocking, input, options));
        at::Tensor async = at::full({n * group.size()}, -1, input.options());
        auto work = group.AllGatherIntoTensorAsync(async, input, options);
        FSDP_ASSERT_OK(work.status());
        FSDP_ASSERT_OK((*work)->Wait());
        EXPECT_TRUE((*work)->IsCompleted());
        EXPECT_TRUE(at::equal(async, blocking)) << "dtype " << dtype << " n " << n;
        FSDP_EXPECT_OK((*work)->Wait());  // a second Wait returns the same status
      }
    }
  });
}

TEST_P(AsyncAllGatherTest, SeveralInFlightAmongBlockingCollectives) {
  // FSDP's pattern: gathers issued ahead while the caller reduce-scatters and all-reduces.
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    const int64_t n = 100003;
    std::vector<at::Tensor> inputs, outputs;
    std::vector<std::shared_ptr<Work>> works;
    for (int i = 0; i < 3; ++i) {
      inputs.push_back(at::full({n}, 10.0 * i + group.rank()));
      outputs.push_back(at::empty({n * group.size()}));
      auto work = group.AllGatherIntoTensorAsync(outputs.back(), inputs.back(), options);
      FSDP_ASSERT_OK(work.status());
      works.push_back(*work);
      at::Tensor grad = at::ones({n * group.size()});
      at::Tensor shard = at::empty({n});
      FSDP_ASSERT_OK(group.ReduceScatterTensor(shard, grad));
      EXPECT_TRUE(at::equal(shard, at::full({n}, static_cast<float>(group.size()))));
      at::Tensor sum = at::ones({4});
      FSDP_ASSERT_OK(group.AllReduce(sum));
      EXPECT_EQ(sum[0].item<float>(), group.size());
    }
    for (int i = 2; i >= 0; --i) {  // awaited in any order
      FSDP_ASSERT_OK(works[i]->Wait());
      for (int r = 0; r < group.size(); ++r) {
        EXPECT_TRUE(at::equal(outputs[i].narrow(0, r * n, n), at::full({n}, 10.0 * i + r)));
      }
    }
  });
}

TEST_P(AsyncAllGatherTest, RefusesBadTensorsBeforeSending) {
  RunInRanks(world_size(), [options = options()](ProcessGroup& group) {
    at::Tensor input = at::ones({5});
    at::Tensor wrong_size = at::empty({5 * group.size() + 1});
    EXPECT_THAT(group.AllGatherIntoTensorAsync(wrong_size, input, options).status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("all_gather_into_tensor (async) on rank "),
                               HasSubstr("output must hold size * input.numel()"))));
    at::Tensor strided = at::empty({10 * group.size()}).slice(0, 0, 10 * group.size(), 2);
    EXPECT_THAT(group.AllGatherIntoTensorAsync(strided, input, options).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not contiguous")));
    // Nothing was sent: the group still works.
    at::Tensor out = at::empty({5 * group.size()});
    FSDP_EXPECT_OK(group.AllGatherIntoTensor(out, input, options));
  });
}

std::string ImplTestName(const ::testing::TestParamInfo<std::tuple<int, CollectiveImpl>>& info) {
  return absl::StrCat("ws", std::get<0>(info.param), "_",
                      CollectiveImplName(std::get<1>(info.param)));
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, AsyncAllGatherTest,
                         ::testing::Combine(::testing::Values(1, 2, 3),
                                            ::testing::Values(CollectiveImpl::kRing,
                                                              CollectiveImpl::kGloo)),
                         ImplTestName);

TEST(AsyncAllGatherFailure, SilentPeerIsADeadlineAndBreaksTheQueue) {
  RunInRanks(2, [](ProcessGroup& group) {
    at::Tensor input = at::ones({1000});
    at::Tensor output = at::empty({2000});
    if (group.rank() == 1) {
      // Never issues the gather; stays alive past rank 0's timeout.
      std::this_thread::sleep_for(std::chrono::seconds(3));
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    auto work =
        group.AllGatherIntoTensorAsync(output, input, {.timeout = std::chrono::milliseconds(500)});
    FSDP_ASSERT_OK(work.status());
    auto later =
        group.AllGatherIntoTensorAsync(output, input, {.timeout = std::chrono::seconds(60)});
    FSDP_ASSERT_OK(later.status());
    EXPECT_THAT((*work)->Wait(),
                StatusIs(absl::StatusCode::kDeadlineExceeded,
                         AllOf(HasSubstr("all_gather_into_tensor (async) on rank 0"),
                               HasSubstr("of group 'default' (size 2)"))));
    // The queued one does not run on a broken group: it fails at once with the cause.
    EXPECT_THAT((*later)->Wait(),
                StatusIs(absl::StatusCode::kDeadlineExceeded,
                         HasSubstr("not run, an earlier asynchronous collective")));
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  });
}

TEST(AsyncAllGatherFailure, DeadPeerIsAnErrorNotAHang) {
  LaunchOptions options;
  options.world_size = 3;
  options.timeout = std::chrono::seconds(60);
  options.stop_all_on_failure = false;  // let the survivors report what they saw
  options.output = RankOutput::kCapture;
  LaunchReport report;
  const absl::Status status = ::fsdp::testing::RunInRanksWithReport(
      options,
      [](ProcessGroup& group) {
        const int64_t n = 4 << 20;
        at::Tensor input = at::ones({n});
        at::Tensor output = at::empty({n * group.size()});
        if (group.rank() == 2) _exit(17);
        auto work =
            group.AllGatherIntoTensorAsync(output, input, {.timeout = std::chrono::seconds(10)});
        FSDP_ASSERT_OK(work.status());
        EXPECT_THAT(
            (*work)->Wait(),
            ::testing::AnyOf(StatusIs(absl::StatusCode::kUnavailable,
                                      HasSubstr("all_gather_into_tensor (async) on rank ")),
                             StatusIs(absl::StatusCode::kDeadlineExceeded,
                                      HasSubstr("all_gather_into_tensor (async) on rank "))));
      },
      &report);
  if (fsdp::testing::IsRankProcess()) return;
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInternal, HasSubstr("exited with code 17")));
  ASSERT_EQ(report.ranks.size(), 3u);
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(report.ranks[r].ok()) << "rank " << r << "\n" << report.ranks[r].output;
    EXPECT_THAT(report.ranks[r].output, HasSubstr("[  PASSED  ] 1 test."));
  }
}

}  // namespace
}  // namespace fsdp::comm
