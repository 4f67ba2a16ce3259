/* Validation and normalization of schema v1. The schema is the table below; the validator walks
 * a document's keys in the order they were written, so that the error reported is the first
 * one a reader meets, and builds the normalized document alongside. */
#include "policy_schema.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policy_error.h"
#include "suggest.h"

#define MAX_COUNT 1e9 /* upper bound of step counts: keeps the features' arithmetic exact */
#define MAX_LIST SH_POLICY_MAX_LIST
#define MAX_PATH 4096 /* bytes of a path or a glob */

/* the schema */

static const char *const ON_ERROR[] = {"abort", "warn", NULL};
static const char *const ON_ERROR_ORDER[] = {"warn", "abort", NULL};
static const char *const SOURCE[] = {"anchor", "probe", "direction", NULL};
static const char *const LOSS[] = {"ce", "kl", NULL};
static const char *const GRANULARITY[] = {"global", "layer", "tensor", NULL};
static const char *const KIND[] = {"loss", "score", NULL};
static const char *const JUDGE[] = {"keyword", "exact", NULL};
static const char *const PROBE_LOSS[] = {"ce", "contrastive", NULL};
/* the probe sets shipped inside the Python package (python/safehook/data) */
static const char *const BUILTIN[] = {"refusals", "benign", NULL};
static const char *const SCORE[] = {"loss", "refusal_rate", "over_refusal", NULL};
static const char *const GATE_MODE[] = {"first_order", "exact", NULL};
static const char *const GATE_ACTION[] = {"shrink", "scale", "skip", NULL};
static const char *const GATE_ACTION_ORDER[] = {"shrink", "scale", "skip", NULL};
static const char *const MON_ACTION[] = {"rollback", "reduce_lr", "both", "stop", NULL};
static const char *const MON_ACTION_ORDER[] = {"reduce_lr", "rollback", "both", "stop", NULL};
static const char *const SNAPSHOT[] = {"memory", "disk", NULL};
static const char *const GUARD[] = {"direction", "refusal", "gradient", "callable", NULL};
static const char *const SHAPE_ACTION[] = {"mask", "weight", "refuse", "subtract", NULL};
static const char *const SHAPE_ACTION_ORDER[] = {"weight", "mask", "subtract", "refuse", NULL};
/* who scores the rows: the training forward (drifts with the model) < a frozen copy of the start */
static const char *const SHAPE_SCORER[] = {"forward", "start", NULL};
static const char *const LEVEL[] = {"steps", "sample", "events", NULL};
static const char *const LEVEL_ORDER[] = {"events", "sample", "steps", NULL};
static const char *const SINK[] = {"file", "daemon", NULL};

#define INF INFINITY
#define COUNT(lo) SH_K_INT, 0, (lo), MAX_COUNT, NULL

