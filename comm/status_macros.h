// Error-handling helpers shared by every fsdp-cpp target.
//
// The project's rule (README, "Errors"): inside the library, errors are values
// (`absl::Status` / `absl::StatusOr<T>`); exceptions thrown by LibTorch (`c10::Error`, and any
// other `std::exception`) are caught at the edge by `CallTorch` and turned into a status that
// says what was being done. Statuses gain context as they travel up through
// `FSDP_RETURN_IF_ERROR(expr, "context")`.
#ifndef FSDP_CPP_COMM_STATUS_MACROS_H_
#define FSDP_CPP_COMM_STATUS_MACROS_H_

#include <exception>
#include <string>
#include "absl/strings/string_view.h"
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace fsdp {

// Returns `status` with `context` prepended to its message ("context: message"), keeping its
// code. An OK status is returned unchanged.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

// Maps the text of a LibTorch / Gloo exception to a status code: timeouts become
// DEADLINE_EXCEEDED, lost connections UNAVAILABLE, everything else INTERNAL.
absl::Status StatusFromException(const std::exception& e, absl::string_view context);

// Runs `fn` (which returns void, absl::Status or a value) and converts any exception into a
// status annotated with `context`.
template <typename Fn>
auto CallTorch(absl::string_view context, Fn&& fn) {
  using R = decltype(fn());
  if constexpr (std::is_void_v<R>) {
    try {
      fn();
      return absl::OkStatus();
    } catch (const std::exception& e) {
      return StatusFromException(e, context);
    }
  } else if constexpr (std::is_same_v<R, absl::Status>) {
    try {
      return fn();
    } catch (const std::exception& e) {
      return StatusFromException(e, context);
    }
  } else {
    try {
      return absl::StatusOr<R>(fn());
    } catch (const std::exception& e) {
      return absl::StatusOr<R>(StatusFromException(e, context));
    }
  }
}

}  // namespace fsdp

#define FSDP_STATUS_CONCAT_INNER_(x, y) x##y
#define FSDP_STATUS_CONCAT_(x, y) FSDP_STATUS_CONCAT_INNER_(x, y)

// FSDP_RETURN_IF_ERROR(expr) or FSDP_RETURN_IF_ERROR(expr, context-string): returns the
// status of `expr` from the enclosing function if it is not OK, prefixed with the context.
#define FSDP_RETURN_IF_ERROR(...) \
  FSDP_RIE_SELECT_(__VA_ARGS__, FSDP_RIE_2_, FSDP_RIE_1_)(__VA_ARGS__)
#define FSDP_RIE_SELECT_(_1, _2, NAME, ...) NAME
#define FSDP_RIE_1_(expr)                          \
  do {                                             \
    ::absl::Status fsdp_status_ = (expr);          \
    if (!fsdp_status_.ok()) return fsdp_status_;   \
  } while (false)
#define FSDP_RIE_2_(expr, context)                                   \
  do {                                                               \
    ::absl::Status fsdp_status_ = (expr);                            \
    if (!fsdp_status_.ok()) {                                        \
      return ::fsdp::Annotate(fsdp_status_, (context));              \
    }                                                                \
  } while (false)

// FSDP_ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>), returns its
// status if not OK, otherwise assigns the value to `lhs` (which may declare a variable).
#define FSDP_ASSIGN_OR_RETURN(lhs, expr) \
  FSDP_ASSIGN_OR_RETURN_IMPL_(FSDP_STATUS_CONCAT_(fsdp_statusor_, __LINE__), lhs, expr)
#define FSDP_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                \
  if (!statusor.ok()) return statusor.status();          \
  lhs = std::move(statusor).value()

#endif  // FSDP_CPP_COMM_STATUS_MACROS_H_
