/* libsafehook.so's parts beside its bootstrap (preload.c): the system policy as the preload
 * reads it, and the refusal record it sends to safehookd. libc only. */
#ifndef SH_PRELOAD_H
#define SH_PRELOAD_H

#include <stddef.h>

enum {
    SH_SYS_NONE,     /* no system policy, and its absence can be trusted */
    SH_SYS_ADVISORY, /* certainly not enforced */
    SH_SYS_ENFORCED, /* enforced, or unreadable, or anything the scanner is not sure of */
    SH_SYS_HIDDEN,   /* missing, but it may be hidden from this process (a user namespace) */
};

/* The state of the system policy at PATH; its top-level audit.socket (a plain string) is
 * copied into SOCKET when present. */
int sh_preload_system_policy(const char *path, char *socket, size_t socket_cap);

/* The scanner itself, on LEN bytes of TEXT (tests). */
int sh_preload_scan_policy(const char *text, size_t len, char *socket, size_t socket_cap);

/* Best effort, 2 s at most: a "refused" record {why, system_policy, lib} to safehookd. */
void sh_preload_send_refusal(const char *socket_path, const char *why, const char *system, const char *lib);

#endif
