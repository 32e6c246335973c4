/* Retry delays: exponential backoff with jitter, and the small seedable RNG that
 * drives it. Pure: the caller owns the RNG state and passes every input in. */
#ifndef STURDY_BACKOFF_H
#define STURDY_BACKOFF_H

#include <stdint.h>

/* splitmix64: one word of state, any seed (0 included) is fine, and a fixed seed
 * replays the same delays, which is what tests and simulations need. */
typedef struct st_rng { uint64_t s; } st_rng;

void     st_rng_seed(st_rng *r, uint64_t seed);
uint64_t st_rng_next(st_rng *r);
double   st_rng_unit(st_rng *r);                         /* uniform in [0,1), 53 bits */

typedef enum { ST_JITTER_FULL = 0, ST_JITTER_EQUAL, ST_JITTER_DECORRELATED, ST_JITTER_NONE } st_jitter;

int st_jitter_parse(const char *name, st_jitter *out);   /* "full","equal","decorrelated","none" -> 1, else 0 */
const char *st_jitter_name(st_jitter j);                 /* "unknown" for a value outside the enum */

/* Delay in ms before retry number `retry` (1 = first retry after the first failed
 * attempt; 0 is treated as 1).
 *   exp = min(cap, base * 2^(retry-1)), without overflow for any retry.
 *   FULL:  uniform [0, exp)
 *   EQUAL: exp/2 + uniform [0, exp/2)
 *   NONE:  exp
 *   DECORRELATED (AWS): min(cap, uniform [base, prev*3)), prev = the delay this
 *     function returned for the previous retry of the same call; pass 0 for the
 *     first retry (a prev below base counts as base). `retry` is not used.
 * Expects base_ms > 0 and cap_ms >= base_ms; otherwise base is cut to cap, and a
 * non-positive or NaN base or cap gives 0. The result is always in [0, cap_ms].
 * rng may be NULL only for ST_JITTER_NONE. */
double st_backoff_delay(st_jitter mode, double base_ms, double cap_ms, unsigned retry,
                        double prev_ms, st_rng *rng);

#endif
