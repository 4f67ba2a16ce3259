/* How the audit log is opened: never through a symbolic link (a planted link cannot redirect the
 * records), close-on-exec (a child the host execs does not inherit it). */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "audit.h"
#include "check.h"

int main(void) {
    const char *dir = getenv("SH_TEST_TMP");
    char target[1024], link[1024];
    snprintf(target, sizeof target, "%s/audit-open-target.jsonl", dir ? dir : "/tmp");
    snprintf(link, sizeof link, "%s/audit-open-link.jsonl", dir ? dir : "/tmp");
    unlink(target);
    unlink(link);
    CHECK_INT(symlink(target, link), 0);
    CHECK_INT(sh_audit_open(link), -ELOOP);
    CHECK(!sh_audit_active());
    CHECK(access(target, F_OK) != 0); /* nothing created through the link */

    CHECK_INT(sh_audit_open(target), 0);
    CHECK(sh_audit_active());
    int cloexec = 0;
    for (int fd = 3; fd < 1024; fd++) { /* the log's descriptor: the one open on TARGET */
        char proc[64], seen[1024];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(proc, seen, sizeof seen - 1);
        if (n <= 0)
            continue;
        seen[n] = '\0';
        if (strstr(seen, "audit-open-target.jsonl"))
            cloexec = (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
    }
    CHECK(cloexec);
    sh_audit_close();
    unlink(target);
    unlink(link);
    CHECK_DONE();
}
