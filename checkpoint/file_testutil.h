// Scratch files for the checkpoint tests (testonly): a fresh directory under the test's
// TEST_TMPDIR, a file's bytes, a file written whole. Failures are test failures (EXPECT), not
// statuses: a file that cannot be read reads as empty.
#ifndef FSDP_CPP_CHECKPOINT_FILE_TESTUTIL_H_
#define FSDP_CPP_CHECKPOINT_FILE_TESTUTIL_H_

#include <string>

namespace fsdp::checkpoint::testing {

// TEST_TMPDIR/name (/tmp/name outside bazel test), removed if it exists; not created.
std::string FreshTestDir(const std::string& name);

// The whole contents of the file at `path`.
std::string ReadFileBytes(const std::string& path);

// Replaces the file at `path` by `bytes`.
void WriteFileBytes(const std::string& path, const std::string& bytes);

}  // namespace fsdp::checkpoint::testing

#endif  // FSDP_CPP_CHECKPOINT_FILE_TESTUTIL_H_
