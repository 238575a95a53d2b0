#include "examples/train_checkpoint.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/dcp_save.h"
#include "checkpoint/key_prefixes.h"
#include "checkpoint/load_full_checkpoint.h"
#include "checkpoint/save_full_checkpoint.h"
#include "checkpoint/sharded_checkpoint.h"
#include "checkpoint/sharded_format.h"
#include "comm/status_macros.h"

namespace fsdp::examples {

absl::Status CreateParentDir(const std::string& dir) {
  std::error_code error;
  const std::filesystem::path parent = std::filesystem::absolute(dir).parent_path();
  std::filesystem::create_directories(parent, error);
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot create ", parent.string(), ": ", error.message()));
  }
  return absl::OkStatus();
}

namespace {

constexpr char kProgressFile[] = "progress.txt";

// A full checkpoint: DIR/model.pt and DIR/optim.pt as PyTorch FSDP users save them (streamed
// one unit at a time, rank 0 writes; Python's torch.load reads both) and DIR/progress.txt with
// the steps done, in one atomic commit.
absl::Status SaveCheckpoint(const std::string& dir, int steps_done, fsdp::comm::ProcessGroup& group,
                            fsdp::FullyShardedDataParallel& fsdp,
                            const fsdp::optim_state::OptimizerAdapter& adapter) {
  absl::Status status = group.rank() == 0 ? CreateParentDir(dir) : absl::OkStatus();
  // Everyone learns whether rank 0 could create the parent.
  FSDP_ASSIGN_OR_RETURN(std::string outcome,
                        group.BroadcastObject(std::string(status.message()), 0));
  if (!outcome.empty()) return absl::InternalError(outcome);
  return fsdp::checkpoint::SaveFullCheckpoint(
      dir, fsdp, &adapter,
      {.extra_files = {{kProgressFile, absl::StrCat("steps_done=", steps_done, "\n")}}});
}

// DIR/progress.txt's steps_done, read by rank 0 and broadcast (0 without the file).
absl::StatusOr<int> ReadProgress(const std::string& dir, fsdp::comm::ProcessGroup& group) {
  int steps_done = 0;
  if (group.rank() == 0) {
    std::ifstream progress(dir + "/" + kProgressFile);
    std::string line;
    if (progress >> line && line.rfind("steps_done=", 0) == 0) {
      steps_done = std::atoi(line.c_str() + 11);
    }
  }
  FSDP_ASSIGN_OR_RETURN(std::string steps, group.BroadcastObject(std::to_string(steps_done), 0));
  return std::atoi(steps.c_str());
}

// Loads a full checkpoint written by SaveCheckpoint (or by PyTorch: model.pt and optim.pt
// FQN-keyed, with --strip_key_prefixes for a wrapped model's keys) into this job, whatever its
// world size and wrapping; returns the steps done (progress.txt, 0 without it).
absl::StatusOr<int> LoadFullTrainCheckpoint(const std::string& dir,
                                            const std::string& strip_key_prefixes,
                                            fsdp::comm::ProcessGroup& group,
                                            fsdp::FullyShardedDataParallel& fsdp,
                                            fsdp::optim_state::OptimizerAdapter& adapter) {
  FSDP_ASSIGN_OR_RETURN(fsdp::checkpoint::KeyPrefixes strip,
                        fsdp::checkpoint::ParseKeyPrefixes(strip_key_prefixes));
  if (absl::Status loaded =
          fsdp::checkpoint::LoadFullCheckpoint(dir, fsdp, &adapter, {.strip_key_prefixes = strip});
      !loaded.ok()) {
    if (!absl::StrContains(loaded.message(), "key prefixes stripped")) return loaded;
    return absl::Status(loaded.code(), absl::StrCat(loaded.message(), " (--strip_key_prefixes)"));
  }
  return ReadProgress(dir, group);
}

// A torch.distributed.checkpoint directory (checkpoint/dcp_load.h), e.g. one PyTorch's dcp.save
// wrote, with the steps done in DIR/progress.txt (0 without it) as in a full checkpoint.
absl::StatusOr<int> LoadDcpTrainCheckpoint(const std::string& dir, fsdp::comm::ProcessGroup& group,
                                           fsdp::FullyShardedDataParallel& fsdp,
                                           fsdp::optim_state::OptimizerAdapter& adapter) {
  FSDP_RETURN_IF_ERROR(fsdp::checkpoint::LoadShardedCheckpoint(dir, fsdp, &adapter).status());
  return ReadProgress(dir, group);
}

// A sharded checkpoint (checkpoint/sharded_checkpoint.h): every rank writes its own shard, no
// gathering; the steps done travel in metadata.json's user_metadata, committed atomically
// with the rest.
absl::Status SaveShardedTrainCheckpoint(const std::string& dir, int steps_done,
                                        fsdp::FullyShardedDataParallel& fsdp,
                                        const fsdp::optim_state::OptimizerAdapter& adapter) {
  FSDP_RETURN_IF_ERROR(CreateParentDir(dir));
  fsdp::checkpoint::SaveShardedOptions options;
  options.user_metadata["steps_done"] = std::to_string(steps_done);
  return fsdp::checkpoint::SaveShardedCheckpoint(dir, fsdp, &adapter, options).status();
}

// A DCP directory (checkpoint/dcp_save.h) in torchtitan's layout, which PyTorch's dcp.load
// reads: every rank writes its own file; progress.txt, as beside a full checkpoint, in the
// same commit.
absl::Status SaveDcpTrainCheckpoint(const std::string& dir, int steps_done,
                                    fsdp::FullyShardedDataParallel& fsdp,
                                    const fsdp::optim_state::OptimizerAdapter& adapter) {
  FSDP_RETURN_IF_ERROR(CreateParentDir(dir));
  fsdp::checkpoint::SaveDcpOptions options;
  options.extra_files[kProgressFile] = absl::StrCat("steps_done=", steps_done, "\n");
  return fsdp::checkpoint::SaveDcpCheckpoint(dir, fsdp, &adapter, options).status();
}

absl::StatusOr<int> LoadShardedTrainCheckpoint(const std::string& dir,
                                               fsdp::FullyShardedDataParallel& fsdp,
                                               fsdp::optim_state::OptimizerAdapter& adapter) {
  // The load first: it is the collective that makes the ranks agree on errors; the steps done
  // are then read from the same, validated metadata.json on every rank.
  FSDP_RETURN_IF_ERROR(fsdp::checkpoint::LoadShardedCheckpoint(dir, fsdp, &adapter).status());
  FSDP_ASSIGN_OR_RETURN(auto reader, fsdp::checkpoint::ShardedCheckpointReader::Open(dir));
  const auto& user = reader->metadata().user_metadata;
  const auto steps = user.find("steps_done");
  int steps_done = 0;
  if (steps == user.end() || !absl::SimpleAtoi(steps->second, &steps_done) || steps_done < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, "/metadata.json: no user_metadata.steps_done (not written by examples/train)"));
  }
  return steps_done;
}

}  // namespace

