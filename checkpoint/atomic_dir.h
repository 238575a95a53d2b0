// Atomic replacement of a checkpoint directory: a new checkpoint is written
// into a fresh sibling "staging" directory, made durable, and swapped in with
// one rename, so that a crash at any instant leaves DIR holding either the old
// or the new checkpoint, complete.
//
//   FSDP_ASSIGN_OR_RETURN(std::string staging, CreateStagingDir(dir));   //
//   DIR.tmp-<nonce>
//   ... write files into `staging` with WriteFileDurably (or write + FsyncPath)
//   ... FSDP_RETURN_IF_ERROR(CommitStagingDir(staging, dir));
//
// CommitStagingDir fsyncs the staging directory, then
//   * if DIR exists: exchanges the two names with renameat2(RENAME_EXCHANGE)
//   (one atomic step:
//     DIR is the new checkpoint, the staging name now holds the old one),
//     fsyncs the parent and removes the old checkpoint;
//   * if not: rename(staging, DIR), then fsyncs the parent.
// Staging directories left by crashed saves (DIR.tmp-*, including an old
// checkpoint whose removal was interrupted) are removed by the next
// CreateStagingDir for the same DIR. Filesystems without RENAME_EXCHANGE
// (EINVAL / ENOSYS) are refused with UNIMPLEMENTED rather than falling back to
// a non-atomic delete-then-rename.
//
// Preconditions: one writer per DIR at a time (two concurrent saves to one DIR
// would remove each other's staging directories). For a multi-process save, the
// directory is on a filesystem all writers share, and one process (rank 0)
// creates and commits it.
//
// Crash points (tests of issue 7): when the environment variable
// FSDP_CHECKPOINT_CRASH_AT=<k> is set, the k-th call (1-based, counted per
// process) of CrashPoint() kills the process with SIGKILL; with
// FSDP_CHECKPOINT_CRASH_RANK=<r> set too, only in the process whose RANK
// (torchrun's variable) is r. Savers call CrashPoint() between each durable step (file written,
// fsynced, directory renamed, old removed, ...). FSDP_CHECKPOINT_CRASH_LOG=<path> appends each
// point's name to a file as it is passed (to count the points of a save).
//
// Errors: INTERNAL naming the path and errno's text for any failing system
// call; INVALID_ARGUMENT for an empty DIR or one ending in '/'.
#ifndef FSDP_CPP_CHECKPOINT_ATOMIC_DIR_H_
#define FSDP_CPP_CHECKPOINT_ATOMIC_DIR_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fsdp::checkpoint {

// "DIR.tmp-<nonce>".
std::string StagingDirName(const std::string& dir, const std::string& nonce);

// A random 16-hex-digit nonce.
std::string RandomNonce();

// Removes leftovers DIR.tmp-* of earlier, interrupted saves.
[[nodiscard]] absl::Status RemoveStaleStagingDirs(const std::string& dir);

// RemoveStaleStagingDirs, then creates DIR.tmp-<nonce> (a fresh nonce if
// empty); returns its path. The parent directory must exist.
[[nodiscard]] absl::StatusOr<std::string> CreateStagingDir(const std::string& dir,
                                                           const std::string& nonce = "");

// Writes `bytes` to `path` (created or truncated) and fsyncs it.
[[nodiscard]] absl::Status WriteFileDurably(const std::string& path, absl::string_view bytes);

// fsync of a file or directory.
[[nodiscard]] absl::Status FsyncPath(const std::string& path);

// Makes `staging` durable and swaps it in as `dir` (see above).
[[nodiscard]] absl::Status CommitStagingDir(const std::string& staging, const std::string& dir);

// rm -rf `path` (no error if it does not exist).
[[nodiscard]] absl::Status RemoveTree(const std::string& path);

// See "Crash points" above. `name` says where (for the crash log).
void CrashPoint(absl::string_view name);
// Restarts the count of crash points (for a forked child that inherited its
// parent's count).
void ResetCrashPointCounter();

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_ATOMIC_DIR_H_
