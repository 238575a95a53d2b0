#include "checkpoint/dcp_layout.h"

#include <algorithm>
#include <optional>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace fsdp::checkpoint::dcp {
namespace {

std::string PathPrefix(const std::vector<std::string>& path) {
  return path.empty() ? std::string() : absl::StrCat(absl::StrJoin(path, "."), ".");
}

std::vector<PathElement> PathOf(const std::vector<std::string>& path) {
  return std::vector<PathElement>(path.begin(), path.end());
}

absl::StatusOr<std::vector<std::string>> ParsePath(absl::string_view text, absl::string_view spec) {
  std::vector<std::string> path;
  if (text.empty()) return path;
  for (absl::string_view part : absl::StrSplit(text, '.')) {
    if (part.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("DCP layout \"", spec, "\": the path \"", text, "\" has an empty part"));
    }
    path.emplace_back(part);
  }
  return path;
}

// The rest of `path` after `head`, or nullopt when it does not start with it.
std::optional<std::vector<PathElement>> PathAfter(const std::vector<PathElement>& path,
                                                  const std::vector<std::string>& head) {
  if (path.size() < head.size()) return std::nullopt;
  for (size_t i = 0; i < head.size(); ++i) {
    const auto* s = std::get_if<std::string>(&path[i]);
    if (s == nullptr || *s != head[i]) return std::nullopt;
  }
  return std::vector<PathElement>(path.begin() + static_cast<std::ptrdiff_t>(head.size()),
                                  path.end());
}

bool StartsUnder(const std::string& key, const std::vector<PathElement>* path,
                 const std::vector<std::string>& head) {
  if (path != nullptr) return PathAfter(*path, head).has_value();
  return absl::StartsWith(key, PathPrefix(head));
}

// An optimizer key's part after the optimizer's prefix, sorted into `keys`.
absl::Status AddOptimKey(const std::string& key, absl::string_view rest,
                         const std::vector<PathElement>* path, const DcpLayout& layout,
                         DcpStateKeys& keys,
                         std::map<int64_t, std::map<std::string, std::string>>& groups) {
  // With planner_data the path's elements are the dict keys themselves; without, the text
  // splits at the first '.' after the group index and the last '.' of a state key.
  if (path != nullptr) {
    const std::vector<PathElement> after = *PathAfter(*path, layout.optim_path);
    const auto* section = after.empty() ? nullptr : std::get_if<std::string>(&after[0]);
    if (after.size() == 3 && section != nullptr && *section == "state" &&
        std::holds_alternative<std::string>(after[1]) &&
        std::holds_alternative<std::string>(after[2])) {
      keys.optim_state[std::get<std::string>(after[1])][std::get<std::string>(after[2])] = key;
      return absl::OkStatus();
    }
    if (after.size() == 3 && section != nullptr && *section == "param_groups" &&
        std::holds_alternative<int64_t>(after[1]) &&
        std::holds_alternative<std::string>(after[2])) {
      groups[std::get<int64_t>(after[1])][std::get<std::string>(after[2])] = key;
      return absl::OkStatus();
    }
  } else if (absl::ConsumePrefix(&rest, "state.")) {
    const size_t dot = rest.rfind('.');
    if (dot != absl::string_view::npos && dot > 0 && dot + 1 < rest.size()) {
      keys.optim_state[std::string(rest.substr(0, dot))][std::string(rest.substr(dot + 1))] = key;
      return absl::OkStatus();
    }
  } else if (absl::ConsumePrefix(&rest, "param_groups.")) {
    const size_t dot = rest.find('.');
    int64_t g = -1;
    if (dot != absl::string_view::npos && dot + 1 < rest.size() &&
        absl::SimpleAtoi(rest.substr(0, dot), &g) && g >= 0) {
      groups[g][std::string(rest.substr(dot + 1))] = key;
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("key \"", key, "\" is under the optimizer's path \"", layout.OptimPrefix(),
                   "\" but is neither state.<fqn>.<name> nor param_groups.<group>.<name>"));
}

int64_t Product(const std::vector<int64_t>& shape, size_t from) {
  int64_t n = 1;
  for (size_t d = from; d < shape.size(); ++d) n *= shape[d];
  return n;
}

// Appends the boxes of [b, e) (b < e) of the sub-tensor whose first `prefix.size()` indices
// are `prefix`: a partial first row, the whole rows between, a partial last row.
void AppendBoxes(const std::vector<int64_t>& shape, std::vector<int64_t>& prefix, int64_t b,
                 int64_t e, std::vector<ChunkStorageMetadata>& out) {
  const size_t dim = prefix.size();
  if (dim == shape.size()) {  // a 0-dim tensor's one element
    out.push_back({prefix, std::vector<int64_t>(dim, 1)});
    return;
  }
  const int64_t stride = Product(shape, dim + 1);
  const int64_t first = b / stride, last = (e - 1) / stride;
  const int64_t head = b % stride, tail = e % stride;
  auto rows = [&](int64_t r0, int64_t r1) {
    ChunkStorageMetadata box{prefix, std::vector<int64_t>(dim, 1)};
    box.offsets.push_back(r0);
    box.sizes.push_back(r1 - r0);
    for (size_t d = dim + 1; d < shape.size(); ++d) {
      box.offsets.push_back(0);
      box.sizes.push_back(shape[d]);
    }
    out.push_back(std::move(box));
  };
  auto within = [&](int64_t row, int64_t rb, int64_t re) {
    prefix.push_back(row);
    AppendBoxes(shape, prefix, rb, re, out);
    prefix.pop_back();
  };
  if (first == last && (head != 0 || tail != 0)) {  // inside one row, not all of it
    within(first, head, e - first * stride);
    return;
  }
  int64_t whole_begin = first, whole_end = last + 1;
  if (head != 0) {
    within(first, head, stride);
    whole_begin = first + 1;
  }
  if (tail != 0) whole_end = last;
  if (whole_end > whole_begin) rows(whole_begin, whole_end);
  if (tail != 0) within(last, 0, tail);
}

}  // namespace

