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
  // The save's outcome includes its staging's.
  if (staging_.valid()) (void)staging_.get();
  if (!in_flight_.valid()) return SaveStats{};
  return in_flight_.get();
}

absl::StatusOr<AsyncSaveStats> AsyncCheckpointSaver::SynchronizeStaging() {
  if (!staging_.valid()) return AsyncSaveStats{};
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<AsyncSaveStats> staged = staging_.get();
  if (!staged.ok()) return staged.status();
  staged->blocked_seconds = internal::Since(start);
  staged->waited_seconds = staged->blocked_seconds;
  return staged;
}

namespace {

// What a piece was at Save(): its source tensor (shares the live tensor's version counter) and
// that counter's value.
struct PieceVersion {
  std::string key;
  at::Tensor source;
  int64_t version;
};

absl::StatusOr<std::vector<PieceVersion>> Versions(const internal::LocalSave& local) {
  std::vector<PieceVersion> versions;
  FSDP_RETURN_IF_ERROR(CallTorch("reading the pieces' versions", [&] {
    for (const PieceToWrite& piece : local.pieces) {
      versions.push_back(PieceVersion{piece.key, piece.data, piece.data._version()});
    }
  }));
  return versions;
}

// FAILED_PRECONDITION naming the first piece that changed since `versions` were read.
absl::Status Unchanged(const std::vector<PieceVersion>& versions) {
  for (const PieceVersion& v : versions) {
    int64_t now = 0;
    FSDP_RETURN_IF_ERROR(
        CallTorch("reading the pieces' versions", [&] { now = v.source._version(); }));
    if (now != v.version) {
      return absl::FailedPreconditionError(absl::StrCat(
          "'", v.key, "' changed while it was being staged (version ", v.version, " at Save(), ",
          now,
          " after its copy), so this save commits nothing: wait for SynchronizeStaging() "
          "before the optimizer step or any other change to the parameters or optimizer state"));
    }
  }
  return absl::OkStatus();
}

// Copies `local`'s pieces into `buffers` (reused), timed.
absl::StatusOr<AsyncSaveStats> Stage(internal::LocalSave& local, std::vector<at::Tensor>& buffers,
                                     int threads) {
  AsyncSaveStats stats;
  const auto copy_start = std::chrono::steady_clock::now();
  FSDP_RETURN_IF_ERROR(internal::StageLocalSave(local, buffers, threads));
  stats.copy_seconds = internal::Since(copy_start);
  for (const PieceToWrite& piece : local.pieces) stats.staged_bytes += piece.data.nbytes();
  return stats;
}

// Without asynchronous staging, in Save(): copies `local`'s pieces now, into `stats`; `local`
// becomes the error if that fails.
void StageNow(absl::StatusOr<internal::LocalSave>& local, std::vector<at::Tensor>& buffers,
              int threads, AsyncSaveStats& stats) {
  absl::StatusOr<AsyncSaveStats> staged = Stage(*local, buffers, threads);
  if (!staged.ok()) {
    local = staged.status();
    return;
  }
  stats.copy_seconds = staged->copy_seconds;
  stats.staged_bytes = staged->staged_bytes;
}

// With asynchronous staging, in the saver's thread: copies `local`'s pieces, fails if any
// changed since Save() read `versions`, and hands the outcome to SynchronizeStaging() through
// `done`; `local` becomes the error if staging failed, so that the save commits nothing.
void StageInBackground(absl::StatusOr<internal::LocalSave>& local,
                       const std::vector<PieceVersion>& versions, std::vector<at::Tensor>& buffers,
                       int threads, const std::string& where,
                       std::promise<absl::StatusOr<AsyncSaveStats>>& done) {
  absl::StatusOr<AsyncSaveStats> staged = Stage(*local, buffers, threads);
  if (staged.ok()) {
    if (absl::Status same = Unchanged(versions); !same.ok()) staged = same;
  }
  if (!staged.ok()) {
    staged = Annotate(staged.status(), absl::StrCat(where, ": staging"));
    local = staged.status();
  }
  done.set_value(std::move(staged));
}

}  // namespace

absl::StatusOr<AsyncSaveStats> AsyncCheckpointSaver::Save(
    const std::string& dir, const optim_state::OptimizerAdapter* adapter,
    const SaveShardedOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  AsyncSaveStats stats;
  absl::StatusOr<SaveStats> previous = Wait();
  stats.waited_seconds = internal::Since(start);
  const std::string where = absl::StrCat("AsyncCheckpointSaver::Save(", dir, ")");
  if (!previous.ok()) {
    return Annotate(previous.status(),
                    absl::StrCat(where, ": the previous save failed, so this one was not started"));
  }
  // Under HYBRID_SHARD only the first replica writes, so only it stages.
  const bool writes = replicas_ == nullptr || replicas_->rank() == 0;
  const bool in_background = options_.use_async_staging && writes;
  absl::StatusOr<internal::LocalSave> local = internal::LocalSave{};
  absl::StatusOr<std::vector<PieceVersion>> versions = std::vector<PieceVersion>{};
  if (writes) {
    const auto collect_start = std::chrono::steady_clock::now();
    local = internal::CollectLocalSave(fsdp_, adapter, group_->rank());
    if (local.ok() && in_background) versions = Versions(*local);
    if (!versions.ok()) local = versions.status();
    stats.collect_seconds = internal::Since(collect_start);
    if (local.ok() && !in_background) StageNow(local, buffers_, options_.staging_threads, stats);
  }
  const absl::Status collected = local.status();
  std::promise<absl::StatusOr<AsyncSaveStats>> staging_done;
  if (in_background && collected.ok()) staging_ = staging_done.get_future();
  // The thread owns what it writes; `this` outlives it (the destructor waits).
  in_flight_ = std::async(std::launch::async, [this, dir, where, options, start, in_background,
                                               local = std::move(local),
                                               versions = std::move(versions),
                                               staging_done = std::move(staging_done)]() mutable {
    if (in_background && local.ok()) {
      StageInBackground(local, *versions, buffers_, options_.staging_threads, where, staging_done);
    }
    comm::ProcessGroup& group = *group_;
    return internal::SaveAcrossReplicas(
        replicas_.get(), internal::Where("SaveShardedCheckpoint", dir, group),
        [&] { return internal::WriteShardGroup(dir, group, local, options, start); });
  });
  stats.blocked_seconds = internal::Since(start);
  if (!collected.ok()) {
    // The thread tells the other ranks; this rank's caller learns it now (and Wait() again).
    return Annotate(collected, where);
  }
  return stats;
}

}  // namespace fsdp::checkpoint
