// NcclCommunicator on real NCCL communicators of 1 and 2 rank processes, one GPU each. Those
// tests skip on machines without enough CUDA devices; the argument checks, WrapDeviceMemory and
// the NCCL version need no GPU and run wherever this target builds (--config=cuda).
#include "comm/nccl_communicator.h"

#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

// Skips the current test unless this process sees at least `n` CUDA devices.
#define FSDP_SKIP_WITHOUT_GPUS(n)                                                   \
  do {                                                                              \
    const int fsdp_gpus_ = CudaDeviceCount();                                       \
    if (fsdp_gpus_ < (n)) {                                                         \
      GTEST_SKIP() << "needs " << (n) << " CUDA device(s); this machine has " \
                   << fsdp_gpus_;                                                   \
    }                                                                               \
  } while (false)

// ---------------------------------------------------------------------------------------------
// No GPU needed.

TEST(NcclCommunicator, LinksAgainstNcclWithNonBlockingCommunicators) {
  absl::StatusOr<int> version = NcclVersion();
  ASSERT_THAT(version, IsOk());
  // Non-blocking setup and ncclCommFinalize appeared in NCCL 2.14.
  EXPECT_GE(*version, NCCL_VERSION(2, 14, 0));
  EXPECT_GE(*version, NCCL_VERSION_CODE) << "libnccl is older than the nccl.h built against";
}

TEST(NcclCommunicator, CreateRejectsBadArgumentsBeforeTouchingCuda) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  ProcessGroupOptions options;
  options.name = "bad_args";
  const auto rejected = [](absl::string_view what) {
    return StatusIs(absl::StatusCode::kInvalidArgument,
                    AllOf(HasSubstr("NCCL communicator 'bad_args'"), HasSubstr(what)));
  };
  EXPECT_THAT(NcclCommunicator::Create(store, 0, 0, 0, options),
              rejected("outside a group of size 0"));
  EXPECT_THAT(NcclCommunicator::Create(store, -1, 2, 0, options),
              rejected("rank -1 is outside a group of size 2"));
  EXPECT_THAT(NcclCommunicator::Create(store, 2, 2, 0, options),
              rejected("rank 2 is outside a group of size 2"));
  EXPECT_THAT(NcclCommunicator::Create(store, 0, 1, -1, options),
              rejected("device -1 is negative"));
  EXPECT_THAT(NcclCommunicator::Create(c10::intrusive_ptr<c10d::Store>(), 0, 1, 0, options),
              rejected("no store"));
  ProcessGroupOptions no_time = options;
  no_time.timeout = std::chrono::milliseconds(0);
  EXPECT_THAT(NcclCommunicator::Create(store, 0, 1, 0, no_time),
              rejected("timeout must be positive"));
}

TEST(NcclCommunicator, CreateWithoutGpuIsAFailedPrecondition) {
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "this machine has a CUDA device";
  auto store = c10::make_intrusive<c10d::HashStore>();
  EXPECT_THAT(NcclCommunicator::Create(store, 0, 1, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("no usable CUDA device")));
}

TEST(WrapDeviceMemory, MakesACudaTensorOverTheGivenMemory) {
  // Only metadata is made, so host memory stands in for device memory here.
  static float memory[6];
  bool deleted = false;
  {
    absl::StatusOr<at::Tensor> t = WrapDeviceMemory(
        memory, {2, 3}, at::kFloat, 1, [&deleted](void* p) { deleted = p == memory; });
    ASSERT_THAT(t, IsOk());
    EXPECT_EQ(t->device(), at::Device(at::kCUDA, 1));
    EXPECT_EQ(t->sizes(), at::IntArrayRef({2, 3}));
    EXPECT_EQ(t->scalar_type(), at::kFloat);
    EXPECT_TRUE(t->is_contiguous());
    EXPECT_EQ(t->data_ptr(), static_cast<void*>(memory));
    EXPECT_FALSE(deleted);
  }
  EXPECT_TRUE(deleted);
  EXPECT_THAT(WrapDeviceMemory(nullptr, {0}, at::kLong, 0), IsOk());
}

TEST(WrapDeviceMemory, RejectsBadArguments) {
  static float memory[4];
  EXPECT_THAT(WrapDeviceMemory(memory, {4}, at::kFloat, -1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("device -1")));
  EXPECT_THAT(WrapDeviceMemory(memory, {2, -2}, at::kFloat, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("negative size")));
  EXPECT_THAT(WrapDeviceMemory(nullptr, {4}, at::kFloat, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("null data")));
}

// ---------------------------------------------------------------------------------------------
// Real communicators: one rank process per GPU, rank r on device r.

