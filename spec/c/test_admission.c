/* Specs for what the decision core (decide.h) adds to admission: adaptive
 * concurrency per key, spend caps per client, key and tag, and hedge decisions.
 * Driven as a transport drives the core (st_admit, st_pump, st_report,
 * st_retry_decide, st_release), in virtual time.
 *
 * Adaptive concurrency runs against a simulated upstream that serves its calls
 * by processor sharing: up to `knee` in service each runs at full speed, above
 * it they share the capacity, each at (knee / n)^power of full speed, so
 * latency grows with in-flight calls past the knee; a call that would make more
 * than `cliff` in service is answered 529 at once (after base / 10). The client
 * always has work waiting: a fixed number of calls is submitted at all times,
 * and the core's cap and queue decide how many are in service. */
#define _POSIX_C_SOURCE 200809L

#include "test.h"

#include "decide.h"
#include "spendbook.h"

#include <stdlib.h>
#include <string.h>

#define T0 INT64_C(1000000)

/* ------------------------------------------------------------ adaptive, simulated */

typedef struct ps_call {
    st_call call;
    st_upstream *up;
    double fin, start;        /* virtual finish (work units), start time (ms) */
    int state;                /* 0 idle, 1 queued, 2 in service, 3 rejected (529 on its way) */
} ps_call;

typedef struct phase { double ms, knee, cliff; } phase;

typedef struct ps_result {
    double goodput;           /* successful calls per simulated second */
    unsigned long overloaded; /* 529s answered */
    double median[4], p10[4], p90[4];
    unsigned max_in_flight;
} ps_result;

#define PS_CALLS 400          /* submitted at all times */
#define BASE 1000.0
#define NOISE 0.5

static ps_call *heap[PS_CALLS];
static int heap_n;
static ps_call *rejects[PS_CALLS];
static int rej_head, rej_n;
static double samples[100000];

static void heap_push(ps_call *c)
{
    int i = heap_n++;
    while (i > 0 && heap[(i - 1) / 2]->fin > c->fin) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = c;
}

