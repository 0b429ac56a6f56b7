/*
 * clock.c - a monotonic clock for the library's own timing (the model's attention vs dense
 * split). Timing never changes a result.
 */
#define _POSIX_C_SOURCE 200809L
#include "core/core.h"

#include <time.h>

double ef_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
