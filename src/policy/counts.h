/* Sliding sums: n counters summed over the last slots * slot_ms, for alerts
 * (calls, successes, 429s, retries, cost in a window). Pure: time is passed in.
 *
 * Window: the slot holding now plus the slots-1 before it, slots aligned on
 * multiples of slot_ms (as latency.h). A value counts from its time until the
 * end of the slots-th slot: with 6 x 10000 ms, one added at t=0 (or t=9999)
 * counts at t=59999 and is gone at t=60000. Time that goes backwards is treated
 * as the latest time seen, so a value is never added to a slot already gone.
 *
 * Each slot remembers which period it holds and is cleared when it is reused,
 * so an add is O(1) whatever the idle gap. Sums are added up from the live
 * slots at each query, O(slots * n): nothing is subtracted, so there is no
 * drift, and fractional values (dollars) sum as exactly as doubles allow.
 *
 * Values: finite and >= 0 (counters only grow); NaN, infinities and negatives
 * are refused and leave the window as it was.
 *
 * Memory, one allocation of st_counts_bytes(slots, n): 48 + slots * (8 + 8n)
 * bytes (2.9 KiB for 60 slots of 5 counters). */
#ifndef STURDY_COUNTS_H
#define STURDY_COUNTS_H

#include <stddef.h>
#include <stdint.h>

#define ST_COUNTS_MAX_SLOTS 4096
#define ST_COUNTS_MAX_N 64

typedef struct st_counts st_counts;      /* opaque, allocated once */

/* NULL on OOM or bad args (slots or n 0 or above their maximum, slot_ms < 1). */
st_counts *st_counts_new(unsigned slots, int64_t slot_ms, unsigned n, int64_t now_ms);
void st_counts_free(st_counts *c);
size_t st_counts_bytes(unsigned slots, unsigned n);

/* Adds v to counter i (0-based) at now_ms. 1 = added, 0 = refused (i out of
 * range, v not finite or negative). */
int st_counts_add(st_counts *c, int64_t now_ms, unsigned i, double v);

/* Fills out[0..n-1] with each counter's sum over the window at now_ms. */
void st_counts_sums(st_counts *c, int64_t now_ms, double *out);

#endif
