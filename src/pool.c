/* The worker pool behind sh_pool_run: a generation counter under one mutex, one condition
 * variable to start a round and one to finish it. A round costs a wake-up per worker (tens of
 * microseconds), so callers only split work that takes longer than that. */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 64

static struct {
    pthread_mutex_t run_mu; /* one round at a time */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned long gen;
    int nworkers; /* started */
    int active;   /* workers taking part in this round: indexes 1..active */
    int pending;
    void (*fn)(void *, int, int);
    void *arg;
    int nparts;
    int size;    /* 0: not decided yet */
    unsigned long born[MAX_THREADS + 1]; /* pool.gen when worker i was created */
    int atfork;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL, 0, 0, {0}, 0};

static void *worker(void *p) {
    int idx = (int)(long)p;
    pthread_mutex_lock(&pool.mu);
    /* rounds started before this thread ran but after it was counted are still its own */
    unsigned long seen = pool.born[idx];
    for (;;) {
        while (pool.gen == seen)
            pthread_cond_wait(&pool.go, &pool.mu);
        seen = pool.gen;
        if (idx > pool.active)
            continue;
        void (*fn)(void *, int, int) = pool.fn;
        void *arg = pool.arg;
        int nparts = pool.nparts;
        pthread_mutex_unlock(&pool.mu);
        fn(arg, idx, nparts);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* The child of a fork has only the forking thread: forget the workers, reset the locks. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool.run_mu, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.go, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.nworkers = 0;
    pool.pending = 0;
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

/* Start workers up to WANT (excluding the caller); called with run_mu held. Returns how many run. */
static int grow(int want) {
    if (!pool.atfork) {
        pthread_atfork(NULL, NULL, after_fork_child);
        pool.atfork = 1;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.nworkers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        pthread_mutex_lock(&pool.mu);
        pool.born[pool.nworkers + 1] = pool.gen;
        int r = pthread_create(&th, &attr, worker, (void *)(long)(pool.nworkers + 1));
        if (r == 0)
            pool.nworkers++;
        pthread_mutex_unlock(&pool.mu);
        pthread_attr_destroy(&attr);
        if (r != 0)
            break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.nworkers;
}

int sh_pool_run(void (*fn)(void *arg, int part, int nparts), void *arg, int nparts) {
    int size = sh_pool_size();
    if (nparts > size)
        nparts = size;
    if (nparts <= 1) {
        fn(arg, 0, 1);
        return 1;
    }
    pthread_mutex_lock(&pool.run_mu);
    int have = grow(nparts - 1);
    if (have < nparts - 1)
        nparts = have + 1;
    if (nparts <= 1) {
        pthread_mutex_unlock(&pool.run_mu);
        fn(arg, 0, 1);
        return 1;
    }
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.arg = arg;
    pool.nparts = nparts;
    pool.active = nparts - 1;
    pool.pending = nparts - 1;
    pool.gen++;
    pthread_cond_broadcast(&pool.go);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, nparts);
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0)
        pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.run_mu);
    return nparts;
}
