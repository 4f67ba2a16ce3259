/* The audit log: one JSON line per record, the fixed fields first, appends from several
 * processes interleave as whole lines. */
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "audit.h"
#include "check.h"

static char path[1024];

static int count_lines(const char *p, int *bad) {
    FILE *f = fopen(p, "r");
    char line[4096];
    int n = 0;
    *bad = 0;
    while (f && fgets(line, sizeof line, f)) {
        json_error_t e;
        json_t *j = json_loads(line, 0, &e);
        if (!j || !json_is_string(json_object_get(j, "event")) || !json_is_integer(json_object_get(j, "pid")))
            (*bad)++;
        json_decref(j);
        n++;
    }
    if (f)
        fclose(f);
    return n;
}

static void test_record_fields(void) {
    CHECK_INT(sh_audit_open(path), 0);
    json_t *f = json_pack("{s:i, s:s, s:i}", "opt", 3, "event", "overridden", "step", 99);
    CHECK_INT(sh_audit_emit("step", 7, f), 0);
    CHECK_INT(sh_audit_emit("start", -1, NULL), 0);
    sh_audit_close();
    CHECK(!sh_audit_active());
    CHECK_INT(sh_audit_emit("lost", 1, NULL), -ENOENT);

    FILE *fp = fopen(path, "r");
    char line[1024];
    CHECK(fgets(line, sizeof line, fp) != NULL);
    json_t *j = json_loads(line, 0, NULL);
    CHECK_STR(json_string_value(json_object_get(j, "event")), "step");
    CHECK_INT(json_integer_value(json_object_get(j, "step")), 7);
    CHECK_INT(json_integer_value(json_object_get(j, "opt")), 3);
    CHECK_INT(json_integer_value(json_object_get(j, "pid")), getpid());
    CHECK(json_real_value(json_object_get(j, "time")) > 1.6e9);
    CHECK(strncmp(line, "{\"event\":\"step\",\"time\":", 23) == 0);
    json_decref(j);
    CHECK(fgets(line, sizeof line, fp) != NULL);
    j = json_loads(line, 0, NULL);
    CHECK(json_object_get(j, "step") == NULL);
    json_decref(j);
    CHECK(fgets(line, sizeof line, fp) == NULL);
    fclose(fp);
}

static void test_concurrent_appends(void) {
    unlink(path);
    enum { PROCS = 4, RECS = 500 };
    for (int p = 0; p < PROCS; p++) {
        if (fork() == 0) {
            if (sh_audit_open(path) != 0)
                _exit(1);
            for (int i = 0; i < RECS; i++) {
                /* a long field makes a torn record likely if writes were not one per record */
                json_t *f = json_pack("{s:s, s:i}", "pad",
                                      "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                                      "i", i);
                sh_audit_emit("step", i, f);
            }
            _exit(0);
        }
    }
    for (int p = 0; p < PROCS; p++) {
        int status;
        wait(&status);
        CHECK_INT(WEXITSTATUS(status), 0);
    }
    int bad;
    CHECK_INT(count_lines(path, &bad), PROCS * RECS);
    CHECK_INT(bad, 0);
}

static void test_open_failure_keeps_previous(void) {
    CHECK_INT(sh_audit_open(path), 0);
    CHECK_INT(sh_audit_open("/nonexistent-dir/x/audit.jsonl"), -ENOENT);
    CHECK(sh_audit_active());
    CHECK_STR(sh_audit_path(), path);
    sh_audit_close();
}

static void test_reused_descriptor_is_never_written(void) {
    unlink(path);
    /* the log gets the lowest free descriptor number: find it, then close it behind the
     * audit's back and let the host open its own file under the same number */
    int probe = open("/dev/null", O_RDONLY);
    CHECK(probe >= 0);
    close(probe);
    CHECK_INT(sh_audit_open(path), 0);
    CHECK(sh_audit_fd_is_ours());
    close(probe);
    char other[1100];
    snprintf(other, sizeof other, "%s.host", path);
    int host = open(other, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK_INT(host, probe);
    CHECK(!sh_audit_fd_is_ours());
    CHECK_INT(sh_audit_emit("step", 1, NULL), 0);
    struct stat st;
    CHECK_INT(fstat(host, &st), 0);
    CHECK_INT((int)st.st_size, 0); /* nothing written into the host's file */
    int bad;
    CHECK_INT(count_lines(path, &bad), 1); /* the record went to the log, reopened */
    CHECK_INT(bad, 0);
    sh_audit_close();
    /* closing must not close the host's descriptor either */
    CHECK_INT(fstat(host, &st), 0);
    close(host);
    unlink(other);
}

static void test_symlinked_log_is_refused(void) {
    char link[1100];
    snprintf(link, sizeof link, "%s.link", path);
    unlink(link);
    CHECK_INT(symlink(path, link), 0);
    CHECK_INT(sh_audit_open(link), -ELOOP);
    unlink(link);
}

static void test_unreachable_daemon(void) {
    char sock[1100];
    snprintf(sock, sizeof sock, "%s.sock", path);
    CHECK_INT(sh_audit_connect(sock), -ENOENT);
    CHECK(!sh_audit_daemon());
}

int main(void) {
    const char *tmp = getenv("SH_TEST_TMP");
    snprintf(path, sizeof path, "%s/audit-test-%d.jsonl", tmp ? tmp : "/tmp", (int)getpid());
    unlink(path);
    test_record_fields();
    test_concurrent_appends();
    test_open_failure_keeps_previous();
    test_reused_descriptor_is_never_written();
    test_symlinked_log_is_refused();
    test_unreachable_daemon();
    unlink(path);
    CHECK_DONE();
}
