// Mixed precision on real ranks. At world size 2, with the same batch on both ranks, FSDP's
// averaged gradient is exactly the local one (halving and doubling are exact in any float
// format), so a wrapped model under MixedPrecision must compute what the unwrapped model cast to
// param_dtype computes, bit for bit: the loss, and every gradient (cast to float32). Against
// PyTorch FSDP1's MixedPrecision itself, at 2-4 ranks with per-rank batches:
// //tests/pytorch_peer:gradient_reduction_peer_test and :pytorch_peer_test.
#include "fsdp/mixed_precision.h"

#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "tools/python_testutil.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::NormNet;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::fsdp::testing::StrategyCase;
using ::fsdp::testing::StrategyCaseName;
using ::testing::HasSubstr;

TEST(ParseMixedPrecision, ReadsParamReduceBufferDtypes) {
  FSDP_ASSERT_OK_AND_ASSIGN(MixedPrecision bf16, ParseMixedPrecision("bf16"));
  EXPECT_EQ(bf16.param_dtype, at::kBFloat16);
  EXPECT_FALSE(bf16.reduce_dtype.has_value());
  EXPECT_EQ(bf16.effective_reduce_dtype(), at::kBFloat16);  // PyTorch: reduce follows param
  EXPECT_FALSE(bf16.buffer_dtype.has_value());

  FSDP_ASSERT_OK_AND_ASSIGN(MixedPrecision all, ParseMixedPrecision("bfloat16,fp32,float16"));
  EXPECT_EQ(DescribeMixedPrecision(all),
            "param_dtype=bfloat16 reduce_dtype=float32 buffer_dtype=float16");
  FSDP_ASSERT_OK_AND_ASSIGN(MixedPrecision reduce_only, ParseMixedPrecision(",bf16"));
  EXPECT_FALSE(reduce_only.param_dtype.has_value());
  EXPECT_EQ(reduce_only.effective_reduce_dtype(), at::kBFloat16);
  FSDP_ASSERT_OK_AND_ASSIGN(MixedPrecision none, ParseMixedPrecision("none"));
  EXPECT_FALSE(none.enabled());

  EXPECT_THAT(ParseMixedPrecision("int8"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'int8'")));
  EXPECT_THAT(ParseMixedPrecision("bf16,bf16,bf16,bf16"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at most")));
}

TEST(FsdpMixedPrecision, RefusesADtypeThatIsNotFloatingPoint) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    models::NestedModel net;
    FsdpOptions options;
    options.mixed_precision.reduce_dtype = at::kInt;
    EXPECT_THAT(FullyShardedDataParallel::Wrap(net, Borrow(group), options),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("MixedPrecision.reduce_dtype must be a floating-point dtype")));
  });
}

// (strategy, use_orig_params) at world size 2, reducing in bf16 or in float32.
struct MixedCase {
  StrategyCase strategy;
  at::ScalarType reduce_dtype;
};

std::string MixedCaseName(const ::testing::TestParamInfo<MixedCase>& info) {
  return absl::StrCat(StrategyCaseName({info.param.strategy, info.index}), "_reduce_",
                      info.param.reduce_dtype == at::kFloat ? "fp32" : "bf16");
}

// This rank's gradient of parameter `i` of `unit`, as the optimizer sees it, against the
// reference's gradient of the same parameter (its elements in this rank's shard).
void ExpectShardGradientIs(const FlatParamHandle& unit, size_t i, const at::Tensor& reference) {
  const ParamShard local = unit.ShardOf(i, unit.rank());
  const std::string& fqn = unit.infos()[i].fqns[0];
  if (local.numel == 0) return;
  at::Tensor ours = unit.use_orig_params()
                        ? unit.params()[i].grad().reshape({-1})
                        : unit.flat_param().grad().narrow(0, local.shard_offset, local.numel);
  ASSERT_TRUE(ours.defined()) << fqn;
  EXPECT_EQ(ours.scalar_type(), at::kFloat) << fqn << ": the optimizer's gradient";
  const at::Tensor expected =
      reference.reshape({-1}).narrow(0, local.param_offset, local.numel).to(at::kFloat);
  EXPECT_TRUE(at::equal(ours, expected))
      << fqn << " on rank " << unit.rank() << ": largest difference "
      << (ours - expected).abs().max().item<float>();
}

