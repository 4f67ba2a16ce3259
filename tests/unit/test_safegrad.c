/* The projection kernel against a double-precision reference: every dtype pair, the three
 * granularities, conflict and no conflict, idempotence, the threaded split, and the fp16/bf16
 * conversions (exhaustive round trips, rounding of midpoints). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "pool.h"
#include "safegrad.h"

#define CHECK_NEAR(a, b, tol)                                                                   \
    do {                                                                                        \
        double a_ = (a), b_ = (b), t_ = (tol);                                                  \
        if (!(fabs(a_ - b_) <= t_)) {                                                           \
            fprintf(stderr, "%s:%d: %s ~ %s: %.9g != %.9g (tol %.3g)\n", __FILE__, __LINE__, #a, \
                    #b, a_, b_, t_);                                                            \
            check_failures++;                                                                   \
        }                                                                                       \
    } while (0)

static uint64_t rng = 88172645463325252ull;
static double urand(void) { /* xorshift64, uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static size_t esize(sh_dtype d) { return d == SH_DT_F32 ? 4 : 2; }

static double get(const void *p, sh_dtype d, size_t i) {
    if (d == SH_DT_F32)
        return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return d == SH_DT_BF16 ? sh_bf16_to_f32(h) : sh_f16_to_f32(h);
}

static void put(void *p, sh_dtype d, size_t i, double v) {
    if (d == SH_DT_F32)
        ((float *)p)[i] = (float)v;
    else if (d == SH_DT_BF16)
        ((uint16_t *)p)[i] = sh_f32_to_bf16((float)v);
    else
        ((uint16_t *)p)[i] = sh_f32_to_f16((float)v);
}

/* One case: NT tensors of random sizes, in NG groups (group = i % NG), s = noise + MIX * g so
 * that MIX < 0 conflicts. Checks dots, cosines and the updated g against fp64 on the stored
 * values. */
static void run_case(sh_dtype gt, sh_dtype st, size_t nt, size_t ng, size_t maxn, double mix) {
    sh_sg_tensor t[64];
    void *g0[64];
    double dots_ref[3 * 64] = {0};
    for (size_t i = 0; i < nt; i++) {
        size_t n = 1 + (size_t)((urand() + 1) / 2 * (double)maxn);
        t[i].n = n;
        t[i].gt = gt;
        t[i].st = st;
        t[i].group = i % ng;
        t[i].g = malloc(n * esize(gt));
        t[i].s = malloc(n * esize(st));
        g0[i] = malloc(n * esize(gt));
        for (size_t k = 0; k < n; k++) {
            double gv = urand();
            put(t[i].g, gt, k, gv);
            put((void *)t[i].s, st, k, 0.3 * urand() + mix * gv);
        }
        memcpy(g0[i], t[i].g, n * esize(gt));
        double *d = dots_ref + 3 * t[i].group;
        for (size_t k = 0; k < n; k++) {
            double a = get(t[i].g, gt, k), b = get(t[i].s, st, k);
            d[0] += a * b;
            d[1] += b * b;
            d[2] += a * a;
        }
    }
    double dots[3 * 64], coef[64], cosine[64], coef_ref[64], cos_ref[64];
    long np = sh_sg_project(t, nt, ng, 0.0, dots, coef, cosine);
    size_t np_ref = 0;
    for (size_t k = 0; k < ng; k++) {
        for (int c = 0; c < 3; c++)
            CHECK_NEAR(dots[3 * k + c], dots_ref[3 * k + c], 1e-5 * (fabs(dots_ref[3 * k + c]) + 1));
        cos_ref[k] = dots_ref[3 * k] / sqrt(dots_ref[3 * k + 1] * dots_ref[3 * k + 2]);
        coef_ref[k] = cos_ref[k] < 0 ? dots_ref[3 * k] / dots_ref[3 * k + 1] : 0.0;
        np_ref += cos_ref[k] < 0;
        CHECK_NEAR(cosine[k], cos_ref[k], 1e-5);
    }
    CHECK_INT(np, np_ref);
    double tol = gt == SH_DT_F32 ? 1e-6 : gt == SH_DT_F16 ? 2e-3 : 1.6e-2; /* one rounding */
    double gs_after[64] = {0};
    for (size_t i = 0; i < nt; i++) {
        double c = coef_ref[t[i].group];
        for (size_t k = 0; k < t[i].n; k++) {
            double want = get(g0[i], gt, k) - c * get(t[i].s, st, k);
            double got = get(t[i].g, gt, k);
            if (c == 0.0) {
                if (got != get(g0[i], gt, k)) { /* untouched, bit for bit */
                    CHECK(got == get(g0[i], gt, k));
                    break;
                }
            } else if (!(fabs(got - want) <= tol * (fabs(want) + 1e-3) + 1e-6)) {
                CHECK_NEAR(got, want, tol * (fabs(want) + 1e-3) + 1e-6);
                break;
            }
            gs_after[t[i].group] += got * get(t[i].s, st, k);
        }
    }
    /* after a projection the conflict is gone: g.s ~ 0 relative to |g||s| */
    for (size_t k = 0; k < ng; k++)
        if (coef_ref[k] != 0.0)
            CHECK_NEAR(gs_after[k] / sqrt(dots_ref[3 * k + 1] * dots_ref[3 * k + 2]), 0.0,
                       gt == SH_DT_F32 ? 1e-5 : 2e-2);
    /* idempotence (fp32): projecting again changes nothing beyond rounding */
    if (gt == SH_DT_F32 && np > 0) {
        double d2[3 * 64], c2[64];
        sh_sg_dots(t, nt, ng, d2);
        sh_sg_decide(d2, ng, 0.0, c2, NULL);
        for (size_t k = 0; k < ng; k++)
            CHECK_NEAR(c2[k], 0.0, 1e-5 * fabs(coef_ref[k]) + 1e-9);
    }
    for (size_t i = 0; i < nt; i++) {
        free(t[i].g);
        free((void *)t[i].s);
        free(g0[i]);
    }
}

