/* safehook._core bindings of the SafeGrad kernel (src/safegrad.h), used by safehook.project()
 * and the safegrad feature. Each call reads data_ptr, numel, dtype and contiguity of every
 * tensor; tensors the kernel cannot take (another device, non-contiguous, a subclass such as
 * DTensor, another dtype) are reported back by index for the caller's torch fallback. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "safegrad.h"

/* (torch.Tensor, torch.nn.Parameter, float32, bfloat16, float16), kept on the module as
 * _sg_types so that no PyObject lives in a C global. Returns a new reference. */
static PyObject *torch_types(PyObject *m) {
    PyObject *t = PyObject_GetAttrString(m, "_sg_types");
    if (t)
        return t;
    PyErr_Clear();
    PyObject *torch = PyImport_ImportModule("torch");
    if (!torch)
        return NULL;
    PyObject *nn = PyImport_ImportModule("torch.nn");
    PyObject *param = nn ? PyObject_GetAttrString(nn, "Parameter") : NULL;
    t = param ? Py_BuildValue("(NNNNN)", PyObject_GetAttrString(torch, "Tensor"), param,
                              PyObject_GetAttrString(torch, "float32"), PyObject_GetAttrString(torch, "bfloat16"),
                              PyObject_GetAttrString(torch, "float16"))
              : NULL;
    Py_DECREF(torch);
    Py_XDECREF(nn);
    if (!t)
        return NULL;
    for (int i = 0; i < 5; i++)
        if (PyTuple_GET_ITEM(t, i) == NULL) {
            Py_DECREF(t);
            return NULL;
        }
    if (PyObject_SetAttrString(m, "_sg_types", t) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

static PyObject *call0(PyObject *o, const char *name) {
    PyObject *n = PyUnicode_FromString(name);
    if (!n)
        return NULL;
    PyObject *r = PyObject_CallMethodNoArgs(o, n);
    Py_DECREF(n);
    return r;
}

/* Describe tensor O for the kernel. Returns 1 when it can take it (*ptr, *n, *dt set), 0 when
 * not (the fallback's), -1 with an exception set on a Python error. */
static int describe(PyObject *types, PyObject *o, void **ptr, size_t *n, sh_dtype *dt) {
    PyTypeObject *tp = Py_TYPE(o);
    if (tp != (PyTypeObject *)PyTuple_GET_ITEM(types, 0) && tp != (PyTypeObject *)PyTuple_GET_ITEM(types, 1))
        return 0;
    PyObject *v = PyObject_GetAttrString(o, "is_cpu");
    if (!v)
        return -1;
    int cpu = v == Py_True;
    Py_DECREF(v);
    if (!cpu)
        return 0;
    v = PyObject_GetAttrString(o, "dtype");
    if (!v)
        return -1;
    int ok = 1;
    if (v == PyTuple_GET_ITEM(types, 2))
        *dt = SH_DT_F32;
    else if (v == PyTuple_GET_ITEM(types, 3))
        *dt = SH_DT_BF16;
    else if (v == PyTuple_GET_ITEM(types, 4))
        *dt = SH_DT_F16;
    else
        ok = 0;
    Py_DECREF(v);
    if (!ok)
        return 0;
    v = call0(o, "is_contiguous");
    if (!v) { /* sparse layouts raise here: theirs is the fallback */
        PyErr_Clear();
        return 0;
    }
    ok = v == Py_True;
    Py_DECREF(v);
    if (!ok)
        return 0;
    v = call0(o, "numel");
    if (!v)
        return -1;
    long long numel = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (numel < 0)
        return PyErr_Occurred() ? -1 : 0;
    v = call0(o, "data_ptr");
    if (!v)
        return -1;
    *ptr = PyLong_AsVoidPtr(v);
    Py_DECREF(v);
    if (PyErr_Occurred())
        return -1;
    *n = (size_t)numel;
    return 1;
}

/* The tensors of the call: entries the kernel can take in T (with their group), the others'
 * indexes in SKIPPED. Returns the number in T, or -1 with an exception set. */
typedef struct {
    PyObject *task, *safety; /* sequences (PySequence_Fast) */
    sh_sg_tensor *t;
    Py_ssize_t nt;
    size_t ngroups;
    PyObject *skipped;
} plan;

static void plan_clear(plan *p) {
    Py_CLEAR(p->task);
    Py_CLEAR(p->safety);
    Py_CLEAR(p->skipped);
    free(p->t);
    p->t = NULL;
}

static int plan_make(PyObject *m, plan *p, PyObject *task, PyObject *safety, PyObject *groups, Py_ssize_t ngroups) {
    memset(p, 0, sizeof *p);
    PyObject *types = torch_types(m);
    if (!types)
        return -1;
    p->task = PySequence_Fast(task, "task gradients must be a sequence of tensors");
    p->safety = p->task ? PySequence_Fast(safety, "safety gradients must be a sequence of tensors") : NULL;
    PyObject *gseq = NULL;
    if (!p->safety)
        goto error;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(p->task);
    if (PySequence_Fast_GET_SIZE(p->safety) != n) {
        PyErr_Format(PyExc_ValueError, "%zd task gradients but %zd safety gradients", n,
                     PySequence_Fast_GET_SIZE(p->safety));
        goto error;
    }
    if (groups != Py_None) {
        gseq = PySequence_Fast(groups, "groups must be a sequence of ints");
        if (!gseq)
            goto error;
        if (PySequence_Fast_GET_SIZE(gseq) != n) {
            PyErr_Format(PyExc_ValueError, "%zd groups for %zd tensors", PySequence_Fast_GET_SIZE(gseq), n);
            goto error;
        }
    }
    if (ngroups < 1) {
        PyErr_SetString(PyExc_ValueError, "ngroups must be >= 1");
        goto error;
    }
    p->ngroups = (size_t)ngroups;
    p->t = calloc(n ? (size_t)n : 1, sizeof *p->t);
    p->skipped = PyList_New(0);
    if (!p->t || !p->skipped) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long grp = 0;
        if (gseq) {
            grp = PyLong_AsLong(PySequence_Fast_GET_ITEM(gseq, i));
            if (grp == -1 && PyErr_Occurred())
                goto error;
            if (grp < 0 || grp >= ngroups) {
                PyErr_Format(PyExc_ValueError, "group %ld of tensor %zd is not in 0..%zd", grp, i, ngroups - 1);
                goto error;
            }
        }
        sh_sg_tensor *e = &p->t[p->nt];
        void *gp, *sp;
        size_t gn, sn;
        int a = describe(types, PySequence_Fast_GET_ITEM(p->task, i), &gp, &gn, &e->gt);
        int b = a < 0 ? -1 : describe(types, PySequence_Fast_GET_ITEM(p->safety, i), &sp, &sn, &e->st);
        if (a < 0 || b < 0)
            goto error;
        if (a && b) {
            if (gn != sn) {
                PyErr_Format(PyExc_ValueError, "tensor %zd: task gradient has %zu elements, safety gradient %zu", i, gn, sn);
                goto error;
            }
            e->g = gp;
            e->s = sp;
            e->n = gn;
            e->group = (size_t)grp;
            p->nt++;
        } else {
            PyObject *ix = PyLong_FromSsize_t(i);
            if (!ix || PyList_Append(p->skipped, ix) < 0) {
                Py_XDECREF(ix);
                goto error;
            }
            Py_DECREF(ix);
        }
    }
    Py_XDECREF(gseq);
    Py_DECREF(types);
    return 0;
error:
    Py_XDECREF(gseq);
    Py_DECREF(types);
    plan_clear(p);
    return -1;
}

static PyObject *doubles(const double *v, size_t n) {
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; l && i < n; i++) {
        PyObject *f = PyFloat_FromDouble(v[i]);
        if (!f) {
            Py_CLEAR(l);
            break;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, f);
    }
    return l;
}

