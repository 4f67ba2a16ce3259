/* The SafeGrad projection kernel (see safegrad.h): the two passes, the split of
 * the work over the pool, and the per-group decision. */
#include "safegrad.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "pool.h"

/* The vector helpers below are always inlined, so no vector value crosses a function boundary
 * and GCC's note about the AVX calling convention does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define BLOCK 1024           /* elements summed in fp32 before folding into fp64 */
#define PAR_MIN (1u << 17)   /* elements below which the work is not split */
#define PAR_GRAIN (1u << 16) /* elements per part, at least */
#define PAR_MAX 64           /* parts, at most */

/* Hot loops get an AVX2 clone on x86-64 (picked at load time by the ifunc resolver); the
 * default clone is plain x86-64 (SSE2). Elsewhere, one portable version. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef HOT
#define HOT
#endif
#define INL static inline __attribute__((always_inline))

typedef float v8f __attribute__((vector_size(32)));

/* A block of N elements of P (dtype DT) from element OFF as fp32: in place for fp32 data,
 * else converted into BUF. */
INL const float *load(const void *p, sh_dtype dt, size_t off, size_t n, float *buf) {
    if (dt == SH_DT_F32)
        return (const float *)p + off;
    const uint16_t *h = (const uint16_t *)p + off;
    if (dt == SH_DT_BF16)
        sh_cvt.bf16_in(h, buf, n);
    else
        sh_cvt.f16_in(h, buf, n);
    return buf;
}

INL void store(void *p, sh_dtype dt, size_t off, size_t n, const float *v) {
    uint16_t *h = (uint16_t *)p + off;
    if (dt == SH_DT_BF16)
        sh_cvt.bf16_out(v, h, n);
    else
        sh_cvt.f16_out(v, h, n);
}

INL v8f ld8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

INL float hsum(v8f a, v8f b) {
    double s = 0;
    for (int i = 0; i < 8; i++)
        s += (double)a[i] + (double)b[i];
    return (float)s;
}

/* ---- pass 1: dot products ---- */

INL void dot3_block(const float *g, const float *s, size_t n, double acc[3]) {
    v8f gs0 = {0}, gs1 = {0}, ss0 = {0}, ss1 = {0}, gg0 = {0}, gg1 = {0};
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v8f a0 = ld8(g + i), a1 = ld8(g + i + 8), b0 = ld8(s + i), b1 = ld8(s + i + 8);
        gs0 += a0 * b0;
        gs1 += a1 * b1;
        ss0 += b0 * b0;
        ss1 += b1 * b1;
        gg0 += a0 * a0;
        gg1 += a1 * a1;
    }
    double gs = hsum(gs0, gs1), ss = hsum(ss0, ss1), gg = hsum(gg0, gg1);
    for (; i < n; i++) {
        gs += (double)g[i] * s[i];
        ss += (double)s[i] * s[i];
        gg += (double)g[i] * g[i];
    }
    acc[0] += gs;
    acc[1] += ss;
    acc[2] += gg;
}

HOT static void dots_seg(const sh_sg_tensor *t, size_t off, size_t n, double acc[3]) {
    float gb[BLOCK], sb[BLOCK];
    for (size_t i = 0; i < n; i += BLOCK) {
        size_t m = n - i < BLOCK ? n - i : BLOCK;
        const float *g = load(t->g, t->gt, off + i, m, gb);
        const float *s = load(t->s, t->st, off + i, m, sb);
        dot3_block(g, s, m, acc);
    }
}

/* ---- pass 2: the update ---- */

