// Status helpers the optimizer-state targets share: FSDP_ASSIGN_OR_RETURN with a context
// prefixed to the error, and CallTorch for functions that already return an absl::StatusOr.
// Header only; no preconditions. Errors: whatever the wrapped expression returns (annotated),
// and LibTorch's exceptions as statuses (StatusFromException: INTERNAL, DEADLINE_EXCEEDED or
// UNAVAILABLE).
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_STATUS_CONTEXT_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_STATUS_CONTEXT_H_

#include <exception>
#include <utility>

#include "absl/strings/string_view.h"
#include "comm/status_macros.h"

// FSDP_ASSIGN_OR_RETURN with a context prefixed to the error (as FSDP_RETURN_IF_ERROR's).
#define OPTIM_ASSIGN_OR_RETURN(lhs, expr, context) \
  OPTIM_ASSIGN_OR_RETURN_IMPL_(FSDP_STATUS_CONCAT_(optim_statusor_, __LINE__), lhs, expr, context)
#define OPTIM_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr, context)           \
  auto statusor = (expr);                                                    \
  if (!statusor.ok()) return ::fsdp::Annotate(statusor.status(), (context)); \
  lhs = std::move(statusor).value()

namespace fsdp::optim_state::internal {

// CallTorch for functions that return an absl::StatusOr (CallTorch would wrap it again).
template <typename Fn>
auto CallTorchOr(absl::string_view context, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& e) {
    return StatusFromException(e, context);
  }
}

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_STATUS_CONTEXT_H_