static int parse_coefs(PyObject *o, size_t ngroups, double *out) {
    PyObject *seq = PySequence_Fast(o, "coefs must be a sequence of floats");
    if (!seq)
        return -1;
    if ((size_t)PySequence_Fast_GET_SIZE(seq) != ngroups) {
        PyErr_Format(PyExc_ValueError, "%zd coefs for %zu groups", PySequence_Fast_GET_SIZE(seq), ngroups);
        Py_DECREF(seq);
        return -1;
    }
    for (size_t k = 0; k < ngroups; k++) {
        out[k] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, (Py_ssize_t)k));
        if (out[k] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *kernel_error(int r) {
    if (r == -ENOMEM)
        return PyErr_NoMemory();
    errno = -r;
    return PyErr_SetFromErrno(PyExc_OSError);
}

PyDoc_STRVAR(sg_dots_doc,
"safegrad_dots(task, safety, groups=None, ngroups=1)\n--\n\n"
"Pass 1 over the tensors the kernel takes (contiguous CPU float32/bfloat16/float16): returns\n"
"(dots, skipped), dots = [g.s, s.s, g.g] per group (3*ngroups floats), skipped = the indexes\n"
"left to the caller.");

static PyObject *sg_dots(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"task", "safety", "groups", "ngroups", NULL};
    PyObject *task, *safety, *groups = Py_None;
    Py_ssize_t ngroups = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|On", kwlist, &task, &safety, &groups, &ngroups))
        return NULL;
    plan p;
    if (plan_make(m, &p, task, safety, groups, ngroups) < 0)
        return NULL;
    PyObject *res = NULL;
    double *dots = malloc(3 * p.ngroups * sizeof *dots);
    if (!dots) {
        PyErr_NoMemory();
        goto done;
    }
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = sh_sg_dots(p.t, (size_t)p.nt, p.ngroups, dots);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        kernel_error(r);
        goto done;
    }
    PyObject *d = doubles(dots, 3 * p.ngroups);
    if (d)
        res = Py_BuildValue("(NO)", d, p.skipped);
