#define _POSIX_C_SOURCE 200809L

#include "decide.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "httpdate.h"

void st_retry_policy_defaults(st_retry_policy *p)
{
    int i;

    memset(p, 0, sizeof *p);
    p->attempts = 4;
    p->base_ms[ST_CLASS_THROTTLED] = 1000;
    p->base_ms[ST_CLASS_OVERLOADED] = 2000;
    p->base_ms[ST_CLASS_TRANSIENT] = 500;
    p->base_ms[ST_CLASS_TIMEOUT] = 500;
    p->base_ms[ST_CLASS_FATAL] = 500;
    p->cap_ms = 30000;
    p->jitter = ST_JITTER_FULL;
    p->honor_retry_after_ms = 60000;
    for (i = 0; i < ST_CLASS_COUNT; i++)
        p->retried[i] = (unsigned char)st_class_retried_by_default((st_class)i);
    memset(p->status_retried, -1, sizeof p->status_retried);
    p->budget_enabled = 1;
}

/* ---- keys ----------------------------------------------------------------- */

static unsigned key_hash(const char *s)
{
    unsigned h = 2166136261u; /* FNV-1a */
    while (*s)
        h = (h ^ (unsigned char)*s++) * 16777619u;
    return h;
}

void st_decider_init(st_decider *d, const st_retry_policy *rp, const st_upstream_config *uc, uint64_t seed)
{
    memset(d, 0, sizeof *d);
    if (rp)
        d->retry = *rp;
    else
        st_retry_policy_defaults(&d->retry);
    if (d->retry.attempts < 1)
        d->retry.attempts = 1;
    if (d->retry.attempts > 1000)
        d->retry.attempts = 1000;
    if (uc)
        d->upstream = *uc;
    else
        st_upstream_config_defaults(&d->upstream);
    st_rng_seed(&d->rng, seed);
}

void st_decider_free(st_decider *d)
{
    int i;
    for (i = 0; i < ST_KEY_BUCKETS; i++) {
        st_upstream *u = d->keys[i];
        while (u) {
            st_upstream *next = u->next;
            st_upstream_free(u);
            u = next;
        }
        d->keys[i] = NULL;
    }
}

st_upstream *st_decider_find(const st_decider *d, const char *key)
{
    st_upstream *u;
    for (u = d->keys[key_hash(key) % ST_KEY_BUCKETS]; u; u = u->next)
        if (strcmp(u->name, key) == 0)
            return u;
    return NULL;
}

st_upstream *st_decider_upstream(st_decider *d, const char *key, int64_t now_ms)
{
    unsigned b = key_hash(key) % ST_KEY_BUCKETS;
    st_upstream *u = st_decider_find(d, key);

    if (u != NULL)
        return u;
    u = st_upstream_new(key, &d->upstream, now_ms);
    if (u == NULL)
        return NULL;
    u->next = d->keys[b];
    d->keys[b] = u;
    return u;
}

void st_decider_each(const st_decider *d, void (*fn)(void *ud, st_upstream *u), void *ud)
{
    int i;
    st_upstream *u;
    for (i = 0; i < ST_KEY_BUCKETS; i++)
        for (u = d->keys[i]; u; u = u->next)
            fn(ud, u);
}

/* ---- events --------------------------------------------------------------- */

static st_event *event_add(st_events *ev, st_event_type type, const st_upstream *u)
{
    st_event *e;
    if (ev == NULL)
        return NULL;
    if (ev->n >= ST_EVENTS_MAX) {
        ev->dropped++;
        return NULL;
    }
    e = &ev->ev[ev->n++];
    memset(e, 0, sizeof *e);
    e->type = type;
    e->up = u;
    return e;
}

static void breaker_changed(st_events *ev, const st_upstream *u, st_breaker_state from)
{
    st_breaker_state to = st_breaker_state_now(&u->breaker);
    st_event *e;

    if (to == from || (e = event_add(ev, ST_EVENT_BREAKER, u)) == NULL)
        return;
    e->from = from;
    e->to = to;
}

/* ---- calls ---------------------------------------------------------------- */

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static double clamp_cost(double v)
{
    return v > 0 && v < 1e12 ? v : (v >= 1e12 ? 1e12 : 0);
}

