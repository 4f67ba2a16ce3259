/* Policy bindings of safehook._core: the normalized text of a policy file for
 * `safehook check --explain`, the state of the system policy (for SAFEHOOK_DISABLE), the feature
 * registry with every default (the schema's, for safehook.runtime.registry), and the
 * PolicyError that configure() raises, carrying what Python needs to record and act on it. */
#define PY_SSIZE_T_CLEAN
#include "py_policy.h"

#include <errno.h>
#include <string.h>

#include "audit.h"
#include "policy_schema.h"
#include "sh_config.h"

PyObject *sh_py_policy_raise(PyObject *exc_type, const sh_policy_error *err, const char *system_path,
                             const char *audit_path) {
    char msg[1400];
    sh_policy_error_format(err, msg, sizeof msg);
    const char *on_error = "abort";
    sh_policy *sys = NULL;
    sh_policy_error serr = {0};
    int sr = sh_policy_load_system(system_path, &sys, &serr);
    if (sr == 0 && sys && sys->enforce) {
        on_error = sys->on_error == SH_ON_ERROR_WARN ? "warn" : "abort";
        if (sys->audit_path)
            audit_path = sys->audit_path;
    }
    /* The refusal goes where root reads it: the system policy's daemon, or the compiled-in
     * socket when the system policy cannot be read or seen (best effort: it is raised anyway). */
    json_t *sys_audit = sys ? json_object_get(sys->doc, "audit") : NULL;
    const char *sink = json_string_value(json_object_get(sys_audit, "sink"));
    if (!sh_audit_daemon() && ((sink && !strcmp(sink, "daemon")) || sr < 0)) {
        const char *sock = json_string_value(json_object_get(sys_audit, "socket"));
        sh_audit_connect(sock ? sock : SH_AUDIT_SOCKET);
    }
    if (sh_audit_daemon())
        sh_audit_emit("policy_refused", -1,
                      json_pack("{s:s,s:s,s:s}", "message", msg, "kind",
                                err->kind == SH_POLICY_ERR_WEAKENING ? "weakening" : "invalid", "pointer",
                                err->pointer));
    else if (audit_path && *audit_path)
        sh_audit_open(audit_path); /* best effort: the refusal is raised either way */
    /* file names may not be UTF-8: decode as the file system does */
    PyObject *text = PyUnicode_DecodeFSDefault(msg);
    PyObject *exc = text ? PyObject_CallOneArg(exc_type, text) : NULL;
    Py_XDECREF(text);
    if (exc) {
        PyObject *attrs = Py_BuildValue(
            "{s:s,s:s,s:N,s:s,s:O}", "kind", err->kind == SH_POLICY_ERR_WEAKENING ? "weakening" : "invalid",
            "pointer", err->pointer, "source", PyUnicode_DecodeFSDefault(err->source), "on_error", on_error,
            "system_enforced", (sys && sys->enforce) ? Py_True : Py_False);
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (attrs && PyDict_Next(attrs, &pos, &key, &value))
            PyObject_SetAttr(exc, key, value);
        Py_XDECREF(attrs);
        PyErr_Clear();
        PyErr_SetObject(exc_type, exc);
        Py_DECREF(exc);
    }
    sh_policy_free(sys);
    return NULL;
}

PyDoc_STRVAR(
    explain_file_doc,
    "explain_file(path)\n--\n\n"
    "The normalized policy of the file PATH as indented JSON text: the sections it gives, each with\n"
    "every default filled in. Raises PolicyError when the file is not a valid policy.");

static PyObject *explain_file(PyObject *m, PyObject *arg) {
    PyObject *bytes = NULL;
    if (!PyUnicode_FSConverter(arg, &bytes))
        return NULL;
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    int r = sh_policy_load_file(PyBytes_AS_STRING(bytes), &p, &err);
    Py_DECREF(bytes);
    if (r < 0) {
        if (r == -ENOMEM)
            return PyErr_NoMemory();
        char msg[1400];
        sh_policy_error_format(&err, msg, sizeof msg);
        PyObject *exc_type = PyObject_GetAttrString(m, "PolicyError");
        PyObject *text = PyUnicode_DecodeFSDefault(msg);
        if (exc_type && text)
            PyErr_SetObject(exc_type, text);
        Py_XDECREF(exc_type);
        Py_XDECREF(text);
        return NULL;
    }
    char *text = json_dumps(p->doc, JSON_INDENT(2));
    sh_policy_free(p);
    if (!text)
        return PyErr_NoMemory();
    PyObject *s = PyUnicode_FromString(text);
    free(text);
    return s;
}

PyDoc_STRVAR(default_policy_doc,
             "default_policy(fallback=False)\n--\n\n"
             "The embedded default policy (or, FALLBACK, the policy it falls back to for a model it cannot\n"
             "protect) as a dict: policy (normalized, indented JSON text), digest, origin.");

