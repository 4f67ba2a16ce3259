/* Policy loading and schema v1: syntax errors carry line and column, schema errors a JSON
 * pointer, the normalized document fills defaults into present sections only, the digest is a
 * SHA-256 of it, and did-you-mean hints come from the edit distance. */
#include "check.h"
#include "policy.h"
#include "sha256.h"
#include "suggest.h"

static char *format(const sh_policy_error *err) {
    static char buf[2048];
    sh_policy_error_format(err, buf, sizeof buf);
    return buf;
}

/* The error line for TEXT, "" when it is valid. */
static const char *error_of(const char *text) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    if (sh_policy_parse(text, strlen(text), "t.json", &p, &err) == 0) {
        sh_policy_free(p);
        return "";
    }
    return format(&err);
}

static sh_policy *parse_ok(const char *text) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    int r = sh_policy_parse(text, strlen(text), "t.json", &p, &err);
    if (r != 0)
        fprintf(stderr, "unexpected error: %s\n", format(&err));
    CHECK_INT(r, 0);
    return p;
}

static void test_syntax_error_position(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    const char *text = "{\n  \"version\": 1,\n  \"audit\": {\"path\" \"x\"}\n}\n";
    CHECK_INT(sh_policy_parse(text, strlen(text), "p.json", &p, &err), -EINVAL);
    CHECK(p == NULL);
    CHECK_INT(err.line, 3);
    CHECK_INT(err.column, 22); /* jansson points at the end of the token */
    CHECK_STR(format(&err), "p.json:3:22: ':' expected near '\"x\"'");
}

static void test_version(void) {
    CHECK_STR(error_of("{\"version\": 2}"), "t.json: /version: must be 1, not 2");
    CHECK_STR(error_of("{\"audit\": {}}"),
              "t.json: /version: required key is missing (this safehook reads \"version\": 1)");
    /* the version is checked before the keys it governs */
    CHECK_STR(error_of("{\"monitr\": 1, \"version\": \"1\"}"),
              "t.json: /version: must be an integer, not \"1\"");
}

static void test_embedded_default(void) {
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    CHECK_INT(sh_policy_resolve(NULL, NULL, NULL, "/nonexistent/policy.json", &p, &err), 0);
    CHECK(p != NULL);
    if (!p)
        return;
    CHECK_STR(p->origin, "<embedded default>");
    CHECK_INT(strlen(p->digest), 64);
    CHECK_INT(p->on_error, SH_ON_ERROR_ABORT);
    CHECK(!p->enforce);
    CHECK(!p->system_enforced);
    for (int i = 0; i < 64; i++)
        CHECK(strchr("0123456789abcdef", p->digest[i]) != NULL);
    sh_policy_free(p);
}

/* The digest of known documents, fixed here. Each expected value was computed outside this code
 * from the normalized text written out by hand (the compact, key-sorted document with the
 * defaults filled in), e.g.
 *   printf '%s' '{"enforce":false,"on_error":"abort","version":1}' | sha256sum
 * Documents with top-level keys only, so that new section defaults do not change them. */