static void test_reference(void) {
    sh_dtype dts[3] = {SH_DT_F32, SH_DT_BF16, SH_DT_F16};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int conflict = 0; conflict < 2; conflict++) {
                double mix = conflict ? -0.5 : 0.5;
                run_case(dts[a], dts[b], 7, 1, 3000, mix);  /* global */
                run_case(dts[a], dts[b], 12, 3, 2000, mix); /* layer */
                run_case(dts[a], dts[b], 9, 9, 1500, mix);  /* tensor */
            }
    /* mixed: per-tensor groups where some conflict and some do not */
    run_case(SH_DT_F32, SH_DT_F32, 40, 40, 500, 0.0);
}

static void test_threads(void) {
    /* large enough to be cut into parts: correct with 1, 2 and 4 threads */
    for (int threads = 1; threads <= 4; threads *= 2) {
        CHECK_INT(sh_pool_set_size(threads), 0);
        run_case(SH_DT_F32, SH_DT_F32, 5, 1, 400000, -0.4);
        run_case(SH_DT_BF16, SH_DT_F32, 6, 2, 300000, -0.4);
    }
    /* and the same bits whatever the number of threads: the parts depend on the sizes alone */
    enum { N = 3, LEN = 700001 };
    float *g[N], *s[N], *ref[N];
    sh_sg_tensor t[N];
    for (int i = 0; i < N; i++) {
        g[i] = malloc(LEN * sizeof(float));
        s[i] = malloc(LEN * sizeof(float));
        ref[i] = malloc(LEN * sizeof(float));
        for (size_t k = 0; k < LEN; k++) {
            g[i][k] = (float)urand();
            s[i][k] = (float)(0.5 * urand() - 0.3 * g[i][k]);
        }
        memcpy(ref[i], g[i], LEN * sizeof(float));
        t[i] = (sh_sg_tensor){g[i], s[i], LEN, SH_DT_F32, SH_DT_F32, 0};
    }
    double d1[3], dn[3], c1[1], cn[1], cos1[1], cosn[1];
    CHECK_INT(sh_pool_set_size(1), 0);
    CHECK_INT(sh_sg_project(t, N, 1, 0.0, d1, c1, cos1), 1);
    float *one[N];
    for (int i = 0; i < N; i++) {
        one[i] = malloc(LEN * sizeof(float));
        memcpy(one[i], g[i], LEN * sizeof(float));
        memcpy(g[i], ref[i], LEN * sizeof(float));
    }
    for (int threads = 2; threads <= 3; threads++) {
        CHECK_INT(sh_pool_set_size(threads), 0);
        for (int rep = 0; rep < 20; rep++) { /* many rounds: a worker waking late must not matter */
            for (int i = 0; i < N; i++)
                memcpy(g[i], ref[i], LEN * sizeof(float));
            CHECK_INT(sh_sg_project(t, N, 1, 0.0, dn, cn, cosn), 1);
            CHECK(memcmp(d1, dn, sizeof d1) == 0);
            for (int i = 0; i < N; i++)
                if (memcmp(one[i], g[i], LEN * sizeof(float)) != 0) {
                    CHECK(memcmp(one[i], g[i], LEN * sizeof(float)) == 0);
                    rep = 20;
                    break;
                }
        }
    }
    for (int i = 0; i < N; i++) {
        free(g[i]);
        free(s[i]);
        free(ref[i]);
        free(one[i]);
    }
    CHECK_INT(sh_pool_set_size(0), 0);
}