static ps_call *heap_pop(void)
{
    ps_call *top = heap[0], *last = heap[--heap_n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= heap_n)
            break;
        if (c + 1 < heap_n && heap[c + 1]->fin < heap[c]->fin)
            c++;
        if (heap[c]->fin >= last->fin)
            break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = last;
    return top;
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static void summarise(ps_result *r, int ph, int n)
{
    if (n == 0)
        return;
    qsort(samples, (size_t)n, sizeof samples[0], cmp_double);
    r->median[ph] = samples[n / 2];
    r->p10[ph] = samples[n / 10];
    r->p90[ph] = samples[n * 9 / 10];
}

typedef struct ps_sim {
    st_decider d;
    st_rng rng;
    double t, v;              /* time (ms) and virtual work done per call in service */
    const phase *ph;
    double base, noise;
} ps_sim;

/* The call enters service (or is rejected) now. */
static void ps_serve(ps_sim *s, ps_call *c)
{
    c->start = s->t;
    if (heap_n + 1 > s->ph->cliff) {
        c->state = 3;
        c->fin = s->t + s->base / 10;
        rejects[(rej_head + rej_n++) % PS_CALLS] = c;
    } else {
        c->state = 2;
        c->fin = s->v + s->base * (1 - s->noise + 2 * s->noise * st_rng_unit(&s->rng));
        heap_push(c);
    }
}

static void ps_pump(ps_sim *s, st_upstream *u)
{
    st_admission a;
    st_call *cc;
    while ((cc = st_pump(&s->d, u, (int64_t)s->t, &a, NULL)) != NULL) {
        ps_call *c = (ps_call *)(void *)cc;
        if (a.verdict == ST_ADMIT_START)
            ps_serve(s, c);
        else
            c->state = 0;
    }
}

static void ps_submit(ps_sim *s, ps_call *c)
{
    st_admission a;
    c->up = st_decider_upstream(&s->d, "ps", (int64_t)s->t);
    st_call_init(&c->call, &s->d, (int64_t)s->t, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&s->d, c->up, &c->call, (int64_t)s->t, &a, NULL);
    if (a.verdict == ST_ADMIT_START)
        ps_serve(s, c);
    else
        c->state = a.verdict == ST_ADMIT_QUEUED ? 1 : 0;
}

static void ps_end(ps_sim *s, ps_call *c, long status)
{
    st_attempt_end a;
    st_retry_decision rd;
    memset(&a, 0, sizeof a);
    a.outcome = st_outcome_of_status(status);
    a.status = status;
    a.ttfb_us = a.total_us = (uint64_t)((s->t - c->start) * 1000);
    st_report(&s->d, c->up, &c->call, &a, (int64_t)s->t, 0, NULL);
    ps_pump(s, c->up);
    st_retry_decide(&s->d, c->up, &c->call, &a, (int64_t)s->t, &rd);
    c->state = 0;
}

/* fixed > 0: a fixed concurrency; 0: adaptive with its defaults. */
static ps_result simulate(unsigned fixed, const phase *phases, int nphases, double power, uint64_t seed)
{
    static ps_call calls[PS_CALLS];
    st_retry_policy rp;
    st_upstream_config uc;
    ps_sim s;
    ps_result r;
    double end = 0, phase_end, next_sample;
    long ok = 0;
    int ph = 0, ns = 0, i;

    memset(&r, 0, sizeof r);
    memset(&s, 0, sizeof s);
    st_retry_policy_defaults(&rp);
    rp.attempts = 1;
    st_upstream_config_defaults(&uc);
    uc.breaker_enabled = 0;
    uc.queue_max = PS_CALLS;
    uc.concurrency = fixed ? fixed : 16;
    uc.adaptive_enabled = fixed == 0;
    st_decider_init(&s.d, &rp, &uc, seed);
    st_rng_seed(&s.rng, seed);
    s.base = BASE;
    s.noise = NOISE;
    s.ph = &phases[0];
    heap_n = rej_head = rej_n = 0;
    for (i = 0; i < nphases; i++)
        end += phases[i].ms;
    phase_end = phases[0].ms;
    next_sample = phases[0].ms / 2;
    for (i = 0; i < PS_CALLS; i++)
        ps_submit(&s, &calls[i]);
    /* the first reply ends slow start: one quick call teaches it */
    for (;;) {
        st_upstream *u = st_decider_find(&s.d, "ps");
        double rate, t_ps, t_rej;
        ps_call *c;
        long status;

        while (s.t >= phase_end && ph + 1 < nphases) {
            summarise(&r, ph, ns);
            ns = 0;
            next_sample = phase_end + phases[ph + 1].ms / 2;
            phase_end += phases[++ph].ms;
            s.ph = &phases[ph];
        }
        while (s.t >= next_sample && ns < (int)(sizeof samples / sizeof samples[0])) {
            samples[ns++] = st_upstream_cap(u);
            next_sample += 100;
        }
        if (u->in_flight > r.max_in_flight)
            r.max_in_flight = u->in_flight;
        if (s.t >= end)
            break;
        rate = heap_n <= s.ph->knee ? 1 : pow(s.ph->knee / heap_n, power);
        t_ps = heap_n ? s.t + (heap[0]->fin - s.v) / rate : INFINITY;
        t_rej = rej_n ? rejects[rej_head]->fin : INFINITY;
        if (t_ps > end && t_rej > end) {
            s.v += (end - s.t) * rate;
            s.t = end;
            continue;
        }
        if (t_ps <= t_rej) {
            s.v = heap[0]->fin;
            s.t = t_ps;
            c = heap_pop();
            status = 200;
            ok++;
        } else {
            s.v += (t_rej - s.t) * rate;
            s.t = t_rej;
            c = rejects[rej_head];
            rej_head = (rej_head + 1) % PS_CALLS;
            rej_n--;
            status = 529;
            r.overloaded++;
        }
        ps_end(&s, c, status);
        ps_submit(&s, c);
    }
    summarise(&r, ph, ns);
    r.goodput = (double)ok / (end / 1000);
    st_decider_free(&s.d);
    return r;
}

#define SEED 11

static double best_fixed(const phase *phases, int nphases, double power, unsigned *best_limit)
{
    double best = 0;
    unsigned f, coarse;
    for (f = 5; f <= 120; f += 5) {
        ps_result r = simulate(f, phases, nphases, power, SEED);
        if (r.goodput > best) {
            best = r.goodput;
            *best_limit = f;
        }
    }
    coarse = *best_limit;
    for (f = coarse - 4; f <= coarse + 4; f++) {
        ps_result r = simulate(f, phases, nphases, power, SEED);
        if (r.goodput > best) {
            best = r.goodput;
            *best_limit = f;
        }
    }
    return best;
}

static void test_adaptive_through_core(const char *name, double power)
{
    static const phase knee40[] = { { 600000, 40, 60 } };
    unsigned best_limit = 0;
    double best = best_fixed(knee40, 1, power, &best_limit);
    ps_result r = simulate(0, knee40, 1, power, SEED);
    ps_result f64 = simulate(64, knee40, 1, power, SEED);

    printf("core, adaptive, %s upstream (knee 40, cliff 60, 600 s): goodput %.2f/s vs best fixed %u %.2f/s "
           "= %.3f; limit median %.0f (p10 %.0f, p90 %.0f); 529s %lu vs %lu at a fixed 64\n",
           name, r.goodput, best_limit, best, r.goodput / best, r.median[0], r.p10[0], r.p90[0], r.overloaded,
           f64.overloaded);
    CHECK(r.goodput >= 0.9 * best);
    CHECK(r.median[0] >= 40 * 0.8 && r.median[0] <= 40 * 1.2);
    CHECK(r.overloaded * 5 <= f64.overloaded);
    CHECK(f64.overloaded > 0);
}

/* Capacity halves for five minutes, then comes back: the limit follows. */
static void test_adaptive_knee_moves(void)
{
    static const phase moves[] = { { 300000, 40, 80 }, { 300000, 20, 40 }, { 300000, 40, 80 } };
    unsigned best_limit = 0;
    double best = best_fixed(moves, 3, 1, &best_limit);
    ps_result r = simulate(0, moves, 3, 1, SEED);
    ps_result f64 = simulate(64, moves, 3, 1, SEED);
    int ph;

    printf("core, adaptive, knee 40 -> 20 -> 40: limit median %.0f, %.0f, %.0f; goodput %.3f of best fixed (%u); "
           "529s %lu vs %lu at a fixed 64\n",
           r.median[0], r.median[1], r.median[2], r.goodput / best, best_limit, r.overloaded, f64.overloaded);
    for (ph = 0; ph < 3; ph++) {
        CHECK(r.median[ph] >= moves[ph].knee * 0.8);
        CHECK(r.median[ph] <= moves[ph].knee * 1.2);
    }
    CHECK(r.goodput >= 0.9 * best);
    CHECK(r.overloaded * 5 <= f64.overloaded);
}

/* Tickets go back exactly once: cancels in every state leave in_flight at 0,
 * and the adaptive count of calls out with it. */
static void test_adaptive_tickets(void)
{
    st_upstream_config uc;
    st_decider d;
    st_upstream *u;
    st_call c[30];
    st_admission a;
    st_attempt_end end;
    int i;

    st_upstream_config_defaults(&uc);
    uc.adaptive_enabled = 1;
    uc.adaptive.initial_limit = 8;
    uc.adaptive.max_limit = 8;
    st_decider_init(&d, NULL, &uc, 1);
    u = st_decider_upstream(&d, "k", T0);
    u->replied = 1; /* past slow start */
    CHECK_EQ_INT(st_upstream_cap(u), 8);
    for (i = 0; i < 30; i++) {
        st_call_init(&c[i], &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
        st_admit(&d, u, &c[i], T0, &a, NULL);
        CHECK_EQ_INT(a.verdict, i < 8 ? ST_ADMIT_START : ST_ADMIT_QUEUED);
    }
    CHECK_EQ_INT(u->adaptive.in_flight, 8);
    memset(&end, 0, sizeof end);
    end.outcome = st_outcome_of_status(200);
    end.status = 200;
    end.ttfb_us = end.total_us = 50000;
    /* reported, released again, released while queued: each slot goes back once */
    st_report(&d, u, &c[0], &end, T0 + 50, 0, NULL);
    st_release(&d, u, &c[0], T0 + 50, NULL);
    st_release(&d, u, &c[1], T0 + 50, NULL);
    st_release(&d, u, &c[20], T0 + 50, NULL);
    CHECK_EQ_INT(u->in_flight, 6);
    CHECK_EQ_INT(u->adaptive.in_flight, 6);
    while (st_pump(&d, u, T0 + 50, &a, NULL) != NULL)
        ;
    CHECK_EQ_INT(u->in_flight, 8);
    CHECK_EQ_INT(u->adaptive.in_flight, 8);
    for (i = 0; i < 30; i++)
        st_release(&d, u, &c[i], T0 + 60, NULL);
    CHECK_EQ_INT(u->in_flight, 0);
    CHECK_EQ_INT(u->queued, 0);
    CHECK_EQ_INT(u->adaptive.in_flight, 0);
    st_decider_free(&d);
}

/* ------------------------------------------------------------ spend caps */

static st_spend_config caps(double usd_hour, double usd_day, int64_t tokens_day)
{
    st_spend_config c;
    st_spend_config_defaults(&c);
    c.cap[ST_SPEND_HOUR][ST_SPEND_COST] = st_spend_usd(usd_hour);
    c.cap[ST_SPEND_DAY][ST_SPEND_COST] = st_spend_usd(usd_day);
    c.cap[ST_SPEND_DAY][ST_SPEND_TOKENS] = tokens_day;
    return c;
}

static st_decider *spend_decider(st_spend_book **book)
{
    static st_decider d;
    st_upstream_config uc;
    st_retry_policy rp;

    st_upstream_config_defaults(&uc);
    uc.concurrency = 1000;
    uc.breaker_enabled = 0;
    st_retry_policy_defaults(&rp);
    rp.attempts = 1;
    st_decider_init(&d, &rp, &uc, 3);
    *book = st_spend_book_new(60000, T0);
    st_decider_set_spend(&d, *book, T0);
    return &d;
}

static void ended(st_decider *d, st_upstream *u, st_call *c, long status, int64_t now)
{
    st_attempt_end a;
    memset(&a, 0, sizeof a);
    a.outcome = st_outcome_of_status(status);
    a.status = status;
    a.ttfb_us = a.total_us = 10000;
    st_report(d, u, c, &a, now, 0, NULL);
}

static unsigned count_warnings(const st_events *ev)
{
    unsigned i, n = 0;
    for (i = 0; i < ev->n; i++)
        n += ev->ev[i].type == ST_EVENT_BUDGET_WARNING;
    return n;
}

/* 200 calls at once against a cap worth 50 of them at their worst case: 50 are
 * admitted, 150 refused before anything is sent; the replies settle below the
 * worst case and the freed part admits more. */
static void test_spend_concurrent(void)
{
    st_spend_book *book;
    st_decider *d = spend_decider(&book);
    st_spend_config c = caps(1.0, 0, 0); /* $1 an hour; each call reserves 2 cents */
    static st_call calls[400];
    st_upstream *u;
    st_admission a;
    unsigned admitted = 0, refused = 0, held = 0, i, more = 0;
    uint64_t ids[400];

    st_spend_book_cap_client(book, &c, T0);
    u = st_decider_upstream(d, "k", T0);
    u->replied = 1; /* past slow start: all 200 would start at once */
    for (i = 0; i < 200; i++) {
        st_call_init(&calls[i], d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
        st_call_spend_init(d, u, &calls[i], NULL, 0.02, 1000, T0);
        st_admit(d, u, &calls[i], T0, &a, NULL);
        if (a.verdict == ST_ADMIT_START) {
            admitted++;
        } else {
            refused++;
            CHECK(a.verdict == ST_ADMIT_REFUSED && strcmp(a.refusal.kind, "budget_exceeded") == 0);
            held += calls[i].retry_after_ms == -1; /* the calls in flight decide it */
        }
    }
    CHECK_EQ_INT(admitted, 50);
    CHECK_EQ_INT(refused, 150);
    CHECK_EQ_INT(held, 150);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 1000000);
    CHECK_EQ_INT(u->in_flight, 50); /* refused calls took no slot */
    /* each reply costs half its worst case: a cent */
    for (i = 0; i < 50; i++) {
        ended(d, u, &calls[i], 200, T0 + 100);
        ids[i] = st_call_spend_end(d, u, &calls[i], 200, T0 + 100, NULL);
        CHECK(ids[i] != 0);
    }
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 1000000); /* parked: still held */
    for (i = 0; i < 50; i++)
        CHECK_EQ_INT(st_decider_spend_settle(d, ids[i], 0.01, 500, T0 + 200, NULL), 1);
    CHECK_EQ_INT(st_decider_spend_settle(d, ids[0], 0.01, 500, T0 + 200, NULL), 0); /* once */
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    CHECK_EQ_INT(st_spend_used(&book->client, T0 + 200, ST_SPEND_HOUR, ST_SPEND_COST), 500000);
    /* half the cap is free: 25 more pass, the 26th does not, and says when it will */
    for (i = 200; i < 230; i++) {
        st_call_init(&calls[i], d, T0 + 300, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
        st_call_spend_init(d, u, &calls[i], NULL, 0.02, 1000, T0 + 300);
        st_admit(d, u, &calls[i], T0 + 300, &a, NULL);
        more += a.verdict == ST_ADMIT_START;
    }
    CHECK_EQ_INT(more, 25);
    /* never more than the cap, reserved and settled together */
    CHECK(st_spend_used(&book->client, T0 + 300, ST_SPEND_HOUR, ST_SPEND_COST)
              + book->client.reserved[ST_SPEND_COST] <= 1000000);
    st_decider_free(d);
}

/* Which reservations park, which go back, and when an unsettled one is charged. */
static void test_spend_lifecycle(void)
{
    st_spend_book *book;
    st_decider *d = spend_decider(&book);
    st_spend_config c = caps(1.0, 0, 0);
    st_call a1, a2, a3, a4;
    st_upstream *u;
    st_admission a;
    uint64_t id;

    st_spend_book_cap_client(book, &c, T0);
    u = st_decider_upstream(d, "k", T0);
    /* an error status: released at once */
    st_call_init(&a1, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &a1, NULL, 0.5, 0, T0);
    st_admit(d, u, &a1, T0, &a, NULL);
    ended(d, u, &a1, 529, T0 + 10);
    CHECK_EQ_INT(st_call_spend_end(d, u, &a1, 529, T0 + 10, NULL), 0);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    /* a cancel: released, and ending it later changes nothing */
    st_call_init(&a2, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &a2, NULL, 0.5, 0, T0);
    st_admit(d, u, &a2, T0, &a, NULL);
    st_release(d, u, &a2, T0 + 5, NULL);
    st_release(d, u, &a2, T0 + 6, NULL);
    CHECK_EQ_INT(st_call_spend_end(d, u, &a2, 200, T0 + 10, NULL), 0);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    /* a 2xx never settled: charged in full settle_ms after it ended */
    st_call_init(&a3, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &a3, NULL, 0.5, 0, T0);
    st_admit(d, u, &a3, T0, &a, NULL);
    ended(d, u, &a3, 200, T0 + 10);
    id = st_call_spend_end(d, u, &a3, 200, T0 + 10, NULL);
    CHECK(id != 0);
    st_spend_book_expire(book, T0 + 10 + 59999, NULL);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 500000);
    st_spend_book_expire(book, T0 + 10 + 60000, NULL);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    CHECK_EQ_INT(st_spend_used(&book->client, T0 + 60010, ST_SPEND_HOUR, ST_SPEND_COST), 500000);
    CHECK_EQ_INT(st_decider_spend_settle(d, id, 0.01, 0, T0 + 60011, NULL), 0); /* too late */
    CHECK_EQ_INT(book->expired, 1);
    /* parked holds not due yet, charged in full at once when the book goes away */
    st_call_init(&a3, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &a3, NULL, 0.25, 0, T0 + 60011);
    st_admit(d, u, &a3, T0 + 60011, &a, NULL);
    ended(d, u, &a3, 200, T0 + 60012);
    id = st_call_spend_end(d, u, &a3, 200, T0 + 60012, NULL);
    CHECK(id != 0);
    st_spend_book_expire_all(book, T0 + 60013, NULL);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    CHECK_EQ_INT(st_spend_used(&book->client, T0 + 60013, ST_SPEND_HOUR, ST_SPEND_COST), 750000);
    CHECK_EQ_INT(book->expired, 2);
    CHECK_EQ_INT(st_decider_spend_settle(d, id, 0.01, 0, T0 + 60014, NULL), 0);
    st_spend_book_expire(book, T0 + 200000, NULL); /* the stale entries are gone: nothing more */
    CHECK_EQ_INT(book->expired, 2);
    /* the cap now holds $0.75 settled */
    /* a call above the cap alone never passes; retry_after stays unset */
    st_call_init(&a4, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &a4, NULL, 1.5, 0, T0 + 60020);
    st_admit(d, u, &a4, T0 + 60020, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK_EQ_INT(a4.retry_after_ms, -1);
    CHECK(strstr(a.detail, "alone is above the client's spend cap usd_per_hour") != NULL);
    /* the rest of the cap ($0.25) is short of a $0.30 call: it waits for spend to leave the hour */
    st_call_init(&a4, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &a4, NULL, 0.3, 0, T0 + 60020);
    st_admit(d, u, &a4, T0 + 60020, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(a4.retry_after_ms > 0 && a4.retry_after_ms <= 3600000);
    CHECK(strstr(a.detail, "client's spend cap usd_per_hour would be crossed") != NULL);
    st_decider_free(d);
}

/* Keys and tags: each scope caps its own calls; "*" gives every tag a cap of
 * its own; a refusal in one scope leaves nothing reserved in the others. */
static void test_spend_scopes(void)
{
    st_spend_book *book;
    st_decider *d = spend_decider(&book);
    st_spend_config key_cap = caps(0.1, 0, 0), tag_cap = caps(0, 0.05, 0), vip = caps(0, 1, 0),
                    client_cap = caps(10, 0, 0);
    st_upstream *k, *other;
    st_call c[8];
    st_admission a;
    st_spend_named *acme;

    st_spend_book_cap_client(book, &client_cap, T0);
    CHECK(st_spend_book_rule(book, ST_SCOPE_KEY, "k", &key_cap));
    CHECK(st_spend_book_rule(book, ST_SCOPE_TAG, "*", &tag_cap));
    CHECK(st_spend_book_rule(book, ST_SCOPE_TAG, "vip", &vip));
    k = st_decider_upstream(d, "k", T0);
    other = st_decider_upstream(d, "other", T0);
    CHECK(k->spend != NULL);
    CHECK(other->spend == NULL);
    /* tag acme: 5 cents a day; two calls of 3 cents: the second is refused by the tag */
    st_call_init(&c[0], d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, other, &c[0], "acme", 0.03, 0, T0);
    st_admit(d, other, &c[0], T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_call_init(&c[1], d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, other, &c[1], "acme", 0.03, 0, T0);
    st_admit(d, other, &c[1], T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(strstr(a.detail, "tag's spend cap usd_per_day") != NULL);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 30000); /* the refusal gave its client part back */
    /* another tenant has its own 5 cents; vip has its rule */
    st_call_init(&c[2], d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, other, &c[2], "globex", 0.03, 0, T0);
    st_admit(d, other, &c[2], T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_call_init(&c[3], d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, other, &c[3], "vip", 0.5, 0, T0);
    st_admit(d, other, &c[3], T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    /* key k: 10 cents an hour */
    st_call_init(&c[4], d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, k, &c[4], NULL, 0.11, 0, T0);
    st_admit(d, k, &c[4], T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(strstr(a.detail, "key's spend cap usd_per_hour") != NULL);
    acme = st_spend_book_find(book, ST_SCOPE_TAG, "acme");
    CHECK(acme != NULL && acme->spend.reserved[ST_SPEND_COST] == 30000);
    /* a charge without a hold lands in every scope of the call */
    st_decider_spend_charge(d, other, "acme", 0.01, 40, T0 + 1, NULL);
    CHECK_EQ_INT(st_spend_used(&acme->spend, T0 + 1, ST_SPEND_DAY, ST_SPEND_COST), 10000);
    CHECK_EQ_INT(st_spend_used(&book->client, T0 + 1, ST_SPEND_HOUR, ST_SPEND_COST), 10000);
    CHECK_EQ_INT(book->ntags, 3);
    st_decider_free(d);
}

/* Past ST_SPEND_MAX_TAGS tags with a spend of their own, a new capped tag is
 * refused (it could not be capped); known tags and uncapped calls go on. */
static void test_spend_many_tags(void)
{
    st_spend_book *book;
    st_decider *d = spend_decider(&book);
    st_spend_config tag_cap = caps(0, 1, 0);
    st_upstream *u;
    st_call c;
    st_admission a;
    char tag[32];
    unsigned i, started = 0;

    CHECK(st_spend_book_rule(book, ST_SCOPE_TAG, "*", &tag_cap));
    u = st_decider_upstream(d, "k", T0);
    for (i = 0; i < ST_SPEND_MAX_TAGS + 10; i++) {
        snprintf(tag, sizeof tag, "tenant-%u", i);
        st_call_init(&c, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
        st_call_spend_init(d, u, &c, tag, 0.001, 0, T0);
        st_admit(d, u, &c, T0, &a, NULL);
        if (a.verdict == ST_ADMIT_START) {
            started++;
            st_release(d, u, &c, T0, NULL);
        } else {
            CHECK(strstr(a.detail, "too many tags") != NULL);
        }
    }
    CHECK_EQ_INT(started, ST_SPEND_MAX_TAGS);
    st_call_init(&c, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &c, "tenant-7", 0.001, 0, T0);
    st_admit(d, u, &c, T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_release(d, u, &c, T0, NULL);
    st_decider_free(d);
}

/* Warnings: the charge that first brings settled spend to warn * cap is an
 * event naming its scope, span and dimension; not again while it stays there. */
static void test_spend_warnings(void)
{
    st_spend_book *book;
    st_decider *d = spend_decider(&book);
    st_spend_config c = caps(0, 1.0, 10000);
    st_upstream *u;
    st_call call;
    st_admission a;
    st_events ev;
    unsigned i, warned = 0, token_warned = 0;

    c.warn = 0.5;
    st_spend_book_cap_client(book, &c, T0);
    u = st_decider_upstream(d, "k", T0);
    for (i = 0; i < 9; i++) {
        uint64_t id;
        st_call_init(&call, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
        st_call_spend_init(d, u, &call, NULL, 0.1, 1000, T0 + i);
        st_admit(d, u, &call, T0 + i, &a, NULL);
        CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
        ended(d, u, &call, 200, T0 + i);
        id = st_call_spend_end(d, u, &call, 200, T0 + i, NULL);
        ev.n = ev.dropped = 0;
        CHECK_EQ_INT(st_decider_spend_settle(d, id, 0.1, i < 4 ? 500 : 1000, T0 + i, &ev), 1);
        if (count_warnings(&ev) > 0) {
            unsigned k;
            for (k = 0; k < ev.n; k++) {
                const st_spend_warning *w = &ev.ev[k].warning;
                CHECK_EQ_INT(w->scope, ST_SCOPE_CLIENT);
                CHECK_EQ_INT(w->span, ST_SPEND_DAY);
                if (w->dim == ST_SPEND_COST) {
                    CHECK_EQ_INT(i, 4); /* the fifth dime reaches 50 cents */
                    CHECK_EQ_INT(w->used, 500000);
                    CHECK_EQ_INT(w->cap, 1000000);
                    warned++;
                } else {
                    CHECK_EQ_INT(i, 6); /* 4 * 500 + 3 * 1000 tokens reach 5000 */
                    token_warned++;
                }
            }
        }
    }
    CHECK_EQ_INT(warned, 1);
    CHECK_EQ_INT(token_warned, 1);
    st_decider_free(d);
}

/* Hostile amounts: NaN, infinities and negatives reserve nothing or the most,
 * never wrap; a book with huge caps stays exact. */
static void test_spend_hostile(void)
{
    st_spend_book *book;
    st_decider *d = spend_decider(&book);
    st_spend_config c = caps(1.0, 0, 0);
    st_upstream *u;
    st_call call;
    st_admission a;

    CHECK_EQ_INT(st_spend_usd(NAN), 0);
    CHECK_EQ_INT(st_spend_usd(-1), 0);
    CHECK_EQ_INT(st_spend_usd(INFINITY), ST_SPEND_MAX);
    CHECK_EQ_INT(st_spend_usd(1e300), ST_SPEND_MAX);
    CHECK_EQ_INT(st_spend_usd(0.0000001), 1);   /* rounded up */
    CHECK_EQ_INT(st_spend_usd(0.25), 250000);
    st_spend_book_cap_client(book, &c, T0);
    u = st_decider_upstream(d, "k", T0);
    st_call_init(&call, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &call, NULL, NAN, -5, T0);
    st_admit(d, u, &call, T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    st_release(d, u, &call, T0, NULL);
    st_call_init(&call, d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_call_spend_init(d, u, &call, NULL, INFINITY, INFINITY, T0);
    st_admit(d, u, &call, T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK_EQ_INT(book->client.reserved[ST_SPEND_COST], 0);
    /* settling with NaN charges nothing; an unknown id is ignored */
    CHECK_EQ_INT(st_decider_spend_settle(d, 0, 1, 1, T0, NULL), 0);
    CHECK_EQ_INT(st_decider_spend_settle(d, UINT64_MAX, 1, 1, T0, NULL), 0);
    CHECK_EQ_INT(st_decider_spend_settle(d, 7, 1, 1, T0, NULL), 0);
    st_decider_free(d);
}

/* ------------------------------------------------------------ hedges */

static void test_hedge_plan(void)
{
    st_decider d;
    st_upstream *u;
    st_call c;
    st_hedge_policy p = { 250, 0.95, 0.1 };
    int i;

    st_decider_init(&d, NULL, NULL, 5);
    u = st_decider_upstream(&d, "k", T0);
    st_call_init(&c, &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_hedge_plan(&d, u, &c, &p, T0), 250);
    /* a deadline the wait would reach: no hedge */
    st_call_init(&c, &d, T0, 200, 1, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_hedge_plan(&d, u, &c, &p, T0), -1);
    /* a quantile needs ST_HEDGE_MIN_SAMPLES first */
    p.after_ms = -1;
    st_call_init(&c, &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    for (i = 0; i < ST_HEDGE_MIN_SAMPLES - 1; i++)
        st_upstream_record_latency(u, T0, 10000 + (uint64_t)i * 1000, 20000);
    CHECK_EQ_INT(st_hedge_plan(&d, u, &c, &p, T0), -1);
    st_upstream_record_latency(u, T0, 30000, 40000);
    /* 20 samples 10..29 ms and 30 ms: p95 is rank 19 (ceil(0.95 * 20)), 28 ms */
    CHECK_EQ_INT(st_hedge_plan(&d, u, &c, &p, T0), 28);
    /* losers cut short count as samples: 20 more at 2 s move p95 up */
    for (i = 0; i < 20; i++)
        st_hedge_lost(u, T0, 2000);
    CHECK_EQ_INT(st_hedge_plan(&d, u, &c, &p, T0), 2000);
    st_hedge_lost(u, T0, -5); /* ignored */
    st_decider_free(&d);
}

/* At most max_ratio of the hedged calls in the window hedge: 1000 calls all
 * wanting one at 0.05, exactly 50 do; none before any call deposited. */
static void test_hedge_budget(void)
{
    st_decider d;
    st_upstream *u;
    st_call c;
    st_hedge_policy p = { 10, 0.95, 0.05 };
    const char *why = NULL;
    unsigned i, hedged = 0;

    st_decider_init(&d, NULL, NULL, 5);
    u = st_decider_upstream(&d, "k", T0);
    st_call_init(&c, &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_hedge_admit(&d, u, u, &c, &p, T0, &why), 0);
    CHECK(why != NULL && strcmp(why, "budget") == 0);
    for (i = 0; i < 1000; i++) {
        (void)st_hedge_plan(&d, u, &c, &p, T0 + i);
        hedged += (unsigned)st_hedge_admit(&d, u, u, &c, &p, T0 + i, NULL);
    }
    CHECK_EQ_INT(hedged, 50);
    CHECK_EQ_INT(u->hedges, 50);
    CHECK_EQ_INT(u->hedges_refused, 951);
    st_decider_free(&d);
}

/* The hedge key's breaker, cap and limiter, and the deadline, refuse a hedge
 * without charging the budget. */
static void test_hedge_caps(void)
{
    st_upstream_config uc;
    st_decider d;
    st_upstream *u, *h;
    st_call c, busy;
    st_admission a;
    st_hedge_policy p = { 10, 0.95, 1 };
    const char *why = NULL;
    int i;

    st_upstream_config_defaults(&uc);
    uc.concurrency = 1;
    uc.limits_per_min[ST_DIM_REQUESTS] = 60; /* one a second, a burst of one */
    st_decider_init(&d, NULL, &uc, 5);
    u = st_decider_upstream(&d, "primary", T0);
    h = st_decider_upstream(&d, "hedge", T0);
    for (i = 0; i < 10; i++)
        (void)st_hedge_plan(&d, u, &c, &p, T0);
    /* h's one slot is taken */
    st_call_init(&busy, &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&d, h, &busy, T0, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_call_init(&c, &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_hedge_admit(&d, u, h, &c, &p, T0, &why), 0);
    CHECK(strcmp(why, "concurrency") == 0);
    ended(&d, h, &busy, 200, T0 + 10);
    /* its limiter gave its one request to `busy`: a hedge now would wait */
    CHECK_EQ_INT(st_hedge_admit(&d, u, h, &c, &p, T0 + 10, &why), 0);
    CHECK(strcmp(why, "limiter") == 0);
    CHECK_EQ_INT(st_hedge_admit(&d, u, h, &c, &p, T0 + 1100, &why), 1);
    /* the deadline: no time left */
    st_call_init(&c, &d, T0, 50, 1, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_hedge_admit(&d, u, h, &c, &p, T0 + 3000, &why), 0);
    CHECK(strcmp(why, "deadline") == 0);
    /* an open breaker */
    st_call_init(&c, &d, T0, 0, 1, ST_PRIORITY_NORMAL, 0, 0);
    st_breaker_open_until(&h->breaker, T0 + 3000, T0 + 60000);
    CHECK_EQ_INT(st_hedge_admit(&d, u, h, &c, &p, T0 + 4000, &why), 0);
    CHECK(strcmp(why, "breaker") == 0);
    CHECK_EQ_INT(u->hedges, 1);
    st_decider_free(&d);
}

int main(void)
{
    test_adaptive_tickets();
    test_adaptive_through_core("queueing", 1);
    test_adaptive_through_core("thrashing", 2);
    test_adaptive_knee_moves();
    test_spend_concurrent();
    test_spend_lifecycle();
    test_spend_scopes();
    test_spend_many_tags();
    test_spend_warnings();
    test_spend_hostile();
    test_hedge_plan();
    test_hedge_budget();
    test_hedge_caps();
    return TEST_REPORT();
}
