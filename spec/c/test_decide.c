/* Specs for the decision core (decide.h), driven the way a transport drives it
 * but in virtual time: a small event loop holds the attempts in flight (each
 * ends at start + latency), retry waits, queue deadlines and the limiter's wake
 * times; a simulated upstream answers each attempt with a status and a response
 * head, fed to st_report as a real st_headers block. No network, no curl.
 *
 * The scenarios reproduce the figures measured earlier against the mock API
 * (outage, retry storm, goodput under a learned limit, slow start, 429 pauses),
 * then hostile hints and costs, and exactly-once accounting of slots, queue
 * places and breaker permits. */
#define _POSIX_C_SOURCE 200809L

#include "test.h"

#include "decide.h"
#include "headers.h"
#include "httpdate.h"
#include "timerheap.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define T0 INT64_C(1000000)             /* monotonic ms at the start of every run */
#define WALL0 INT64_C(1767225600000)    /* the wall clock at T0: 2026-01-01T00:00:00Z */

/* ------------------------------------------------------------ the event loop */

enum { CALL_IDLE = 0, CALL_QUEUED, CALL_RUNNING, CALL_WAITING, CALL_DONE };
enum { TIMER_CALL = 1, TIMER_WAKE };

#define REPLY_LINES 16
#define REPLY_LINE_MAX 112

typedef struct sim_call {
    st_call call;
    st_timer timer;              /* attempt end, retry wait or queue deadline, by state */
    st_upstream *up;
    int state;
    unsigned id;
    /* the attempt in flight, as the simulated upstream answered it */
    long status;                 /* 0 = the connection failed, no response */
    int64_t latency_ms;
    char lines[REPLY_LINES][REPLY_LINE_MAX];
    unsigned nlines;
    /* how the call ended */
    st_outcome result;
    long last_status;
    const char *stop;
    int retryable;
    unsigned hinted_retries;
    int64_t done_ms;
} sim_call;

typedef struct sim sim;
/* The simulated upstream: answers an attempt the moment it arrives (s->now),
 * filling c->status, c->latency_ms and the head lines. */
typedef void (*sim_serve_fn)(sim *s, sim_call *c);

struct sim {
    st_decider d;
    st_timerheap timers;
    st_headers head;
    int64_t now;
    sim_serve_fn serve;
    void *ud;
    unsigned sent;               /* attempts that reached the upstream */
    unsigned running, queued, waiting, done;
    unsigned max_in_flight, max_in_flight_unreplied;
    unsigned opens, half_opens, closes, learned, pauses, events_dropped;
    double last_pause_ms;
    unsigned drift, bad_lines;   /* invariant breaches seen after a step; head lines refused */
};

static int64_t wall_of(const sim *s)
{
    return WALL0 + (s->now - T0);
}

static void sim_init(sim *s, const st_retry_policy *rp, const st_upstream_config *uc, sim_serve_fn serve, void *ud)
{
    memset(s, 0, sizeof *s);
    st_decider_init(&s->d, rp, uc, 42);
    s->now = T0;
    s->serve = serve;
    s->ud = ud;
}

static void sim_free(sim *s)
{
    st_timerheap_free(&s->timers);
    st_headers_free(&s->head);
    st_decider_free(&s->d);
}

static void sim_events(sim *s, st_events *ev)
{
    unsigned i;
    for (i = 0; i < ev->n; i++) {
        const st_event *e = &ev->ev[i];
        if (e->type == ST_EVENT_BREAKER) {
            s->opens += e->to == ST_BREAKER_OPEN;
            s->half_opens += e->to == ST_BREAKER_HALF_OPEN;
            s->closes += e->to == ST_BREAKER_CLOSED;
        } else if (e->type == ST_EVENT_LIMIT_LEARNED) {
            s->learned++;
        } else if (e->type == ST_EVENT_PAUSED) {
            s->pauses++;
            s->last_pause_ms = e->pause_ms;
        }
    }
    s->events_dropped += ev->dropped;
    ev->n = ev->dropped = 0;
}

typedef struct tally { unsigned in_flight, queued, over_cap, probes_over; } tally;

static void tally_upstream(void *ud, st_upstream *u)
{
    tally *t = ud;
    t->in_flight += u->in_flight;
    t->queued += u->queued;
    t->over_cap += u->in_flight > u->concurrency;
    t->probes_over += u->breaker.probes_out > u->breaker.cfg.probes;
}

/* After every step: the core's counts match what the loop holds. */
static void sim_check(sim *s)
{
    tally t;
    memset(&t, 0, sizeof t);
    st_decider_each(&s->d, tally_upstream, &t);
    if (t.in_flight != s->running || t.queued != s->queued || t.over_cap || t.probes_over) {
        if (s->drift++ == 0)
            fprintf(stderr, "    drift at t=%lld: in_flight %u (loop %u), queued %u (loop %u), over cap %u, probes over %u\n",
                    (long long)(s->now - T0), t.in_flight, s->running, t.queued, s->queued, t.over_cap,
                    t.probes_over);
    }
}

static void sim_finish(sim *s, sim_call *c, st_outcome o, long status)
{
    c->state = CALL_DONE;
    c->result = o;
    c->last_status = status;
    c->done_ms = s->now;
    s->done++;
}

static void sim_push(sim *s, st_timer *t, int kind, int64_t due_ms)
{
    t->kind = kind;
    t->due_ms = due_ms;
    if (!st_timerheap_push(&s->timers, t)) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
}

static void reply_line(sim_call *c, const char *fmt, ...)
{
    va_list ap;
    if (c->nlines >= REPLY_LINES)
        return;
    va_start(ap, fmt);
    vsnprintf(c->lines[c->nlines++], REPLY_LINE_MAX, fmt, ap);
    va_end(ap);
}

static void sim_start(sim *s, sim_call *c)
{
    c->state = CALL_RUNNING;
    s->running++;
    s->sent++;
    if (c->up->in_flight > s->max_in_flight)
        s->max_in_flight = c->up->in_flight;
    if (!c->up->replied && c->up->in_flight > s->max_in_flight_unreplied)
        s->max_in_flight_unreplied = c->up->in_flight;
    c->status = 200;
    c->latency_ms = 10;
    c->nlines = 0;
    s->serve(s, c);
    sim_push(s, &c->timer, TIMER_CALL, s->now + c->latency_ms);
}

/* As the engine's schedule_wake: one timer per upstream, the earliest wins. */
static void sim_wake(sim *s, st_upstream *u, int64_t wake_ms)
{
    if (wake_ms <= 0 || (u->wake.slot != 0 && u->wake.due_ms <= wake_ms))
        return;
    st_timerheap_remove(&s->timers, &u->wake);
    sim_push(s, &u->wake, TIMER_WAKE, wake_ms);
}

static sim_call *call_of(st_call *c)
{
    return (sim_call *)(void *)((char *)c - offsetof(sim_call, call));
}

static void sim_pump(sim *s, st_upstream *u)
{
    st_admission a;
    st_events ev;
    st_call *cc;

    ev.n = ev.dropped = 0;
    while ((cc = st_pump(&s->d, u, s->now, &a, &ev)) != NULL) {
        sim_call *c = call_of(cc);
        st_timerheap_remove(&s->timers, &c->timer);
        s->queued--;
        if (a.verdict == ST_ADMIT_START)
            sim_start(s, c);
        else
            sim_finish(s, c, a.refusal, 0);
        sim_events(s, &ev);
    }
    sim_events(s, &ev);
    sim_wake(s, u, a.wake_ms);
}

