#include "fsdp/fully_sharded_data_parallel.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <deque>
#include <unordered_map>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "fsdp/internal/outer_backward_callback.h"

namespace fsdp {
namespace {

// forward()/backward() cannot return a status: this is the edge where errors become c10::Error.
void ThrowIfError(const absl::Status& status) {
  TORCH_CHECK(status.ok(), std::string(status.message()));
}

using ImplSet = std::unordered_set<const c10::TensorImpl*>;

}  // namespace

absl::string_view BackwardPrefetchName(BackwardPrefetch prefetch) {
  switch (prefetch) {
    case BackwardPrefetch::kNone:
      return "NONE";
    case BackwardPrefetch::kBackwardPre:
      return "BACKWARD_PRE";
    case BackwardPrefetch::kBackwardPost:
      return "BACKWARD_POST";
  }
  return "?";
}

// Forward/backward bookkeeping shared by the units of one FSDP model: the end of the backward
// pass, the execution order and prefetching (FSDP1's _ExecOrderData and _prefetch_handle).
struct FsdpBackwardState {
  enum class PrefetchMode { kForward, kBackward };

  std::vector<FsdpUnit*> units;  // pre-order
  bool end_of_backward_queued = false;
  BackwardPrefetch backward_prefetch = BackwardPrefetch::kNone;
  bool forward_prefetch = false;
  bool limit_all_gathers = true;
  // Pre-forward order, recorded in the first iteration (until the first backward ends);
  // post-forward order, recorded anew every iteration.
  std::vector<FsdpUnit*> pre_forward_order;
  bool first_iteration = true;
  std::vector<FsdpUnit*> post_forward_order;
  std::deque<FsdpUnit*> in_flight;  // units whose prefetched gather was issued, oldest first
  PrefetchStats stats;
  bool record_events = false;

  void SetPrefetchOptions(const FsdpOptions& options) {
    backward_prefetch = options.backward_prefetch;
    forward_prefetch = options.forward_prefetch;
    limit_all_gathers = options.limit_all_gathers;
  }
  int IndexOf(const FsdpUnit* unit) const {
    auto it = std::find(units.begin(), units.end(), unit);
    return it == units.end() ? -1 : static_cast<int>(it - units.begin());
  }
  void Record(PrefetchEvent::Kind kind, const FsdpUnit* unit, const FsdpUnit* by = nullptr) {
    if (record_events) stats.events.push_back({kind, IndexOf(unit), by ? IndexOf(by) : -1});
  }
  // Issues the gather of the unit after `current` in `mode`'s order, if it still needs one.
  void Prefetch(FsdpUnit* current, PrefetchMode mode);
  // Waits for and frees every prefetched gather no unit has used.
  void DropPrefetches();
  void QueueEndOfBackward();
  void EndOfBackward();
};

class FsdpUnit : public ForwardInterceptor, public std::enable_shared_from_this<FsdpUnit> {
 public:
  FsdpUnit(std::unique_ptr<FlatParamHandle> handle, bool is_root,
           std::optional<at::ScalarType> input_dtype, FsdpBackwardState* state)
      : handle_(std::move(handle)), is_root_(is_root), input_dtype_(input_dtype), state_(state) {}

  FlatParamHandle* handle() const { return handle_.get(); }

  std::optional<at::ScalarType> ForwardInputDtype() const override { return input_dtype_; }

  void PreForward() override {
    if (!handle_) return;
    if (state_->first_iteration && pre_forward_index_ < 0) {
      pre_forward_index_ = static_cast<int>(state_->pre_forward_order.size());
      state_->pre_forward_order.push_back(this);
    }
    ThrowIfError(handle_->Unshard());
    UseOwnGradAccumulators();
    state_->Record(PrefetchEvent::Kind::kPreForward, this);
    // Not while backward recomputes a checkpointed forward: the units after it are done.
    if (state_->forward_prefetch && !state_->end_of_backward_queued) {
      state_->Prefetch(this, FsdpBackwardState::PrefetchMode::kForward);
    }
  }