done:
    free(dots);
    plan_clear(&p);
    return res;
}

PyDoc_STRVAR(sg_update_doc,
"safegrad_update(task, safety, coefs, groups=None)\n--\n\n"
"Pass 2: task[i] -= coefs[groups[i]] * safety[i], in place, for the tensors the kernel takes.\n"
"Returns the indexes left to the caller.");

static PyObject *sg_update(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"task", "safety", "coefs", "groups", NULL};
    PyObject *task, *safety, *coefs, *groups = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|O", kwlist, &task, &safety, &coefs, &groups))
        return NULL;
    Py_ssize_t ng = PyObject_Length(coefs);
    if (ng < 0)
        return NULL;
    plan p;
    if (plan_make(m, &p, task, safety, groups, ng) < 0)
        return NULL;
    PyObject *res = NULL;
    double *c = malloc(p.ngroups * sizeof *c);
    if (!c) {
        PyErr_NoMemory();
        goto done;
    }
    if (parse_coefs(coefs, p.ngroups, c) < 0)
        goto done;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = sh_sg_update(p.t, (size_t)p.nt, p.ngroups, c);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        kernel_error(r);
        goto done;
    }
    res = Py_NewRef(p.skipped);
done:
    free(c);
    plan_clear(&p);
    return res;
}

PyDoc_STRVAR(sg_project_doc,
"safegrad_project(task, safety, groups=None, ngroups=1, threshold=0.0)\n--\n\n"
"Both passes in one call when the kernel takes every tensor: returns (dots, coefs, cosines,\n"
"nprojected). Returns None, having changed nothing, when some tensor needs the fallback.");

