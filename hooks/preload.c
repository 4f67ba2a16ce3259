/* libsafehook.so: the LD_PRELOAD bootstrap.
 *
 * Loaded into every process started under LD_PRELOAD (bash, gcc, pyenv's shell shims, Python).
 * It references no Python symbol at link time and exports nothing: in a process without
 * CPython the constructor does one dlsym() and returns. In a CPython process it registers a
 * PEP 578 audit hook before Py_Initialize; the hook waits for the "import" event of torch (it
 * fires before torch is loaded) and then imports the safehook package that sits next to this
 * library, which puts the optimizer hooks in place right after torch.optim.optimizer executes.
 * A process that never imports torch pays one string compare per audit event. */
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "sh_config.h"

typedef struct _object PyObject;
typedef ssize_t Py_ssize_t;
typedef int (*audit_hook_fn)(const char *event, PyObject *args, void *data);

#define PY_FILE_INPUT 257 /* Py_file_input */

/* The few CPython functions the bootstrap calls, resolved once with dlsym(RTLD_DEFAULT). */
#define PY_FUNCS(X)                                                                      \
    X(int, PySys_AddAuditHook, (audit_hook_fn, void *))                                  \
    X(PyObject *, PyTuple_GetItem, (PyObject *, Py_ssize_t))                             \
    X(const char *, PyUnicode_AsUTF8, (PyObject *))                                      \
    X(PyObject *, PyRun_StringFlags, (const char *, int, PyObject *, PyObject *, void *)) \
    X(PyObject *, PyDict_New, (void))                                                    \
    X(PyObject *, PyEval_GetBuiltins, (void))                                            \
    X(int, PyDict_SetItemString, (PyObject *, const char *, PyObject *))                 \
    X(PyObject *, PyUnicode_FromString, (const char *))                                  \
    X(PyObject *, PyObject_Str, (PyObject *))                                            \
    X(PyObject *, PyObject_GetAttrString, (PyObject *, const char *))                    \
    X(void, PyErr_Clear, (void))                                                         \
    X(void, Py_DecRef, (PyObject *))

/* Resolved too, but one of each pair may be missing: PyErr_GetRaisedException (3.12+) where it
 * exists, else PyErr_Fetch (deprecated since 3.12). */
#define PY_FUNCS_OPTIONAL(X)                                                             \
    X(PyObject *, PyErr_GetRaisedException, (void))                                      \
    X(void, PyErr_Fetch, (PyObject **, PyObject **, PyObject **))

#define DECLARE(ret, name, args) ret(*name) args;
static struct {
    PY_FUNCS(DECLARE)
    PY_FUNCS_OPTIONAL(DECLARE)
} py;
#undef DECLARE

enum { ARMED, BOOTING, DONE };
static int state = ARMED;
static char lib_path[4096];

/* Python run when torch is first imported: load the package beside this library (or the one
 * on sys.path when this library was installed elsewhere) and hand over to it. */
static const char boot_src[] =
    "def _boot(lib):\n"
    "    import sys, os\n"
    "    if 'safehook' not in sys.modules:\n"
    "        d = os.path.dirname(lib)\n"
    "        init = os.path.join(d, '__init__.py')\n"
    "        if os.path.exists(init):\n"
    "            import importlib.util\n"
    "            spec = importlib.util.spec_from_file_location('safehook', init,\n"
    "                                                          submodule_search_locations=[d])\n"
    "            m = importlib.util.module_from_spec(spec)\n"
    "            sys.modules['safehook'] = m\n"
    "            try:\n"
    "                spec.loader.exec_module(m)\n"
    "            except BaseException:\n"
    "                del sys.modules['safehook']\n"
    "                raise\n"
    "    import safehook.runtime.boot\n"
    "    safehook.runtime.boot.from_preload(lib)\n"
    "_boot(LIB)\n";

static void report_failure(void) {
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (py.PyErr_GetRaisedException) {
        value = py.PyErr_GetRaisedException();
        type = value ? py.PyObject_GetAttrString(value, "__class__") : NULL;
    } else {
        py.PyErr_Fetch(&type, &value, &tb);
    }
    const char *tname = "error", *msg = "";
    PyObject *name = NULL, *str = NULL;
    if (type && (name = py.PyObject_GetAttrString(type, "__name__")))
        tname = py.PyUnicode_AsUTF8(name);
    if (value && (str = py.PyObject_Str(value)))
        msg = py.PyUnicode_AsUTF8(str);
    py.PyErr_Clear();
    char line[2048];
    int n = snprintf(line, sizeof line,
                     "safehook: protection is NOT active in this process (pid %d): %s: %s\n",
                     (int)getpid(), tname ? tname : "error", msg ? msg : "");
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w;
    }
    PyObject *objs[] = {name, str, type, value, tb};
    for (size_t i = 0; i < sizeof objs / sizeof *objs; i++)
        if (objs[i])
            py.Py_DecRef(objs[i]);
}

