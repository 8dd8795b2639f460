/* absl_mutex.h - Abseil's debug-mode mutex deadlock detector off (see absl_mutex.cc). Call
 * before grpc_init(); for any process that uses gRPC core heavily (the server, the load
 * generator). */
#ifndef KEELSON_API_ABSL_MUTEX_H
#define KEELSON_API_ABSL_MUTEX_H

#ifdef __cplusplus
extern "C" {
#endif

void api_absl_deadlock_detection_off(void);

#ifdef __cplusplus
}
#endif
#endif
