#include "checkpoint/async_checkpoint_saver.h"

#include <chrono>
#include <cstdio>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/sharded_checkpoint_common.h"
#include "checkpoint/internal/sharded_save_steps.h"
#include "comm/status_macros.h"

namespace fsdp::checkpoint {
namespace {

// A group of the same ranks as `group`, for the saver's thread alone.
absl::StatusOr<std::shared_ptr<comm::ProcessGroup>> OwnCopy(comm::ProcessGroup& group) {
  std::vector<int> ranks(static_cast<size_t>(group.size()));
  std::iota(ranks.begin(), ranks.end(), 0);
  return group.NewSubgroup(ranks);
}

}  // namespace

absl::StatusOr<std::unique_ptr<AsyncCheckpointSaver>> AsyncCheckpointSaver::Create(
    FullyShardedDataParallel& fsdp, const AsyncSaverOptions& options) {
  if (options.staging_threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AsyncCheckpointSaver: staging_threads must be at least 1, not ", options.staging_threads));
  }
  CKPT_ASSIGN_OR_RETURN(std::shared_ptr<comm::ProcessGroup> group, OwnCopy(*fsdp.group()),
                        "AsyncCheckpointSaver: creating the saver's process group");
  std::shared_ptr<comm::ProcessGroup> replicas;
  if (fsdp.options().replicate_group != nullptr) {
    CKPT_ASSIGN_OR_RETURN(replicas, OwnCopy(*fsdp.options().replicate_group),
                          "AsyncCheckpointSaver: creating the saver's replicate group");
  }
  return std::unique_ptr<AsyncCheckpointSaver>(
      new AsyncCheckpointSaver(fsdp, options, std::move(group), std::move(replicas)));
}

AsyncCheckpointSaver::~AsyncCheckpointSaver() {
  if (!in_flight_.valid()) return;
  absl::StatusOr<SaveStats> outcome = in_flight_.get();
  if (!outcome.ok()) {
    std::fprintf(stderr, "AsyncCheckpointSaver: the last save, never waited for, failed: %s\n",
                 outcome.status().ToString().c_str());
  }
}

absl::StatusOr<SaveStats> AsyncCheckpointSaver::Wait() {
  if (!in_flight_.valid()) return SaveStats{};
  return in_flight_.get();
}

absl::StatusOr<AsyncSaveStats> AsyncCheckpointSaver::Save(
    const std::string& dir, const optim_state::OptimizerAdapter* adapter,
    const SaveShardedOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  AsyncSaveStats stats;
  absl::StatusOr<SaveStats> previous = Wait();
  stats.waited_seconds = internal::Since(start);
  if (!previous.ok()) {
    return Annotate(previous.status(),
                    absl::StrCat("AsyncCheckpointSaver::Save(", dir,
                                 "): the previous save failed, so this one was not started"));
  }
  // Under HYBRID_SHARD only the first replica writes, so only it stages.
  const bool writes = replicas_ == nullptr || replicas_->rank() == 0;
  absl::StatusOr<internal::LocalSave> local = internal::LocalSave{};
  if (writes) {
    const auto collect_start = std::chrono::steady_clock::now();
    local = internal::CollectLocalSave(fsdp_, adapter, group_->rank());
    stats.collect_seconds = internal::Since(collect_start);
    if (local.ok()) {
      const auto copy_start = std::chrono::steady_clock::now();
      absl::Status staged = internal::StageLocalSave(*local, staging_, options_.staging_threads);
      stats.copy_seconds = internal::Since(copy_start);
      if (!staged.ok()) local = staged;
    }
    if (local.ok()) {
      for (const PieceToWrite& piece : local->pieces) stats.staged_bytes += piece.data.nbytes();
    }
  }
  const absl::Status staged = local.status();
  // The thread owns what it writes; `this` outlives it (the destructor waits).
  in_flight_ =
      std::async(std::launch::async, [this, dir, options, start, local = std::move(local)]() {
        comm::ProcessGroup& group = *group_;
        return internal::SaveAcrossReplicas(
            replicas_.get(), internal::Where("SaveShardedCheckpoint", dir, group),
            [&] { return internal::WriteShardGroup(dir, group, local, options, start); });
      });
  stats.blocked_seconds = internal::Since(start);
  if (!staged.ok()) {
    // The thread tells the other ranks; this rank's caller learns it now (and Wait() again).
    return Annotate(staged, absl::StrCat("AsyncCheckpointSaver::Save(", dir, ")"));
  }
  return stats;
}

}  // namespace fsdp::checkpoint