static PyObject *default_policy(PyObject *m, PyObject *args, PyObject *kw) {
    (void)m;
    static char *kwlist[] = {"fallback", NULL};
    int fallback = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &fallback))
        return NULL;
    const char *origin = fallback ? "<embedded default: fallback>" : "<embedded default>";
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    int r = fallback ? sh_policy_parse(sh_default_fallback_policy, sh_default_fallback_policy_len, origin, &p, &err)
                     : sh_policy_parse(sh_default_policy, sh_default_policy_len, origin, &p, &err);
    if (r < 0) /* both are checked when the library is built (tests/py/test_policy_check.py) */
        return r == -ENOMEM ? PyErr_NoMemory() : PyErr_Format(PyExc_RuntimeError, "%s: %s", origin, err.text);
    char *text = json_dumps(p->doc, JSON_INDENT(2));
    PyObject *d = text ? Py_BuildValue("{s:s,s:s,s:s}", "policy", text, "digest", p->digest, "origin", origin)
                       : PyErr_NoMemory();
    free(text);
    sh_policy_free(p);
    return d;
}

PyDoc_STRVAR(system_policy_state_doc,
             "system_policy_state(system_path=None)\n--\n\n"
             "The system policy at SYSTEM_PATH (None: the compiled-in path) as a dict: path, state ('none',\n"
             "'advisory', 'enforced' or 'invalid'), error (the error line when invalid), audit (its\n"
             "audit.path) and digest.");

static PyObject *system_policy_state(PyObject *m, PyObject *args, PyObject *kw) {
    (void)m;
    static char *kwlist[] = {"system_path", NULL};
    const char *path = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|z", kwlist, &path))
        return NULL;
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    int r = sh_policy_load_system(path, &p, &err);
    if (r == -ENOMEM)
        return PyErr_NoMemory();
    char msg[1400] = "";
    const char *state = "none";
    if (r < 0) {
        state = "invalid";
        sh_policy_error_format(&err, msg, sizeof msg);
    } else if (p) {
        state = p->enforce ? "enforced" : "advisory";
    }
    PyObject *d =
        Py_BuildValue("{s:s,s:s,s:N,s:z,s:z}", "path", path ? path : sh_policy_system_path(), "state", state,
                      "error", msg[0] ? PyUnicode_DecodeFSDefault(msg) : Py_NewRef(Py_None), "audit",
                      p ? p->audit_path : NULL, "digest", p ? p->digest : NULL);
    sh_policy_free(p);
    return d;
}

/* {field: default} of FIELDS (fields without a default left out), or NULL on ENOMEM. */
static json_t *defaults_of(const sh_field *fields) {
    json_t *d = json_object();
    for (const sh_field *f = fields; d && f->name; f++) {
        json_t *v = f->def ? json_loads(f->def, JSON_DECODE_ANY, NULL) : NULL;
        if (f->def && (!v || json_object_set_new(d, f->name, v) < 0)) {
            json_decref(d);
            d = NULL;
        }
    }
    return d;
}

PyDoc_STRVAR(schema_json_doc,
             "schema_json()\n--\n\n"
             "The feature registry of the policy schema as JSON text: {\"features\": [{\"name\", \"section\",\n"
             "\"module\", \"order\", \"always\", \"map\"}, ...] in setup order, \"defaults\": {section: {field:\n"
             "default}}} (section \"\" is the top level, \"probe\" one entry of probes).");

static PyObject *schema_json(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    json_t *feats = json_array(), *defs = json_object();
    json_t *doc = json_pack("{s:o,s:o}", "features", feats, "defaults", defs);
    int bad = !doc || json_object_set_new(defs, "", defaults_of(sh_schema_fields(""))) < 0 ||
              json_object_set_new(defs, "probe", defaults_of(sh_schema_fields("probe"))) < 0;
    for (const sh_feature *f = sh_schema_features(); !bad && f->name; f++) {
        json_t *e = json_pack("{s:s,s:s?,s:s?,s:i,s:b,s:b}", "name", f->name, "section", f->section, "module",
                              f->module, "order", f->order, "always", (f->flags & SH_S_ALWAYS) != 0, "map",
                              (f->flags & SH_S_MAP) != 0);
        bad = !e || json_array_append_new(feats, e) < 0;
        if (!bad && f->section && !(f->flags & SH_S_MAP))
            bad = json_object_set_new(defs, f->section, defaults_of(f->fields)) < 0;
    }
    char *text = bad ? NULL : json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    if (!text)
        return PyErr_NoMemory();
    PyObject *r = PyUnicode_FromString(text);
    free(text);
    return r;
}

static PyMethodDef policy_methods[] = {
    {"schema_json", schema_json, METH_NOARGS, schema_json_doc},
    {"explain_file", explain_file, METH_O, explain_file_doc},
    {"default_policy", (PyCFunction)(void (*)(void))default_policy, METH_VARARGS | METH_KEYWORDS, default_policy_doc},
    {"system_policy_state", (PyCFunction)(void (*)(void))system_policy_state, METH_VARARGS | METH_KEYWORDS,
     system_policy_state_doc},
    {NULL, NULL, 0, NULL},
};

int sh_py_policy_init(PyObject *m) {
    return PyModule_AddFunctions(m, policy_methods);
}