class MixedPrecisionParityTest : public ::testing::TestWithParam<MixedCase> {};

TEST_P(MixedPrecisionParityTest, ComputesWhatTheModelCastToParamDtypeComputes) {
  const MixedCase c = GetParam();
  RunInRanks(c.strategy.world_size, [c](comm::ProcessGroup& group) {
    models::NestedModel reference;
    reference->to(at::kBFloat16);
    models::NestedModel net;
    FsdpOptions options{.sharding_strategy = c.strategy.strategy,
                        .use_orig_params = c.strategy.use_orig_params,
                        .nested = net->wrap_slots()};
    options.mixed_precision.param_dtype = at::kBFloat16;
    options.mixed_precision.reduce_dtype = c.reduce_dtype;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(net, Borrow(group), options));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(0.01));
    for (int step = 0; step < 2; ++step) {
      torch::manual_seed(step);
      const at::Tensor x = net->get_input();  // float32: the root unit casts it
      const at::Tensor loss = fsdp->forward(x).sum();
      const at::Tensor expected_loss = reference->forward(x.to(at::kBFloat16)).sum();
      ASSERT_EQ(loss.scalar_type(), at::kBFloat16);
      EXPECT_TRUE(at::equal(loss, expected_loss))
          << "step " << step << ": " << loss.item<float>() << " vs " << expected_loss.item<float>();
      reference->zero_grad();
      expected_loss.backward();
      optim.zero_grad();
      loss.backward();
      const auto expected = reference->named_parameters();
      for (const auto& unit : fsdp->units()) {
        if (unit.handle == nullptr) continue;
        for (size_t i = 0; i < unit.handle->infos().size(); ++i) {
          ExpectShardGradientIs(*unit.handle, i, expected[unit.handle->infos()[i].fqns[0]].grad());
        }
      }
      optim.step();
      // The master values and the optimizer state stay float32; the reference follows the
      // updated values, cast.
      FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
      torch::NoGradGuard no_grad;
      for (const auto& [fqn, value] : full) {
        ASSERT_EQ(value.scalar_type(), at::kFloat) << fqn;
        reference->named_parameters()[fqn].copy_(value);
      }
      for (const at::Tensor& p : fsdp->parameters()) {
        ASSERT_EQ(p.scalar_type(), at::kFloat);
        auto it = optim.state().find(p.unsafeGetTensorImpl());
        if (it == optim.state().end()) {
          EXPECT_EQ(p.numel(), 0) << "a parameter with elements on this rank has no Adam state";
          continue;
        }
        const auto& state = it->second;
        const auto& adam = static_cast<const torch::optim::AdamParamState&>(*state);
        EXPECT_EQ(adam.exp_avg().scalar_type(), at::kFloat);
        EXPECT_EQ(adam.exp_avg_sq().scalar_type(), at::kFloat);
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, MixedPrecisionParityTest,
    ::testing::Values(MixedCase{{2, ShardingStrategy::kFullShard, false}, at::kBFloat16},
                      MixedCase{{2, ShardingStrategy::kFullShard, true}, at::kFloat},
                      MixedCase{{2, ShardingStrategy::kShardGradOp, false}, at::kFloat},
                      MixedCase{{2, ShardingStrategy::kNoShard, false}, at::kBFloat16},
                      MixedCase{{2, ShardingStrategy::kNoShard, true}, at::kBFloat16}),
    MixedCaseName);

// Without a root unit the units NestedModel.wrap makes each cast their inputs, and their bf16
// outputs reach block2[0], which no unit manages (float32): PyTorch's FSDP1 fails there with
// this very error, and so must we (an error, not a crash).
TEST(FsdpMixedPrecision, UnmanagedFloat32LayerMeetingParamDtypeActivationsIsAnError) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    models::NestedModel net;
    FsdpOptions options{.nested = net->wrap_slots(), .wrap_root = false};
    options.mixed_precision.param_dtype = at::kBFloat16;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(net, Borrow(group), options));
    torch::manual_seed(0);
    try {
      fsdp->forward(net->get_input());
      ADD_FAILURE() << "a bf16 activation met a float32 weight without an error";
    } catch (const c10::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("expected m1 and m2 to have the same dtype"));
    }
  });
}

