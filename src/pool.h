/* A small persistent pool of worker threads for the memory-bound kernels (SafeGrad). No OpenMP:
 * torch ships its own runtime, and two in one process fight over cores. The workers are created
 * on first use, block every signal (signals stay with the host's threads), and are forgotten in a
 * forked child, which creates its own on first use. */
#ifndef SH_POOL_H
#define SH_POOL_H

/* Run fn(arg, part, nparts) once for each part = 0..nparts-1 and return when all are done. The
 * calling thread and up to sh_pool_size()-1 workers claim parts one at a time, so which thread
 * runs a part is not fixed; a caller that needs deterministic results makes each part's output
 * depend on the part alone. Calls from several threads are serialized. Returns the number of
 * threads that could have taken part (1 when the pool has a single thread or nparts is 1). */
int sh_pool_run(void (*fn)(void *arg, int part, int nparts), void *arg, int nparts);

/* Threads the pool may use, the caller included: SAFEHOOK_THREADS if set (1..64), else the
 * CPUs this process may run on, at most 8. */
int sh_pool_size(void);

/* Set the size (1..64; 0 restores the default). Takes effect at the next run; workers already
 * started beyond the new size stay asleep (no round wakes them) until the size grows again.
 * Returns 0 or -EINVAL. */
int sh_pool_set_size(int n);

/* How many times a worker has joined a round since the process started (for tests: a round
 * wakes at most min(size, nparts) - 1 workers). */
unsigned long sh_pool_wakeups(void);

#endif