HOT static void update_seg(const sh_sg_tensor *t, size_t off, size_t n, float c) {
    float gb[BLOCK], sb[BLOCK];
    for (size_t i = 0; i < n; i += BLOCK) {
        size_t m = n - i < BLOCK ? n - i : BLOCK;
        const float *s = load(t->s, t->st, off + i, m, sb);
        if (t->gt == SH_DT_F32) {
            float *g = (float *)t->g + off + i;
            for (size_t j = 0; j < m; j++)
                g[j] -= c * s[j];
        } else {
            load(t->g, t->gt, off + i, m, gb);
            for (size_t j = 0; j < m; j++)
                gb[j] -= c * s[j];
            store(t->g, t->gt, off + i, m, gb);
        }
    }
}

/* ---- splitting the work ---- */

typedef struct {
    const sh_sg_tensor *t;
    size_t nt, ngroups, total;
    size_t *start;      /* nt+1 offsets of each tensor in the concatenated element space */
    double *partial;    /* nparts x 3*ngroups (dots) */
    const double *coef; /* (update) */
} job;

/* Part PART of NPARTS covers [lo, hi) of the concatenated elements, cut at BLOCK multiples. */
static void part_range(const job *j, int part, int nparts, size_t *lo, size_t *hi) {
    size_t blocks = (j->total + BLOCK - 1) / BLOCK;
    *lo = blocks * (size_t)part / (size_t)nparts * BLOCK;
    *hi = part + 1 == nparts ? j->total : blocks * (size_t)(part + 1) / (size_t)nparts * BLOCK;
    if (*hi > j->total)
        *hi = j->total;
}

/* First tensor whose range ends after POS. */
static size_t first_tensor(const job *j, size_t pos) {
    size_t a = 0, b = j->nt;
    while (a < b) {
        size_t mid = a + (b - a) / 2;
        if (j->start[mid + 1] <= pos)
            a = mid + 1;
        else
            b = mid;
    }
    return a;
}

#define FOR_SEGMENTS(j, part, nparts, BODY)                                               \
    do {                                                                                  \
        size_t lo_, hi_;                                                                  \
        part_range(j, part, nparts, &lo_, &hi_);                                          \
        for (size_t i_ = first_tensor(j, lo_); i_ < (j)->nt && (j)->start[i_] < hi_; i_++) { \
            size_t a_ = (j)->start[i_] > lo_ ? (j)->start[i_] : lo_;                      \
            size_t b_ = (j)->start[i_ + 1] < hi_ ? (j)->start[i_ + 1] : hi_;              \
            if (a_ >= b_)                                                                 \
                continue;                                                                 \
            const sh_sg_tensor *T = &(j)->t[i_];                                          \
            size_t OFF = a_ - (j)->start[i_], N = b_ - a_;                                \
            BODY;                                                                         \
        }                                                                                 \
    } while (0)

static void dots_part(void *arg, int part, int nparts) {
    job *j = arg;
    double *acc = j->partial + (size_t)part * 3 * j->ngroups;
    FOR_SEGMENTS(j, part, nparts, dots_seg(T, OFF, N, acc + 3 * T->group));
}

static void update_part(void *arg, int part, int nparts) {
    job *j = arg;
    FOR_SEGMENTS(j, part, nparts, {
        double c = j->coef[T->group];
        if (c != 0.0)
            update_seg(T, OFF, N, (float)c);
    });
}

static int valid_dtype(sh_dtype d) { return d == SH_DT_F32 || d == SH_DT_BF16 || d == SH_DT_F16; }

/* Fill j->start; returns 0 or -EINVAL. */
static int plan(job *j, const sh_sg_tensor *t, size_t nt, size_t ngroups, size_t *start) {
    j->t = t;
    j->nt = nt;
    j->ngroups = ngroups;
    j->start = start;
    start[0] = 0;
    for (size_t i = 0; i < nt; i++) {
        if (t[i].group >= ngroups || !valid_dtype(t[i].gt) || !valid_dtype(t[i].st))
            return -EINVAL;
        if (t[i].n > 0 && (!t[i].g || !t[i].s))
            return -EINVAL;
        start[i + 1] = start[i] + t[i].n;
    }
    j->total = start[nt];
    return 0;
}

