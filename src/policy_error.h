/* Words of policy errors: the error struct filled in, values and JSON pointers rendered as one
 * printable line, and the context the validator carries while it walks a policy. */
#ifndef SH_POLICY_ERROR_H
#define SH_POLICY_ERROR_H

#include <jansson.h>

#include "policy.h"

enum { SH_PTR_LEN = sizeof(((sh_policy_error *)0)->pointer) };

/* Set *err (may be NULL): KIND, SOURCE, LINE:COL (0 for none), json POINTER ("" for none), message. */
void sh_policy_set_error(sh_policy_error *err, int kind, const char *source, int line, int col,
                         const char *pointer, const char *fmt, ...) __attribute__((format(printf, 7, 8)));

/* A short printable rendering of V for messages: "text" quoted (escaped, cut at 64 bytes), a
 * number, true/false/null, or "a list"/"an object". */
void sh_policy_describe(const json_t *v, char *buf, size_t len);

/* The same, in a thread-local buffer valid until the next call on this thread. */
const char *sh_policy_describe_tmp(const json_t *v);

/* D as the shortest of %.15g / %.17g that reads back exactly, with ".0" when it looks integral. */
void sh_format_real(double d, char *buf, size_t len);

/* Append "/KEY" (JSON-pointer escaped, control bytes shown as \xNN, cut at 64 bytes) to
 * POINTER; nothing when it would not fit. */
void sh_pointer_push(char *pointer, size_t len, const char *key);

/* Where the validator is: the policy's name, its flags (SH_NORM_*), the error to fill and the
 * JSON pointer of the value being checked. */
typedef struct sh_check_ctx {
    const char *source;
    unsigned flags;
    sh_policy_error *err;
    char ptr[SH_PTR_LEN];
} sh_check_ctx;

/* Fill C's error (kind invalid, at C's pointer) and return -EINVAL. */
int sh_check_fail(sh_check_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* An unknown KEY among the N known NAMES: the error with a did-you-mean hint or the known keys. */
int sh_check_unknown_key(sh_check_ctx *c, const char *key, const char *const *names, size_t n);

#define SH_FAIL(c, ...) return sh_check_fail((c), __VA_ARGS__)

#endif