  torch::Tensor PostForward(torch::Tensor output) override {
    if (!handle_) return output;
    if (post_forward_index_ < 0) {
      post_forward_index_ = static_cast<int>(state_->post_forward_order.size());
      state_->post_forward_order.push_back(this);
    }
    const bool backward_follows =
        at::GradMode::is_enabled() && output.defined() && output.requires_grad();
    if (backward_follows) {
      // A parameter may require gradients now that did not before (a frozen layer unfrozen
      // between steps): hook it too, and wait for the parameters that require them now.
      InstallGradHooks();
      needs_reduce_ = true;
      pre_backward_done_ = false;
      grads_ready_ = 0;
      std::weak_ptr<FsdpUnit> weak = weak_from_this();
      output.register_hook([weak](const at::Tensor&) {
        if (auto unit = weak.lock()) unit->PreBackward();
      });
    }
    // FULL_SHARD and HYBRID_SHARD free a non-root unit right away; with no backward coming every
    // strategy frees it (the root is used by backward at once, so it stays gathered). A NO_SHARD
    // unit has nothing gathered to free unless mixed precision cast it.
    if (!backward_follows || (!is_root_ && ReshardsAfterForward(handle_->strategy()))) {
      Reshard();
    }
    if (is_root_ && !backward_follows) state_->DropPrefetches();
    return output;
  }

  void PreBackward() {
    state_->QueueEndOfBackward();
    if (pre_backward_done_ || !needs_reduce_) return;
    pre_backward_done_ = true;
    handle_->StashGradients();
    ThrowIfError(handle_->Unshard());
    state_->Record(PrefetchEvent::Kind::kPreBackward, this);
    if (state_->backward_prefetch == BackwardPrefetch::kBackwardPre) {
      state_->Prefetch(this, FsdpBackwardState::PrefetchMode::kBackward);
    }
  }

  // Called after autograd accumulated the gradient of one of this unit's parameters.
  void OnGradReady() {
    if (!needs_reduce_) return;
    if (++grads_ready_ >= expected_grads_) PostBackward();
  }

  // Reduces this unit's gradients once per backward pass, then reshards.
  void PostBackward() {
    if (!needs_reduce_) return;
    needs_reduce_ = false;
    state_->Record(PrefetchEvent::Kind::kPostBackward, this);
    // FSDP1 issues it before the reduce-scatter (`_post_backward_reshard`).
    if (state_->backward_prefetch == BackwardPrefetch::kBackwardPost) {
      state_->Prefetch(this, FsdpBackwardState::PrefetchMode::kBackward);
    }
    ThrowIfError(handle_->ReduceGradientsAndReshard());
    prefetched_ = false;
  }

  void Reshard() {
    handle_->Reshard();
    prefetched_ = false;
  }

  // Autograd forgets a parameter's accumulator when set_data changes its dtype (mixed
  // precision's gather, float32 shard to param_dtype): the forward would then make a new one,
  // without our hook, and this unit's gradients would wait for the end of backward (and
  // BACKWARD_POST would have nothing to prefetch). Point the parameters back at ours.
  void UseOwnGradAccumulators() {
    for (size_t i = 0; i < accumulators_.size(); ++i) {
      if (accumulators_[i]) {
        torch::autograd::impl::set_grad_accumulator(
            handle_->params()[i], c10::weak_intrusive_ptr<torch::autograd::Node>(accumulators_[i]));
      }
    }
  }

  // Whether prefetching may gather this unit now (FSDP1's _needs_pre_forward_unshard /
  // _needs_pre_backward_unshard and not _prefetched).
  bool WantsPrefetch(FsdpBackwardState::PrefetchMode mode) const {
    if (!handle_ || prefetched_ || handle_->is_unsharded()) return false;
    return mode == FsdpBackwardState::PrefetchMode::kForward ? true
                                                             : needs_reduce_ && !pre_backward_done_;
  }
  void set_prefetched() { prefetched_ = true; }
  int pre_forward_index() const { return pre_forward_index_; }
  int post_forward_index() const { return post_forward_index_; }
  void ForgetPostForwardIndex() { post_forward_index_ = -1; }

  void InstallGradHooks();

