// LoadFullCheckpoint's streaming on real ranks: a saved pair loads back bit for bit into a job
// whose state differs, while rank 0 never holds more of the files' tensors at once than one
// unit's optimizer state (counted by the load's stats, not timed); a record damaged after the
// pickles were read (its CRC-32 no longer matches) is refused on every rank, naming the file
// and the record, with the model and the optimizer unchanged.
#include "checkpoint/load_full_checkpoint.h"

#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/internal/zip_reader.h"
#include "checkpoint/save_full_checkpoint.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::StrategyCase;
using optim_state::OptimStateDict;
using testing::RunPhase;

// Net (with unmanaged parameters) under FSDP with Adam, trained `steps` steps: the state a
// checkpoint is saved from (2 steps) and one it is loaded over (3).
struct Trained {
  fsdp::testing::NetPair pair;
  std::unique_ptr<optim_state::OptimizerAdapter> adapter;
};

absl::StatusOr<Trained> Train(comm::ProcessGroup& group, const StrategyCase& c, int steps) {
  Trained t;
  FSDP_ASSIGN_OR_RETURN(t.pair, fsdp::testing::MakeNetPair(group, c, {.with_unmanaged = true}));
  FSDP_ASSIGN_OR_RETURN(optim_state::OptimizerAdapter adapter,
                        optim_state::OptimizerAdapter::Create(*t.pair.optim));
  t.adapter = std::make_unique<optim_state::OptimizerAdapter>(std::move(adapter));
  for (int step = 0; step < steps; ++step) {
    fsdp::testing::TrainStep(*t.pair.fsdp, *t.pair.optim, step);
  }
  return t;
}

// The job's full model and optimizer state (on rank 0; empty elsewhere).
struct Full {
  StateDict model;
  OptimStateDict optim;
};
absl::StatusOr<Full> FullOf(Trained& t) {
  Full f;
  FSDP_ASSIGN_OR_RETURN(f.model, FullStateDict(*t.pair.fsdp, {.rank0_only = true}));
  FSDP_ASSIGN_OR_RETURN(f.optim, optim_state::FullOptimStateDict(*t.pair.fsdp, *t.adapter, {}));
  return f;
}

void ExpectEqual(const Full& expected, const Full& actual) {
  ASSERT_EQ(expected.model.size(), actual.model.size());
  for (size_t i = 0; i < expected.model.size(); ++i) {
    EXPECT_EQ(expected.model[i].first, actual.model[i].first);
    EXPECT_TRUE(torch::equal(expected.model[i].second, actual.model[i].second))
        << expected.model[i].first;
  }
  EXPECT_EQ(optim_state::DiffOptimStateDicts(expected.optim, actual.optim), "");
}

// Saves the state of Train(2) to a fresh directory and returns it.
std::string SavedCheckpoint(const std::string& name, const StrategyCase& c) {
  const std::string dir = testing::TmpDir(name);
  RunPhase(1, c.world_size, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(group, c, 2));
    FSDP_ASSERT_OK(SaveFullCheckpoint(dir, *t.pair.fsdp, t.adapter.get()));
  });
  return dir;
}

class LoadFullCheckpointStreams : public ::testing::TestWithParam<StrategyCase> {};

