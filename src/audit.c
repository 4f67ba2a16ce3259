/* Audit log writer. Records are built with jansson and written as single O_APPEND writes. */
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static int audit_fd = -1;
static char *audit_path;

int sh_audit_open(const char *path) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0644);
    if (fd < 0)
        return -errno;
    char *copy = strdup(path);
    if (!copy) {
        close(fd);
        return -ENOMEM;
    }
    sh_audit_close();
    audit_fd = fd;
    audit_path = copy;
    return 0;
}

void sh_audit_close(void) {
    if (audit_fd >= 0)
        close(audit_fd);
    audit_fd = -1;
    free(audit_path);
    audit_path = NULL;
}

bool sh_audit_active(void) { return audit_fd >= 0; }

const char *sh_audit_path(void) { return audit_path; }

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
