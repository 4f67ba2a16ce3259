/* The fp16/bf16 conversions against references computed here in double precision: every fp16
 * and bf16 value read, fp32 values around every fp16 value written (ties, neighbours, overflow,
 * subnormals, NaN), on every path this CPU has, with flush-to-zero and denormals-are-zero off and
 * on (what torch.set_flush_denormal(True) sets). The paths must agree bit for bit. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "convert.h"

#if defined(__x86_64__)
#include <xmmintrin.h>
static void set_ftz(int on) { _mm_setcsr(on ? (_mm_getcsr() | 0x8040u) : (_mm_getcsr() & ~0x8040u)); }
static int ftz_works(void) { /* a subnormal times 1 is 0 under FTZ/DAZ */
    volatile float tiny = 0x1p-140f, one = 1.0f;
    return tiny * one == 0.0f;
}
#else
static void set_ftz(int on) { (void)on; }
static int ftz_works(void) { return 1; }
#endif

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The value of fp16 H in double, from its definition; NaN: quiet, payload kept (what torch's
 * conversion and F16C give). */
static uint32_t ref_f16_in(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f)
        return sign | 0x7f800000u | (m ? 0x400000u | ((uint32_t)m << 13) : 0);
    double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
    return sign | fbits((float)v);
}

static double f16_value[65536]; /* ref value of each fp16, NaN as NaN */

/* The fp16 nearest to F, ties to the even encoding, by search over the fp16 values (finite
 * magnitudes sorted by encoding); 65520 and above give infinity. */
static uint16_t ref_f16_out(float f) {
    uint32_t u = fbits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (isnan(f))
        return (uint16_t)(sign | 0x7e00u | (((u & 0x7fffffffu) >> 13) & 0x3ffu));
    double a = fabs((double)f);
    if (a >= 65520.0)
        return (uint16_t)(sign | 0x7c00u);
    int lo = 0, hi = 0x7bff; /* largest encoding with value <= a */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (f16_value[mid] <= a)
            lo = mid;
        else
            hi = mid - 1;
    }
    int best = lo;
    if (lo < 0x7bff) {
        double dl = a - f16_value[lo], dh = f16_value[lo + 1] - a;
        if (dh < dl || (dh == dl && (lo & 1)))
            best = lo + 1;
    }
    return (uint16_t)(sign | best);
}

/* bf16: reading is the top half; writing rounds the low half to nearest even, NaN made quiet. */
static uint16_t ref_bf16_out(float f) {
    uint32_t u = fbits(f);
    if (isnan(f))
        return (uint16_t)((u >> 16) | 0x40);
    double v = f, lo = bitsf(u & 0xffff0000u);
    uint32_t up = (u & 0xffff0000u) + 0x10000u; /* the next bf16 away from zero */
    /* past the largest bf16 the next step is 2^128, encoded as infinity */
    double hi = (up & 0x7fffffffu) == 0x7f800000u ? copysign(0x1p128, v) : bitsf(up);
    double dl = fabs(v - lo), dh = fabs(hi - v);
    int take_hi = dh < dl || (dh == dl && ((u >> 16) & 1));
    return (uint16_t)(take_hi ? up >> 16 : u >> 16);
}

/* Inputs for the writers: every fp16 value, each midpoint to the next, a float either side of
 * each, fp32 subnormals, large values, infinities, NaNs with and without payload. */
static size_t make_inputs(float *in) {
    size_t n = 0;
    for (uint32_t h = 0; h < 0x7c00; h++) {
        double v = f16_value[h];
        float fv = (float)v;
        float mid = (float)((v + f16_value[h + 1]) / 2); /* exact: 12 significant bits */
        float row[5] = {fv, mid, nextafterf(mid, 0), nextafterf(mid, INFINITY), nextafterf(fv, INFINITY)};
        for (int k = 0; k < 5; k++) {
            in[n++] = row[k];
            in[n++] = -row[k];
        }
    }
    float extra[] = {0x1p-149f, 0x1p-130f, 0x1.fffffcp-127f, 0x1p-126f, 65504.0f, 65519.99f, 65520.0f,
                     1e30f,    INFINITY,  -INFINITY,       bitsf(0x7f800001u), bitsf(0x7fa00000u),
                     bitsf(0xffc12345u), bitsf(0x7f7fffffu), bitsf(0x7f7f8000u), bitsf(0x7f7f7fffu)};
    for (size_t k = 0; k < sizeof extra / sizeof *extra; k++)
        in[n++] = extra[k];
    uint64_t x = 88172645463325252ull; /* and random bit patterns */
    for (int k = 0; k < 100000; k++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        in[n++] = bitsf((uint32_t)x);
    }
    return n;
}

#define NIN (0x7c00 * 10 + 16 + 100000)
static float in[NIN];
static uint16_t want16[NIN], wantb16[NIN], got16[NIN];
static uint32_t want_in[65536];
static float got_in[65536];
static uint16_t all16[65536];

