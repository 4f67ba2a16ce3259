/* The client side of safehookd's socket: one record per seqpacket message, one reply byte. */
#ifndef SH_AUDIT_SINK_H
#define SH_AUDIT_SINK_H

#include <stddef.h>

/* Connect to safehookd at SOCKET_PATH (close-on-exec, 5 s send/receive timeouts). Returns the
 * descriptor, or a negative errno (-ENOENT/-ECONNREFUSED: no daemon there). */
int sh_audit_sink_connect(const char *socket_path);

/* Send the LEN bytes of one record (a JSON object, no newline) on FD and wait for the reply.
 * Returns 0 once safehookd has appended it (or, under its disk_full=keep, counted it as lost),
 * -ENOSPC when it refused it for a full disk, -EINVAL for a record it could not parse,
 * -ETIMEDOUT/-EPIPE/-ECONNRESET when the daemon did not answer. */
int sh_audit_sink_send(int fd, const char *text, size_t len);

#endif
