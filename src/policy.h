/* Policies: parsing (jansson), validation against schema v1, and the precedence of the three
 * sources (embedded default, system policy, user policy). */
#ifndef SH_POLICY_H
#define SH_POLICY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

enum sh_on_error { SH_ON_ERROR_ABORT = 0, SH_ON_ERROR_WARN = 1 };

/* The first error found. line/column are 1-based for JSON syntax errors, 0 otherwise;
 * pointer is a JSON pointer ("/freeze/layers") for schema errors, "" otherwise. */
typedef struct sh_policy_error {
    char source[512];
    int line;
    int column;
    char pointer[256];
    char text[512];
} sh_policy_error;

/* A validated policy. doc is the normalized document: every section present, defaults filled
 * in; the rest of the core and the Python side read it, never the user's raw text. */
typedef struct sh_policy {
    json_t *doc;
    char origin[600];   /* "embedded", "system:PATH", "user:PATH", "user:<dict>", or joined by '+' */
    char digest[17];    /* hex of a 64-bit FNV-1a of the normalized document */
    bool enforce;
    enum sh_on_error on_error;
    const char *audit_path; /* borrowed from doc; NULL when no audit path is set */
} sh_policy;

/* The embedded default policy (policies/default.json compiled in). */
extern const char sh_default_policy[];
extern const size_t sh_default_policy_len;

/* Parse and validate TEXT (LEN bytes) named SOURCE in messages. On success stores a new policy
 * in *ret and returns 0; otherwise fills *err and returns -EINVAL (or -ENOMEM). */
int sh_policy_parse(const char *text, size_t len, const char *source, sh_policy **ret, sh_policy_error *err);

/* Read and parse the file PATH. -ENOENT etc. when it cannot be read (err filled). */
int sh_policy_load_file(const char *path, sh_policy **ret, sh_policy_error *err);

/* Resolve the policy in force: the user policy (USER_PATH, or USER_TEXT named USER_NAME; both
 * may be NULL) against the system policy at SYSTEM_PATH (NULL for the compiled-in path; a
 * missing file means no system policy), falling back to the embedded default when neither is
 * given. Under an enforced system policy a user policy may only tighten it. */
int sh_policy_resolve(const char *user_path, const char *user_text, const char *user_name,
                      const char *system_path, sh_policy **ret, sh_policy_error *err);

/* "SOURCE:LINE:COLUMN: text" for syntax errors, "SOURCE: /pointer: text" for schema errors. */
void sh_policy_error_format(const sh_policy_error *err, char *buf, size_t len);

/* The compiled-in path of the system policy. */
const char *sh_policy_system_path(void);

void sh_policy_free(sh_policy *p);

#endif
