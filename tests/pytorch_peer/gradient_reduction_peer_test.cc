// Our gradient reduction against PyTorch 2.13's, bit for bit, on real processes: PyTorch's
// ranks under torchrun on CPU/Gloo, ours as RunInRanks processes, every rank with inputs of
// its own (so the sums' order shows).
//   * ReduceScatterPeerTest (3, 4 and 8 ranks): ProcessGroup::ReduceScatterTensor, the default
//     (our ring) and kGloo, sums random values to the very bits of PyTorch's
//     dist.reduce_scatter_tensor (reduce_scatter_peer.py), for chunk sizes that Gloo's segments
//     do not divide and for chunks of several of Gloo's 1 MiB segments and our 4 MiB pieces.
//   * GradientPeerTest (2, 3 and 4 ranks): NestedModel under our FSDP and under PyTorch's FSDP1
//     (fsdp_peer.py --dump_grads), one or two backward passes: each rank's gradient of every
//     FSDP unit (its padded shard; NO_SHARD: the whole flat gradient) is bit-identical to
//     FSDP1's, and so is each rank's local gradient, the reduction's input. The same division
//     (gradient_divide.h) and the same summation order (comm/process_group.h) make it so.
//     With a clip, ClipGradNorm's total norm is FSDP.clip_grad_norm_'s to the bit, and the
//     clipped unit gradients compared are both sides' after clipping. Under MixedPrecision
//     (bf16 and fp16 parameters, bf16 or float32 reduction) the float32 gradients the optimizer
//     gets are FSDP1's bit for bit too, and so are HYBRID_SHARD's (ranks in shard groups of 2,
//     replicated across them, as FSDP1 with a 2-D device mesh).
// Each rank writes a summary line that the test prints (units, elements, how many differ).
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "comm/multiprocess_testutil.h"
#include "comm/process_group.h"
#include "fsdp/clip_grad_norm.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/hybrid_shard.h"
#include "fsdp/mixed_precision.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "tools/python_testutil.h"

namespace fsdp {
namespace {

using ::fsdp::testing::CommandResult;
using ::fsdp::testing::IsRankProcess;
using ::fsdp::testing::PythonCommand;
using ::fsdp::testing::RunCommand;
using ::fsdp::testing::Runfile;
using ::fsdp::testing::RunInRanks;

// Per test: the same path in the test process and in its rank processes.
std::string TempDir(const std::string& name) {
  const char* root = std::getenv("TEST_TMPDIR");
  return absl::StrCat(root != nullptr ? root : "/tmp", "/", name);
}

// A file of raw float32 values.
at::Tensor ReadFloats(const std::string& path, int64_t numel) {
  std::ifstream in(path, std::ios::binary);
  at::Tensor t = at::empty({numel});
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()), numel * sizeof(float));
  EXPECT_TRUE(in.good() && in.peek() == EOF) << path << " does not hold " << numel << " floats";
  return t;
}

