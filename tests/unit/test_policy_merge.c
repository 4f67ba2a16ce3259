/* Policy precedence and tightening: which source applies, that a user policy does not inherit
 * the default's sections, and that under an enforced system policy every kind of rule refuses a
 * weakening (naming the key) and accepts a tightening, with the system's values kept for the
 * keys the user leaves out. The system policy is passed by path: nothing under /etc is read. */
#include <unistd.h>

#include "check.h"
#include "policy.h"

static char dir[4096];

static const char *write_file(const char *name, const char *text) {
    static char paths[8][4200];
    static int next;
    char *path = paths[next++ % 8];
    snprintf(path, sizeof paths[0], "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
    return path;
}

static const char *SYSTEM =
    "{\"version\": 1, \"enforce\": true,\n"
    " \"freeze\": {\"layers\": [\"4-7\", \"10-11\"], \"params\": [\"embed*\"], \"check_every\": 20},\n"
    " \"probes\": {\"harm\": {\"data\": \"/srv/harm.jsonl\"}},\n"
    " \"monitor\": {\"probe\": \"harm\", \"every\": 100, \"threshold\": 0.98},\n"
    " \"audit\": {\"path\": \"/var/log/safehook.jsonl\", \"level\": \"sample\"}}\n";

static const char *sys_path;

/* Resolve USER_TEXT against the enforced SYSTEM; the error line, or "" on success (*ret set). */
static const char *resolve(const char *user_text, sh_policy **ret) {
    static char buf[2048];
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    int r = sh_policy_resolve(NULL, user_text, "u.json", sys_path, &p, &err);
    if (r == 0) {
        if (ret)
            *ret = p;
        else
            sh_policy_free(p);
        return "";
    }
    if (r != -EPERM)
        fprintf(stderr, "not a weakening (%d): ", r);
    sh_policy_error_format(&err, buf, sizeof buf);
    if (r == -EPERM && err.kind != SH_POLICY_ERR_WEAKENING)
        return "a weakening error without the weakening kind";
    return buf;
}

static json_t *at(sh_policy *p, const char *section, const char *key) {
    return json_object_get(json_object_get(p->doc, section), key);
}

static void test_sources(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    const char *missing = "/nonexistent/system.json";
    const char *user = write_file("user.json", "{\"version\": 1, \"safegrad\": {}}");
    const char *advisory =
        write_file("advisory.json", "{\"version\": 1, \"audit\": {\"level\": \"events\"}}");

    /* nothing given: the embedded default, which has an audit section */
    CHECK_INT(sh_policy_resolve(NULL, NULL, NULL, missing, &p, &err), 0);
    CHECK_STR(p->origin, "<embedded default>");
    CHECK(json_object_get(p->doc, "audit") != NULL);
    sh_policy_free(p);

    /* a user policy alone: it does not inherit the default's sections */
    CHECK_INT(sh_policy_resolve(user, NULL, NULL, missing, &p, &err), 0);
    char want[4300];
    snprintf(want, sizeof want, "user:%s", user);
    CHECK_STR(p->origin, want);
    CHECK(json_object_get(p->doc, "audit") == NULL);
    CHECK(json_object_get(p->doc, "safegrad") != NULL);
    sh_policy_free(p);

    /* a system policy alone applies, enforced or not */
    CHECK_INT(sh_policy_resolve(NULL, NULL, NULL, advisory, &p, &err), 0);
    snprintf(want, sizeof want, "system:%s", advisory);
    CHECK_STR(p->origin, want);
    CHECK(!p->system_enforced);
    sh_policy_free(p);
    CHECK_INT(sh_policy_resolve(NULL, NULL, NULL, sys_path, &p, &err), 0);
    CHECK(p->system_enforced);
    CHECK_STR(p->audit_path, "/var/log/safehook.jsonl");
    sh_policy_free(p);

    /* an advisory system policy gives way to the user's entirely */
    CHECK_INT(sh_policy_resolve(NULL, "{\"version\": 1}", "<dict>", advisory, &p, &err), 0);
    CHECK_STR(p->origin, "user:<dict>");
    CHECK(json_object_get(p->doc, "audit") == NULL);
    sh_policy_free(p);

    /* an invalid system policy stops everything, even with a valid user policy */
    const char *broken = write_file("broken.json", "{\"version\": 1, \"enforce\": \"yes\"}");
    CHECK_INT(sh_policy_resolve(user, NULL, NULL, broken, &p, &err), -EINVAL);
    char line[2048];
    sh_policy_error_format(&err, line, sizeof line);
    snprintf(want, sizeof want, "%s: /enforce: must be true or false, not \"yes\"", broken);
    CHECK_STR(line, want);

    /* an invalid user policy is reported under its own name */
    CHECK_INT(sh_policy_resolve(NULL, "{\"version\": 1, \"gate\": {}}", "<dict>", sys_path, &p, &err),
              -EINVAL);
    sh_policy_error_format(&err, line, sizeof line);
    CHECK_STR(line, "<dict>: /gate/probe: required key is missing");
}

static void test_tightening_keeps_system_values(void) {
    sh_policy *p = NULL;
    /* the user lowers monitor.every; threshold stays the system's 0.98, not the default 0.95 */
    CHECK_STR(resolve("{\"version\": 1, \"monitor\": {\"probe\": \"harm\", \"every\": 50}}", &p), "");
    if (!p)
        return;
    CHECK_INT(json_integer_value(at(p, "monitor", "every")), 50);
    CHECK(json_real_value(at(p, "monitor", "threshold")) == 0.98);
    /* sections the user leaves out hold as the system wrote them */
    CHECK_INT(json_integer_value(at(p, "freeze", "check_every")), 20);
    CHECK_STR(json_string_value(at(p, "audit", "level")), "sample");
    CHECK(p->enforce);
    CHECK(p->system_enforced);
    char want[4300];
    snprintf(want, sizeof want, "system:%s+user:u.json", sys_path);
    CHECK_STR(p->origin, want);
    sh_policy_free(p);

    /* the user adds a probe, a gate on it, SafeGrad, more frozen blocks and a stricter level */
    p = NULL;
    CHECK_STR(resolve("{\"version\": 1, \"probes\": {\"mine\": {\"callable\": \"my.mod:loss\"}},"
                      " \"gate\": {\"probe\": \"mine\"}, \"safegrad\": {\"granularity\": \"layer\"},"
                      " \"freeze\": {\"layers\": [\"2-12\"], \"params\": [\"lm_head*\", \"embed*\"]},"
                      " \"audit\": {\"level\": \"steps\"}, \"on_error\": \"abort\"}",
                      &p),
              "");
    if (!p)
        return;
    CHECK(json_object_get(json_object_get(p->doc, "probes"), "harm") != NULL);
    CHECK(json_object_get(json_object_get(p->doc, "probes"), "mine") != NULL);
    CHECK_STR(json_string_value(at(p, "gate", "probe")), "mine");
    CHECK_STR(json_string_value(json_array_get(at(p, "freeze", "layers"), 0)), "2-12");
    CHECK_STR(json_string_value(at(p, "audit", "level")), "steps");
    CHECK_STR(json_string_value(at(p, "audit", "path")), "/var/log/safehook.jsonl");
    sh_policy_free(p);

    /* the same values as the system's are not a weakening */
    CHECK_STR(resolve("{\"version\": 1, \"enforce\": true, \"monitor\": {\"probe\": \"harm\", \"every\": 100,"
                      " \"threshold\": 0.98}, \"audit\": {\"path\": \"/var/log/safehook.jsonl\"}}",
                      NULL),
              "");
}

static void test_weakenings_refused(void) {
    char sys[4300];
    snprintf(sys, sizeof sys, "weakens the enforced system policy %s", sys_path);
    struct {
        const char *user, *pointer, *detail;
    } cases[] = {
        {"{\"version\": 1, \"enforce\": false}", "/enforce", "must stay true"},
        {"{\"version\": 1, \"on_error\": \"warn\"}", "/on_error", "must be one of \"abort\", not \"warn\""},
        {"{\"version\": 1, \"monitor\": {\"every\": 200}}", "/monitor/every", "must be <= 100, not 200"},
        {"{\"version\": 1, \"monitor\": {\"threshold\": 0.9}}", "/monitor/threshold",
         "must be >= 0.98, not 0.9"},
        {"{\"version\": 1, \"monitor\": {\"action\": \"reduce_lr\"}}", "/monitor/action",
         "must be one of \"rollback\", \"both\", \"stop\", not \"reduce_lr\""},
        {"{\"version\": 1, \"monitor\": {\"probe\": \"other\"}, \"probes\": {\"other\": {\"callable\": "
         "\"a:b\"}}}",
         "/monitor/probe", "it sets \"harm\", which cannot be changed (not \"other\")"},
        {"{\"version\": 1, \"audit\": {\"level\": \"events\"}}", "/audit/level",
         "must be one of \"sample\", \"steps\", not \"events\""},
        {"{\"version\": 1, \"audit\": {\"path\": null}}", "/audit/path",
         "it sets \"/var/log/safehook.jsonl\", which cannot be changed (not null)"},
        {"{\"version\": 1, \"audit\": {\"sample_every\": 11}}", "/audit/sample_every",
         "must be <= 10, not 11"},
        {"{\"version\": 1, \"freeze\": {\"restore\": false}}", "/freeze/restore", "must stay true"},
        {"{\"version\": 1, \"freeze\": {\"check_every\": 21}}", "/freeze/check_every",
         "must be <= 20, not 21"},
        {"{\"version\": 1, \"freeze\": {\"params\": [\"lm_head*\"]}}", "/freeze/params",
         "must keep \"embed*\""},
        {"{\"version\": 1, \"freeze\": {\"layers\": [\"4-6\", \"10-11\"]}}", "/freeze/layers",
         "must cover the blocks 4-7 it freezes (block 7 is missing)"},
        {"{\"version\": 1, \"freeze\": {\"layers\": [\"0-5\", \"6-9\", \"11-12\"]}}", "/freeze/layers",
         "must cover the blocks 10-11 it freezes (block 10 is missing)"},
        {"{\"version\": 1, \"freeze\": {\"layers\": {\"fraction\": [0, 1]}}}", "/freeze/layers",
         "must cover its layers [\"4-7\",\"10-11\"], given in the same form (block ranges and fractions of "
         "depth "
         "cannot be compared before the model is known)"},
        {"{\"version\": 1, \"probes\": {\"harm\": {\"data\": \"/tmp/easy.jsonl\"}}}", "/probes/harm",
         "it defines this probe, which cannot be changed (add a probe under another name)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char want[6000];
        snprintf(want, sizeof want, "u.json: %s: %s: %s", cases[i].pointer, sys, cases[i].detail);
        CHECK_STR(resolve(cases[i].user, NULL), want);
    }
    /* covering ranges split differently are a tightening */
    CHECK_STR(resolve("{\"version\": 1, \"freeze\": {\"layers\": [\"3-5\", \"6-8\", \"10\", \"11\"]}}", NULL),
              "");
}

static void test_fraction_and_same_rules(void) {
    const char *fsys =
        write_file("fraction-system.json", "{\"version\": 1, \"enforce\": true, \"on_error\": \"warn\","
                                           " \"freeze\": {\"layers\": {\"fraction\": [0.25, 0.75]}},"
                                           " \"safegrad\": {\"source\": \"anchor\", \"threshold\": 0.1},"
                                           " \"gate\": {\"probe\": \"g\", \"mode\": \"exact\"},"
                                           " \"probes\": {\"g\": {\"callable\": \"pkg.mod:fn\"}}}");
    struct {
        const char *user, *want;
    } cases[] = {
        {"{\"version\": 1, \"freeze\": {\"layers\": {\"fraction\": [0.2, 0.8]}}}", ""},
        {"{\"version\": 1, \"on_error\": \"abort\"}", ""},
        {"{\"version\": 1, \"freeze\": {\"layers\": {\"fraction\": [0.3, 0.8]}}}",
         "/freeze/layers: must cover the fraction [0.25, 0.75] it freezes"},
        {"{\"version\": 1, \"freeze\": {\"layers\": [\"0-100\"]}}",
         "/freeze/layers: must cover its layers {\"fraction\":[0.25,0.75]}, given in the same form (block "
         "ranges and "
         "fractions of depth cannot be compared before the model is known)"},
        {"{\"version\": 1, \"safegrad\": {\"source\": \"direction\", \"direction\": \"d.safetensors\"}}",
         "/safegrad/source: it sets \"anchor\", which cannot be changed (not \"direction\")"},
        {"{\"version\": 1, \"safegrad\": {\"threshold\": 0.0}}",
         "/safegrad/threshold: must be >= 0.1, not 0.0"},
        {"{\"version\": 1, \"gate\": {\"mode\": \"first_order\"}}",
         "/gate/mode: must be one of \"exact\", not \"first_order\""},
        {"{\"version\": 1, \"gate\": {\"tolerance\": 0.5}}", "/gate/tolerance: must be <= 0.0, not 0.5"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        sh_policy *p = NULL;
        sh_policy_error err = {0};
        int r = sh_policy_resolve(NULL, cases[i].user, "u.json", fsys, &p, &err);
        char line[2048], want[6000];
        if (r == 0) {
            CHECK_STR("", cases[i].want);
            sh_policy_free(p);
            continue;
        }
        const char *colon = strstr(err.text, ": ");
        snprintf(line, sizeof line, "%s: %s", err.pointer, colon ? colon + 2 : err.text);
        snprintf(want, sizeof want, "%s", cases[i].want);
        CHECK_STR(line, want);
        CHECK_INT(err.kind, SH_POLICY_ERR_WEAKENING);
    }
}

/* shaping under enforcement: guards may be added, never dropped; thresholds may only flag more;
 * the action only grows stronger; the calibration data stays the system's */
static void test_shaping_rules(void) {
    const char *ssys = write_file(
        "shaping-system.json",
        "{\"version\": 1, \"enforce\": true, \"probes\": {\"r\": {\"data\": \"/srv/r.jsonl\"},"
        " \"b\": {\"data\": \"/srv/b.jsonl\"}},"
        " \"shaping\": {\"probe\": \"r\", \"benign\": \"b\", \"guards\": [\"direction\"], \"action\": \"mask\"}}");
    struct {
        const char *user, *want;
    } cases[] = {
        {"{\"version\": 1, \"shaping\": {\"guards\": [\"refusal\", \"direction\"], \"tpr\": 0.99, "
         "\"max_fpr\": 0.1, \"action\": \"refuse\"}}",
         ""},
        {"{\"version\": 1, \"shaping\": {\"guards\": [\"refusal\"]}}",
         "/shaping/guards: must keep \"direction\""},
        {"{\"version\": 1, \"shaping\": {\"tpr\": 0.5}}", "/shaping/tpr: must be >= 0.95, not 0.5"},
        {"{\"version\": 1, \"shaping\": {\"max_fpr\": 0.01}}", "/shaping/max_fpr: must be >= 0.05, not 0.01"},
        {"{\"version\": 1, \"shaping\": {\"action\": \"weight\"}}",
         "/shaping/action: must be one of \"mask\", \"subtract\", \"refuse\", not \"weight\""},
        {"{\"version\": 1, \"probes\": {\"b2\": {\"data\": \"/tmp/b.jsonl\"}}, \"shaping\": {\"benign\": \"b2\"}}",
         "/shaping/benign: it sets \"b\", which cannot be changed (not \"b2\")"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        sh_policy *p = NULL;
        sh_policy_error err = {0};
        int r = sh_policy_resolve(NULL, cases[i].user, "u.json", ssys, &p, &err);
        char line[2048];
        if (r == 0) {
            CHECK_STR("", cases[i].want);
            CHECK_INT((int)json_array_size(at(p, "shaping", "guards")), 2);
            sh_policy_free(p);
            continue;
        }
        const char *colon = strstr(err.text, ": ");
        snprintf(line, sizeof line, "%s: %s", err.pointer, colon ? colon + 2 : err.text);
        CHECK_STR(line, cases[i].want);
        CHECK_INT(err.kind, SH_POLICY_ERR_WEAKENING);
    }
}

int main(void) {
    const char *tmp = getenv("SH_TEST_TMP");
    snprintf(dir, sizeof dir, "%s/policy-merge-%d", tmp ? tmp : "/tmp", (int)getpid());
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    if (system(cmd) != 0)
        return 1;
    sys_path = write_file("system.json", SYSTEM);
    test_sources();
    test_tightening_keeps_system_values();
    test_weakenings_refused();
    test_fraction_and_same_rules();
    test_shaping_rules();
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        return 1;
    CHECK_DONE();
}
