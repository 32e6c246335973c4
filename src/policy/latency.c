#include "latency.h"

#include <stdlib.h>
#include <string.h>

/* HdrHistogram layout for unit 1 and 1024 sub-buckets: index (b + 1) * 512 + s - 512
 * for bucket b and sub-bucket s in [512, 1024) (s in [0, 1024) for b = 0). */
#define HALF_MAG 9
#define HALF (1u << HALF_MAG)                 /* 512 */
#define SUB_MASK UINT64_C(1023)
#define TOP_BUCKET 22                         /* bucket of ST_LATENCY_MAX_US */
#define NCOUNTS ((TOP_BUCKET + 2) * HALF)     /* 12288 */
#define GROUP_MAG 5                           /* 32 sub-buckets per group */
#define NGROUPS (NCOUNTS >> GROUP_MAG)        /* 384 */
#define BLOCK_MAG HALF_MAG                    /* 512 sub-buckets per block */
#define NBLOCKS (NCOUNTS >> BLOCK_MAG)        /* 24 */
#define GROUPS_PER_BLOCK (1u << (BLOCK_MAG - GROUP_MAG))

/* Per-slot totals; lo/hi bound the sub-buckets in use so expiry touches only those. */
typedef struct slot_meta {
    uint64_t count, sum, min, max;
    unsigned lo, hi;
} slot_meta;

struct st_latency {
    unsigned slots;
    int64_t slot_ms;
    int64_t head, head_start, head_end;       /* newest period and its bounds */
    unsigned head_k;
    uint32_t *head_counts;                    /* counters of slot head_k */
    slot_meta *head_meta;
    uint64_t count, sum;                      /* over the live window */
    slot_meta *meta;                          /* [slots] */
    uint64_t *grp;                            /* [NGROUPS] aggregate per group */
    uint64_t *blk;                            /* [NBLOCKS] aggregate per block */
    uint32_t *agg;                            /* [NCOUNTS] aggregate */
    uint32_t *counts;                         /* [slots][NCOUNTS] */
};

/* ---------------------------------------------------------------- bucket math */

#if defined(__GNUC__) || defined(__clang__)
static unsigned clz64(uint64_t x)             /* x != 0 */
{
    return (unsigned)__builtin_clzll(x);
}
#else
static unsigned clz64(uint64_t x)
{
    unsigned n = 0;
    while (!(x & (UINT64_C(1) << 63))) {
        x <<= 1;
        n++;
    }
    return n;
}
#endif

static unsigned index_of(uint64_t v)          /* v <= ST_LATENCY_MAX_US */
{
    unsigned bucket = 54u - clz64(v | SUB_MASK);
    return ((bucket + 1) << HALF_MAG) + (unsigned)(v >> bucket) - HALF;
}

/* The middle of a sub-bucket: at most half its width from any value in it. */
static uint64_t middle_of(unsigned idx)
{
    int bucket = (int)(idx >> HALF_MAG) - 1;
    uint64_t sub = (idx & (HALF - 1)) + HALF;
    if (bucket < 0) {
        sub -= HALF;
        bucket = 0;
    }
    return (sub << bucket) + ((UINT64_C(1) << bucket) >> 1);
}

/* ---------------------------------------------------------------- slots */

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static void meta_empty(slot_meta *m)
{
    m->count = m->sum = 0;
    m->min = UINT64_MAX;
    m->max = 0;
    m->lo = NCOUNTS;
    m->hi = 0;
}

static void set_head(st_latency *l, int64_t period)
{
    int64_t r = period % (int64_t)l->slots;
    l->head = period;
    l->head_start = period * l->slot_ms;
    l->head_end = l->head_start > INT64_MAX - l->slot_ms ? INT64_MAX : l->head_start + l->slot_ms;
    l->head_k = (unsigned)(r < 0 ? r + (int64_t)l->slots : r);
    l->head_counts = l->counts + (size_t)l->head_k * NCOUNTS;
    l->head_meta = l->meta + l->head_k;
}