void st_call_init(st_call *c, const st_decider *d, int64_t now_ms, int64_t total_ms, unsigned attempts,
                  int priority, double input_tokens, double output_tokens)
{
    memset(c, 0, sizeof *c);
    c->priority = priority >= 0 && priority < ST_PRIORITY_COUNT ? priority : ST_PRIORITY_NORMAL;
    c->cost[ST_DIM_REQUESTS] = 1;
    c->cost[ST_DIM_INPUT_TOKENS] = clamp_cost(input_tokens);
    c->cost[ST_DIM_OUTPUT_TOKENS] = clamp_cost(output_tokens);
    c->cost[ST_DIM_TOKENS] = c->cost[ST_DIM_INPUT_TOKENS] + c->cost[ST_DIM_OUTPUT_TOKENS];
    c->deadline_ms = total_ms > 0 ? now_ms + (total_ms < ST_RETRY_AFTER_MAX_MS ? total_ms : ST_RETRY_AFTER_MAX_MS) : 0;
    c->max_attempts = attempts ? attempts : d->retry.attempts;
    if (c->max_attempts > 1000)
        c->max_attempts = 1000;
    c->hint_ms = -1;
    c->retry_after_ms = -1;
}

/* ---- admission: breaker, then concurrency, then limiter ------------------- */

static void refuse(st_admission *out, st_class cls, const char *kind, const char *detail)
{
    out->verdict = ST_ADMIT_REFUSED;
    out->refusal.cls = cls;
    out->refusal.kind = kind;
    out->detail = detail;
}

static void give_back(st_upstream *u, st_call *c, int64_t now_ms)
{
    if (u->breaker_enabled)
        st_breaker_release(&u->breaker, now_ms, &c->permit);
}

int64_t st_call_max_wait_ms(const st_decider *d, const st_call *c, int64_t now_ms)
{
    int64_t w = d->retry.honor_retry_after_ms;
    if (c->deadline_ms > 0 && c->deadline_ms - 1 - now_ms < w)
        w = c->deadline_ms - 1 - now_ms;
    return w > 0 ? w : 0;
}

void st_call_not_before(st_call *c, int64_t now_ms, int64_t wait_ms)
{
    c->not_before_ms = wait_ms > 0 ? now_ms + min64(wait_ms, ST_RETRY_AFTER_MAX_MS) : 0;
}

/* Ms until the call may start: its place in a shared limit, and the local
 * limiter (charged only when the wait is 0); -1 = when a slot frees. */
static int64_t start_wait(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms)
{
    int64_t placed = c->not_before_ms > now_ms ? c->not_before_ms - now_ms : 0, local;

    if (u->in_flight >= st_upstream_cap(u))
        /* a place too far off is refused now, not after a slot frees */
        return placed > st_call_max_wait_ms(d, c, now_ms) ? placed : -1;
    if (placed == 0)
        return st_limiter_acquire(&u->limiter, now_ms, c->cost);
    local = st_limiter_wait_ms(&u->limiter, now_ms, c->cost);
    return local > placed ? local : placed;
}

/* Decides one call: started (1), refused (1), or it must wait (0, out->wake_ms). */
static int try_start(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_admission *out, st_events *ev)
{
    int64_t wait, retry_in = 0;

    memset(out, 0, sizeof *out);
    if (u->breaker_enabled) {
        st_breaker_state before = st_breaker_state_now(&u->breaker);
        int allowed = st_breaker_acquire(&u->breaker, now_ms, &c->permit, &retry_in);
        breaker_changed(ev, u, before);
        if (!allowed) {
            u->circuit_open++;
            c->retry_after_ms = retry_in > 0 ? (retry_in < ST_RETRY_AFTER_MAX_MS ? retry_in : -1) : 1;
            refuse(out, ST_CLASS_OVERLOADED, "circuit_open",
                   retry_in == INT64_MAX ? "the circuit breaker for this upstream is forced open; nothing was sent"
                                         : "the circuit breaker for this upstream is open; nothing was sent");
            return 1;
        }
    }
    wait = start_wait(d, u, c, now_ms);
    if (wait > d->retry.honor_retry_after_ms || (wait > 0 && c->deadline_ms > 0 && now_ms + wait >= c->deadline_ms)) {
        /* a wait this long (a 429's long pause) is surfaced, not sat through */
        give_back(u, c, now_ms);
        c->retry_after_ms = wait;
        if (wait > d->retry.honor_retry_after_ms)
            refuse(out, ST_CLASS_THROTTLED, "rate_limited",
                   "the upstream is paused by the rate limit longer than honor_retry_after; nothing was sent");
        else
            refuse(out, ST_CLASS_TIMEOUT, "total_timeout",
                   "the rate limit would hold the call past its deadline; nothing was sent");
        return 1;
    }
    if (wait != 0) {
        give_back(u, c, now_ms);
        if (wait > 0 && !c->paced) {
            c->paced = 1;
            u->paced++;
        }
        out->verdict = ST_ADMIT_QUEUED;
        out->wake_ms = wait > 0 ? now_ms + wait : 0;
        return 0;
    }
    u->in_flight++;
    c->holding = 1;
    c->attempts++;
    out->verdict = ST_ADMIT_START;
    return 1;
}

