/* Policy sources: reading a file or a text with jansson (syntax errors keep their line and
 * column), the policy object (normalized document, digest, the keys the runtime reads), and
 * the precedence of the embedded default, the system policy and the user policy. Validation
 * is policy_schema.c; tightening under an enforced system policy is policy_merge.c. */
#include "policy.h"
#include "system_path.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policy_error.h"
#include "policy_merge.h"
#include "policy_schema.h"
#include "sh_config.h"
#include "sha256.h"

/* A policy as written (raw) and normalized, and the name it goes by in messages. */
typedef struct loaded {
    json_t *raw;
    json_t *norm;
    char name[512];
} loaded;

static void loaded_clear(loaded *l) {
    json_decref(l->raw);
    json_decref(l->norm);
    l->raw = l->norm = NULL;
}

const char *sh_policy_system_path(void) {
    return SH_SYSTEM_POLICY;
}

void sh_policy_error_format(const sh_policy_error *err, char *buf, size_t len) {
    if (err->line > 0)
        snprintf(buf, len, "%s:%d:%d: %s", err->source, err->line, err->column, err->text);
    else if (err->pointer[0])
        snprintf(buf, len, "%s: %s: %s", err->source, err->pointer, err->text);
    else
        snprintf(buf, len, "%s: %s", err->source, err->text);
}

/* Make S (jansson's message, which may quote the input near the error) one printable line of
 * valid UTF-8: control bytes and bytes of invalid UTF-8 sequences become '?'. */
static void clean_text(char *s) {
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        int n = *p < 0x80             ? 1
                : (*p & 0xe0) == 0xc0 ? 2
                : (*p & 0xf0) == 0xe0 ? 3
                : (*p & 0xf8) == 0xf0 ? 4
                                      : 0;
        int ok = n > 0 && !(n == 2 && *p < 0xc2) && !(n == 4 && *p > 0xf4);
        for (int i = 1; ok && i < n; i++)
            ok = (p[i] & 0xc0) == 0x80;
        if (!ok || (n == 1 && (*p < 0x20 || *p == 0x7f))) {
            *p++ = '?';
            continue;
        }
        p += n;
    }
}

static int parse_text(const char *text, size_t len, const char *source, unsigned flags, loaded *out,
                      sh_policy_error *err) {
    snprintf(out->name, sizeof out->name, "%s", source);
    if (len > SH_POLICY_MAX_BYTES) {
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, source, 0, 0, "",
                            "too large: a policy is at most %d bytes", SH_POLICY_MAX_BYTES);
        return -EFBIG;
    }
    if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) {
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, source, 1, 1, NULL,
                            "the file starts with a byte order mark (U+FEFF): save it as UTF-8 without one");
        return -EINVAL;
    }
    json_error_t jerr;
    out->raw = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!out->raw) {
        /* jansson counts columns from 0 before the first byte of a line: an empty file is 1:0 */
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, source, jerr.line > 0 ? jerr.line : 1,
                            jerr.column > 0 ? jerr.column : 1, NULL, "%s", jerr.text);
        if (err)
            clean_text(err->text);
        return -EINVAL;
    }
    int r = sh_policy_normalize(out->raw, source, flags, &out->norm, err);
    if (r < 0)
        loaded_clear(out);
    return r;
}

static int read_file(const char *path, unsigned flags, loaded *out, sh_policy_error *err) {
    FILE *f = fopen(path, "rbe");
    if (!f) {
        int e = errno;
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, path, 0, 0, "", "cannot read: %s", strerror(e));
        return -e;
    }
    /* one byte past the limit tells a file over it from one at it */
    size_t cap = SH_POLICY_MAX_BYTES + 1, len = 0;
    char *buf = malloc(cap);
    int r = -ENOMEM;
    if (!buf)
        goto close;
    for (size_t n; len < cap && (n = fread(buf + len, 1, cap - len, f)) > 0;)
        len += n;
    if (ferror(f)) {
        r = errno ? -errno : -EIO;
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, path, 0, 0, "", "cannot read: %s", strerror(-r));
        goto free_buf;
    }
    r = parse_text(buf, len, path, flags, out, err);
free_buf:
    free(buf);
close:
    fclose(f);
    return r;
}

