/* A library preloaded before libsafehook whose dlsym() never finds PySys_AddAuditHook: the
 * bootstrap cannot register its audit hook at all. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

void *dlsym(void *h, const char *name) {
    static void *(*real)(void *, const char *);
    if (!real)
        real = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!strcmp(name, "PySys_AddAuditHook"))
        return NULL;
    return real(h, name);
}
