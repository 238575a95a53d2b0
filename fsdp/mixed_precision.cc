#include "fsdp/mixed_precision.h"

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace fsdp {
namespace {

absl::Status CheckFloating(const char* field, const std::optional<at::ScalarType>& dtype) {
  if (!dtype.has_value() || at::isFloatingType(*dtype)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "MixedPrecision.", field, " must be a floating-point dtype, got ", c10::toString(*dtype)));
}

// PyTorch's name (torch.bfloat16 prints "torch.bfloat16").
std::string DtypeName(const std::optional<at::ScalarType>& dtype) {
  if (!dtype.has_value()) return "none";
  switch (*dtype) {
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    default:
      return absl::AsciiStrToLower(c10::toString(*dtype));
  }
}

}  // namespace

absl::Status ValidateMixedPrecision(const MixedPrecision& mixed_precision) {
  if (absl::Status s = CheckFloating("param_dtype", mixed_precision.param_dtype); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckFloating("reduce_dtype", mixed_precision.reduce_dtype); !s.ok()) {
    return s;
  }
  return CheckFloating("buffer_dtype", mixed_precision.buffer_dtype);
}

absl::StatusOr<at::ScalarType> ParseFloatDtype(absl::string_view text) {
  const std::string name = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "half") return at::kHalf;
  if (name == "fp32" || name == "float32" || name == "float") return at::kFloat;
  if (name == "fp64" || name == "float64" || name == "double") return at::kDouble;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown floating-point dtype '", text, "' (bf16, fp16, fp32 or fp64)"));
}

absl::StatusOr<MixedPrecision> ParseMixedPrecision(absl::string_view text) {
  MixedPrecision out;
  if (text.empty() || text == "none") return out;
  const std::vector<absl::string_view> fields = absl::StrSplit(text, ',');
  if (fields.size() > 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("mixed precision '", text, "': at most PARAM,REDUCE,BUFFER (three dtypes)"));
  }
  std::optional<at::ScalarType>* targets[] = {&out.param_dtype, &out.reduce_dtype,
                                              &out.buffer_dtype};
  for (size_t i = 0; i < fields.size(); ++i) {
    if (fields[i].empty()) continue;
    absl::StatusOr<at::ScalarType> dtype = ParseFloatDtype(fields[i]);
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("mixed precision '", text, "': ", dtype.status().message()));
    }
    *targets[i] = *dtype;
  }
  return out;
}

std::string DescribeMixedPrecision(const MixedPrecision& mixed_precision) {
  return absl::StrCat("param_dtype=", DtypeName(mixed_precision.param_dtype),
                      " reduce_dtype=", DtypeName(mixed_precision.reduce_dtype),
                      " buffer_dtype=", DtypeName(mixed_precision.buffer_dtype));
}

}  // namespace fsdp
