#include "fsdp/deferred_init.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <torch/nn/modules.h>

#include <algorithm>
#include <deque>
#include <exception>
#include <iterator>
#include <memory>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fsdp {
namespace {

// Gives `tensor` the storage (or lack of it) of `replacement`, keeping its TensorImpl: modules
// hold their tensors as members, so a new tensor would not reach them. This is what set_data
// does, minus its check that both are of one backend (meta and CPU are not).
void ReplaceStorage(const at::Tensor& tensor, const at::Tensor& replacement) {
  tensor.unsafeGetTensorImpl()->shallow_copy_from(replacement.getIntrusivePtr());
}

// The module's own parameters and buffers, FQN-suffix first.
std::vector<std::pair<std::string, at::Tensor>> OwnTensors(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    out.emplace_back(p.key(), p.value());
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) {
    out.emplace_back(b.key(), b.value());
  }
  return out;
}

template <typename Impl>
bool TryReset(torch::nn::Module& module) {
  auto* impl = dynamic_cast<Impl*>(&module);
  if (impl == nullptr) return false;
  impl->reset_parameters();
  return true;
}

// LibTorch's modules that have a reset_parameters() (their own tensors only, as PyTorch's).
bool ResetLibTorchModule(torch::nn::Module& m) {
  using namespace torch::nn;  // NOLINT: the list below is LibTorch's module types
  static constexpr bool (*kResetters[])(torch::nn::Module&) = {TryReset<LinearImpl>,
                                                               TryReset<BilinearImpl>,
                                                               TryReset<EmbeddingImpl>,
                                                               TryReset<EmbeddingBagImpl>,
                                                               TryReset<LayerNormImpl>,
                                                               TryReset<GroupNormImpl>,
                                                               TryReset<Conv1dImpl>,
                                                               TryReset<Conv2dImpl>,
                                                               TryReset<Conv3dImpl>,
                                                               TryReset<ConvTranspose1dImpl>,
                                                               TryReset<ConvTranspose2dImpl>,
                                                               TryReset<ConvTranspose3dImpl>,
                                                               TryReset<BatchNorm1dImpl>,
                                                               TryReset<BatchNorm2dImpl>,
                                                               TryReset<BatchNorm3dImpl>,
                                                               TryReset<InstanceNorm1dImpl>,
                                                               TryReset<InstanceNorm2dImpl>,
                                                               TryReset<InstanceNorm3dImpl>,
                                                               TryReset<RNNImpl>,
                                                               TryReset<LSTMImpl>,
                                                               TryReset<GRUImpl>,
                                                               TryReset<RNNCellImpl>,
                                                               TryReset<LSTMCellImpl>,
                                                               TryReset<GRUCellImpl>};
  return std::any_of(std::begin(kResetters), std::end(kResetters),
                     [&](auto reset) { return reset(m); });
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// What a materialised tensor must still be.
struct TensorSpec {
  std::string fqn;
  at::Tensor tensor;
  std::vector<int64_t> shape;
  at::ScalarType dtype;
};

absl::Status CheckMaterialized(const std::vector<TensorSpec>& specs, bool with_init_fn) {
  const char* who = with_init_fn ? "FSDP param_init_fn" : "FSDP reset_parameters()";
  for (const TensorSpec& spec : specs) {
    if (spec.tensor.is_meta()) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, " left '", spec.fqn,
                       "' on the meta device: it must allocate (fsdp::ToEmpty) and initialise "
                       "every tensor of the modules it is given"));
    }
    if (spec.tensor.sizes() != at::IntArrayRef(spec.shape) ||
        spec.tensor.scalar_type() != spec.dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, " changed '", spec.fqn, "' from ", c10::toString(spec.dtype),
                       ShapeString(spec.shape), " to ", c10::toString(spec.tensor.scalar_type()),
                       ShapeString(spec.tensor.sizes())));
    }
  }
  return absl::OkStatus();
}

// "block1" for prefix "block1.", "" for the root.
std::string ModuleFqn(const internal::NamedModule& named) {
  return named.prefix.empty() ? "" : named.prefix.substr(0, named.prefix.size() - 1);
}

