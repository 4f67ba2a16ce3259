/* Native stacks with libunwind, resolved with dlopen/dlsym so that nothing of libunwind is
 * linked into the host process's global symbol scope. */
#define UNW_LOCAL_ONLY
#include "stack.h"

#include <dlfcn.h>
#include <libunwind.h>
#include <pthread.h>
#include <stdio.h>

#define STR_(x) #x
#define STR(x) STR_(x)

static struct {
    int (*getcontext)(unw_context_t *);
    int (*init_local)(unw_cursor_t *, unw_context_t *);
    int (*step)(unw_cursor_t *);
    int (*get_reg)(unw_cursor_t *, unw_regnum_t, unw_word_t *);
    int (*get_proc_name)(unw_cursor_t *, char *, size_t, unw_word_t *);
} unw;
static int unw_state; /* 0 not tried, 1 ready, -1 unavailable */
static pthread_once_t unw_once = PTHREAD_ONCE_INIT;

static void load_unwind(void) {
    void *h = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        h = dlopen("libunwind.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        unw_state = -1;
        return;
    }
    /* The names behind libunwind's macros, e.g. unw_init_local -> _ULx86_64_init_local. */
    *(void **)&unw.getcontext = dlsym(h, STR(unw_tdep_getcontext));
    *(void **)&unw.init_local = dlsym(h, STR(unw_init_local));
    *(void **)&unw.step = dlsym(h, STR(unw_step));
    *(void **)&unw.get_reg = dlsym(h, STR(unw_get_reg));
    *(void **)&unw.get_proc_name = dlsym(h, STR(unw_get_proc_name));
    unw_state = (unw.getcontext && unw.init_local && unw.step && unw.get_reg && unw.get_proc_name) ? 1 : -1;
}

json_t *sh_stack_native(int skip, int max) {
    pthread_once(&unw_once, load_unwind);
    if (unw_state != 1)
        return NULL;

    unw_context_t ctx;
    unw_cursor_t cur;
    if (unw.getcontext(&ctx) != 0 || unw.init_local(&cur, &ctx) != 0)
        return NULL;
    json_t *frames = json_array();
    int depth = 0;
    while (frames && json_array_size(frames) < (size_t)max && unw.step(&cur) > 0) {
        if (depth++ < skip)
            continue;
        unw_word_t ip = 0, off = 0;
        unw.get_reg(&cur, UNW_REG_IP, &ip);
        char name[256] = "??";
        if (unw.get_proc_name(&cur, name, sizeof name, &off) != 0)
            snprintf(name, sizeof name, "??");
        Dl_info info;
        const char *obj = (dladdr((void *)ip, &info) && info.dli_fname) ? info.dli_fname : "?";
        char line[512];
        snprintf(line, sizeof line, "%s+0x%lx (%s)", name, (unsigned long)off, obj);
        json_array_append_new(frames, json_string(line));
    }
    return frames;
}
