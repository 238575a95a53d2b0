#include "optim_state/internal/flat_box.h"

#include <cstddef>

namespace fsdp::optim_state::internal {
namespace {

struct Decomposer {
  const std::vector<int64_t>& shape;
  std::vector<int64_t> strides;  // elements per step of each dimension
  std::vector<FlatBox> out;

  // A box fixed to `prefix` in the dimensions before `dim`, spanning [first, last) of `dim`
  // and whole after it; `base` is the flat index of the prefix's first element.
  void Emit(const std::vector<int64_t>& prefix, size_t dim, int64_t first, int64_t last,
            int64_t base) {
    FlatBox box;
    box.begin = base + first * strides[dim];
    box.numel = (last - first) * strides[dim];
    box.offsets = prefix;
    box.sizes.assign(prefix.size(), 1);
    box.offsets.push_back(first);
    box.sizes.push_back(last - first);
    for (size_t d = dim + 1; d < shape.size(); ++d) {
      box.offsets.push_back(0);
      box.sizes.push_back(shape[d]);
    }
    out.push_back(std::move(box));
  }

  // [b, e) relative to `base`, inside one block of dimension `dim` under `prefix`.
  void Split(std::vector<int64_t> prefix, size_t dim, int64_t b, int64_t e, int64_t base) {
    if (b >= e) return;
    const int64_t s = strides[dim];
    if (b % s == 0 && e % s == 0) return Emit(prefix, dim, b / s, e / s, base);
    const int64_t first = b / s, last = (e - 1) / s;
    auto inner = [&](int64_t index, int64_t lo, int64_t hi) {
      std::vector<int64_t> p = prefix;
      p.push_back(index);
      Split(std::move(p), dim + 1, lo, hi, base + index * s);
    };
    if (first == last) return inner(first, b - first * s, e - first * s);
    int64_t whole_begin = first;
    if (b % s != 0) {
      inner(first, b % s, s);
      whole_begin = first + 1;
    }
    const int64_t whole_end = e / s;
    if (whole_end > whole_begin) Emit(prefix, dim, whole_begin, whole_end, base);
    if (e % s != 0) inner(whole_end, 0, e % s);
  }
};

}  // namespace

std::vector<FlatBox> BoxesOfRange(const std::vector<int64_t>& shape, int64_t begin, int64_t end) {
  Decomposer d{shape, std::vector<int64_t>(shape.size(), 1), {}};
  for (size_t k = shape.size(); k-- > 1;) d.strides[k - 1] = d.strides[k] * shape[k];
  if (shape.empty() || begin >= end) return {};
  d.Split({}, 0, begin, end, 0);
  return d.out;
}

std::optional<int64_t> FlatBeginOfBox(const std::vector<int64_t>& shape,
                                      const std::vector<int64_t>& offsets,
                                      const std::vector<int64_t>& sizes) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel == 0) return 0;
  size_t first = 0;  // the first dimension of size > 1 (or the last one)
  while (first + 1 < sizes.size() && sizes[first] == 1) ++first;
  for (size_t d = first + 1; d < sizes.size(); ++d) {
    if (offsets[d] != 0 || sizes[d] != shape[d]) return std::nullopt;
  }
  int64_t begin = 0, stride = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    begin += offsets[d] * stride;
    stride *= shape[d];
  }
  return begin;
}

}  // namespace fsdp::optim_state::internal
