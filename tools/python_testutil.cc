#include "tools/python_testutil.h"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <regex>

#include "absl/strings/str_cat.h"

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

std::vector<double> StepLosses(const std::string& output) {
  std::vector<double> losses;
  static const std::regex kLine(R"((^|\n)step=(\d+) loss=([-+0-9.eE]+|nan|inf))");
  for (auto it = std::sregex_iterator(output.begin(), output.end(), kLine);
       it != std::sregex_iterator(); ++it) {
    losses.push_back(std::stod((*it)[3].str()));
  }
  return losses;
}

}  // namespace fsdp::testing
