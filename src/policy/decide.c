#define _POSIX_C_SOURCE 200809L

#include "decide.h"

#include <math.h>
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
    st_spend_book_free(d->spend);
    d->spend = NULL;
}

st_upstream *st_decider_find(const st_decider *d, const char *key)
{
    st_upstream *u;
    for (u = d->keys[key_hash(key) % ST_KEY_BUCKETS]; u; u = u->next)
        if (strcmp(u->name, key) == 0)
            return u;
    return NULL;
}

/* The key's spend cap, if a rule names it (made on first use). */
static void key_spend(st_decider *d, st_upstream *u, int64_t now_ms)
{
    u->spend = st_spend_book_key(d->spend, u->name, now_ms, NULL);
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
    if (d->spend != NULL)
        key_spend(d, u, now_ms);
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
    if (u->adaptive_enabled)
        st_adaptive_start(&u->adaptive, now_ms, &c->ticket);
    out->verdict = ST_ADMIT_START;
    return 1;
}

/* ---- spend caps at admission --------------------------------------------- */

static void warning_events(st_events *ev, const st_upstream *u, const st_spend_warnings *w)
{
    unsigned i;
    for (i = 0; i < w->n; i++) {
        st_event *e = event_add(ev, ST_EVENT_BUDGET_WARNING, u);
        if (e)
            e->warning = w->w[i];
    }
    if (ev)
        ev->dropped += w->dropped;
}

#define SPEND_DETAILS(whose, cap) \
    { "the " whose " spend cap " cap " would be crossed; nothing was sent", \
      "the call's worst case alone is above the " whose " spend cap " cap "; nothing was sent" }
#define SPEND_SCOPE(whose) \
    { SPEND_DETAILS(whose, "usd_per_hour"), SPEND_DETAILS(whose, "tokens_per_hour"), \
      SPEND_DETAILS(whose, "usd_per_day"), SPEND_DETAILS(whose, "tokens_per_day") }

/* [scope][span * ST_SPEND_DIMS + dim][too big] */
static const char *const spend_details[ST_SPEND_SCOPES][ST_SPEND_SPANS * ST_SPEND_DIMS][2] = {
    SPEND_SCOPE("client's"), SPEND_SCOPE("key's"), SPEND_SCOPE("tag's")
};

int st_admit_spend(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_admission *out, st_events *ev)
{
    st_spend_scope scope = ST_SCOPE_CLIENT;
    st_spend_span span = ST_SPEND_HOUR;
    st_spend_dim dim = ST_SPEND_COST;
    st_spend_warnings w;
    st_spend_result r;
    int64_t wait = -1;

    memset(out, 0, sizeof *out);
    out->verdict = ST_ADMIT_START;
    if (d->spend == NULL || c->spend.state == ST_CALL_SPEND_NONE || c->spend.state == ST_CALL_SPEND_HELD)
        return 1; /* nothing caps it, or it holds its reservation */
    w.n = w.dropped = 0;
    if (c->spend.state == ST_CALL_SPEND_NO_ROOM) {
        refuse(out, ST_CLASS_THROTTLED, "budget_exceeded",
               "too many tags have a spend cap of their own to cap this call's tag; nothing was sent");
        c->spend.state = ST_CALL_SPEND_DONE;
        return 0;
    }
    r = st_spend_book_reserve(d->spend, &c->spend, now_ms, &scope, &wait, &w);
    warning_events(ev, u, &w);
    if (r == ST_SPEND_OK)
        return 1;
    c->spend.state = ST_CALL_SPEND_DONE;
    c->retry_after_ms = wait > 0 ? wait : -1;
    if (r == ST_SPEND_TOO_BIG)
        (void)st_spend_binding(c->spend.s[scope], now_ms, c->spend.amount, &span, &dim);
    else if (!st_spend_binding(c->spend.s[scope], now_ms, c->spend.amount, &span, &dim))
        span = ST_SPEND_HOUR, dim = ST_SPEND_COST;
    refuse(out, ST_CLASS_THROTTLED, "budget_exceeded",
           spend_details[scope][span * ST_SPEND_DIMS + dim][r == ST_SPEND_TOO_BIG]);
    return 0;
}