std::string DcpLayout::ModelPrefix() const { return PathPrefix(model_path); }
std::string DcpLayout::OptimPrefix() const { return PathPrefix(optim_path); }

std::string DcpLayout::Describe() const {
  if (name == "torchtitan") return "torchtitan's {\"model\", \"optimizer\"}";
  if (name == "tutorial") return "the DCP tutorial's {\"app\": {\"model\", \"optim\"}}";
  return absl::StrCat("model under \"", absl::StrJoin(model_path, "."), "\", optimizer under \"",
                      absl::StrJoin(optim_path, "."), "\"");
}

DcpLayout TorchtitanLayout() { return {"torchtitan", {"model"}, {"optimizer"}}; }
DcpLayout TutorialLayout() { return {"tutorial", {"app", "model"}, {"app", "optim"}}; }

absl::StatusOr<DcpLayout> ParseDcpLayout(absl::string_view spec) {
  if (spec == "torchtitan") return TorchtitanLayout();
  if (spec == "tutorial" || spec == "app") return TutorialLayout();
  absl::string_view model, optim;
  const std::vector<absl::string_view> parts = absl::StrSplit(spec, ',');
  if (parts.size() != 2 || !absl::StartsWith(parts[0], "model=") ||
      !absl::StartsWith(parts[1], "optim=")) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCP layout \"", spec,
                     "\": expected torchtitan, tutorial or model=PATH,optim=PATH (dotted paths)"));
  }
  model = parts[0].substr(6);
  optim = parts[1].substr(6);
  DcpLayout layout{"custom", {}, {}};
  auto m = ParsePath(model, spec);
  if (!m.ok()) return m.status();
  auto o = ParsePath(optim, spec);
  if (!o.ok()) return o.status();
  layout.model_path = *std::move(m);
  layout.optim_path = *std::move(o);
  if (!layout.optim_path.empty() && layout.optim_path == layout.model_path) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCP layout \"", spec, "\": model and optimizer have the same path"));
  }
  return layout;
}

