/* Schema v1 of a policy as data: every key with its type, range, default and tightening rule,
 * and the validator that turns a parsed document into the normalized one. policies/SCHEMA.md
 * is this table in prose; keep the two in step. */
#ifndef SH_POLICY_SCHEMA_H
#define SH_POLICY_SCHEMA_H

#include <jansson.h>

#include "policy.h"
#include "policy_error.h"

#define SH_POLICY_MAX_LIST 1024    /* entries of a list of ranges, globs or keywords */
#define SH_POLICY_MAX_BLOCK 999999 /* largest block number in a range */

enum sh_kind {
    SH_K_INT, /* an integer in [lo, hi] */
    SH_K_NUM, /* a number in lo..hi, ends open per flags; normalized to a real */
    SH_K_BOOL,
    SH_K_ENUM,         /* one of choices */
    SH_K_PATH,         /* a non-empty string */
    SH_K_PATH_OR_NULL, /* a non-empty string or null */
    SH_K_GLOBS,        /* a list of non-empty strings (may be empty) */
    SH_K_STRINGS,      /* a non-empty list of non-empty strings */
    SH_K_PROBE_REF,    /* a probe name, checked against /probes once the whole policy is read */
    SH_K_JUDGE,        /* one of choices, or "pkg.module:function" */
    SH_K_CALLABLE,     /* "pkg.module:function" */
    SH_K_LAYERS,       /* block ranges: "A-B", ["A-B", ...] or {"fraction": [a, b]} */
    SH_K_CHOICES,      /* a non-empty list of distinct values, each one of choices */
};

/* How a user policy may change a key under an enforced system policy. */
enum sh_tighten {
    SH_T_FREE,     /* any valid value */
    SH_T_SAME,     /* must equal the system's value */
    SH_T_LE,       /* a number no larger than the system's */
    SH_T_GE,       /* a number no smaller than the system's */
    SH_T_ORDER,    /* an enum value at least as strict: order lists them weakest first */
    SH_T_TRUE,     /* once the system says true it stays true */
    SH_T_SUPERSET, /* a list holding every string of the system's */
    SH_T_LAYERS,   /* block ranges covering the system's */
    SH_T_SET_ONCE, /* must equal the system's value unless the system's is null */
};

#define SH_F_REQUIRED 1u
#define SH_F_LO_OPEN 2u
#define SH_F_HI_OPEN 4u

typedef struct sh_field {
    const char *name;
    enum sh_kind kind;
    unsigned flags;
    double lo, hi;
    const char *const *choices; /* NULL-terminated, for SH_K_ENUM, SH_K_JUDGE and SH_K_CHOICES */
    const char *def;            /* the default as JSON text; NULL: absent unless given */
    enum sh_tighten tighten;
    const char *const *order; /* SH_T_ORDER: the values, weakest first */
} sh_field;

/* The fields of SECTION ("" for the top level, "probe" for one entry of probes, else a section
 * name), terminated by an entry with a NULL name; NULL for an unknown section. */
const sh_field *sh_schema_fields(const char *section);

#define SH_S_MAP 1u    /* the section maps names to entries of FIELDS (probes) */
#define SH_S_ALWAYS 2u /* no section of its own: set up for every policy */

/* One feature of safehook, declared once: its policy section (NULL with SH_S_ALWAYS) and that
 * section's fields with their defaults, the Python module that sets it up (NULL: a section no
 * module reads by itself, audit), and the order of its step callables (lower runs first; 0:
 * none). Features are listed in the order their setup runs, which is also the order the
 * normalized policy lists their sections. */
typedef struct sh_feature {
    const char *name;
    const char *section;
    const sh_field *fields;
    unsigned flags;
    const char *module;
    int order;
} sh_feature;

/* The features, terminated by an entry with a NULL name. */
const sh_feature *sh_schema_features(void);

/* Validate a user policy as an overlay on an enforced system policy: every key it writes is
 * checked, but required keys, rules between keys and references to probes are left to the
 * merged result (the system policy may supply them). */
#define SH_NORM_OVERLAY 1u

/* Validate RAW (a parsed policy, not modified) named SOURCE in messages; FLAGS is 0 or
 * SH_NORM_OVERLAY. On success stores the normalized document (new reference: absent sections
 * absent, present ones with every default) in *ret and returns 0; otherwise fills *err with
 * the first error and returns -EINVAL, or returns -ENOMEM. */
int sh_policy_normalize(const json_t *raw, const char *source, unsigned flags, json_t **ret,
                        sh_policy_error *err);

/* Validate freeze.layers V at C's pointer; on success store the normalized value (a sorted
 * list of "A-B" strings, or {"fraction": [a, b]} with reals) in *out. -EINVAL with C's error
 * filled, or -ENOMEM. */
int sh_check_layers(sh_check_ctx *c, const json_t *v, json_t **out);

#endif
