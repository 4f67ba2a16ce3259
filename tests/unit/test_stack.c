/* Native stacks through libunwind loaded on demand: the caller's frames appear, innermost first,
 * and libunwind's _Unwind_* symbols stay out of the global scope. */
#include <dlfcn.h>

#include "check.h"
#include "stack.h"

__attribute__((noinline)) static json_t *inner_frame_for_test(void) {
    json_t *r = sh_stack_native(0, 32);
    __asm__ volatile("" ::: "memory"); /* no tail call: keep this frame on the stack */
    return r;
}
__attribute__((noinline)) json_t *outer_frame_for_test(void) {
    json_t *r = inner_frame_for_test();
    __asm__ volatile("" ::: "memory");
    return r;
}

int main(void) {
    json_t *frames = outer_frame_for_test();
    CHECK(frames != NULL);
    CHECK(json_array_size(frames) >= 3);
    int inner = -1, outer = -1, mainf = -1;
    for (size_t i = 0; i < json_array_size(frames); i++) {
        const char *s = json_string_value(json_array_get(frames, i));
        if (strstr(s, "inner_frame_for_test") && inner < 0)
            inner = (int)i;
        if (strstr(s, "outer_frame_for_test") && outer < 0)
            outer = (int)i;
        if (strncmp(s, "main+", 5) == 0 && mainf < 0)
            mainf = (int)i;
    }
    CHECK(inner >= 0);
    CHECK(outer > inner);
    CHECK(mainf > outer);
    json_decref(frames);
    /* loaded RTLD_LOCAL: nothing of libunwind is visible to the process's global lookups */
    CHECK(dlsym(RTLD_DEFAULT, "_ULx86_64_init_local") == NULL);
    CHECK_DONE();
}