static const sh_field TOP[] = {
    {"version", SH_K_INT, SH_F_REQUIRED, 1, 1, NULL, NULL, SH_T_SAME, NULL},
    {"enforce", SH_K_BOOL, 0, 0, 0, NULL, "false", SH_T_TRUE, NULL},
    {"on_error", SH_K_ENUM, 0, 0, 0, ON_ERROR, "\"abort\"", SH_T_ORDER, ON_ERROR_ORDER},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

static const sh_field FREEZE[] = {
    {"layers", SH_K_LAYERS, 0, 0, 0, NULL, NULL, SH_T_LAYERS, NULL},
    {"params", SH_K_GLOBS, 0, 0, 0, NULL, "[]", SH_T_SUPERSET, NULL},
    {"check_every", COUNT(1), "50", SH_T_LE, NULL},
    {"restore", SH_K_BOOL, 0, 0, 0, NULL, "true", SH_T_TRUE, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

static const sh_field SAFEGRAD[] = {
    {"source", SH_K_ENUM, 0, 0, 0, SOURCE, "\"anchor\"", SH_T_SAME, NULL},
    {"probe", SH_K_PROBE_REF, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"loss", SH_K_ENUM, 0, 0, 0, LOSS, "\"ce\"", SH_T_SAME, NULL},
    {"direction", SH_K_PATH, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"refresh_every", COUNT(1), "1", SH_T_LE, NULL},
    /* the cached safety signal between refreshes (probes/gradient.py, Signal): refresh early
     * when the probe's loss on its first drift_rows rows rose by more than refresh_drift (a
     * lower bound refreshes sooner); project against the gradients of `directions` slices of
     * the probe (more directions: a smaller cone, never less of the update removed) */
    {"refresh_drift", SH_K_NUM, 0, 0, INF, NULL, NULL, SH_T_LE, NULL},
    {"drift_rows", SH_K_INT, 0, 1, 4096, NULL, "8", SH_T_GE, NULL},
    {"directions", SH_K_INT, 0, 1, 16, NULL, "1", SH_T_GE, NULL},
    /* rows of the probe per refresh, in rotation (default: all of them at every refresh) */
    {"rows", COUNT(1), NULL, SH_T_GE, NULL},
    {"granularity", SH_K_ENUM, 0, 0, 0, GRANULARITY, "\"global\"", SH_T_ORDER, GRANULARITY},
    /* the projection moves the cosine up to the threshold: a higher one always leaves at least
     * as much of the safety direction (monotone), so raising it tightens; 1 cannot be reached */
    {"threshold", SH_K_NUM, SH_F_HI_OPEN, -1, 1, NULL, "0.0", SH_T_GE, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

/* One entry of probes. Probes named by an enforced system policy cannot be changed at all
 * (policy_merge.c compares them whole); the rules here are unused. */
static const sh_field PROBE[] = {
    {"data", SH_K_PATH, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"builtin", SH_K_ENUM, 0, 0, 0, BUILTIN, NULL, SH_T_SAME, NULL},
    {"tokenizer", SH_K_PATH, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"callable", SH_K_CALLABLE, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"kind", SH_K_ENUM, 0, 0, 0, KIND, "\"loss\"", SH_T_SAME, NULL},
    {"judge", SH_K_JUDGE, 0, 0, 0, JUDGE, "\"keyword\"", SH_T_SAME, NULL},
    {"keywords", SH_K_STRINGS, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"score", SH_K_ENUM, 0, 0, 0, SCORE, "\"loss\"", SH_T_SAME, NULL},
    {"max_new_tokens", SH_K_INT, 0, 1, 512, NULL, "32", SH_T_SAME, NULL},
    {"batch_size", SH_K_INT, 0, 1, 65536, NULL, "16", SH_T_SAME, NULL},
    {"limit", COUNT(1), NULL, SH_T_SAME, NULL},
    {"loss", SH_K_ENUM, 0, 0, 0, PROBE_LOSS, "\"ce\"", SH_T_SAME, NULL},
    {"chat_template", SH_K_BOOL, 0, 0, 0, NULL, "false", SH_T_SAME, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

static const sh_field GATE[] = {
    {"probe", SH_K_PROBE_REF, SH_F_REQUIRED, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"mode", SH_K_ENUM, 0, 0, 0, GATE_MODE, "\"first_order\"", SH_T_ORDER, GATE_MODE},
    {"tolerance", SH_K_NUM, 0, 0, INF, NULL, "0.0", SH_T_LE, NULL},
    {"ratio", SH_K_NUM, 0, 0, INF, NULL, "0.1", SH_T_LE, NULL},
    {"action", SH_K_ENUM, 0, 0, 0, GATE_ACTION, "\"shrink\"", SH_T_ORDER, GATE_ACTION_ORDER},
    {"every", COUNT(1), "1", SH_T_LE, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

static const sh_field MONITOR[] = {
    {"probe", SH_K_PROBE_REF, SH_F_REQUIRED, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"every", COUNT(1), "100", SH_T_LE, NULL},
    {"threshold", SH_K_NUM, SH_F_LO_OPEN, 0, 1, NULL, "0.95", SH_T_GE, NULL},
    {"action", SH_K_ENUM, 0, 0, 0, MON_ACTION, "\"rollback\"", SH_T_ORDER, MON_ACTION_ORDER},
    {"lr_factor", SH_K_NUM, SH_F_LO_OPEN | SH_F_HI_OPEN, 0, 1, NULL, "0.5", SH_T_LE, NULL},
    {"max_rollbacks", COUNT(0), "3", SH_T_LE, NULL},
    {"snapshot", SH_K_ENUM, 0, 0, 0, SNAPSHOT, "\"memory\"", SH_T_FREE, NULL},
    {"snapshot_dir", SH_K_PATH, 0, 0, 0, NULL, "\"safehook-snapshots\"", SH_T_FREE, NULL},
    {"progress", SH_K_BOOL, 0, 0, 0, NULL, "true", SH_T_FREE, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

/* Under an enforced system policy a user may add guards, flag more (a higher tpr or max_fpr),
 * rewrite more, or take a stronger action; the data, block and callable stay the system's. */
static const sh_field SHAPING[] = {
    {"guards", SH_K_CHOICES, 0, 0, 0, GUARD, "[\"direction\", \"refusal\"]", SH_T_SUPERSET, NULL},
    {"probe", SH_K_PROBE_REF, SH_F_REQUIRED, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"benign", SH_K_PROBE_REF, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"action", SH_K_ENUM, 0, 0, 0, SHAPE_ACTION, "\"mask\"", SH_T_ORDER, SHAPE_ACTION_ORDER},
    {"tpr", SH_K_NUM, SH_F_LO_OPEN, 0, 1, NULL, "0.95", SH_T_GE, NULL},
    {"max_fpr", SH_K_NUM, SH_F_HI_OPEN, 0, 1, NULL, "0.05", SH_T_GE, NULL},
    {"layer", SH_K_INT, 0, 0, SH_POLICY_MAX_BLOCK, NULL, NULL, SH_T_SAME, NULL},
    {"refuse_cap", SH_K_NUM, 0, 0, 1, NULL, "0.25", SH_T_GE, NULL},
    {"callable", SH_K_CALLABLE, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"segment_tokens", SH_K_INT, 0, 1, 4096, NULL, "8", SH_T_LE, NULL},
    {"tokenizer", SH_K_PATH, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"response_marker", SH_K_PATH, 0, 0, 0, NULL, NULL, SH_T_SAME, NULL},
    {"recalibrate_every", COUNT(1), "10", SH_T_LE, NULL},
    {"max_flag_rate", SH_K_NUM, SH_F_LO_OPEN, 0, 1, NULL, "0.3", SH_T_GE, NULL},
    {"scorer", SH_K_ENUM, 0, 0, 0, SHAPE_SCORER, "\"start\"", SH_T_ORDER, SHAPE_SCORER},
    /* the harmful share of the data above which the job is reported and stopped: lower is tighter */
    {"max_harmful_fraction", SH_K_NUM, 0, 0, 1, NULL, "1.0", SH_T_LE, NULL},
    /* the fraction of a step's rows whose context rehearses a refusal: more is tighter */
    {"rehearse", SH_K_NUM, 0, 0, 1, NULL, "0.0", SH_T_GE, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

static const sh_field AUDIT[] = {
    {"path", SH_K_PATH_OR_NULL, 0, 0, 0, NULL, "null", SH_T_SET_ONCE, NULL},
    {"level", SH_K_ENUM, 0, 0, 0, LEVEL, "\"steps\"", SH_T_ORDER, LEVEL_ORDER},
    {"sample_every", COUNT(1), "10", SH_T_LE, NULL},
    /* "daemon": records go to safehookd, which the job cannot write past; file < daemon. */
    {"sink", SH_K_ENUM, 0, 0, 0, SINK, "\"file\"", SH_T_ORDER, SINK},
    {"socket", SH_K_PATH_OR_NULL, 0, 0, 0, NULL, "null", SH_T_SET_ONCE, NULL},
    {NULL, 0, 0, 0, 0, NULL, NULL, 0, NULL},
};

/* The features: the one place a feature is declared (see sh_feature). Adding one is its field
 * table above, one line here, and its Python module. Sections are the object-valued top-level
 * keys, in this order in the normalized policy. */
static const sh_feature FEATURES[] = {
    {"freeze", "freeze", FREEZE, 0, "safehook.features.freeze", 10},
    {"safegrad", "safegrad", SAFEGRAD, 0, "safehook.features.safegrad", 20},
    {"probes", "probes", PROBE, SH_S_MAP, "safehook.probes", 0},
    {"gate", "gate", GATE, 0, "safehook.features.gate", 30},
    {"monitor", "monitor", MONITOR, 0, "safehook.features.monitor", 40},
    {"shaping", "shaping", SHAPING, 0, "safehook.features.shaping", 15},
    {"audit", "audit", AUDIT, 0, NULL, 0},
    {"tamper", NULL, NULL, SH_S_ALWAYS, "safehook.features.tamper", 0},
    /* the step stats, passed on to the Trainer's, Accelerate's and Python's logs */
    {"tap", NULL, NULL, SH_S_ALWAYS, "safehook.integrations.tap", 1000000},
    {NULL, NULL, NULL, 0, NULL, 0},
};

const sh_feature *sh_schema_features(void) { return FEATURES; }

const sh_field *sh_schema_fields(const char *section) {
    if (strcmp(section, "") == 0)
        return TOP;
    if (strcmp(section, "probe") == 0)
        return PROBE;
    for (const sh_feature *f = FEATURES; f->name; f++)
        if (f->section && !(f->flags & SH_S_MAP) && strcmp(f->section, section) == 0)
            return f->fields;
    return NULL;
}

/* checks of one value */

typedef sh_check_ctx ctx;
#define FAIL SH_FAIL
#define article_type sh_policy_describe_tmp

/* Names of FIELDS as an array for sh_suggest; at most 15 fields per table. */
static size_t field_names(const sh_field *fields, const char *names[16]) {
    size_t n = 0;
    for (; fields[n].name && n < 15; n++)
        names[n] = fields[n].name;
    return n;
}

static int choice_error(ctx *c, const json_t *v, const char *const *choices, const char *also) {
    char list[300] = "", got[120];
    size_t n = 0;
    for (; choices[n]; n++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s\"%s\"", n ? ", " : "", choices[n]);
    sh_policy_describe(v, got, sizeof got);
    const char *hint = json_is_string(v) ? sh_suggest(json_string_value(v), choices, n) : NULL;
    if (hint)
        FAIL(c, "must be one of %s%s, not %s (did you mean \"%s\"?)", list, also, got, hint);
    FAIL(c, "must be one of %s%s, not %s", list, also, got);
}

static int is_ident(const char *s, size_t n) {
    if (n == 0 || !(s[0] == '_' || (s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z')))
        return 0;
    for (size_t i = 1; i < n; i++)
        if (!(s[i] == '_' || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z') ||
              (s[i] >= '0' && s[i] <= '9')))
            return 0;
    return 1;
}

/* "pkg.module:function" (dotted identifiers on both sides of one colon). */
static int is_callable_name(const char *s) {
    const char *colon = strchr(s, ':');
    if (!colon || strchr(colon + 1, ':'))
        return 0;
    for (int side = 0; side < 2; side++) {
        const char *p = side ? colon + 1 : s, *end = side ? s + strlen(s) : colon;
        if (p == end)
            return 0;
        while (p <= end) {
            const char *dot = memchr(p, '.', (size_t)(end - p));
            const char *stop = dot ? dot : end;
            if (!is_ident(p, (size_t)(stop - p)))
                return 0;
            p = stop + 1;
        }
    }
    return 1;
}

static int check_path(ctx *c, const json_t *v) {
    if (!json_is_string(v) || json_string_length(v) == 0)
        FAIL(c, "must be a non-empty path, not %s", article_type(v));
    if (json_string_length(v) > MAX_PATH)
        FAIL(c, "must be a path of at most %d bytes", MAX_PATH);
    return 0;
}

static int check_strings(ctx *c, const json_t *v, int allow_empty, json_t **out) {
    if (!json_is_array(v))
        FAIL(c, "must be a list of strings, not %s", article_type(v));
    if (!allow_empty && json_array_size(v) == 0)
        FAIL(c, "must be a non-empty list of strings");
    if (json_array_size(v) > MAX_LIST)
        FAIL(c, "must have at most %d entries, not %zu", MAX_LIST, json_array_size(v));
    size_t base = strlen(c->ptr), i;
    json_t *item;
    json_array_foreach(v, i, item) {
        char idx[24];
        snprintf(idx, sizeof idx, "%zu", i);
        sh_pointer_push(c->ptr, sizeof c->ptr, idx);
        if (!json_is_string(item) || json_string_length(item) == 0)
            FAIL(c, "must be a non-empty string, not %s", article_type(item));
        if (json_string_length(item) > MAX_PATH)
            FAIL(c, "must be at most %d bytes", MAX_PATH);
        c->ptr[base] = '\0';
    }
    *out = json_deep_copy(v);
    return *out ? 0 : -ENOMEM;
}

/* A non-empty list of distinct strings, each one of CHOICES. */
static int check_choices(ctx *c, const json_t *v, const char *const *choices, json_t **out) {
    if (!json_is_array(v))
        FAIL(c, "must be a list, not %s", article_type(v));
    if (json_array_size(v) == 0)
        FAIL(c, "must list at least one value");
    size_t base = strlen(c->ptr), i, j;
    json_t *item, *other;
    json_array_foreach(v, i, item) {
        char idx[24];
        snprintf(idx, sizeof idx, "%zu", i);
        sh_pointer_push(c->ptr, sizeof c->ptr, idx);
        size_t k = 0;
        while (json_is_string(item) && choices[k] && strcmp(choices[k], json_string_value(item)) != 0)
            k++;
        if (!json_is_string(item) || !choices[k])
            return choice_error(c, item, choices, "");
        json_array_foreach(v, j, other) {
            if (j < i && json_equal(item, other))
                FAIL(c, "\"%s\" is listed twice", json_string_value(item));
        }
        c->ptr[base] = '\0';
    }
    *out = json_deep_copy(v);
    return *out ? 0 : -ENOMEM;
}

/* one field */

static int check_number(ctx *c, const sh_field *f, const json_t *v, json_t **out) {
    char got[120];
    sh_policy_describe(v, got, sizeof got);
    if (f->kind == SH_K_INT && !json_is_integer(v))
        FAIL(c, "must be an integer, not %s", got);
    if (f->kind == SH_K_NUM && !json_is_number(v))
        FAIL(c, "must be a number, not %s", got);
    double d = json_number_value(v);
    int lo_ok = (f->flags & SH_F_LO_OPEN) ? d > f->lo : d >= f->lo;
    int hi_ok = (f->flags & SH_F_HI_OPEN) ? d < f->hi : d <= f->hi;
    if (f->kind == SH_K_INT) {
        /* compare as integers: a double cannot hold every json_int_t */
        json_int_t i = json_integer_value(v);
        lo_ok = i >= (json_int_t)f->lo;
        hi_ok = i <= (json_int_t)f->hi;
    }
    if (!lo_ok || !hi_ok) {
        char lo[40], hi[40];
        if (f->kind == SH_K_INT) {
            snprintf(lo, sizeof lo, "%.0f", f->lo);
            snprintf(hi, sizeof hi, "%.0f", f->hi);
            if (f->lo == f->hi)
                FAIL(c, "must be %s, not %s", lo, got);
            FAIL(c, "must be in %s..%s, not %s", lo, hi, got);
        }
        snprintf(lo, sizeof lo, "%.15g", f->lo);
        snprintf(hi, sizeof hi, "%.15g", f->hi);
        if (isinf(f->hi))
            FAIL(c, "must be %s %s, not %s", (f->flags & SH_F_LO_OPEN) ? ">" : ">=", lo, got);
        FAIL(c, "must be in %c%s, %s%c, not %s", (f->flags & SH_F_LO_OPEN) ? '(' : '[', lo, hi,
             (f->flags & SH_F_HI_OPEN) ? ')' : ']', got);
    }
    *out = f->kind == SH_K_INT ? json_integer(json_integer_value(v)) : json_real(d);
    return *out ? 0 : -ENOMEM;
}

static int check_field(ctx *c, const sh_field *f, const json_t *v, json_t **out) {
    *out = NULL;
    switch (f->kind) {
    case SH_K_INT:
    case SH_K_NUM:
        return check_number(c, f, v, out);
    case SH_K_BOOL:
        if (!json_is_boolean(v))
            FAIL(c, "must be true or false, not %s", article_type(v));
        break;
    case SH_K_ENUM:
        if (!json_is_string(v))
            return choice_error(c, v, f->choices, "");
        for (size_t i = 0; f->choices[i]; i++)
            if (strcmp(f->choices[i], json_string_value(v)) == 0)
                goto copy;
        return choice_error(c, v, f->choices, "");
    case SH_K_PATH_OR_NULL:
        if (json_is_null(v))
            break;
        /* fall through */
    case SH_K_PATH:
        if (check_path(c, v) < 0)
            return -EINVAL;
        break;
    case SH_K_GLOBS:
        return check_strings(c, v, 1, out);
    case SH_K_STRINGS:
        return check_strings(c, v, 0, out);
    case SH_K_PROBE_REF:
        if (!json_is_string(v) || json_string_length(v) == 0)
            FAIL(c, "must be the name of a probe in /probes, not %s", article_type(v));
        break;
    case SH_K_JUDGE:
        if (json_is_string(v)) {
            for (size_t i = 0; f->choices[i]; i++)
                if (strcmp(f->choices[i], json_string_value(v)) == 0)
                    goto copy;
            if (is_callable_name(json_string_value(v)))
                break;
        }
        return choice_error(c, v, f->choices, " or \"pkg.module:function\"");
    case SH_K_CALLABLE:
        if (!json_is_string(v) || !is_callable_name(json_string_value(v)))
            FAIL(c, "must name a Python function as \"pkg.module:function\", not %s", article_type(v));
        break;
    case SH_K_LAYERS:
        return sh_check_layers(c, v, out);
    case SH_K_CHOICES:
        return check_choices(c, v, f->choices, out);
    }
copy:
    *out = json_deep_copy(v);
    return *out ? 0 : -ENOMEM;
}

/* objects: a section, a probe, the top level */

static const sh_field *find_field(const sh_field *fields, const char *key) {
    for (; fields->name; fields++)
        if (strcmp(fields->name, key) == 0)
            return fields;
    return NULL;
}

/* Validate the object V against FIELDS, in written order, and store the normalized object
 * (fields in table order, defaults filled in) in *out. */
static int check_object(ctx *c, const sh_field *fields, const json_t *v, json_t **out) {
    *out = NULL;
    if (!json_is_object(v))
        FAIL(c, "must be an object, not %s", article_type(v));
    const char *names[16];
    size_t nnames = field_names(fields, names);
    size_t base = strlen(c->ptr);
    json_t *got = json_object(), *norm = NULL;
    if (!got)
        return -ENOMEM;
    int r = 0;
    const char *key;
    json_t *item;
    json_object_foreach((json_t *)v, key, item) {
        sh_pointer_push(c->ptr, sizeof c->ptr, key);
        const sh_field *f = find_field(fields, key);
        if (!f) {
            r = sh_check_unknown_key(c, key, names, nnames);
            goto fail;
        }
        json_t *value;
        if ((r = check_field(c, f, item, &value)) < 0)
            goto fail;
        json_object_set_new(got, key, value);
        c->ptr[base] = '\0';
    }
    norm = json_object();
    if (!norm) {
        r = -ENOMEM;
        goto fail;
    }
    for (const sh_field *f = fields; f->name; f++) {
        json_t *value = json_object_get(got, f->name);
        if (value) {
            json_object_set(norm, f->name, value);
        } else if ((f->flags & SH_F_REQUIRED) && !(c->flags & SH_NORM_OVERLAY)) {
            sh_pointer_push(c->ptr, sizeof c->ptr, f->name);
            sh_policy_set_error(c->err, SH_POLICY_ERR_INVALID, c->source, 0, 0, c->ptr,
                                "required key is missing");
            r = -EINVAL;
            goto fail;
        } else if (f->def) {
            json_t *d = json_loads(f->def, JSON_DECODE_ANY, NULL);
            if (d && f->kind == SH_K_NUM) {
                double x = json_number_value(d);
                json_decref(d);
                d = json_real(x);
            }
            if (!d || json_object_set_new(norm, f->name, d) < 0)
                r = -ENOMEM;
        }
    }
    if (r < 0)
        goto fail;
    json_decref(got);
    c->ptr[base] = '\0';
    *out = norm;
    return 0;
fail:
    json_decref(got);
    json_decref(norm);
    return r;
}

/* A key the section's other keys make meaningless, or a missing key they make necessary. */
static int section_rules(ctx *c, const char *name, json_t *sec) {
    size_t base = strlen(c->ptr);
    if (c->flags & SH_NORM_OVERLAY)
        return 0;
    if (strcmp(name, "freeze") == 0) {
        if (!json_object_get(sec, "layers") && json_array_size(json_object_get(sec, "params")) == 0)
            FAIL(c, "freezes nothing: give \"layers\" or \"params\"");
    } else if (strcmp(name, "safegrad") == 0) {
        const char *src = json_string_value(json_object_get(sec, "source"));
        static const char *const needs[][2] = {{"probe", "probe"}, {"direction", "direction"}};
        for (int i = 0; i < 2; i++) {
            int want = strcmp(src, needs[i][0]) == 0;
            int has = json_object_get(sec, needs[i][1]) != NULL;
            sh_pointer_push(c->ptr, sizeof c->ptr, needs[i][1]);
            if (want && !has)
                FAIL(c, "required when \"source\" is \"%s\"", src);
            if (!want && has)
                FAIL(c, "only used when \"source\" is \"%s\" (it is \"%s\")", needs[i][0], src);
            c->ptr[base] = '\0';
        }
    } else if (strcmp(name, "shaping") == 0) {
        int has[4] = {0};
        size_t i;
        json_t *g;
        json_array_foreach(json_object_get(sec, "guards"), i, g) {
            for (int k = 0; k < 4; k++)
                has[k] |= strcmp(json_string_value(g), GUARD[k]) == 0;
        }
        /* direction and gradient set their thresholds against benign rows */
        if ((has[0] || has[2]) && !json_object_get(sec, "benign"))
            FAIL(c, "\"benign\" (a probe of benign prompts with helpful answers) is required by the "
                    "\"%s\" guard",
                 has[0] ? "direction" : "gradient");
        sh_pointer_push(c->ptr, sizeof c->ptr, "callable");
        if (has[3] && !json_object_get(sec, "callable")) {
            c->ptr[base] = '\0';
            FAIL(c, "\"callable\" is required by the \"callable\" guard");
        }
        if (!has[3] && json_object_get(sec, "callable"))
            FAIL(c, "only used with the \"callable\" guard");
        c->ptr[base] = '\0';
        if ((has[3] || json_object_get(sec, "response_marker")) && !json_object_get(sec, "tokenizer"))
            FAIL(c, "\"tokenizer\" is required to decode text (by the \"callable\" guard or "
                    "\"response_marker\")");
        if (json_object_get(sec, "layer") && !has[0]) {
            sh_pointer_push(c->ptr, sizeof c->ptr, "layer");
            FAIL(c, "only used with the \"direction\" guard");
        }
    }
    return 0;
}

static int probe_rules(ctx *c, json_t *probe) {
    size_t base = strlen(c->ptr);
    int data = json_object_get(probe, "data") != NULL, fn = json_object_get(probe, "callable") != NULL;
    int shipped = json_object_get(probe, "builtin") != NULL;
    if (!data && !fn && !shipped)
        FAIL(c, "a probe needs \"data\" (a JSONL file), \"builtin\" (a shipped set) or \"callable\"");
    if (data + fn + shipped > 1) {
        sh_pointer_push(c->ptr, sizeof c->ptr, fn ? "callable" : "builtin");
        FAIL(c, "a probe has one of \"data\", \"builtin\" or \"callable\", not %s",
             data + fn + shipped == 3 ? "all three" : "two");
    }
    if (fn && json_object_get(probe, "tokenizer")) {
        sh_pointer_push(c->ptr, sizeof c->ptr, "tokenizer");
        FAIL(c, "only used with \"data\"");
    }
    c->ptr[base] = '\0';
    return 0;
}

static int valid_probe_name(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(s[i] == '_' || s[i] == '-' || s[i] == '.' || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9')))
            return 0;
    return 1;
}

/* "probes": "builtin" stands for every shipped set, each a probe of its own name. */
static json_t *builtin_probes(void) {
    json_t *all = json_object();
    for (size_t i = 0; all && BUILTIN[i]; i++)
        if (json_object_set_new(all, BUILTIN[i], json_pack("{s:s}", "builtin", BUILTIN[i])) < 0) {
            json_decref(all);
            return NULL;
        }
    return all;
}

static int check_probes(ctx *c, const json_t *v, json_t **out) {
    *out = NULL;
    if (json_is_string(v) && strcmp(json_string_value(v), "builtin") == 0) {
        json_t *all = builtin_probes();
        if (!all)
            return -ENOMEM;
        int r = check_probes(c, all, out);
        json_decref(all);
        return r;
    }
    if (!json_is_object(v)) {
        if (json_is_string(v))
            FAIL(c, "must be an object of named probes or \"builtin\" (the shipped ones), not \"%s\"",
                 json_string_value(v));
        FAIL(c, "must be an object of named probes or \"builtin\" (the shipped ones), not %s", article_type(v));
    }
    json_t *norm = json_object();
    if (!norm)
        return -ENOMEM;
    size_t base = strlen(c->ptr);
    const char *key;
    json_t *item;
    int r;
    json_object_foreach((json_t *)v, key, item) {
        sh_pointer_push(c->ptr, sizeof c->ptr, key);
        if (!valid_probe_name(key)) {
            sh_policy_set_error(c->err, SH_POLICY_ERR_INVALID, c->source, 0, 0, c->ptr,
                                "a probe name has 1 to 64 letters, digits, '_', '-' or '.'");
            r = -EINVAL;
            goto fail;
        }
        json_t *probe;
        if ((r = check_object(c, PROBE, item, &probe)) < 0)
            goto fail;
        json_object_set_new(norm, key, probe);
        if ((r = probe_rules(c, probe)) < 0)
            goto fail;
        c->ptr[base] = '\0';
    }
    *out = norm;
    return 0;
fail:
    json_decref(norm);
    return r;
}

/* REF, the value of SECTION.FIELD (absent: NULL), names a probe of PROBES. */
static int check_reference(ctx *c, json_t *probes, const char *section, const char *field, json_t *ref) {
    const char *name = json_string_value(ref);
    if (!name || json_object_get(probes, name))
        return 0;
    c->ptr[0] = '\0';
    sh_pointer_push(c->ptr, sizeof c->ptr, section);
    sh_pointer_push(c->ptr, sizeof c->ptr, field);
    char shown[120];
    sh_policy_describe(ref, shown, sizeof shown);
    if (!probes)
        FAIL(c, "no probe named %s: the policy has no \"probes\" section", shown);
    const char *names[64];
    size_t n = 0;
    const char *key;
    json_t *item;
    json_object_foreach(probes, key, item) {
        if (n < 64)
            names[n++] = key;
    }
    const char *hint = sh_suggest(name, names, n);
    if (hint)
        FAIL(c, "no probe named %s in /probes (did you mean \"%s\"?)", shown, hint);
    FAIL(c, "no probe named %s in /probes", shown);
}

/* Every probe reference (a field of kind SH_K_PROBE_REF, in section and field order) names a
 * probe of /probes. */
static int check_references(ctx *c, json_t *norm) {
    json_t *probes = json_object_get(norm, "probes");
    for (const sh_feature *s = FEATURES; s->name && !(c->flags & SH_NORM_OVERLAY); s++) {
        if (!s->section || (s->flags & SH_S_MAP))
            continue;
        json_t *sec = json_object_get(norm, s->section);
        for (const sh_field *f = s->fields; sec && f->name; f++) {
            int r = f->kind == SH_K_PROBE_REF ? check_reference(c, probes, s->section, f->name,
                                                                json_object_get(sec, f->name))
                                              : 0;
            if (r < 0)
                return r;
        }
    }
    return 0;
}

int sh_policy_normalize(const json_t *raw, const char *source, unsigned flags, json_t **ret,
                        sh_policy_error *err) {
    ctx c = {.source = source, .flags = flags, .err = err, .ptr = ""};
    ctx *cp = &c;
    if (!json_is_object(raw)) {
        sh_policy_set_error(err, SH_POLICY_ERR_INVALID, source, 0, 0, "", "a policy is a JSON object, not %s",
                            article_type(raw));
        return -EINVAL;
    }
    /* the version first: another version's keys would only produce misleading errors */
    json_t *ver = json_object_get(raw, "version");
    sh_pointer_push(c.ptr, sizeof c.ptr, "version");
    if (!ver)
        FAIL(cp, "required key is missing (this safehook reads \"version\": 1)");
    json_t *tmp;
    if (check_field(cp, &TOP[0], ver, &tmp) < 0)
        return -EINVAL;
    json_decref(tmp);
    c.ptr[0] = '\0';

    const char *names[32];
    size_t n = field_names(TOP, names);
    for (const sh_feature *s = FEATURES; s->name; s++)
        if (s->section)
            names[n++] = s->section;

    json_t *got = json_object();
    if (!got)
        return -ENOMEM;
    int r = 0;
    const char *key;
    json_t *item;
    json_object_foreach((json_t *)raw, key, item) {
        c.ptr[0] = '\0';
        sh_pointer_push(c.ptr, sizeof c.ptr, key);
        const sh_field *f = find_field(TOP, key);
        json_t *value = NULL;
        if (f) {
            r = check_field(cp, f, item, &value);
        } else if (strcmp(key, "probes") == 0) {
            r = check_probes(cp, item, &value);
        } else if (sh_schema_fields(key) && strcmp(key, "probe") != 0) {
            if ((r = check_object(cp, sh_schema_fields(key), item, &value)) == 0 &&
                (r = section_rules(cp, key, value)) < 0)
                json_decref(value);
        } else {
            r = sh_check_unknown_key(cp, key, names, n);
        }
        if (r < 0)
            goto fail;
        json_object_set_new(got, key, value);
    }
    /* the normalized order: top-level keys, then sections */
    json_t *norm = json_object();
    if (!norm) {
        r = -ENOMEM;
        goto fail;
    }
    for (const sh_field *f = TOP; f->name; f++) {
        json_t *value = json_object_get(got, f->name);
        json_object_set_new(norm, f->name,
                            value ? json_incref(value) : json_loads(f->def, JSON_DECODE_ANY, NULL));
    }
    for (const sh_feature *s = FEATURES; s->name; s++) {
        json_t *value = s->section ? json_object_get(got, s->section) : NULL;
        if (value)
            json_object_set(norm, s->section, value);
    }
    json_decref(got);
    if ((r = check_references(cp, norm)) < 0) {
        json_decref(norm);
        return r;
    }
    *ret = norm;
    return 0;
fail:
    json_decref(got);
    return r;
}