absl::StatusOr<DcpLayout> DetectDcpLayout(const Metadata& metadata, const std::string& file) {
  for (const DcpLayout& layout : {TorchtitanLayout(), TutorialLayout()}) {
    const std::string prefix = layout.ModelPrefix();
    for (const auto& [key, unused] : metadata.state_dict_metadata) {
      if (absl::StartsWith(key, prefix)) return layout;
    }
  }
  std::set<std::string> top;
  for (const auto& [key, unused] : metadata.state_dict_metadata) {
    top.insert(std::string(key.substr(0, key.find('.'))));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      file,
      ": no known layout of model and optimizer state fits this DCP checkpoint: no key "
      "starts with \"model.\" (torchtitan's {\"model\", \"optimizer\"}) or \"app.model.\" "
      "(the DCP tutorial's {\"app\": {\"model\", \"optim\"}}); its top-level keys are [",
      absl::StrJoin(top, ", "), "]. Name the layout: model=PATH,optim=PATH"));
}

DcpKey DcpModelKey(const DcpLayout& layout, absl::string_view fqn) {
  DcpKey k{absl::StrCat(layout.ModelPrefix(), fqn), PathOf(layout.model_path)};
  k.path.emplace_back(std::string(fqn));
  return k;
}

DcpKey DcpOptimStateKey(const DcpLayout& layout, absl::string_view fqn, absl::string_view name) {
  DcpKey k{absl::StrCat(layout.OptimPrefix(), "state.", fqn, ".", name), PathOf(layout.optim_path)};
  k.path.emplace_back(std::string("state"));
  k.path.emplace_back(std::string(fqn));
  k.path.emplace_back(std::string(name));
  return k;
}

DcpKey DcpParamGroupKey(const DcpLayout& layout, int64_t group, absl::string_view hyper_param) {
  DcpKey k{absl::StrCat(layout.OptimPrefix(), "param_groups.", group, ".", hyper_param),
           PathOf(layout.optim_path)};
  k.path.emplace_back(std::string("param_groups"));
  k.path.emplace_back(group);
  k.path.emplace_back(std::string(hyper_param));
  return k;
}

absl::StatusOr<DcpStateKeys> SplitDcpKeys(const Metadata& metadata, const DcpLayout& layout,
                                          const std::string& file) {
  DcpStateKeys keys;
  std::map<int64_t, std::map<std::string, std::string>> groups;
  const std::string model_prefix = layout.ModelPrefix();
  const std::string optim_prefix = layout.OptimPrefix();
  for (const auto& [key, unused] : metadata.state_dict_metadata) {
    const auto planned = metadata.planner_data.find(key);
    const std::vector<PathElement>* path =
        planned == metadata.planner_data.end() ? nullptr : &planned->second;
    // The optimizer first: a bare model's empty prefix takes every key.
    if (layout.has_optimizer() && StartsUnder(key, path, layout.optim_path)) {
      absl::string_view rest(key);
      rest.remove_prefix(std::min(rest.size(), optim_prefix.size()));
      absl::Status s = AddOptimKey(key, rest, path, layout, keys, groups);
      if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(file, ": ", s.message()));
    } else if (StartsUnder(key, path, layout.model_path) && key.size() > model_prefix.size()) {
      keys.model[key.substr(model_prefix.size())] = key;
    } else {
      keys.other.push_back(key);
    }
  }
  int64_t expected = 0;
  for (auto& [g, entries] : groups) {
    if (g != expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          file, ": the optimizer's param_groups have no group ", expected, " but a group ", g));
    }
    keys.param_groups.push_back(std::move(entries));
    ++expected;
  }
  return keys;
}

absl::StatusOr<std::vector<ChunkStorageMetadata>> FlatRangeToBoxes(
    const std::vector<int64_t>& shape, int64_t begin, int64_t end) {
  const int64_t numel = Product(shape, 0);
  if (begin < 0 || begin > end || end > numel) {
    return absl::InvalidArgumentError(absl::StrCat("flat range [", begin, ", ", end,
                                                   ") is not within a tensor of shape ",
                                                   ShapeString(shape), " (", numel, " elements)"));
  }
  std::vector<ChunkStorageMetadata> out;
  if (begin == end) return out;
  std::vector<int64_t> prefix;
  AppendBoxes(shape, prefix, begin, end, out);
  return out;
}

}  // namespace fsdp::checkpoint::dcp
