/* libsafehook.so: the LD_PRELOAD bootstrap.
 *
 * Loaded into every process started under LD_PRELOAD or /etc/ld.so.preload (bash, gcc, pyenv's
 * shell shims, Python). It references no Python symbol at link time and exports nothing: in a
 * process without CPython the constructor does one symbol lookup and returns. In a CPython
 * process it registers a PEP 578 audit hook before Py_Initialize; the hook waits for the
 * "import" event of torch (it fires before torch is loaded) and then imports the safehook
 * package that sits next to this library, which puts the optimizer hooks in place right after
 * torch.optim.optimizer executes. A process that never imports torch pays one string compare
 * per audit event.
 *
 * Under an enforced system policy (SH_SYSTEM_POLICY, read with the strict scanner of
 * preload_policy.c; unsure, or missing where it may be hidden, reads as enforced) the
 * bootstrap fails closed, at every step: when a CPython function it needs cannot be found, when
 * its own path cannot be known, when the package cannot be imported or an audit hook vetoes
 * it, when the audit sink is unreachable, and when the runtime that activated is not the one
 * installed beside this library. That last check is by identity, in C: the installed
 * _core*.so is found by path with dlopen(RTLD_NOLOAD), the module object in sys.modules must
 * have that extension's own module definition (PyModule_GetDef), and that extension's C state
 * must say it activated; a module someone put in sys.modules, whatever its __file__, fails it
 * (the package is then loaded afresh from this library's folder and checked once more). A
 * refused process cannot import torch (the hook raises ImportError with one clear line) and
 * sends a "refused" record to safehookd before the import fails. */
#include <dirent.h>
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "preload.h"
#include "sh_config.h"

typedef struct _object PyObject;
typedef ssize_t Py_ssize_t;
typedef int (*audit_hook_fn)(const char *event, PyObject *args, void *data);

#define PY_FILE_INPUT 257 /* Py_file_input */

/* The few CPython functions the bootstrap calls, resolved once with dlsym(RTLD_DEFAULT). */
#define PY_FUNCS(X)                                                                      \
    X(PyObject *, PyTuple_GetItem, (PyObject *, Py_ssize_t))                             \
    X(const char *, PyUnicode_AsUTF8, (PyObject *))                                      \
    X(PyObject *, PyRun_StringFlags, (const char *, int, PyObject *, PyObject *, void *)) \
    X(PyObject *, PyDict_New, (void))                                                    \
    X(PyObject *, PyEval_GetBuiltins, (void))                                            \
    X(int, PyDict_SetItemString, (PyObject *, const char *, PyObject *))                 \
    X(PyObject *, PyDict_GetItemString, (PyObject *, const char *))                      \
    X(PyObject *, PyImport_GetModuleDict, (void))                                        \
    X(void *, PyModule_GetDef, (PyObject *))                                             \
    X(PyObject *, PyUnicode_FromString, (const char *))                                  \
    X(PyObject *, PyObject_Str, (PyObject *))                                            \
    X(PyObject *, PyObject_GetAttrString, (PyObject *, const char *))                    \
    X(void, PyErr_Clear, (void))                                                         \
    X(void, PyErr_SetString, (PyObject *, const char *))                                 \
    X(PyObject *, PyBool_FromLong, (long))                                               \
    X(void, Py_DecRef, (PyObject *))

/* Resolved too, but one of each pair may be missing: PyErr_GetRaisedException (3.12+) where it
 * exists, else PyErr_Fetch (deprecated since 3.12). */
#define PY_FUNCS_OPTIONAL(X)                                                             \
    X(PyObject *, PyErr_GetRaisedException, (void))                                      \
    X(void, PyErr_Fetch, (PyObject **, PyObject **, PyObject **))

#define DECLARE(ret, name, args) ret(*name) args;
static struct {
    int (*PySys_AddAuditHook)(audit_hook_fn, void *);
    PY_FUNCS(DECLARE)
    PY_FUNCS_OPTIONAL(DECLARE)
} py;
#undef DECLARE

enum { ARMED, BOOTING, DONE, REFUSED };
static int state = ARMED;
static int enforced;     /* the system policy is enforced (or may be: unreadable, unsure, hidden) */
static int resolved;     /* every function of PY_FUNCS was found */
static char lib_path[4096];
static char sink[108] = SH_AUDIT_SOCKET; /* the system policy's audit.socket, for the refusal record */
static char refusal[1024]; /* why torch may not be imported (state REFUSED) */
static int announced;      /* the refusal was said on stderr and sent to safehookd */
static PyObject **import_error; /* &PyExc_ImportError */

/* Refuse torch in this process (enforced only): WHY goes into the one line. */
static void refuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void refuse(const char *fmt, ...) {
    char why[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    snprintf(refusal, sizeof refusal,
             "safehook: the enforced system policy %s could not be activated (%s); torch cannot be imported in "
             "this process",
             SH_SYSTEM_POLICY, why);
    state = REFUSED;
}

/* Once, at the first refused import of torch: one line on stderr and a record to safehookd. */
static void announce(void) {
    if (announced)
        return;
    announced = 1;
    char line[1200];
    int n = snprintf(line, sizeof line, "%s (pid %d)\n", refusal, (int)getpid());
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w;
    }
    sh_preload_send_refusal(sink, refusal, SH_SYSTEM_POLICY, lib_path[0] ? lib_path : "(unknown)");
}

