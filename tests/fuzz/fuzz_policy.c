/* libFuzzer target for policies: parse + validate + normalize any bytes, resolve them as a user
 * policy against an enforced system policy and as a system policy under a fixed user policy.
 * Besides the sanitizers' findings it aborts when an error line is not one line of valid UTF-8,
 * or when normalizing a normalized policy changes its digest. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "policy.h"

static char tmp_dir[64], sys_enforced[4096], sys_fuzzed[4096];

static void cleanup(void) {
    remove(sys_enforced);
    remove(sys_fuzzed);
    rmdir(tmp_dir);
}

static const char *SYSTEM = "{\"version\": 1, \"enforce\": true, \"on_error\": \"warn\","
                            " \"freeze\": {\"layers\": [\"2-3\", \"6-7\"], \"params\": [\"embed*\"]},"
                            " \"safegrad\": {\"threshold\": 0.1},"
                            " \"probes\": {\"harm\": {\"data\": \"/srv/harm.jsonl\"}},"
                            " \"gate\": {\"probe\": \"harm\", \"every\": 4},"
                            " \"monitor\": {\"probe\": \"harm\", \"every\": 100, \"threshold\": 0.98},"
                            " \"audit\": {\"path\": \"/var/log/safehook.jsonl\", \"level\": \"sample\"}}";

static const char *USER = "{\"version\": 1, \"monitor\": {\"every\": 10}, \"freeze\": {\"layers\": \"0-9\"}}";

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/safehook-fuzz-XXXXXX");
    if (!mkdtemp(tmp_dir))
        abort();
    snprintf(sys_enforced, sizeof sys_enforced, "%s/enforced.json", tmp_dir);
    snprintf(sys_fuzzed, sizeof sys_fuzzed, "%s/fuzzed.json", tmp_dir);
    atexit(cleanup);
    FILE *f = fopen(sys_enforced, "w");
    if (!f || fputs(SYSTEM, f) < 0 || fclose(f) != 0)
        abort();
    return 0;
}

static int valid_line(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        if (*p < 0x20 || *p == 0x7f)
            return 0;
        int n = *p < 0x80             ? 1
                : (*p & 0xe0) == 0xc0 ? 2
                : (*p & 0xf0) == 0xe0 ? 3
                : (*p & 0xf8) == 0xf0 ? 4
                                      : 0;
        if (n == 0)
            return 0;
        for (int i = 1; i < n; i++)
            if ((p[i] & 0xc0) != 0x80)
                return 0;
        p += n;
    }
    return 1;
}

static void check_error(int r, const sh_policy_error *err) {
    if (r == 0 || r == -ENOMEM)
        return;
    char line[2048];
    sh_policy_error_format(err, line, sizeof line);
    if (!valid_line(line)) {
        fprintf(stderr, "error line is not one line of UTF-8: %s\n", line);
        abort();
    }
}

/* Normalizing is idempotent: the normalized document parses to the same digest. */
static void check_idempotent(const sh_policy *p) {
    char *text = json_dumps(p->doc, JSON_COMPACT);
    if (!text)
        return;
    sh_policy *q = NULL;
    sh_policy_error err = {0};
    int r = sh_policy_parse(text, strlen(text), "normalized", &q, &err);
    if (r == -ENOMEM) {
        free(text);
        return;
    }
    if (r != 0 || strcmp(p->digest, q->digest) != 0) {
        char line[2048];
        sh_policy_error_format(&err, line, sizeof line);
        fprintf(stderr, "normalized policy does not normalize to itself: %s\n%s\n", text, r ? line : "");
        abort();
    }
    sh_policy_free(q);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};

    int r = sh_policy_parse((const char *)data, size, "fuzz.json", &p, &err);
    check_error(r, &err);
    if (r == 0)
        check_idempotent(p);
    sh_policy_free(p);

    /* resolve takes NUL-terminated text: the input up to its first NUL */
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    p = NULL;
    r = sh_policy_resolve(NULL, text, "user.json", sys_enforced, &p, &err);
    check_error(r, &err);
    if (r == 0 && (!p->enforce || !p->system_enforced))
        abort(); /* a user policy under an enforced one stays enforced */
    sh_policy_free(p);
    free(text);

    FILE *f = fopen(sys_fuzzed, "wb");
    if (f) {
        size_t n = fwrite(data, 1, size, f);
        if (fclose(f) == 0 && n == size) {
            p = NULL;
            r = sh_policy_resolve(NULL, USER, "user.json", sys_fuzzed, &p, &err);
            check_error(r, &err);
            sh_policy_free(p);
        }
    }
    return 0;
}