void st_admit(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_admission *out, st_events *ev)
{
    /* FIFO: a call starts at once only when nobody waits before it, except that an
     * open breaker, or a shared place too far off, refuses at once even with
     * others queued */
    memset(out, 0, sizeof *out);
    if ((u->queued == 0 || (u->breaker_enabled && st_breaker_state_now(&u->breaker) == ST_BREAKER_OPEN)
         || c->not_before_ms - now_ms > st_call_max_wait_ms(d, c, now_ms))
        && try_start(d, u, c, now_ms, out, ev))
        return;
    if (u->queued > 0)
        out->wake_ms = 0; /* the queue is woken by what is ahead of it */
    if (!st_upstream_enqueue(u, &c->qnode, c->priority)) {
        u->queue_full++;
        refuse(out, ST_CLASS_OVERLOADED, "queue_full", "the queue for this upstream is full; nothing was sent");
        return;
    }
    out->verdict = ST_ADMIT_QUEUED;
}

st_call *st_pump(st_decider *d, st_upstream *u, int64_t now_ms, st_admission *out, st_events *ev)
{
    st_qnode *n = st_upstream_peek(u);
    st_call *c;

    memset(out, 0, sizeof *out);
    if (n == NULL)
        return NULL;
    c = (st_call *)n; /* qnode is the first member */
    if (!try_start(d, u, c, now_ms, out, ev))
        return NULL;
    st_upstream_dequeue(u, n);
    return c;
}

void st_unqueue(st_upstream *u, st_call *c)
{
    st_upstream_dequeue(u, &c->qnode);
}

void st_release(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_events *ev)
{
    (void)d;
    st_upstream_dequeue(u, &c->qnode);
    if (c->holding) {
        st_breaker_state before = st_breaker_state_now(&u->breaker);
        c->holding = 0;
        if (u->in_flight > 0)
            u->in_flight--;
        if (u->breaker_enabled) {
            st_breaker_release(&u->breaker, now_ms, &c->permit);
            breaker_changed(ev, u, before);
        }
    }
}

/* ---- outcomes ------------------------------------------------------------- */

int64_t st_retry_hint_ms(const st_headers *h, int64_t wall_ms)
{
    const char *v;
    int64_t ms;

    if (h == NULL)
        return -1;
    if ((v = st_headers_known(h, ST_H_RETRY_AFTER_MS)) != NULL && st_retry_after_ms_parse(v, strlen(v), &ms))
        return ms;
    if ((v = st_headers_known(h, ST_H_RETRY_AFTER)) != NULL && st_retry_after_parse(v, strlen(v), wall_ms, &ms))
        return ms;
    return -1;
}

/* Feeds the limiter the rate-limit headers of one response. */
static void learn_limits(st_upstream *u, const st_headers *h, int64_t now_ms, int64_t wall_ms, st_events *ev)
{
    const char *name, *value;
    unsigned i;
    int d;

    if (h->nlimits == 0)
        return;
    for (i = 0; i < h->nlimits; i++) {
        st_headers_limit(h, i, &name, &value);
        if (st_limiter_feed_header(&u->limiter, now_ms, wall_ms, name, value)) {
            st_event *e = event_add(ev, ST_EVENT_LIMIT_LEARNED, u);
            if (e) {
                st_ratelimit_header(name, &e->dim, NULL, NULL);
                e->limit = st_limiter_limit(&u->limiter, e->dim);
                e->learned = u->limiter.learned[e->dim];
            }
        }
    }
    st_limiter_response_done(&u->limiter, now_ms);
    /* a hold (nothing left until the reset) is a pause the server sets: capped
     * as a 429's is, so a lying reset cannot park the key for years */
    for (d = 0; d < ST_DIM_COUNT; d++)
        if (u->limiter.hold_left[d] >= 0 && u->limiter.hold_until_ms[d] - now_ms > u->max_pause_ms)
            u->limiter.hold_until_ms[d] = now_ms + u->max_pause_ms;
}