static void test_known_digests(void) {
    static const struct {
        const char *doc, *digest;
    } cases[] = {
        {"{\"version\":1}", "855ec42c0aebc3672c90785ae5c2d6c1894780a63897ddc634ee75d60b17c4a5"},
        {"{\"version\": 1, \"enforce\": false, \"on_error\": \"abort\"}",
         "855ec42c0aebc3672c90785ae5c2d6c1894780a63897ddc634ee75d60b17c4a5"},
        {"{\"enforce\":true,\"on_error\":\"warn\",\"version\":1}",
         "2dc9a4f18a01a9f93aa78e8f92896146ff99593c9b52d3336d8d47547067cdb6"},
        /* key order, whitespace and CRLF line ends do not count */
        {"{ \"on_error\" : \"warn\",\r\n  \"version\": 1, \"enforce\": true }\r\n",
         "2dc9a4f18a01a9f93aa78e8f92896146ff99593c9b52d3336d8d47547067cdb6"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        sh_policy *p = parse_ok(cases[i].doc);
        if (!p)
            continue;
        CHECK_STR(p->digest, cases[i].digest);
        sh_policy_free(p);
    }
}

static void test_sha256_vectors(void) {
    char hex[65];
    sh_sha256_hex("", 0, hex);
    CHECK_STR(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sh_sha256_hex("abc", 3, hex);
    CHECK_STR(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    /* 56 bytes: the length no longer fits the first padding block */
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sh_sha256_hex(two, strlen(two), hex);
    CHECK_STR(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_reads_runtime_keys(void) {
    sh_policy *p = parse_ok(
        "{\"version\":1,\"on_error\":\"warn\",\"enforce\":true,\"audit\":{\"path\":\"/tmp/a.jsonl\"}}");
    if (!p)
        return;
    CHECK_INT(p->on_error, SH_ON_ERROR_WARN);
    CHECK(p->enforce);
    CHECK(!p->system_enforced);
    CHECK_STR(p->audit_path, "/tmp/a.jsonl");
    sh_policy_free(p);
}

static void test_defaults_only_in_present_sections(void) {
    sh_policy *p = parse_ok(
        "{\"version\":1,\"probes\":{\"harm\":{\"data\":\"h.jsonl\"}},\"monitor\":{\"probe\":\"harm\"}}");
    if (!p)
        return;
    json_t *mon = json_object_get(p->doc, "monitor");
    CHECK_INT(json_integer_value(json_object_get(mon, "every")), 100);
    CHECK(json_is_real(json_object_get(mon, "threshold")));
    CHECK(json_real_value(json_object_get(mon, "threshold")) == 0.95);
    CHECK_STR(json_string_value(json_object_get(mon, "action")), "rollback");
    CHECK_INT(json_integer_value(json_object_get(mon, "max_rollbacks")), 3);
    json_t *probe = json_object_get(json_object_get(p->doc, "probes"), "harm");
    CHECK_INT(json_integer_value(json_object_get(probe, "batch_size")), 16);
    CHECK(json_object_get(probe, "limit") == NULL); /* no default: stays absent */
    CHECK(json_object_get(p->doc, "freeze") == NULL);
    CHECK(json_object_get(p->doc, "audit") == NULL);
    CHECK(json_object_get(p->doc, "safegrad") == NULL);
    CHECK(json_is_false(json_object_get(p->doc, "enforce")));
    CHECK_STR(json_string_value(json_object_get(p->doc, "on_error")), "abort");
    sh_policy_free(p);
}

static void test_numbers_normalize(void) {
    /* an integer where a number is expected becomes a real: 1 and 1.0 give one digest */
    sh_policy *a = parse_ok("{\"version\":1,\"safegrad\":{\"threshold\":-1}}");
    sh_policy *b = parse_ok("{\"version\":1,\"safegrad\":{\"threshold\":-1.0}}");
    sh_policy *c = parse_ok("{\"safegrad\":{\"threshold\":0.5},\"version\":1}");
    if (!a || !b || !c)
        return;
    CHECK(json_is_real(json_object_get(json_object_get(a->doc, "safegrad"), "threshold")));
    CHECK_STR(a->digest, b->digest);
    CHECK(strcmp(a->digest, c->digest) != 0);
    sh_policy_free(a);
    sh_policy_free(b);
    sh_policy_free(c);
    CHECK_STR(error_of("{\"version\":1,\"monitor\":{\"probe\":\"x\",\"every\":1.0}}"),
              "t.json: /monitor/every: must be an integer, not 1.0");
}

static void test_layers_normalize(void) {
    sh_policy *p = parse_ok("{\"version\":1,\"freeze\":{\"layers\":[\"10-12\",\"3\",\"0-1\"]}}");
    if (!p)
        return;
    char *text = json_dumps(json_object_get(json_object_get(p->doc, "freeze"), "layers"), JSON_COMPACT);
    CHECK_STR(text, "[\"0-1\",\"3-3\",\"10-12\"]");
    free(text);
    sh_policy_free(p);
    p = parse_ok("{\"version\":1,\"freeze\":{\"layers\":\"15-25\"}}");
    if (!p)
        return;
    text = json_dumps(json_object_get(json_object_get(p->doc, "freeze"), "layers"), JSON_COMPACT);
    CHECK_STR(text, "[\"15-25\"]");
    free(text);
    sh_policy_free(p);
    /* the freeze helper's default: a fraction of depth */
    p = parse_ok("{\"version\":1,\"freeze\":{\"layers\":{\"fraction\":[0.375,0.625]}}}");
    sh_policy_free(p);
    CHECK_STR(error_of("{\"version\":1,\"freeze\":{\"layers\":[\"0-4\",\"6-9\",\"9-12\"]}}"),
              "t.json: /freeze/layers/2: range \"9-12\" overlaps \"6-9\" (entry 1)");
    CHECK_STR(error_of("{\"version\":1,\"freeze\":{\"layers\":\"25-15\"}}"),
              "t.json: /freeze/layers: range \"25-15\" is reversed: write \"15-25\"");
}

static void test_first_error_in_written_order(void) {
    CHECK_STR(error_of("{\"version\":1,\"audit\":{\"level\":\"all\"},\"gate\":{\"every\":0}}"),
              "t.json: /audit/level: must be one of \"steps\", \"sample\", \"events\", not \"all\"");
    CHECK_STR(error_of("{\"version\":1,\"gate\":{\"every\":0},\"audit\":{\"level\":\"all\"}}"),
              "t.json: /gate/every: must be in 1..1000000000, not 0");
}

static void test_pointer_escapes(void) {
    CHECK_STR(error_of("{\"version\":1,\"probes\":{\"a/b\":{}}}"),
              "t.json: /probes/a~1b: a probe name has 1 to 64 letters, digits, '_', '-' or '.'");
    CHECK_STR(
        error_of("{\"version\":1,\"a\\nb\":1}"),
        "t.json: /a\\x0ab: unknown key (known keys: version, enforce, on_error, freeze, safegrad, probes, "
        "gate, monitor, shaping, audit)");
}

static void test_suggestions(void) {
    CHECK_INT(sh_edit_distance("treshold", "threshold"), 1);
    CHECK_INT(sh_edit_distance("every", "evrey"), 1); /* a transposition costs 1 */
    CHECK_INT(sh_edit_distance("Probe", "probe"), 0);
    CHECK_INT(sh_edit_distance("", "abc"), 3);
    static const char *const keys[] = {"every", "threshold", "action", "probe"};
    CHECK_STR(sh_suggest("treshold", keys, 4), "threshold");
    CHECK_STR(sh_suggest("prob", keys, 4), "probe");
    CHECK(sh_suggest("xyz", keys, 4) == NULL);
    CHECK(sh_suggest("interval", keys, 4) == NULL);
}

static void test_file_limits(void) {
    const char *dir = getenv("SH_TEST_TMP");
    char path[4096];
    snprintf(path, sizeof path, "%s/big-policy.json", dir ? dir : "/tmp");
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f)
        return;
    fputs("{\"version\":1,\"audit\":{\"path\":\"", f);
    for (int i = 0; i < SH_POLICY_MAX_BYTES; i++)
        fputc('a', f);
    fputs("\"}}", f);
    fclose(f);
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    CHECK_INT(sh_policy_load_file(path, &p, &err), -EFBIG);
    char want[4200];
    snprintf(want, sizeof want, "%s: too large: a policy is at most 1048576 bytes", path);
    CHECK_STR(format(&err), want);
    remove(path);
    CHECK_INT(sh_policy_load_file("/nonexistent/p.json", &p, &err), -ENOENT);
    CHECK_STR(format(&err), "/nonexistent/p.json: cannot read: No such file or directory");
}

int main(void) {
    test_syntax_error_position();
    test_version();
    test_embedded_default();
    test_known_digests();
    test_sha256_vectors();
    test_reads_runtime_keys();
    test_defaults_only_in_present_sections();
    test_numbers_normalize();
    test_layers_normalize();
    test_first_error_in_written_order();
    test_pointer_escapes();
    test_suggestions();
    test_file_limits();
    CHECK_DONE();
}
