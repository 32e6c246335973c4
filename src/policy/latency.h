/* Latency window: percentiles, count, min, max and mean of the samples recorded in
 * the last slots * slot_ms (defaults 12 * 5000 ms). Pure: time is passed in.
 *
 * Values are microseconds in a log-linear histogram with HdrHistogram's bucket math
 * (unit 1 us, 1024 sub-buckets, half of them per bucket above the first): values
 * below 1024 are exact, larger ones share a sub-bucket of width 2^k with values of
 * at least 512 * 2^k. A percentile reports the middle of its sub-bucket (clamped to
 * the window's min and max), so its error is at most half a width: <= 1/1024 (0.098%)
 * relative to the exact sample at that rank. Values above ST_LATENCY_MAX_US (2^32-1
 * us, about 71.6 minutes) are clamped to it, and counted.
 *
 * Each slot holds its own histogram; the aggregate histogram of the live window is
 * kept up to date on record and a slot is subtracted from it when it expires, lazily
 * on the next record or query. The aggregate has a two-level index (counts per block
 * of 512 sub-buckets and per group of 32) so one pass over it answers several
 * percentiles in about a hundred steps each.
 *
 * Window: the slot holding now plus the slots-1 before it, slots aligned on
 * multiples of slot_ms. A sample counts from its time until the end of the slots-th
 * slot: with 12 x 5000 ms, one recorded at t=0 (or t=4999) counts at t=59999 and is
 * gone at t=60000. Time that goes backwards is treated as the latest time seen.
 *
 * Percentile of q: the sample at rank ceil(q * count) (1-based, at least 1, at most
 * count) in sorted order; a product q * count within 1e-12 relative above an integer
 * is taken as that integer, so a q typed in decimal lands on the rank it means.
 * Rank 1 and rank count report the exact min and max.
 *
 * Memory, one allocation of st_latency_bytes(slots): 642,840 bytes (628 KiB) for
 * 12 slots, that is (slots + 1) * 48 KiB of uint32 counters plus 3.2 KiB of index
 * and 40 bytes of totals per slot.
 * Record is O(1) and allocation-free; a query is O(slots + nq * 100). A sample that
 * would overflow a 32-bit sub-bucket counter (4e9 equal samples) is dropped. */
#ifndef STURDY_LATENCY_H
#define STURDY_LATENCY_H

#include <stddef.h>
#include <stdint.h>

#define ST_LATENCY_MAX_US UINT64_C(4294967295)
#define ST_LATENCY_MAX_SLOTS 256

typedef struct st_latency st_latency;     /* opaque, allocated once */

/* NULL on OOM or bad args (slots 0 or above ST_LATENCY_MAX_SLOTS, slot_ms < 1). */
st_latency *st_latency_new(unsigned slots, int64_t slot_ms, int64_t now_ms);
void st_latency_free(st_latency *l);
/* Bytes st_latency_new allocates for that many slots. */
size_t st_latency_bytes(unsigned slots);

void st_latency_record(st_latency *l, int64_t now_ms, uint64_t value_us);

typedef struct st_latency_summary { uint64_t count, min_us, max_us; double mean_us; } st_latency_summary;
/* qs ascending in [0,1] (e.g. 0.5, 0.9, 0.95, 0.99, 0.999; out of order works, only
 * slower); fills out_us[i]. Returns the count in the window (0 = empty: out_us is
 * untouched and *sum is all zero). sum may be NULL; qs and out_us may be NULL when nq is 0. */
uint64_t st_latency_query(st_latency *l, int64_t now_ms, const double *qs, size_t nq,
                          uint64_t *out_us, st_latency_summary *sum);

#endif
