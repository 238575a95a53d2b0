#include "examples/loss_curve.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tools/python_testutil.h"

namespace fsdp::examples {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

std::string TmpPath(const std::string& name) {
  return std::string(std::getenv("TEST_TMPDIR")) + "/" + name;
}

// Decodes `png` with testdata/read_png.py (Python's zlib): size and pixel count
// per colour.
nlohmann::json DecodePng(const std::string& png) {
  const std::string script =
      std::string(std::getenv("TEST_SRCDIR")) + "/fsdp_cpp/examples/testdata/read_png.py";
  const std::string out = png + ".json";
  const std::string command = fsdp::testing::PythonCommand() + " '" + script + "' '" + png + "' > '" + out + "'";
  if (std::system(command.c_str()) != 0) {
    ADD_FAILURE() << command << " failed";
    return {};
  }
  FILE* file = std::fopen(out.c_str(), "r");
  std::string text;
  char buffer[4096];
  for (size_t n; (n = std::fread(buffer, 1, sizeof(buffer), file)) > 0;) text.append(buffer, n);
  std::fclose(file);
  return nlohmann::json::parse(text);
}

TEST(WriteLossCurvePng, DrawsEverySeriesInItsColourOnAValidPng) {
  LossSeries falling{.label = "uninterrupted", .rgb = 0x1f77b4};
  LossSeries resumed{.label = "resumed (3 ranks)", .rgb = 0xd62728};
  for (int step = 0; step < 100; ++step) {
    falling.points.emplace_back(step, 4.0 * std::exp(-step / 30.0) + 1.0);
    if (step >= 50) resumed.points.emplace_back(step, 4.0 * std::exp(-step / 30.0) + 1.05);
  }
  const std::string path = TmpPath("curve.png");
  ASSERT_TRUE(WriteLossCurvePng(path, {falling, resumed},
                                {.title = "char LM",
                                 .width = 640,
                                 .height = 400,
                                 .marker_step = 50,
                                 .marker_label = "checkpoint"})
                  .ok());
  const nlohmann::json decoded = DecodePng(path);
  ASSERT_FALSE(decoded.is_null());
  EXPECT_EQ(decoded["width"], 640);
  EXPECT_EQ(decoded["height"], 400);
  const auto& colors = decoded["colors"];
  // Lines are 2 pixels wide over hundreds of pixels; the legend adds a swatch.
  EXPECT_GT(colors.value("1f77b4", 0), 500);
  EXPECT_GT(colors.value("d62728", 0), 250);
  EXPECT_GT(colors.value("ffffff", 0), 640 * 400 / 2);  // mostly background
  EXPECT_GT(colors.value("222222", 0), 100);            // labels and title
}

TEST(WriteLossCurvePng, RefusesNonFinitePointsAndEmptyCharts) {
  LossSeries bad{.label = "bad", .points = {{0, 1.0}, {1, std::nan("")}}};
  EXPECT_THAT(WriteLossCurvePng(TmpPath("bad.png"), {bad}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("series 'bad' has a non-finite point")));
  EXPECT_THAT(WriteLossCurvePng(TmpPath("empty.png"), {LossSeries{.label = "empty"}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no points to draw")));
  EXPECT_THAT(WriteLossCurvePng(TmpPath("tiny.png"), {bad}, {.width = 100, .height = 100}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("smaller than 200x150")));
}

TEST(WriteLossCurvePng, NamesTheFileItCannotWrite) {
  LossSeries one{.label = "one", .points = {{0, 1.0}, {1, 0.5}}};
  EXPECT_THAT(WriteLossCurvePng("/nonexistent-dir/curve.png", {one}),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("/nonexistent-dir/curve.png")));
}

}  // namespace
}  // namespace fsdp::examples