// How many elements of `a` and `b` (same size) differ in their bits.
int64_t BitsDiffer(const at::Tensor& a, const at::Tensor& b) {
  return a.contiguous().view(at::kInt).ne(b.contiguous().view(at::kInt)).sum().item<int64_t>();
}

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return a.numel() == 0 ? 0.0 : (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

void WriteSummary(const std::string& dir, int rank, const std::string& line) {
  std::ofstream(absl::StrCat(dir, "/summary_rank", rank, ".txt")) << line << "\n";
}

void PrintSummaries(const std::string& dir, int world_size) {
  for (int r = 0; r < world_size; ++r) {
    std::ifstream in(absl::StrCat(dir, "/summary_rank", r, ".txt"));
    std::stringstream text;
    text << in.rdbuf();
    EXPECT_FALSE(text.str().empty()) << "rank " << r << " wrote no summary";
    std::printf("%s", text.str().c_str());
  }
}

// --- ReduceScatterPeerTest -------------------------------------------------------------------

// Output chunk sizes (floats): a few elements; chunks that Gloo's two segments per rank split
// unevenly (1001, 4097); chunks of several 1 MiB segments and of two 4 MiB pieces.
constexpr int64_t kChunkSizes[] = {1, 2, 5, 1000, 1001, 4097, (1 << 20) + 3};

class ReduceScatterPeerTest : public ::testing::TestWithParam<int> {};

TEST_P(ReduceScatterPeerTest, RingAndGlooSumToPyTorchsBits) {
  const int world_size = GetParam();
  const std::string dir = TempDir(absl::StrCat("reduce_scatter_ws", world_size));
  if (!IsRankProcess()) {
    const CommandResult py = RunCommand(absl::StrCat(
        PythonCommand(), " -m torch.distributed.run --standalone --nproc_per_node=", world_size,
        " ", Runfile("tests/pytorch_peer/reduce_scatter_peer.py"), " --out=", dir,
        " --sizes=", absl::StrJoin(kChunkSizes, ",")));
    ASSERT_EQ(py.exit_code, 0) << py.output;
  }
  RunInRanks(world_size, [dir](comm::ProcessGroup& group) {
    const int ws = group.size();
    std::vector<std::string> report;
    for (int64_t n : kChunkSizes) {
      // As reduce_scatter_peer.py draws it.
      at::manual_seed(1234 + group.rank());
      const at::Tensor input = at::randn({n * ws}) * 100;
      const at::Tensor pytorch =
          ReadFloats(absl::StrCat(dir, "/ws", ws, "_n", n, "_rank", group.rank(), ".bin"), n);
      for (comm::CollectiveImpl impl :
           {comm::CollectiveImpl::kDefault, comm::CollectiveImpl::kGloo}) {
        at::Tensor ours = at::empty({n});
        FSDP_ASSERT_OK(
            group.ReduceScatterTensor(ours, input, comm::ReduceOp::kSum, {.impl = impl}));
        const int64_t differ = BitsDiffer(ours, pytorch);
        EXPECT_EQ(differ, 0) << comm::CollectiveImplName(impl) << ", n " << n << ", rank "
                             << group.rank() << " of " << ws << ": elements that differ from "
                             << "PyTorch's, of " << n << "; largest difference "
                             << MaxAbsDiff(ours, pytorch);
        report.push_back(absl::StrCat(comm::CollectiveImplName(impl), " n=", n, ": ", differ));
      }
    }
    WriteSummary(
        dir, group.rank(),
        absl::StrCat("reduce_scatter ws", ws, " rank ", group.rank(),
                     ", elements differing from PyTorch's: ", absl::StrJoin(report, ", ")));
  });
  if (!IsRankProcess()) PrintSummaries(dir, world_size);
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ReduceScatterPeerTest, ::testing::Values(3, 4, 8),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("ws", info.param);
                         });

// --- GradientPeerTest ------------------------------------------------------------------------

struct GradCase {
  int world_size;
  std::string strategy;  // fsdp_peer.py's --sharding_strategy
  std::string wrap;      // NestedModel.wrap's units ("wrap") or the root only ("none")
  int backwards;         // passes before the gradients are compared (no zero_grad between)
  // "MAX_NORM,NORM_TYPE": ClipGradNorm / FSDP.clip_grad_norm_ after the passes ("" for none);
  // needs a root unit (wrap "none" or "wrap_root").
  std::string clip = "";
  bool no_sync = false;  // every pass but the last under NoSyncGuard / FSDP.no_sync()
  // "PARAM[,REDUCE[,BUFFER]]" (train's and fsdp_peer.py's --mixed_precision); "" for none.
  std::string mixed_precision = "";
};

// The hybrid cases shard over groups of this many ranks.
constexpr int kShardGroupSize = 2;

