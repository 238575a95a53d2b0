// GradientDivideFactors against PyTorch 2.13 itself: FSDP1's own initialisation
// (`_init_process_group_state`, run by tools/python on testdata/gradient_divide_factors.py)
// gives the same two factors for every world size from 1 to 8 and every sharding strategy.
#include "fsdp/gradient_divide.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <map>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp {
namespace {

using ::fsdp::testing::CommandResult;
using ::fsdp::testing::PythonCommand;
using ::fsdp::testing::RunCommand;
using ::fsdp::testing::Runfile;

constexpr int kMaxWorldSize = 8;

TEST(GradientDivideFactorsTest, EqualPyTorchFsdp1sForWorldSizes1To8) {
  const CommandResult py = RunCommand(
      absl::StrCat(PythonCommand(), " ", Runfile("fsdp/testdata/gradient_divide_factors.py"), " ",
                   kMaxWorldSize));
  ASSERT_EQ(py.exit_code, 0) << py.output;
  int checked = 0;
  for (absl::string_view line : absl::StrSplit(py.output, '\n')) {
    if (!absl::ConsumePrefix(&line, "factors ")) continue;
    std::map<std::string, std::string> f = ::fsdp::testing::KeyValueFields(line);
    int world_size = 0;
    ASSERT_TRUE(absl::SimpleAtoi(f["world_size"], &world_size)) << line;
    // Hexadecimal floats: exact.
    const double predivide = std::strtod(f["predivide"].c_str(), nullptr);
    const double postdivide = std::strtod(f["postdivide"].c_str(), nullptr);
    absl::StatusOr<GradientDivideFactors> ours = GradientDivideFactorsFor(world_size);
    ASSERT_TRUE(ours.ok()) << ours.status();
    EXPECT_EQ(ours->predivide, predivide) << line;
    EXPECT_EQ(ours->postdivide, postdivide) << line;
    std::printf("%s: ours %g, %g\n", std::string(line).c_str(), ours->predivide, ours->postdivide);
    ++checked;
  }
  EXPECT_EQ(checked, 3 * kMaxWorldSize) << py.output;  // three strategies
}

TEST(GradientDivideFactorsTest, RefusesAWorldSizeBelowOne) {
  for (int world_size : {0, -2}) {
    absl::StatusOr<GradientDivideFactors> factors = GradientDivideFactorsFor(world_size);
    EXPECT_EQ(factors.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(factors.status().message()), ::testing::HasSubstr("world size"));
  }
}

TEST(DivideIfNeededTest, DividesInPlaceOnlyByAFactorAboveOne) {
  at::Tensor grad = at::tensor({3.0f, -1.0f, 0.1f});
  const at::Tensor before = grad.clone();
  const void* data = grad.data_ptr();
  DivideIfNeeded(grad, 1.0);
  EXPECT_TRUE(at::equal(grad, before));
  DivideIfNeeded(grad, 1.5);
  EXPECT_EQ(grad.data_ptr(), data);
  EXPECT_TRUE(at::equal(grad, before / 1.5));
}

}  // namespace
}  // namespace fsdp
