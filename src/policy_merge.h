/* Tightening: a user policy under an enforced system policy. */
#ifndef SH_POLICY_MERGE_H
#define SH_POLICY_MERGE_H

#include <jansson.h>

#include "policy.h"

/* The system policy SYS (normalized, named SYS_NAME) tightened by the user policy USER_RAW
 * (as written, valid as an overlay: SH_NORM_OVERLAY) / USER_NORM (its normalized form), named USER_NAME.
 *   - a section the user leaves out: the system's holds;
 *   - a section only the user has: added;
 *   - a section both have: key by key, each key the user writes must pass the key's rule
 *     (sh_field.tighten) against the system's value, and then replaces it; keys the user does
 *     not write keep the system's value (not the schema default);
 *   - probes: the system's cannot be changed, new ones are added.
 * On success stores the normalized result in *ret (new reference) and returns 0. A weakening
 * fills *err (kind SH_POLICY_ERR_WEAKENING, source USER_NAME, pointer of the key) and returns
 * -EPERM; -ENOMEM on allocation failure. */
int sh_policy_tighten(const json_t *sys, const char *sys_name, const json_t *user_raw,
                      const json_t *user_norm, const char *user_name, json_t **ret, sh_policy_error *err);

#endif
