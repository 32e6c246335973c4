#include "upstream.h"

#include <stdlib.h>
#include <string.h>

void st_upstream_config_defaults(st_upstream_config *c)
{
    memset(c, 0, sizeof *c);
    c->breaker_enabled = 1;
    st_breaker_config_defaults(&c->breaker);
    c->burst_seconds = 1;
    c->max_pause_ms = 300000;
    c->concurrency = 16;
    c->queue_max = 1000;
    c->budget_ratio = 0.2;
    c->budget_min_per_s = 3;
    c->budget_slot_ms = 1000;
    c->latency_slots = 12;
    c->latency_slot_ms = 5000;
    c->adaptive_enabled = 0;
    st_adaptive_config_defaults(&c->adaptive);
}

st_upstream *st_upstream_new(const char *name, const st_upstream_config *c, int64_t now_ms)
{
    size_t n = strlen(name) + 1;
    st_upstream *u = calloc(1, sizeof *u + n);

    if (u == NULL)
        return NULL;
    memcpy(u->name, name, n);
    st_budget_init(&u->budget, c->budget_ratio, c->budget_min_per_s, c->budget_slot_ms, now_ms);
    st_breaker_init(&u->breaker, &c->breaker, now_ms);
    if (c->breaker_mode != ST_BREAKER_NORMAL)
        st_breaker_set_mode(&u->breaker, c->breaker_mode, now_ms);
    u->breaker_enabled = c->breaker_enabled;
    st_limiter_init(&u->limiter, c->limits_per_min, c->burst_seconds, now_ms);
    u->latency_slots = c->latency_slots;
    u->latency_slot_ms = c->latency_slot_ms;
    u->concurrency = c->concurrency ? c->concurrency : 1;
    u->queue_max = c->queue_max;
    u->max_pause_ms = c->max_pause_ms > 0 ? c->max_pause_ms : 300000;
    u->adaptive_enabled = c->adaptive_enabled;
    if (u->adaptive_enabled)
        st_adaptive_init(&u->adaptive, &c->adaptive, now_ms);
    /* the ratio is the asking call's (st_hedge_admit sets it); min_per_s 0: no free hedges */
    st_budget_init(&u->hedge, 0, 0, 1000, now_ms);
    return u;
}

void st_upstream_free(st_upstream *u)
{
    if (u == NULL)
        return;
    st_latency_free(u->total);
    st_latency_free(u->ttfb);
    free(u);
}

unsigned st_upstream_cap(const st_upstream *u)
{
    unsigned cap = u->adaptive_enabled ? st_adaptive_limit(&u->adaptive) : u->concurrency;
    if (u->replied || st_limiter_known(&u->limiter) || cap < ST_SLOW_START)
        return cap;
    return ST_SLOW_START;
}

int st_upstream_enqueue(st_upstream *u, st_qnode *n, int priority)
{
    if (u->queued >= u->queue_max)
        return 0;
    if (priority < 0 || priority >= ST_PRIORITY_COUNT)
        priority = ST_PRIORITY_NORMAL;
    n->priority = priority;
    n->next = NULL;
    n->prev = u->tail[priority];
    if (n->prev)
        n->prev->next = n;
    else
        u->head[priority] = n;
    u->tail[priority] = n;
    n->queued = 1;
    u->queued++;
    return 1;
}

st_qnode *st_upstream_peek(const st_upstream *u)
{
    int p;
    for (p = 0; p < ST_PRIORITY_COUNT; p++)
        if (u->head[p])
            return u->head[p];
    return NULL;
}

void st_upstream_dequeue(st_upstream *u, st_qnode *n)
{
    if (!n->queued)
        return;
    if (n->prev)
        n->prev->next = n->next;
    else
        u->head[n->priority] = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        u->tail[n->priority] = n->prev;
    n->prev = n->next = NULL;
    n->queued = 0;
    u->queued--;
}

void st_upstream_record_latency(st_upstream *u, int64_t now_ms, uint64_t ttfb_us, uint64_t total_us)
{
    if (u->total == NULL)
        u->total = st_latency_new(u->latency_slots, u->latency_slot_ms, now_ms);
    if (u->ttfb == NULL)
        u->ttfb = st_latency_new(u->latency_slots, u->latency_slot_ms, now_ms);
    /* out of memory: the window is skipped, never the request */
    if (u->total)
        st_latency_record(u->total, now_ms, total_us);
    if (u->ttfb)
        st_latency_record(u->ttfb, now_ms, ttfb_us);
}

