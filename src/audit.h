/* The audit log: one JSON object per line, appended with one write(2) per record, so that
 * several processes (torchrun ranks, spawned children) can share one file. */
#ifndef SH_AUDIT_H
#define SH_AUDIT_H

#include <jansson.h>
#include <stdbool.h>

/* Open PATH for appending (created 0644 if missing; never through a symbolic link, -ELOOP;
 * close-on-exec), replacing any log already open. Returns 0, or a negative errno with the
 * previous log left open. */
int sh_audit_open(const char *path);

/* Send records to safehookd at SOCKET_PATH instead of a file, replacing any log already open; the
 * process then holds no writable log descriptor. Returns 0, or a negative errno (the daemon is
 * unreachable) with the previous log left open. */
int sh_audit_connect(const char *socket_path);

/* True when records go to safehookd. */
bool sh_audit_daemon(void);

/* True when the descriptor open is still the file or socket that was opened (the host process
 * has not closed it and reused the number). */
bool sh_audit_fd_is_ours(void);

/* Close the log; later records are dropped. */
void sh_audit_close(void);

/* True when a log is open. */
bool sh_audit_active(void);

/* The path given to the last successful sh_audit_open or sh_audit_connect, or NULL. */
const char *sh_audit_path(void);

/* Write one record: {"event": EVENT, "time": unix seconds, "pid": getpid(), "step": STEP,
 * ...FIELDS}. STEP < 0 leaves "step" out. Takes ownership of FIELDS (may be NULL); keys of FIELDS
 * named event/time/pid/step are ignored. Returns 0, -ENOENT when no log is open, or a negative
 * errno from the write (for safehookd: see sh_audit_sink_send; -ENOSPC: the daemon refused it
 * for a full disk). A forked child reconnects to safehookd before its first record; so does a
 * process whose last record got no reply in time (the late reply is never read as this one's);
 * a connection the daemon closed is replaced and the record sent once more; a descriptor the
 * host closed and reused is reopened, never written to. */
int sh_audit_emit(const char *event, long long step, json_t *fields);

#endif