// PyTorch's dtype name ("bfloat16", "float32", "int64").
std::string TorchDtypeName(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kLong:
      return "int64";
    default:
      return c10::toString(dtype);
  }
}

// The same model under FSDP1 MixedPrecision(bf16, bf16, bf16) (testdata/mixed_precision_dtypes.py):
// the output, every module buffer and every full state dict entry have FSDP1's dtypes.
TEST(FsdpMixedPrecision, BufferAndStateDictDtypesAreFsdp1s) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string ours_path = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/mp_dtypes_ours.txt");
  RunInRanks(2, [ours_path](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    NormNet net;
    FsdpOptions options;
    options.mixed_precision = {
        .param_dtype = at::kBFloat16, .reduce_dtype = at::kBFloat16, .buffer_dtype = at::kBFloat16};
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(net, Borrow(group), options));
    std::vector<std::string> lines = {
        absl::StrCat("output ", TorchDtypeName(fsdp->forward(torch::randn({5, 4})).scalar_type()))};
    for (const auto& b : net->named_buffers()) {
      lines.push_back(
          absl::StrCat("buffer ", b.key(), " ", TorchDtypeName(b.value().scalar_type())));
    }
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    for (const auto& [key, value] : full) {
      lines.push_back(absl::StrCat("state ", key, " ", TorchDtypeName(value.scalar_type())));
    }
    if (group.rank() == 0) std::ofstream(ours_path) << absl::StrJoin(lines, "\n") << "\n";
  });
  if (::fsdp::testing::IsRankProcess()) return;
  const ::fsdp::testing::PythonLines py = ::fsdp::testing::RunPythonScriptLines(
      "fsdp/testdata/mixed_precision_dtypes.py", {"output ", "buffer ", "state "});
  ASSERT_EQ(py.result.exit_code, 0) << py.result.output;
  const std::vector<std::string>& pytorch = py.lines;
  const std::vector<std::string> ours = ::fsdp::testing::ReadFileLines(ours_path);
  ASSERT_FALSE(pytorch.empty()) << py.result.output;
  EXPECT_EQ(ours, pytorch);
}

TEST(FsdpMixedPrecision, KeepsBuffersInBufferDtypeAndSavesThemInTheirOwn) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    NormNet net;
    FsdpOptions options;
    options.mixed_precision.param_dtype = at::kBFloat16;
    options.mixed_precision.buffer_dtype = at::kBFloat16;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(net, Borrow(group), options));
    EXPECT_EQ(net->norm->running_mean.scalar_type(), at::kBFloat16);
    EXPECT_EQ(net->norm->num_batches_tracked.scalar_type(), at::kLong);  // not floating
    const at::Tensor out = fsdp->forward(torch::randn({5, 4}));
    EXPECT_EQ(out.scalar_type(), at::kBFloat16);
    const at::Tensor running_mean = net->norm->running_mean.clone();
    EXPECT_GT(running_mean.abs().sum().item<float>(), 0) << "forward updated no statistics";

    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    std::map<std::string, at::Tensor> by_name(full.begin(), full.end());
    EXPECT_EQ(by_name.at("norm.running_mean").scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(by_name.at("norm.running_mean"), running_mean.to(at::kFloat)));
    EXPECT_EQ(by_name.at("norm.num_batches_tracked").scalar_type(), at::kLong);
    EXPECT_EQ(by_name.at("in.weight").scalar_type(), at::kFloat);
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict sharded, ShardedStateDict(*fsdp));
    for (const auto& [fqn, value] : sharded) {
      if (fqn == "norm.running_var") {
        EXPECT_EQ(std::get<at::Tensor>(value).scalar_type(), at::kFloat);
      }
    }

    // Loading the float32 dict back (rank 0's copy broadcast to the other): buffers stay in
    // buffer_dtype with the saved values.
    net->norm->running_mean.zero_();
    FSDP_ASSERT_OK(
        LoadFullStateDict(*fsdp, group.rank() == 0 ? full : StateDict{}, {.rank0_only = true}));
    EXPECT_EQ(net->norm->running_mean.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(at::equal(net->norm->running_mean, running_mean));
  });
}

}  // namespace
}  // namespace fsdp
