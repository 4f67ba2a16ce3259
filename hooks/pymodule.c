/* safehook._core: the CPython extension that owns the runtime state of a process.
 *
 * Whether a process was entered through LD_PRELOAD (libsafehook.so imports the package when
 * torch is imported) or through `import safehook`, this module is loaded once, so there is one
 * runtime: one policy, one audit log, one set of step counters. pre_step and post_step are
 * registered as torch's global optimizer step hooks; they are C functions so that the bare hook
 * path costs a few microseconds per step. Python features (freezing, SafeGrad, probes) plug in
 * as callables run from these hooks. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <unistd.h>

#include "audit.h"
#include "log.h"
#include "policy.h"
#include "py_policy.h"
#include "sh_config.h"
#include "stack.h"

int sh_py_freeze_init(PyObject *m);
int sh_py_safegrad_init(PyObject *m); /* hooks/py_safegrad.c */

typedef struct {
    PyObject *error;       /* safehook.SafehookError */
    PyObject *policy_error;/* safehook.PolicyError (subclass) */
    PyObject *optimizers;  /* {id(opt): [weakref, index, steps]} */
    PyObject *pre_features;  /* list of callables f(opt, step, record) */
    PyObject *post_features; /* list of callables f(opt, step, record) */
    PyObject *closure_wrap;  /* f(opt, step, index, args, kwargs) -> (args, kwargs), or NULL */
    PyObject *gate;          /* f(): raises to stop the job before a step is counted, or NULL */
    PyObject *pending;     /* str: a policy error that stops training at its first step */
    PyObject *start_extra; /* dict: fields the features add to the "start" record (start_fields) */
    sh_policy *policy;
    long long steps;       /* outermost optimizer steps, all optimizers */
    long long nested;      /* step calls made inside another optimizer's step */
    long long current;     /* the step number of the step last begun, in any thread */
    int started;
    int sample_every;      /* step records: every step (1), every N steps, or none (0) */
} core_state;

static inline core_state *get_state(PyObject *m) { return (core_state *)PyModule_GetState(m); }

/* The one module state of this process (one interpreter, one load), for the preload's check. */
static core_state *the_state;

/* The step running in this thread. Per thread: two threads stepping two optimizers at once are
 * two outer steps, each with its own nesting and step number. The module is loaded once per
 * process (multiple interpreters are declared unsupported), so a C thread-local is its state. */
static _Thread_local struct {
    int depth;         /* step calls in progress: 1 the outer one, more when nested */
    long long current; /* the outer step's number */
} step_tls;

/* PyWeakref_GetRef (3.13) where this Python lacks it. */
#if PY_VERSION_HEX < 0x030D0000
static int compat_weakref_get(PyObject *ref, PyObject **obj) {
    PyObject *o = PyWeakref_GetObject(ref); /* borrowed */
    if (!o) {
        *obj = NULL;
        return -1;
    }
    *obj = o == Py_None ? NULL : Py_NewRef(o);
    return *obj != NULL;
}
#define PyWeakref_GetRef compat_weakref_get
#endif

/* ---- Python values to JSON ---- */

static json_t *to_json(PyObject *o, int depth) {
    if (depth > 32)
        return json_string("<too deep>");
    if (o == Py_None)
        return json_null();
    if (PyBool_Check(o))
        return json_boolean(o == Py_True);
    if (PyLong_Check(o)) {
        long long v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return json_real(PyLong_AsDouble(o));
        }
        return json_integer(v);
    }
    if (PyFloat_Check(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        return isfinite(d) ? json_real(d) : json_null(); /* JSON has no NaN or inf */
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(o, &n);
        if (!s) {
            PyErr_Clear();
            return json_string("<unencodable>");
        }
        return json_stringn(s, (size_t)n);
    }
    if (PyDict_Check(o)) {
        json_t *obj = json_object();
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (obj && PyDict_Next(o, &pos, &k, &v)) {
            PyObject *ks = PyObject_Str(k);
            const char *key = ks ? PyUnicode_AsUTF8(ks) : NULL;
            if (key)
                json_object_set_new(obj, key, to_json(v, depth + 1));
            else
                PyErr_Clear();
            Py_XDECREF(ks);
        }
        return obj;
    }
    if (PyList_Check(o) || PyTuple_Check(o)) {
        PyObject *seq = PySequence_Fast(o, "");
        json_t *arr = json_array();
        for (Py_ssize_t i = 0; seq && arr && i < PySequence_Fast_GET_SIZE(seq); i++)
            json_array_append_new(arr, to_json(PySequence_Fast_GET_ITEM(seq, i), depth + 1));
        Py_XDECREF(seq);
        return arr;
    }
    PyObject *s = PyObject_Str(o);
    json_t *r = s ? json_string(PyUnicode_AsUTF8(s)) : NULL;
    Py_XDECREF(s);
    if (!r) {
        PyErr_Clear();
        r = json_string("<unprintable>");
    }
    return r;
}

