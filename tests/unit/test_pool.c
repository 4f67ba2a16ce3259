/* The worker pool: every part runs once, and the pool shrinks: after its size is lowered, a
 * round wakes only the workers the new size allows and no other thread runs a part. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "check.h"
#include "pool.h"

#define MAXPARTS 256

typedef struct {
    _Atomic int runs[MAXPARTS];
    pthread_t who[MAXPARTS];
} round_log;

static void record(void *arg, int part, int nparts) {
    (void)nparts;
    round_log *l = arg;
    l->who[part] = pthread_self();
    atomic_fetch_add(&l->runs[part], 1);
    /* long enough that a woken worker finds parts left to claim */
    struct timespec ts = {0, 200 * 1000};
    nanosleep(&ts, NULL);
}

/* Run a round of NPARTS parts; returns the number of distinct threads that ran a part. */
static int run_round(int nparts) {
    static round_log l;
    memset(&l, 0, sizeof l);
    sh_pool_run(record, &l, nparts);
    int distinct = 0;
    for (int p = 0; p < nparts; p++) {
        CHECK_INT(atomic_load(&l.runs[p]), 1);
        int seen = 0;
        for (int q = 0; q < p; q++)
            seen |= pthread_equal(l.who[q], l.who[p]);
        distinct += !seen;
    }
    return distinct;
}

int main(void) {
    CHECK_INT(sh_pool_set_size(4), 0);
    int most = 0;
    for (int i = 0; i < 20 && most < 4; i++) { /* the workers start, and all four threads take part */
        int d = run_round(64);
        most = d > most ? d : most;
    }
    CHECK_INT(most, 4);

    /* shrink to 2: one worker per round may wake, and at most 2 threads run parts */
    CHECK_INT(sh_pool_set_size(2), 0);
    unsigned long before = sh_pool_wakeups();
    for (int i = 0; i < 30; i++) {
        int d = run_round(64);
        if (d > 2) {
            CHECK_INT(d, 2);
            break;
        }
    }
    unsigned long woken = sh_pool_wakeups() - before;
    if (woken > 30) /* before the fix: 3 per round */
        CHECK_INT(woken, 30);

    /* a round with fewer parts than threads wakes fewer workers: 2 parts, size 4 -> one worker */
    CHECK_INT(sh_pool_set_size(4), 0);
    before = sh_pool_wakeups();
    for (int i = 0; i < 10; i++)
        CHECK(run_round(2) <= 2);
    woken = sh_pool_wakeups() - before;
    CHECK(woken <= 10);

    /* size 1: the caller alone, no worker woken */
    CHECK_INT(sh_pool_set_size(1), 0);
    before = sh_pool_wakeups();
    for (int i = 0; i < 5; i++)
        CHECK_INT(run_round(16), 1);
    CHECK_INT(sh_pool_wakeups() - before, 0);

    /* and grown again, the sleeping workers come back */
    CHECK_INT(sh_pool_set_size(4), 0);
    most = 0;
    for (int i = 0; i < 20 && most < 4; i++) {
        int d = run_round(64);
        most = d > most ? d : most;
    }
    CHECK_INT(most, 4);
    CHECK_INT(sh_pool_set_size(0), 0);
    CHECK_DONE();
}
