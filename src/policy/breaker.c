#include "breaker.h"

#include <string.h>

/* Rates are compared as failures >= rate * calls, less this relative slack, so that
 * a rate typed as 0.3 trips at 3 of 10 even if the product rounds a hair above 3. */
#define RATE_SLACK (1.0 - 1e-12)

void st_breaker_config_defaults(st_breaker_config *c)
{
    c->window_ms = 30000;
    c->buckets = 10;
    c->min_calls = 20;
    c->failure_rate = 0.5;
    c->slow_call_ms = 20000;
    c->slow_rate = 0.8;
    c->open_ms = 15000;
    c->max_open_ms = 300000;
    c->probes = 3;
    c->probe_timeout_ms = 60000;
    c->failure_classes = ST_BREAKER_DEFAULT_FAILURES;
}

static double clamp_rate(double r, double dflt)
{
    if (r != r)
        return dflt;
    return r < 0 ? 0 : r;
}

static void normalize(st_breaker_config *c, const st_breaker_config *in)
{
    st_breaker_config d;
    st_breaker_config_defaults(&d);
    *c = in ? *in : d;
    if (c->window_ms < 1)
        c->window_ms = d.window_ms;
    if (c->buckets == 0)
        c->buckets = d.buckets;
    if (c->buckets > ST_BREAKER_MAX_BUCKETS)
        c->buckets = ST_BREAKER_MAX_BUCKETS;
    if (c->min_calls == 0)
        c->min_calls = 1;
    c->failure_rate = clamp_rate(c->failure_rate, d.failure_rate);
    c->slow_rate = clamp_rate(c->slow_rate, d.slow_rate);
    if (c->slow_call_ms < 0)
        c->slow_call_ms = 0;
    if (c->open_ms < 0)
        c->open_ms = d.open_ms;
    if (c->max_open_ms < c->open_ms)
        c->max_open_ms = c->open_ms;
    if (c->probes == 0)
        c->probes = 1;
    if (c->probes > ST_BREAKER_MAX_PROBES)
        c->probes = ST_BREAKER_MAX_PROBES;
    if (c->probe_timeout_ms < 1)
        c->probe_timeout_ms = d.probe_timeout_ms;
}

/* ---------------------------------------------------------------- time */

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static int64_t add_sat(int64_t t, int64_t d)     /* d >= 0 */
{
    return t > INT64_MAX - d ? INT64_MAX : t + d;
}

static int64_t sub_sat(int64_t a, int64_t b)     /* a >= b */
{
    uint64_t d = (uint64_t)a - (uint64_t)b;
    return d > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)d;
}

/* ---------------------------------------------------------------- window */

static void window_clear(st_breaker *b)
{
    memset(b->calls, 0, sizeof b->calls);
    memset(b->failures, 0, sizeof b->failures);
    memset(b->slow, 0, sizeof b->slow);
    b->sum_calls = b->sum_failures = b->sum_slow = 0;
}

static void evict(st_breaker *b, unsigned k)
{
    b->sum_calls -= b->calls[k];
    b->sum_failures -= b->failures[k];
    b->sum_slow -= b->slow[k];
    b->calls[k] = b->failures[k] = b->slow[k] = 0;
}

static void set_head(st_breaker *b, int64_t period)
{
    int64_t r = period % (int64_t)b->cfg.buckets;
    b->head = period;
    b->head_start = period * b->bucket_ms;
    b->head_end = add_sat(b->head_start, b->bucket_ms);
    b->head_k = (unsigned)(r < 0 ? r + (int64_t)b->cfg.buckets : r);
}

/* Bring the ring up to now and return the bucket for now. The common case, a call
 * in the head bucket, is two compares; a call from the past lands in the head. */
static unsigned advance(st_breaker *b, int64_t now_ms)
{
    int64_t period;
    uint64_t gap;
    unsigned n = b->cfg.buckets, k;

    if (now_ms < b->head_end)
        return b->head_k;
    period = floor_div(now_ms, b->bucket_ms);
    if (period <= b->head)
        return b->head_k;
    gap = (uint64_t)period - (uint64_t)b->head;
    if (gap >= n) {
        window_clear(b);
    } else {
        for (k = b->head_k; gap > 0; gap--) {
            k = k + 1 == n ? 0 : k + 1;
            evict(b, k);
        }
    }
    set_head(b, period);
    return b->head_k;
}

/* ---------------------------------------------------------------- states */

static uint32_t next_token(st_breaker *b)
{
    if (++b->serial == 0)
        b->serial = 1;
    return b->serial;
}

/* Issued after the last window reset: within half the token space after it. */
static int after_reset(const st_breaker *b, uint32_t token)
{
    return (uint32_t)(token - b->reset_serial) - 1u < UINT32_C(0x80000000);
}

static void clear_probes(st_breaker *b)
{
    memset(b->probe_tok, 0, sizeof b->probe_tok);
    b->probes_out = 0;
    b->probes_ok = 0;
}