static PyObject *json_to_py(json_t *j) {
    char *text = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text)
        return PyErr_NoMemory();
    PyObject *jsonmod = PyImport_ImportModule("json");
    PyObject *r = jsonmod ? PyObject_CallMethod(jsonmod, "loads", "s", text) : NULL;
    Py_XDECREF(jsonmod);
    free(text);
    return r;
}

static int emit(const char *event, long long step, json_t *fields) {
    int r = sh_audit_emit(event, step, fields);
    if (r < 0 && r != -ENOENT)
        sh_debug("audit write failed: %s", strerror(-r));
    return r;
}

/* An enforced job whose records safehookd did not take (disk full under disk_full=stop, the
 * daemon gone) must not train on unaudited: raise from the step hook. Returns -1 with the error
 * set, else 0. */
static int require_audited(core_state *st, const char *event, int r) {
    if (r >= 0 || r == -ENOENT || !sh_audit_daemon() || !st->policy || !st->policy->enforce)
        return 0;
    PyErr_Format(st->error, "the audit daemon did not take the '%s' record (%s); an enforced job stops here",
                 event, r == -ENOSPC ? "its log is full" : strerror(-r));
    return -1;
}

/* ---- runtime configuration ---- */

static json_t *versions_json(void);

PyDoc_STRVAR(configure_doc,
"configure(policy_path=None, policy_text=None, policy_name=None, system_path=None, audit_path=None)\n"
"--\n\n"
"Resolve the policy in force and open the audit log. Returns the normalized policy as a dict,\n"
"with its origin, digest and enforce flag under '_meta'. Raises PolicyError on a bad policy.");