/* The parts a pass is cut into depend on the size alone, not on the threads: the dot products
 * (summed part by part in a fixed order) are the same bits whatever the pool size. */
static int nparts_for(size_t total) {
    if (total < PAR_MIN)
        return 1;
    size_t k = total / PAR_GRAIN;
    return k < PAR_MAX ? (int)k : PAR_MAX;
}

int sh_sg_dots(const sh_sg_tensor *t, size_t nt, size_t ngroups, double *out) {
    if (ngroups == 0)
        return nt ? -EINVAL : 0;
    size_t *start = malloc((nt + 1) * sizeof *start);
    if (!start)
        return -ENOMEM;
    job j = {0};
    int r = plan(&j, t, nt, ngroups, start);
    if (r < 0)
        goto free_start;
    int nparts = nparts_for(j.total);
    j.partial = calloc((size_t)nparts * 3 * ngroups, sizeof(double));
    if (!j.partial) {
        r = -ENOMEM;
        goto free_start;
    }
    sh_pool_run(dots_part, &j, nparts);
    /* parts summed in a fixed order: the same inputs give the same bits on every rank */
    for (size_t k = 0; k < 3 * ngroups; k++) {
        double v = 0;
        for (int p = 0; p < nparts; p++)
            v += j.partial[(size_t)p * 3 * ngroups + k];
        out[k] = v;
    }
    free(j.partial);
free_start:
    free(start);
    return r;
}

size_t sh_sg_decide(const double *dots, size_t ngroups, double threshold, double *coef, double *cosine) {
    size_t projected = 0;
    for (size_t k = 0; k < ngroups; k++) {
        double gs = dots[3 * k], ss = dots[3 * k + 1], gg = dots[3 * k + 2];
        double cs = (ss > 0 && gg > 0) ? gs / sqrt(gg * ss) : NAN;
        coef[k] = 0.0;
        /* NaN (nothing to compare) never projects; nor does a cosine within rounding of the
         * threshold, so that a projected gradient (cosine ~1e-7 off it) is left alone */
        if (cs == cs && cs < threshold - SH_SG_COS_EPS) {
            /* g = (gs/ss) s + r with r orthogonal to s; the result x s + r has cosine t when
             * x = t |r| / (|s| sqrt(1 - t^2)). t = 0 gives x = 0: the plain projection. */
            double x = 0.0;
            if (threshold != 0.0) {
                double rr = gg - gs * gs / ss;
                x = threshold * sqrt(rr > 0 ? rr : 0) / sqrt(ss * (1 - threshold * threshold));
            }
            coef[k] = gs / ss - x;
            projected++;
        }
        if (cosine)
            cosine[k] = cs;
    }
    return projected;
}

int sh_sg_update(const sh_sg_tensor *t, size_t nt, size_t ngroups, const double *coef) {
    size_t *start = malloc((nt + 1) * sizeof *start);
    if (!start)
        return -ENOMEM;
    job j = {0};
    int r = plan(&j, t, nt, ngroups, start);
    if (r == 0) {
        j.coef = coef;
        /* only the elements that change count towards the split */
        size_t moving = 0;
        for (size_t i = 0; i < nt; i++)
            if (coef[t[i].group] != 0.0)
                moving += t[i].n;
        if (moving)
            sh_pool_run(update_part, &j, nparts_for(moving));
    }
    free(start);
    return r;
}

long sh_sg_project(const sh_sg_tensor *t, size_t nt, size_t ngroups, double threshold, double *dots,
                   double *coef, double *cosine) {
    int r = sh_sg_dots(t, nt, ngroups, dots);
    if (r < 0)
        return r;
    size_t n = sh_sg_decide(dots, ngroups, threshold, coef, cosine);
    if (n) {
        r = sh_sg_update(t, nt, ngroups, coef);
        if (r < 0)
            return r;
    }
    return (long)n;
}