static void evict(st_latency *l, unsigned k)
{
    slot_meta *m = l->meta + k;
    uint32_t *c = l->counts + (size_t)k * NCOUNTS;
    unsigned i;

    if (m->count == 0)
        return;
    for (i = m->lo; i <= m->hi; i++) {
        uint32_t n = c[i];
        if (n) {
            l->agg[i] -= n;
            l->grp[i >> GROUP_MAG] -= n;
            l->blk[i >> BLOCK_MAG] -= n;
            c[i] = 0;
        }
    }
    l->count -= m->count;
    l->sum -= m->sum;
    meta_empty(m);
}

static void clear_all(st_latency *l)
{
    unsigned k;
    for (k = 0; k < l->slots; k++) {
        slot_meta *m = l->meta + k;
        if (m->count)
            memset(l->counts + (size_t)k * NCOUNTS + m->lo, 0, (size_t)(m->hi - m->lo + 1) * sizeof(uint32_t));
        meta_empty(m);
    }
    memset(l->agg, 0, NCOUNTS * sizeof *l->agg);
    memset(l->grp, 0, NGROUPS * sizeof *l->grp);
    memset(l->blk, 0, NBLOCKS * sizeof *l->blk);
    l->count = l->sum = 0;
}

/* Bring the ring up to now; afterwards head_* describe the slot for now. A time
 * from the past lands in the head slot. */
static void advance(st_latency *l, int64_t now_ms)
{
    int64_t period;
    uint64_t gap;
    unsigned k;

    if (now_ms < l->head_end)
        return;
    period = floor_div(now_ms, l->slot_ms);
    if (period <= l->head)
        return;
    gap = (uint64_t)period - (uint64_t)l->head;
    if (gap >= l->slots) {
        clear_all(l);
    } else {
        for (k = l->head_k; gap > 0; gap--) {
            k = k + 1 == l->slots ? 0 : k + 1;
            evict(l, k);
        }
    }
    set_head(l, period);
}

/* ---------------------------------------------------------------- public */

/* Sizes rounded up to 8 so every array in the one block stays aligned. */
#define ALIGN8(n) (((n) + 7) & ~(size_t)7)

size_t st_latency_bytes(unsigned slots)
{
    return ALIGN8(sizeof(st_latency)) + ALIGN8(slots * sizeof(slot_meta))
         + NGROUPS * sizeof(uint64_t) + NBLOCKS * sizeof(uint64_t)
         + ((size_t)slots + 1) * NCOUNTS * sizeof(uint32_t);
}

st_latency *st_latency_new(unsigned slots, int64_t slot_ms, int64_t now_ms)
{
    st_latency *l;
    char *p;
    unsigned k;

    if (slots == 0 || slots > ST_LATENCY_MAX_SLOTS || slot_ms < 1)
        return NULL;
    p = calloc(1, st_latency_bytes(slots));
    if (p == NULL)
        return NULL;
    l = (st_latency *)(void *)p;
    p += ALIGN8(sizeof(st_latency));
    l->meta = (slot_meta *)(void *)p;
    p += ALIGN8(slots * sizeof(slot_meta));
    l->grp = (uint64_t *)(void *)p;
    p += NGROUPS * sizeof(uint64_t);
    l->blk = (uint64_t *)(void *)p;
    p += NBLOCKS * sizeof(uint64_t);
    l->agg = (uint32_t *)(void *)p;
    p += NCOUNTS * sizeof(uint32_t);
    l->counts = (uint32_t *)(void *)p;

    l->slots = slots;
    l->slot_ms = slot_ms;
    for (k = 0; k < slots; k++)
        meta_empty(l->meta + k);
    /* the lowest clock values have no representable slot start; they are
     * "long ago" anyway, and this keeps period * slot_ms in range */
    if (now_ms < INT64_MIN + slot_ms)
        now_ms = INT64_MIN + slot_ms;
    set_head(l, floor_div(now_ms, slot_ms));
    return l;
}

