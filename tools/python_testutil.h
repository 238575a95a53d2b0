// The project's Python from a test: the venv with torch 2.13.0 that tools/setup.sh makes (the
// live PyTorch peer that tests compare against), and files of this workspace in runfiles.
//
// Preconditions: the test runs under `bazel test` (TEST_SRCDIR is set) and lists
// "//third_party:python" in its `data`, plus the scripts it runs.
#ifndef FSDP_CPP_TOOLS_PYTHON_TESTUTIL_H_
#define FSDP_CPP_TOOLS_PYTHON_TESTUTIL_H_

#include <map>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace fsdp::testing {

// The absolute path of `path`, a file of this workspace in the test's runfiles
// ("models/testdata/reference_models.py").
std::string Runfile(absl::string_view path);

// The command that runs the project's Python (a wrapper script; quoted for a shell).
std::string PythonCommand();

// A shell command's exit code (-1 if it did not exit normally) and its output, stdout and
// stderr together.
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
CommandResult RunCommand(const std::string& command);

// Runs the workspace script `script` ("fsdp/testdata/x.py") with the project's Python: its exit
// code and output, and the output's lines that start with one of `prefixes`, in order.
struct PythonLines {
  CommandResult result;
  std::vector<std::string> lines;
};
PythonLines RunPythonScriptLines(absl::string_view script,
                                 const std::vector<std::string>& prefixes);

// The lines of the text file at `path` (none if it cannot be read).
std::vector<std::string> ReadFileLines(const std::string& path);

// The losses of the `step=<i> loss=<value>` lines (at a line start) of `output`, in order: what
// examples/train and the Python oracles print.
std::vector<double> StepLosses(const std::string& output);

// The `key=value` fields of one line (space-separated; a value may contain '='): how the
// Python oracles write their manifests.
std::map<std::string, std::string> KeyValueFields(absl::string_view line);

}  // namespace fsdp::testing

#endif  // FSDP_CPP_TOOLS_PYTHON_TESTUTIL_H_
