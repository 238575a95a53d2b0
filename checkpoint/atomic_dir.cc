#include "checkpoint/atomic_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace fsdp::checkpoint {
namespace {

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", strerror(errno)));
}

std::string Parent(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string Base(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

absl::Status CheckDir(const std::string& dir) {
  if (dir.empty() || dir.back() == '/') {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint directory '", dir,
                                                   "' must be a non-empty path not ending in '/'"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string StagingDirName(const std::string& dir, const std::string& nonce) {
  return absl::StrCat(dir, ".tmp-", nonce);
}

std::string RandomNonce() {
  std::random_device rd;
  const uint64_t v =
      (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ (static_cast<uint64_t>(getpid()) << 16);
  return absl::StrFormat("%016x", v);
}

absl::Status RemoveTree(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return Errno("cannot stat", path);
  }
  if (S_ISDIR(st.st_mode)) {
    DIR* d = opendir(path.c_str());
    if (d == nullptr) return Errno("cannot open directory", path);
    std::vector<std::string> names;
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    closedir(d);
    for (const std::string& name : names) {
      absl::Status s = RemoveTree(absl::StrCat(path, "/", name));
      if (!s.ok()) return s;
    }
    if (rmdir(path.c_str()) != 0 && errno != ENOENT) return Errno("cannot remove", path);
    return absl::OkStatus();
  }
  if (unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("cannot remove", path);
  return absl::OkStatus();
}

absl::Status RemoveStaleStagingDirs(const std::string& dir) {
  if (absl::Status s = CheckDir(dir); !s.ok()) return s;
  const std::string parent = Parent(dir);
  const std::string prefix = absl::StrCat(Base(dir), ".tmp-");
  DIR* d = opendir(parent.c_str());
  if (d == nullptr) return Errno("cannot open directory", parent);
  std::vector<std::string> stale;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (absl::StartsWith(name, prefix)) stale.push_back(absl::StrCat(parent, "/", name));
  }
  closedir(d);
  for (const std::string& path : stale) {
    if (absl::Status s = RemoveTree(path); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> CreateStagingDir(const std::string& dir, const std::string& nonce) {
  if (absl::Status s = RemoveStaleStagingDirs(dir); !s.ok()) return s;
  const std::string staging = StagingDirName(dir, nonce.empty() ? RandomNonce() : nonce);
  if (mkdir(staging.c_str(), 0755) != 0) return Errno("cannot create directory", staging);
  CrashPoint("staging directory created");
  return staging;
}

absl::Status FsyncPath(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  const int rc = fsync(fd);
  const int saved = errno;
  close(fd);
  errno = saved;
  if (rc != 0) return Errno("cannot fsync", path);
  return absl::OkStatus();
}

absl::Status WriteFileDurably(const std::string& path, absl::string_view bytes) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", path);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int saved = errno;
      close(fd);
      errno = saved;
      return Errno("cannot write", path);
    }
    done += static_cast<size_t>(n);
  }
  CrashPoint(absl::StrCat("written ", Base(path)));
  if (fsync(fd) != 0) {
    const int saved = errno;
    close(fd);
    errno = saved;
    return Errno("cannot fsync", path);
  }
  if (close(fd) != 0) return Errno("cannot close", path);
  CrashPoint(absl::StrCat("fsynced ", Base(path)));
  return absl::OkStatus();
}

absl::Status CommitStagingDir(const std::string& staging, const std::string& dir) {
  if (absl::Status s = CheckDir(dir); !s.ok()) return s;
  if (absl::Status s = FsyncPath(staging); !s.ok()) return s;
  CrashPoint("staging directory fsynced");
  const std::string parent = Parent(dir);
  struct stat st;
  const bool exists = lstat(dir.c_str(), &st) == 0;
  if (exists) {
    if (renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno == EINVAL || errno == ENOSYS) {
        return absl::UnimplementedError(absl::StrCat("cannot exchange ", staging, " and ", dir,
                                                     " atomically: the filesystem does not support "
                                                     "renameat2(RENAME_EXCHANGE)"));
      }
      return Errno(absl::StrCat("cannot exchange ", staging, " and"), dir);
    }
  } else if (rename(staging.c_str(), dir.c_str()) != 0) {
    return Errno(absl::StrCat("cannot rename ", staging, " to"), dir);
  }
  CrashPoint("renamed");
  if (absl::Status s = FsyncPath(parent); !s.ok()) return s;
  CrashPoint("parent fsynced");
  if (exists) {
    // The old checkpoint now lives at the staging name.
    if (absl::Status s = RemoveTree(staging); !s.ok()) return s;
    CrashPoint("old checkpoint removed");
  }
  return absl::OkStatus();
}

namespace {
std::atomic<int> crash_points_passed{0};
}  // namespace

void ResetCrashPointCounter() { crash_points_passed = 0; }

void CrashPoint(absl::string_view name) {
  std::atomic<int>& passed = crash_points_passed;
  // Read at every point (not cached), so that a forked child can set them.
  int crash_at = 0;
  const char* v = std::getenv("FSDP_CHECKPOINT_CRASH_AT");
  if (v == nullptr || !absl::SimpleAtoi(v, &crash_at)) crash_at = 0;
  const char* log = std::getenv("FSDP_CHECKPOINT_CRASH_LOG");
  const int k = ++passed;
  if (log != nullptr && *log != '\0') {
    if (FILE* f = fopen(log, "a")) {
      fprintf(f, "%d %.*s\n", k, static_cast<int>(name.size()), name.data());
      fclose(f);
    }
  }
  // FSDP_CHECKPOINT_CRASH_RANK: only the process whose RANK (torchrun's variable) matches.
  const char* only = std::getenv("FSDP_CHECKPOINT_CRASH_RANK");
  const char* rank = std::getenv("RANK");
  if (only != nullptr && *only != '\0' && (rank == nullptr || std::strcmp(only, rank) != 0)) {
    crash_at = 0;
  }
  if (crash_at > 0 && k == crash_at) {
    kill(getpid(), SIGKILL);
    pause();
  }
}

}  // namespace fsdp::checkpoint