void st_latency_free(st_latency *l)
{
    free(l);
}

void st_latency_record(st_latency *l, int64_t now_ms, uint64_t value_us)
{
    slot_meta *m;
    uint32_t *c;
    unsigned i;

    advance(l, now_ms);
    if (value_us > ST_LATENCY_MAX_US)
        value_us = ST_LATENCY_MAX_US;
    i = index_of(value_us);
    c = l->head_counts + i;
    if (*c == UINT32_MAX || l->agg[i] == UINT32_MAX)
        return;
    (*c)++;
    l->agg[i]++;
    l->grp[i >> GROUP_MAG]++;
    l->blk[i >> BLOCK_MAG]++;
    m = l->head_meta;
    m->count++;
    m->sum += value_us;
    /* the index grows with the value, so lo/hi move with min/max */
    if (value_us < m->min) {
        m->min = value_us;
        m->lo = i;
    }
    if (value_us > m->max) {
        m->max = value_us;
        m->hi = i;
    }
    l->count++;
    l->sum += value_us;
}

/* Rank of q among n samples, 1-based: ceil(q * n), snapping products a hair above
 * an integer back to it. */
static uint64_t rank_of(double q, uint64_t n)
{
    double x;
    uint64_t r;

    if (!(q > 0))
        return 1;
    if (q >= 1)
        return n;
    x = q * (double)n;
    r = (uint64_t)x;
    if (x - (double)r > x * 1e-12)
        r++;
    return r < 1 ? 1 : r > n ? n : r;
}

uint64_t st_latency_query(st_latency *l, int64_t now_ms, const double *qs, size_t nq,
                          uint64_t *out_us, st_latency_summary *sum)
{
    uint64_t n, lo = UINT64_MAX, hi = 0, prev = 0;
    /* cursor: block b, group g, sub-bucket i, each with the count of everything before it */
    unsigned b = 0, g = 0, i = 0, k;
    uint64_t cum_b = 0, cum_g = 0, cum_i = 0;
    size_t j;

    advance(l, now_ms);
    n = l->count;
    if (n == 0) {
        if (sum)
            memset(sum, 0, sizeof *sum);
        return 0;
    }
    for (k = 0; k < l->slots; k++) {
        const slot_meta *m = l->meta + k;
        if (m->count) {
            if (m->min < lo) lo = m->min;
            if (m->max > hi) hi = m->max;
        }
    }
    if (sum) {
        sum->count = n;
        sum->min_us = lo;
        sum->max_us = hi;
        sum->mean_us = (double)l->sum / (double)n;
    }

    for (j = 0; j < nq; j++) {
        uint64_t r = rank_of(qs[j], n), v;
        if (r < prev) {                       /* out of order: walk again from the start */
            b = g = i = 0;
            cum_b = cum_g = cum_i = 0;
        }
        prev = r;
        if (r == 1 || r == n) {
            out_us[j] = r == 1 ? lo : hi;
            continue;
        }
        if (cum_b + l->blk[b] < r) {
            do
                cum_b += l->blk[b++];
            while (cum_b + l->blk[b] < r);
            g = b * GROUPS_PER_BLOCK;
            cum_g = cum_b;
            i = g << GROUP_MAG;
            cum_i = cum_g;
        }
        if (cum_g + l->grp[g] < r) {
            do
                cum_g += l->grp[g++];
            while (cum_g + l->grp[g] < r);
            i = g << GROUP_MAG;
            cum_i = cum_g;
        }
        while (cum_i + l->agg[i] < r)
            cum_i += l->agg[i++];
        v = middle_of(i);
        out_us[j] = v < lo ? lo : v > hi ? hi : v;
    }
    return n;
}