// A client of the launcher's TCPStore (RunInRanks' launcher hosts it; see rendezvous.h).
absl::StatusOr<c10::intrusive_ptr<c10d::Store>> StoreFromEnv() {
  absl::StatusOr<RankInfo> info = RankInfoFromEnv();
  if (!info.ok()) return info.status();
  return CallTorch("connecting to the TCPStore", [&]() -> c10::intrusive_ptr<c10d::Store> {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(info->master_port);
    options.isServer = false;
    options.numWorkers = info->world_size;
    options.waitWorkers = false;
    options.timeout = std::chrono::seconds(60);
    return c10::make_intrusive<c10d::TCPStore>(info->master_addr, options);
  });
}

using CommBody = std::function<void(NcclCommunicator& comm, ProcessGroup& group)>;

// Runs `body` in `world_size` rank processes, each with its NCCL communicator on device `rank`.
// `group` is the ranks' Gloo group, for coordination outside NCCL.
void RunWithNccl(int world_size, const CommBody& body,
                 std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  RunInRanks(world_size, [&](ProcessGroup& group) {
    ASSERT_EQ(cudaSetDevice(group.rank()), cudaSuccess);
    FSDP_ASSERT_OK_AND_ASSIGN(c10::intrusive_ptr<c10d::Store> store, StoreFromEnv());
    ProcessGroupOptions options;
    options.name = "nccl_test";
    options.timeout = timeout;
    FSDP_ASSERT_OK_AND_ASSIGN(
        std::unique_ptr<NcclCommunicator> comm,
        NcclCommunicator::Create(store, group.rank(), group.size(), group.rank(), options));
    ASSERT_TRUE(comm->usable());
    body(*comm, group);
  });
}

// `n` elements of `dtype` in fresh device memory on the current device (freed with the tensor).
at::Tensor DeviceEmpty(int64_t n, at::ScalarType dtype) {
  int device = 0;
  EXPECT_EQ(cudaGetDevice(&device), cudaSuccess);
  void* data = nullptr;
  const size_t bytes = static_cast<size_t>(n) * c10::elementSize(dtype);
  if (bytes > 0) {
    EXPECT_EQ(cudaMalloc(&data, bytes), cudaSuccess);
  }
  absl::StatusOr<at::Tensor> t =
      WrapDeviceMemory(data, {n}, dtype, device, [](void* p) { cudaFree(p); });
  EXPECT_THAT(t, IsOk());
  return t.ok() ? *t : at::Tensor();
}

void CopyToDevice(const at::Tensor& host, at::Tensor& device_tensor) {
  at::Tensor src = host.contiguous();
  ASSERT_EQ(src.nbytes(), device_tensor.nbytes());
  if (src.nbytes() == 0) return;
  ASSERT_EQ(cudaMemcpy(device_tensor.data_ptr(), src.data_ptr(), src.nbytes(),
                       cudaMemcpyHostToDevice),
            cudaSuccess);
}

at::Tensor DeviceFrom(const at::Tensor& host) {
  at::Tensor t = DeviceEmpty(host.numel(), host.scalar_type());
  CopyToDevice(host, t);
  return t;
}

at::Tensor ToHost(const at::Tensor& device_tensor) {
  at::Tensor host = at::empty({device_tensor.numel()}, device_tensor.scalar_type());
  if (host.nbytes() > 0) {
    EXPECT_EQ(cudaMemcpy(host.data_ptr(), device_tensor.data_ptr(), host.nbytes(),
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
  }
  return host;
}

// Rank r's contribution: small integers (exact in every dtype, uint8 and bfloat16 included)
// that identify both the rank and the position.
at::Tensor RankValues(int rank, int64_t n, at::ScalarType dtype) {
  return (at::arange(n, at::kDouble).remainder(50) + 100.0 * rank).to(dtype);
}

bool SameValues(const at::Tensor& a, const at::Tensor& b) {
  return at::equal(a.to(at::kDouble).reshape({-1}), b.to(at::kDouble).reshape({-1}));
}

class NcclCollectivesTest : public ::testing::TestWithParam<int> {};

TEST_P(NcclCollectivesTest, AllGatherIntoTensorConcatenatesInRankOrder) {
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(GetParam(), [](NcclCommunicator& comm, ProcessGroup&) {
    for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kInt,
                                 at::kLong, at::kByte}) {
      for (int64_t n : {0, 1, 7, 4099}) {
        at::Tensor input = DeviceFrom(RankValues(comm.rank(), n, dtype));
        at::Tensor output = DeviceFrom(at::full({n * comm.size()}, 7, dtype));
        FSDP_ASSERT_OK(comm.AllGatherIntoTensor(output, input));
        std::vector<at::Tensor> expected;
        for (int r = 0; r < comm.size(); ++r) expected.push_back(RankValues(r, n, dtype));
        EXPECT_TRUE(SameValues(ToHost(output), at::cat(expected)))
            << "dtype " << dtype << " n " << n;
      }
    }
  });
}

