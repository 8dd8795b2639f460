// absl_mutex.cc - turns off Abseil's mutex deadlock detector inside gRPC core.
//
// Debian builds Abseil without NDEBUG, so it runs in debug mode: every absl::Mutex that gRPC
// core locks (completion queues, calls, the executor) is checked against a process-wide graph
// of lock orders kept under one global lock, and every destroyed Mutex is removed from it.
// Under put load that was 2.5% of a member's CPU (GraphCycles::GetId and friends, perf) and a
// lock shared by every gRPC thread. Release builds of Abseil (and grpc-go's etcd) have none.
// C++ because that is the only interface Abseil offers; called from C (absl_mutex.h).
#include "api/absl_mutex.h"

#include <absl/synchronization/mutex.h>

void api_absl_deadlock_detection_off(void)
{
	absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}
