#include "counts.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct st_counts {
    unsigned slots, n;
    int64_t slot_ms;
    int64_t latest;        /* the latest time seen */
    int64_t *period;       /* the period each slot holds; INT64_MIN = none */
    double *values;        /* slots * n */
};

size_t st_counts_bytes(unsigned slots, unsigned n)
{
    return sizeof(st_counts) + (size_t)slots * sizeof(int64_t) + (size_t)slots * n * sizeof(double);
}

/* floor(t / w) for any sign of t (w >= 1) */
static int64_t period_of(int64_t t, int64_t w)
{
    int64_t q = t / w;
    return (t % w != 0 && t < 0) ? q - 1 : q;
}

static int64_t seen(st_counts *c, int64_t now_ms)
{
    if (now_ms > c->latest)
        c->latest = now_ms;
    return c->latest;
}

st_counts *st_counts_new(unsigned slots, int64_t slot_ms, unsigned n, int64_t now_ms)
{
    st_counts *c;
    unsigned i;

    if (slots == 0 || slots > ST_COUNTS_MAX_SLOTS || n == 0 || n > ST_COUNTS_MAX_N || slot_ms < 1)
        return NULL;
    c = malloc(st_counts_bytes(slots, n));
    if (c == NULL)
        return NULL;
    c->slots = slots;
    c->n = n;
    c->slot_ms = slot_ms;
    c->latest = now_ms;
    c->period = (int64_t *)(c + 1);
    c->values = (double *)(c->period + slots);
    for (i = 0; i < slots; i++)
        c->period[i] = INT64_MIN;
    memset(c->values, 0, (size_t)slots * n * sizeof(double));
    return c;
}

void st_counts_free(st_counts *c)
{
    free(c);
}

int st_counts_add(st_counts *c, int64_t now_ms, unsigned i, double v)
{
    int64_t p;
    unsigned k;
    double *row;

    if (i >= c->n || !isfinite(v) || v < 0)
        return 0;
    p = period_of(seen(c, now_ms), c->slot_ms);
    k = (unsigned)(((p % (int64_t)c->slots) + (int64_t)c->slots) % (int64_t)c->slots);
    row = c->values + (size_t)k * c->n;
    if (c->period[k] != p) {
        memset(row, 0, c->n * sizeof(double));
        c->period[k] = p;
    }
    row[i] += v;
    return 1;
}

void st_counts_sums(st_counts *c, int64_t now_ms, double *out)
{
    int64_t p = period_of(seen(c, now_ms), c->slot_ms);
    unsigned k, i;

    memset(out, 0, c->n * sizeof(double));
    for (k = 0; k < c->slots; k++) {
        int64_t q = c->period[k];
        const double *row = c->values + (size_t)k * c->n;
        /* live: p - slots < q <= p; the difference taken unsigned cannot overflow */
        if (q == INT64_MIN || q > p || (uint64_t)p - (uint64_t)q >= c->slots)
            continue;
        for (i = 0; i < c->n; i++)
            out[i] += row[i];
    }
}
