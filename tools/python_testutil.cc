#include "tools/python_testutil.h"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace fsdp::testing {
namespace {

std::string SrcDir() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  return srcdir == nullptr ? std::string(".") : std::string(srcdir);
}

}  // namespace

std::string Runfile(absl::string_view path) { return absl::StrCat(SrcDir(), "/fsdp_cpp/", path); }

std::string PythonCommand() {
  // @fsdp_python//:python, an external repository's file: runfiles put it beside fsdp_cpp/.
  return absl::StrCat("'", SrcDir(), "/fsdp_python/python'");
}

CommandResult RunCommand(const std::string& command) {
  CommandResult run;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return run;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) run.output.append(buffer, n);
  const int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

PythonLines RunPythonScriptLines(absl::string_view script,
                                 const std::vector<std::string>& prefixes) {
  PythonLines out;
  out.result = RunCommand(absl::StrCat(PythonCommand(), " ", Runfile(script)));
  for (absl::string_view line : absl::StrSplit(out.result.output, '\n')) {
    for (const std::string& prefix : prefixes) {
      if (absl::StartsWith(line, prefix)) {
        out.lines.emplace_back(line);
        break;
      }
    }
  }
  return out;
}

std::vector<std::string> ReadFileLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::vector<double> StepLosses(const std::string& output) {
  // No <regex>: gcc -O1 (--config=asan) reports maybe-uninitialized inside libstdc++'s.
  std::vector<double> losses;
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    if (!absl::ConsumePrefix(&line, "step=")) continue;
    const size_t space = line.find(' ');
    int step;
    if (space == absl::string_view::npos || !absl::SimpleAtoi(line.substr(0, space), &step)) {
      continue;
    }
    line.remove_prefix(space + 1);
    if (!absl::ConsumePrefix(&line, "loss=")) continue;
    double loss;
    if (absl::SimpleAtod(line.substr(0, line.find(' ')), &loss)) losses.push_back(loss);
  }
  return losses;
}

std::map<std::string, std::string> KeyValueFields(absl::string_view line) {
  std::map<std::string, std::string> fields;
  for (absl::string_view field : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(field, absl::MaxSplits('=', 1));
    fields[kv.first] = kv.second;
  }
  return fields;
}

}  // namespace fsdp::testing
