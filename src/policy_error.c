/* Words of policy errors: filling the error struct, rendering values, keys and pointers as one
 * printable line of UTF-8, and the did-you-mean message for unknown keys. */
#include "policy_error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "suggest.h"

void sh_policy_set_error(sh_policy_error *err, int kind, const char *source, int line, int col,
                         const char *pointer, const char *fmt, ...) {
    if (!err)
        return;
    snprintf(err->source, sizeof err->source, "%s", source ? source : "<policy>");
    err->kind = kind;
    err->line = line;
    err->column = col;
    snprintf(err->pointer, sizeof err->pointer, "%s", pointer ? pointer : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->text, sizeof err->text, fmt, ap);
    va_end(ap);
}

/* Copy S into OUT (LEN bytes) with control bytes as \xNN, quotes and backslashes escaped, cut
 * at MAX input bytes on a UTF-8 boundary (then "..." follows). */
static void printable(const char *s, char *out, size_t len, size_t max) {
    size_t o = 0, i = 0;
    for (; s[i] && i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        char tmp[8];
        if (c < 0x20 || c == 0x7f)
            snprintf(tmp, sizeof tmp, "\\x%02x", c);
        else if (c == '"' || c == '\\')
            snprintf(tmp, sizeof tmp, "\\%c", c);
        else
            snprintf(tmp, sizeof tmp, "%c", c);
        size_t n = strlen(tmp);
        if (o + n + 4 >= len)
            break;
        memcpy(out + o, tmp, n);
        o += n;
    }
    if (s[i]) {
        while (o > 0 && ((unsigned char)out[o - 1] & 0xc0) == 0x80)
            o--; /* drop a cut UTF-8 sequence: continuation bytes... */
        if (o > 0 && (unsigned char)out[o - 1] >= 0xc0)
            o--; /* ...and its lead byte */
        if (o + 4 <= len) {
            memcpy(out + o, "...", 3);
            o += 3;
        }
    }
    out[o < len ? o : len - 1] = '\0';
}

void sh_format_real(double d, char *buf, size_t len) {
    snprintf(buf, len, "%.15g", d);
    if (strtod(buf, NULL) != d)
        snprintf(buf, len, "%.17g", d);
    if (!strpbrk(buf, ".eEn")) /* keep reals recognisable: 1.0, not 1 */
        snprintf(buf + strlen(buf), len - strlen(buf), ".0");
}

void sh_policy_describe(const json_t *v, char *buf, size_t len) {
    char tmp[300];
    switch (json_typeof(v)) {
    case JSON_STRING:
        printable(json_string_value(v), tmp, sizeof tmp, 64);
        snprintf(buf, len, "\"%s\"", tmp);
        break;
    case JSON_INTEGER:
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        sh_format_real(json_real_value(v), buf, len);
        break;
    case JSON_TRUE:
        snprintf(buf, len, "true");
        break;
    case JSON_FALSE:
        snprintf(buf, len, "false");
        break;
    case JSON_NULL:
        snprintf(buf, len, "null");
        break;
    case JSON_ARRAY:
        snprintf(buf, len, "a list");
        break;
    default:
        snprintf(buf, len, "an object");
        break;
    }
}

void sh_pointer_push(char *pointer, size_t len, const char *key) {
    char esc[SH_PTR_LEN];
    size_t o = 0;
    for (const char *c = key; *c && o + 2 < sizeof esc; c++) {
        if (*c == '~' || *c == '/') {
            esc[o++] = '~';
            esc[o++] = *c == '~' ? '0' : '1';
        } else {
            esc[o++] = *c;
        }
    }
    esc[o] = '\0';
    char shown[SH_PTR_LEN];
    printable(esc, shown, sizeof shown, 64);
    size_t used = strlen(pointer), n = strlen(shown);
    if (used + 1 + n >= len)
        return; /* no room: the pointer stays at the parent */
    pointer[used] = '/';
    memcpy(pointer + used + 1, shown, n + 1);
}

const char *sh_policy_describe_tmp(const json_t *v) {
    static _Thread_local char buf[80];
    sh_policy_describe(v, buf, sizeof buf);
    return buf;
}

int sh_check_fail(sh_check_ctx *c, const char *fmt, ...) {
    if (c->err) {
        char text[sizeof c->err->text];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        sh_policy_set_error(c->err, SH_POLICY_ERR_INVALID, c->source, 0, 0, c->ptr, "%s", text);
    }
    return -EINVAL;
}

int sh_check_unknown_key(sh_check_ctx *c, const char *key, const char *const *names, size_t n) {
    const char *hint = sh_suggest(key, names, n);
    if (hint)
        SH_FAIL(c, "unknown key (did you mean \"%s\"?)", hint);
    char list[400] = "";
    for (size_t i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", names[i]);
    SH_FAIL(c, "unknown key (known keys: %s)", list);
}