/* Python run when torch is first imported: load the package beside this library (or the one
 * on sys.path when this library was installed elsewhere) and hand over to it. FRESH: the
 * runtime in sys.modules did not activate; drop it (keeping _core when KEEP_CORE says it is
 * the genuine extension: one runtime per process) and load the package from this library's
 * folder. */
static const char boot_src[] =
    "def _boot(lib, fresh, keep_core):\n"
    "    import sys, os\n"
    "    d = os.path.dirname(lib)\n"
    "    init = os.path.join(d, '__init__.py')\n"
    "    if fresh:\n"
    "        for k in [k for k in sys.modules if k == 'safehook' or k.startswith('safehook.')]:\n"
    "            if not (keep_core and k == 'safehook._core'):\n"
    "                del sys.modules[k]\n"
    "    if 'safehook' not in sys.modules and os.path.exists(init):\n"
    "        import importlib.util\n"
    "        spec = importlib.util.spec_from_file_location('safehook', init, submodule_search_locations=[d])\n"
    "        m = importlib.util.module_from_spec(spec)\n"
    "        sys.modules['safehook'] = m\n"
    "        try:\n"
    "            spec.loader.exec_module(m)\n"
    "        except BaseException:\n"
    "            del sys.modules['safehook']\n"
    "            raise\n"
    "    import safehook.runtime.boot\n"
    "    safehook.runtime.boot.from_preload(lib)\n"
    "_boot(LIB, FRESH, KEEP_CORE)\n";

/* The Python exception now set, as "Type: message" into OUT; clears it. */
static void take_exception(char *out, size_t cap) {
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
    snprintf(out, cap, "%s: %s", tname ? tname : "error", msg ? msg : "");
    PyObject *objs[] = {name, str, type, value, tb};
    for (size_t i = 0; i < sizeof objs / sizeof *objs; i++)
        if (objs[i])
            py.Py_DecRef(objs[i]);
}

static int set_flag(PyObject *globals, const char *name, long v) {
    PyObject *o = py.PyBool_FromLong(v);
    int r = o ? py.PyDict_SetItemString(globals, name, o) : -1;
    if (o)
        py.Py_DecRef(o);
    return r;
}

/* Run boot_src once. Returns 0, or -1 with the Python error in WHY. */
static int run_boot(int fresh, int keep_core, char *why, size_t cap) {
    PyObject *globals = py.PyDict_New();
    PyObject *lib = globals ? py.PyUnicode_FromString(lib_path) : NULL;
    int bad = !lib || py.PyDict_SetItemString(globals, "LIB", lib) < 0 || set_flag(globals, "FRESH", fresh) < 0 ||
              set_flag(globals, "KEEP_CORE", keep_core) < 0 ||
              py.PyDict_SetItemString(globals, "__builtins__", py.PyEval_GetBuiltins()) < 0;
    if (lib)
        py.Py_DecRef(lib);
    PyObject *res = bad ? NULL : py.PyRun_StringFlags(boot_src, PY_FILE_INPUT, globals, globals, NULL);
    if (globals)
        py.Py_DecRef(globals);
    if (!res) {
        take_exception(why, cap);
        return -1;
    }
    py.Py_DecRef(res);
    return 0;
}

/* The installed safehook._core beside this library, when this process has loaded it: a handle
 * from dlopen(RTLD_NOLOAD) of its path (the loader matches the file itself), or NULL. */
static void *installed_core(void) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", lib_path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        return NULL;
    *slash = '\0';
    DIR *d = opendir(dir);
    if (!d)
        return NULL;
    void *h = NULL;
    struct dirent *e;
    while (!h && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (strncmp(e->d_name, "_core.", 6) || n < 9 || strcmp(e->d_name + n - 3, ".so"))
            continue;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    }
    closedir(d);
    return h;
}

/* 1 when sys.modules['safehook._core'] is the installed extension's module (GENUINE), and in
 * *ACTIVE whether that extension's C state says it activated. */
static int check_runtime(int *genuine, int *active) {
    *genuine = *active = 0;
    void *h = installed_core();
    if (!h)
        return 0;
    int (*status)(void) = (int (*)(void))dlsym(h, "safehook_core_status");
    const void *(*def)(void) = (const void *(*)(void))dlsym(h, "safehook_core_def");
    if (status && def) {
        PyObject *mods = py.PyImport_GetModuleDict(); /* borrowed */
        PyObject *m = mods ? py.PyDict_GetItemString(mods, "safehook._core") : NULL; /* borrowed */
        void *mdef = m ? py.PyModule_GetDef(m) : NULL;
        if (!mdef)
            py.PyErr_Clear(); /* not a module object */
        *genuine = mdef != NULL && mdef == def();
        *active = (status() & 1) != 0;
    }
    dlclose(h);
    return 1;
}

