/* An LD_AUDIT library any user may load: the dynamic loader asks it where to find each object,
 * the preloaded ones too, and it answers "nowhere" for libsafehook. */
#define _GNU_SOURCE
#include <link.h>
#include <stdint.h>
#include <string.h>

unsigned int la_version(unsigned int v) {
    (void)v;
    return LAV_CURRENT;
}

char *la_objsearch(const char *name, uintptr_t *cookie, unsigned int flag) {
    (void)cookie;
    (void)flag;
    return strstr(name, "libsafehook") ? NULL : (char *)name;
}