absl::StatusOr<int> LoadTrainCheckpoint(const std::string& dir,
                                        const std::string& strip_key_prefixes,
                                        fsdp::comm::ProcessGroup& group,
                                        fsdp::FullyShardedDataParallel& fsdp,
                                        fsdp::optim_state::OptimizerAdapter& adapter) {
  std::string kind;
  if (group.rank() == 0) {
    auto detected = fsdp::checkpoint::DetectCheckpointKind(dir);
    kind = !detected.ok() ? absl::StrCat("error:", detected.status().message())
                          : std::string(fsdp::checkpoint::CheckpointKindName(*detected));
  }
  FSDP_ASSIGN_OR_RETURN(kind, group.BroadcastObject(kind, 0));
  if (absl::StartsWith(kind, "error:")) return absl::NotFoundError(kind.substr(6));
  if (kind == "sharded") return LoadShardedTrainCheckpoint(dir, fsdp, adapter);
  if (kind == "dcp") return LoadDcpTrainCheckpoint(dir, group, fsdp, adapter);
  return LoadFullTrainCheckpoint(dir, strip_key_prefixes, group, fsdp, adapter);
}

absl::Status SaveTrainCheckpoint(const std::string& dir, const std::string& type, int steps_done,
                                 fsdp::comm::ProcessGroup& group,
                                 fsdp::FullyShardedDataParallel& fsdp,
                                 const fsdp::optim_state::OptimizerAdapter& adapter,
                                 fsdp::checkpoint::AsyncCheckpointSaver* async_saver) {
  const auto start = std::chrono::steady_clock::now();
  if (async_saver != nullptr) {
    FSDP_RETURN_IF_ERROR(CreateParentDir(dir), absl::StrCat("--save=", dir));
    fsdp::checkpoint::SaveShardedOptions options;
    options.user_metadata["steps_done"] = std::to_string(steps_done);
    absl::StatusOr<fsdp::checkpoint::AsyncSaveStats> stats =
        async_saver->Save(dir, &adapter, options);
    FSDP_RETURN_IF_ERROR(stats.status(), absl::StrCat("--save=", dir));
    if (group.rank() == 0) {
      absl::PrintF(
          "train: saving a sharded checkpoint in %s after step %d in the background (training "
          "held up %.3f s)\n",
          dir, steps_done - 1, stats->blocked_seconds);
      std::fflush(stdout);
    }
    return absl::OkStatus();
  }
  FSDP_RETURN_IF_ERROR(type == "sharded"
                           ? SaveShardedTrainCheckpoint(dir, steps_done, fsdp, adapter)
                       : type == "dcp" ? SaveDcpTrainCheckpoint(dir, steps_done, fsdp, adapter)
                                       : SaveCheckpoint(dir, steps_done, group, fsdp, adapter),
                       absl::StrCat("--save=", dir));
  if (group.rank() == 0) {
    absl::PrintF("train: saved a %s checkpoint in %s after step %d (%.2f s)\n", type, dir,
                 steps_done - 1,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status SynchronizeTrainStaging(fsdp::checkpoint::AsyncCheckpointSaver& async_saver,
                                     fsdp::comm::ProcessGroup& group, int step) {
  if (!async_saver.staging_pending()) return absl::OkStatus();
  absl::StatusOr<fsdp::checkpoint::AsyncSaveStats> staged = async_saver.SynchronizeStaging();
  FSDP_RETURN_IF_ERROR(staged.status(), "--async_save: staging the checkpoint");
  if (group.rank() == 0) {
    absl::PrintF(
        "train: the background save's staging is done before optimizer step %d (the copy took "
        "%.3f s; step %d waited %.3f s for it)\n",
        step, staged->copy_seconds, step, staged->blocked_seconds);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status WaitForTrainCheckpoint(fsdp::checkpoint::AsyncCheckpointSaver& async_saver,
                                    fsdp::comm::ProcessGroup& group) {
  if (!async_saver.pending()) return absl::OkStatus();
  absl::StatusOr<fsdp::checkpoint::SaveStats> saved = async_saver.Wait();
  FSDP_RETURN_IF_ERROR(saved.status(), "--async_save: the background save");
  if (group.rank() == 0) {
    absl::PrintF("train: the background save is committed (%.2f s after it started)\n",
                 saved->seconds);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

}  // namespace fsdp::examples
