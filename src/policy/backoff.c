#include "backoff.h"

#include <float.h>
#include <string.h>

void st_rng_seed(st_rng *r, uint64_t seed)
{
    r->s = seed;
}

uint64_t st_rng_next(st_rng *r)
{
    uint64_t z = (r->s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

double st_rng_unit(st_rng *r)
{
    /* top 53 bits fill a double's mantissa exactly, so the result never rounds up to 1 */
    return (double)(st_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

static const char *const jitter_names[] = { "full", "equal", "decorrelated", "none" };
#define NJITTER (sizeof jitter_names / sizeof jitter_names[0])

int st_jitter_parse(const char *name, st_jitter *out)
{
    size_t i;
    if (name == NULL)
        return 0;
    for (i = 0; i < NJITTER; i++) {
        if (strcmp(name, jitter_names[i]) == 0) {
            *out = (st_jitter)i;
            return 1;
        }
    }
    return 0;
}

const char *st_jitter_name(st_jitter j)
{
    return (unsigned)j < NJITTER ? jitter_names[j] : "unknown";
}

/* min(cap, base * 2^(retry-1)) by doubling: it stops as soon as cap is reached, so
 * it runs a handful of times for sane inputs and never overflows whatever retry is. */
static double exp_delay(double base, double cap, unsigned retry)
{
    double e = base;
    unsigned k;
    for (k = 1; k < retry && e < cap; k++)
        e *= 2;
    return e < cap ? e : cap;
}

double st_backoff_delay(st_jitter mode, double base_ms, double cap_ms, unsigned retry,
                        double prev_ms, st_rng *rng)
{
    double e, d, prev, hi;

    if (!(base_ms > 0) || !(cap_ms > 0))   /* also catches NaN */
        return 0;
    if (cap_ms > DBL_MAX)
        cap_ms = DBL_MAX;
    if (base_ms > cap_ms)
        base_ms = cap_ms;

    switch (mode) {
    case ST_JITTER_NONE:
        d = exp_delay(base_ms, cap_ms, retry);
        break;
    case ST_JITTER_EQUAL:
        e = exp_delay(base_ms, cap_ms, retry);
        d = e / 2 + e / 2 * st_rng_unit(rng);
        break;
    case ST_JITTER_DECORRELATED:
        prev = prev_ms;
        if (!(prev >= base_ms))            /* first retry, or a prev from elsewhere */
            prev = base_ms;
        if (prev > cap_ms)
            prev = cap_ms;
        hi = prev * 3;
        if (hi > DBL_MAX)
            hi = DBL_MAX;
        d = base_ms + (hi - base_ms) * st_rng_unit(rng);
        if (d > hi)                        /* rounding of the sum */
            d = hi;
        break;
    case ST_JITTER_FULL:
    default:                               /* an out-of-range mode gets the default */
        e = exp_delay(base_ms, cap_ms, retry);
        d = e * st_rng_unit(rng);
        break;
    }
    if (d > cap_ms)
        d = cap_ms;
    return d < 0 ? 0 : d;
}