void st_report(st_decider *d, st_upstream *u, st_call *c, const st_attempt_end *a, int64_t now_ms,
               int64_t wall_ms, st_events *ev)
{
    st_class cls = a->outcome.cls;
    int64_t hint = a->status > 0 ? st_retry_hint_ms(a->headers, wall_ms) : -1;

    c->hint_ms = hint;
    if (c->holding) {
        st_breaker_state before = st_breaker_state_now(&u->breaker);
        c->holding = 0;
        if (u->in_flight > 0)
            u->in_flight--;
        if (u->breaker_enabled) {
            int64_t latency_ms = (int64_t)(a->total_us / 1000 < (uint64_t)ST_RETRY_AFTER_MAX_MS ? a->total_us / 1000
                                                                                       : (uint64_t)ST_RETRY_AFTER_MAX_MS);
            st_breaker_record(&u->breaker, now_ms, &c->permit, cls, latency_ms);
            if (cls == ST_CLASS_OVERLOADED && hint > d->retry.honor_retry_after_ms)
                st_breaker_open_until(&u->breaker, now_ms,
                                      now_ms + min64(hint, u->breaker.cfg.max_open_ms));
            breaker_changed(ev, u, before);
        }
    }
    if (a->status > 0) {
        u->replied = 1;
        st_upstream_record_latency(u, now_ms, a->ttfb_us, a->total_us);
        if (a->headers)
            learn_limits(u, a->headers, now_ms, wall_ms, ev);
    }
    if (cls == ST_CLASS_THROTTLED) {
        /* a 429 pauses the whole key, not only this call */
        int64_t pause = hint > 0 ? hint : (int64_t)d->retry.base_ms[ST_CLASS_THROTTLED];
        st_event *e;
        pause = min64(pause, u->max_pause_ms);
        u->throttled++;
        st_limiter_pause_until(&u->limiter, now_ms + pause);
        if ((e = event_add(ev, ST_EVENT_PAUSED, u)) != NULL)
            e->pause_ms = (double)pause;
    }
    if (cls == ST_CLASS_SUCCESS)
        st_budget_deposit(&u->budget, now_ms);
}

static int is_retried(const st_retry_policy *p, const st_attempt_end *a)
{
    st_class cls = a->outcome.cls;
    const char *should = a->headers && a->status > 0 ? st_headers_known(a->headers, ST_H_SHOULD_RETRY) : NULL;

    if (cls == ST_CLASS_SUCCESS || cls == ST_CLASS_CANCELED || (unsigned)cls >= ST_CLASS_COUNT)
        return 0;
    if (should != NULL) {
        if (strcasecmp(should, "true") == 0)
            return 1;
        if (strcasecmp(should, "false") == 0)
            return 0;
    }
    if (a->status > 0 && a->status < ST_STATUS_OVERRIDES && p->status_retried[a->status] >= 0)
        return p->status_retried[a->status];
    return p->retried[cls];
}

void st_retry_decide(st_decider *d, st_upstream *u, st_call *c, const st_attempt_end *a, int64_t now_ms,
                     st_retry_decision *out)
{
    const st_retry_policy *p = &d->retry;
    st_class cls = a->outcome.cls;
    int64_t hint = c->hint_ms;
    double delay;

    memset(out, 0, sizeof *out);
    if (cls == ST_CLASS_SUCCESS)
        return;
    if (hint > 0)
        c->retry_after_ms = hint;
    out->retryable = is_retried(p, a);
    if (!out->retryable)
        return;
    if (c->committed) {
        out->stop = "committed";
        return;
    }
    if (c->attempts >= c->max_attempts) {
        out->stop = "attempts";
        return;
    }
    if (hint > 0 && hint > p->honor_retry_after_ms) {
        out->stop = "hint_too_long";
        return;
    }
    if (hint > 0) {
        delay = (double)hint;
        out->hinted = 1;
    } else {
        delay = st_backoff_delay(p->jitter, p->base_ms[cls], p->cap_ms, c->attempts, c->prev_delay_ms, &d->rng);
    }
    if (c->deadline_ms > 0 && now_ms + (int64_t)delay >= c->deadline_ms) {
        out->stop = "deadline";
        return;
    }
    if (p->budget_enabled && !st_budget_try_withdraw(&u->budget, now_ms)) {
        out->stop = "budget_exhausted";
        return;
    }
    c->prev_delay_ms = delay;
    out->retry = 1;
    out->delay_ms = delay;
}

/* ---- the fleet scope ------------------------------------------------------ */

void st_fleet_open_until(st_upstream *u, int64_t now_ms, int64_t until_ms, st_events *ev)
{
    st_breaker_state before;
    if (!u->breaker_enabled)
        return;
    before = st_breaker_state_now(&u->breaker);
    st_breaker_open_until(&u->breaker, now_ms, until_ms);
    breaker_changed(ev, u, before);
}

int st_fleet_window(st_upstream *u, int64_t now_ms, uint64_t calls, uint64_t failures, uint64_t slow,
                    st_events *ev)
{
    st_breaker_state before;
    int opened;
    if (!u->breaker_enabled)
        return 0;
    before = st_breaker_state_now(&u->breaker);
    opened = st_breaker_judge(&u->breaker, now_ms, calls, failures, slow);
    breaker_changed(ev, u, before);
    return opened;
}

void st_fleet_share(st_upstream *u, int64_t now_ms, double n)
{
    st_limiter_share(&u->limiter, now_ms, n);
}
