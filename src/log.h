/* Diagnostics. Silent unless SAFEHOOK_LOG=debug, except sh_warn, which is kept for the one case
 * where a user must hear from us: protection that the policy asks for could not be applied. */
#ifndef SH_LOG_H
#define SH_LOG_H

#include <stdbool.h>

/* True when SAFEHOOK_LOG=debug (read once). */
bool sh_log_debug_enabled(void);

/* Print "safehook: <msg>" on stderr when debugging is on. */
void sh_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print "safehook: <msg>" on stderr, always, as one write. */
void sh_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