ShardingStrategy StrategyOf(const std::string& name) {
  if (name == "shard_grad_op") return ShardingStrategy::kShardGradOp;
  if (name == "no_shard") return ShardingStrategy::kNoShard;
  if (name == "hybrid_shard") return ShardingStrategy::kHybridShard;
  if (name == "hybrid_shard_zero2") return ShardingStrategy::kHybridShardZero2;
  return ShardingStrategy::kFullShard;
}

std::string GradCaseName(const GradCase& c) {
  return absl::StrCat(
      "ws", c.world_size, "_", c.strategy, "_", c.wrap, "_", c.backwards, "backward",
      c.no_sync ? "_no_sync" : "",
      c.mixed_precision.empty()
          ? ""
          : absl::StrCat("_mp_", absl::StrReplaceAll(c.mixed_precision, {{",", "_"}})),
      c.clip.empty()
          ? ""
          : absl::StrCat("_clip_", absl::StrReplaceAll(c.clip, {{",", "_"}, {".", "p"}})));
}

// fsdp_peer.py's grad_dump_seed: pass k's input on `rank`.
uint64_t GradDumpSeed(int k, int rank) { return 1000 + 100 * k + rank; }

// block0's and block1's (in, out) as our NestedModel builds them, for PyTorch's to match.
std::string NestedDims() {
  models::NestedModel probe;
  std::vector<int64_t> dims;
  for (const char* name : {"block0.weight", "block1.weight"}) {
    const at::Tensor* weight = probe->named_parameters().find(name);
    if (weight == nullptr) return "";
    dims.push_back(weight->size(0));
    dims.push_back(weight->size(1));
  }
  return absl::StrJoin(dims, ",");
}

// PyTorch's side: fsdp_peer.py under torchrun dumps FSDP1's gradients for `c` into `dir`.
void RunPyTorchPeer(const GradCase& c, const std::string& dir) {
  const std::string dims = NestedDims();
  ASSERT_FALSE(dims.empty()) << "NestedModel has no block0.weight / block1.weight";
  const CommandResult py = RunCommand(absl::StrCat(
      PythonCommand(), " ", Runfile("tests/pytorch_peer/fsdp_peer.py"),
      " --nproc_per_node=", c.world_size, " --models_dir=", Runfile("models/testdata"),
      " --fsdp=1 --model=nested --wrap=", c.wrap, " --sharding_strategy=", c.strategy,
      " --nested_dims=", dims, " --backwards=", c.backwards, " --dump_grads=", dir,
      c.clip.empty() ? "" : " --clip_grad_norm=", c.clip, c.no_sync ? " --no_sync" : "",
      c.mixed_precision.empty() ? "" : " --mixed_precision=", c.mixed_precision,
      IsHybrid(StrategyOf(c.strategy)) ? absl::StrCat(" --shard_group_size=", kShardGroupSize)
                                       : ""));
  ASSERT_EQ(py.exit_code, 0) << py.output;
}

// Our side, on one rank.
struct OurGradients {
  std::map<std::string, at::Tensor> local;  // "pass/fqn" -> the unwrapped model's gradient
  std::map<std::string, at::Tensor> units;  // "fqn,fqn" -> this rank's flat gradient
  std::optional<at::Tensor> total_norm;     // ClipGradNorm's result
};

