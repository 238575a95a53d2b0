#include "bench/pytorch_reference.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tools/python_testutil.h"

namespace fsdp::bench {

absl::StatusOr<std::vector<std::map<std::string, std::string>>> RunPyTorchReference(
    absl::string_view script, int nproc, const std::vector<std::string>& args,
    absl::string_view marker) {
  // `bazel run` starts us in our runfiles tree without TEST_SRCDIR: name it for Runfile().
  if (std::getenv("TEST_SRCDIR") == nullptr) {
    std::error_code error;
    const auto exe = std::filesystem::read_symlink("/proc/self/exe", error);
    if (!error) setenv("TEST_SRCDIR", (exe.string() + ".runfiles").c_str(), 0);
  }
  const std::string command = absl::StrCat(
      testing::PythonCommand(), " -m torch.distributed.run --standalone --nproc_per_node=", nproc,
      " ", testing::Runfile(script), " --threads=", at::get_num_threads(), " ",
      absl::StrJoin(args, " "));
  const testing::CommandResult run = testing::RunCommand(command);
  std::vector<std::map<std::string, std::string>> lines;
  for (absl::string_view line : absl::StrSplit(run.output, '\n')) {
    if (absl::StartsWith(line, absl::StrCat(marker, " "))) {
      lines.push_back(testing::KeyValueFields(line.substr(marker.size() + 1)));
    }
  }
  if (run.exit_code != 0 || lines.empty()) {
    return absl::InternalError(
        absl::StrCat("PyTorch's reference (", command, ") exited ", run.exit_code,
                     lines.empty() ? absl::StrCat(" and printed no '", marker, "' line") : "",
                     ":\n", run.output));
  }
  return lines;
}

absl::StatusOr<double> NumberField(const std::map<std::string, std::string>& fields,
                                   const std::string& key) {
  double value = 0;
  auto it = fields.find(key);
  if (it == fields.end() || !absl::SimpleAtod(it->second, &value)) {
    return absl::InternalError(absl::StrCat("PyTorch's reference printed no number ", key));
  }
  return value;
}

}  // namespace fsdp::bench
