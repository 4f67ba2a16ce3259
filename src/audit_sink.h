/* The client side of safehookd's socket: one record per seqpacket message, one reply byte. */
#ifndef SH_AUDIT_SINK_H
#define SH_AUDIT_SINK_H

#include <stddef.h>

/* The send and receive timeout of later connections (default 5000 ms; tests). */
void sh_audit_sink_set_timeout(int ms);

/* Connect to safehookd at SOCKET_PATH (close-on-exec, 5 s send/receive timeouts). Returns the
 * descriptor, or a negative errno (-ENOENT/-ECONNREFUSED: no daemon there). */
int sh_audit_sink_connect(const char *socket_path);

/* Send the LEN bytes of one record (a JSON object, no newline) on FD and wait for the reply.
 * Returns 0 once safehookd has appended it (or, under its disk_full=keep, counted it as lost),
 * -ENOSPC when it refused it for a full disk, -EINVAL for a record it could not parse, -EBUSY
 * over the sender's rate, -EPERM for an event only the daemon or root may write.
 * Transport: -EPIPE/-ECONNRESET/-ENOTCONN when the record could not be sent (the daemon closed
 * the connection: nothing reached it); -ETIMEDOUT/-ECONNABORTED when it was sent but no reply
 * came: the connection must not be used again (a late reply would answer the next record). */
int sh_audit_sink_send(int fd, const char *text, size_t len);

#endif