// NestedModel under our FSDP as `c` says: c.backwards passes on this rank's inputs (all but the
// last under NoSyncGuard with c.no_sync), then the clip; beside it the model unwrapped, whose
// gradients of each pass are the reduction's inputs.
void ComputeOurGradients(const GradCase& c, comm::ProcessGroup& group, OurGradients& out) {
  std::shared_ptr<comm::ProcessGroup> group_ptr(&group, [](comm::ProcessGroup*) {});
  std::shared_ptr<comm::ProcessGroup> replicate_group;
  if (IsHybrid(StrategyOf(c.strategy))) {
    FSDP_ASSERT_OK_AND_ASSIGN(HybridShardGroups groups,
                              MakeHybridShardGroups(group, kShardGroupSize));
    group_ptr = groups.shard;
    replicate_group = groups.replicate;
  }
  models::NestedModel net;
  models::NestedModel plain;  // unwrapped: each pass's local gradient
  FsdpOptions options{.sharding_strategy = StrategyOf(c.strategy), .use_orig_params = false};
  FSDP_ASSERT_OK_AND_ASSIGN(options.mixed_precision, ParseMixedPrecision(c.mixed_precision));
  options.replicate_group = replicate_group;
  if (c.wrap == "wrap" || c.wrap == "wrap_root") {
    options.nested = net->wrap_slots();
    options.wrap_root = c.wrap == "wrap_root";
  }
  FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(net, group_ptr, options));
  for (int k = 0; k < c.backwards; ++k) {
    at::manual_seed(GradDumpSeed(k, group.rank()));
    const at::Tensor x = net->get_input();
    if (c.no_sync && k < c.backwards - 1) {
      NoSyncGuard no_sync(*fsdp);
      fsdp->forward(x).sum().backward();
    } else {
      fsdp->forward(x).sum().backward();
    }
    for (at::Tensor& p : plain->parameters()) p.mutable_grad() = at::Tensor();
    plain->forward(x).sum().backward();
    for (const auto& item : plain->named_parameters()) {
      if (item.value().grad().defined()) {
        out.local[absl::StrCat(k, "/", item.key())] = item.value().grad().reshape({-1}).clone();
      }
    }
  }
  if (!c.clip.empty()) {
    std::vector<std::string> parts = absl::StrSplit(c.clip, ',');
    double max_norm = 0, norm_type = 0;
    ASSERT_TRUE(parts.size() == 2 && absl::SimpleAtod(parts[0], &max_norm) &&
                absl::SimpleAtod(parts[1], &norm_type))
        << c.clip;
    FSDP_ASSERT_OK_AND_ASSIGN(out.total_norm, ClipGradNorm(*fsdp, max_norm, norm_type));
  }
  for (const FullyShardedDataParallel::UnitView& unit : fsdp->units()) {
    if (unit.handle == nullptr) continue;
    std::vector<std::string> fqns;
    for (const FlatParamInfo& info : unit.handle->infos()) fqns.push_back(info.fqns[0]);
    out.units[absl::StrJoin(fqns, ",")] = unit.handle->flat_param().grad();
  }
}

// What one rank's manifest comparison counted.
struct ManifestTally {
  std::set<std::string> pytorch_units;
  int64_t unit_elements = 0, unit_differ = 0, local_elements = 0, local_differ = 0;
  int local_count = 0;
  int clip_lines = 0;
};

// A "clip" line: our total norm is PyTorch's float32, bit for bit.
void CompareClipLine(const std::string& line, std::map<std::string, std::string>& f,
                     const OurGradients& ours, ManifestTally& tally) {
  ASSERT_TRUE(ours.total_norm.has_value()) << "PyTorch clipped, we did not: " << line;
  ASSERT_EQ(ours.total_norm->scalar_type(), at::kFloat);
  const float norm = ours.total_norm->item<float>();
  uint32_t bits = 0;
  std::memcpy(&bits, &norm, sizeof bits);
  // PyTorch wrote the float32's little-endian bytes in hex.
  std::string hex;
  for (int b = 0; b < 4; ++b) hex += absl::StrFormat("%02x", (bits >> (8 * b)) & 0xff);
  EXPECT_EQ(hex, f["float32_bits"])
      << "total norm: ours " << norm << ", PyTorch's " << f["total_norm"];
  tally.clip_lines += 1;
}

