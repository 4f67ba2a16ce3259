/* Diagnostics on stderr, each line prefixed "safehook:" and written with one write(2). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int debug_state = -1; /* -1 unknown, 0 off, 1 on */

bool sh_log_debug_enabled(void) {
    if (debug_state < 0) {
        const char *v = secure_getenv("SAFEHOOK_LOG");
        debug_state = v && strcmp(v, "debug") == 0;
    }
    return debug_state == 1;
}

static void emit(const char *fmt, va_list ap) {
    char line[2048];
    int n = snprintf(line, sizeof line, "safehook: ");
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + ((size_t)m < sizeof line - (size_t)n - 1 ? (size_t)m : sizeof line - (size_t)n - 2);
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

void sh_debug(const char *fmt, ...) {
    if (!sh_log_debug_enabled())
        return;
    va_list ap;
    va_start(ap, fmt);
    emit(fmt, ap);
    va_end(ap);
}

void sh_warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    emit(fmt, ap);
    va_end(ap);
}