TEST_P(LoadFullCheckpointStreams, LoadsBitEqualHoldingOneUnitAtATime) {
  const StrategyCase c = GetParam();
  const std::string dir = SavedCheckpoint(absl::StrCat("stream_load_", c.world_size), c);
  RunPhase(2, c.world_size, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(group, c, 3));
    LoadFullCheckpointStats stats;
    FSDP_ASSERT_OK(LoadFullCheckpoint(dir, *t.pair.fsdp, t.adapter.get(), {.stats = &stats}));
    FSDP_ASSERT_OK_AND_ASSIGN(Full loaded, FullOf(t));
    if (group.rank() != 0) return;
    Full saved;
    FSDP_ASSERT_OK_AND_ASSIGN(saved.model, ReadModelStateDict(dir + "/model.pt"));
    FSDP_ASSERT_OK_AND_ASSIGN(saved.optim, ReadOptimStateDict(dir + "/optim.pt"));
    ExpectEqual(saved, loaded);
    // Every tensor is streamed, but (some of) the scalars.
    int64_t model_bytes = 0, optim_bytes = 0, scalar_bytes = 0, largest_unit = 0;
    for (const auto& [fqn, tensor] : saved.model) model_bytes += tensor.nbytes();
    for (const auto& [key, state] : saved.optim.state) {
      for (const auto& [name, value] : state) {
        const at::Tensor* tensor = value.GetIf<at::Tensor>();
        if (tensor == nullptr) continue;
        (tensor->dim() > 0 ? optim_bytes : scalar_bytes) += tensor->nbytes();
      }
    }
    for (const auto& unit : t.pair.fsdp->units()) {
      if (unit.handle != nullptr) largest_unit = std::max(largest_unit, unit.handle->numel());
    }
    EXPECT_GE(stats.file_bytes, model_bytes + optim_bytes);
    EXPECT_LE(stats.file_bytes, model_bytes + optim_bytes + scalar_bytes);
    // One unit's exp_avg and exp_avg_sq at once (Net's three units are alike in size): less
    // than half the optimizer's dict, and at least the largest unit's state.
    EXPECT_GE(stats.max_live_bytes, 2 * 4 * largest_unit);
    EXPECT_LT(stats.max_live_bytes, optim_bytes / 2);
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, LoadFullCheckpointStreams,
                         ::testing::Values(StrategyCase{2, ShardingStrategy::kFullShard, false},
                                           StrategyCase{3, ShardingStrategy::kShardGradOp, true},
                                           StrategyCase{2, ShardingStrategy::kNoShard, false}),
                         fsdp::testing::StrategyCaseName);

// Flips one byte in the middle of the largest record of `path`; returns the record's name.
std::string CorruptLargestRecord(const std::string& path) {
  std::string name;
  uint64_t offset = 0;
  {
    auto source = FileSource::Open(path);
    EXPECT_TRUE(source.ok()) << source.status();
    ZipReader zip(**source, path);
    EXPECT_TRUE(zip.Open().ok());
    uint64_t largest = 0;
    for (const auto& [entry_name, entry] : zip.entries()) {
      if (entry_name.find("/data/") != std::string::npos && entry.size > largest) {
        largest = entry.size;
        name = entry_name;
        offset = entry.data_offset + entry.size / 2;
      }
    }
  }
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekg(static_cast<std::streamoff>(offset));
  const char byte = static_cast<char>(file.get() ^ 0x40);
  file.seekp(static_cast<std::streamoff>(offset));
  file.put(byte);
  return name;
}

class LoadFullCheckpointDamaged : public ::testing::TestWithParam<std::string> {};

TEST_P(LoadFullCheckpointDamaged, RefusedOnEveryRankNamingTheRecordChangingNothing) {
  const StrategyCase c{2, ShardingStrategy::kFullShard, false};
  const std::string file = GetParam();
  const std::string dir = SavedCheckpoint(absl::StrCat("stream_damaged_", file), c);
  const std::string record = CorruptLargestRecord(dir + "/" + file);
  RunPhase(2, c.world_size, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(group, c, 3));
    FSDP_ASSERT_OK_AND_ASSIGN(Full before, FullOf(t));
    EXPECT_THAT(
        LoadFullCheckpoint(dir, *t.pair.fsdp, t.adapter.get()),
        ::fsdp::testing::StatusIs(
            absl::StatusCode::kDataLoss,
            ::testing::AllOf(::testing::HasSubstr("LoadFullCheckpoint(" + dir + "): " + file),
                             ::testing::HasSubstr("nothing loaded"),
                             ::testing::HasSubstr("rank 0: " + dir + "/" + file),
                             ::testing::HasSubstr(record), ::testing::HasSubstr("CRC-32"))));
    FSDP_ASSERT_OK_AND_ASSIGN(Full after, FullOf(t));
    ExpectEqual(before, after);
  });
}

INSTANTIATE_TEST_SUITE_P(Files, LoadFullCheckpointDamaged,
                         ::testing::Values("model.pt", "optim.pt"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param == "model.pt" ? "model" : "optim";
                         });

}  // namespace
}  // namespace fsdp::checkpoint