TEST_P(NcclCollectivesTest, AllGatherIntoTensorWorksInPlaceOnItsOwnChunk) {
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(GetParam(), [](NcclCommunicator& comm, ProcessGroup&) {
    const int64_t n = 33;
    at::Tensor flat = DeviceFrom(at::zeros({n * comm.size()}));
    auto* own = static_cast<float*>(flat.data_ptr()) + comm.rank() * n;
    FSDP_ASSERT_OK_AND_ASSIGN(at::Tensor shard,
                              WrapDeviceMemory(own, {n}, at::kFloat, comm.device()));
    CopyToDevice(RankValues(comm.rank(), n, at::kFloat), shard);
    FSDP_ASSERT_OK(comm.AllGatherIntoTensor(flat, shard));
    std::vector<at::Tensor> expected;
    for (int r = 0; r < comm.size(); ++r) expected.push_back(RankValues(r, n, at::kFloat));
    EXPECT_TRUE(SameValues(ToHost(flat), at::cat(expected)));
  });
}

TEST_P(NcclCollectivesTest, ReduceScatterTensorReducesEachChunk) {
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(GetParam(), [](NcclCommunicator& comm, ProcessGroup&) {
    const int ws = comm.size();
    for (int64_t n : {1, 5, 10007}) {
      // Rank r contributes (r + 1) * [0, n * ws) + r: increasing in r at every position.
      at::Tensor host_input = at::arange(n * ws, at::kDouble) * (comm.rank() + 1) + comm.rank();
      at::Tensor base = at::arange(n * ws, at::kDouble).narrow(0, comm.rank() * n, n);
      const double rank_sum = ws * (ws - 1) / 2.0;
      struct Case {
        ReduceOp op;
        at::Tensor expected;
      };
      const std::vector<Case> cases = {
          {ReduceOp::kSum, base * (ws * (ws + 1) / 2) + rank_sum},
          {ReduceOp::kAvg, (base * (ws * (ws + 1) / 2) + rank_sum) / ws},
          {ReduceOp::kMax, base * ws + (ws - 1)},
          {ReduceOp::kMin, base},
      };
      for (const Case& c : cases) {
        at::Tensor input = DeviceFrom(host_input);
        at::Tensor output = DeviceFrom(at::full({n}, -7.0, at::kDouble));
        FSDP_ASSERT_OK(comm.ReduceScatterTensor(output, input, c.op));
        EXPECT_TRUE(at::allclose(ToHost(output), c.expected))
            << "op " << static_cast<int>(c.op) << " n " << n;
      }
    }
  });
}

TEST_P(NcclCollectivesTest, AllReduceCombinesEveryRank) {
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(GetParam(), [](NcclCommunicator& comm, ProcessGroup&) {
    const int ws = comm.size();
    const int64_t n = 1000;
    at::Tensor host = at::arange(n, at::kDouble) + comm.rank();
    at::Tensor base = at::arange(n, at::kDouble);
    const double rank_sum = ws * (ws - 1) / 2.0;
    const std::vector<std::pair<ReduceOp, at::Tensor>> cases = {
        {ReduceOp::kSum, base * ws + rank_sum},
        {ReduceOp::kAvg, (base * ws + rank_sum) / ws},
        {ReduceOp::kMax, base + (ws - 1)},
        {ReduceOp::kMin, base},
    };
    for (const auto& [op, expected] : cases) {
      at::Tensor t = DeviceFrom(host);
      FSDP_ASSERT_OK(comm.AllReduce(t, op));
      EXPECT_TRUE(at::allclose(ToHost(t), expected)) << "op " << static_cast<int>(op);
    }
    at::Tensor ints = DeviceFrom(at::full({17}, comm.rank() + 1, at::kLong));
    FSDP_ASSERT_OK(comm.AllReduce(ints));
    EXPECT_TRUE(at::equal(ToHost(ints), at::full({17}, ws * (ws + 1) / 2, at::kLong)));
  });
}

TEST_P(NcclCollectivesTest, BroadcastCopiesRootToEveryRank) {
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(GetParam(), [](NcclCommunicator& comm, ProcessGroup&) {
    for (int root = 0; root < comm.size(); ++root) {
      at::Tensor t = DeviceFrom(RankValues(comm.rank(), 513, at::kBFloat16));
      FSDP_ASSERT_OK(comm.Broadcast(t, root));
      EXPECT_TRUE(SameValues(ToHost(t), RankValues(root, 513, at::kBFloat16))) << "root " << root;
    }
  });
}

