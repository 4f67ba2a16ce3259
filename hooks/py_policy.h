/* Policy bindings of safehook._core (py_policy.c). */
#ifndef SH_PY_POLICY_H
#define SH_PY_POLICY_H

#include <Python.h>

#include "policy.h"

/* Add explain_file and system_policy_state to the module M. 0 or -1 with an exception set. */
int sh_py_policy_init(PyObject *m);

/* Raise EXC_TYPE (PolicyError) for ERR, with attributes kind ("invalid" or "weakening"),
 * pointer, source and on_error. When the system policy at SYSTEM_PATH is enforced and valid, its
 * on_error governs and its audit.path (else AUDIT_PATH) is opened so that the caller can record
 * the refusal; otherwise on_error is "abort" and AUDIT_PATH is opened when given. Returns NULL. */
PyObject *sh_py_policy_raise(PyObject *exc_type, const sh_policy_error *err, const char *system_path,
                             const char *audit_path);

#endif