 private:
  std::unique_ptr<FlatParamHandle> handle_;
  bool is_root_;
  std::optional<at::ScalarType> input_dtype_;  // mixed precision's input cast
  FsdpBackwardState* state_;
  bool needs_reduce_ = false;
  bool pre_backward_done_ = false;
  int grads_ready_ = 0;
  // Parameters that required gradients at the last forward: the gradients a backward waits for.
  int expected_grads_ = 0;
  std::vector<bool> hooked_;  // per parameter
  bool prefetched_ = false;   // gathered ahead by another unit's hook, not resharded since
  int pre_forward_index_ = -1;
  int post_forward_index_ = -1;
  std::vector<c10::intrusive_ptr<torch::autograd::Node>> accumulators_;  // per parameter
};

namespace {

// Runs after AccumulateGrad stored a parameter's gradient.
class GradReadyHook : public torch::autograd::FunctionPostHook {
 public:
  explicit GradReadyHook(std::weak_ptr<FsdpUnit> unit) : unit_(std::move(unit)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    if (auto unit = unit_.lock()) unit->OnGradReady();
    return outputs;
  }

 private:
  std::weak_ptr<FsdpUnit> unit_;
};

}  // namespace

// Hooks every parameter that requires a gradient and has no hook yet; counts those that
// require one.
void FsdpUnit::InstallGradHooks() {
  if (!handle_) return;
  hooked_.resize(handle_->params().size(), false);
  expected_grads_ = 0;
  for (size_t i = 0; i < handle_->params().size(); ++i) {
    at::Tensor param = handle_->params()[i];
    if (!param.requires_grad()) continue;
    if (hooked_[i]) {
      ++expected_grads_;
      continue;
    }
    // The accumulator records the shape and dtype its gradients must have when it is created
    // (autograd casts gradients to that dtype), so create it while the parameter has its
    // gathered shape and dtype (a stand-in that allocates one element). Holding it keeps the
    // same node, and so our hook, for every backward pass.
    at::Tensor resting = param.detach();
    param.set_data(at::empty({1}, resting.options().dtype(handle_->compute_dtype()))
                       .expand(handle_->infos()[i].shape));
    c10::intrusive_ptr<torch::autograd::Node> accumulator =
        torch::autograd::impl::grad_accumulator(param);
    param.set_data(resting);
    if (accumulator == nullptr) continue;
    accumulator->add_post_hook(std::make_unique<GradReadyHook>(weak_from_this()));
    accumulators_.resize(handle_->params().size());
    accumulators_[i] = std::move(accumulator);
    hooked_[i] = true;
    ++expected_grads_;
  }
}

void FsdpBackwardState::QueueEndOfBackward() {
  if (end_of_backward_queued) return;
  end_of_backward_queued = true;
  // At the end of the outermost backward: a checkpointed region's nested backward ending must
  // not finish the units outside it.
  internal::QueueOuterBackwardCallback([this] { EndOfBackward(); });
}

void FsdpBackwardState::EndOfBackward() {
  end_of_backward_queued = false;
  // Units whose parameters did not all get gradients (unused ones) finish here, innermost
  // first, as PyTorch's final callback does.
  for (auto it = units.rbegin(); it != units.rend(); ++it) (*it)->PostBackward();
  DropPrefetches();
  // FSDP1's next_iter: the post-forward order is recorded anew each iteration.
  for (FsdpUnit* unit : post_forward_order) unit->ForgetPostForwardIndex();
  post_forward_order.clear();
  first_iteration = false;
}

void FsdpBackwardState::Prefetch(FsdpUnit* current, PrefetchMode mode) {
  FsdpUnit* target = nullptr;
  if (mode == PrefetchMode::kBackward) {
    const int index = current->post_forward_index();
    if (index > 0) target = post_forward_order[index - 1];
  } else {
    const int index = current->pre_forward_index();
    if (index >= 0 && index + 1 < static_cast<int>(pre_forward_order.size())) {
      target = pre_forward_order[index + 1];
    }
  }
  if (target == nullptr || !target->WantsPrefetch(mode)) return;
  // Gathers already used or dropped leave the queue; the rest are in flight.
  in_flight.erase(std::remove_if(in_flight.begin(), in_flight.end(),
                                 [](FsdpUnit* u) { return !u->handle()->has_pending_gather(); }),
                  in_flight.end());
  if (limit_all_gathers && in_flight.size() >= 2) {
    FsdpUnit* oldest = in_flight.front();
    in_flight.pop_front();
    // The oldest gather completes into its unit's parameters, which its hook then uses.
    ThrowIfError(oldest->handle()->Unshard());
    ++stats.limit_waits;
    Record(PrefetchEvent::Kind::kLimitWait, oldest, current);
  }
  ThrowIfError(target->handle()->Prefetch());
  target->set_prefetched();
  if (!target->handle()->has_pending_gather()) return;  // nothing to gather (NO_SHARD)
  in_flight.push_back(target);
  ++stats.gathers_issued_ahead;
  stats.max_in_flight = std::max(stats.max_in_flight, static_cast<int>(in_flight.size()));
  Record(PrefetchEvent::Kind::kPrefetch, target, current);
}

void FsdpBackwardState::DropPrefetches() {
  for (FsdpUnit* unit : in_flight) {
    if (unit->handle()->has_pending_gather()) unit->Reshard();
  }
  in_flight.clear();
}

namespace {

struct ModuleNode {
  torch::nn::Module* module;
  std::string prefix;  // "" for the root, "block1." ...
};

// Pre-order walk of the module tree (each module once), skipping ignored modules' subtrees.
void WalkModules(torch::nn::Module& module, const std::string& prefix,
                 const std::unordered_set<torch::nn::Module*>& ignored,
                 std::unordered_set<torch::nn::Module*>& seen, std::vector<ModuleNode>& out) {
  if (!seen.insert(&module).second) return;
  out.push_back({&module, prefix});
  for (const auto& child : module.named_children()) {
    if (ignored.count(child.value().get())) continue;
    WalkModules(*child.value(), absl::StrCat(prefix, child.key(), "."), ignored, seen, out);
  }
}

// The parameters a unit at `module` manages, in PyTorch's order: the module's own, then each
// child's subtree, stopping at other units' modules and ignored modules.
void CollectUnitParams(torch::nn::Module& module, const std::string& prefix,
                       const std::unordered_set<torch::nn::Module*>& stop,
                       const std::unordered_set<torch::nn::Module*>& ignored,
                       std::vector<std::pair<std::string, at::Tensor>>& out) {
  for (const auto& param : module.named_parameters(/*recurse=*/false)) {
    out.emplace_back(absl::StrCat(prefix, param.key()), param.value());
  }
  for (const auto& child : module.named_children()) {
    torch::nn::Module* c = child.value().get();
    if (stop.count(c) || ignored.count(c)) continue;
    CollectUnitParams(*c, absl::StrCat(prefix, child.key(), "."), stop, ignored, out);
  }
}

// What Wrap refuses before it looks at the model.
absl::Status CheckWrapArguments(const std::shared_ptr<torch::nn::Module>& module,
                                const std::shared_ptr<comm::ProcessGroup>& group,
                                const FsdpOptions& options) {
  if (group == nullptr) return absl::InvalidArgumentError("FSDP: no process group given");
  if (module == nullptr) return absl::InvalidArgumentError("FSDP: no module given");
  FSDP_RETURN_IF_ERROR(ValidateMixedPrecision(options.mixed_precision), "FSDP");
  if (IsHybrid(options.sharding_strategy) != (options.replicate_group != nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("FSDP: sharding_strategy ", ShardingStrategyName(options.sharding_strategy),
                     IsHybrid(options.sharding_strategy)
                         ? " needs FsdpOptions.replicate_group (see MakeHybridShardGroups)"
                         : " takes no FsdpOptions.replicate_group (HYBRID_SHARD's)"));
  }
  return absl::OkStatus();
}

// Each unit's parameters (by node index), shared ones once with all their FQNs. Units claim
// inside-out (deepest module first), as nested FSDP constructors run before their parents';
// among modules at one depth, later pre-order positions first.
std::unordered_map<size_t, std::vector<FlatParamEntry>> ClaimParameters(
    const std::vector<ModuleNode>& nodes, const std::vector<size_t>& unit_nodes,
    const std::unordered_set<torch::nn::Module*>& unit_modules,
    const std::unordered_set<torch::nn::Module*>& ignored) {
  auto depth = [&](size_t i) {
    return std::count(nodes[i].prefix.begin(), nodes[i].prefix.end(), '.');
  };
  std::vector<size_t> claim_order = unit_nodes;
  std::stable_sort(claim_order.begin(), claim_order.end(),
                   [&](size_t a, size_t b) { return depth(a) > depth(b); });
  std::unordered_map<const c10::TensorImpl*, size_t> claimed_by;  // impl -> unit node
  std::unordered_map<size_t, std::vector<FlatParamEntry>> entries;
  for (size_t node : claim_order) {
    std::unordered_set<torch::nn::Module*> stop = unit_modules;
    stop.erase(nodes[node].module);
    std::vector<std::pair<std::string, at::Tensor>> params;
    CollectUnitParams(*nodes[node].module, nodes[node].prefix, stop, ignored, params);
    std::vector<FlatParamEntry>& mine = entries[node];
    for (auto& [fqn, param] : params) {
      const c10::TensorImpl* impl = param.unsafeGetTensorImpl();
      auto it = claimed_by.find(impl);
      if (it == claimed_by.end()) {
        claimed_by[impl] = node;
        mine.push_back({{fqn}, param});
      } else if (it->second == node) {
        for (FlatParamEntry& e : mine) {
          if (e.param.unsafeGetTensorImpl() == impl) e.fqns.push_back(fqn);
        }
      }
    }
  }
  return entries;
}

// Whether no other unit's module encloses this one's: PyTorch FSDP1's roots (an FSDP instance
// that no FSDP instance contains), which cast their inputs under mixed precision.
bool IsTopLevelUnit(const std::vector<ModuleNode>& nodes, const std::vector<size_t>& unit_nodes,
                    size_t node) {
  for (size_t other : unit_nodes) {
    if (other != node && nodes[other].prefix.size() < nodes[node].prefix.size() &&
        absl::StartsWith(nodes[node].prefix, nodes[other].prefix)) {
      return false;
    }
  }
  return true;
}

// PyTorch's input casting: a root casts with cast_root_forward_inputs, a unit with parameters
// with cast_forward_inputs (`_root_pre_forward`, `_pre_forward`).
std::optional<at::ScalarType> InputDtype(const MixedPrecision& mixed_precision, bool top_level,
                                         bool has_params) {
  if (!mixed_precision.param_dtype.has_value()) return std::nullopt;
  if ((top_level && mixed_precision.cast_root_forward_inputs) ||
      (has_params && mixed_precision.cast_forward_inputs)) {
    return mixed_precision.param_dtype;
  }
  return std::nullopt;
}

// Casts the floating-point buffers under the top-level units to buffer_dtype (PyTorch casts
// those under its roots at lazy init), recording their dtypes for state dicts.
void CastBuffers(const std::vector<ModuleNode>& nodes, const std::vector<size_t>& top_level,
                 at::ScalarType buffer_dtype,
                 std::unordered_map<const c10::TensorImpl*, at::ScalarType>& original) {
  for (const ModuleNode& node : nodes) {
    const bool under_unit = std::any_of(top_level.begin(), top_level.end(), [&](size_t unit) {
      return absl::StartsWith(node.prefix, nodes[unit].prefix);
    });
    if (!under_unit) continue;
    for (const auto& buffer : node.module->named_buffers(/*recurse=*/false)) {
      at::Tensor tensor = buffer.value();
      if (!tensor.is_floating_point() || tensor.scalar_type() == buffer_dtype) continue;
      if (original.emplace(tensor.unsafeGetTensorImpl(), tensor.scalar_type()).second) {
        tensor.set_data(tensor.detach().to(buffer_dtype));
      }
    }
  }
}

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// The parameters and buffers of the modules in `nodes` whose prefix starts with `under`.
NamedTensors ModuleStates(const std::vector<ModuleNode>& nodes, const std::string& under) {
  NamedTensors out;
  for (const ModuleNode& node : nodes) {
    if (!absl::StartsWith(node.prefix, under)) continue;
    for (const auto& p : node.module->named_parameters(/*recurse=*/false)) {
      out.emplace_back(absl::StrCat(node.prefix, p.key()), p.value());
    }
    for (const auto& b : node.module->named_buffers(/*recurse=*/false)) {
      out.emplace_back(absl::StrCat(node.prefix, b.key()), b.value());
    }
  }
  return out;
}

// sync_module_states: rank 0's `tensors` to every rank of `group` (and then of the replicate
// group), in order (the same on every rank), each once: `synced` remembers them.
absl::Status BroadcastModuleStates(const NamedTensors& tensors, const FsdpOptions& options,
                                   comm::ProcessGroup& group, ImplSet& synced) {
  at::NoGradGuard no_grad;
  for (const auto& [fqn, tensor] : tensors) {
    if (!tensor.defined() || !synced.insert(tensor.unsafeGetTensorImpl()).second) continue;
    at::Tensor data = tensor.detach();
    at::Tensor buffer = data.is_contiguous() ? data : data.contiguous();
    for (comm::ProcessGroup* g : {&group, options.replicate_group.get()}) {
      if (g == nullptr) continue;
      FSDP_RETURN_IF_ERROR(g->Broadcast(buffer, /*root=*/0),
                           absl::StrCat("FSDP sync_module_states: broadcasting ", fqn,
                                        " from rank 0 of group ", g->name()));
    }
    if (!buffer.is_same(data)) data.copy_(buffer);
  }
  return absl::OkStatus();
}

// Units in the order FSDP1's auto-wrap builds them: post-order (a unit after the units inside
// it; siblings in registration order). `nodes` is a pre-order walk.
std::vector<size_t> PostOrderUnits(const std::vector<ModuleNode>& nodes,
                                   const std::vector<size_t>& unit_nodes) {
  std::vector<size_t> order;
  std::vector<size_t> open;
  for (size_t node : unit_nodes) {
    while (!open.empty() && !absl::StartsWith(nodes[node].prefix, nodes[open.back()].prefix)) {
      order.push_back(open.back());
      open.pop_back();
    }
    open.push_back(node);
  }
  order.insert(order.end(), open.rbegin(), open.rend());
  return order;
}

// What Wrap needs to build each unit's handle.
struct UnitPlan {
  const std::vector<ModuleNode>& nodes;
  const std::vector<size_t>& unit_nodes;
  const std::unordered_set<torch::nn::Module*>& unit_modules;
  const std::unordered_set<torch::nn::Module*>& ignored;
};

// Each unit's flat parameter handle (null without parameters), by node. Unit by unit, inside-out:
// materialise it if it is meta (deferred_init.h), broadcast rank 0's values (sync_module_states),
// then flatten and shard it, freeing its full parameters before the next unit.
absl::StatusOr<std::unordered_map<size_t, std::unique_ptr<FlatParamHandle>>> ShardUnits(
    const UnitPlan& plan, std::unordered_map<size_t, std::vector<FlatParamEntry>>& entries,
    const std::shared_ptr<comm::ProcessGroup>& group, const FsdpOptions& options) {
  const std::vector<ModuleNode>& nodes = plan.nodes;
  ImplSet covered;  // what the units materialise
  for (const auto& [node, unit_entries] : entries) {
    for (const FlatParamEntry& e : unit_entries) covered.insert(e.param.unsafeGetTensorImpl());
  }
  for (size_t unit : plan.unit_nodes) {
    for (const auto& [fqn, t] : ModuleStates(nodes, nodes[unit].prefix)) {
      if (t.defined()) covered.insert(t.unsafeGetTensorImpl());
    }
  }
  FSDP_RETURN_IF_ERROR(internal::CheckNoMetaOutsideUnits(*nodes[0].module, covered));
  std::unordered_map<size_t, std::unique_ptr<FlatParamHandle>> handles;
  ImplSet synced;
  for (size_t node : PostOrderUnits(nodes, plan.unit_nodes)) {
    const std::string where = absl::StrCat("FSDP unit '", nodes[node].prefix, "'");
    std::unordered_set<torch::nn::Module*> stop = plan.unit_modules;
    stop.insert(plan.ignored.begin(), plan.ignored.end());
    stop.erase(nodes[node].module);
    NamedTensors managed;
    for (const FlatParamEntry& e : entries[node]) managed.emplace_back(e.fqns[0], e.param);
    FSDP_RETURN_IF_ERROR(
        internal::MaterializeUnit(
            internal::ModulesToMaterialize({nodes[node].module, nodes[node].prefix}, stop), managed,
            options.param_init_fn),
        where);
    if (options.sync_module_states) {
      FSDP_RETURN_IF_ERROR(BroadcastModuleStates(managed, options, *group, synced));
      FSDP_RETURN_IF_ERROR(
          BroadcastModuleStates(ModuleStates(nodes, nodes[node].prefix), options, *group, synced));
    }
    if (entries[node].empty()) continue;
    auto created = FlatParamHandle::Create(std::move(entries[node]), group,
                                           options.sharding_strategy, options.use_orig_params,
                                           options.mixed_precision, options.replicate_group);
    if (!created.ok()) return Annotate(created.status(), where);
    handles[node] = *std::move(created);
  }
  if (options.sync_module_states) {  // what lies outside every unit
    FSDP_RETURN_IF_ERROR(BroadcastModuleStates(ModuleStates(nodes, ""), options, *group, synced));
  }
  return handles;
}

}  // namespace

absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> FullyShardedDataParallel::WrapSlot(
    ModuleSlot root_slot, std::shared_ptr<torch::nn::Module> module,
    std::shared_ptr<comm::ProcessGroup> group, FsdpOptions options) {
  FSDP_RETURN_IF_ERROR(CheckWrapArguments(module, group, options));
  std::unordered_set<torch::nn::Module*> ignored;
  for (const auto& m : options.ignored_modules) {
    if (m == module) {
      return absl::InvalidArgumentError("FSDP: the wrapped module itself cannot be ignored");
    }
    ignored.insert(m.get());
  }
  std::vector<ModuleNode> nodes;
  {
    std::unordered_set<torch::nn::Module*> seen;
    WalkModules(*module, "", ignored, seen, nodes);
  }
  std::unordered_map<torch::nn::Module*, size_t> node_index;
  for (size_t i = 0; i < nodes.size(); ++i) node_index[nodes[i].module] = i;

  // Which modules are units, each with its slot (the root's is ours).
  std::unordered_map<torch::nn::Module*, ModuleSlot*> unit_slot;
  for (ModuleSlot* slot : options.nested) {
    if (slot == nullptr || slot->is_empty()) {
      return absl::InvalidArgumentError("FSDP: a nested slot is empty");
    }
    torch::nn::Module* m = slot->module().get();
    if (!node_index.count(m)) {
      return absl::InvalidArgumentError(
          absl::StrCat("FSDP: nested module ", m->name(),
                       " is not inside the wrapped module (or lies in an ignored module)"));
    }
    if (m == module.get()) {
      return absl::InvalidArgumentError("FSDP: the wrapped module cannot also be nested");
    }
    if (slot->interceptor() != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("FSDP: module '", nodes[node_index[m]].prefix, "' is already wrapped"));
    }
    unit_slot[m] = slot;
  }
  auto fsdp = std::unique_ptr<FullyShardedDataParallel>(new FullyShardedDataParallel());
  fsdp->root_slot_ = std::move(root_slot);
  if (options.wrap_root) unit_slot[module.get()] = &fsdp->root_slot_;
  std::unordered_set<torch::nn::Module*> unit_modules;
  for (const auto& [m, slot] : unit_slot) unit_modules.insert(m);