static PyObject *core_configure(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"policy_path", "policy_text", "policy_name", "system_path", "audit_path", NULL};
    const char *path = NULL, *text = NULL, *name = NULL, *sys_path = NULL, *audit = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zzzzz", kwlist, &path, &text, &name, &sys_path, &audit))
        return NULL;
    core_state *st = get_state(m);
    sh_policy *p = NULL;
    sh_policy_error err = {0};
    int r = sh_policy_resolve(path, text, name, sys_path, &p, &err);
    if (r < 0)
        return r == -ENOMEM ? PyErr_NoMemory() : sh_py_policy_raise(st->policy_error, &err, sys_path, audit);
    /* audit.sink "daemon": records go to safehookd and the job holds no log file; unreachable,
     * configure fails (under enforcement the job then does not start). */
    json_t *audit_sec = json_object_get(p->doc, "audit");
    const char *sink = json_string_value(json_object_get(audit_sec, "sink"));
    char *before = sh_audit_path() ? strdup(sh_audit_path()) : NULL; /* the log of the policy before */
    if (sink && !strcmp(sink, "daemon")) {
        const char *sock = json_string_value(json_object_get(audit_sec, "socket"));
        if (!sock)
            sock = SH_AUDIT_SOCKET;
        int ar = sh_audit_connect(sock);
        if (ar < 0) {
            PyErr_Format(st->error, "cannot reach the audit daemon safehookd at %s: %s", sock, strerror(-ar));
            free(before);
            sh_policy_free(p);
            return NULL;
        }
        audit = NULL;
    }
    /* SAFEHOOK_AUDIT (AUDIT) overrides the policy's audit.path, unless an enforced system policy sets it */
    const char *ap = sh_audit_daemon() && sink && !strcmp(sink, "daemon") ? NULL
                     : (p->system_enforced && p->audit_path) ? p->audit_path
                     : audit && *audit ? audit : p->audit_path;
    int daemon = sh_audit_daemon() && sink && !strcmp(sink, "daemon");
    if (ap) {
        int ar = sh_audit_open(ap);
        if (ar < 0) {
            PyErr_Format(st->error, "cannot open the audit log %s: %s", ap, strerror(-ar));
            free(before);
            sh_policy_free(p);
            return NULL;
        }
    } else if (!daemon) {
        sh_audit_close(); /* a policy without a log: nothing goes to the log of the one before */
    }
    /* Under the daemon sink, the activation is a record of its own, sent before torch loads: the
     * root watcher matches it (by the kernel's pid of its sender) with the process that maps
     * libtorch. An enforced job whose activation the daemon did not take does not start. */
    if (sh_audit_daemon()) {
        json_t *f = json_pack("{s:s,s:s,s:b}", "policy", p->origin, "digest", p->digest, "enforce", p->enforce);
        json_object_set_new(f, "versions", versions_json());
        int er = sh_audit_emit("activate", -1, f);
        if (er < 0 && p->enforce) {
            PyErr_Format(st->error, "the audit daemon did not take the 'activate' record (%s)",
                         er == -ENOSPC ? "its log is full" : strerror(-er));
            free(before);
            sh_policy_free(p);
            return NULL;
        }
    }
    const char *now = sh_audit_path();
    if (!before || !now || strcmp(before, now))
        st->started = 0; /* a new log gets its own "start" record at the next step */
    free(before);
    Py_CLEAR(st->start_extra); /* said by the features of the policy before */
    sh_policy_free(st->policy);
    st->policy = p;
    const char *level = json_string_value(json_object_get(audit_sec, "level"));
    json_int_t every = json_integer_value(json_object_get(audit_sec, "sample_every"));
    st->sample_every = !level || !strcmp(level, "steps") ? 1 : !strcmp(level, "sample") ? (every > 0 ? (int)every : 10) : 0;
    PyObject *doc = json_to_py(p->doc);
    if (!doc)
        return NULL;
    PyObject *meta = Py_BuildValue("{s:s,s:s,s:O,s:O,s:s,s:z}", "origin", p->origin, "digest", p->digest,
                                   "enforce", p->enforce ? Py_True : Py_False, "system_enforced",
                                   p->system_enforced ? Py_True : Py_False, "on_error",
                                   p->on_error == SH_ON_ERROR_WARN ? "warn" : "abort", "audit", sh_audit_path());
    if (!meta || PyDict_SetItemString(doc, "_meta", meta) < 0) {
        Py_XDECREF(meta);
        Py_DECREF(doc);
        return NULL;
    }
    Py_DECREF(meta);
    return doc;
}

PyDoc_STRVAR(set_pending_doc,
"set_pending_error(message)\n--\n\n"
"Make the next optimizer step raise PolicyError(message): protection could not be applied and the\n"
"policy says abort. None clears it.");

