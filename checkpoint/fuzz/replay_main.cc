// main() for a fuzz target's replay test (fsdp_cc_fuzz_test in //tools:fsdp.bzl): runs every
// file named on the command line (a directory: every file in it) once through the target's
// LLVMFuzzerTestOneInput, as one GoogleTest case per file, under the ordinary gcc build and the
// asan / ubsan configs. A crash, a sanitizer report or an abort from the target's own checks
// fails the case; a target returning non-zero fails it too.
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gtest/gtest.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

class ReplayTest : public testing::Test {
 public:
  explicit ReplayTest(std::string path) : path_(std::move(path)) {}
  void TestBody() override {
    std::ifstream in(path_, std::ios::binary);
    ASSERT_TRUE(in) << "cannot read " << path_;
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()),
              0)
        << path_;
  }

 private:
  std::string path_;
};

// GoogleTest names: letters, digits and '_' only.
std::string TestName(const std::string& path) {
  std::string name = std::filesystem::path(path).filename().string();
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    if (std::filesystem::is_directory(argv[i])) {
      for (const auto& entry : std::filesystem::directory_iterator(argv[i])) {
        if (entry.is_regular_file()) files.push_back(entry.path().string());
      }
    } else {
      files.push_back(argv[i]);
    }
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::fprintf(stderr, "replay: no corpus files given; usage: %s FILE_OR_DIR...\n", argv[0]);
    return 1;
  }
  for (const std::string& path : files) {
    testing::RegisterTest("Corpus", TestName(path).c_str(), nullptr, path.c_str(), __FILE__,
                          __LINE__, [path]() -> testing::Test* { return new ReplayTest(path); });
  }
  return RUN_ALL_TESTS();
}