/* Activate the package. Returns 0, or -1: under enforcement with the refusal set, else after
 * saying on stderr that protection is not active. */
static int boot(void) {
    char why[600] = "";
    int r = run_boot(0, 0, why, sizeof why);
    if (!enforced) {
        if (r < 0) {
            char line[800];
            int n = snprintf(line, sizeof line, "safehook: protection is NOT active in this process (pid %d): %s\n",
                             (int)getpid(), why);
            if (n > 0) {
                ssize_t w = write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
                (void)w;
            }
        }
        return r;
    }
    int genuine, active;
    if (r == 0 && check_runtime(&genuine, &active) && genuine && active)
        return 0;
    /* Not the installed runtime, or it did not activate: once more, from this library's folder. */
    check_runtime(&genuine, &active);
    r = run_boot(1, genuine, why, sizeof why);
    if (r < 0) {
        refuse("%s", why);
        return -1;
    }
    if (!check_runtime(&genuine, &active)) {
        refuse("the safehook._core installed beside %s is not loaded", lib_path);
        return -1;
    }
    if (!genuine) {
        refuse("sys.modules['safehook._core'] is not the extension installed beside %s", lib_path);
        return -1;
    }
    if (!active) {
        refuse("the installed runtime did not activate");
        return -1;
    }
    return 0;
}

static int is_torch(const char *name) {
    return strncmp(name, "torch", 5) == 0 && (name[5] == '\0' || name[5] == '.');
}

static int audit_hook(const char *event, PyObject *args, void *data) {
    (void)data;
    if ((state != ARMED && state != REFUSED) || event[0] != 'i' || strcmp(event, "import") != 0)
        return 0;
    if (py.PyTuple_GetItem && py.PyUnicode_AsUTF8) {
        PyObject *mod = py.PyTuple_GetItem(args, 0);
        const char *name = mod ? py.PyUnicode_AsUTF8(mod) : NULL;
        if (!name) {
            if (py.PyErr_Clear)
                py.PyErr_Clear();
            return 0;
        }
        if (!is_torch(name))
            return 0;
    } /* else (refused in the constructor): no name can be read, so every import is refused */
    if (state == ARMED) {
        state = BOOTING; /* the imports below raise audit events of their own */
        int r = boot();
        if (state == BOOTING)
            state = r < 0 && enforced ? REFUSED : DONE;
    }
    if (state != REFUSED)
        return 0;
    /* An audit hook that raises aborts the operation: this import of torch fails, and so does
     * every later one, so the job stops before it can build an optimizer. */
    announce();
    if (py.PyErr_SetString && import_error)
        py.PyErr_SetString(*import_error, refusal);
    return -1;
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
        return; /* nothing can be done in this process: the root watcher sees it (docs/server.md) */

    int sys_state = sh_preload_system_policy(SH_SYSTEM_POLICY, sink, sizeof sink);
    enforced = sys_state != SH_SYS_NONE && sys_state != SH_SYS_ADVISORY;
    /* secure_getenv: in a setuid/setgid (AT_SECURE) process the environment is not trusted */
    const char *off = secure_getenv("SAFEHOOK_DISABLE");
    if (off && strcmp(off, "1") == 0 && sys_state == SH_SYS_NONE)
        return; /* no system policy can refuse it: stay out entirely */

    /* From here on, under enforcement, every early return is a refusal instead. */
    resolved = 1;
#define RESOLVE(ret, name, args)                       \
    *(void **)&py.name = dlsym(RTLD_DEFAULT, #name); \
    if (!py.name && resolved) {                        \
        resolved = 0;                                  \
        if (enforced)                                  \
            refuse("CPython's %s cannot be found", #name); \
    }
    PY_FUNCS(RESOLVE)
#undef RESOLVE
    *(void **)&py.PyErr_GetRaisedException = dlsym(RTLD_DEFAULT, "PyErr_GetRaisedException");
    if (!py.PyErr_GetRaisedException)
        *(void **)&py.PyErr_Fetch = dlsym(RTLD_DEFAULT, "PyErr_Fetch");
    import_error = dlsym(RTLD_DEFAULT, "PyExc_ImportError");
    if (resolved && ((!py.PyErr_GetRaisedException && !py.PyErr_Fetch) || !import_error)) {
        resolved = 0;
        if (enforced)
            refuse("CPython's error functions cannot be found");
    }
    Dl_info info;
    if (!dladdr((void *)&safehook_preload_init, &info) || !info.dli_fname || !realpath(info.dli_fname, lib_path)) {
        lib_path[0] = '\0';
        if (!enforced)
            return; /* its package cannot be found: nothing to boot */
        if (state != REFUSED)
            refuse("this library cannot find its own path (%s)", strerror(errno));
    }
    if (!resolved && !enforced)
        return;
    if (sys_state == SH_SYS_HIDDEN && state != REFUSED)
        refuse("it cannot be seen from this process: a user namespace or a mount may hide it");
    py.PySys_AddAuditHook(audit_hook, NULL);
}
