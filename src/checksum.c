/* The checksum kernel of the freeze integrity check: four independent 64-bit lanes over 32-byte
 * blocks (so the compiler can keep them in registers and the loop runs near memory speed), a
 * byte-wise tail, then a final avalanche that folds the lanes and the length together. */
#include "checksum.h"

#include <string.h>

#define K1 0x9e3779b97f4a7c15ULL /* odd multipliers: multiplication by them is a bijection */
#define K2 0xd6e8feb86659fd93ULL
#define K3 0xa0761d6478bd642fULL
#define K4 0xe7037ed1a0b428dbULL

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* One lane step: xor the word in, spread it with an odd multiply and a rotation. Each step is
 * a bijection of the lane for a fixed word, so two inputs that differ in one word always give
 * lanes that differ after that step. */
static inline uint64_t lane(uint64_t v, uint64_t w, uint64_t k) { return rotl((v ^ w) * k, 27) + K1; }

static inline uint64_t load64(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, sizeof w); /* unaligned-safe; compiles to one load */
    return w;
}

static inline uint64_t avalanche(uint64_t h) {
    h ^= h >> 31;
    h *= K2;
    h ^= h >> 29;
    h *= K3;
    h ^= h >> 32;
    return h;
}

uint64_t sh_checksum(const void *data, size_t len) {
    const unsigned char *p = data;
    uint64_t v1 = K1, v2 = K2, v3 = K3, v4 = K4;
    size_t n = len;
    while (n >= 32) {
        v1 = lane(v1, load64(p), K2);
        v2 = lane(v2, load64(p + 8), K3);
        v3 = lane(v3, load64(p + 16), K4);
        v4 = lane(v4, load64(p + 24), K2);
        p += 32;
        n -= 32;
    }
    uint64_t h = rotl(v1, 1) ^ rotl(v2, 7) ^ rotl(v3, 12) ^ rotl(v4, 18);
    h = avalanche(h ^ v1 * K4) + v2;
    h = avalanche(h ^ v3 * K2) + v4;
    for (; n >= 8; n -= 8, p += 8)
        h = lane(h, load64(p), K3);
    for (; n > 0; n--, p++)
        h = lane(h, *p, K4);
    return avalanche(h ^ (uint64_t)len * K1);
}
