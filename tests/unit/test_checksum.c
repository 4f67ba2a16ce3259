/* The checksum of frozen tensors: stable for equal bytes, changed by any single-bit flip, by
 * swapped words, by length, and independent of the buffer's alignment. */
#include <stdint.h>

#include "check.h"
#include "checksum.h"

int main(void) {
    enum { N = 1000 };
    unsigned char buf[N + 8], copy[N + 8];
    uint64_t x = 12345;
    for (int i = 0; i < N + 8; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        buf[i] = (unsigned char)(x >> 56);
    }
    uint64_t h = sh_checksum(buf, N);
    CHECK(h == sh_checksum(buf, N));
    CHECK(sh_checksum(buf, N) != sh_checksum(buf, N - 1));
    CHECK(sh_checksum(NULL, 0) == sh_checksum(buf, 0));

    /* every single-bit flip anywhere (block part and tail) changes the sum */
    int missed = 0;
    for (int i = 0; i < N; i++)
        for (int b = 0; b < 8; b++) {
            buf[i] ^= (unsigned char)(1u << b);
            if (sh_checksum(buf, N) == h)
                missed++;
            buf[i] ^= (unsigned char)(1u << b);
        }
    CHECK_INT(missed, 0);
    CHECK(sh_checksum(buf, N) == h);

    /* swapping two 8-byte words in one lane, or across lanes, changes it */
    memcpy(copy, buf, N);
    uint64_t a, b;
    memcpy(&a, copy, 8);
    memcpy(&b, copy + 32, 8);
    memcpy(copy, &b, 8);
    memcpy(copy + 32, &a, 8);
    CHECK(sh_checksum(copy, N) != h);
    memcpy(copy, buf, N);
    memcpy(&a, copy, 8);
    memcpy(&b, copy + 8, 8);
    memcpy(copy, &b, 8);
    memcpy(copy + 8, &a, 8);
    CHECK(sh_checksum(copy, N) != h);

    /* all-zero buffers of different lengths differ (a zeroed weight is a change) */
    unsigned char zeros[64] = {0};
    CHECK(sh_checksum(zeros, 32) != sh_checksum(zeros, 64));

    /* the same bytes at an odd address give the same sum */
    memmove(copy + 3, buf, N);
    CHECK(sh_checksum(copy + 3, N) == h);
    CHECK_DONE();
}
