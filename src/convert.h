/* fp16 and bf16 to and from fp32, for the SafeGrad kernel. Integer arithmetic (or the F16C
 * instructions) only: no result depends on the floating-point environment, so a host that set
 * flush-to-zero or denormals-are-zero (torch.set_flush_denormal(True)) reads fp16 subnormals
 * right. Reading gives the exact value (NaN quiet, payload kept); writing rounds to nearest even,
 * overflow in fp16 gives infinity, NaN stays NaN (quiet, the top payload bits kept).
 *
 * Blocks are converted by one of several paths: portable scalar code, AVX2 for bf16, F16C for
 * fp16. The best path the CPU has is picked when the library is loaded; every path gives the
 * same bits. */
#ifndef SH_CONVERT_H
#define SH_CONVERT_H

#include <stddef.h>
#include <stdint.h>

/* Elementwise. */
float sh_bf16_to_f32(unsigned short h);
unsigned short sh_f32_to_bf16(float f);
float sh_f16_to_f32(unsigned short h);
unsigned short sh_f32_to_f16(float f);

typedef enum {
    SH_CVT_SCALAR = 0,    /* portable C */
    SH_CVT_AVX2 = 1,      /* bf16 with AVX2; fp16 scalar */
    SH_CVT_AVX2_F16C = 2, /* bf16 with AVX2, fp16 with F16C */
    SH_CVT_BEST = -1,     /* the best this CPU has (what loading picks) */
} sh_cvt_path;

/* The block converters of the path in force: N elements from IN to OUT. */
typedef struct {
    void (*bf16_in)(const uint16_t *in, float *out, size_t n);
    void (*bf16_out)(const float *in, uint16_t *out, size_t n);
    void (*f16_in)(const uint16_t *in, float *out, size_t n);
    void (*f16_out)(const float *in, uint16_t *out, size_t n);
    sh_cvt_path path;
} sh_cvt_ops;

extern sh_cvt_ops sh_cvt;

/* Use PATH from now on (for tests and benchmarks; not while a kernel runs in another thread).
 * Returns 0, or -ENOTSUP when this CPU or build lacks it (nothing changed), -EINVAL for an
 * unknown path. */
int sh_cvt_set_path(sh_cvt_path path);

/* "scalar", "avx2" or "avx2+f16c". */
const char *sh_cvt_path_name(sh_cvt_path path);

#endif
