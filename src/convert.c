/* fp16 and bf16 conversions (see convert.h): the scalar reference, the AVX2 and F16C block
 * paths, and the choice between them at load time. */
#include "convert.h"

#include <errno.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define SH_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static inline float bits_f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---- scalar ---- */

static inline float bf16_in(uint16_t h) { return bits_f((uint32_t)h << 16); }

static inline uint16_t bf16_out(float f) {
    uint32_t u = f_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it NaN, quiet */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Exponent and mantissa moved into place and the exponent rebiased; a subnormal is normalized
 * by counting its leading zeros, since fp32 has room for every fp16 subnormal as a normal. */
static inline float f16_in(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0x1f) {
        u = 0x7f800000u | (m << 13) | (m ? 0x400000u : 0); /* inf, or NaN made quiet */
    } else if (e) {
        u = ((e + 112) << 23) | (m << 13);
    } else if (m) {
        int shift = __builtin_clz(m) - 21; /* brings the leading 1 to bit 10 */
        u = ((uint32_t)(113 - shift) << 23) | (((m << shift) & 0x3ffu) << 13);
    } else {
        u = 0;
    }
    return bits_f(u | sign);
}

static inline uint16_t f16_out(float f) {
    uint32_t u = f_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: quiet, the top of the payload kept (as F16C does) */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* 65520 and above round to infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) { /* an fp16 normal: rebias the exponent (-112 << 23), round */
        a += 0xc8000fffu + ((a >> 13) & 1u);
        return (uint16_t)(sign | (a >> 13));
    }
    if (a <= 0x33000000u) /* 2^-25 and below: zero (2^-25 is a tie, to the even 0) */
        return (uint16_t)sign;
    /* an fp16 subnormal: the 24-bit significand shifted down to units of 2^-24, rounded */
    uint32_t shift = 126 - (a >> 23), m = (a & 0x7fffffu) | 0x800000u;
    uint32_t r = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    r += rest > half || (rest == half && (r & 1u));
    return (uint16_t)(sign | r);
}

float sh_bf16_to_f32(unsigned short h) { return bf16_in(h); }
unsigned short sh_f32_to_bf16(float f) { return bf16_out(f); }
float sh_f16_to_f32(unsigned short h) { return f16_in(h); }
unsigned short sh_f32_to_f16(float f) { return f16_out(f); }

static void bf16_in_scalar(const uint16_t *in, float *out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = bf16_in(in[i]);
}

static void bf16_out_scalar(const float *in, uint16_t *out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = bf16_out(in[i]);
}

static void f16_in_scalar(const uint16_t *in, float *out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = f16_in(in[i]);
}

static void f16_out_scalar(const float *in, uint16_t *out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = f16_out(in[i]);
}

/* ---- AVX2 and F16C ---- */

#ifdef SH_X86
#define AVX2 __attribute__((target("avx2")))
#define F16C __attribute__((target("avx2,f16c")))

AVX2 static void bf16_in_avx2(const uint16_t *in, float *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(in + i)));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_slli_epi32(w, 16));
    }
    bf16_in_scalar(in + i, out + i, n - i);
}

/* As bf16_out: NaN lanes take u | quiet bit, the others u + 0x7fff + lsb, then the top halves. */
AVX2 static void bf16_out_avx2(const float *in, uint16_t *out, size_t n) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i quiet = _mm256_set1_epi32(0x400000);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(in + i));
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, lsb));
        r = _mm256_blendv_epi8(r, _mm256_or_si256(u, quiet), nan);
        r = _mm256_srli_epi32(r, 16);
        /* pack within each 128-bit lane, then bring the two lanes' halves together */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_castsi256_si128(p));
    }
    bf16_out_scalar(in + i, out + i, n - i);
}

F16C static void f16_in_f16c(const uint16_t *in, float *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    f16_in_scalar(in + i, out + i, n - i);
}

F16C static void f16_out_f16c(const float *in, uint16_t *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
    f16_out_scalar(in + i, out + i, n - i);
}

static int cpu_has(sh_cvt_path p) {
    __builtin_cpu_init();
    if (p == SH_CVT_AVX2)
        return __builtin_cpu_supports("avx2");
    /* F16C from CPUID itself (clang's __builtin_cpu_supports does not know it); AVX2's check
     * above covers the OS saving the YMM registers */
    unsigned a, b, c, d;
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#else
static int cpu_has(sh_cvt_path p) { return p == SH_CVT_SCALAR; }
#endif

/* Scalar until the constructor below runs: correct from the first instruction. */
sh_cvt_ops sh_cvt = {bf16_in_scalar, bf16_out_scalar, f16_in_scalar, f16_out_scalar, SH_CVT_SCALAR};

int sh_cvt_set_path(sh_cvt_path path) {
    if (path == SH_CVT_BEST)
        path = cpu_has(SH_CVT_AVX2_F16C) ? SH_CVT_AVX2_F16C : cpu_has(SH_CVT_AVX2) ? SH_CVT_AVX2 : SH_CVT_SCALAR;
    if (path < SH_CVT_SCALAR || path > SH_CVT_AVX2_F16C)
        return -EINVAL;
    if (path != SH_CVT_SCALAR && !cpu_has(path))
        return -ENOTSUP;
    sh_cvt_ops o = {bf16_in_scalar, bf16_out_scalar, f16_in_scalar, f16_out_scalar, path};
#ifdef SH_X86
    if (path >= SH_CVT_AVX2) {
        o.bf16_in = bf16_in_avx2;
        o.bf16_out = bf16_out_avx2;
    }
    if (path == SH_CVT_AVX2_F16C) {
        o.f16_in = f16_in_f16c;
        o.f16_out = f16_out_f16c;
    }
#endif
    sh_cvt = o;
    return 0;
}

const char *sh_cvt_path_name(sh_cvt_path path) {
    switch (path) {
    case SH_CVT_SCALAR:
        return "scalar";
    case SH_CVT_AVX2:
        return "avx2";
    case SH_CVT_AVX2_F16C:
        return "avx2+f16c";
    default:
        return "?";
    }
}

__attribute__((constructor)) static void pick_path(void) { sh_cvt_set_path(SH_CVT_BEST); }
