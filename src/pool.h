/* A small persistent pool of worker threads for the memory-bound kernels (SafeGrad). No OpenMP:
 * torch ships its own runtime, and two in one process fight over cores. The workers are created
 * on first use, block every signal (signals stay with the host's threads), and are forgotten in a
 * forked child, which creates its own on first use. */
#ifndef SH_POOL_H
#define SH_POOL_H

/* Run fn(arg, part, nparts) for part = 0..nparts-1, part 0 on the calling thread, the others on
 * workers, and return when all are done. nparts is at most sh_pool_size(); 1 (or a pool that
 * could not start a worker) runs everything on the caller. Calls from several threads are
 * serialized. Returns the number of parts run. */
int sh_pool_run(void (*fn)(void *arg, int part, int nparts), void *arg, int nparts);

/* Threads the pool may use, the caller included: SAFEHOOK_THREADS if set (1..64), else the
 * CPUs this process may run on, at most 8. */
int sh_pool_size(void);

/* Set the size (1..64; 0 restores the default). Takes effect at the next run; workers already
 * started stay, idle. Returns 0 or -EINVAL. */
int sh_pool_set_size(int n);

#endif
