/* The audit log: one JSON line per record, the fixed fields first, appends from several
 * processes interleave as whole lines. */
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

int main(void) {
    const char *tmp = getenv("SH_TEST_TMP");
    snprintf(path, sizeof path, "%s/audit-test-%d.jsonl", tmp ? tmp : "/tmp", (int)getpid());
    unlink(path);
    test_record_fields();
    test_concurrent_appends();
    test_open_failure_keeps_previous();
    unlink(path);
    CHECK_DONE();
}