  std::vector<size_t> unit_nodes;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (unit_modules.count(nodes[i].module)) unit_nodes.push_back(i);
  }
  std::unordered_map<size_t, std::vector<FlatParamEntry>> entries =
      ClaimParameters(nodes, unit_nodes, unit_modules, ignored);
  const UnitPlan plan{nodes, unit_nodes, unit_modules, ignored};
  FSDP_ASSIGN_OR_RETURN(auto handles, ShardUnits(plan, entries, group, options));

  fsdp->module_ = std::move(module);
  fsdp->group_ = group;
  fsdp->state_ = std::make_shared<FsdpBackwardState>();
  fsdp->state_->SetPrefetchOptions(options);
  std::vector<size_t> top_level;
  for (size_t node : unit_nodes) {
    const bool is_top_level = IsTopLevelUnit(nodes, unit_nodes, node);
    if (is_top_level) top_level.push_back(node);
    std::unique_ptr<FlatParamHandle> handle = std::move(handles[node]);
    const bool is_root = nodes[node].module == fsdp->module_.get();
    const std::optional<at::ScalarType> input_dtype =
        InputDtype(options.mixed_precision, is_top_level, handle != nullptr);
    auto unit =
        std::make_shared<FsdpUnit>(std::move(handle), is_root, input_dtype, fsdp->state_.get());
    unit->InstallGradHooks();
    unit_slot[nodes[node].module]->set_interceptor(unit);
    fsdp->state_->units.push_back(unit.get());
    fsdp->units_.push_back(std::move(unit));
    fsdp->unit_prefixes_.push_back(nodes[node].prefix);
    fsdp->unit_modules_.push_back(nodes[node].module);
  }
  if (options.mixed_precision.buffer_dtype.has_value()) {
    CastBuffers(nodes, top_level, *options.mixed_precision.buffer_dtype, fsdp->buffer_dtypes_);
  }
  fsdp->options_ = std::move(options);
  return fsdp;
}