static PyObject *core_set_pending_error(PyObject *m, PyObject *msg) {
    core_state *st = get_state(m);
    if (msg != Py_None && !PyUnicode_Check(msg))
        return PyErr_Format(PyExc_TypeError, "message must be str or None");
    Py_XSETREF(st->pending, msg == Py_None ? NULL : Py_NewRef(msg));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(start_fields_doc,
"start_fields(fields)\n--\n\n"
"Add the dict FIELDS to the 'start' record when it is still to be written (the first optimizer\n"
"step writes it): True. False when it was written already (then write the fields elsewhere).");

static PyObject *core_start_fields(PyObject *m, PyObject *fields) {
    core_state *st = get_state(m);
    if (!PyDict_Check(fields))
        return PyErr_Format(PyExc_TypeError, "fields must be a dict");
    if (st->started)
        Py_RETURN_FALSE;
    if (!st->start_extra && !(st->start_extra = PyDict_New()))
        return NULL;
    if (PyDict_Update(st->start_extra, fields) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(set_features_doc,
"set_features(pre, post, closure_wrap=None, gate=None)\n--\n\n"
"Set the lists of callables f(optimizer, step, record) run in the pre- and post-step hooks.\n"
"A callable may add keys to record (a dict merged into the step's audit record). When a step\n"
"gets a closure and closure_wrap is set, the pre hook returns closure_wrap(optimizer, step,\n"
"index, args, kwargs) (new args and kwargs for step()) instead of running the pre features:\n"
"the wrapped closure runs them with step_features() once its backward is done. gate() is called\n"
"first in every outer step, before it is counted or recorded: when it raises, the step raises\n"
"(the runtime's fail path: every rank stops at the same step, before any record of it).");

static PyObject *core_set_features(PyObject *m, PyObject *args) {
    PyObject *pre, *post, *wrap = Py_None, *gate = Py_None;
    if (!PyArg_ParseTuple(args, "O!O!|OO", &PyList_Type, &pre, &PyList_Type, &post, &wrap, &gate))
        return NULL;
    core_state *st = get_state(m);
    Py_XSETREF(st->closure_wrap, wrap == Py_None ? NULL : Py_NewRef(wrap));
    Py_XSETREF(st->gate, gate == Py_None ? NULL : Py_NewRef(gate));
    Py_XSETREF(st->pre_features, PyList_GetSlice(pre, 0, PY_SSIZE_T_MAX));
    Py_XSETREF(st->post_features, PyList_GetSlice(post, 0, PY_SSIZE_T_MAX));
    if (!st->pre_features || !st->post_features)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- the step hooks ---- */

/* The "optimizer" record of a newly seen optimizer: which one the step records' "opt" numbers. */
static json_t *optimizer_record(PyObject *opt, Py_ssize_t index) {
    json_t *f = json_object();
    json_object_set_new(f, "index", json_integer(index));
    json_object_set_new(f, "class", json_string(Py_TYPE(opt)->tp_name));
    PyObject *groups = PyObject_GetAttrString(opt, "param_groups");
    Py_ssize_t ngroups = groups ? PyObject_Length(groups) : -1;
    Py_XDECREF(groups);
    PyErr_Clear();
    json_object_set_new(f, "param_groups", json_integer(ngroups));
    return f;
}

/* Index and step count of OPT, creating its entry on first sight. A dict keyed by id() with a
 * weakref beside it: optimizers are not kept alive, and a reused id is noticed. */
static PyObject *optimizer_entry(core_state *st, PyObject *opt) {
    PyObject *key = PyLong_FromVoidPtr(opt);
    if (!key)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(st->optimizers, key);
    if (entry) {
        PyObject *ref = PyList_GET_ITEM(entry, 0), *alive = NULL;
        if (ref != Py_None && PyWeakref_GetRef(ref, &alive) < 0) {
            Py_DECREF(key);
            return NULL;
        }
        Py_XDECREF(alive); /* only compared: a live object at this id is the same optimizer */
        if (ref == Py_None || alive == opt) {
            Py_DECREF(key);
            return entry;
        }
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *ref = PyWeakref_NewRef(opt, NULL);
    if (!ref) {
        PyErr_Clear(); /* not weak-referenceable: keep no reference at all */
        ref = Py_NewRef(Py_None);
    }
    Py_ssize_t index = PyDict_GET_SIZE(st->optimizers);
    entry = Py_BuildValue("[Nnn]", ref, index, (Py_ssize_t)0);
    if (!entry || PyDict_SetItem(st->optimizers, key, entry) < 0) {
        Py_XDECREF(entry);
        Py_DECREF(key);
        return NULL;
    }
    Py_DECREF(key);
    Py_DECREF(entry); /* the dict holds it */
    return entry;
}

static json_t *versions_json(void) {
    json_t *v = json_object();
    json_object_set_new(v, "safehook", json_string(SH_VERSION));
    const char *pv = Py_GetVersion(); /* the running interpreter's, "3.11.2 (main, ...)" */
    json_object_set_new(v, "python", json_stringn(pv, strcspn(pv, " ")));
    json_object_set_new(v, "jansson", json_string(jansson_version_str()));
    PyObject *torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch"); /* borrowed */
    PyObject *tv = torch ? PyObject_GetAttrString(torch, "__version__") : NULL;
    PyObject *ts = tv ? PyObject_Str(tv) : NULL;
    const char *t = ts ? PyUnicode_AsUTF8(ts) : NULL;
    if (t)
        json_object_set_new(v, "torch", json_string(t));
    Py_XDECREF(ts);
    Py_XDECREF(tv);
    PyErr_Clear();
    return v;
}

/* Run the callables of LIST. A feature may call install() or set_features(), which replaces the
 * state's lists: the list and each callable are held here until the call returns, and the run
 * finishes the features it started with. */
static int run_features(PyObject *list, PyObject *opt, long long step, PyObject *record) {
    if (!list)
        return 0;
    int r = 0;
    Py_INCREF(list);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *f = Py_NewRef(PyList_GET_ITEM(list, i));
        PyObject *res = PyObject_CallFunction(f, "OLO", opt, step, record);
        Py_DECREF(f);
        if (!res) {
            r = -1;
            break;
        }
        Py_DECREF(res);
    }
    Py_DECREF(list);
    return r;
}

/* Whether the step hook now called runs inside another optimizer step of this thread: the
 * frame calling the hook is torch's step wrapper; an outer step still running has a frame of
 * the same code further down this thread's stack. (A step that raised before its post hook
 * left the depth counter up but has no frame left.) No frame to look at: assume nested. */
static int inside_another_step(void) {
    PyFrameObject *top = PyEval_GetFrame(); /* borrowed */
    if (!top)
        return 1;
    PyCodeObject *code = PyFrame_GetCode(top);
    PyFrameObject *f = PyFrame_GetBack(top);
    int found = 0;
    while (f && !found) {
        PyCodeObject *c = PyFrame_GetCode(f);
        found = c == code;
        Py_DECREF(c);
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    Py_DECREF(code);
    return found;
}

/* Run the pre-step features of step COUNT of optimizer OPT (number INDEX) and write the step's
 * audit record. Returns 0, or -1 with a Python exception set. */
static int features_and_record(core_state *st, PyObject *opt, Py_ssize_t count, Py_ssize_t index) {
    PyObject *record = NULL;
    if (st->pre_features && PyList_GET_SIZE(st->pre_features) > 0) {
        record = PyDict_New();
        if (!record || run_features(st->pre_features, opt, count, record) < 0) {
            Py_XDECREF(record);
            return -1;
        }
    }
    if (sh_audit_active() && st->sample_every > 0 && (count % st->sample_every == 0 || count == 1)) {
        json_t *f = record ? to_json(record, 0) : json_object();
        json_object_set_new(f, "opt", json_integer(index));
        if (require_audited(st, "step", emit("step", count, f)) < 0) {
            Py_XDECREF(record);
            return -1;
        }
    }
    Py_XDECREF(record);
    return 0;
}

/* Whether step() was called with a closure: args is (optimizer, closure?, ...), kwargs may
 * hold "closure". Borrowed pointers; no exception set. */
static int step_closure(PyObject *args, PyObject *kwargs) {
    if (PyTuple_Check(args) && PyTuple_GET_SIZE(args) >= 2 && PyTuple_GET_ITEM(args, 1) != Py_None)
        return 1;
    if (kwargs && PyDict_Check(kwargs)) {
        PyObject *c = PyDict_GetItemString(kwargs, "closure"); /* borrowed */
        return c && c != Py_None;
    }
    return 0;
}

PyDoc_STRVAR(step_features_doc,
"step_features(optimizer, step, index)\n--\n\n"
"Run the pre-step features and write the step record, as the pre hook does for a step without a\n"
"closure; called by the wrapped closure once the gradients the optimizer will use exist.");

static PyObject *core_step_features(PyObject *m, PyObject *args) {
    PyObject *opt;
    Py_ssize_t count, index;
    if (!PyArg_ParseTuple(args, "Onn", &opt, &count, &index))
        return NULL;
    if (features_and_record(get_state(m), opt, count, index) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pre_step_doc,
"pre_step(optimizer, args, kwargs)\n--\n\n"
"The global optimizer step pre-hook. Counts the step, runs the pre-step features and writes the\n"
"step's audit record. A step called inside another optimizer's step is counted once, as part of\n"
"the outer one.");

static PyObject *core_pre_step(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1)
        return PyErr_Format(PyExc_TypeError, "pre_step(optimizer, args, kwargs)");
    core_state *st = get_state(m);
    PyObject *opt = args[0];
    if (st->pending) {
        PyErr_SetObject(st->policy_error, st->pending);
        return NULL;
    }
    /* depth > 0 with no outer step left on this thread's stack means the last step raised
     * before its post hook: this is an outer step again. (A subclass's step calling
     * super().step() is nested in its own, of the same optimizer.) */
    if (step_tls.depth > 0 && inside_another_step()) {
        st->nested++;
        step_tls.depth++;
        Py_RETURN_NONE;
    }
    step_tls.depth = 1;
    if (st->gate) {
        PyObject *g = Py_NewRef(st->gate); /* held: the gate may replace the features */
        PyObject *ok = PyObject_CallNoArgs(g);
        Py_DECREF(g);
        if (!ok)
            goto error;
        Py_DECREF(ok);
    }

    PyObject *entry = optimizer_entry(st, opt);
    if (!entry)
        goto error;
    Py_ssize_t index = PyLong_AsSsize_t(PyList_GET_ITEM(entry, 1));
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(entry, 2)) + 1;
    PyObject *c = PyLong_FromSsize_t(count);
    if (!c)
        goto error;
    PyList_SetItem(entry, 2, c);
    st->steps++;
    st->current = count;
    step_tls.current = count;

    if (!st->started) {
        st->started = 1;
        json_t *f = json_object();
        if (st->policy) {
            json_object_set_new(f, "policy", json_string(st->policy->origin));
            json_object_set_new(f, "digest", json_string(st->policy->digest));
            json_object_set_new(f, "enforce", json_boolean(st->policy->enforce));
        }
        json_object_set_new(f, "versions", versions_json());
        if (st->start_extra) {
            json_t *extra = to_json(st->start_extra, 0);
            if (json_is_object(extra))
                json_object_update_missing(f, extra); /* never over the policy's own fields */
            json_decref(extra);
            Py_CLEAR(st->start_extra);
        }
        if (require_audited(st, "start", emit("start", -1, f)) < 0)
            goto error;
    }
    if (count == 1 && sh_audit_active())
        emit("optimizer", count, optimizer_record(opt, index));

    if (st->closure_wrap && nargs >= 3 && step_closure(args[1], args[2]))
        return PyObject_CallFunction(st->closure_wrap, "OnnOO", opt, count, index, args[1], args[2]);
    if (features_and_record(st, opt, count, index) < 0)
        goto error;
    Py_RETURN_NONE;
error:
    step_tls.depth = 0;
    return NULL;
}

PyDoc_STRVAR(post_step_doc, "post_step(optimizer, args, kwargs)\n--\n\nThe global optimizer step post-hook.");

static PyObject *core_post_step(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1)
        return PyErr_Format(PyExc_TypeError, "post_step(optimizer, args, kwargs)");
    core_state *st = get_state(m);
    if (step_tls.depth > 1) {
        step_tls.depth--;
        Py_RETURN_NONE;
    }
    long long step = step_tls.depth == 1 ? step_tls.current : st->current;
    step_tls.depth = 0;
    if (st->post_features && PyList_GET_SIZE(st->post_features) > 0) {
        PyObject *record = PyDict_New();
        if (!record)
            return NULL;
        int r = run_features(st->post_features, args[0], step, record);
        if (r == 0 && PyDict_GET_SIZE(record) > 0 && sh_audit_active())
            emit("post_step", step, to_json(record, 0));
        Py_DECREF(record);
        if (r < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- records and introspection ---- */

PyDoc_STRVAR(audit_doc,
"audit(event, fields=None, step=None)\n--\n\n"
"Append a record to the audit log. step defaults to the current step (None: no step field\n"
"before the first step). Returns True when it was written.");

static PyObject *core_audit(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"event", "fields", "step", NULL};
    const char *event;
    PyObject *fields = Py_None, *step = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|OO", kwlist, &event, &fields, &step))
        return NULL;
    core_state *st = get_state(m);
    long long s = step_tls.depth > 0 ? step_tls.current : st->steps ? st->current : -1;
    if (step != Py_None) {
        s = PyLong_AsLongLong(step);
        if (s == -1 && PyErr_Occurred())
            return NULL;
    }
    json_t *f = fields == Py_None ? NULL : to_json(fields, 0);
    if (f && !json_is_object(f)) {
        json_decref(f);
        return PyErr_Format(PyExc_TypeError, "fields must be a dict");
    }
    return PyBool_FromLong(sh_audit_emit(event, s, f) == 0);
}

PyDoc_STRVAR(finish_doc, "finish(fields=None)\n--\n\nWrite the 'end' record (once, only after a first step).");

static PyObject *core_finish(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    core_state *st = get_state(m);
    if (!st->started || st->started == 2)
        Py_RETURN_NONE;
    st->started = 2;
    json_t *f = (nargs > 0 && args[0] != Py_None) ? to_json(args[0], 0) : json_object();
    if (!json_is_object(f)) {
        json_decref(f);
        f = json_object();
    }
    json_object_set_new(f, "steps", json_integer(st->steps));
    json_object_set_new(f, "nested_steps", json_integer(st->nested));
    json_object_set_new(f, "optimizers", json_integer(PyDict_GET_SIZE(st->optimizers)));
    emit("end", -1, f);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stats_doc, "stats()\n--\n\nCounters of this process's runtime, as a dict.");

static PyObject *core_stats(PyObject *m, PyObject *unused) {
    (void)unused;
    core_state *st = get_state(m);
    return Py_BuildValue("{s:L,s:L,s:L,s:n,s:O,s:z,s:O}", "steps", st->steps, "nested_steps", st->nested,
                         "current", st->current, "optimizers", PyDict_GET_SIZE(st->optimizers), "started",
                         st->started ? Py_True : Py_False, "audit", sh_audit_path(), "in_step",
                         step_tls.depth > 0 ? Py_True : Py_False);
}

PyDoc_STRVAR(native_stack_doc,
"native_stack(skip=0, max=64)\n--\n\n"
"The calling thread's native stack (libunwind), innermost first, or None when libunwind is missing.");

static PyObject *core_native_stack(PyObject *m, PyObject *args) {
    (void)m;
    int skip = 0, max = 64;
    if (!PyArg_ParseTuple(args, "|ii", &skip, &max))
        return NULL;
    json_t *frames = sh_stack_native(skip + 1, max);
    if (!frames)
        Py_RETURN_NONE;
    PyObject *r = json_to_py(frames);
    json_decref(frames);
    return r;
}

PyDoc_STRVAR(system_policy_path_doc, "system_policy_path()\n--\n\nThe compiled-in path of the system policy.");

static PyObject *core_system_policy_path(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    return PyUnicode_FromString(sh_policy_system_path());
}

PyDoc_STRVAR(armed_doc,
"armed()\n--\n\n"
"True when a policy is in force or a pending error will stop the first step: activation ran.");

static PyObject *core_armed(PyObject *m, PyObject *unused) {
    (void)unused;
    core_state *st = get_state(m);
    return PyBool_FromLong(st->policy != NULL || st->pending != NULL);
}

PyDoc_STRVAR(secure_getenv_doc,
"secure_getenv(name)\n--\n\n"
"The environment variable NAME, or None; always None in a setuid/setgid (AT_SECURE) process.");

static PyObject *core_secure_getenv(PyObject *m, PyObject *name) {
    (void)m;
    const char *n = PyUnicode_AsUTF8(name);
    if (!n)
        return NULL;
    const char *v = secure_getenv(n);
    if (!v)
        Py_RETURN_NONE;
    return PyUnicode_DecodeFSDefault(v);
}

static PyMethodDef core_methods[] = {
    {"armed", core_armed, METH_NOARGS, armed_doc},
    {"secure_getenv", core_secure_getenv, METH_O, secure_getenv_doc},
    {"configure", (PyCFunction)(void (*)(void))core_configure, METH_VARARGS | METH_KEYWORDS, configure_doc},
    {"set_pending_error", core_set_pending_error, METH_O, set_pending_doc},
    {"set_features", core_set_features, METH_VARARGS, set_features_doc},
    {"start_fields", core_start_fields, METH_O, start_fields_doc},
    {"pre_step", (PyCFunction)(void (*)(void))core_pre_step, METH_FASTCALL, pre_step_doc},
    {"post_step", (PyCFunction)(void (*)(void))core_post_step, METH_FASTCALL, post_step_doc},
    {"step_features", core_step_features, METH_VARARGS, step_features_doc},
    {"audit", (PyCFunction)(void (*)(void))core_audit, METH_VARARGS | METH_KEYWORDS, audit_doc},
    {"finish", (PyCFunction)(void (*)(void))core_finish, METH_FASTCALL, finish_doc},
    {"stats", core_stats, METH_NOARGS, stats_doc},
    {"native_stack", core_native_stack, METH_VARARGS, native_stack_doc},
    {"system_policy_path", core_system_policy_path, METH_NOARGS, system_policy_path_doc},
    {NULL, NULL, 0, NULL},
};

static int core_exec(PyObject *m) {
    core_state *st = get_state(m);
    the_state = st;
    st->error = PyErr_NewExceptionWithDoc("safehook.SafehookError", "An error raised by safehook.", NULL, NULL);
    if (!st->error || PyModule_AddObjectRef(m, "SafehookError", st->error) < 0)
        return -1;
    st->policy_error = PyErr_NewExceptionWithDoc(
        "safehook.PolicyError", "The policy is invalid or cannot be applied; training stops before its first step.",
        st->error, NULL);
    if (!st->policy_error || PyModule_AddObjectRef(m, "PolicyError", st->policy_error) < 0)
        return -1;
    st->optimizers = PyDict_New();
    if (!st->optimizers)
        return -1;
    if (PyModule_AddStringConstant(m, "__version__", SH_VERSION) < 0)
        return -1;
    /* Feature bindings live in hooks/py_<feature>.c, each with sh_py_<feature>_init(m). */
    if (sh_py_policy_init(m) < 0)
        return -1;
    if (sh_py_freeze_init(m) < 0)
        return -1;
    if (sh_py_safegrad_init(m) < 0)
        return -1;
    return 0;
}

static int core_traverse(PyObject *m, visitproc visit, void *arg) {
    core_state *st = get_state(m);
    Py_VISIT(st->error);
    Py_VISIT(st->policy_error);
    Py_VISIT(st->optimizers);
    Py_VISIT(st->pre_features);
    Py_VISIT(st->post_features);
    Py_VISIT(st->closure_wrap);
    Py_VISIT(st->gate);
    Py_VISIT(st->pending);
    Py_VISIT(st->start_extra);
    return 0;
}

static int core_clear(PyObject *m) {
    core_state *st = get_state(m);
    Py_CLEAR(st->error);
    Py_CLEAR(st->policy_error);
    Py_CLEAR(st->optimizers);
    Py_CLEAR(st->pre_features);
    Py_CLEAR(st->post_features);
    Py_CLEAR(st->closure_wrap);
    Py_CLEAR(st->gate);
    Py_CLEAR(st->pending);
    Py_CLEAR(st->start_extra);
    return 0;
}

static void core_free(void *m) {
    core_clear((PyObject *)m);
    if (the_state == get_state((PyObject *)m))
        the_state = NULL;
    sh_policy_free(get_state((PyObject *)m)->policy);
}

/* One runtime per process (the step hooks keep C thread-locals, the audit log and the kernel's
 * pool are process-wide): no subinterpreters. The GIL guards the module state. */
static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

PyDoc_STRVAR(core_doc, "safehook's C core: the runtime state, the optimizer step hooks and the audit log.");

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "safehook._core",
    .m_doc = core_doc,
    .m_size = sizeof(core_state),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }

/* For libsafehook.so's fail-closed check, found with dlsym() on this very file (opened by path
 * with RTLD_NOLOAD), so that a module object someone put in sys.modules cannot answer for it:
 * safehook_core_def() is this extension's module definition (PyModule_GetDef of the genuine
 * module object returns it), safehook_core_status() its activation as the C state sees it. */
__attribute__((visibility("default"))) const void *safehook_core_def(void) { return &core_module; }

/* Bits: 1 a policy is in force or a pending error will stop the first step (activated), 2 the
 * records go to safehookd, 4 the policy is enforced. */
__attribute__((visibility("default"))) int safehook_core_status(void) {
    core_state *st = the_state;
    if (!st)
        return 0;
    return (st->policy || st->pending ? 1 : 0) | (sh_audit_daemon() ? 2 : 0) |
           (st->policy && st->policy->enforce ? 4 : 0);
}