static void enter_open(st_breaker *b, int64_t until_ms)
{
    b->state = ST_BREAKER_OPEN;
    b->open_until_ms = until_ms;
    b->opens++;
    clear_probes(b);
}

static void reopen(st_breaker *b, int64_t now_ms)
{
    int64_t cap = b->cfg.max_open_ms, cur = b->current_open_ms;
    b->current_open_ms = cur > cap / 2 ? cap : cur * 2;
    enter_open(b, add_sat(now_ms, b->current_open_ms));
}

/* Closed with a fresh window; permits issued before now no longer count. */
static void fresh_close(st_breaker *b)
{
    b->state = ST_BREAKER_CLOSED;
    b->open_until_ms = 0;
    b->current_open_ms = b->cfg.open_ms;
    window_clear(b);
    b->reset_serial = b->serial;
    clear_probes(b);
}

static int trips(const st_breaker_config *c, uint64_t calls, uint64_t failures, uint64_t slow)
{
    double n;
    if (calls < c->min_calls)
        return 0;
    n = (double)calls * RATE_SLACK;
    if ((double)failures >= c->failure_rate * n)
        return 1;
    return c->slow_call_ms > 0 && (double)slow >= c->slow_rate * n;
}

static int tripped(const st_breaker *b)
{
    return trips(&b->cfg, b->sum_calls, b->sum_failures, b->sum_slow);
}

static int find_probe(const st_breaker *b, uint32_t token)
{
    unsigned i;
    for (i = 0; i < b->cfg.probes; i++)
        if (b->probe_tok[i] == token)
            return (int)i;
    return -1;
}

void st_breaker_init(st_breaker *b, const st_breaker_config *c, int64_t now_ms)
{
    memset(b, 0, sizeof *b);
    normalize(&b->cfg, c);
    b->bucket_ms = b->cfg.window_ms / (int64_t)b->cfg.buckets;
    if (b->bucket_ms < 1)
        b->bucket_ms = 1;
    b->mode = ST_BREAKER_NORMAL;
    b->serial = b->reset_serial = 0;
    fresh_close(b);
    /* the lowest clock values have no representable period start; they are
     * "long ago" anyway, and this keeps period * bucket_ms in range */
    if (now_ms < INT64_MIN + b->bucket_ms)
        now_ms = INT64_MIN + b->bucket_ms;
    set_head(b, floor_div(now_ms, b->bucket_ms));
}

static void plain_permit(st_breaker *b, st_permit *p)
{
    p->token = next_token(b);
    p->probe = 0;
    p->valid = 1;
}

/* The normal-mode decision: 1 with *p filled, or 0 with *wait set. */
static int decide(st_breaker *b, int64_t now_ms, st_permit *p, int64_t *wait)
{
    unsigned i;

    if (b->state == ST_BREAKER_CLOSED) {
        plain_permit(b, p);
        return 1;
    }
    if (b->state == ST_BREAKER_OPEN) {
        if (now_ms < b->open_until_ms) {
            *wait = sub_sat(b->open_until_ms, now_ms);
            return 0;
        }
        b->state = ST_BREAKER_HALF_OPEN;
        clear_probes(b);
    }
    /* half-open */
    if (b->probes_out > 0 && now_ms >= b->probe_event_ms &&
        (uint64_t)now_ms - (uint64_t)b->probe_event_ms >= (uint64_t)b->cfg.probe_timeout_ms) {
        reopen(b, now_ms);
        *wait = sub_sat(b->open_until_ms, now_ms);
        return 0;
    }
    if (b->probes_out + b->probes_ok >= b->cfg.probes) {
        int64_t deadline = add_sat(b->probe_event_ms, b->cfg.probe_timeout_ms);
        *wait = deadline > now_ms ? sub_sat(deadline, now_ms) : 0;
        return 0;
    }
    for (i = 0; b->probe_tok[i] != 0; i++)
        ;
    if (b->probes_out == 0)
        b->probe_event_ms = now_ms;
    b->probes_out++;
    b->probe_tok[i] = next_token(b);
    p->token = b->probe_tok[i];
    p->probe = 1;
    p->valid = 1;
    return 1;
}

int st_breaker_acquire(st_breaker *b, int64_t now_ms, st_permit *p, int64_t *retry_in_ms)
{
    int64_t wait = 0;

    p->token = 0;
    p->probe = 0;
    p->valid = 0;
    if (b->mode == ST_BREAKER_DISABLED) {
        plain_permit(b, p);
        return 1;
    }
    if (b->mode == ST_BREAKER_FORCED_OPEN) {
        if (retry_in_ms)
            *retry_in_ms = INT64_MAX;
        return 0;
    }
    if (decide(b, now_ms, p, &wait))
        return 1;
    if (b->mode == ST_BREAKER_METRICS_ONLY) {
        plain_permit(b, p);
        return 1;
    }
    if (retry_in_ms)
        *retry_in_ms = wait;
    return 0;
}

