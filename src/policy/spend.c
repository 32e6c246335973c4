#include "spend.h"

#include <stddef.h>
#include <string.h>

#define NONE INT64_MIN      /* slot_start of a slot that holds no period */
#define REARM 0.9           /* a warning re-arms below this share of its line */
#define TIME_MAX INT64_C(1000000000000000)

static const int64_t span_ms[ST_SPEND_SPANS] = { 3600000, 86400000 };

static int64_t clamp_amount(int64_t x)
{
    return x < 0 ? 0 : x > ST_SPEND_MAX ? ST_SPEND_MAX : x;
}

/* Both in [0, ST_SPEND_MAX]: the sum saturates there. */
static int64_t add_sat(int64_t a, int64_t b)
{
    return a > ST_SPEND_MAX - b ? ST_SPEND_MAX : a + b;
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static unsigned slot_of(int64_t period)
{
    int64_t r = period % ST_SPEND_SLOTS;
    return (unsigned)(r < 0 ? r + ST_SPEND_SLOTS : r);
}

static void clear(st_spend_window *w)
{
    unsigned k, d;
    for (k = 0; k < ST_SPEND_SLOTS; k++) {
        w->slot_start[k] = NONE;
        for (d = 0; d < ST_SPEND_DIMS; d++)
            w->amount[k][d] = 0;
    }
    for (d = 0; d < ST_SPEND_DIMS; d++)
        w->sum[d] = 0;
    w->head = NONE;
}

static void evict(st_spend_window *w, unsigned k)
{
    unsigned d;
    for (d = 0; d < ST_SPEND_DIMS; d++) {
        w->sum[d] -= w->amount[k][d];
        w->amount[k][d] = 0;
    }
}

/* Brings the ring up to now (as budget.c does) and returns the slot for now.
 * now never goes back (see clock_of). */
static unsigned advance(st_spend_window *w, int64_t now_ms)
{
    int64_t period = floor_div(now_ms, w->slot_ms), start = period * w->slot_ms, p;
    unsigned k;

    if (w->head == start)
        return slot_of(period);
    if (w->head == NONE || (start - w->head) / w->slot_ms >= ST_SPEND_SLOTS) {
        clear(w);
    } else {
        for (p = w->head / w->slot_ms + 1; p < period; p++) {
            k = slot_of(p);
            evict(w, k);
            w->slot_start[k] = p * w->slot_ms;
        }
        evict(w, slot_of(period));
    }
    k = slot_of(period);
    w->slot_start[k] = start;
    w->head = start;
    return k;
}

/* now within the clamp, and never before the latest time seen. */
static int64_t clock_of(st_spend *s, int64_t now_ms)
{
    if (now_ms > TIME_MAX)
        now_ms = TIME_MAX;
    if (now_ms > s->last_ms)
        s->last_ms = now_ms;
    return s->last_ms;
}

/* Re-arms the warnings whose spend fell back below their line. */
static void rearm(st_spend *s)
{
    unsigned sp, d;
    for (sp = 0; sp < ST_SPEND_SPANS; sp++)
        for (d = 0; d < ST_SPEND_DIMS; d++)
            if (s->warned[sp][d] && s->win[sp].sum[d] < s->rearm_below[sp][d])
                s->warned[sp][d] = 0;
}

static int64_t advance_all(st_spend *s, int64_t now_ms)
{
    int64_t now = clock_of(s, now_ms);
    unsigned sp;
    for (sp = 0; sp < ST_SPEND_SPANS; sp++)
        (void)advance(&s->win[sp], now);
    rearm(s);
    return now;
}

void st_spend_config_defaults(st_spend_config *c)
{
    unsigned sp, d;
    for (sp = 0; sp < ST_SPEND_SPANS; sp++)
        for (d = 0; d < ST_SPEND_DIMS; d++)
            c->cap[sp][d] = 0;
    c->warn = 0.8;
}

/* ceil(x) of a non-negative double far below 2^63, without libm. */
static int64_t ceil_pos(double x)
{
    int64_t i = (int64_t)x;
    return (double)i < x ? i + 1 : i;
}

void st_spend_init(st_spend *s, const st_spend_config *c, int64_t now_ms)
{
    st_spend_config d;
    double warn;
    unsigned sp, k;

    if (c == NULL) {
        st_spend_config_defaults(&d);
        c = &d;
    }
    warn = c->warn;
    if (!(warn >= 0))
        warn = 0.8;
    if (warn > 1)
        warn = 1;
    for (sp = 0; sp < ST_SPEND_SPANS; sp++) {
        for (k = 0; k < ST_SPEND_DIMS; k++) {
            int64_t cap = c->cap[sp][k] <= 0 ? 0 : clamp_amount(c->cap[sp][k]);
            s->cap[sp][k] = cap;
            s->warn_at[sp][k] = cap > 0 && warn > 0 ? ceil_pos(warn * (double)cap) : 0;
            s->rearm_below[sp][k] = ceil_pos(REARM * warn * (double)cap);
            s->warned[sp][k] = 0;
        }
        s->win[sp].slot_ms = span_ms[sp] / ST_SPEND_SLOTS;
        clear(&s->win[sp]);
    }
    for (k = 0; k < ST_SPEND_DIMS; k++)
        s->reserved[k] = 0;
    s->last_ms = -TIME_MAX;
    (void)advance_all(s, now_ms < -TIME_MAX ? -TIME_MAX : now_ms);
    s->admitted = s->refused = 0;
}

/* When enough of the window frees for `need` more to fit: walks the slots from
 * the oldest. Returns the time, or INT64_MAX if even an empty window is not enough. */
static int64_t frees_at(const st_spend_window *w, unsigned dim, int64_t need)
{
    int64_t head = floor_div(w->head, w->slot_ms), freed = 0, p;
    for (p = head - (ST_SPEND_SLOTS - 1); p <= head; p++) {
        unsigned k = slot_of(p);
        if (w->slot_start[k] != p * w->slot_ms)
            continue;
        freed += w->amount[k][dim];
        if (freed >= need)
            return (p + ST_SPEND_SLOTS) * w->slot_ms;
    }
    return INT64_MAX;
}

st_spend_result st_spend_reserve(st_spend *s, int64_t now_ms, const int64_t amount[ST_SPEND_DIMS],
                                 st_spend_hold *h, int64_t *retry_after_ms)
{
    int64_t want[ST_SPEND_DIMS], until = 0, now;
    st_spend_result res = ST_SPEND_OK;
    unsigned sp, d;

    now = advance_all(s, now_ms);
    for (d = 0; d < ST_SPEND_DIMS; d++)
        want[d] = clamp_amount(amount[d]);
    for (sp = 0; sp < ST_SPEND_SPANS; sp++) {
        for (d = 0; d < ST_SPEND_DIMS; d++) {
            int64_t cap = s->cap[sp][d], over;
            if (cap == 0)
                continue;
            if (want[d] > cap) {
                res = ST_SPEND_TOO_BIG;
                continue;
            }
            /* all terms <= ST_SPEND_MAX: no overflow */
            over = s->win[sp].sum[d] + s->reserved[d] + want[d] - cap;
            if (over > 0) {
                int64_t at = frees_at(&s->win[sp], d, over);
                if (at == INT64_MAX) {
                    if (res != ST_SPEND_TOO_BIG)
                        res = ST_SPEND_HELD;
                } else {
                    if (res == ST_SPEND_OK)
                        res = ST_SPEND_WAIT;
                    if (at > until)
                        until = at;
                }
            }
        }
    }
    if (res != ST_SPEND_OK) {
        s->refused++;
        if (retry_after_ms != NULL)
            *retry_after_ms = res == ST_SPEND_TOO_BIG ? INT64_MAX : res == ST_SPEND_HELD ? -1 : until - now;
        return res;
    }
    for (d = 0; d < ST_SPEND_DIMS; d++) {
        s->reserved[d] = add_sat(s->reserved[d], want[d]);
        h->amount[d] = want[d];
    }
    h->valid = 1;
    s->admitted++;
    if (retry_after_ms != NULL)
        *retry_after_ms = 0;
    return ST_SPEND_OK;
}

static void unhold(st_spend *s, st_spend_hold *h)
{
    unsigned d;
    for (d = 0; d < ST_SPEND_DIMS; d++) {
        s->reserved[d] -= h->amount[d] < s->reserved[d] ? h->amount[d] : s->reserved[d];
        h->amount[d] = 0;
    }
    h->valid = 0;
}

unsigned st_spend_charge(st_spend *s, int64_t now_ms, const int64_t actual[ST_SPEND_DIMS])
{
    int64_t now = advance_all(s, now_ms);
    unsigned sp, d, bits = 0;

    for (sp = 0; sp < ST_SPEND_SPANS; sp++) {
        st_spend_window *w = &s->win[sp];
        unsigned k = slot_of(floor_div(now, w->slot_ms));
        for (d = 0; d < ST_SPEND_DIMS; d++) {
            int64_t before = w->amount[k][d];
            w->amount[k][d] = add_sat(before, clamp_amount(actual[d]));
            w->sum[d] += w->amount[k][d] - before;   /* exact: at most 96 slots of ST_SPEND_MAX */
            if (s->warn_at[sp][d] > 0 && !s->warned[sp][d] && w->sum[d] >= s->warn_at[sp][d]) {
                s->warned[sp][d] = 1;
                bits |= ST_SPEND_WARN_BIT(sp, d);
            }
        }
    }
    return bits;
}

unsigned st_spend_settle(st_spend *s, int64_t now_ms, st_spend_hold *h, const int64_t actual[ST_SPEND_DIMS])
{
    if (!h->valid)
        return 0;
    unhold(s, h);
    if (actual == NULL) {
        (void)advance_all(s, now_ms);
        return 0;
    }
    return st_spend_charge(s, now_ms, actual);
}

void st_spend_release(st_spend *s, int64_t now_ms, st_spend_hold *h)
{
    (void)st_spend_settle(s, now_ms, h, NULL);
}

int64_t st_spend_used(st_spend *s, int64_t now_ms, st_spend_span span, st_spend_dim dim)
{
    if ((unsigned)span >= ST_SPEND_SPANS || (unsigned)dim >= ST_SPEND_DIMS)
        return 0;
    (void)advance_all(s, now_ms);
    return s->win[span].sum[dim];
}

int64_t st_spend_reserved(const st_spend *s, st_spend_dim dim)
{
    return (unsigned)dim < ST_SPEND_DIMS ? s->reserved[dim] : 0;
}

/* ---- the spend as a blob -------------------------------------------------- */

static const st_blob_kind BLOB = {
    { 's', 't', 'S', '1' }, ST_SPEND_BLOB_VERSION, { sizeof(st_spend), 0, 0 }, sizeof(st_spend),
};

uint64_t st_spend_fingerprint(const st_spend *s)
{
    uint64_t h = ST_FNV_OFFSET;
    int span, dim;
    for (span = 0; span < ST_SPEND_SPANS; span++)
        for (dim = 0; dim < ST_SPEND_DIMS; dim++) {
            ST_FNV_FIELD(h, s->cap[span][dim]);
            ST_FNV_FIELD(h, s->warn_at[span][dim]);
            ST_FNV_FIELD(h, s->rearm_below[span][dim]);
        }
    return h;
}

size_t st_spend_blob_size(void)
{
    return st_blob_size(&BLOB);
}

size_t st_spend_save(const st_spend *s, uint32_t stamp, void *out, size_t cap)
{
    unsigned char *p = st_blob_frame(&BLOB, st_spend_fingerprint(s), stamp, out, cap);

    if (p == NULL)
        return 0;
    memcpy(p, s, sizeof *s);
    return st_blob_size(&BLOB);
}

static int amount_sane(int64_t x)
{
    return x >= 0 && x <= ST_SPEND_MAX;
}

/* Values a blob of the right layout and caps must still hold to be used. */
static int blob_sane(const st_spend *mine, const st_spend *b)
{
    int span, dim;
    unsigned k;

    for (dim = 0; dim < ST_SPEND_DIMS; dim++)
        if (!amount_sane(b->reserved[dim]))
            return 0;
    for (span = 0; span < ST_SPEND_SPANS; span++) {
        const st_spend_window *w = &b->win[span];
        if (w->slot_ms != mine->win[span].slot_ms)
            return 0;
        for (dim = 0; dim < ST_SPEND_DIMS; dim++) {
            if (!amount_sane(w->sum[dim]) || b->warned[span][dim] > 1)
                return 0;
            for (k = 0; k < ST_SPEND_SLOTS; k++)
                if (!amount_sane(w->amount[k][dim]))
                    return 0;
        }
    }
    return 1;
}

int st_spend_load(st_spend *s, const void *blob, size_t len)
{
    int why;
    const unsigned char *p = st_blob_payload(&BLOB, st_spend_fingerprint(s), blob, len, &why);
    st_spend b;

    if (p == NULL)
        return why;
    memcpy(&b, p, sizeof b);
    if (!blob_sane(s, &b))
        return ST_BLOB_INVALID;
    *s = b;
    return ST_BLOB_OK;
}
