/* SHA-256 (FIPS 180-4), for the digest of the normalized policy. */
#ifndef SH_SHA256_H
#define SH_SHA256_H

#include <stddef.h>

/* Write the SHA-256 of the LEN bytes at DATA as 64 lowercase hex digits and a NUL into HEX. */
void sh_sha256_hex(const void *data, size_t len, char hex[65]);

#endif
