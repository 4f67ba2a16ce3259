/* Native stacks through libunwind loaded on demand: a known chain of noinline calls
 * (main -> stack -> outer -> inner -> sh_stack_native) comes back frame by frame, innermost first, named
 * and placed in this executable; skip and max cut it where asked; and libunwind's symbols stay
 * out of the global scope (checked with the name libunwind.h gives this architecture, which is
 * shown to exist in the library first). */
#define UNW_LOCAL_ONLY
#include <dlfcn.h>
#include <libunwind.h>

#include "check.h"
#include "stack.h"

#define STR_(x) #x
#define STR(x) STR_(x)

static int skip_arg, max_arg;

__attribute__((noinline)) static json_t *inner_frame_for_test(void) {
    json_t *r = sh_stack_native(skip_arg, max_arg);
    __asm__ volatile("" ::: "memory"); /* no tail call: keep this frame on the stack */
    return r;
}
__attribute__((noinline)) static json_t *outer_frame_for_test(void) {
    json_t *r = inner_frame_for_test();
    __asm__ volatile("" ::: "memory");
    return r;
}

__attribute__((noinline)) static json_t *stack(int skip, int max) {
    skip_arg = skip;
    max_arg = max;
    json_t *r = outer_frame_for_test();
    __asm__ volatile("" ::: "memory");
    return r;
}

/* Frame I of FRAMES is function NAME of this executable: "NAME+0x... (.../test_stack)". */
static int frame_is(json_t *frames, size_t i, const char *name) {
    const char *s = json_string_value(json_array_get(frames, i));
    size_t n = strlen(name);
    if (!s || strncmp(s, name, n) != 0 || strncmp(s + n, "+0x", 3) != 0 || !strstr(s, "test_stack)")) {
        fprintf(stderr, "frame %zu: %s, expected %s of test_stack\n", i, s ? s : "(none)", name);
        return 0;
    }
    return 1;
}

int main(void) {
    json_t *frames = stack(0, 32);
    CHECK(frames != NULL);
    if (!frames)
        CHECK_DONE();
    /* the four frames below sh_stack_native, in order, with no frame missing or between;
     * then the C library's start code, and not much more */
    CHECK(frame_is(frames, 0, "inner_frame_for_test"));
    CHECK(frame_is(frames, 1, "outer_frame_for_test"));
    CHECK(frame_is(frames, 2, "stack"));
    CHECK(frame_is(frames, 3, "main"));
    CHECK(json_array_size(frames) >= 5 && json_array_size(frames) <= 8);
    json_decref(frames);

    frames = stack(2, 32); /* skip two: the stack starts at the caller of outer */
    CHECK(frame_is(frames, 0, "stack"));
    CHECK(frame_is(frames, 1, "main"));
    json_decref(frames);

    frames = stack(0, 2); /* at most two frames */
    CHECK_INT(json_array_size(frames), 2);
    CHECK(frame_is(frames, 1, "outer_frame_for_test"));
    json_decref(frames);

    /* loaded RTLD_LOCAL: the library is mapped and has the symbol, yet the process's global
     * lookup does not find it */
    void *h = dlopen("libunwind.so.8", RTLD_NOW | RTLD_NOLOAD);
    if (!h)
        h = dlopen("libunwind.so", RTLD_NOW | RTLD_NOLOAD);
    CHECK(h != NULL);
    CHECK(h && dlsym(h, STR(unw_init_local)) != NULL);
    CHECK(dlsym(RTLD_DEFAULT, STR(unw_init_local)) == NULL);
    if (h)
        dlclose(h);
    CHECK_DONE();
}
