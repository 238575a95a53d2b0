#include "tools/python_testutil.h"

#include <cstdlib>

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

}  // namespace fsdp::testing
