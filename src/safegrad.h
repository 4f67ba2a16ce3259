/* SafeGrad's projection kernel: move a task gradient g along a safety gradient s just enough that
 * cos(g, s) reaches the threshold t when it is below it, g <- g - coef s (t = 0: the conflicting
 * component removed, coef = g.s / s.s), over groups of tensors (one group: the global mode; a
 * group per block: layer; a group per tensor: tensor). The part of g orthogonal to s is never
 * touched, and a group at or above t is left alone, so a higher t never removes more of what
 * helps safety: it only adds more of it.
 *
 * Two passes over contiguous CPU memory: one reads g and s once for all three dot products
 * (g.s, s.s, g.g), one updates g in place. fp32, bf16 and fp16 data, g and s each in their own
 * dtype; the arithmetic is fp32 within blocks of 1024 elements and fp64 across blocks. Large
 * work is cut into parts run by the threads of pool.h; the parts depend on the sizes alone, so the
 * results are the same bits with any number of threads. */
#ifndef SH_SAFEGRAD_H
#define SH_SAFEGRAD_H

#include <stddef.h>

#include "convert.h" /* the conversions the kernel uses */

typedef enum { SH_DT_F32 = 0, SH_DT_BF16 = 1, SH_DT_F16 = 2 } sh_dtype;

typedef struct {
    void *g;       /* task gradient: read, and updated in place */
    const void *s; /* safety gradient: read only */
    size_t n;      /* elements of each */
    sh_dtype gt, st;
    size_t group;  /* 0 .. ngroups-1 */
} sh_sg_tensor;

/* The three dot products of each group: out[3k] = g.s, out[3k+1] = s.s, out[3k+2] = g.g of
 * group k (out has 3*ngroups doubles and is overwritten). Returns 0, or -EINVAL for a group out
 * of range or an unknown dtype (out is then unspecified), -ENOMEM when scratch memory fails. */
int sh_sg_dots(const sh_sg_tensor *t, size_t nt, size_t ngroups, double *out);

/* Cosines within this of the threshold count as not below it (float rounding). */
#define SH_SG_COS_EPS 1e-6

/* Decide each group from its dot products (as sh_sg_dots lays them out, summed over every shard
 * when the tensors are sharded): cosine[k] = g.s / sqrt(g.g s.s), NaN when either norm is 0;
 * when cosine[k] < threshold - SH_SG_COS_EPS, coef[k] = g.s / s.s - t |r| / (|s| sqrt(1 - t^2))
 * with |r|^2 = g.g - (g.s)^2 / s.s (so that g - coef s has cosine t), else 0. threshold must be
 * in [-1, 1). Returns the number of groups projected. cosine may be NULL. */
size_t sh_sg_decide(const double *dots, size_t ngroups, double threshold, double *coef, double *cosine);

/* g -= coef[group] * s for every tensor whose group's coef is not 0 (the others are not
 * touched). Returns 0 or -EINVAL as sh_sg_dots. */
int sh_sg_update(const sh_sg_tensor *t, size_t nt, size_t ngroups, const double *coef);

/* All three steps. dots (3*ngroups), coef and cosine (ngroups each) receive what was computed.
 * Returns the number of groups projected, or a negative errno (nothing changed). */
long sh_sg_project(const sh_sg_tensor *t, size_t nt, size_t ngroups, double threshold, double *dots,
                   double *coef, double *cosine);

#endif