static void check_path(sh_cvt_path path, size_t n, const char *mode) {
    /* the blocks, with a length that leaves a tail for the scalar remainder */
    size_t len = n - 5;
    sh_cvt.f16_in(all16, got_in, 65536);
    for (uint32_t h = 0; h < 65536; h++)
        if (fbits(got_in[h]) != want_in[h]) {
            fprintf(stderr, "%s, %s: fp16 %#06x read as %#010x\n", sh_cvt_path_name(path), mode, h, fbits(got_in[h]));
            CHECK_INT(fbits(got_in[h]), want_in[h]);
            break;
        }
    sh_cvt.bf16_in(all16, got_in, 65536);
    for (uint32_t h = 0; h < 65536; h++)
        if (fbits(got_in[h]) != h << 16) {
            CHECK_INT(fbits(got_in[h]), h << 16);
            break;
        }
    sh_cvt.f16_out(in, got16, len);
    for (size_t i = 0; i < len; i++)
        if (got16[i] != want16[i]) {
            fprintf(stderr, "%s, %s: %a (%#010x) written as fp16 %#06x\n", sh_cvt_path_name(path), mode, in[i],
                    fbits(in[i]), got16[i]);
            CHECK_INT(got16[i], want16[i]);
            break;
        }
    sh_cvt.bf16_out(in, got16, len);
    for (size_t i = 0; i < len; i++)
        if (got16[i] != wantb16[i]) {
            fprintf(stderr, "%s, %s: %a (%#010x) written as bf16 %#06x\n", sh_cvt_path_name(path), mode, in[i],
                    fbits(in[i]), got16[i]);
            CHECK_INT(got16[i], wantb16[i]);
            break;
        }
    /* the elementwise functions too */
    for (uint32_t h = 0; h < 65536; h++)
        if (fbits(sh_f16_to_f32((uint16_t)h)) != want_in[h]) {
            CHECK_INT(fbits(sh_f16_to_f32((uint16_t)h)), want_in[h]);
            break;
        }
    for (size_t i = 0; i < len; i++)
        if (sh_f32_to_f16(in[i]) != want16[i] || sh_f32_to_bf16(in[i]) != wantb16[i]) {
            CHECK_INT(sh_f32_to_f16(in[i]), want16[i]);
            CHECK_INT(sh_f32_to_bf16(in[i]), wantb16[i]);
            break;
        }
}

int main(void) {
    set_ftz(0);
    for (uint32_t h = 0; h < 65536; h++) {
        all16[h] = (uint16_t)h;
        want_in[h] = ref_f16_in((uint16_t)h);
    }
    for (uint32_t h = 0; h < 0x7c00; h++)
        f16_value[h] = bitsf(want_in[h]);
    size_t n = make_inputs(in);
    CHECK_INT(n, NIN);
    for (size_t i = 0; i < n; i++) {
        want16[i] = ref_f16_out(in[i]);
        wantb16[i] = ref_bf16_out(in[i]);
    }
    /* spot checks of the references themselves */
    CHECK_INT(want_in[0x0001], 0x33800000);  /* 2^-24 */
    CHECK_INT(want_in[0x03ff], 0x387fc000);  /* largest subnormal */
    CHECK_INT(want_in[0x7c01], 0x7fc02000);  /* NaN made quiet, payload kept (torch's bits) */
    CHECK_INT(ref_f16_out(0x1p-25f), 0);     /* tie between 0 and 2^-24: even */
    CHECK_INT(ref_f16_out(0x1.8p-24f), 2);   /* tie: up to even */
    CHECK_INT(ref_f16_out(65519.0f), 0x7bff);
    CHECK_INT(ref_bf16_out(1.0f + 0x1p-8f), 0x3f80);
    CHECK_INT(ref_bf16_out(bitsf(0x7f7f8000u)), 0x7f80); /* tie above the largest bf16: infinity */

    int tried = 0;
    for (int p = SH_CVT_SCALAR; p <= SH_CVT_AVX2_F16C; p++) {
        int r = sh_cvt_set_path((sh_cvt_path)p);
        if (r == -ENOTSUP) {
            printf("path %s: not on this CPU\n", sh_cvt_path_name((sh_cvt_path)p));
            continue;
        }
        CHECK_INT(r, 0);
        CHECK_INT(sh_cvt.path, p);
        tried++;
        set_ftz(0);
        check_path((sh_cvt_path)p, n, "FTZ/DAZ off");
        set_ftz(1);
        CHECK(ftz_works());
        check_path((sh_cvt_path)p, n, "FTZ/DAZ on");
        set_ftz(0);
    }
    CHECK(tried >= 1);
    CHECK_INT(sh_cvt_set_path((sh_cvt_path)7), -EINVAL);
    CHECK_INT(sh_cvt_set_path(SH_CVT_BEST), 0);
    printf("paths tried: %d, best: %s\n", tried, sh_cvt_path_name(sh_cvt.path));
    CHECK_DONE();
}