// A "local" line: a pass's local gradient, the reduction's input, is PyTorch's bit for bit.
void CompareLocalLine(const std::string& line, std::map<std::string, std::string>& f, int64_t numel,
                      const std::string& dir, int rank, OurGradients& ours, ManifestTally& tally) {
  const std::string key = absl::StrCat(f["pass"], "/", f["fqn"]);
  ASSERT_TRUE(ours.local.count(key)) << "PyTorch has a local gradient we lack: " << line;
  const at::Tensor pytorch = ReadFloats(absl::StrCat(dir, "/", f["file"]), numel);
  const int64_t differ = BitsDiffer(ours.local[key], pytorch);
  EXPECT_EQ(differ, 0) << "local gradient of pass " << key << " on rank " << rank
                       << ": the reduction's inputs differ already; largest difference "
                       << MaxAbsDiff(ours.local[key], pytorch);
  tally.local_elements += numel;
  tally.local_differ += differ;
  ++tally.local_count;
}

// A unit line: the unit is one of ours with the same layout, and its reduced gradient (or its
// having none) is PyTorch's bit for bit.
void CompareUnitLine(std::map<std::string, std::string>& f, int64_t numel, const std::string& dir,
                     const comm::ProcessGroup& group, OurGradients& ours, ManifestTally& tally) {
  const std::string key = f["fqns"];
  tally.pytorch_units.insert(key);
  ASSERT_TRUE(ours.units.count(key)) << "PyTorch's unit [" << key << "] is not one of ours";
  const at::Tensor& grad = ours.units[key];
  if (f["file"] == "none") {
    EXPECT_FALSE(grad.defined()) << "unit [" << key << "]: PyTorch's has no gradient";
    return;
  }
  ASSERT_TRUE(grad.defined()) << "unit [" << key << "] has no gradient; PyTorch's has";
  ASSERT_EQ(grad.numel(), numel) << "unit [" << key << "]: another layout than PyTorch's";
  const at::Tensor pytorch = ReadFloats(absl::StrCat(dir, "/", f["file"]), numel);
  const int64_t differ = BitsDiffer(grad, pytorch);
  EXPECT_EQ(differ, 0) << "reduced gradient of unit [" << key << "] on rank " << group.rank()
                       << " of " << group.size() << ": " << differ << " of " << numel
                       << " elements differ from PyTorch FSDP1's; largest "
                       << "difference " << MaxAbsDiff(grad, pytorch);
  tally.unit_elements += numel;
  tally.unit_differ += differ;
}

