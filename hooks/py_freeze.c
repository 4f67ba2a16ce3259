/* safehook._core bindings of the freeze feature: the hot parts of its per-step checks.
 *
 * freeze_checksums(tensors) hashes the raw bytes of contiguous CPU tensors in C, with the GIL
 * released; freeze_with_grad(params) finds the frozen parameters that carry a gradient. The
 * policy logic (which blocks, what to record, restoring) stays in python/safehook/freeze.py. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#include "checksum.h"

/* 1 when T is a strided, contiguous CPU tensor whose bytes can be read through data_ptr(),
 * 0 when not, -1 with an exception set. */
static int readable_cpu(PyObject *t) {
    PyObject *cpu = PyObject_GetAttrString(t, "is_cpu");
    if (!cpu)
        return -1;
    int ok = PyObject_IsTrue(cpu);
    Py_DECREF(cpu);
    if (ok <= 0)
        return ok;
    PyObject *sparse = PyObject_GetAttrString(t, "is_sparse");
    if (!sparse)
        return -1;
    ok = !PyObject_IsTrue(sparse);
    Py_DECREF(sparse);
    if (!ok)
        return 0;
    PyObject *c = PyObject_CallMethod(t, "is_contiguous", NULL);
    if (!c)
        return -1;
    ok = PyObject_IsTrue(c);
    Py_DECREF(c);
    return ok;
}

static int size_attr(PyObject *t, const char *name, int call, uintptr_t *out) {
    PyObject *v = call ? PyObject_CallMethod(t, name, NULL) : PyObject_GetAttrString(t, name);
    if (!v)
        return -1;
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uintptr_t)u;
    return 0;
}

PyDoc_STRVAR(freeze_checksums_doc,
"freeze_checksums(tensors)\n--\n\n"
"A list with, for each tensor, the 64-bit checksum of its raw bytes (an int) when it is a\n"
"contiguous CPU tensor, else None (the caller hashes those with torch ops). The tensors must\n"
"stay alive and unresized during the call; they are read with the GIL released.");

static PyObject *freeze_checksums(PyObject *m, PyObject *arg) {
    (void)m;
    PyObject *seq = PySequence_Fast(arg, "freeze_checksums expects a sequence of tensors");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uintptr_t *ptr = calloc((size_t)n + 1, sizeof *ptr);
    uintptr_t *len = calloc((size_t)n + 1, sizeof *len);
    uint64_t *sum = calloc((size_t)n + 1, sizeof *sum);
    signed char *ok = calloc((size_t)n + 1, 1);
    PyObject *out = NULL;
    if (!ptr || !len || !sum || !ok) {
        PyErr_NoMemory();
        goto free_buffers;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        int r = readable_cpu(t);
        if (r < 0)
            goto free_buffers;
        if (r == 0)
            continue;
        if (size_attr(t, "data_ptr", 1, &ptr[i]) < 0 || size_attr(t, "nbytes", 0, &len[i]) < 0)
            goto free_buffers;
        ok[i] = ptr[i] != 0 || len[i] == 0;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (ok[i])
            sum[i] = sh_checksum((const void *)ptr[i], (size_t)len[i]);
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (!out)
        goto free_buffers;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = ok[i] ? PyLong_FromUnsignedLongLong(sum[i]) : Py_NewRef(Py_None);
        if (!v) {
            Py_CLEAR(out);
            goto free_buffers;
        }
        PyList_SET_ITEM(out, i, v);
    }
free_buffers:
    free(ptr);
    free(len);
    free(sum);
    free(ok);
    Py_DECREF(seq);
    return out;
}

PyDoc_STRVAR(freeze_with_grad_doc,
"freeze_with_grad(params)\n--\n\n"
"Indices of the parameters in PARAMS whose .grad is not None (the per-step enforcement scan).");

static PyObject *freeze_with_grad(PyObject *m, PyObject *arg) {
    (void)m;
    PyObject *seq = PySequence_Fast(arg, "freeze_with_grad expects a sequence of tensors");
    if (!seq)
        return NULL;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *g = PyObject_GetAttrString(PySequence_Fast_GET_ITEM(seq, i), "grad");
        if (!g) {
            Py_CLEAR(out);
            break;
        }
        if (g != Py_None) {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (!idx || PyList_Append(out, idx) < 0)
                Py_CLEAR(out);
            Py_XDECREF(idx);
        }
        Py_DECREF(g);
    }
    Py_DECREF(seq);
    return out;
}

static PyMethodDef freeze_methods[] = {
    {"freeze_checksums", freeze_checksums, METH_O, freeze_checksums_doc},
    {"freeze_with_grad", freeze_with_grad, METH_O, freeze_with_grad_doc},
    {NULL, NULL, 0, NULL},
};

/* Add the freeze functions to the module M (called from core_exec). 0, or -1 with an exception. */
int sh_py_freeze_init(PyObject *m) { return PyModule_AddFunctions(m, freeze_methods); }
