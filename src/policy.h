/* Policies: parsing (jansson), validation against schema v1 (policy_schema.c), and the
 * precedence of the three sources (embedded default, system policy, user policy), with the
 * tightening rules of an enforced system policy (policy_merge.c). */
#ifndef SH_POLICY_H
#define SH_POLICY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

enum sh_on_error { SH_ON_ERROR_ABORT = 0, SH_ON_ERROR_WARN = 1 };

/* What kind of error a policy error is. */
enum sh_policy_err_kind {
    SH_POLICY_ERR_INVALID = 0,   /* unreadable, not JSON, or not schema v1 */
    SH_POLICY_ERR_WEAKENING = 1, /* valid, but weakens the enforced system policy */
};

/* Policies larger than this are refused unread. */
#define SH_POLICY_MAX_BYTES (1 << 20)

/* The first error found. line/column are 1-based for JSON syntax errors, 0 otherwise;
 * pointer is a JSON pointer ("/freeze/layers") for schema errors, "" otherwise. */
typedef struct sh_policy_error {
    char source[512];
    int kind; /* enum sh_policy_err_kind */
    int line;
    int column;
    char pointer[256];
    char text[512];
} sh_policy_error;

/* A validated policy. doc is the normalized document: the sections given, each with every
 * default filled in; the rest of the core and the Python side read it, never the raw text. */
typedef struct sh_policy {
    json_t *doc;
    char origin[1100];    /* "<embedded default>", "system:PATH", "user:PATH", "user:<dict>",
                             "system:PATH+user:PATH" */
    char digest[65];      /* hex SHA-256 of the normalized document (compact, keys sorted) */
    bool enforce;         /* the policy in force says "enforce": true */
    bool system_enforced; /* ...because an enforced system policy is part of it */
    enum sh_on_error on_error;
    const char *audit_path; /* borrowed from doc; NULL when no audit path is set */
} sh_policy;

/* The embedded default policy (policies/default.json compiled in), and the policy it falls back
 * to for a model it cannot protect (policies/default-fallback.json; runtime/default.py decides). */
extern const char sh_default_policy[];
extern const size_t sh_default_policy_len;
extern const char sh_default_fallback_policy[];
extern const size_t sh_default_fallback_policy_len;

/* Parse and validate TEXT (LEN bytes) named SOURCE in messages. On success stores a new policy
 * (origin SOURCE) in *ret and returns 0; otherwise fills *err and returns -EINVAL (or -ENOMEM).
 * TEXT need not be NUL-terminated and may hold any bytes. */
int sh_policy_parse(const char *text, size_t len, const char *source, sh_policy **ret, sh_policy_error *err);

/* Read and parse the file PATH. Returns -errno when it cannot be read (-ENOENT when it does not
 * exist, -EFBIG when it is over SH_POLICY_MAX_BYTES), with err filled. */
int sh_policy_load_file(const char *path, sh_policy **ret, sh_policy_error *err);

/* Load the system policy at SYSTEM_PATH (NULL: the compiled-in path). A missing file is no
 * system policy: returns 0 with *ret = NULL. An unreadable or invalid one is an error. */
int sh_policy_load_system(const char *system_path, sh_policy **ret, sh_policy_error *err);

/* Resolve the policy in force: the user policy (USER_PATH, or USER_TEXT named USER_NAME; both
 * may be NULL) against the system policy at SYSTEM_PATH (NULL for the compiled-in path, never
 * the environment; a missing file means no system policy).
 *   - neither given: the embedded default;
 *   - only one given: that one;
 *   - both, system not enforced: the user policy (a system policy is then the machine's default);
 *   - both, system enforced: the system policy tightened by the user's (sh_policy_tighten); a
 *     weakening fails with err->kind = SH_POLICY_ERR_WEAKENING and the key's pointer.
 * On success *ret holds a new policy; on failure err is filled and a negative errno returned. */
int sh_policy_resolve(const char *user_path, const char *user_text, const char *user_name,
                      const char *system_path, sh_policy **ret, sh_policy_error *err);

/* "SOURCE:LINE:COLUMN: text" for syntax errors, "SOURCE: /pointer: text" for schema errors,
 * "SOURCE: text" for the rest. */
void sh_policy_error_format(const sh_policy_error *err, char *buf, size_t len);

/* The compiled-in path of the system policy. */
const char *sh_policy_system_path(void);

void sh_policy_free(sh_policy *p);

#endif
