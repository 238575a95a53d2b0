// libFuzzer target for ShardedCheckpointReader (checkpoint/sharded_format.h) over real files:
// Open, then every tensor whole (ReadTensor) and in part (ReadRange), Verify, ReadFullContents.
//
// Input: a checkpoint directory flattened into one file: metadata.json, then each data file,
// separated by kSeparator. Data file k (0-based) of n is written as rank-<k>-of-<n>.safetensors
// into a directory of its own, so that both the metadata and the bytes it describes mutate:
// offsets and sizes that disagree with the files, truncated and damaged files, headers and
// blocks that fail their checksums. (A fixed metadata.json with only the data file fuzzed stops
// every mutation at a checksum; fuzz_corpus/ keeps the real pairs, which this format starts
// from.)
//
// Any input must end in values or error statuses, never in a crash, a sanitizer report, a leak
// (memory or file descriptors), an allocation beyond the files' sizes or a hang. Beyond that:
//   * errors are INVALID_ARGUMENT, DATA_LOSS or NOT_FOUND and name the checkpoint's directory;
//   * a tensor read whole has its shape and dtype, and a range of it read alone equals the same
//     range of the whole;
//   * when Verify finds nothing wrong, every tensor reads.
// Seeds: checkpoint/testdata/fuzz_corpus/sharded_data/ (made by make_sharded_corpus.sh from
// checkpoints that train and ckpt wrote). How to run it: checkpoint/fuzz/README.md.
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "checkpoint/sharded_format.h"

namespace {

using fsdp::checkpoint::DataFileName;
using fsdp::checkpoint::ShardedCheckpointReader;
using fsdp::checkpoint::TensorRecord;

constexpr std::string_view kSeparator = "\n#fsdp-fuzz-data-file#\n";
constexpr size_t kMaxFiles = 8;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "sharded_data_fuzz: %s\n", what.c_str());
  std::abort();
}

// The directory every input is written into (made once per process).
const std::string& Dir() {
  static const std::string dir = [] {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string templ = absl::StrCat(base != nullptr ? base : "/tmp", "/sharded_data_fuzz.XXXXXX");
    if (mkdtemp(templ.data()) == nullptr) Fail("cannot make a temporary directory");
    return templ;
  }();
  return dir;
}

void WriteFile(const std::string& path, std::string_view bytes) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) Fail("cannot create " + path);
  while (!bytes.empty()) {
    const ssize_t n = write(fd, bytes.data(), bytes.size());
    if (n <= 0) Fail("cannot write " + path);
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  close(fd);
}

// Removes every file of the directory (the previous input's).
void ClearDir(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) Fail("cannot list " + dir);
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      names.emplace_back(e->d_name);
    }
  }
  closedir(d);
  for (const std::string& n : names) unlink(absl::StrCat(dir, "/", n).c_str());
}

int OpenFds() {
  DIR* d = opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  int n = 0;
  while (readdir(d) != nullptr) ++n;
  closedir(d);
  return n;
}

void CheckError(const absl::Status& s, const std::string& dir, const char* during) {
  if (s.code() != absl::StatusCode::kInvalidArgument && s.code() != absl::StatusCode::kDataLoss &&
      s.code() != absl::StatusCode::kNotFound) {
    Fail(absl::StrCat(during, ": error of an unexpected code: ", s.ToString()));
  }
  if (s.message().find(dir) == absl::string_view::npos) {
    Fail(absl::StrCat(during, ": error without the checkpoint's directory: ", s.ToString()));
  }
}

void Exercise(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<ShardedCheckpointReader>> opened =
      ShardedCheckpointReader::Open(dir);
  if (!opened.ok()) {
    CheckError(opened.status(), dir, "Open");
    return;
  }
  ShardedCheckpointReader& reader = **opened;
  bool all_read = true;
  for (const TensorRecord& t : reader.metadata().tensors) {
    absl::StatusOr<at::Tensor> whole = reader.ReadTensor(t);
    if (!whole.ok()) {
      CheckError(whole.status(), dir, "ReadTensor");
      all_read = false;
      continue;
    }
    if (whole->sizes().vec() != t.shape || whole->scalar_type() != t.dtype) {
      Fail(absl::StrCat("ReadTensor('", t.key, "') has another shape or dtype"));
    }
    const int64_t n = t.numel();
    if (n >= 3) {
      at::Tensor part = at::empty({n - 2}, at::TensorOptions().dtype(t.dtype));
      const absl::Status s = reader.ReadRange(t, 1, n - 1, part);
      if (!s.ok()) Fail(absl::StrCat("ReadRange of a tensor read whole fails: ", s.ToString()));
      const at::Tensor same = whole->reshape({-1}).slice(0, 1, n - 1);
      const size_t bytes = static_cast<size_t>((n - 2) * same.element_size());
      if (std::memcmp(part.data_ptr(), same.contiguous().data_ptr(), bytes) != 0) {
        Fail(absl::StrCat("ReadRange('", t.key, "', 1, n-1) differs from ReadTensor's"));
      }
    }
  }
  absl::StatusOr<fsdp::checkpoint::FullContents> contents =
      fsdp::checkpoint::ReadFullContents(reader);
  if (!contents.ok()) CheckError(contents.status(), dir, "ReadFullContents");

  // A fresh reader: Verify must find a problem wherever a read failed.
  absl::StatusOr<std::unique_ptr<ShardedCheckpointReader>> again =
      ShardedCheckpointReader::Open(dir);
  if (!again.ok()) Fail("metadata.json opened once and not twice: " + again.status().ToString());
  absl::StatusOr<std::vector<ShardedCheckpointReader::BadRange>> bad = (*again)->Verify();
  if (!bad.ok()) {
    CheckError(bad.status(), dir, "Verify");
    return;
  }
  if (bad->empty() && !all_read) Fail("Verify finds nothing wrong but a tensor does not read");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  // SHARDED_DATA_FUZZ_METADATA=FILE: the input is one data file under that fixed metadata.json
  // (the other input format considered; README.md compares their coverage).
  static const std::string fixed_metadata = [] {
    const char* path = std::getenv("SHARDED_DATA_FUZZ_METADATA");
    if (path == nullptr) return std::string();
    std::ifstream f(path, std::ios::binary);
    if (!f) Fail(absl::StrCat("cannot read ", path));
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }();
  if (!fixed_metadata.empty()) parts.push_back(fixed_metadata);
  while (fixed_metadata.empty() && parts.size() <= kMaxFiles) {
    const size_t at = in.find(kSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(in.substr(0, at));
    in.remove_prefix(at + kSeparator.size());
  }
  parts.push_back(in);
  const std::string& dir = Dir();
  ClearDir(dir);
  WriteFile(dir + "/metadata.json", parts[0]);
  const int n = static_cast<int>(parts.size()) - 1;
  for (int k = 0; k < n; ++k) {
    WriteFile(absl::StrCat(dir, "/", DataFileName(k, n)), parts[static_cast<size_t>(k) + 1]);
  }
  const int fds_before = OpenFds();
  Exercise(dir);
  const int fds_after = OpenFds();
  if (fds_after != fds_before) {
    Fail(absl::StrCat("the reader left ", fds_after - fds_before, " file descriptors open"));
  }
  return 0;
}