// Every line of PyTorch's rank's manifest against ours. Stops at the first fatal failure.
void CompareManifest(const std::string& dir, const comm::ProcessGroup& group, OurGradients& ours,
                     ManifestTally& tally) {
  std::ifstream manifest(absl::StrCat(dir, "/rank", group.rank(), ".txt"));
  ASSERT_TRUE(manifest.good()) << "no manifest from PyTorch's rank " << group.rank();
  for (std::string line; std::getline(manifest, line);) {
    std::map<std::string, std::string> f = ::fsdp::testing::KeyValueFields(line);
    if (absl::StartsWith(line, "clip ")) {
      CompareClipLine(line, f, ours, tally);
      if (::testing::Test::HasFatalFailure()) return;
      continue;
    }
    int64_t numel = 0;
    ASSERT_TRUE(absl::SimpleAtoi(f["numel"], &numel)) << line;
    if (absl::StartsWith(line, "local ")) {
      CompareLocalLine(line, f, numel, dir, group.rank(), ours, tally);
    } else {
      CompareUnitLine(f, numel, dir, group, ours, tally);
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
}

class GradientPeerTest : public ::testing::TestWithParam<GradCase> {};

TEST_P(GradientPeerTest, ReducedGradientsArePyTorchFsdp1sBitForBit) {
  const GradCase c = GetParam();
  const std::string dir = TempDir(GradCaseName(c));
  if (!IsRankProcess()) {
    RunPyTorchPeer(c, dir);
    if (::testing::Test::HasFatalFailure()) return;
  }
  RunInRanks(c.world_size, [c, dir](comm::ProcessGroup& group) {
    at::set_num_threads(1);  // as fsdp_peer.py: the same kernels' blocking
    OurGradients ours;
    ComputeOurGradients(c, group, ours);
    if (::testing::Test::HasFatalFailure()) return;
    ManifestTally tally;
    CompareManifest(dir, group, ours, tally);
    if (::testing::Test::HasFatalFailure()) return;
    std::set<std::string> our_units;
    for (const auto& [key, grad] : ours.units) our_units.insert(key);
    EXPECT_EQ(our_units, tally.pytorch_units) << "the units differ from PyTorch's";
    EXPECT_EQ(tally.local_count, static_cast<int>(ours.local.size()));
    EXPECT_EQ(tally.clip_lines, ours.total_norm.has_value() ? 1 : 0) << "PyTorch did not clip";
    WriteSummary(dir, group.rank(),
                 absl::StrCat(GradCaseName(c), " rank ", group.rank(), ": ", ours.units.size(),
                              " units, ", tally.unit_elements, " reduced gradient elements, ",
                              tally.unit_differ, " differ from PyTorch FSDP1's; local gradients ",
                              tally.local_elements, " elements, ", tally.local_differ, " differ"));
  });
  if (!IsRankProcess()) PrintSummaries(dir, c.world_size);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GradientPeerTest,
    ::testing::Values(GradCase{2, "full_shard", "wrap", 1}, GradCase{3, "full_shard", "wrap", 1},
                      GradCase{4, "full_shard", "wrap", 1}, GradCase{3, "full_shard", "none", 1},
                      // Accumulation over two passes: sharded (added after the reduction) and
                      // NO_SHARD (the gradient already there is reduced again with the new one).
                      GradCase{4, "shard_grad_op", "wrap", 2}, GradCase{3, "no_shard", "wrap", 2},
                      // FSDP.clip_grad_norm_: the total norm and the clipped gradients.
                      GradCase{2, "full_shard", "none", 1, "0.5,2"},
                      GradCase{3, "full_shard", "wrap_root", 1, "0.5,2"},
                      GradCase{4, "shard_grad_op", "wrap_root", 2, "0.5,inf"},
                      GradCase{3, "no_shard", "wrap_root", 1, "0.5,2"},
                      // FSDP.no_sync(): 3 passes accumulated locally, the 4th reduces them all.
                      GradCase{4, "full_shard", "wrap_root", 4, "", true},
                      GradCase{3, "shard_grad_op", "none", 4, "", true},
                      GradCase{3, "no_shard", "wrap_root", 4, "", true},
                      // MixedPrecision: gathered in bf16 (fp16), reduced in bf16 or float32.
                      // Under a root unit: without one, NestedModel's unmanaged float32 layers
                      // meet bf16 activations, which PyTorch refuses as we do.
                      GradCase{2, "full_shard", "wrap_root", 1, "", false, "bf16"},
                      GradCase{3, "full_shard", "wrap_root", 1, "", false, "bf16,fp32"},
                      GradCase{4, "shard_grad_op", "wrap_root", 2, "", false, "bf16"},
                      GradCase{3, "no_shard", "wrap_root", 2, "", false, "bf16"},
                      GradCase{4, "full_shard", "wrap_root", 4, "", true, "bf16"},
                      GradCase{3, "shard_grad_op", "none", 1, "0.5,2", false, "fp16"},
                      // HYBRID_SHARD (2 x 2 and 3 x 2 meshes): reduce-scatter in the shard
                      // group, all-reduce across replicas; clipping over the shard group.
                      GradCase{4, "hybrid_shard", "wrap_root", 1},
                      GradCase{6, "hybrid_shard_zero2", "wrap_root", 2},
                      GradCase{4, "hybrid_shard", "none", 1, "0.5,2", false, "bf16"},
                      GradCase{4, "hybrid_shard", "wrap_root", 3, "", true}),
    [](const ::testing::TestParamInfo<GradCase>& info) { return GradCaseName(info.param); });

}  // namespace
}  // namespace fsdp
