/* Policy envelope: syntax errors carry line and column, version must be 1, the embedded default
 * parses, the keys the runtime reads are read. */
#include "check.h"
#include "policy.h"

static void test_syntax_error_position(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    const char *text = "{\n  \"version\": 1,\n  \"audit\": {\"path\" \"x\"}\n}\n";
    CHECK_INT(sh_policy_parse(text, strlen(text), "p.json", &p, &err), -EINVAL);
    CHECK(p == NULL);
    CHECK_INT(err.line, 3);
    char buf[2048];
    sh_policy_error_format(&err, buf, sizeof buf);
    CHECK(strncmp(buf, "p.json:3:", 9) == 0);
}

static void test_version(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    CHECK_INT(sh_policy_parse("{\"version\": 2}", 14, "v.json", &p, &err), -EINVAL);
    char buf[2048];
    sh_policy_error_format(&err, buf, sizeof buf);
    CHECK_STR(buf, "v.json: /version: must be 1");
}

static void test_embedded_default(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    CHECK_INT(sh_policy_resolve(NULL, NULL, NULL, "/nonexistent", &p, &err), 0);
    CHECK(p != NULL);
    CHECK_STR(p->origin, "<embedded default>");
    CHECK_INT(strlen(p->digest), 16);
    CHECK_INT(p->on_error, SH_ON_ERROR_ABORT);
    sh_policy_free(p);
}

static void test_reads_runtime_keys(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    const char *text = "{\"version\":1,\"on_error\":\"warn\",\"enforce\":true,\"audit\":{\"path\":\"/tmp/a.jsonl\"}}";
    CHECK_INT(sh_policy_parse(text, strlen(text), "k.json", &p, &err), 0);
    CHECK_INT(p->on_error, SH_ON_ERROR_WARN);
    CHECK(p->enforce);
    CHECK_STR(p->audit_path, "/tmp/a.jsonl");
    sh_policy_free(p);
}

int main(void) {
    test_syntax_error_position();
    test_version();
    test_embedded_default();
    test_reads_runtime_keys();
    CHECK_DONE();
}