TEST_P(NcclCollectivesTest, RejectsBadTensorsWithoutCommunicating) {
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(GetParam(), [](NcclCommunicator& comm, ProcessGroup&) {
    const auto rejected = [&](absl::string_view op, absl::string_view what) {
      return StatusIs(absl::StatusCode::kInvalidArgument,
                      AllOf(HasSubstr(absl::StrCat(op, " on rank ", comm.rank())),
                            HasSubstr("NCCL group 'nccl_test'"), HasSubstr(what)));
    };
    const int ws = comm.size();
    at::Tensor in = DeviceFrom(at::ones({8}));
    at::Tensor out = DeviceFrom(at::zeros({8 * ws}));
    at::Tensor cpu = at::ones({8});
    EXPECT_THAT(comm.AllGatherIntoTensor(out, cpu),
                rejected("all_gather_into_tensor", "must be a CUDA tensor, got one on cpu"));
    FSDP_ASSERT_OK_AND_ASSIGN(at::Tensor elsewhere,
                              WrapDeviceMemory(in.data_ptr(), {8}, at::kFloat,
                                               comm.device() + 1));
    EXPECT_THAT(comm.AllReduce(elsewhere), rejected("all_reduce", "is on cuda:"));
    const at::Device cuda(at::kCUDA, static_cast<c10::DeviceIndex>(comm.device()));
    at::Tensor strided = at::for_blob(out.data_ptr(), {2, 2})
                             .strides({1, 2})
                             .options(at::TensorOptions().dtype(at::kFloat).device(cuda))
                             .target_device(cuda)
                             .make_tensor();
    EXPECT_THAT(comm.AllReduce(strided), rejected("all_reduce", "not contiguous"));
    FSDP_ASSERT_OK_AND_ASSIGN(at::Tensor bools,
                              WrapDeviceMemory(in.data_ptr(), {8}, at::kBool, comm.device()));
    EXPECT_THAT(comm.Broadcast(bools, 0), rejected("broadcast", "has dtype Bool"));
    at::Tensor short_out = DeviceFrom(at::zeros({8 * ws - 1}));
    EXPECT_THAT(comm.AllGatherIntoTensor(short_out, in),
                rejected("all_gather_into_tensor", "output must hold"));
    at::Tensor doubles = DeviceFrom(at::zeros({8 * ws}, at::kDouble));
    EXPECT_THAT(comm.ReduceScatterTensor(in, doubles),
                rejected("reduce_scatter_tensor", "input must hold"));
    at::Tensor ints = DeviceFrom(at::ones({8}, at::kInt));
    EXPECT_THAT(comm.AllReduce(ints, ReduceOp::kAvg),
                rejected("all_reduce", "kAvg needs a floating-point tensor"));
    EXPECT_THAT(comm.Broadcast(in, ws), rejected("broadcast", "outside the group"));
    // None of that touched the communicator, which still works.
    FSDP_ASSERT_OK(comm.AllReduce(in));
    EXPECT_TRUE(at::equal(ToHost(in), at::full({8}, static_cast<float>(ws))));
  });
}

TEST_P(NcclCollectivesTest, TimeoutAbortsTheCommunicator) {
  if (GetParam() < 2) GTEST_SKIP() << "needs a peer that stays away";
  FSDP_SKIP_WITHOUT_GPUS(GetParam());
  RunWithNccl(
      GetParam(),
      [](NcclCommunicator& comm, ProcessGroup& group) {
        at::Tensor t = DeviceFrom(at::ones({64}));
        // First a collective everyone joins, so that NCCL's connections are up.
        FSDP_ASSERT_OK(comm.AllReduce(t));
        if (comm.rank() == 0) {
          CollectiveOptions quick;
          quick.timeout = std::chrono::seconds(2);
          EXPECT_THAT(comm.AllReduce(t, ReduceOp::kSum, quick),
                      StatusIs(absl::StatusCode::kDeadlineExceeded,
                               AllOf(HasSubstr("all_reduce on rank 0"), HasSubstr("aborted"))));
          EXPECT_FALSE(comm.usable());
          EXPECT_THAT(comm.AllReduce(t), StatusIs(absl::StatusCode::kFailedPrecondition,
                                                  HasSubstr("aborted earlier")));
        }
        // Rank 1 never joins the second all-reduce; the ranks meet again over Gloo.
        FSDP_ASSERT_OK(group.Barrier());
      },
      std::chrono::seconds(20));
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, NcclCollectivesTest, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "Ranks" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace fsdp::comm
