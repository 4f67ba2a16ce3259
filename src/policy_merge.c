/* Tightening: what a user policy may change under an enforced system policy. Each key's rule
 * is its sh_field.tighten in policy_schema.c; this file applies the rules and words the refusal
 * of a weakening. */
#include "policy_merge.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policy_error.h"
#include "policy_schema.h"

typedef struct mctx {
    const char *sys_name;
    const char *user_name;
    sh_policy_error *err;
    char ptr[SH_PTR_LEN];
} mctx;

static int weakens(mctx *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int weakens(mctx *m, const char *fmt, ...) {
    char detail[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    sh_policy_set_error(m->err, SH_POLICY_ERR_WEAKENING, m->user_name, 0, 0, m->ptr,
                        "weakens the enforced system policy %s: %s", m->sys_name, detail);
    return -EPERM;
}

static int rank(const char *const *order, const char *v) {
    for (int i = 0; order[i]; i++)
        if (strcmp(order[i], v) == 0)
            return i;
    return -1;
}

/* Block ranges "A-B" of a normalized list (sorted, disjoint) into FIRST/LAST. */
static size_t ranges(const json_t *list, long *first, long *last, size_t cap) {
    size_t n = 0, i;
    json_t *item;
    json_array_foreach(list, i, item) {
        if (n < cap && sscanf(json_string_value(item), "%ld-%ld", &first[n], &last[n]) == 2)
            n++;
    }
    return n;
}

/* Do the user's layers B cover the system's layers A, for any depth? */
static int layers_cover(mctx *m, const json_t *a, const json_t *b) {
    char want[120];
    if (json_is_object(a) && json_is_object(b)) {
        const json_t *fa = json_object_get(a, "fraction"), *fb = json_object_get(b, "fraction");
        double a0 = json_real_value(json_array_get(fa, 0)), a1 = json_real_value(json_array_get(fa, 1));
        double b0 = json_real_value(json_array_get(fb, 0)), b1 = json_real_value(json_array_get(fb, 1));
        /* floor(a*n) and ceil(b*n) are monotone in a and b: containment holds for every n */
        if (b0 <= a0 && b1 >= a1)
            return 0;
        return weakens(m, "must cover the fraction [%.17g, %.17g] it freezes", a0, a1);
    }
    if (json_is_object(a) || json_is_object(b)) {
        char *text = json_dumps(a, JSON_COMPACT | JSON_REAL_PRECISION(15));
        snprintf(want, sizeof want, "%s", text ? text : "?");
        free(text);
        return weakens(
            m,
            "must cover its layers %s, given in the same form (block ranges and fractions of depth "
            "cannot be compared before the model is known)",
            want);
    }
    enum { CAP = 1024 };
    long *af = calloc(4 * CAP, sizeof *af);
    if (!af)
        return -ENOMEM;
    long *al = af + CAP, *bf = af + 2 * CAP, *bl = af + 3 * CAP;
    size_t na = ranges(a, af, al, CAP), nb = ranges(b, bf, bl, CAP);
    int r = 0;
    for (size_t i = 0; i < na && r == 0; i++) {
        long next = af[i]; /* the first block of A's range i not yet seen covered */
        for (size_t j = 0; j < nb && next <= al[i]; j++)
            if (bf[j] <= next && bl[j] >= next)
                next = bl[j] + 1;
        if (next <= al[i])
            r = weakens(m, "must cover the blocks %ld-%ld it freezes (block %ld is missing)", af[i], al[i],
                        next);
    }
    free(af);
    return r;
}

/* Check the user's value B of field F against the system's value A (NULL: the system does not
 * set it, so anything valid tightens it). */
static int check_rule(mctx *m, const sh_field *f, const json_t *a, const json_t *b) {
    char sa[120], sb[120];
    if (!a || !b)
        return 0;
    sh_policy_describe(a, sa, sizeof sa);
    sh_policy_describe(b, sb, sizeof sb);
    switch (f->tighten) {
    case SH_T_FREE:
        return 0;
    case SH_T_SAME:
        return json_equal(a, b) ? 0 : weakens(m, "it sets %s, which cannot be changed (not %s)", sa, sb);
    case SH_T_SET_ONCE:
        if (json_is_null(a) || json_equal(a, b))
            return 0;
        return weakens(m, "it sets %s, which cannot be changed (not %s)", sa, sb);
    case SH_T_LE:
        return json_number_value(b) <= json_number_value(a) ? 0 : weakens(m, "must be <= %s, not %s", sa, sb);
    case SH_T_GE:
        return json_number_value(b) >= json_number_value(a) ? 0 : weakens(m, "must be >= %s, not %s", sa, sb);
    case SH_T_TRUE:
        return (!json_is_true(a) || json_is_true(b)) ? 0 : weakens(m, "must stay true");
    case SH_T_ORDER: {
        int ra = rank(f->order, json_string_value(a)), rb = rank(f->order, json_string_value(b));
        if (rb >= ra)
            return 0;
        char allowed[200] = "";
        for (int i = ra; f->order[i]; i++)
            snprintf(allowed + strlen(allowed), sizeof allowed - strlen(allowed), "%s\"%s\"",
                     i > ra ? ", " : "", f->order[i]);
        return weakens(m, "must be one of %s, not %s", allowed, sb);
    }
    case SH_T_SUPERSET: {
        size_t i, j;
        json_t *x, *y;
        json_array_foreach(a, i, x) {
            int found = 0;
            json_array_foreach(b, j, y) found |= json_equal(x, y);
            if (!found) {
                sh_policy_describe(x, sa, sizeof sa);
                return weakens(m, "must keep %s", sa);
            }
        }
        return 0;
    }
    case SH_T_LAYERS:
        return layers_cover(m, a, b);
    }
    return 0;
}

static int merge_probes(mctx *m, json_t *merged, const json_t *user_raw, const json_t *user_norm) {
    json_t *sys = json_object_get(merged, "probes");
    if (!sys) {
        sys = json_object();
        if (!sys || json_object_set_new(merged, "probes", sys) < 0)
            return -ENOMEM;
    }
    size_t base = strlen(m->ptr);
    const char *name;
    json_t *item;
    json_object_foreach((json_t *)user_raw, name, item) {
        json_t *mine = json_object_get(user_norm, name), *theirs = json_object_get(sys, name);
        sh_pointer_push(m->ptr, sizeof m->ptr, name);
        if (theirs && !json_equal(theirs, mine))
            return weakens(m,
                           "it defines this probe, which cannot be changed (add a probe under another name)");
        if (!theirs && json_object_set(sys, name, mine) < 0)
            return -ENOMEM;
        m->ptr[base] = '\0';
    }
    return 0;
}

static int merge_section(mctx *m, json_t *merged, const char *name, const json_t *user_raw,
                         const json_t *user_norm) {
    json_t *sys = json_object_get(merged, name);
    if (!sys) /* the user adds a protection the system does not have */
        return json_object_set(merged, name, (json_t *)user_norm) < 0 ? -ENOMEM : 0;
    const sh_field *fields = sh_schema_fields(name);
    size_t base = strlen(m->ptr);
    const char *key;
    json_t *item;
    json_object_foreach((json_t *)user_raw, key, item) {
        const sh_field *f = fields;
        while (f->name && strcmp(f->name, key) != 0)
            f++;
        if (!f->name)
            continue; /* cannot happen: USER_RAW is valid */
        sh_pointer_push(m->ptr, sizeof m->ptr, key);
        json_t *mine = json_object_get(user_norm, key);
        int r = check_rule(m, f, json_object_get(sys, key), mine);
        if (r < 0)
            return r;
        if (json_object_set(sys, key, mine) < 0)
            return -ENOMEM;
        m->ptr[base] = '\0';
    }
    return 0;
}

int sh_policy_tighten(const json_t *sys, const char *sys_name, const json_t *user_raw,
                      const json_t *user_norm, const char *user_name, json_t **ret, sh_policy_error *err) {
    mctx m = {.sys_name = sys_name, .user_name = user_name, .err = err, .ptr = ""};
    json_t *merged = json_deep_copy(sys);
    if (!merged)
        return -ENOMEM;
    const sh_field *top = sh_schema_fields("");
    int r = 0;
    const char *key;
    json_t *item;
    json_object_foreach((json_t *)user_raw, key, item) {
        m.ptr[0] = '\0';
        sh_pointer_push(m.ptr, sizeof m.ptr, key);
        const sh_field *f = top;
        while (f->name && strcmp(f->name, key) != 0)
            f++;
        json_t *mine = json_object_get(user_norm, key);
        if (f->name) {
            if ((r = check_rule(&m, f, json_object_get(merged, key), mine)) < 0)
                goto fail;
            if (json_object_set(merged, key, mine) < 0)
                goto nomem;
        } else if (strcmp(key, "probes") == 0) {
            if ((r = merge_probes(&m, merged, item, mine)) < 0)
                goto fail;
        } else if ((r = merge_section(&m, merged, key, item, mine)) < 0) {
            goto fail;
        }
    }
    /* the result must itself be valid: references, and rules between keys of a section */
    json_t *norm = NULL;
    if ((r = sh_policy_normalize(merged, user_name, 0, &norm, err)) < 0)
        goto fail;
    json_decref(merged);
    *ret = norm;
    return 0;
nomem:
    r = -ENOMEM;
fail:
    json_decref(merged);
    return r;
}
