#include "examples/loss_curve.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace fsdp::examples {
namespace {

// 5x7 glyphs: 7 rows, each the low 5 bits (bit 4 = leftmost column).
struct Glyph {
  char c;
  std::array<uint8_t, 7> rows;
};
constexpr Glyph kFont[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}},
    {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}},
    {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}},
    {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}},
    {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}},
    {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}},
    {',', {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08}},
    {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}},
    {'=', {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00}},
    {':', {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
    {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}},
    {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F}},
    {'A', {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}},
    {'D', {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C}},
    {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}},
    {'F', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}},
    {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C}},
    {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}},
    {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}},
    {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}},
    {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}},
    {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}},
    {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}},
    {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}},
    {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}},
    {'X', {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11}},
    {'Y', {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}},
    {'Z', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F}},
};

const Glyph* FindGlyph(char c) {
  c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const Glyph& glyph : kFont) {
    if (glyph.c == c) return &glyph;
  }
  return nullptr;  // space and anything unknown draw nothing
}

class Canvas {
 public:
  Canvas(int width, int height)
      : width_(width), height_(height), pixels_(static_cast<size_t>(width) * height * 3, 255) {}

  void Set(int x, int y, uint32_t rgb) {
    if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
    uint8_t* p = &pixels_[(static_cast<size_t>(y) * width_ + x) * 3];
    p[0] = static_cast<uint8_t>(rgb >> 16);
    p[1] = static_cast<uint8_t>(rgb >> 8);
    p[2] = static_cast<uint8_t>(rgb);
  }

  void FillRect(int x0, int y0, int x1, int y1, uint32_t rgb) {
    for (int y = std::min(y0, y1); y <= std::max(y0, y1); ++y) {
      for (int x = std::min(x0, x1); x <= std::max(x0, x1); ++x) Set(x, y, rgb);
    }
  }

  // A line `thickness` pixels wide; dashed draws 6 on, 4 off.
  void Line(double x0, double y0, double x1, double y1, uint32_t rgb, int thickness = 1,
            bool dashed = false) {
    const double length = std::hypot(x1 - x0, y1 - y0);
    const int steps = std::max(1, static_cast<int>(std::ceil(length * 2)));
    for (int i = 0; i <= steps; ++i) {
      if (dashed && (i / 2) % 10 >= 6) continue;
      const double t = static_cast<double>(i) / steps;
      const int x = static_cast<int>(std::lround(x0 + (x1 - x0) * t));
      const int y = static_cast<int>(std::lround(y0 + (y1 - y0) * t));
      const int lo = -(thickness - 1) / 2;
      FillRect(x + lo, y + lo, x + lo + thickness - 1, y + lo + thickness - 1, rgb);
    }
  }

  // Text with its top-left corner at (x, y); each glyph cell is 6x8 pixels
  // times `scale`.
  void Text(int x, int y, std::string_view text, uint32_t rgb, int scale = 1) {
    for (char c : text) {
      if (const Glyph* glyph = FindGlyph(c)) {
        for (int row = 0; row < 7; ++row) {
          for (int col = 0; col < 5; ++col) {
            if (glyph->rows[row] & (0x10 >> col)) {
              FillRect(x + col * scale, y + row * scale, x + col * scale + scale - 1,
                       y + row * scale + scale - 1, rgb);
            }
          }
        }
      }
      x += 6 * scale;
    }
  }

  static int TextWidth(std::string_view text, int scale = 1) {
    return static_cast<int>(text.size()) * 6 * scale;
  }

  int width() const { return width_; }
  int height() const { return height_; }
  const std::vector<uint8_t>& pixels() const { return pixels_; }

 private:
  int width_;
  int height_;
  std::vector<uint8_t> pixels_;
};

void AppendBigEndian32(std::string& out, uint32_t value) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>(value >> shift));
}

void AppendChunk(std::string& out, const char type[4], const std::string& data) {
  AppendBigEndian32(out, static_cast<uint32_t>(data.size()));
  std::string body(type, 4);
  body += data;
  out += body;
  AppendBigEndian32(out, static_cast<uint32_t>(
                             crc32(0, reinterpret_cast<const Bytef*>(body.data()), body.size())));
}

absl::StatusOr<std::string> EncodePng(const Canvas& canvas) {
  std::string raw;
  raw.reserve(static_cast<size_t>(canvas.height()) * (canvas.width() * 3 + 1));
  for (int y = 0; y < canvas.height(); ++y) {
    raw.push_back(0);  // filter: none
    raw.append(reinterpret_cast<const char*>(
                   &canvas.pixels()[static_cast<size_t>(y) * canvas.width() * 3]),
               static_cast<size_t>(canvas.width()) * 3);
  }
  uLongf compressed_size = compressBound(raw.size());
  std::string compressed(compressed_size, '\0');
  if (compress2(reinterpret_cast<Bytef*>(compressed.data()), &compressed_size,
                reinterpret_cast<const Bytef*>(raw.data()), raw.size(), 9) != Z_OK) {
    return absl::InternalError("WriteLossCurvePng: zlib's compress2 failed");
  }
  compressed.resize(compressed_size);
  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string header;
  AppendBigEndian32(header, static_cast<uint32_t>(canvas.width()));
  AppendBigEndian32(header, static_cast<uint32_t>(canvas.height()));
  header += std::string("\x08\x02\x00\x00\x00",
                        5);  // 8-bit RGB, deflate, no interlace
  AppendChunk(png, "IHDR", header);
  AppendChunk(png, "IDAT", compressed);
  AppendChunk(png, "IEND", "");
  return png;
}

// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving about `count`
// ticks.
double TickSpacing(double range, int count) {
  const double raw = range / std::max(1, count);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  for (double factor : {1.0, 2.0, 5.0, 10.0}) {
    if (factor * magnitude >= raw) return factor * magnitude;
  }
  return 10 * magnitude;
}

std::string FormatTick(double value, double spacing) {
  const int decimals = spacing >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(spacing)));
  return absl::StrFormat("%.*f", decimals, value);
}

}  // namespace

absl::Status WriteLossCurvePng(const std::string& path, const std::vector<LossSeries>& series,
                               const LossChartOptions& options) {
  if (options.width < 200 || options.height < 150) {
    return absl::InvalidArgumentError(
        absl::StrFormat("WriteLossCurvePng(%s): %dx%d is smaller than 200x150", path, options.width,
                        options.height));
  }
  double x_min = std::numeric_limits<double>::infinity(), x_max = -x_min;
  double y_min = x_min, y_max = -x_min;
  for (const LossSeries& s : series) {
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y)) {
        return absl::InvalidArgumentError(absl::StrCat("WriteLossCurvePng(", path, "): series '",
                                                       s.label, "' has a non-finite point"));
      }
      x_min = std::min(x_min, x);
      x_max = std::max(x_max, x);
      y_min = std::min(y_min, y);
      y_max = std::max(y_max, y);
    }
  }
  if (!std::isfinite(x_min)) {
    return absl::InvalidArgumentError(
        absl::StrCat("WriteLossCurvePng(", path, "): no points to draw"));
  }
  if (x_max == x_min) x_max = x_min + 1;
  if (y_max == y_min) y_max = y_min + 1;
  const double y_pad = (y_max - y_min) * 0.05;
  y_min -= y_pad;
  y_max += y_pad;

  Canvas canvas(options.width, options.height);
  const int left = 70, right = options.width - 20, top = 40, bottom = options.height - 50;
  auto to_x = [&](double x) { return left + (x - x_min) / (x_max - x_min) * (right - left); };
  auto to_y = [&](double y) { return bottom - (y - y_min) / (y_max - y_min) * (bottom - top); };
  constexpr uint32_t kAxis = 0x333333, kGrid = 0xE5E5E5, kText = 0x222222;

  // Grid, ticks and labels.
  const double y_spacing = TickSpacing(y_max - y_min, 6);
  for (double y = std::ceil(y_min / y_spacing) * y_spacing; y <= y_max; y += y_spacing) {
    const double py = to_y(y);
    canvas.Line(left, py, right, py, kGrid);
    const std::string label = FormatTick(y, y_spacing);
    canvas.Text(left - 8 - Canvas::TextWidth(label), static_cast<int>(py) - 3, label, kText);
  }
  const double x_spacing = TickSpacing(x_max - x_min, 8);
  for (double x = std::ceil(x_min / x_spacing) * x_spacing; x <= x_max; x += x_spacing) {
    const double px = to_x(x);
    canvas.Line(px, top, px, bottom, kGrid);
    const std::string label = FormatTick(x, x_spacing);
    canvas.Text(static_cast<int>(px) - Canvas::TextWidth(label) / 2, bottom + 8, label, kText);
  }
  canvas.Line(left, bottom, right, bottom, kAxis);
  canvas.Line(left, top, left, bottom, kAxis);
  canvas.Text((left + right) / 2 - Canvas::TextWidth("STEP") / 2, bottom + 24, "STEP", kText);
  canvas.Text(8, top - 16, "LOSS", kText);
  canvas.Text(left, 12, options.title, kText, 2);

  if (options.marker_step) {
    const double px = to_x(*options.marker_step);
    canvas.Line(px, top, px, bottom, 0x888888, 1, /*dashed=*/true);
    canvas.Text(static_cast<int>(px) + 4, top + 4, options.marker_label, 0x666666);
  }

  // Series, then the legend in the top-right corner.
  for (const LossSeries& s : series) {
    for (size_t i = 1; i < s.points.size(); ++i) {
      canvas.Line(to_x(s.points[i - 1].first), to_y(s.points[i - 1].second),
                  to_x(s.points[i].first), to_y(s.points[i].second), s.rgb,
                  std::clamp(s.thickness, 1, 9));
    }
    if (s.points.size() == 1) {
      const double px = to_x(s.points[0].first), py = to_y(s.points[0].second);
      canvas.FillRect(px - 2, py - 2, px + 2, py + 2, s.rgb);
    }
  }
  int legend_y = top + 8;
  for (const LossSeries& s : series) {
    const int text_width = Canvas::TextWidth(s.label);
    const int x = right - 30 - text_width;
    canvas.FillRect(x, legend_y + 2, x + 20, legend_y + 4, s.rgb);
    canvas.Text(x + 26, legend_y, s.label, kText);
    legend_y += 14;
  }

  absl::StatusOr<std::string> png = EncodePng(canvas);
  if (!png.ok()) return png.status();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(png->data(), static_cast<std::streamsize>(png->size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("WriteLossCurvePng: cannot write ", path));
  return absl::OkStatus();
}

}  // namespace fsdp::examples