// Runs `body` on the module at `fqn`, turning exceptions into an error naming it.
absl::Status CallOn(const internal::NamedModule& named, const char* what,
                    const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("FSDP ", what, " failed on module '",
                                                   ModuleFqn(named), "' (", named.module->name(),
                                                   "): ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace

void ToMeta(torch::nn::Module& module) {
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const at::Tensor& t = item.value();
    if (t.defined() && !t.is_meta())
      ReplaceStorage(t, at::empty(t.sizes(), t.options().device(at::kMeta)));
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    const at::Tensor& t = item.value();
    if (t.defined() && !t.is_meta())
      ReplaceStorage(t, at::empty(t.sizes(), t.options().device(at::kMeta)));
  }
}

void ToEmpty(torch::nn::Module& module, bool recurse) {
  auto allocate = [](const at::Tensor& t) {
    if (!t.defined()) return;
    ReplaceStorage(t, at::empty(t.sizes(), t.options().device(at::kCPU)));
  };
  for (const auto& p : module.named_parameters(recurse)) allocate(p.value());
  for (const auto& b : module.named_buffers(recurse)) allocate(b.value());
}

uint64_t FqnSeed(const std::string& fqn) {
  uint64_t h = 0;
  for (unsigned char c : fqn) h = (h * 131 + c) % 2147483647;
  return h;
}

ParamInitFn FqnSeededInit(torch::nn::Module& root, TensorInitFn init, uint64_t seed) {
  auto names = std::make_shared<std::unordered_map<const torch::nn::Module*, std::string>>();
  for (const auto& item : root.named_modules()) names->emplace(item.value().get(), item.key());
  return [names, init = std::move(init), seed](torch::nn::Module& module) {
    auto it = names->find(&module);
    TORCH_CHECK(it != names->end(), "FqnSeededInit: module ", module.name(),
                " is not in the model it was made for");
    ToEmpty(module);
    at::NoGradGuard no_grad;
    for (auto [key, tensor] : OwnTensors(module)) {
      const std::string fqn = it->second.empty() ? key : absl::StrCat(it->second, ".", key);
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(FqnSeed(fqn) + seed);
      init(fqn, tensor, gen);
    }
  };
}

bool HoldsMetaTensors(const torch::nn::Module& module) {
  for (const auto& [name, t] : OwnTensors(module)) {
    if (t.defined() && t.is_meta()) return true;
  }
  return false;
}

absl::Status ResetParameters(torch::nn::Module& module, const std::string& fqn) {
  if (auto* own = dynamic_cast<ResetsParameters*>(&module)) {
    own->reset_parameters();
    return absl::OkStatus();
  }
  if (ResetLibTorchModule(module)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "FSDP: unable to call reset_parameters() for module '", fqn, "' (", module.name(),
      ") on the meta device: it has none FSDP knows; give FsdpOptions.param_init_fn, or implement "
      "fsdp::ResetsParameters in the module"));
}

namespace internal {

std::vector<NamedModule> ModulesToMaterialize(const NamedModule& unit,
                                              const std::unordered_set<torch::nn::Module*>& stop) {
  std::vector<NamedModule> out;
  std::unordered_set<torch::nn::Module*> visited = {unit.module};
  std::deque<NamedModule> queue = {unit};
  while (!queue.empty()) {
    NamedModule named = std::move(queue.front());
    queue.pop_front();
    for (const auto& child : named.module->named_children()) {
      torch::nn::Module* c = child.value().get();
      if (stop.count(c) || !visited.insert(c).second) continue;
      queue.push_back({c, absl::StrCat(named.prefix, child.key(), ".")});
    }
    out.push_back(std::move(named));
  }
  return out;
}

absl::Status MaterializeUnit(const std::vector<NamedModule>& modules,
                             const std::vector<std::pair<std::string, at::Tensor>>& managed,
                             const ParamInitFn& init) {
  bool needed = false;
  std::vector<TensorSpec> specs;
  for (const auto& [fqn, param] : managed) {
    needed |= param.is_meta();
    specs.push_back({fqn, param, param.sizes().vec(), param.scalar_type()});
  }
  for (const NamedModule& named : modules) {
    for (const auto& b : named.module->named_buffers(/*recurse=*/false)) {
      if (!b.value().defined()) continue;
      needed |= b.value().is_meta();
      specs.push_back({absl::StrCat(named.prefix, b.key()), b.value(), b.value().sizes().vec(),
                       b.value().scalar_type()});
    }
  }
  if (!needed) return absl::OkStatus();
  at::NoGradGuard no_grad;
  for (const NamedModule& named : modules) {
    if (init) {
      absl::Status status = CallOn(named, "param_init_fn", [&] { init(*named.module); });
      if (!status.ok()) return status;
      continue;
    }
    // FSDP1 resets only modules that hold tensors of their own.
    if (OwnTensors(*named.module).empty()) continue;
    ToEmpty(*named.module);
    absl::Status reset;
    absl::Status thrown = CallOn(named, "reset_parameters()",
                                 [&] { reset = ResetParameters(*named.module, ModuleFqn(named)); });
    if (!thrown.ok()) return thrown;
    if (!reset.ok()) return reset;
  }
  return CheckMaterialized(specs, static_cast<bool>(init));
}

absl::Status CheckNoMetaOutsideUnits(const torch::nn::Module& root,
                                     const std::unordered_set<const c10::TensorImpl*>& covered) {
  auto check = [&](const std::string& fqn, const at::Tensor& t, const char* kind) {
    if (!t.defined() || !t.is_meta() || covered.count(t.unsafeGetTensorImpl())) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "FSDP: ", kind, " '", fqn,
        "' is a meta tensor that no FSDP unit manages (it is in an ignored module or outside "
        "every unit), so FSDP would not materialise it; materialise it before Wrap"));
  };
  for (const auto& p : root.named_parameters(/*recurse=*/true)) {
    absl::Status status = check(p.key(), p.value(), "parameter");
    if (!status.ok()) return status;
  }
  for (const auto& b : root.named_buffers(/*recurse=*/true)) {
    absl::Status status = check(b.key(), b.value(), "buffer");
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace fsdp
