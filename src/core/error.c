/* error.c - status names and the thread-local last-error message. */
#include "core/core.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char ef_errbuf[512];

const char *ef_version(void) { return "0.1.0"; }

const char *ef_status_str(ef_status s) {
    switch (s) {
    case EF_OK: return "EF_OK";
    case EF_ERR_ARG: return "EF_ERR_ARG";
    case EF_ERR_SHAPE: return "EF_ERR_SHAPE";
    case EF_ERR_NOMEM: return "EF_ERR_NOMEM";
    case EF_ERR_IO: return "EF_ERR_IO";
    case EF_ERR_FORMAT: return "EF_ERR_FORMAT";
    case EF_ERR_UNSUPPORTED: return "EF_ERR_UNSUPPORTED";
    case EF_ERR_NUMERIC: return "EF_ERR_NUMERIC";
    }
    return "EF_ERR_UNKNOWN";
}

const char *ef_last_error(void) { return ef_errbuf; }

void ef_clear_error(void) { ef_errbuf[0] = '\0'; }

ef_status ef_error(ef_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ef_errbuf, sizeof ef_errbuf, fmt, ap);
    va_end(ap);
    return s;
}