void st_admit(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_admission *out, st_events *ev)
{
    /* FIFO: a call starts at once only when nobody waits before it, except that an
     * open breaker, or a shared place too far off, refuses at once even with
     * others queued */
    if (!st_admit_spend(d, u, c, now_ms, out, ev))
        return;
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
    st_upstream_dequeue(u, &c->qnode);
    if (d->spend != NULL)
        st_spend_book_release(d->spend, &c->spend, now_ms);
    if (c->holding) {
        st_breaker_state before = st_breaker_state_now(&u->breaker);
        c->holding = 0;
        if (u->in_flight > 0)
            u->in_flight--;
        if (u->adaptive_enabled)
            st_adaptive_done(&u->adaptive, now_ms, &c->ticket, 0, ST_CLASS_CANCELED);
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

/* Gives the attempt's adaptive ticket back: its time to first byte is the
 * sample (total time grows with the answer's length, not with the load). */
static void adaptive_done(st_upstream *u, st_call *c, const st_attempt_end *a, int64_t now_ms)
{
    uint64_t us = a->ttfb_us > 0 ? a->ttfb_us : a->total_us;
    int64_t ms = us / 1000 < (uint64_t)ST_ADAPTIVE_MAX_LATENCY_MS ? (int64_t)(us / 1000) : ST_ADAPTIVE_MAX_LATENCY_MS;
    st_adaptive_done(&u->adaptive, now_ms, &c->ticket, ms, a->outcome.cls);
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
        if (u->adaptive_enabled)
            adaptive_done(u, c, a, now_ms);
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

/* ---- spend caps ------------------------------------------------------------ */

void st_decider_set_spend(st_decider *d, st_spend_book *b, int64_t now_ms)
{
    int i;
    st_upstream *u;

    if (d->spend != NULL && d->spend != b)
        st_spend_book_free(d->spend);
    d->spend = b;
    for (i = 0; i < ST_KEY_BUCKETS; i++)
        for (u = d->keys[i]; u; u = u->next) {
            if (b != NULL)
                key_spend(d, u, now_ms);
            else
                u->spend = NULL;
        }
}

static double clamp_tokens(double v)
{
    return v > 0 ? (v < (double)ST_SPEND_MAX ? ceil(v) : (double)ST_SPEND_MAX) : 0;
}

static void spend_amounts(double usd, double tokens, int64_t out[ST_SPEND_DIMS])
{
    out[ST_SPEND_COST] = st_spend_usd(usd);
    out[ST_SPEND_TOKENS] = (int64_t)clamp_tokens(tokens);
}

void st_call_spend_init(st_decider *d, st_upstream *u, st_call *c, const char *tag, double usd, double tokens,
                        int64_t now_ms)
{
    int64_t amount[ST_SPEND_DIMS];

    memset(&c->spend, 0, sizeof c->spend);
    if (d->spend == NULL)
        return;
    spend_amounts(usd, tokens, amount);
    st_spend_book_call(d->spend, &c->spend, u != NULL ? u->spend : NULL, tag, amount, now_ms);
}

uint64_t st_call_spend_end(st_decider *d, st_upstream *u, st_call *c, long last_status, int64_t now_ms,
                           st_events *ev)
{
    st_spend_warnings w;
    uint64_t id;

    if (d->spend == NULL || c->spend.state != ST_CALL_SPEND_HELD)
        return 0;
    w.n = w.dropped = 0;
    id = st_spend_book_end(d->spend, &c->spend, last_status >= 200 && last_status < 300, now_ms, &w);
    warning_events(ev, u, &w);
    return id;
}

int st_decider_spend_settle(st_decider *d, uint64_t id, double usd, double tokens, int64_t now_ms, st_events *ev)
{
    st_spend_warnings w;
    int64_t actual[ST_SPEND_DIMS];
    int done;

    if (d->spend == NULL || id == 0)
        return 0;
    w.n = w.dropped = 0;
    spend_amounts(usd, tokens, actual);
    done = st_spend_book_settle(d->spend, id, actual, now_ms, &w);
    warning_events(ev, NULL, &w);
    return done;
}

void st_decider_spend_charge(st_decider *d, st_upstream *u, const char *tag, double usd, double tokens, int64_t now_ms,
                     st_events *ev)
{
    st_spend_warnings w;
    int64_t actual[ST_SPEND_DIMS];

    if (d->spend == NULL)
        return;
    w.n = w.dropped = 0;
    spend_amounts(usd, tokens, actual);
    st_spend_book_charge(d->spend, u != NULL ? u->spend : NULL, tag, actual, now_ms, &w);
    warning_events(ev, u, &w);
}

/* ---- hedges ---------------------------------------------------------------- */

/* The q-quantile of u's time to first byte in ms (to the nearest), or -1 when the
 * window holds fewer than min samples. */
static int64_t ttfb_quantile_ms(st_upstream *u, int64_t now_ms, double q, uint64_t min)
{
    uint64_t out;
    st_latency_summary sum;

    if (u->ttfb == NULL || !(q >= 0 && q <= 1))
        return -1;
    if (st_latency_query(u->ttfb, now_ms, &q, 1, &out, &sum) < min)
        return -1;
    return (int64_t)((out + 500) / 1000);
}

int64_t st_hedge_plan(st_decider *d, st_upstream *u, const st_call *c, const st_hedge_policy *p, int64_t now_ms)
{
    int64_t wait;

    (void)d;
    st_budget_deposit(&u->hedge, now_ms);
    wait = p->after_ms >= 0 ? p->after_ms : ttfb_quantile_ms(u, now_ms, p->quantile, ST_HEDGE_MIN_SAMPLES);
    if (wait < 0)
        return -1;
    if (wait > ST_RETRY_AFTER_MAX_MS)
        wait = ST_RETRY_AFTER_MAX_MS;
    if (c->deadline_ms > 0 && now_ms + wait >= c->deadline_ms)
        return -1;
    return wait;
}

int st_hedge_admit(st_decider *d, st_upstream *u, st_upstream *h, const st_call *c, const st_hedge_policy *p,
                   int64_t now_ms, const char **why)
{
    const char *no = NULL;

    (void)d;
    if (c->deadline_ms > 0) {
        int64_t left = c->deadline_ms - now_ms, median = ttfb_quantile_ms(h, now_ms, 0.5, 1);
        if (left <= 0 || (median >= 0 && left < median))
            no = "deadline";
    }
    if (no == NULL && h->breaker_enabled && st_breaker_state_now(&h->breaker) != ST_BREAKER_CLOSED)
        no = "breaker";
    if (no == NULL && (h->queued > 0 || h->in_flight >= st_upstream_cap(h)))
        no = "concurrency";
    if (no == NULL && st_limiter_wait_ms(&h->limiter, now_ms, c->cost) != 0)
        no = "limiter";
    if (no == NULL) {
        u->hedge.ratio = p->max_ratio > 0 ? (p->max_ratio < 1 ? p->max_ratio : 1) : 0;
        if (!st_budget_try_withdraw(&u->hedge, now_ms))
            no = "budget";
    }
    if (why)
        *why = no;
    if (no != NULL) {
        u->hedges_refused++;
        return 0;
    }
    u->hedges++;
    return 1;
}

void st_hedge_lost(st_upstream *u, int64_t now_ms, int64_t waited_ms)
{
    uint64_t us;
    if (waited_ms <= 0)
        return;
    us = (uint64_t)waited_ms * 1000;
    if (u->ttfb == NULL)
        u->ttfb = st_latency_new(u->latency_slots, u->latency_slot_ms, now_ms);
    if (u->ttfb)
        st_latency_record(u->ttfb, now_ms, us);
}