/* ---- the shared part as a blob -------------------------------------------- */

static const st_blob_kind BLOB = {
    { 's', 't', 'U', '1' }, ST_UPSTREAM_BLOB_VERSION,
    { sizeof(st_breaker), sizeof(st_limiter), sizeof(st_budget) },
    sizeof(st_breaker) + sizeof(st_limiter) + sizeof(st_budget) + 1,
};

uint64_t st_upstream_fingerprint(const st_upstream *u)
{
    const st_breaker_config *c = &u->breaker.cfg;
    uint32_t mode = (uint32_t)u->breaker.mode, enabled = (uint32_t)u->breaker_enabled;
    uint64_t h = ST_FNV_OFFSET;
    int i;

    ST_FNV_FIELD(h, enabled);
    ST_FNV_FIELD(h, mode);
    ST_FNV_FIELD(h, c->window_ms);
    ST_FNV_FIELD(h, c->buckets);
    ST_FNV_FIELD(h, c->min_calls);
    ST_FNV_FIELD(h, c->failure_rate);
    ST_FNV_FIELD(h, c->slow_call_ms);
    ST_FNV_FIELD(h, c->slow_rate);
    ST_FNV_FIELD(h, c->open_ms);
    ST_FNV_FIELD(h, c->max_open_ms);
    ST_FNV_FIELD(h, c->probes);
    ST_FNV_FIELD(h, c->probe_timeout_ms);
    ST_FNV_FIELD(h, c->failure_classes);
    for (i = 0; i < ST_DIM_COUNT; i++)
        ST_FNV_FIELD(h, u->limiter.configured[i]);
    ST_FNV_FIELD(h, u->limiter.burst_seconds);
    ST_FNV_FIELD(h, u->budget.ratio);
    ST_FNV_FIELD(h, u->budget.min_per_s);
    ST_FNV_FIELD(h, u->budget.slot_ms);
    return h;
}

size_t st_upstream_blob_size(void)
{
    return st_blob_size(&BLOB);
}

size_t st_upstream_save(const st_upstream *u, uint32_t stamp, void *out, size_t cap)
{
    unsigned char *p = st_blob_frame(&BLOB, st_upstream_fingerprint(u), stamp, out, cap);

    if (p == NULL)
        return 0;
    memcpy(p, &u->breaker, sizeof u->breaker);
    p += sizeof u->breaker;
    memcpy(p, &u->limiter, sizeof u->limiter);
    p += sizeof u->limiter;
    memcpy(p, &u->budget, sizeof u->budget);
    p += sizeof u->budget;
    *p = (unsigned char)(u->replied != 0);
    return st_blob_size(&BLOB);
}

/* Values a blob of the right layout and settings must still hold to be used. */
static int blob_sane(const st_upstream *u, const st_breaker *b, const st_budget *g)
{
    const st_breaker *mine = &u->breaker;
    unsigned i, out = 0;

    if ((unsigned)b->state > ST_BREAKER_HALF_OPEN || (unsigned)b->mode > ST_BREAKER_METRICS_ONLY
        || b->cfg.buckets != mine->cfg.buckets || b->bucket_ms != mine->bucket_ms
        || b->head_k >= b->cfg.buckets || b->cfg.probes != mine->cfg.probes
        || b->probes_out > b->cfg.probes || b->probes_ok > b->cfg.probes)
        return 0;
    for (i = 0; i < ST_BREAKER_MAX_PROBES; i++)
        out += b->probe_tok[i] != 0;
    if (out != b->probes_out)
        return 0;
    return g->slot_ms == u->budget.slot_ms;
}

int st_upstream_load(st_upstream *u, const void *blob, size_t len)
{
    int why;
    const unsigned char *p = st_blob_payload(&BLOB, st_upstream_fingerprint(u), blob, len, &why);
    st_breaker b;
    st_limiter l;
    st_budget g;

    if (p == NULL)
        return why;
    memcpy(&b, p, sizeof b);
    p += sizeof b;
    memcpy(&l, p, sizeof l);
    p += sizeof l;
    memcpy(&g, p, sizeof g);
    p += sizeof g;
    if (!blob_sane(u, &b, &g) || *p > 1)
        return ST_BLOB_INVALID;
    /* the settings stay this process's own (the fingerprint says they agree) */
    b.cfg = u->breaker.cfg;
    u->breaker = b;
    u->limiter = l;
    u->budget = g;
    u->replied = *p;
    return ST_BLOB_OK;
}
