#include "checkpoint/key_prefixes.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace fsdp::checkpoint {
namespace {

using optim_state::OptimStateDict;
using optim_state::ParamKey;
using optim_state::ParamState;

absl::Status CheckPrefix(const std::string& prefix) {
  if (prefix.empty() || prefix.back() != '.' || prefix.front() == '.' ||
      absl::StrContains(prefix, "..")) {
    return absl::InvalidArgumentError(
        absl::StrCat("key prefix \"", prefix,
                     "\" is not one or more names each followed by '.' (e.g. \"module.\")"));
  }
  return absl::OkStatus();
}

absl::Status CheckPrefixes(const KeyPrefixes& prefixes) {
  for (const auto* list : {&prefixes.leading, &prefixes.levels}) {
    for (const std::string& prefix : *list) {
      if (absl::Status status = CheckPrefix(prefix); !status.ok()) return status;
    }
  }
  return absl::OkStatus();
}

void AddOnce(std::vector<std::string>& list, std::string item) {
  if (std::find(list.begin(), list.end(), item) == list.end()) list.push_back(std::move(item));
}

// `key` without `level` wherever it starts a component.
std::string RemoveLevel(std::string key, const std::string& level) {
  size_t pos = key.find(level);
  while (pos != std::string::npos) {
    if (pos == 0 || key[pos - 1] == '.') {
      key.erase(pos, level.size());
      pos = key.find(level, pos);
    } else {
      pos = key.find(level, pos + 1);
    }
  }
  return key;
}

// Rewrites keys of one file and remembers which key became which name, to refuse collisions.
class Rewriter {
 public:
  Rewriter(const KeyPrefixes& prefixes, absl::string_view file)
      : prefixes_(prefixes), file_(file) {}

  // The name `key` stands for among `names`, or INVALID_ARGUMENT naming `where` and `key`.
  absl::StatusOr<std::string> Rewrite(const std::string& key,
                                      const absl::flat_hash_set<std::string>& names,
                                      const absl::flat_hash_set<std::string>* more_names,
                                      absl::string_view where, absl::string_view what) {
    auto known = [&](const std::string& name) {
      return names.contains(name) || (more_names != nullptr && more_names->contains(name));
    };
    std::string name = key;
    if (!known(name)) {
      for (const std::string& level : prefixes_.levels) name = RemoveLevel(std::move(name), level);
      while (!known(name)) {
        const auto leading =
            std::find_if(prefixes_.leading.begin(), prefixes_.leading.end(),
                         [&](const std::string& prefix) { return absl::StartsWith(name, prefix); });
        if (leading == prefixes_.leading.end()) break;
        name.erase(0, leading->size());
      }
    }
    if (!known(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_, ": ", where, "\"", key, "\" names no ", what, " of the model",
                       name != key ? absl::StrCat(" (stripped to \"", name, "\")") : "",
                       "; key prefixes stripped: ", KeyPrefixesToString(prefixes_),
                       ". If a wrapper added a prefix to the keys, name it to be stripped"));
    }
    const auto [it, inserted] = sources_.emplace(name, key);
    if (!inserted && it->second != key) {
      return absl::InvalidArgumentError(absl::StrCat(file_, ": keys \"", it->second, "\" and \"",
                                                     key, "\" both name \"", name,
                                                     "\" once key prefixes are stripped"));
    }
    return name;
  }

 private:
  const KeyPrefixes& prefixes_;
  const absl::string_view file_;
  absl::flat_hash_map<std::string, std::string> sources_;  // name -> the key that became it
};

}  // namespace

KeyPrefixes PyTorchKeyPrefixes() {
  return {.leading = {"module."},
          .levels = {"_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."}};
}

absl::StatusOr<KeyPrefixes> ParseKeyPrefixes(absl::string_view spec) {
  KeyPrefixes prefixes;
  for (absl::string_view item : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    if (item == "pytorch") {
      const KeyPrefixes pytorch = PyTorchKeyPrefixes();
      for (const std::string& p : pytorch.leading) AddOnce(prefixes.leading, p);
      for (const std::string& p : pytorch.levels) AddOnce(prefixes.levels, p);
      continue;
    }
    const bool level = absl::StartsWith(item, ".");
    std::string prefix(level ? item.substr(1) : item);
    if (!CheckPrefix(prefix).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key prefixes \"", spec, "\": cannot read \"", item,
          "\"; each item is pytorch, PREFIX. (removed from the start of keys) or .LEVEL. "
          "(removed wherever it stands in a key), e.g. \"pytorch,net.\""));
    }
    AddOnce(level ? prefixes.levels : prefixes.leading, std::move(prefix));
  }
  return prefixes;
}

std::string KeyPrefixesToString(const KeyPrefixes& prefixes) {
  if (prefixes.empty()) return "none";
  std::vector<std::string> items = prefixes.leading;
  for (const std::string& level : prefixes.levels) items.push_back(absl::StrCat(".", level));
  return absl::StrJoin(items, ",");
}

ModelNames ModelNames::Of(const torch::nn::Module& model) {
  ModelNames names;
  for (const auto& param : model.named_parameters()) names.parameters.insert(param.key());
  for (const auto& buffer : model.named_buffers()) names.buffers.insert(buffer.key());
  return names;
}

absl::StatusOr<ModelStateDict> StripKeyPrefixes(ModelStateDict dict, const KeyPrefixes& prefixes,
                                                const ModelNames& names, absl::string_view file) {
  if (absl::Status status = CheckPrefixes(prefixes); !status.ok()) return status;
  Rewriter rewriter(prefixes, file);
  for (auto& [key, tensor] : dict) {
    absl::StatusOr<std::string> name =
        rewriter.Rewrite(key, names.parameters, &names.buffers, "key ", "parameter or buffer");
    if (!name.ok()) return name.status();
    key = *std::move(name);
  }
  return dict;
}

absl::StatusOr<OptimStateDict> StripKeyPrefixes(OptimStateDict dict, const KeyPrefixes& prefixes,
                                                const ModelNames& names, absl::string_view file) {
  if (absl::Status status = CheckPrefixes(prefixes); !status.ok()) return status;
  auto refuse_id = [&](const ParamKey& key, absl::string_view where) {
    return absl::InvalidArgumentError(absl::StrCat(
        file, ": ", where, key.ToString(),
        " is a parameter ID; key prefixes are stripped from a dict keyed by parameter names "
        "(FSDP's full_optim_state_dict layout; optim_state/rekey.h makes one)"));
  };
  Rewriter rewriter(prefixes, file);
  optim_state::OrderedMap<ParamKey, ParamState> state;
  for (const auto& [key, param_state] : dict.state) {
    if (key.is_id()) return refuse_id(key, "state key ");
    absl::StatusOr<std::string> name =
        rewriter.Rewrite(key.fqn(), names.parameters, nullptr, "state key ", "parameter");
    if (!name.ok()) return name.status();
    state.Set(ParamKey::Fqn(*std::move(name)), param_state);
  }
  dict.state = std::move(state);
  for (size_t g = 0; g < dict.param_groups.size(); ++g) {
    std::vector<ParamKey>& params = dict.param_groups[g].params;
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string where = absl::StrCat("param_groups[", g, "]['params'][", i, "] ");
      if (params[i].is_id()) return refuse_id(params[i], where);
      absl::StatusOr<std::string> name =
          rewriter.Rewrite(params[i].fqn(), names.parameters, nullptr, where, "parameter");
      if (!name.ok()) return name.status();
      params[i] = ParamKey::Fqn(*std::move(name));
    }
  }
  return dict;
}

}  // namespace fsdp::checkpoint
