/* "Did you mean": the closest of a few candidate words to a misspelt one. */
#ifndef SH_SUGGEST_H
#define SH_SUGGEST_H

#include <stddef.h>

/* Edit distance between A and B (optimal string alignment: insertions, deletions,
 * substitutions and transpositions of neighbours each cost 1; ASCII case differences cost 0).
 * Words longer than 64 bytes are compared on their first 64 bytes. */
int sh_edit_distance(const char *a, const char *b);

/* The candidate closest to WORD among the N strings of CANDIDATES when it is close enough to
 * be a likely misspelling (distance <= 1 for words up to 4 bytes, <= 2 up to 8, <= 3 beyond),
 * else NULL. Returns a pointer into CANDIDATES; ties go to the earlier candidate. */
const char *sh_suggest(const char *word, const char *const *candidates, size_t n);

#endif
