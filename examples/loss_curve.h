// WriteLossCurvePng: a line chart of training losses as a PNG file, for the
// main job's summary (no plotting library on this machine: a small rasteriser,
// a 5x7 bitmap font and zlib's deflate).
//
// The chart shows every series over a shared step axis (x) and loss axis (y)
// with tick labels, a legend and an optional dashed vertical marker (e.g. the
// step a checkpoint was saved at). Text is drawn in capitals.
//
// Errors: INVALID_ARGUMENT for no points at all, a non-finite value, or a size
// below 200x150; INTERNAL if the file cannot be written (naming it).
#ifndef FSDP_CPP_EXAMPLES_LOSS_CURVE_H_
#define FSDP_CPP_EXAMPLES_LOSS_CURVE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace fsdp::examples {

struct LossSeries {
  std::string label;
  uint32_t rgb = 0x1f77b4;  // 0xRRGGBB
  int thickness = 2;        // line width in pixels (a wide first series shows under a second)
  std::vector<std::pair<double, double>> points;  // (step, loss)
};

struct LossChartOptions {
  std::string title;
  int width = 800;
  int height = 480;
  std::optional<double> marker_step;  // dashed vertical line at this step
  std::string marker_label;
};

[[nodiscard]] absl::Status WriteLossCurvePng(const std::string& path,
                                             const std::vector<LossSeries>& series,
                                             const LossChartOptions& options = {});

}  // namespace fsdp::examples

#endif  // FSDP_CPP_EXAMPLES_LOSS_CURVE_H_
