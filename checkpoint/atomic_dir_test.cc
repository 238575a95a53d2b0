#include "checkpoint/atomic_dir.h"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string root =
      absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/atomic_dir_test");
  mkdir(root.c_str(), 0755);
  const std::string dir = absl::StrCat(root, "/", name);
  EXPECT_THAT(RemoveTree(dir), IsOk());
  EXPECT_THAT(RemoveStaleStagingDirs(dir), IsOk());
  return dir;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "<missing>";
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> Siblings(const std::string& dir) {
  const std::string parent = dir.substr(0, dir.rfind('/'));
  const std::string base = dir.substr(dir.rfind('/') + 1);
  std::vector<std::string> out;
  DIR* d = opendir(parent.c_str());
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name == base || absl::StartsWith(name, base + ".tmp-"))
      out.push_back(name);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// Writes a checkpoint of two files, both holding `content`, into `dir`
// atomically.
absl::Status Save(const std::string& dir, const std::string& content) {
  absl::StatusOr<std::string> staging = CreateStagingDir(dir);
  if (!staging.ok()) return staging.status();
  for (const char* name : {"a", "b"}) {
    absl::Status s =
        WriteFileDurably(absl::StrCat(*staging, "/", name), content);
    if (!s.ok()) return s;
  }
  return CommitStagingDir(*staging, dir);
}

TEST(AtomicDir, CommitCreatesTheDirectory) {
  const std::string dir = TestDir("create");
  ASSERT_THAT(Save(dir, "v1"), IsOk());
  EXPECT_EQ(ReadAll(dir + "/a"), "v1");
  EXPECT_EQ(ReadAll(dir + "/b"), "v1");
  EXPECT_THAT(Siblings(dir), ::testing::ElementsAre("create"));
}

TEST(AtomicDir, CommitReplacesAnExistingCheckpointAndRemovesTheOldOne) {
  const std::string dir = TestDir("replace");
  ASSERT_THAT(Save(dir, "v1"), IsOk());
  ASSERT_THAT(Save(dir, "v2"), IsOk());
  EXPECT_EQ(ReadAll(dir + "/a"), "v2");
  EXPECT_EQ(ReadAll(dir + "/b"), "v2");
  EXPECT_THAT(Siblings(dir), ::testing::ElementsAre("replace"));
}

TEST(AtomicDir, StaleStagingDirsAreRemovedByTheNextSave) {
  const std::string dir = TestDir("stale");
  ASSERT_THAT(Save(dir, "v1"), IsOk());
  mkdir(StagingDirName(dir, "deadbeef").c_str(), 0755);
  ASSERT_THAT(WriteFileDurably(StagingDirName(dir, "deadbeef") + "/a", "junk"),
              IsOk());
  EXPECT_THAT(Siblings(dir),
              ::testing::ElementsAre("stale", "stale.tmp-deadbeef"));
  ASSERT_THAT(Save(dir, "v2"), IsOk());
  EXPECT_THAT(Siblings(dir), ::testing::ElementsAre("stale"));
  EXPECT_EQ(ReadAll(dir + "/a"), "v2");
}

TEST(AtomicDir, RejectsBadDirectoryNames) {
  EXPECT_THAT(CreateStagingDir(""), StatusIs(absl::StatusCode::kInvalidArgument,
                                             HasSubstr("non-empty path")));
  EXPECT_THAT(
      CreateStagingDir("/tmp/x/"),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'/tmp/x/'")));
  EXPECT_THAT(
      CreateStagingDir("/nonexistent-parent/ckpt"),
      StatusIs(absl::StatusCode::kInternal, HasSubstr("/nonexistent-parent")));
}

// Runs Save(dir, content) in a forked child that SIGKILLs itself at crash point
// `k`; returns whether the child was killed (false: the save ran to its end).
bool SaveKilledAt(const std::string& dir, const std::string& content, int k) {
  const pid_t pid = fork();
  if (pid == 0) {
    setenv("FSDP_CHECKPOINT_CRASH_AT", std::to_string(k).c_str(), 1);
    ResetCrashPointCounter();
    _exit(Save(dir, content).ok() ? 0 : 3);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) {
    EXPECT_EQ(WTERMSIG(status), SIGKILL);
    return true;
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "status " << status;
  return false;
}

TEST(AtomicDir, AKilledSaveLeavesTheOldOrTheNewCheckpointComplete) {
  for (bool first_save : {true, false}) {
    const std::string dir = TestDir(first_save ? "killed_first" : "killed");
    int points = 0;
    for (int k = 1; k < 50; ++k) {
      SCOPED_TRACE(absl::StrCat("first_save=", first_save, " crash point ", k));
      ASSERT_THAT(RemoveTree(dir), IsOk());
      if (!first_save) {
        ASSERT_THAT(Save(dir, "old"), IsOk());
      }
      const bool killed = SaveKilledAt(dir, "new", k);
      const std::string a = ReadAll(dir + "/a");
      const std::string b = ReadAll(dir + "/b");
      EXPECT_EQ(a, b);
      if (first_save) {
        EXPECT_THAT(a, ::testing::AnyOf("<missing>", "new"));
      } else {
        EXPECT_THAT(a, ::testing::AnyOf("old", "new"));
      }
      if (!killed) {
        EXPECT_EQ(a, "new");
        points = k - 1;
        break;
      }
      // The next save cleans up whatever the killed one left.
      ASSERT_THAT(Save(dir, "next"), IsOk());
      EXPECT_EQ(ReadAll(dir + "/a"), "next");
      EXPECT_EQ(Siblings(dir).size(), 1u);
    }
    // created, a written/fsynced, b written/fsynced, staging fsynced, renamed,
    // parent fsynced
    // (+ old removed when replacing).
    EXPECT_EQ(points, first_save ? 8 : 9);
  }
}

}  // namespace
}  // namespace fsdp::checkpoint
