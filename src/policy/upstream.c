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