static PyObject *sg_project(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"task", "safety", "groups", "ngroups", "threshold", NULL};
    PyObject *task, *safety, *groups = Py_None;
    Py_ssize_t ngroups = 1;
    double threshold = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Ond", kwlist, &task, &safety, &groups, &ngroups, &threshold))
        return NULL;
    plan p;
    if (plan_make(m, &p, task, safety, groups, ngroups) < 0)
        return NULL;
    if (PyList_GET_SIZE(p.skipped) > 0) {
        plan_clear(&p);
        Py_RETURN_NONE;
    }
    PyObject *res = NULL;
    double *buf = malloc(5 * p.ngroups * sizeof *buf);
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    double *dots = buf, *coef = buf + 3 * p.ngroups, *cosine = buf + 4 * p.ngroups;
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = sh_sg_project(p.t, (size_t)p.nt, p.ngroups, threshold, dots, coef, cosine);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        kernel_error((int)r);
        goto done;
    }
    res = Py_BuildValue("(NNNl)", doubles(dots, 3 * p.ngroups), doubles(coef, p.ngroups),
                        doubles(cosine, p.ngroups), r);
done:
    free(buf);
    plan_clear(&p);
    return res;
}

PyDoc_STRVAR(sg_threads_doc,
"safegrad_threads(n=None)\n--\n\n"
"The number of threads the kernel may use; with n (1..64, 0 = default), set it first.");

static PyObject *sg_threads(PyObject *m, PyObject *args) {
    (void)m;
    PyObject *n = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &n))
        return NULL;
    if (n != Py_None) {
        long v = PyLong_AsLong(n);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 0 || v > 64 || sh_pool_set_size((int)v) < 0)
            return PyErr_Format(PyExc_ValueError, "threads must be in 0..64, got %ld", v);
    }
    return PyLong_FromLong(sh_pool_size());
}

PyDoc_STRVAR(sg_path_doc,
"safegrad_path(name=None)\n--\n\n"
"The fp16/bf16 conversion path of the kernel ('scalar', 'avx2', 'avx2+f16c'; chosen at load time,\n"
"the same bits on every path); with name ('best' for the load-time choice), use it first\n"
"(tests and benchmarks). ValueError when this CPU lacks it.");

static PyObject *sg_path(PyObject *m, PyObject *args) {
    (void)m;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z", &name))
        return NULL;
    if (name) {
        sh_cvt_path p = SH_CVT_BEST;
        for (int k = SH_CVT_SCALAR; k <= SH_CVT_AVX2_F16C; k++)
            if (!strcmp(name, sh_cvt_path_name((sh_cvt_path)k)))
                p = (sh_cvt_path)k;
        if ((p == SH_CVT_BEST && strcmp(name, "best")) || sh_cvt_set_path(p) < 0)
            return PyErr_Format(PyExc_ValueError, "conversion path '%s' is not available here", name);
    }
    return PyUnicode_FromString(sh_cvt_path_name(sh_cvt.path));
}

static PyMethodDef sg_methods[] = {
    {"safegrad_dots", (PyCFunction)(void (*)(void))sg_dots, METH_VARARGS | METH_KEYWORDS, sg_dots_doc},
    {"safegrad_update", (PyCFunction)(void (*)(void))sg_update, METH_VARARGS | METH_KEYWORDS, sg_update_doc},
    {"safegrad_project", (PyCFunction)(void (*)(void))sg_project, METH_VARARGS | METH_KEYWORDS, sg_project_doc},
    {"safegrad_threads", sg_threads, METH_VARARGS, sg_threads_doc},
    {"safegrad_path", sg_path, METH_VARARGS, sg_path_doc},
    {NULL, NULL, 0, NULL},
};

/* Add the SafeGrad functions to module M (safehook._core). Returns 0, or -1 with an exception. */
int sh_py_safegrad_init(PyObject *m) { return PyModule_AddFunctions(m, sg_methods); }
