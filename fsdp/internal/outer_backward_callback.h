// End-of-backward callbacks that survive reentrant activation checkpointing.
//
// FSDP finishes a backward pass in a callback queued on autograd's engine
// (Engine::queue_callback), which runs when the graph task that queued it ends. Reentrant
// activation checkpointing (activation_checkpointing.h) runs a nested backward inside the
// outer one; a callback queued during it would run when the nested one ends, before the
// outer backward has reached the units outside the checkpointed region, and finish them too
// early. So checkpointing marks its nested backward with a NestedBackwardScope, and FSDP
// queues through QueueOuterBackwardCallback: inside a scope the callback waits, and is
// queued when the outermost scope closes -- back in the outer backward, whose end then runs it.
//
// Preconditions: scopes are opened and closed on one thread (the engine runs a CPU reentrant
// backward on the calling thread).
#ifndef FSDP_CPP_FSDP_INTERNAL_OUTER_BACKWARD_CALLBACK_H_
#define FSDP_CPP_FSDP_INTERNAL_OUTER_BACKWARD_CALLBACK_H_

#include <functional>

namespace fsdp::internal {

// Queues `callback` to run at the end of the outermost backward pass now running on this
// thread (see above).
void QueueOuterBackwardCallback(std::function<void()> callback);

// Marks a nested backward pass run from inside a backward function.
class NestedBackwardScope {
 public:
  NestedBackwardScope();
  ~NestedBackwardScope();
  NestedBackwardScope(const NestedBackwardScope&) = delete;
  NestedBackwardScope& operator=(const NestedBackwardScope&) = delete;
};

}  // namespace fsdp::internal

#endif  // FSDP_CPP_FSDP_INTERNAL_OUTER_BACKWARD_CALLBACK_H_
