/* Checksums of raw tensor bytes, for the integrity checks of frozen weights. */
#ifndef SH_CHECKSUM_H
#define SH_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* A 64-bit checksum of the LEN bytes at DATA (DATA may be NULL when LEN is 0). Every bit of the
 * input reaches the result and the position of a byte matters (swapping two words changes it),
 * so an accidental or deliberate write to a frozen tensor is seen. Not a cryptographic hash: an
 * adversary who controls the process can forge it, and restoring from the snapshot is the real
 * defence. Reads memory only; thread-safe; about memory bandwidth on one core. */
uint64_t sh_checksum(const void *data, size_t len);

#endif