static void test_edges(void) {
    float g[4] = {1, 2, 3, 4}, s[4] = {0, 0, 0, 0};
    sh_sg_tensor t = {g, s, 4, SH_DT_F32, SH_DT_F32, 0};
    double dots[3], coef[1], cosine[1];
    CHECK_INT(sh_sg_project(&t, 1, 1, 0.0, dots, coef, cosine), 0); /* zero safety: nothing */
    CHECK(isnan(cosine[0]));
    CHECK(g[3] == 4.0f);
    t.group = 1;
    CHECK_INT(sh_sg_project(&t, 1, 1, 0.0, dots, coef, cosine), -EINVAL);
    t.group = 0;
    t.gt = (sh_dtype)7;
    CHECK_INT(sh_sg_dots(&t, 1, 1, dots), -EINVAL);
    /* a threshold above a helpful cosine (0.707 < 0.9) adds safety, never takes it away:
     * g becomes (x, 1) with x / sqrt(x^2 + 1) = 0.9, x = 0.9 / sqrt(0.19) */
    float g2[2] = {1, 1}, s2[2] = {1, 0};
    sh_sg_tensor t2 = {g2, s2, 2, SH_DT_F32, SH_DT_F32, 0};
    CHECK_INT(sh_sg_project(&t2, 1, 1, 0.9, dots, coef, cosine), 1);
    CHECK_NEAR(g2[0], 0.9 / sqrt(0.19), 1e-6);
    CHECK_NEAR(g2[1], 1.0, 1e-7);
}

/* The threshold moves the cosine to exactly t (double reference), keeps the part of g
 * orthogonal to s, and is monotone: a higher t leaves at least as much of s in g. */
static void test_threshold(void) {
    static const double ts[] = {-0.6, -0.2, 0.0, 0.2, 0.5, 0.95};
    double prev_along = -INFINITY;
    for (size_t k = 0; k < sizeof ts / sizeof ts[0]; k++) {
        enum { N = 3000 };
        static float g[N], s[N];
        double g0[N];
        rng = 4242;
        for (size_t i = 0; i < N; i++) {
            s[i] = (float)urand();
            g[i] = (float)(urand() - 0.8 * s[i]); /* conflicting: cosine about -0.8 */
            g0[i] = g[i];
        }
        sh_sg_tensor t = {g, s, N, SH_DT_F32, SH_DT_F32, 0};
        double dots[3], coef[1], cosine[1];
        CHECK_INT(sh_sg_project(&t, 1, 1, ts[k], dots, coef, cosine), 1);
        double gs = 0, ss = 0, gg = 0, r_err = 0, along = 0;
        for (size_t i = 0; i < N; i++) {
            gs += (double)g[i] * s[i];
            ss += (double)s[i] * s[i];
            gg += (double)g[i] * g[i];
        }
        along = gs / ss;
        /* the orthogonal part is untouched: g - g0 is a multiple of s */
        double d = (g[0] - g0[0]) / s[0];
        for (size_t i = 0; i < N; i++)
            r_err = fmax(r_err, fabs((g[i] - g0[i]) - d * s[i]));
        CHECK_NEAR(gs / sqrt(gg * ss), ts[k], 2e-6);
        CHECK(r_err < 1e-5);
        CHECK(along >= prev_along);
        prev_along = along;
        /* projecting again changes nothing */
        float again[N];
        memcpy(again, g, sizeof again);
        CHECK_INT(sh_sg_project(&t, 1, 1, ts[k], dots, coef, cosine), 0);
        CHECK(memcmp(again, g, sizeof again) == 0);
    }
}