at::ScalarType FullyShardedDataParallel::StateDictDtype(const at::Tensor& buffer) const {
  auto it = buffer_dtypes_.find(buffer.unsafeGetTensorImpl());
  return it != buffer_dtypes_.end() ? it->second : buffer.scalar_type();
}

FullyShardedDataParallel::~FullyShardedDataParallel() {
  for (ModuleSlot* slot : options_.nested) {
    if (slot != nullptr) slot->set_interceptor(nullptr);
  }
}

std::vector<FullyShardedDataParallel::UnitView> FullyShardedDataParallel::units() const {
  std::vector<UnitView> out;
  for (size_t i = 0; i < units_.size(); ++i)
    out.push_back({unit_prefixes_[i], units_[i]->handle()});
  return out;
}

namespace {

ImplSet ManagedImpls(const std::vector<FullyShardedDataParallel::UnitView>& units) {
  ImplSet managed;
  for (const auto& unit : units) {
    if (unit.handle == nullptr) continue;
    for (const at::Tensor& p : unit.handle->params()) managed.insert(p.unsafeGetTensorImpl());
  }
  return managed;
}

}  // namespace

std::vector<at::Tensor> FullyShardedDataParallel::parameters(
    const torch::nn::Module* subtree) const {
  const std::vector<UnitView> views = units();
  const ImplSet managed = ManagedImpls(views);
  std::unordered_map<torch::nn::Module*, FlatParamHandle*> handle_of;
  for (size_t i = 0; i < units_.size(); ++i) handle_of[unit_modules_[i]] = units_[i]->handle();
  std::vector<at::Tensor> out;
  ImplSet emitted;
  std::vector<ModuleNode> nodes;
  std::unordered_set<torch::nn::Module*> seen;
  WalkModules(subtree != nullptr ? const_cast<torch::nn::Module&>(*subtree) : *module_, "", {},
              seen, nodes);
  for (const ModuleNode& node : nodes) {
    if (!options_.use_orig_params) {
      auto it = handle_of.find(node.module);
      if (it != handle_of.end() && it->second != nullptr) out.push_back(it->second->flat_param());
    }
    for (const auto& param : node.module->named_parameters(/*recurse=*/false)) {
      const c10::TensorImpl* impl = param.value().unsafeGetTensorImpl();
      if (!options_.use_orig_params && managed.count(impl)) continue;
      if (emitted.insert(impl).second) out.push_back(param.value());
    }
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> FullyShardedDataParallel::unmanaged_parameters()
    const {
  const ImplSet managed = ManagedImpls(units());
  std::vector<std::pair<std::string, at::Tensor>> out;
  ImplSet emitted;
  std::vector<ModuleNode> nodes;
  std::unordered_set<torch::nn::Module*> seen;
  WalkModules(*module_, "", {}, seen, nodes);
  for (const ModuleNode& node : nodes) {
    for (const auto& param : node.module->named_parameters(/*recurse=*/false)) {
      const c10::TensorImpl* impl = param.value().unsafeGetTensorImpl();
      if (managed.count(impl) || !emitted.insert(impl).second) continue;
      out.emplace_back(absl::StrCat(node.prefix, param.key()), param.value());
    }
  }
  return out;
}

const PrefetchStats& FullyShardedDataParallel::prefetch_stats() const { return state_->stats; }

void FullyShardedDataParallel::ResetPrefetchStats() { state_->stats = PrefetchStats{}; }

void FullyShardedDataParallel::RecordPrefetchEvents(bool record) { state_->record_events = record; }

NoSyncGuard::NoSyncGuard(FullyShardedDataParallel& fsdp) {
  for (const FullyShardedDataParallel::UnitView& unit : fsdp.units()) {
    if (unit.handle == nullptr) continue;
    previous_.emplace_back(unit.handle, unit.handle->sync_gradients());
    unit.handle->set_sync_gradients(false);
  }
}

NoSyncGuard::~NoSyncGuard() {
  for (const auto& [handle, sync] : previous_) handle->set_sync_gradients(sync);
}

}  // namespace fsdp
