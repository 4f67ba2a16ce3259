/* freeze.layers: block ranges ("15-25", a list of them) checked for format, reversal and
 * overlap and normalized to a sorted list of "A-B", or a fraction of depth {"fraction": [a, b]}. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policy_error.h"
#include "policy_schema.h"

typedef struct range {
    long first, last;
} range;

/* "A-B" or "A" with decimal block numbers; 0 and the range, or -1 when malformed. */
static int parse_range(const char *s, range *r) {
    long v[2] = {0, 0};
    int k = 0, digits = 0;
    for (const char *p = s;; p++) {
        if (*p >= '0' && *p <= '9') {
            if (++digits > 6)
                return -1;
            v[k] = v[k] * 10 + (*p - '0');
        } else if (*p == '-' && k == 0 && digits) {
            k = 1;
            digits = 0;
        } else if (*p == '\0' && digits) {
            break;
        } else {
            return -1;
        }
    }
    r->first = v[0];
    r->last = k ? v[1] : v[0];
    return 0;
}

static int check_fraction(sh_check_ctx *c, const json_t *obj, json_t **out) {
    const char *key;
    json_t *v;
    static const char *const names[] = {"fraction"};
    size_t base = strlen(c->ptr);
    json_object_foreach((json_t *)obj, key, v) {
        if (strcmp(key, "fraction") != 0) {
            sh_pointer_push(c->ptr, sizeof c->ptr, key);
            return sh_check_unknown_key(c, key, names, 1);
        }
    }
    v = json_object_get(obj, "fraction");
    if (!v)
        SH_FAIL(c, "an object here needs \"fraction\": [a, b] with 0 <= a < b <= 1");
    sh_pointer_push(c->ptr, sizeof c->ptr, "fraction");
    if (!json_is_array(v) || json_array_size(v) != 2 || !json_is_number(json_array_get(v, 0)) ||
        !json_is_number(json_array_get(v, 1)))
        SH_FAIL(c, "must be [a, b] with 0 <= a < b <= 1, not %s", sh_policy_describe_tmp(v));
    double a = json_number_value(json_array_get(v, 0)), b = json_number_value(json_array_get(v, 1));
    if (!(a >= 0 && a < b && b <= 1)) {
        char sa[40], sb[40];
        sh_format_real(a, sa, sizeof sa);
        sh_format_real(b, sb, sizeof sb);
        SH_FAIL(c, "must be [a, b] with 0 <= a < b <= 1, not [%s, %s]", sa, sb);
    }
    c->ptr[base] = '\0';
    *out = json_pack("{s:[f,f]}", "fraction", a, b);
    return *out ? 0 : -ENOMEM;
}

static int cmp_range(const void *x, const void *y) {
    const range *a = x, *b = y;
    return (a->first > b->first) - (a->first < b->first);
}

int sh_check_layers(sh_check_ctx *c, const json_t *v, json_t **out) {
    if (json_is_object(v))
        return check_fraction(c, v, out);
    int single = json_is_string(v);
    if (!single && !json_is_array(v))
        SH_FAIL(c, "must be a range \"A-B\", a list of ranges or {\"fraction\": [a, b]}, not %s",
                sh_policy_describe_tmp(v));
    size_t n = single ? 1 : json_array_size(v);
    if (n == 0)
        SH_FAIL(c, "must list at least one range (leave \"layers\" out to freeze no blocks)");
    if (n > SH_POLICY_MAX_LIST)
        SH_FAIL(c, "must have at most %d ranges, not %zu", SH_POLICY_MAX_LIST, n);
    range *rs = calloc(n, sizeof *rs);
    if (!rs)
        return -ENOMEM;
    int r = -EINVAL;
    size_t base = strlen(c->ptr);
    for (size_t i = 0; i < n; i++) {
        const json_t *item = single ? v : json_array_get(v, i);
        c->ptr[base] = '\0';
        if (!single) {
            char idx[24];
            snprintf(idx, sizeof idx, "%zu", i);
            sh_pointer_push(c->ptr, sizeof c->ptr, idx);
        }
        char shown[120];
        sh_policy_describe(item, shown, sizeof shown);
        if (!json_is_string(item) || parse_range(json_string_value(item), &rs[i]) < 0) {
            sh_policy_set_error(
                c->err, SH_POLICY_ERR_INVALID, c->source, 0, 0, c->ptr,
                "must be a block range \"A-B\" (0-based, inclusive, A and B at most %d), not %s",
                SH_POLICY_MAX_BLOCK, shown);
            goto out;
        }
        if (rs[i].first > rs[i].last) {
            sh_policy_set_error(c->err, SH_POLICY_ERR_INVALID, c->source, 0, 0, c->ptr,
                                "range %s is reversed: write \"%ld-%ld\"", shown, rs[i].last, rs[i].first);
            goto out;
        }
        for (size_t j = 0; j < i; j++) {
            if (rs[j].first <= rs[i].last && rs[i].first <= rs[j].last) {
                sh_policy_set_error(c->err, SH_POLICY_ERR_INVALID, c->source, 0, 0, c->ptr,
                                    "range %s overlaps \"%s\" (entry %zu)", shown,
                                    json_string_value(json_array_get(v, j)), j);
                goto out;
            }
        }
    }
    c->ptr[base] = '\0';
    qsort(rs, n, sizeof *rs, cmp_range);
    json_t *list = json_array();
    for (size_t i = 0; list && i < n; i++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%ld-%ld", rs[i].first, rs[i].last);
        if (json_array_append_new(list, json_string(buf)) < 0) {
            json_decref(list);
            list = NULL;
        }
    }
    *out = list;
    r = list ? 0 : -ENOMEM;
out:
    free(rs);
    return r;
}
