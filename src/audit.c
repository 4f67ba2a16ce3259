/* Audit log writer. Records are built with jansson and leave as one write each: appended to a
 * file opened O_APPEND, or sent as one seqpacket message to safehookd (audit_sink.c), which
 * stamps, chains and appends them where the job cannot write. */
#include "audit.h"
#include "audit_sink.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

static int audit_fd = -1;
static char *audit_path;
static int audit_daemon; /* audit_fd is a connection to safehookd */
static pid_t audit_pid;  /* the process that opened audit_fd */
static dev_t audit_dev;  /* ...and what it was, so that a descriptor the host closed and */
static ino_t audit_ino;  /* reused is never written to */
static int audit_broken; /* the connection lost a reply: the next record reconnects */

static int file_open(const char *path) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0644);
    return fd < 0 ? -errno : fd;
}

static int adopt(int fd, const char *path, int daemon) {
    struct stat st;
    char *copy = strdup(path);
    if (!copy || fstat(fd, &st) < 0) {
        int r = copy ? -errno : -ENOMEM;
        free(copy);
        close(fd);
        return r;
    }
    sh_audit_close();
    audit_fd = fd;
    audit_path = copy;
    audit_daemon = daemon;
    audit_pid = getpid();
    audit_dev = st.st_dev;
    audit_ino = st.st_ino;
    audit_broken = 0;
    return 0;
}

int sh_audit_open(const char *path) {
    int fd = file_open(path);
    return fd < 0 ? fd : adopt(fd, path, 0);
}

int sh_audit_connect(const char *socket_path) {
    int fd = sh_audit_sink_connect(socket_path);
    return fd < 0 ? fd : adopt(fd, socket_path, 1);
}

void sh_audit_close(void) {
    /* Only a descriptor still ours is closed: the host may have closed and reused it. */
    if (audit_fd >= 0 && sh_audit_fd_is_ours())
        close(audit_fd);
    audit_fd = -1;
    free(audit_path);
    audit_path = NULL;
    audit_daemon = 0;
}

bool sh_audit_active(void) { return audit_fd >= 0; }

bool sh_audit_daemon(void) { return audit_fd >= 0 && audit_daemon; }

const char *sh_audit_path(void) { return audit_path; }

bool sh_audit_fd_is_ours(void) {
    struct stat st;
    return audit_fd >= 0 && fstat(audit_fd, &st) == 0 && st.st_dev == audit_dev && st.st_ino == audit_ino;
}

/* Before a write: a forked child reconnects (its own connection, not its parent's), so does a
 * process whose connection lost a reply, and a descriptor the host closed (and maybe reused
 * for its own file) is replaced, never written. */
static int check_origin(void) {
    int fresh = (getpid() != audit_pid || audit_broken) && audit_daemon;
    if (!fresh && sh_audit_fd_is_ours())
        return 0;
    int fd = audit_daemon ? sh_audit_sink_connect(audit_path) : file_open(audit_path);
    if (fd < 0)
        return fd;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return -errno;
    }
    if (fresh && sh_audit_fd_is_ours())
        close(audit_fd); /* the parent's connection, inherited: this process's copy only */
    audit_fd = fd;
    audit_pid = getpid();
    audit_dev = st.st_dev;
    audit_ino = st.st_ino;
    audit_broken = 0;
    return 0;
}

/* Send one record to safehookd. A connection the daemon closed (a restart, a dropped client)
 * took nothing: the record goes once more on a new one. One that timed out may still answer
 * later: it is never used again. */
static int daemon_send(const char *text, size_t len) {
    int r = sh_audit_sink_send(audit_fd, text, len);
    if (r == -EPIPE || r == -ECONNRESET || r == -ENOTCONN) {
        audit_broken = 1;
        int c = check_origin();
        if (c < 0)
            return c;
        r = sh_audit_sink_send(audit_fd, text, len);
    }
    if (r == -ETIMEDOUT || r == -ECONNABORTED || r == -EPIPE || r == -ECONNRESET || r == -ENOTCONN)
        audit_broken = 1;
    return r;
}

static int write_all(int fd, const char *buf, size_t len) {
    /* A regular file opened O_APPEND takes the whole record in one write; the loop only
     * covers a short write on a full disk or an interrupted pipe. */
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int sh_audit_emit(const char *event, long long step, json_t *fields) {
    int ret = -ENOENT;
    if (audit_fd < 0)
        goto out_fields;
    ret = check_origin();
    if (ret < 0)
        goto out_fields;

    struct timeval tv;
    gettimeofday(&tv, NULL);
    json_t *rec = json_object();
    if (!rec) {
        ret = -ENOMEM;
        goto out_fields;
    }
    json_object_set_new(rec, "event", json_string(event));
    json_object_set_new(rec, "time", json_real((double)tv.tv_sec + tv.tv_usec / 1e6));
    json_object_set_new(rec, "pid", json_integer(getpid()));
    if (step >= 0)
        json_object_set_new(rec, "step", json_integer(step));
    if (fields) {
        const char *key;
        json_t *val;
        json_object_foreach(fields, key, val) {
            if (strcmp(key, "event") && strcmp(key, "time") && strcmp(key, "pid") && strcmp(key, "step"))
                json_object_set(rec, key, val);
        }
    }
    char *text = json_dumps(rec, JSON_COMPACT | JSON_ENSURE_ASCII);
    json_decref(rec);
    if (!text) {
        ret = -ENOMEM;
        goto out_fields;
    }
    size_t len = strlen(text);
    if (audit_daemon) {
        ret = daemon_send(text, len);
        free(text);
        goto out_fields;
    }
    char *line = realloc(text, len + 2);
    if (!line) {
        free(text);
        ret = -ENOMEM;
        goto out_fields;
    }
    line[len] = '\n';
    line[len + 1] = '\0';
    ret = write_all(audit_fd, line, len + 1);
    free(line);
out_fields:
    json_decref(fields);
    return ret;
}
