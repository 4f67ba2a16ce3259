/* Policy loading. This first version checks the envelope (an object, "version": 1) and reads
 * the keys the foundation needs (enforce, on_error, audit.path); full schema validation lives
 * in the policy issue's work. */
#include "policy.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sh_config.h"

static void set_err(sh_policy_error *err, const char *source, int line, int col, const char *ptr,
                    const char *fmt, ...) __attribute__((format(printf, 6, 7)));

#include <stdarg.h>
static void set_err(sh_policy_error *err, const char *source, int line, int col, const char *ptr,
                    const char *fmt, ...) {
    if (!err)
        return;
    snprintf(err->source, sizeof err->source, "%s", source ? source : "<policy>");
    err->line = line;
    err->column = col;
    snprintf(err->pointer, sizeof err->pointer, "%s", ptr ? ptr : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->text, sizeof err->text, fmt, ap);
    va_end(ap);
}

const char *sh_policy_system_path(void) { return SH_SYSTEM_POLICY; }

void sh_policy_error_format(const sh_policy_error *err, char *buf, size_t len) {
    if (err->line > 0)
        snprintf(buf, len, "%s:%d:%d: %s", err->source, err->line, err->column, err->text);
    else if (err->pointer[0])
        snprintf(buf, len, "%s: %s: %s", err->source, err->pointer, err->text);
    else
        snprintf(buf, len, "%s: %s", err->source, err->text);
}

static void digest_of(json_t *doc, char out[17]) {
    char *text = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *c = text ? text : ""; *c; c++) {
        h ^= (unsigned char)*c;
        h *= 0x100000001b3ULL;
    }
    free(text);
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

int sh_policy_parse(const char *text, size_t len, const char *source, sh_policy **ret, sh_policy_error *err) {
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc) {
        set_err(err, source, jerr.line > 0 ? jerr.line : 1, jerr.column > 0 ? jerr.column : 1, NULL, "%s", jerr.text);
        return -EINVAL;
    }
    if (!json_is_object(doc)) {
        set_err(err, source, 0, 0, "", "a policy is a JSON object");
        goto invalid;
    }
    json_t *ver = json_object_get(doc, "version");
    if (!json_is_integer(ver) || json_integer_value(ver) != 1) {
        set_err(err, source, 0, 0, "/version", "must be 1");
        goto invalid;
    }
    sh_policy *p = calloc(1, sizeof *p);
    if (!p) {
        json_decref(doc);
        return -ENOMEM;
    }
    p->doc = doc;
    snprintf(p->origin, sizeof p->origin, "%s", source);
    p->enforce = json_is_true(json_object_get(doc, "enforce"));
    json_t *oe = json_object_get(doc, "on_error");
    p->on_error = (json_is_string(oe) && strcmp(json_string_value(oe), "warn") == 0) ? SH_ON_ERROR_WARN
                                                                                   : SH_ON_ERROR_ABORT;
    json_t *ap = json_object_get(json_object_get(doc, "audit"), "path");
    p->audit_path = json_is_string(ap) ? json_string_value(ap) : NULL;
    digest_of(doc, p->digest);
    *ret = p;
    return 0;
invalid:
    json_decref(doc);
    return -EINVAL;
}

int sh_policy_load_file(const char *path, sh_policy **ret, sh_policy_error *err) {
    FILE *f = fopen(path, "rbe");
    if (!f) {
        int e = errno;
        set_err(err, path, 0, 0, NULL, "cannot read: %s", strerror(e));
        return -e;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return -ENOMEM;
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    fclose(f);
    char name[600];
    snprintf(name, sizeof name, "%s", path);
    int r = sh_policy_parse(buf, len, name, ret, err);
    free(buf);
    return r;
}

int sh_policy_resolve(const char *user_path, const char *user_text, const char *user_name,
                      const char *system_path, sh_policy **ret, sh_policy_error *err) {
    (void)system_path;
    if (user_path)
        return sh_policy_load_file(user_path, ret, err);
    if (user_text)
        return sh_policy_parse(user_text, strlen(user_text), user_name ? user_name : "<dict>", ret, err);
    return sh_policy_parse(sh_default_policy, sh_default_policy_len, "<embedded default>", ret, err);
}

void sh_policy_free(sh_policy *p) {
    if (!p)
        return;
    json_decref(p->doc);
    free(p);
}