static void boot(void) {
    PyObject *globals = py.PyDict_New();
    if (!globals)
        goto fail;
    PyObject *lib = py.PyUnicode_FromString(lib_path);
    if (!lib || py.PyDict_SetItemString(globals, "LIB", lib) < 0 ||
        py.PyDict_SetItemString(globals, "__builtins__", py.PyEval_GetBuiltins()) < 0) {
        if (lib)
            py.Py_DecRef(lib);
        py.Py_DecRef(globals);
        goto fail;
    }
    py.Py_DecRef(lib);
    PyObject *res = py.PyRun_StringFlags(boot_src, PY_FILE_INPUT, globals, globals, NULL);
    py.Py_DecRef(globals);
    if (!res)
        goto fail;
    py.Py_DecRef(res);
    return;
fail:
    report_failure();
}

static int is_torch(const char *name) {
    return strncmp(name, "torch", 5) == 0 && (name[5] == '\0' || name[5] == '.');
}

static int audit_hook(const char *event, PyObject *args, void *data) {
    (void)data;
    if (state != ARMED || event[0] != 'i' || strcmp(event, "import") != 0)
        return 0;
    PyObject *mod = py.PyTuple_GetItem(args, 0);
    const char *name = mod ? py.PyUnicode_AsUTF8(mod) : NULL;
    if (!name) {
        py.PyErr_Clear();
        return 0;
    }
    if (!is_torch(name))
        return 0;
    state = BOOTING; /* the imports below raise audit events of their own */
    boot();
    state = DONE;
    return 0;
}

/* Is NAME defined by a loaded object? Looked up in the objects' GNU hash tables, because a
 * dlsym() that fails allocates its error message: the first malloc of a small program like
 * /bin/true, two brk() calls and a page fault, which was most of this library's cost there.
 * An object without a GNU hash table makes the answer "maybe" (1): dlsym() decides then. */
struct lookup {
    const char *name;
    uint32_t hash;
    int found;
};

static int lookup_object(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct lookup *q = data;
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
    if (!dyn)
        return 0;
    const uint32_t *gh = NULL;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        /* ld.so relocates these in place for the objects it loads, not for the vDSO */
        ElfW(Addr) a = dyn->d_un.d_ptr < info->dlpi_addr ? info->dlpi_addr + dyn->d_un.d_ptr : dyn->d_un.d_ptr;
        if (dyn->d_tag == DT_GNU_HASH)
            gh = (const uint32_t *)a;
        else if (dyn->d_tag == DT_SYMTAB)
            symtab = (const ElfW(Sym) *)a;
        else if (dyn->d_tag == DT_STRTAB)
            strtab = (const char *)a;
    }
    if (!symtab || !strtab)
        return 0;
    if (!gh) {
        q->found = 1; /* no GNU hash table: let dlsym() look */
        return 1;
    }
    uint32_t nbuckets = gh[0], symoffset = gh[1], bloom_size = gh[2];
    if (nbuckets == 0)
        return 0;
    const uint32_t *buckets = (const uint32_t *)((const ElfW(Addr) *)(gh + 4) + bloom_size);
    const uint32_t *chain = buckets + nbuckets;
    uint32_t sym = buckets[q->hash % nbuckets];
    if (sym < symoffset)
        return 0;
    for (;; sym++) {
        uint32_t h = chain[sym - symoffset];
        if ((h | 1) == (q->hash | 1) && symtab[sym].st_shndx != SHN_UNDEF &&
            strcmp(strtab + symtab[sym].st_name, q->name) == 0) {
            q->found = 1;
            return 1;
        }
        if (h & 1)
            return 0;
    }
}

static int maybe_defined(const char *name) {
    struct lookup q = {name, 5381, 0};
    for (const char *c = name; *c; c++)
        q.hash = q.hash * 33 + (unsigned char)*c;
    dl_iterate_phdr(lookup_object, &q);
    return q.found;
}

__attribute__((constructor)) static void safehook_preload_init(void) {
    if (!maybe_defined("PySys_AddAuditHook"))
        return; /* not a CPython process */
    *(void **)&py.PySys_AddAuditHook = dlsym(RTLD_DEFAULT, "PySys_AddAuditHook");
    if (!py.PySys_AddAuditHook)
        return;

    const char *off = secure_getenv("SAFEHOOK_DISABLE");
    if (off && strcmp(off, "1") == 0 && access(SH_SYSTEM_POLICY, F_OK) != 0)
        return; /* no system policy can refuse it: stay out entirely */

#define RESOLVE(ret, name, args)                           \
    *(void **)&py.name = dlsym(RTLD_DEFAULT, #name);     \
    if (!py.name)                                          \
        return;
    PY_FUNCS(RESOLVE)
#undef RESOLVE
    *(void **)&py.PyErr_GetRaisedException = dlsym(RTLD_DEFAULT, "PyErr_GetRaisedException");
    if (!py.PyErr_GetRaisedException)
        *(void **)&py.PyErr_Fetch = dlsym(RTLD_DEFAULT, "PyErr_Fetch");
    if (!py.PyErr_GetRaisedException && !py.PyErr_Fetch)
        return;

    Dl_info info;
    if (!dladdr((void *)&safehook_preload_init, &info) || !info.dli_fname ||
        !realpath(info.dli_fname, lib_path))
        return;
    py.PySys_AddAuditHook(audit_hook, NULL);
}
