/* Native call stacks for violation records, through libunwind loaded on demand.
 *
 * libunwind is dlopen()ed with RTLD_LOCAL the first time a stack is asked for, never linked:
 * its exported _Unwind_* symbols then cannot shadow libgcc's in the host process, whose C++
 * exceptions (PyTorch throws them routinely) must keep working. */
#ifndef SH_STACK_H
#define SH_STACK_H

#include <jansson.h>

/* The calling thread's native stack as a JSON array of strings "symbol+0xoffset (object)",
 * innermost first, skipping SKIP frames of safehook itself, at most MAX frames. Returns a new
 * reference, or NULL when libunwind cannot be loaded (the caller records that no native stack
 * was available). */
json_t *sh_stack_native(int skip, int max);

#endif