void st_breaker_release(st_breaker *b, int64_t now_ms, st_permit *p)
{
    int slot;

    if (p == NULL || !p->valid)
        return;
    p->valid = 0;
    if (!p->probe || b->state != ST_BREAKER_HALF_OPEN || b->mode == ST_BREAKER_DISABLED)
        return;
    slot = find_probe(b, p->token);
    if (slot < 0)
        return;
    b->probe_tok[slot] = 0;
    b->probes_out--;
    b->probe_event_ms = now_ms;
}

void st_breaker_record(st_breaker *b, int64_t now_ms, st_permit *p, st_class cls, int64_t latency_ms)
{
    int slot = -1, failed, slow;
    unsigned k;

    if (p == NULL || !p->valid)
        return;
    if (cls == ST_CLASS_CANCELED) {
        st_breaker_release(b, now_ms, p);
        return;
    }
    p->valid = 0;
    if (b->mode == ST_BREAKER_DISABLED)
        return;
    if (p->probe && b->state == ST_BREAKER_HALF_OPEN)
        slot = find_probe(b, p->token);
    if (slot < 0 && !after_reset(b, p->token))
        return;

    failed = (unsigned)cls < ST_CLASS_COUNT && (b->cfg.failure_classes >> (unsigned)cls & 1u);
    slow = b->cfg.slow_call_ms > 0 && latency_ms >= b->cfg.slow_call_ms;
    k = advance(b, now_ms);
    b->recorded_calls++;
    b->recorded_failures += (uint64_t)failed;
    b->recorded_slow += (uint64_t)slow;
    if (b->calls[k] != UINT32_MAX) {
        b->calls[k]++;
        b->sum_calls++;
        b->failures[k] += (uint32_t)failed;
        b->sum_failures += (uint64_t)failed;
        b->slow[k] += (uint32_t)slow;
        b->sum_slow += (uint64_t)slow;
    }

    if (slot >= 0) {
        b->probe_tok[slot] = 0;
        b->probes_out--;
        b->probe_event_ms = now_ms;
        if (failed || slow)
            reopen(b, now_ms);
        else if (++b->probes_ok >= b->cfg.probes)
            fresh_close(b);
        return;
    }
    if (b->state == ST_BREAKER_CLOSED && b->mode != ST_BREAKER_FORCED_OPEN && tripped(b))
        enter_open(b, add_sat(now_ms, b->current_open_ms));
}

void st_breaker_open_until(st_breaker *b, int64_t now_ms, int64_t until_ms)
{
    if (b->mode == ST_BREAKER_DISABLED || b->mode == ST_BREAKER_FORCED_OPEN || until_ms <= now_ms)
        return;
    if (b->state == ST_BREAKER_OPEN) {
        if (until_ms > b->open_until_ms)
            b->open_until_ms = until_ms;
        return;
    }
    enter_open(b, until_ms);
}

int st_breaker_judge(st_breaker *b, int64_t now_ms, uint64_t calls, uint64_t failures, uint64_t slow)
{
    if ((b->mode != ST_BREAKER_NORMAL && b->mode != ST_BREAKER_METRICS_ONLY) || b->state != ST_BREAKER_CLOSED
        || !trips(&b->cfg, calls, failures, slow))
        return 0;
    enter_open(b, add_sat(now_ms, b->current_open_ms));
    return 1;
}

static int blends(st_breaker_mode m)
{
    return m == ST_BREAKER_NORMAL || m == ST_BREAKER_METRICS_ONLY;
}

void st_breaker_set_mode(st_breaker *b, st_breaker_mode m, int64_t now_ms)
{
    if ((unsigned)m > ST_BREAKER_METRICS_ONLY || m == b->mode)
        return;
    (void)now_ms;                             /* an empty window needs no time */
    if (!(blends(m) && blends(b->mode)))
        fresh_close(b);
    b->mode = m;
}

st_breaker_state st_breaker_state_now(const st_breaker *b)
{
    if (b->mode == ST_BREAKER_FORCED_OPEN)
        return ST_BREAKER_OPEN;
    if (b->mode == ST_BREAKER_DISABLED)
        return ST_BREAKER_CLOSED;
    return b->state;
}

static uint32_t sat32(uint64_t x)
{
    return x > UINT32_MAX ? UINT32_MAX : (uint32_t)x;
}

void st_breaker_stats_get(st_breaker *b, int64_t now_ms, st_breaker_stats *out)
{
    (void)advance(b, now_ms);
    out->state = st_breaker_state_now(b);
    out->mode = b->mode;
    out->calls = sat32(b->sum_calls);
    out->failures = sat32(b->sum_failures);
    out->slow = sat32(b->sum_slow);
    out->failure_rate = b->sum_calls ? (double)b->sum_failures / (double)b->sum_calls : 0;
    out->slow_rate = b->sum_calls ? (double)b->sum_slow / (double)b->sum_calls : 0;
    if (b->mode == ST_BREAKER_FORCED_OPEN)
        out->open_until_ms = INT64_MAX;
    else
        out->open_until_ms = out->state == ST_BREAKER_OPEN ? b->open_until_ms : 0;
    out->current_open_ms = b->current_open_ms;
    out->opens = b->opens;
}
