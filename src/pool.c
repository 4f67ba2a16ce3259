/* The worker pool behind sh_pool_run. A round is a set of parts that the calling thread and the
 * workers claim one at a time from a shared ticket, so a worker that wakes late (a busy machine
 * can keep a woken thread off the CPU for milliseconds) costs nothing: the caller has taken its
 * parts meanwhile. The ticket carries the round number, so a worker still holding an old round
 * cannot claim a part of the next one. Each worker sleeps on a condition variable of its own, and
 * a round wakes only the workers it may use (the pool's size, less the caller, at most the parts
 * less one): after the size is lowered, the workers beyond it stay asleep. */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 64

static struct {
    pthread_mutex_t run_mu; /* one round at a time */
    pthread_mutex_t mu;     /* guards the fields below up to nworkers, and the condition variables */
    pthread_cond_t go[MAX_THREADS], done; /* go[i]: worker i's */
    uint32_t round;         /* the current round's number */
    void (*fn)(void *, int, int);
    void *arg;
    int nparts;
    int active;             /* workers 0 .. active-1 take part in the current round */
    int nworkers;           /* started */
    _Atomic unsigned long wakeups; /* rounds joined by a worker, since the start */
    _Atomic uint64_t ticket;   /* round << 32 | next part to claim */
    _Atomic int finished;      /* parts of the current round done */
    int size;               /* 0: not decided yet */
    int atfork;
} pool = {.run_mu = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};

/* The next part of ROUND, or -1 when the round has none left (or is over). */
static int claim(uint32_t round, int nparts) {
    uint64_t v = atomic_load(&pool.ticket);
    for (;;) {
        if ((uint32_t)(v >> 32) != round || (int)(uint32_t)v >= nparts)
            return -1;
        if (atomic_compare_exchange_weak(&pool.ticket, &v, v + 1))
            return (int)(uint32_t)v;
    }
}

/* Run the parts of ROUND this thread can claim; the one that finishes the last part wakes the
 * caller. */
static void work(uint32_t round, void (*fn)(void *, int, int), void *arg, int nparts) {
    int part;
    while ((part = claim(round, nparts)) >= 0) {
        fn(arg, part, nparts);
        if (atomic_fetch_add(&pool.finished, 1) + 1 == nparts) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_broadcast(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
}

typedef struct {
    int index;
    uint32_t round; /* the round when the worker was created */
} worker_arg;

static void *worker(void *p) {
    worker_arg a = *(worker_arg *)p;
    free(p);
    uint32_t seen = a.round;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        /* a round this worker is not part of leaves it asleep; it joins the next one it is */
        while (pool.round == seen || a.index >= pool.active)
            pthread_cond_wait(&pool.go[a.index], &pool.mu);
        seen = pool.round;
        void (*fn)(void *, int, int) = pool.fn;
        void *arg = pool.arg;
        int nparts = pool.nparts;
        pthread_mutex_unlock(&pool.mu);
        atomic_fetch_add(&pool.wakeups, 1);
        /* fn and arg stay valid while a part of this round is unclaimed or running: the caller
         * waits for every part, and claim() refuses parts of another round */
        work(seen, fn, arg, nparts);
        pthread_mutex_lock(&pool.mu);
    }
    return NULL;
}

/* The child of a fork has only the forking thread: forget the workers, reset the locks. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool.run_mu, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    for (int i = 0; i < MAX_THREADS; i++)
        pthread_cond_init(&pool.go[i], NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.nworkers = 0;
    pool.active = 0;
}

static int default_size(void) {
    const char *e = secure_getenv("SAFEHOOK_THREADS");
    if (e && *e) {
        char *end;
        long v = strtol(e, &end, 10);
        if (*end == '\0' && v >= 1 && v <= MAX_THREADS)
            return (int)v;
    }
    int n = 1;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        n = CPU_COUNT(&set);
#endif
    if (n < 1)
        n = 1;
    return n > 8 ? 8 : n;
}

int sh_pool_size(void) {
    if (pool.size == 0)
        pool.size = default_size();
    return pool.size;
}

int sh_pool_set_size(int n) {
    if (n < 0 || n > MAX_THREADS)
        return -EINVAL;
    pool.size = n == 0 ? default_size() : n;
    return 0;
}

/* Start workers up to WANT (the caller not counted); called with run_mu held. */
static void grow(int want) {
    if (!pool.atfork) {
        for (int i = 0; i < MAX_THREADS; i++)
            pthread_cond_init(&pool.go[i], NULL);
        pthread_atfork(NULL, NULL, after_fork_child);
        pool.atfork = 1;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* inherited by the workers: no signal lands there */
    while (pool.nworkers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        worker_arg *a = malloc(sizeof *a);
        if (!a) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_mutex_lock(&pool.mu);
        *a = (worker_arg){pool.nworkers, pool.round};
        int r = pthread_create(&th, &attr, worker, a);
        if (r == 0)
            pool.nworkers++;
        pthread_mutex_unlock(&pool.mu);
        pthread_attr_destroy(&attr);
        if (r != 0) {
            free(a);
            break;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

int sh_pool_run(void (*fn)(void *arg, int part, int nparts), void *arg, int nparts) {
    if (nparts < 1)
        return 0;
    int size = sh_pool_size();
    if (nparts == 1 || size == 1) {
        for (int p = 0; p < nparts; p++)
            fn(arg, p, nparts);
        return 1;
    }
    pthread_mutex_lock(&pool.run_mu);
    int want = (nparts < size ? nparts : size) - 1;
    grow(want);
    pthread_mutex_lock(&pool.mu);
    uint32_t round = ++pool.round;
    pool.fn = fn;
    pool.arg = arg;
    pool.nparts = nparts;
    pool.active = want < pool.nworkers ? want : pool.nworkers;
    int active = pool.active;
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.ticket, (uint64_t)round << 32);
    for (int i = 0; i < active; i++)
        pthread_cond_signal(&pool.go[i]);
    pthread_mutex_unlock(&pool.mu);
    work(round, fn, arg, nparts);
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.finished) < nparts)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.run_mu);
    return active + 1;
}

unsigned long sh_pool_wakeups(void) { return atomic_load(&pool.wakeups); }