static void test_conversions(void) {
    /* every non-NaN fp16 and bf16 survives a round trip; NaN stays NaN */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = sh_f16_to_f32((uint16_t)h);
        if (isnan(f))
            CHECK(isnan(sh_f16_to_f32(sh_f32_to_f16(f))));
        else if (sh_f32_to_f16(f) != h) {
            CHECK_INT(sh_f32_to_f16(f), h);
            break;
        }
        float b = sh_bf16_to_f32((uint16_t)h);
        if (isnan(b))
            CHECK(isnan(sh_bf16_to_f32(sh_f32_to_bf16(b))));
        else if (sh_f32_to_bf16(b) != h) {
            CHECK_INT(sh_f32_to_bf16(b), h);
            break;
        }
    }
    CHECK(sh_f16_to_f32(0x3c00) == 1.0f);
    CHECK(sh_f16_to_f32(0x0001) == 0x1p-24f);
    CHECK(sh_f16_to_f32(0xfc00) == -INFINITY);
    CHECK_INT(sh_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);       /* tie to even: down */
    CHECK_INT(sh_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);   /* tie to even: up */
    CHECK_INT(sh_f32_to_f16(65520.0f), 0x7c00);              /* rounds to infinity */
    CHECK_INT(sh_f32_to_f16(65519.0f), 0x7bff);
    CHECK_INT(sh_f32_to_f16(0x1p-25f), 0x0000);              /* tie between 0 and 2^-24 */
    CHECK_INT(sh_f32_to_f16(0x1.8p-24f), 0x0002);            /* tie to even: up */
    CHECK_INT(sh_f32_to_f16(1e-10f), 0x0000);
    CHECK_INT(sh_f32_to_f16(-2.0f), 0xc000);
    CHECK_INT(sh_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);       /* tie to even: down */
    CHECK_INT(sh_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
    CHECK_INT(sh_f32_to_bf16(INFINITY), 0x7f80);
}

/* Every conversion path gives the same bits: the dots and the updated gradient of a projection
 * over bf16 and fp16 data (g and s each in either dtype, lengths that leave vector tails). */
static void test_paths_same_bits(void) {
    sh_dtype dts[2] = {SH_DT_BF16, SH_DT_F16};
    enum { NT = 3 };
    size_t len[NT] = {5000, 1023, 77};
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            uint16_t *g0[NT], *s[NT], *g[NT], *ref[NT];
            sh_sg_tensor t[NT];
            for (int i = 0; i < NT; i++) {
                g0[i] = malloc(len[i] * 2);
                s[i] = malloc(len[i] * 2);
                g[i] = malloc(len[i] * 2);
                ref[i] = malloc(len[i] * 2);
                for (size_t k = 0; k < len[i]; k++) {
                    double gv = urand();
                    put(g0[i], dts[a], k, gv * 1e-3); /* fp16 subnormals among them */
                    put(s[i], dts[b], k, (0.3 * urand() - 0.6 * gv) * 1e-3);
                }
                t[i] = (sh_sg_tensor){g[i], s[i], len[i], dts[a], dts[b], (size_t)i % 2};
            }
            double dref[6], cref[2], d[6], c[2];
            int first = 1;
            for (int p = SH_CVT_SCALAR; p <= SH_CVT_AVX2_F16C; p++) {
                if (sh_cvt_set_path((sh_cvt_path)p) != 0)
                    continue;
                for (int i = 0; i < NT; i++)
                    memcpy(g[i], g0[i], len[i] * 2);
                CHECK_INT(sh_sg_project(t, NT, 2, 0.0, d, c, NULL), 2);
                if (first) {
                    memcpy(dref, d, sizeof d);
                    memcpy(cref, c, sizeof c);
                    for (int i = 0; i < NT; i++)
                        memcpy(ref[i], g[i], len[i] * 2);
                    first = 0;
                    continue;
                }
                if (memcmp(d, dref, sizeof d) != 0 || memcmp(c, cref, sizeof c) != 0) {
                    fprintf(stderr, "path %s: dots differ from scalar (dtypes %d/%d)\n",
                            sh_cvt_path_name((sh_cvt_path)p), dts[a], dts[b]);
                    CHECK(0);
                }
                for (int i = 0; i < NT; i++)
                    if (memcmp(g[i], ref[i], len[i] * 2) != 0) {
                        fprintf(stderr, "path %s: updated g differs from scalar (dtypes %d/%d)\n",
                                sh_cvt_path_name((sh_cvt_path)p), dts[a], dts[b]);
                        CHECK(0);
                    }
            }
            for (int i = 0; i < NT; i++) {
                free(g0[i]);
                free(s[i]);
                free(g[i]);
                free(ref[i]);
            }
        }
    CHECK_INT(sh_cvt_set_path(SH_CVT_BEST), 0);
}

int main(void) {
    test_conversions();
    test_paths_same_bits();
    test_edges();
    test_threshold();
    test_reference();
    test_threads();
    CHECK_DONE();
}