/* A policy object owning DOC (normalized). */
static int make_policy(json_t *doc, const char *origin, bool system_enforced, sh_policy **ret) {
    sh_policy *p = calloc(1, sizeof *p);
    char *text = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
    if (!p || !text) {
        free(p);
        free(text);
        json_decref(doc);
        return -ENOMEM;
    }
    sh_sha256_hex(text, strlen(text), p->digest);
    free(text);
    p->doc = doc;
    snprintf(p->origin, sizeof p->origin, "%s", origin);
    p->enforce = json_is_true(json_object_get(doc, "enforce"));
    p->system_enforced = system_enforced;
    json_t *oe = json_object_get(doc, "on_error");
    p->on_error = strcmp(json_string_value(oe), "warn") == 0 ? SH_ON_ERROR_WARN : SH_ON_ERROR_ABORT;
    json_t *ap = json_object_get(json_object_get(doc, "audit"), "path");
    p->audit_path = json_is_string(ap) ? json_string_value(ap) : NULL;
    *ret = p;
    return 0;
}

int sh_policy_parse(const char *text, size_t len, const char *source, sh_policy **ret, sh_policy_error *err) {
    loaded l = {0};
    int r = parse_text(text, len, source, 0, &l, err);
    if (r < 0)
        return r == -EFBIG ? -EINVAL : r;
    json_t *doc = json_incref(l.norm);
    loaded_clear(&l);
    return make_policy(doc, source, false, ret);
}

int sh_policy_load_file(const char *path, sh_policy **ret, sh_policy_error *err) {
    loaded l = {0};
    int r = read_file(path, 0, &l, err);
    if (r < 0)
        return r;
    json_t *doc = json_incref(l.norm);
    loaded_clear(&l);
    return make_policy(doc, path, false, ret);
}

static int load_system(const char *system_path, loaded *out, sh_policy_error *err) {
    const char *path = system_path ? system_path : SH_SYSTEM_POLICY;
    int r = read_file(path, 0, out, err);
    if (r == -ENOENT || r == -ENOTDIR) {
        if (err)
            memset(err, 0, sizeof *err);
        if (sh_system_absence_trusted(path))
            return 0;
        /* a user namespace (or a folder someone else can write) may be hiding it */
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, path, 0, 0, "",
                            "cannot be seen from this process (a user namespace or a mount may hide it); "
                            "an enforced system policy may be in force");
        return -EACCES;
    }
    return r;
}

int sh_policy_load_system(const char *system_path, sh_policy **ret, sh_policy_error *err) {
    loaded l = {0};
    int r = load_system(system_path, &l, err);
    *ret = NULL;
    if (r < 0 || !l.norm)
        return r;
    char origin[600];
    snprintf(origin, sizeof origin, "system:%s", l.name);
    bool enforced = json_is_true(json_object_get(l.norm, "enforce"));
    json_t *doc = json_incref(l.norm);
    loaded_clear(&l);
    return make_policy(doc, origin, enforced, ret);
}

int sh_policy_resolve(const char *user_path, const char *user_text, const char *user_name,
                      const char *system_path, sh_policy **ret, sh_policy_error *err) {
    sh_policy_error scratch;
    if (!err)
        err = &scratch;
    memset(err, 0, sizeof *err);
    loaded sys = {0}, user = {0};
    int r = load_system(system_path, &sys, err);
    if (r < 0)
        return r;
    /* under an enforced system policy the user's is an overlay: the system may supply the rest */
    bool enforced = sys.norm && json_is_true(json_object_get(sys.norm, "enforce"));
    unsigned flags = enforced ? SH_NORM_OVERLAY : 0;
    if (user_path)
        r = read_file(user_path, flags, &user, err);
    else if (user_text)
        r = parse_text(user_text, strlen(user_text), user_name ? user_name : "<dict>", flags, &user, err);
    if (r < 0)
        goto out;

    char origin[sizeof((sh_policy *)0)->origin];
    json_t *doc = NULL;
    if (!sys.norm && !user.norm) {
        loaded def = {0};
        if ((r = parse_text(sh_default_policy, sh_default_policy_len, "<embedded default>", 0, &def, err)) <
            0)
            goto out;
        doc = json_incref(def.norm);
        loaded_clear(&def);
        snprintf(origin, sizeof origin, "<embedded default>");
    } else if (!user.norm || !sys.norm) {
        loaded *only = user.norm ? &user : &sys;
        doc = json_incref(only->norm);
        snprintf(origin, sizeof origin, "%s:%s", only == &user ? "user" : "system", only->name);
    } else if (!enforced) {
        doc = json_incref(user.norm);
        snprintf(origin, sizeof origin, "user:%s", user.name);
    } else {
        if ((r = sh_policy_tighten(sys.norm, sys.name, user.raw, user.norm, user.name, &doc, err)) < 0)
            goto out;
        snprintf(origin, sizeof origin, "system:%s+user:%s", sys.name, user.name);
    }
    r = make_policy(doc, origin, enforced, ret);
out:
    loaded_clear(&sys);
    loaded_clear(&user);
    return r;
}

void sh_policy_free(sh_policy *p) {
    if (!p)
        return;
    json_decref(p->doc);
    free(p);
}
