/* The preload's scanner of the system policy never calls "advisory" what jansson (the core's
 * parser, with JSON_REJECT_DUPLICATES) reads as enforced or refuses: the three tricks,
 * then 50,000 random mutations of real policy texts checked against jansson itself. */
#include <jansson.h>

#include "check.h"
#include "preload.h"

static int scan(const char *text) {
    char sock[108] = "";
    return sh_preload_scan_policy(text, strlen(text), sock, sizeof sock);
}

/* What the core would make of TEXT: 1 enforced or refused (invalid), 0 advisory. */
static int jansson_enforced(const char *text, size_t len) {
    json_error_t e;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &e);
    int r = !j || !json_is_object(j) || json_is_true(json_object_get(j, "enforce")) ||
            (json_object_get(j, "enforce") && !json_is_boolean(json_object_get(j, "enforce")));
    json_decref(j);
    return r;
}

static const char *const seeds[] = {
    "{\"version\": 1, \"enforce\": false, \"freeze\": {\"params\": [\"0.*\"]}, \"audit\": {\"sink\": \"daemon\"}}",
    "{\"version\": 1, \"enforce\": true, \"freeze\": {\"layers\": \"15-25\"}, \"monitor\": {\"every\": 50}}",
    "{\"version\":1,\"audit\":{\"path\":\"/var/log/a b\\\"c.jsonl\",\"level\":\"sample\"},\"on_error\":\"abort\"}",
    "{\"version\": 1, \"probes\": {\"p\": {\"data\": \"x.jsonl\", \"weights\": [0.5, -1e-3, 2E+2, null]}}}",
};

int main(void) {
    CHECK_INT(scan("{\"enforce\": true}"), SH_SYS_ENFORCED);
    CHECK_INT(scan("{\"enforce\": false}"), SH_SYS_ADVISORY);
    CHECK_INT(scan(" {} "), SH_SYS_ADVISORY);
    CHECK_INT(scan("{\"enforc\\u0065\": true}"), SH_SYS_ENFORCED);            /* an escaped key */
    CHECK_INT(scan("{\"enforce\": false, \"enforce\": true}"), SH_SYS_ENFORCED); /* a duplicate */
    CHECK_INT(scan("{\"enforce\": false, \"enforce\": false}"), SH_SYS_ENFORCED); /* jansson refuses it */
    CHECK_INT(scan("{\"enforce\": 1}"), SH_SYS_ENFORCED);                      /* 1 for true */
    CHECK_INT(scan("{\"enforce\": false} {\"enforce\": true}"), SH_SYS_ENFORCED); /* trailing bytes */
    CHECK_INT(scan("{\"a\": {\"enforce\": true}, \"enforce\": false}"), SH_SYS_ADVISORY); /* nested: not it */
    CHECK_INT(scan("{\"a\": {\"x\": 1, \"x\": 2}}"), SH_SYS_ENFORCED);          /* a nested duplicate */
    CHECK_INT(scan("{\"a\": \"\\u0000\"}"), SH_SYS_ENFORCED);
    CHECK_INT(scan("{\"a\": \"\xc3\x28\"}"), SH_SYS_ENFORCED);                 /* invalid UTF-8 */
    CHECK_INT(scan("{\"a\": \"caf\xc3\xa9\"}"), SH_SYS_ADVISORY);
    CHECK_INT(scan("{\"a\": tru}"), SH_SYS_ENFORCED);
    CHECK_INT(scan("{\"a\": 01}"), SH_SYS_ENFORCED);
    char deep[200] = "{\"a\":";
    for (int i = 0; i < 40; i++)
        strcat(deep, "[");
    CHECK_INT(scan(deep), SH_SYS_ENFORCED);
    char sock[108] = "";
    const char *t = "{\"audit\": {\"sink\": \"daemon\", \"socket\": \"/run/x/audit.sock\"}}";
    CHECK_INT(sh_preload_scan_policy(t, strlen(t), sock, sizeof sock), SH_SYS_ADVISORY);
    CHECK_STR(sock, "/run/x/audit.sock");

    /* every advisory verdict agrees with jansson */
    srand(1);
    int advisory = 0, disagree = 0;
    for (int round = 0; round < 50000; round++) {
        char buf[512];
        const char *seed = seeds[round % (sizeof seeds / sizeof *seeds)];
        size_t n = strlen(seed);
        memcpy(buf, seed, n + 1);
        static const char alphabet[] = "{}[]\":,\\ue01tfalsrn-.+E \x80\xc3\xa9";
        for (int k = 1 + rand() % 3; k > 0; k--) {
            size_t at = (size_t)rand() % n;
            int op = rand() % 3;
            char c = alphabet[rand() % (sizeof alphabet - 1)];
            if (op == 0) {
                buf[at] = c;
            } else if (op == 1 && n + 1 < sizeof buf) {
                memmove(buf + at + 1, buf + at, n - at + 1);
                buf[at] = c;
                n++;
            } else if (n > 1) {
                memmove(buf + at, buf + at + 1, n - at);
                n--;
            }
        }
        char s2[108];
        int v = sh_preload_scan_policy(buf, n, s2, sizeof s2);
        if (v == SH_SYS_ADVISORY) {
            advisory++;
            if (jansson_enforced(buf, n)) {
                if (disagree++ < 5)
                    fprintf(stderr, "advisory to the scanner, not to jansson: %.*s\n", (int)n, buf);
            }
        }
    }
    CHECK_INT(disagree, 0);
    CHECK(advisory > 1000); /* the mutations left many valid advisory texts to compare */
    CHECK_DONE();
}