static void sim_admit(sim *s, sim_call *c)
{
    st_admission a;
    st_events ev;

    ev.n = ev.dropped = 0;
    st_admit(&s->d, c->up, &c->call, s->now, &a, &ev);
    sim_events(s, &ev);
    switch (a.verdict) {
    case ST_ADMIT_START:
        sim_start(s, c);
        break;
    case ST_ADMIT_REFUSED:
        sim_finish(s, c, a.refusal, 0);
        break;
    case ST_ADMIT_QUEUED:
        c->state = CALL_QUEUED;
        s->queued++;
        if (c->call.deadline_ms > 0)
            sim_push(s, &c->timer, TIMER_CALL, c->call.deadline_ms);
        sim_wake(s, c->up, a.wake_ms);
        break;
    }
}

static void sim_submit_with(sim *s, sim_call *c, const char *key, int64_t total_ms, unsigned attempts,
                            double input_tokens, double output_tokens)
{
    unsigned id = c->id;
    memset(c, 0, sizeof *c);
    c->id = id;
    c->up = st_decider_upstream(&s->d, key, s->now);
    if (c->up == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    st_call_init(&c->call, &s->d, s->now, total_ms, attempts, ST_PRIORITY_NORMAL, input_tokens, output_tokens);
    sim_admit(s, c);
}

static void sim_submit(sim *s, sim_call *c, const char *key)
{
    sim_submit_with(s, c, key, 0, 0, 0, 0);
}

static st_outcome attempt_outcome(long status)
{
    static const st_outcome connection = { ST_CLASS_TRANSIENT, "connection" };
    return status > 0 ? st_outcome_of_status(status) : connection;
}

/* The attempt in flight ended: report, free its place, decide (as the engine's attempt_done). */
static void sim_attempt_end(sim *s, sim_call *c)
{
    st_attempt_end a;
    st_retry_decision d;
    st_events ev;
    unsigned i;

    s->running--;
    st_headers_reset(&s->head);
    for (i = 0; i < c->nlines; i++)
        if (st_headers_add_line(&s->head, c->lines[i], strlen(c->lines[i])) != ST_HEADERS_OK)
            s->bad_lines++;
    a.outcome = attempt_outcome(c->status);
    a.status = c->status;
    a.headers = c->status > 0 ? &s->head : NULL;
    a.ttfb_us = a.total_us = (uint64_t)c->latency_ms * 1000;
    ev.n = ev.dropped = 0;
    st_report(&s->d, c->up, &c->call, &a, s->now, wall_of(s), &ev);
    sim_events(s, &ev);
    sim_pump(s, c->up);
    st_retry_decide(&s->d, c->up, &c->call, &a, s->now, &d);
    c->retryable = d.retryable;
    c->stop = d.stop;
    if (!d.retry) {
        sim_finish(s, c, a.outcome, c->status);
        return;
    }
    c->hinted_retries += (unsigned)d.hinted;
    c->state = CALL_WAITING;
    s->waiting++;
    sim_push(s, &c->timer, TIMER_CALL, s->now + (int64_t)d.delay_ms);
}

/* The caller cancels (as st_engine_cancel); a finished call is released again, harmlessly. */
static void sim_cancel(sim *s, sim_call *c)
{
    static const st_outcome canceled = { ST_CLASS_CANCELED, "canceled" };
    st_events ev;
    int was = c->state;

    ev.n = ev.dropped = 0;
    if (was == CALL_DONE || was == CALL_IDLE) {
        if (was == CALL_DONE)
            st_release(&s->d, c->up, &c->call, s->now, &ev);
        sim_events(s, &ev);
        return;
    }
    st_timerheap_remove(&s->timers, &c->timer);
    s->running -= was == CALL_RUNNING;
    s->queued -= was == CALL_QUEUED;
    s->waiting -= was == CALL_WAITING;
    st_release(&s->d, c->up, &c->call, s->now, &ev);
    sim_events(s, &ev);
    sim_finish(s, c, canceled, 0);
    if (was == CALL_RUNNING)
        sim_pump(s, c->up);
}

/* Fires the next timer due at or before `until`; 0 when there is none. */
static int sim_step(sim *s, int64_t until)
{
    st_timer *t = st_timerheap_peek(&s->timers);
    sim_call *c;

    if (t == NULL || t->due_ms > until)
        return 0;
    st_timerheap_remove(&s->timers, t);
    if (t->due_ms > s->now)
        s->now = t->due_ms;
    if (t->kind == TIMER_WAKE) {
        sim_pump(s, (st_upstream *)(void *)((char *)t - offsetof(st_upstream, wake)));
    } else {
        c = (sim_call *)(void *)((char *)t - offsetof(sim_call, timer));
        if (c->state == CALL_RUNNING) {
            sim_attempt_end(s, c);
        } else if (c->state == CALL_WAITING) {
            s->waiting--;
            sim_admit(s, c);
        } else if (c->state == CALL_QUEUED) {
            static const st_outcome expired = { ST_CLASS_TIMEOUT, "total_timeout" };
            st_unqueue(c->up, &c->call);
            s->queued--;
            sim_finish(s, c, expired, 0);
        }
    }
    sim_check(s);
    return 1;
}

static void sim_run_until(sim *s, int64_t t)
{
    while (sim_step(s, t))
        ;
    if (t > s->now)
        s->now = t;
}

/* Runs until nothing is left to happen; the clock stays at the last event. */
static void sim_drain(sim *s)
{
    while (sim_step(s, INT64_MAX))
        ;
}

static void sim_run_until_done(sim *s, const sim_call *c)
{
    while (c->state != CALL_DONE && sim_step(s, INT64_MAX))
        ;
}

static sim_call *calls_new(unsigned n)
{
    sim_call *c = calloc(n, sizeof *c);
    unsigned i;
    if (c == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    for (i = 0; i < n; i++)
        c[i].id = i;
    return c;
}

static int is_kind(const sim_call *c, const char *kind)
{
    return c->result.kind != NULL && strcmp(c->result.kind, kind) == 0;
}

/* "2026-01-01T00:00:07Z" */
static void rfc3339(char *buf, size_t n, int64_t epoch_s)
{
    time_t t = (time_t)epoch_s;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* ------------------------------------------------------------ upstreams */

/* Hard down (503 after 20 ms) until down_until, then well (200 after 20 ms). */
typedef struct outage_upstream { int64_t down_until; unsigned seen_down; } outage_upstream;

static void serve_outage(sim *s, sim_call *c)
{
    outage_upstream *o = s->ud;
    c->latency_ms = 20;
    if (s->now < o->down_until) {
        c->status = 503;
        o->seen_down++;
    }
}

/* The first `ok_first` attempts succeed, every later one answers `status`. */
typedef struct constant_upstream { unsigned ok_first, seen; long status; int64_t latency_ms; } constant_upstream;

static void serve_constant(sim *s, sim_call *c)
{
    constant_upstream *k = s->ud;
    c->latency_ms = k->latency_ms;
    c->status = k->seen++ < k->ok_first ? 200 : k->status;
}

/* A provider's limiter as the mock has it: a continuously refilling token
 * bucket (rpm per minute, `burst` deep), Anthropic rate-limit headers on every
 * reply (reset = when the bucket is full again, RFC 3339 rounded up to the
 * second), 429 with retry-after (whole seconds until one token) when empty. */
typedef struct bucket_upstream {
    double rpm, burst, tokens;
    int64_t last_ms;
    int64_t lat_min, lat_max;
    int send_limits;
    unsigned drop_first;          /* the first attempts get no response at all */
    unsigned dropped, served, throttled;
    st_rng rng;
} bucket_upstream;

static void bucket_init(bucket_upstream *b, double rpm, double burst, int64_t lat_min, int64_t lat_max)
{
    memset(b, 0, sizeof *b);
    b->rpm = rpm;
    b->burst = burst;
    b->tokens = burst;
    b->last_ms = T0;
    b->lat_min = lat_min;
    b->lat_max = lat_max;
    b->send_limits = 1;
    st_rng_seed(&b->rng, 7);
}

static void serve_bucket(sim *s, sim_call *c)
{
    bucket_upstream *b = s->ud;
    double rate = b->rpm / 60000.0; /* per ms */
    double wall_s = (double)wall_of(s) / 1000.0;
    char reset[32];

    b->tokens += (double)(s->now - b->last_ms) * rate;
    if (b->tokens > b->burst)
        b->tokens = b->burst;
    b->last_ms = s->now;
    c->latency_ms = b->lat_min + (int64_t)(st_rng_next(&b->rng) % (uint64_t)(b->lat_max - b->lat_min + 1));
    if (b->dropped < b->drop_first) {
        b->dropped++;
        c->status = 0;
        return;
    }
    if (b->tokens >= 1) {
        b->tokens -= 1;
        b->served++;
    } else {
        double wait_s;
        c->status = 429;
        b->throttled++;
        wait_s = ceil((1 - b->tokens) / rate / 1000.0);
        reply_line(c, "retry-after: %.0f", wait_s > 1 ? wait_s : 1.0);
    }
    reply_line(c, "request-id: req_%u_%u", c->id, c->call.attempts);
    if (!b->send_limits)
        return;
    rfc3339(reset, sizeof reset, (int64_t)ceil(wall_s + (b->burst - b->tokens) / rate / 1000.0));
    reply_line(c, "anthropic-ratelimit-requests-limit: %.0f", b->rpm);
    reply_line(c, "anthropic-ratelimit-requests-remaining: %.0f", floor(b->tokens));
    reply_line(c, "anthropic-ratelimit-requests-reset: %s", reset);
    rfc3339(reset, sizeof reset, (int64_t)ceil(wall_s + 1));
    reply_line(c, "anthropic-ratelimit-input-tokens-limit: 2000000");
    reply_line(c, "anthropic-ratelimit-input-tokens-remaining: 2000000");
    reply_line(c, "anthropic-ratelimit-input-tokens-reset: %s", reset);
    reply_line(c, "anthropic-ratelimit-output-tokens-limit: 400000");
    reply_line(c, "anthropic-ratelimit-output-tokens-remaining: 400000");
    reply_line(c, "anthropic-ratelimit-output-tokens-reset: %s", reset);
    reply_line(c, "anthropic-ratelimit-tokens-limit: 2400000");
    reply_line(c, "anthropic-ratelimit-tokens-remaining: 2400000");
    reply_line(c, "anthropic-ratelimit-tokens-reset: %s", reset);
}

/* ------------------------------------------------------------ outage */

/* A steady stream (one call every 50 ms, one attempt each) against an upstream
 * that is hard down for 20 s, then until a call succeeds. */
static void outage_run(int64_t max_open_ms, unsigned *seen, unsigned *half_opens, unsigned *refused,
                       int64_t *back_ms, int64_t *last_open_ms)
{
    enum { INTERVAL = 50, OUTAGE = 20000, OPEN = 2000, MIN_CALLS = 10, PROBES = 2, N = 1000 };
    st_retry_policy rp;
    st_upstream_config uc;
    outage_upstream o;
    sim s;
    sim_call *calls = calls_new(N);
    unsigned i, bad_retry_after = 0, first_ok = N, oks = 0;
    st_breaker_stats bs;

    st_retry_policy_defaults(&rp);
    rp.attempts = 1;
    st_upstream_config_defaults(&uc);
    uc.breaker.min_calls = MIN_CALLS;
    uc.breaker.open_ms = OPEN;
    uc.breaker.max_open_ms = max_open_ms;
    uc.breaker.probes = PROBES;
    o.down_until = T0 + OUTAGE;
    o.seen_down = 0;
    sim_init(&s, &rp, &uc, serve_outage, &o);

    *refused = 0;
    *last_open_ms = 0;
    *half_opens = 0;
    for (i = 0; i < N && oks < 5; i++) {
        sim_run_until(&s, T0 + (int64_t)i * INTERVAL);
        if (i > 0 && calls[i - 1].state == CALL_DONE && calls[i - 1].result.cls == ST_CLASS_SUCCESS) {
            if (oks++ == 0)
                first_ok = i - 1;
        }
        if (s.now >= o.down_until && *last_open_ms == 0) {
            st_breaker_stats_get(&calls[0].up->breaker, s.now, &bs);
            *last_open_ms = bs.current_open_ms;
            *half_opens = s.half_opens;
        }
        sim_submit(&s, &calls[i], "sick");
        if (calls[i].state == CALL_DONE && is_kind(&calls[i], "circuit_open")) {
            /* refused at once, with when to try again */
            if (s.now < o.down_until)
                ++*refused;
            if (calls[i].call.retry_after_ms <= 0 || calls[i].call.retry_after_ms > max_open_ms)
                bad_retry_after++;
        }
    }
    sim_drain(&s);
    CHECK(first_ok < N);
    *seen = o.seen_down;
    *back_ms = first_ok < N ? calls[first_ok].done_ms - o.down_until : -1;
    CHECK_EQ_INT(bad_retry_after, 0);
    CHECK_EQ_INT(s.drift, 0);
    /* after the probes succeed the breaker is closed and traffic flows */
    st_breaker_stats_get(&calls[0].up->breaker, s.now, &bs);
    CHECK_EQ_INT(bs.state, ST_BREAKER_CLOSED);
    CHECK(s.closes >= 1);
    /* every call of the outage reached the upstream or was refused at once */
    CHECK_EQ_INT(*seen + *refused, OUTAGE / INTERVAL);
    sim_free(&s);
    free(calls);
}

static void test_outage(void)
{
    unsigned seen = 0, half_opens = 0, refused = 0;
    int64_t back = 0, last_open = 0;

    /* as the mock run: the open time stays at open_for (max_open_for = open_for) */
    outage_run(2000, &seen, &half_opens, &refused, &back, &last_open);
    printf("decide: 20 s outage, 20 calls/s: upstream saw %u calls (min_calls 10 + probes 2 x %u half-opens = %u at most), "
           "%u refused at once; traffic back %.2f s after it ended\n",
           seen, half_opens, 10 + 2 * half_opens, refused, (double)back / 1000);
    CHECK(seen <= 10 + 2 * half_opens);
    /* exactly, in virtual time: the 10th failure opens it at 0.47 s; every 2.05 s
     * (open_for, the next call 30 ms later, its 503 20 ms after) a half-open
     * sends one probe that fails: 9 half-opens in 20 s, 10 + 9 calls (the mock
     * run: 19), the other 381 refused at once (the mock: 350+). The last open
     * ends at 20.92 s; the call at 20.95 s succeeds at 20.97 s. */
    CHECK_EQ_INT(half_opens, 9);
    CHECK_EQ_INT(seen, 19);
    CHECK_EQ_INT(refused, 381);
    CHECK_EQ_INT(back, 970);
    CHECK(back <= 2000 + 50 + 20);      /* within one open period, one call interval, one reply */

    /* open time doubling on repeated opens (default max_open_for): fewer probes,
     * traffic back within the last open period */
    outage_run(300000, &seen, &half_opens, &refused, &back, &last_open);
    printf("decide: 20 s outage, open time doubling: upstream saw %u calls over %u half-opens, %u refused; "
           "traffic back %.2f s after it ended (open period %.0f s)\n",
           seen, half_opens, refused, (double)back / 1000, (double)last_open / 1000);
    /* open 2 s from 0.47 s, 4 s from 2.52 s, 8 s from 6.57 s, 16 s from 14.62 s */
    CHECK_EQ_INT(half_opens, 3);
    CHECK_EQ_INT(seen, 10 + half_opens);
    CHECK_EQ_INT(last_open, 16000);
    CHECK_EQ_INT(back, 10670);          /* the call at 30.65 s, its reply at 30.67 s */
    CHECK(back <= last_open + 50 + 20);
}

/* ------------------------------------------------------------ retry storm */

/* n sequential calls against a constant 503 (breaker off, 4 attempts, 1 ms
 * backoff as the mock spec), after ok_first successful ones. */
static unsigned storm(int budget, unsigned ok_first, unsigned n, unsigned *exhausted, unsigned *used_up,
                      unsigned *other)
{
    st_retry_policy rp;
    st_upstream_config uc;
    constant_upstream k;
    sim s;
    sim_call *calls = calls_new(n + ok_first);
    unsigned i, sent;

    st_retry_policy_defaults(&rp);
    rp.attempts = 4;
    rp.base_ms[ST_CLASS_OVERLOADED] = 1;
    rp.budget_enabled = budget;
    st_upstream_config_defaults(&uc);
    uc.breaker_enabled = 0;
    k.ok_first = ok_first;
    k.seen = 0;
    k.status = 503;
    k.latency_ms = 5;
    sim_init(&s, &rp, &uc, serve_constant, &k);
    *exhausted = *used_up = *other = 0;
    for (i = 0; i < ok_first + n; i++) {
        sim_submit(&s, &calls[i], "storm");
        sim_run_until_done(&s, &calls[i]);
        if (i < ok_first) {
            *other += calls[i].result.cls != ST_CLASS_SUCCESS;
            continue;
        }
        /* every error is the last attempt's: overloaded, 503, retryable */
        if (calls[i].result.cls != ST_CLASS_OVERLOADED || calls[i].last_status != 503 || !calls[i].retryable
            || calls[i].stop == NULL)
            ++*other;
        else if (strcmp(calls[i].stop, "budget_exhausted") == 0)
            ++*exhausted;
        else if (strcmp(calls[i].stop, "attempts") == 0)
            ++*used_up;
        else
            ++*other;
    }
    /* the whole run sits inside one budget window (10 s) */
    CHECK(s.now - T0 < 10000);
    CHECK_EQ_INT(s.drift, 0);
    sent = s.sent;
    sim_free(&s);
    free(calls);
    return sent;
}

static void test_retry_storm(void)
{
    unsigned exhausted, used_up, other, sent;

    sent = storm(1, 0, 300, &exhausted, &used_up, &other);
    printf("decide: retry storm, 300 calls on a constant 503: %u attempts reached the upstream "
           "(300 + 3/s x 10 s = 330), %u stopped by the budget", sent, exhausted);
    CHECK_EQ_INT(sent, 300 + 30);
    CHECK_EQ_INT(used_up, 10);      /* the first 10 calls spend the 30 retries */
    CHECK_EQ_INT(exhausted, 290);
    CHECK_EQ_INT(other, 0);

    sent = storm(0, 0, 300, &exhausted, &used_up, &other);
    printf("; without a budget %u\n", sent);
    CHECK_EQ_INT(sent, 1200);
    CHECK_EQ_INT(used_up, 300);
    CHECK_EQ_INT(exhausted, 0);
    CHECK_EQ_INT(other, 0);

    /* 100 successes first add 20% of them to the allowance */
    sent = storm(1, 100, 300, &exhausted, &used_up, &other);
    printf("decide: retry storm after 100 successes: %u attempts (100 + 300 + 30 + 20)\n", sent);
    CHECK_EQ_INT(sent, 100 + 300 + 30 + 20);
    CHECK_EQ_INT(used_up, 16);      /* 50 retries: 16 calls use 3, the 17th 2 */
    CHECK_EQ_INT(exhausted, 300 - 16);
    CHECK_EQ_INT(other, 0);
}

/* ------------------------------------------------------------ goodput */

/* 1000 calls through a batch of 100 against the bucket provider at 3000/min,
 * nothing configured but the concurrency (as bench/goodput.lua); replies take
 * lat_min..lat_max ms. Checks the bounds; returns the time and the 429 share. */
static void goodput_run(int64_t lat_min, int64_t lat_max, double *secs, double *pct429)
{
    enum { N = 1000, CONCURRENCY = 100 };
    st_upstream_config uc;
    bucket_upstream b;
    sim s;
    sim_call *calls = calls_new(N);
    unsigned next = 0, ok = 0, i, requests;
    int64_t end = T0;
    double ideal_ms = N / (3000.0 / 60000.0);

    st_upstream_config_defaults(&uc);
    uc.concurrency = CONCURRENCY;
    bucket_init(&b, 3000, 3000.0 / 60, lat_min, lat_max);
    sim_init(&s, NULL, &uc, serve_bucket, &b);
    while (s.done < N) {
        while (next < N && next - s.done < CONCURRENCY)
            sim_submit(&s, &calls[next++], "goodput");
        if (!sim_step(&s, INT64_MAX))
            break;
    }
    for (i = 0; i < N; i++) {
        ok += calls[i].state == CALL_DONE && calls[i].result.cls == ST_CLASS_SUCCESS;
        if (calls[i].done_ms > end)
            end = calls[i].done_ms;
    }
    requests = b.served + b.throttled;
    *secs = (double)(end - T0) / 1000;
    *pct429 = 100.0 * b.throttled / requests;
    printf("decide: goodput, replies in %lld-%lld ms: %u/%u succeeded in %.2f s (ideal %.1f s, ratio %.3f), "
           "429s %u (%.2f%% of %u requests)\n",
           (long long)lat_min, (long long)lat_max, ok, N, *secs, ideal_ms / 1000, (double)(end - T0) / ideal_ms,
           b.throttled, *pct429, requests);
    CHECK_EQ_INT(ok, N);
    CHECK((double)(end - T0) <= 1.05 * ideal_ms);
    CHECK(end - T0 >= 19000);           /* the provider lets no more through: 50 at once, then 50/s */
    CHECK(b.throttled * 100 < requests);
    CHECK(st_limiter_limit(&calls[0].up->limiter, ST_DIM_REQUESTS) == 3000);
    CHECK(s.learned >= 1);
    CHECK(s.max_in_flight_unreplied <= ST_SLOW_START);
    CHECK(s.max_in_flight <= CONCURRENCY);
    CHECK_EQ_INT(s.bad_lines, 0);
    CHECK_EQ_INT(s.drift, 0);
    sim_free(&s);
    free(calls);
}

static void test_goodput(void)
{
    static const int64_t latency[][2] = { { 1, 5 }, { 20, 80 }, { 200, 1500 } };
    double secs, pct;
    unsigned i;

    for (i = 0; i < sizeof latency / sizeof latency[0]; i++)
        goodput_run(latency[i][0], latency[i][1], &secs, &pct);
}

/* ------------------------------------------------------------ slow start */

/* 20 calls at once on a fresh key with concurrency 16 (the default); replies
 * after 100 ms. */
static void slow_start_run(int send_limits, unsigned drop_first)
{
    enum { N = 20 };
    bucket_upstream b;
    sim s;
    sim_call *calls = calls_new(N);
    st_upstream *u;
    unsigned i, ok = 0;

    bucket_init(&b, 3000, 50, 100, 100);
    b.send_limits = send_limits;
    b.drop_first = drop_first;
    sim_init(&s, NULL, NULL, serve_bucket, &b);
    for (i = 0; i < N; i++)
        sim_submit(&s, &calls[i], "fresh");
    u = calls[0].up;
    CHECK_EQ_INT(u->in_flight, ST_SLOW_START);
    CHECK_EQ_INT(u->queued, N - ST_SLOW_START);
    CHECK_EQ_INT(st_upstream_cap(u), ST_SLOW_START);
    if (drop_first > 0) {
        /* attempts that end without a response teach nothing: still 4 */
        sim_run_until(&s, T0 + 100);
        CHECK_EQ_INT(u->replied, 0);
        CHECK_EQ_INT(u->in_flight, ST_SLOW_START);
        CHECK_EQ_INT(s.sent, 2 * ST_SLOW_START);
    } else {
        /* the first reply: the cap opens to 16 at once */
        CHECK(sim_step(&s, INT64_MAX));
        CHECK_EQ_INT(s.now, T0 + 100);
        CHECK_EQ_INT(st_upstream_cap(u), 16);
        CHECK_EQ_INT(u->in_flight, 16);       /* 3 still out + 13 from the queue */
        CHECK_EQ_INT(u->queued, N - ST_SLOW_START - 13);
        CHECK_EQ_INT(st_limiter_known(&u->limiter), send_limits);
    }
    sim_drain(&s);
    for (i = 0; i < N; i++)
        ok += calls[i].result.cls == ST_CLASS_SUCCESS;
    CHECK_EQ_INT(ok, N);
    CHECK_EQ_INT(s.max_in_flight_unreplied, ST_SLOW_START);
    CHECK(s.max_in_flight <= 16);
    if (drop_first == 0)
        CHECK_EQ_INT(s.max_in_flight, 16);
    CHECK_EQ_INT(s.drift, 0);
    sim_free(&s);
    free(calls);
}

static void test_slow_start(void)
{
    slow_start_run(1, 0);   /* a reply that teaches the limits */
    slow_start_run(0, 0);   /* any reply ends slow start */
    slow_start_run(1, 8);   /* attempts that get no response do not */
    printf("decide: slow start: %d in flight until the first reply, then limits.concurrency (16)\n", ST_SLOW_START);
}

/* ------------------------------------------------------------ 429 pauses the key */

typedef struct pause_upstream {
    const char *first_retry_after;    /* the first attempt gets 429 with this retry-after */
    unsigned seen;
    int64_t starts[64];
} pause_upstream;

static void serve_pause(sim *s, sim_call *c)
{
    pause_upstream *p = s->ud;
    if (strcmp(c->up->name, "paused") != 0)
        return;
    if (p->seen < 64)
        p->starts[p->seen] = s->now;
    if (p->seen++ == 0) {
        c->status = 429;
        c->latency_ms = 10;
        reply_line(c, "retry-after: %s", p->first_retry_after);
    } else {
        c->latency_ms = 50;
    }
}

static void test_429_pauses_key(void)
{
    enum { N = 10 };
    st_upstream_config uc;
    pause_upstream p;
    sim s;
    sim_call *calls = calls_new(N + 2);
    unsigned i, early = 0;
    int64_t first_after = INT64_MAX;

    /* retry-after 2: the four in flight are out, the six queued wait 2 s */
    memset(&p, 0, sizeof p);
    p.first_retry_after = "2";
    st_upstream_config_defaults(&uc);
    uc.concurrency = 4;
    sim_init(&s, NULL, &uc, serve_pause, &p);
    for (i = 0; i < N; i++)
        sim_submit(&s, &calls[i], "paused");
    CHECK_EQ_INT(s.sent, 4);
    sim_run_until(&s, T0 + 10);                 /* the 429 */
    CHECK_EQ_INT(s.pauses, 1);
    CHECK(s.last_pause_ms == 2000);
    CHECK_EQ_INT(calls[0].state, CALL_WAITING);
    /* another key is not paused */
    sim_submit(&s, &calls[N], "other");
    CHECK_EQ_INT(calls[N].state, CALL_RUNNING);
    sim_drain(&s);
    CHECK_EQ_INT(p.seen, N + 1);              /* ten calls, one retry */
    for (i = 4; i < p.seen && i < 64; i++)
        if (p.starts[i] < first_after)
            first_after = p.starts[i];
    for (i = 1; i < 4; i++)
        early += p.starts[i] != T0;
    printf("decide: a 429 with retry-after 2 s at t=0.01 s: the queued calls of the key started at t=%.3f s\n",
           (double)(first_after - T0) / 1000);
    CHECK_EQ_INT(early, 0);
    CHECK_EQ_INT(first_after, T0 + 10 + 2000);   /* not one before the pause ends, and at once then */
    CHECK_EQ_INT(calls[0].hinted_retries, 1);
    for (i = 0; i < N; i++)
        CHECK(calls[i].result.cls == ST_CLASS_SUCCESS);
    CHECK_EQ_INT(s.drift, 0);
    sim_free(&s);

    /* retry-after 120 s > honor_retry_after 60 s: surfaced, and the key is
     * paused for max_pause (30 s here), not for 120 s */
    memset(&p, 0, sizeof p);
    p.first_retry_after = "120";
    uc.max_pause_ms = 30000;
    sim_init(&s, NULL, &uc, serve_pause, &p);
    for (i = 0; i < N; i++)
        sim_submit(&s, &calls[i], "paused");
    sim_run_until(&s, T0 + 10);
    CHECK_EQ_INT(calls[0].state, CALL_DONE);
    CHECK(calls[0].stop != NULL && strcmp(calls[0].stop, "hint_too_long") == 0);
    CHECK_EQ_INT(calls[0].call.retry_after_ms, 120000);
    CHECK(is_kind(&calls[0], "rate_limited"));
    CHECK(s.last_pause_ms == 30000);
    sim_drain(&s);
    first_after = INT64_MAX;
    for (i = 4; i < p.seen && i < 64; i++)
        if (p.starts[i] < first_after)
            first_after = p.starts[i];
    CHECK_EQ_INT(first_after, T0 + 10 + 30000);
    sim_free(&s);

    /* with max_pause above honor_retry_after, a call that arrives during the
     * pause is refused at once, with retry_after the pause left */
    memset(&p, 0, sizeof p);
    p.first_retry_after = "120";
    st_upstream_config_defaults(&uc);
    sim_init(&s, NULL, &uc, serve_pause, &p);
    sim_submit(&s, &calls[0], "paused");
    sim_run_until_done(&s, &calls[0]);
    sim_run_until(&s, T0 + 1000);
    sim_submit(&s, &calls[1], "paused");
    CHECK_EQ_INT(calls[1].state, CALL_DONE);
    CHECK(is_kind(&calls[1], "rate_limited"));
    CHECK_EQ_INT(calls[1].call.retry_after_ms, 10 + 120000 - 1000);
    CHECK_EQ_INT(p.seen, 1);
    sim_free(&s);
    free(calls);
}

/* ------------------------------------------------------------ hostile hints */

typedef struct hint_upstream { long status; const char *lines[4]; } hint_upstream;

static void serve_hint(sim *s, sim_call *c)
{
    hint_upstream *h = s->ud;
    unsigned i;
    c->status = h->status;
    for (i = 0; i < 4 && h->lines[i]; i++)
        reply_line(c, "%s", h->lines[i]);
}

static void test_hostile_hints(void)
{
    st_upstream_config uc;
    hint_upstream h;
    st_breaker_stats bs;
    sim s;
    sim_call calls[4];
    int64_t t;
    static const char *const lies[] = {
        "retry-after: 99999999999", "retry-after-ms: 99999999999999999999999999",
        "retry-after: Fri, 31 Dec 9999 23:59:59 GMT",
    };
    unsigned i;

    memset(calls, 0, sizeof calls);
    st_upstream_config_defaults(&uc);     /* max_open_for 300 s, max_pause 300 s */
    for (i = 0; i < 3; i++) {
        /* a 503 claiming 3000 years: the breaker opens for max_open_for */
        memset(&h, 0, sizeof h);
        h.status = 503;
        h.lines[0] = lies[i];
        sim_init(&s, NULL, &uc, serve_hint, &h);
        sim_submit(&s, &calls[0], "liar");
        sim_run_until_done(&s, &calls[0]);
        t = s.now;
        CHECK(calls[0].stop != NULL && strcmp(calls[0].stop, "hint_too_long") == 0);
        CHECK_EQ_INT(calls[0].call.retry_after_ms, ST_RETRY_AFTER_MAX_MS);
        st_breaker_stats_get(&calls[0].up->breaker, t, &bs);
        CHECK_EQ_INT(bs.state, ST_BREAKER_OPEN);
        CHECK_EQ_INT(bs.open_until_ms, t + 300000);
        sim_run_until(&s, t + 1);
        sim_submit(&s, &calls[1], "liar");
        CHECK(is_kind(&calls[1], "circuit_open"));
        CHECK_EQ_INT(calls[1].call.retry_after_ms, 300000 - 1);
        h.status = 200;
        h.lines[0] = NULL;
        sim_run_until(&s, t + 300000);
        sim_submit(&s, &calls[2], "liar");
        CHECK_EQ_INT(calls[2].state, CALL_RUNNING);   /* a probe: the breaker was not parked */
        sim_run_until_done(&s, &calls[2]);
        CHECK(calls[2].result.cls == ST_CLASS_SUCCESS);
        sim_free(&s);

        /* a 429 claiming as much: the key pauses for max_pause */
        memset(&h, 0, sizeof h);
        h.status = 429;
        h.lines[0] = lies[i];
        sim_init(&s, NULL, &uc, serve_hint, &h);
        sim_submit(&s, &calls[0], "liar");
        sim_run_until_done(&s, &calls[0]);
        t = s.now;
        CHECK(calls[0].stop != NULL && strcmp(calls[0].stop, "hint_too_long") == 0);
        CHECK(s.last_pause_ms == 300000);
        CHECK_EQ_INT(calls[0].up->limiter.paused_until_ms, t + 300000);
        sim_run_until(&s, t + 1);
        sim_submit(&s, &calls[1], "liar");
        CHECK(is_kind(&calls[1], "rate_limited"));
        CHECK_EQ_INT(calls[1].call.retry_after_ms, 300000 - 1);
        h.status = 200;
        h.lines[0] = NULL;
        sim_run_until(&s, t + 300000);
        sim_submit(&s, &calls[2], "liar");
        CHECK_EQ_INT(calls[2].state, CALL_RUNNING);
        sim_free(&s);
    }

    /* hints that are no hints: the throttled base pause and plain backoff */
    {
        static const char *const junk[] = {
            "retry-after: -5", "retry-after: NaN", "retry-after: 1.5", "retry-after-ms: -1", "retry-after: 0"
        };
        for (i = 0; i < sizeof junk / sizeof junk[0]; i++) {
            memset(&h, 0, sizeof h);
            h.status = 429;
            h.lines[0] = junk[i];
            sim_init(&s, NULL, &uc, serve_hint, &h);
            sim_submit(&s, &calls[0], "junk");
            sim_run_until(&s, T0 + 10);
            CHECK_EQ_INT(calls[0].state, CALL_WAITING);
            CHECK_EQ_INT(calls[0].call.hint_ms, -1);
            CHECK(s.last_pause_ms == 1000);
            CHECK_EQ_INT(calls[0].hinted_retries, 0);
            sim_free(&s);
        }
    }

    /* rate-limit headers that lie: nothing learned is NaN, negative or absurd,
     * and the key keeps working */
    {
        static const char *const junk_limits[][3] = {
            { "anthropic-ratelimit-requests-limit: NaN", "anthropic-ratelimit-requests-remaining: -3",
              "anthropic-ratelimit-requests-reset: yesterday" },
            { "anthropic-ratelimit-requests-limit: -60", "anthropic-ratelimit-requests-remaining: NaN",
              "anthropic-ratelimit-requests-reset: 9999-99-99T99:99:99Z" },
            { "anthropic-ratelimit-requests-limit: 1e999", "anthropic-ratelimit-requests-remaining: 1e999",
              "anthropic-ratelimit-requests-reset: 9999-12-31T23:59:59Z" },
            { "x-ratelimit-limit-requests: 99999999999999999999999", "x-ratelimit-remaining-requests: inf",
              "x-ratelimit-reset-requests: 99999999h" },
        };
        unsigned j;
        for (i = 0; i < sizeof junk_limits / sizeof junk_limits[0]; i++) {
            double lim;
            memset(&h, 0, sizeof h);
            h.status = 200;
            for (j = 0; j < 3; j++)
                h.lines[j] = junk_limits[i][j];
            sim_init(&s, NULL, &uc, serve_hint, &h);
            sim_submit(&s, &calls[0], "junk");
            sim_run_until_done(&s, &calls[0]);
            lim = st_limiter_limit(&calls[0].up->limiter, ST_DIM_REQUESTS);
            CHECK(lim >= 0 && lim <= 1e12);
            sim_submit(&s, &calls[1], "junk");
            /* it starts now or is paced for a bounded time, never refused or parked */
            sim_run_until(&s, s.now + 2000);
            CHECK(calls[1].state == CALL_RUNNING || calls[1].state == CALL_DONE);
            CHECK(calls[1].result.cls == ST_CLASS_SUCCESS || calls[1].state == CALL_RUNNING);
            CHECK_EQ_INT(s.drift, 0);
            sim_free(&s);
        }
    }
    /* "nothing left until the year 9999" on a 200: a hold, the limiter's own
     * pause; capped at max_pause like a 429's */
    {
        static const char *const holds[][2] = {
            { "anthropic-ratelimit-requests-remaining: 0", "anthropic-ratelimit-requests-reset: 9999-12-31T23:59:59Z" },
            { "x-ratelimit-remaining-requests: 0", "x-ratelimit-reset-requests: 99999999h" },
        };
        for (i = 0; i < sizeof holds / sizeof holds[0]; i++) {
            memset(&h, 0, sizeof h);
            h.status = 200;
            h.lines[0] = holds[i][0];
            h.lines[1] = holds[i][1];
            sim_init(&s, NULL, &uc, serve_hint, &h);
            sim_submit(&s, &calls[0], "hold");
            sim_run_until_done(&s, &calls[0]);
            t = s.now;
            CHECK(calls[0].result.cls == ST_CLASS_SUCCESS);
            sim_run_until(&s, t + 1);
            sim_submit(&s, &calls[1], "hold");
            CHECK(is_kind(&calls[1], "rate_limited"));
            CHECK_EQ_INT(calls[1].call.retry_after_ms, 300000 - 1);
            h.lines[0] = h.lines[1] = NULL;
            sim_run_until(&s, t + 300000);
            sim_submit(&s, &calls[2], "hold");
            CHECK_EQ_INT(calls[2].state, CALL_RUNNING);
            CHECK_EQ_INT(s.drift, 0);
            sim_free(&s);
        }
    }
    printf("decide: hostile hints: a 10-year retry-after opens the breaker for 300 s (max_open_for) "
           "and pauses the key for 300 s (max_pause)\n");
}

static void test_hostile_costs(void)
{
    st_decider d;
    st_upstream_config uc;
    st_upstream *u;
    st_call c, next;
    st_admission a;
    st_attempt_end end;
    const double nan = NAN, inf = INFINITY;

    st_upstream_config_defaults(&uc);
    uc.limits_per_min[ST_DIM_INPUT_TOKENS] = 60000;   /* 1000 a second, burst 1000 */
    st_decider_init(&d, NULL, &uc, 1);
    u = st_decider_upstream(&d, "costs", T0);

    st_call_init(&c, &d, T0, 0, 0, ST_PRIORITY_NORMAL, nan, -5);
    CHECK(c.cost[ST_DIM_INPUT_TOKENS] == 0);
    CHECK(c.cost[ST_DIM_OUTPUT_TOKENS] == 0);
    CHECK(c.cost[ST_DIM_TOKENS] == 0);
    CHECK(c.cost[ST_DIM_REQUESTS] == 1);
    st_call_init(&c, &d, T0, 0, 0, ST_PRIORITY_NORMAL, -inf, inf);
    CHECK(c.cost[ST_DIM_INPUT_TOKENS] == 0);
    CHECK(c.cost[ST_DIM_OUTPUT_TOKENS] == 1e12);
    CHECK(c.cost[ST_DIM_TOKENS] == 1e12);
    /* out-of-range priority, attempts and deadlines are clamped, not trusted */
    st_call_init(&c, &d, T0, INT64_MAX, 99999, 77, 1e300, 0);
    CHECK_EQ_INT(c.priority, ST_PRIORITY_NORMAL);
    CHECK_EQ_INT(c.max_attempts, 1000);
    CHECK_EQ_INT(c.deadline_ms, T0 + ST_RETRY_AFTER_MAX_MS);
    CHECK(c.cost[ST_DIM_INPUT_TOKENS] == 1e12);
    st_call_init(&c, &d, T0, -5, 0, -1, 0, 0);
    CHECK_EQ_INT(c.deadline_ms, 0);
    CHECK_EQ_INT(c.priority, ST_PRIORITY_NORMAL);

    /* an absurd estimate passes once (no debt) and pays in full: the next call
     * is refused at once with a bounded retry_after, never parked for years */
    st_call_init(&c, &d, T0, 0, 0, ST_PRIORITY_NORMAL, 1e300, 0);
    st_admit(&d, u, &c, T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    memset(&end, 0, sizeof end);
    end.outcome = st_outcome_of_status(200);
    end.status = 200;
    st_report(&d, u, &c, &end, T0 + 10, WALL0 + 10, NULL);
    st_call_init(&next, &d, T0 + 10, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &next, T0 + 10, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(a.refusal.kind != NULL && strcmp(a.refusal.kind, "rate_limited") == 0);
    CHECK(next.retry_after_ms > 60000 && next.retry_after_ms <= ST_RATELIMIT_MAX_MS);
    CHECK_EQ_INT(u->in_flight, 0);
    CHECK_EQ_INT(u->queued, 0);
    st_decider_free(&d);
}

/* ------------------------------------------------------------ exactly once */

static void report_status(st_decider *d, st_upstream *u, st_call *c, long status, int64_t now, st_events *ev)
{
    st_attempt_end a;
    memset(&a, 0, sizeof a);
    a.outcome = attempt_outcome(status);
    a.status = status;
    a.total_us = a.ttfb_us = 5000;
    st_report(d, u, c, &a, now, WALL0 + (now - T0), ev);
}

static void test_exactly_once(void)
{
    st_decider d;
    st_upstream_config uc;
    st_upstream *u;
    st_call a, b, q[4], probe1, probe2, late;
    st_admission adm;
    st_breaker_stats bs;
    unsigned i;

    st_upstream_config_defaults(&uc);
    uc.concurrency = 2;
    uc.breaker.min_calls = 2;
    uc.breaker.window_ms = 50;     /* the successes before the outage are gone by then */
    uc.breaker.open_ms = 1000;
    uc.breaker.max_open_ms = 1000;
    uc.breaker.probes = 2;
    st_decider_init(&d, NULL, &uc, 1);
    u = st_decider_upstream(&d, "once", T0);

    /* release after report, report after release, double release: the other
     * call's slot is never taken */
    st_call_init(&a, &d, T0, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_init(&b, &d, T0, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &a, T0, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    st_admit(&d, u, &b, T0, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    CHECK_EQ_INT(u->in_flight, 2);
    report_status(&d, u, &a, 200, T0 + 5, NULL);
    CHECK_EQ_INT(u->in_flight, 1);
    st_release(&d, u, &a, T0 + 6, NULL);          /* release after report */
    CHECK_EQ_INT(u->in_flight, 1);
    st_release(&d, u, &b, T0 + 6, NULL);
    CHECK_EQ_INT(u->in_flight, 0);
    st_breaker_stats_get(&u->breaker, T0 + 6, &bs);
    CHECK_EQ_INT(bs.calls, 1);                    /* the released call is not counted */

    st_call_init(&a, &d, T0 + 10, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_init(&b, &d, T0 + 10, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &a, T0 + 10, &adm, NULL);
    st_admit(&d, u, &b, T0 + 10, &adm, NULL);
    st_release(&d, u, &a, T0 + 11, NULL);
    st_release(&d, u, &a, T0 + 11, NULL);         /* double release */
    CHECK_EQ_INT(u->in_flight, 1);
    report_status(&d, u, &a, 503, T0 + 12, NULL); /* report after release */
    CHECK_EQ_INT(u->in_flight, 1);
    st_breaker_stats_get(&u->breaker, T0 + 12, &bs);
    CHECK_EQ_INT(bs.calls, 1);                    /* the late 503 did not count: no permit */
    CHECK_EQ_INT(bs.state, ST_BREAKER_CLOSED);
    report_status(&d, u, &b, 200, T0 + 13, NULL);
    CHECK_EQ_INT(u->in_flight, 0);

    /* cancel of queued calls: head, middle, tail; the rest keep their order */
    st_call_init(&a, &d, T0 + 20, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_init(&b, &d, T0 + 20, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &a, T0 + 20, &adm, NULL);
    st_admit(&d, u, &b, T0 + 20, &adm, NULL);
    for (i = 0; i < 4; i++) {
        st_call_init(&q[i], &d, T0 + 20, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
        st_admit(&d, u, &q[i], T0 + 20, &adm, NULL);
        CHECK_EQ_INT(adm.verdict, ST_ADMIT_QUEUED);
    }
    CHECK_EQ_INT(u->queued, 4);
    st_release(&d, u, &q[0], T0 + 21, NULL);
    st_release(&d, u, &q[2], T0 + 21, NULL);
    st_release(&d, u, &q[2], T0 + 21, NULL);
    CHECK_EQ_INT(u->queued, 2);
    CHECK_EQ_INT(u->in_flight, 2);
    CHECK(st_pump(&d, u, T0 + 21, &adm, NULL) == NULL);   /* no slot free */
    report_status(&d, u, &a, 200, T0 + 22, NULL);
    CHECK(st_pump(&d, u, T0 + 22, &adm, NULL) == &q[1]);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    CHECK(st_pump(&d, u, T0 + 22, &adm, NULL) == NULL);
    st_release(&d, u, &q[3], T0 + 23, NULL);              /* the tail */
    CHECK_EQ_INT(u->queued, 0);
    report_status(&d, u, &b, 200, T0 + 24, NULL);
    CHECK(st_pump(&d, u, T0 + 24, &adm, NULL) == NULL);
    report_status(&d, u, &q[1], 200, T0 + 25, NULL);
    CHECK_EQ_INT(u->in_flight, 0);

    /* a half-open breaker never wedges: probes that are canceled, or that must
     * wait for the limiter, give their permits back */
    st_call_init(&a, &d, T0 + 100, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_init(&b, &d, T0 + 100, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &a, T0 + 100, &adm, NULL);
    st_admit(&d, u, &b, T0 + 100, &adm, NULL);
    report_status(&d, u, &a, 503, T0 + 110, NULL);
    report_status(&d, u, &b, 503, T0 + 110, NULL);
    st_breaker_stats_get(&u->breaker, T0 + 110, &bs);
    CHECK_EQ_INT(bs.state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(bs.open_until_ms, T0 + 1110);
    st_call_init(&probe1, &d, T0 + 1110, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_init(&probe2, &d, T0 + 1110, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &probe1, T0 + 1110, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    CHECK(probe1.permit.probe);
    st_admit(&d, u, &probe2, T0 + 1110, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    st_call_init(&late, &d, T0 + 1110, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &late, T0 + 1110, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_REFUSED);          /* every probe is out */
    st_release(&d, u, &probe1, T0 + 1111, NULL);          /* canceled */
    st_release(&d, u, &probe1, T0 + 1111, NULL);
    CHECK_EQ_INT(u->breaker.probes_out, 1);
    st_call_init(&late, &d, T0 + 1112, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &late, T0 + 1112, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);            /* its permit came back */
    CHECK(late.permit.probe);
    report_status(&d, u, &probe2, 200, T0 + 1120, NULL);
    report_status(&d, u, &late, 200, T0 + 1120, NULL);
    report_status(&d, u, &probe1, 200, T0 + 1121, NULL);  /* a canceled probe reporting late */
    st_breaker_stats_get(&u->breaker, T0 + 1121, &bs);
    CHECK_EQ_INT(bs.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(u->in_flight, 0);
    CHECK_EQ_INT(u->breaker.probes_out, 0);

    /* half-open while the key is paused by a 429: the probe waits in the queue
     * without holding a permit, and goes when the pause ends */
    st_call_init(&a, &d, T0 + 2000, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_init(&b, &d, T0 + 2000, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &a, T0 + 2000, &adm, NULL);
    st_admit(&d, u, &b, T0 + 2000, &adm, NULL);
    report_status(&d, u, &a, 503, T0 + 2010, NULL);
    report_status(&d, u, &b, 503, T0 + 2010, NULL);       /* open until 3010 */
    st_limiter_pause_until(&u->limiter, T0 + 4000);       /* as a 429 seen by another call */
    st_call_init(&probe1, &d, T0 + 3500, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &probe1, T0 + 3500, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_QUEUED);
    CHECK_EQ_INT(adm.wake_ms, T0 + 4000);
    CHECK_EQ_INT(u->breaker.probes_out, 0);
    CHECK_EQ_INT(u->in_flight, 0);
    st_call_init(&probe2, &d, T0 + 3600, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, u, &probe2, T0 + 3600, &adm, NULL);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_QUEUED);
    CHECK(st_pump(&d, u, T0 + 3999, &adm, NULL) == NULL);
    CHECK_EQ_INT(adm.wake_ms, T0 + 4000);
    CHECK_EQ_INT(u->breaker.probes_out, 0);
    CHECK(st_pump(&d, u, T0 + 4000, &adm, NULL) == &probe1);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    CHECK(st_pump(&d, u, T0 + 4000, &adm, NULL) == &probe2);
    CHECK_EQ_INT(adm.verdict, ST_ADMIT_START);
    report_status(&d, u, &probe1, 200, T0 + 4010, NULL);
    report_status(&d, u, &probe2, 200, T0 + 4010, NULL);
    st_breaker_stats_get(&u->breaker, T0 + 4010, &bs);
    CHECK_EQ_INT(bs.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(u->in_flight, 0);
    CHECK_EQ_INT(u->queued, 0);
    st_decider_free(&d);
}

/* Random traffic, cancels at any moment and repeated releases, checked after
 * every step; then the key must still work. */
typedef struct chaos_upstream { st_rng rng; int well; } chaos_upstream;

static void serve_chaos(sim *s, sim_call *c)
{
    chaos_upstream *ch = s->ud;
    static const long statuses[] = { 200, 200, 200, 429, 503, 500, 529, 0, 400 };
    uint64_t r = st_rng_next(&ch->rng);
    c->latency_ms = 1 + (int64_t)(r % 300);
    c->status = ch->well ? 200 : statuses[(r >> 16) % (sizeof statuses / sizeof statuses[0])];
    if (c->status == 429 || c->status == 529)
        reply_line(c, "retry-after: %u", (unsigned)((r >> 32) % 4));
    if ((r >> 40) % 16 == 0)
        reply_line(c, "x-should-retry: %s", (r >> 44) % 2 ? "true" : "false");
    if ((r >> 48) % 4 == 0) {
        reply_line(c, "anthropic-ratelimit-requests-limit: %u", 600 + (unsigned)((r >> 50) % 3000));
        reply_line(c, "anthropic-ratelimit-requests-remaining: %u", (unsigned)((r >> 52) % 20));
    }
}

static void test_chaos(void)
{
    enum { POOL = 64, STEPS = 200000 };
    st_retry_policy rp;
    st_upstream_config uc;
    chaos_upstream ch;
    sim s;
    sim_call *calls = calls_new(POOL);
    st_rng rng;
    unsigned i, step, cancels = 0, done_before;
    const char *keys[] = { "a", "b", "c" };
    st_breaker_stats bs;

    st_retry_policy_defaults(&rp);
    rp.attempts = 3;
    rp.base_ms[ST_CLASS_THROTTLED] = rp.base_ms[ST_CLASS_OVERLOADED] = 50;
    rp.base_ms[ST_CLASS_TRANSIENT] = rp.base_ms[ST_CLASS_TIMEOUT] = 20;
    st_upstream_config_defaults(&uc);
    uc.concurrency = 6;
    uc.queue_max = 10;
    uc.max_pause_ms = 3000;
    uc.breaker.min_calls = 5;
    uc.breaker.open_ms = 300;
    uc.breaker.max_open_ms = 2000;
    uc.breaker.probes = 2;
    uc.breaker.window_ms = 5000;
    uc.breaker.probe_timeout_ms = 2000;
    st_rng_seed(&ch.rng, 3);
    ch.well = 0;
    st_rng_seed(&rng, 11);
    sim_init(&s, &rp, &uc, serve_chaos, &ch);
    for (step = 0; step < STEPS; step++) {
        uint64_t r = st_rng_next(&rng);
        sim_call *c = &calls[r % POOL];
        switch ((r >> 8) % 8) {
        case 0:
        case 1:
            if (c->state == CALL_IDLE || c->state == CALL_DONE)
                sim_submit_with(&s, c, keys[(r >> 16) % 3], (r >> 20) % 2 ? (int64_t)((r >> 24) % 3000) : 0, 0,
                                0, 0);
            break;
        case 2:
            /* a live call if there is one; else a finished one is released again */
            for (i = 0; i < POOL && (c->state == CALL_IDLE || c->state == CALL_DONE); i++)
                c = &calls[(r + i) % POOL];
            cancels += c->state != CALL_IDLE && c->state != CALL_DONE;
            sim_cancel(&s, c);
            break;
        default:
            if (!sim_step(&s, INT64_MAX))
                s.now += 1 + (int64_t)((r >> 16) % 100);
            break;
        }
    }
    done_before = s.done;
    sim_drain(&s);
    CHECK_EQ_INT(s.drift, 0);
    CHECK_EQ_INT(s.running + s.queued + s.waiting, 0);
    for (i = 0; i < 3; i++) {
        st_upstream *u = st_decider_find(&s.d, keys[i]);
        CHECK(u != NULL);
        if (u == NULL)
            continue;
        CHECK_EQ_INT(u->in_flight, 0);
        CHECK_EQ_INT(u->queued, 0);
        CHECK_EQ_INT(u->breaker.probes_out, 0);
    }
    /* the upstream is well again: within the longest open period and a probe
     * timeout every key admits and closes */
    ch.well = 1;
    s.now += 2000 + 2000 + 3000;
    for (i = 0; i < 3; i++) {
        unsigned k;
        for (k = 0; k < 3; k++) {
            sim_call *c = &calls[i * 3 + k];
            sim_submit_with(&s, c, keys[i], 0, 1, 0, 0);
            sim_run_until_done(&s, c);
            CHECK(c->result.cls == ST_CLASS_SUCCESS);
        }
        st_breaker_stats_get(&st_decider_find(&s.d, keys[i])->breaker, s.now, &bs);
        CHECK_EQ_INT(bs.state, ST_BREAKER_CLOSED);
    }
    printf("decide: chaos: %u calls, %u attempts, %u cancels, %u breaker opens, %u pauses: no drift, no lost permit\n",
           done_before, s.sent, cancels, s.opens, s.pauses);
    CHECK(s.opens > 10);
    CHECK(s.pauses > 10);
    CHECK(cancels > 1000);
    CHECK_EQ_INT(s.drift, 0);
    sim_free(&s);
    free(calls);
}

int main(void)
{
    test_outage();
    test_retry_storm();
    test_goodput();
    test_slow_start();
    test_429_pauses_key();
    test_hostile_hints();
    test_hostile_costs();
    test_exactly_once();
    test_chaos();
    return TEST_REPORT();
}
