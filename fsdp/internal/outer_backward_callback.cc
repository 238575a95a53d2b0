#include "fsdp/internal/outer_backward_callback.h"

#include <torch/csrc/autograd/engine.h>

#include <utility>
#include <vector>

namespace fsdp::internal {
namespace {

thread_local int nested_depth = 0;
thread_local std::vector<std::function<void()>> deferred;

}  // namespace

void QueueOuterBackwardCallback(std::function<void()> callback) {
  if (nested_depth > 0) {
    deferred.push_back(std::move(callback));
    return;
  }
  torch::autograd::Engine::get_default_engine().queue_callback(std::move(callback));
}

NestedBackwardScope::NestedBackwardScope() { ++nested_depth; }

NestedBackwardScope::~NestedBackwardScope() {
  if (--nested_depth > 0) return;
  std::vector<std::function<void()>> callbacks;
  callbacks.swap(deferred);
  for (auto& callback : callbacks) {
    torch::autograd::Engine::get_default_engine().queue_callback(std::move(callback));
  }
}

}  // namespace fsdp::internal
