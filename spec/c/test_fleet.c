/* Specs for the fleet scope of the decision core (decide.h, "The fleet scope"):
 * what a shared store answers (a place in the fleet's rate limit, an open-until,
 * the fleet's breaker window, this process's share of a limit) handed to the
 * core, which still decides. Virtual time; no store, no network. */
#include "test.h"

#include "decide.h"
#include "httpdate.h"

#include <string.h>

#define T0 INT64_C(5000000)

static st_decider D;

static void fresh(st_decider *d, const st_upstream_config *uc)
{
    st_decider_free(d);
    st_decider_init(d, NULL, uc, 7);
}

static st_upstream *key(st_decider *d, const char *name, int64_t now)
{
    st_upstream *u = st_decider_upstream(d, name, now);
    CHECK(u != NULL);
    return u;
}

static st_attempt_end ok_end(void)
{
    st_attempt_end a;
    memset(&a, 0, sizeof a);
    a.outcome.cls = ST_CLASS_SUCCESS;
    a.status = 200;
    a.total_us = 1000;
    return a;
}

static st_attempt_end failed_end(void)
{
    st_attempt_end a;
    memset(&a, 0, sizeof a);
    a.outcome.cls = ST_CLASS_OVERLOADED;
    a.outcome.kind = "overloaded";
    a.status = 503;
    a.total_us = 1000;
    return a;
}

static unsigned count_events(const st_events *ev, st_event_type type)
{
    unsigned i, n = 0;
    for (i = 0; i < ev->n; i++)
        n += ev->ev[i].type == type;
    return n;
}

/* ---- st_call_max_wait_ms ---------------------------------------------------- */

static void test_max_wait(void)
{
    st_call c;
    int64_t now = T0;

    fresh(&D, NULL);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_call_max_wait_ms(&D, &c, now), 60000);   /* honor_retry_after */
    st_call_init(&c, &D, now, 5000, 0, ST_PRIORITY_NORMAL, 0, 0);
    CHECK_EQ_INT(st_call_max_wait_ms(&D, &c, now), 4999);    /* the deadline, never reached */
    CHECK_EQ_INT(st_call_max_wait_ms(&D, &c, now + 4000), 999);
    CHECK_EQ_INT(st_call_max_wait_ms(&D, &c, now + 4999), 0);
    CHECK_EQ_INT(st_call_max_wait_ms(&D, &c, now + 90000), 0); /* past it: nothing fits */
}

/* ---- not_before: a place in the fleet's limit --------------------------------- */

static void test_not_before_waits(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_call c;
    st_admission a;
    int64_t now = T0;
    double cost[ST_DIM_COUNT] = { 1, 0, 0, 0 };

    st_upstream_config_defaults(&uc);
    uc.limits_per_min[ST_DIM_REQUESTS] = 600; /* 10/s, burst 10 */
    fresh(&D, &uc);
    u = key(&D, "k", now);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 500);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    CHECK_EQ_INT(a.wake_ms, now + 500);
    CHECK_EQ_INT(u->queued, 1);
    CHECK_EQ_INT(u->paced, 1);
    /* the local limiter is not charged while the call waits for its place */
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, cost), 0);
    CHECK(st_pump(&D, u, now + 499, &a, NULL) == NULL);
    CHECK_EQ_INT(a.wake_ms, now + 500);
    CHECK(st_pump(&D, u, now + 500, &a, NULL) == &c);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    CHECK_EQ_INT(c.attempts, 1);
    CHECK_EQ_INT(u->in_flight, 1);
    CHECK_EQ_INT(u->queued, 0);
    /* charged at the start: 10 units of burst, one spent */
    CHECK_NEAR(u->limiter.dims[ST_DIM_REQUESTS].tat_us, (double)(now + 500) * 1000 + 100000, 1);

    /* a place in the past (or cleared) is no wait at all */
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now - 100, 50);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_call_not_before(&c, now, 300);
    CHECK_EQ_INT(c.not_before_ms, now + 300);
    st_call_not_before(&c, now, 0);
    CHECK_EQ_INT(c.not_before_ms, 0);
    st_call_not_before(&c, now, -5);
    CHECK_EQ_INT(c.not_before_ms, 0);
    st_call_not_before(&c, now, INT64_MAX);
    CHECK_EQ_INT(c.not_before_ms, now + ST_RETRY_AFTER_MAX_MS);
}

static void test_not_before_and_local_limiter(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_call c[12];
    st_admission a;
    int64_t now = T0;
    int i;

    st_upstream_config_defaults(&uc);
    uc.limits_per_min[ST_DIM_REQUESTS] = 600; /* 10/s, burst 10 */
    fresh(&D, &uc);
    u = key(&D, "k", now);
    for (i = 0; i < 10; i++) { /* the burst is spent locally */
        st_call_init(&c[i], &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
        st_admit(&D, u, &c[i], now, &a, NULL);
        CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
        st_release(&D, u, &c[i], now, NULL);
    }
    /* the local limiter wants 100 ms, the place 30: the longer wins */
    st_call_init(&c[10], &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c[10], now, 30);
    st_admit(&D, u, &c[10], now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    CHECK_EQ_INT(a.wake_ms, now + 100);
    CHECK(st_pump(&D, u, now + 100, &a, NULL) == &c[10]);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_release(&D, u, &c[10], now + 100, NULL);
    /* the place wants 700 ms, the local limiter 100: the place wins */
    st_call_init(&c[11], &D, now + 100, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c[11], now + 100, 700);
    st_admit(&D, u, &c[11], now + 100, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    CHECK_EQ_INT(a.wake_ms, now + 800);
}

static void test_not_before_bounds(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_call c, first, ahead;
    st_admission a;
    int64_t now = T0;

    st_upstream_config_defaults(&uc);
    uc.concurrency = 1;
    fresh(&D, &uc);
    u = key(&D, "k", now);

    /* beyond honor_retry_after: refused, nothing held */
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 60001);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(strcmp(a.refusal.kind, "rate_limited") == 0);
    CHECK_EQ_INT(c.retry_after_ms, 60001);
    CHECK_EQ_INT(c.attempts, 0);
    CHECK_EQ_INT(u->in_flight, 0);
    CHECK_EQ_INT(u->queued, 0);
    CHECK(!c.permit.valid);
    /* exactly the bound is fine */
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 60000);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    st_release(&D, u, &c, now, NULL);
    CHECK_EQ_INT(u->queued, 0);

    /* reaching the deadline: total_timeout */
    st_call_init(&c, &D, now, 2000, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 2000);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(strcmp(a.refusal.kind, "total_timeout") == 0);
    st_call_init(&c, &D, now, 2000, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 1999);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    st_release(&D, u, &c, now, NULL);

    /* the one slot is taken and another call waits: a place too far off is
     * refused at once, one within the bound queues behind them */
    st_call_init(&first, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &first, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_call_init(&ahead, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &ahead, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 90000);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(strcmp(a.refusal.kind, "rate_limited") == 0);
    CHECK_EQ_INT(u->queued, 1);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&c, now, 300);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    CHECK_EQ_INT(u->queued, 2);
    /* the slot frees at +400: `ahead` starts; c's place has come by then too */
    st_report(&D, u, &first, &(st_attempt_end){ { ST_CLASS_SUCCESS, NULL }, 200, NULL, 0, 0 }, now + 400, 0, NULL);
    CHECK(st_pump(&D, u, now + 400, &a, NULL) == &ahead);
    CHECK(st_pump(&D, u, now + 400, &a, NULL) == NULL);
    CHECK_EQ_INT(a.wake_ms, 0); /* waits for a slot, not for a time */
    st_report(&D, u, &ahead, &(st_attempt_end){ { ST_CLASS_SUCCESS, NULL }, 200, NULL, 0, 0 }, now + 500, 0, NULL);
    CHECK(st_pump(&D, u, now + 500, &a, NULL) == &c);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    /* places and deadlines are both absolute: a place that fit when it was
     * given still fits while the call waits for a slot */
    st_call_init(&ahead, &D, now + 500, 1000, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_call_not_before(&ahead, now + 500, 998);
    st_admit(&D, u, &ahead, now + 500, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_QUEUED);
    CHECK(st_pump(&D, u, now + 1400, &a, NULL) == NULL);
    st_report(&D, u, &c, &(st_attempt_end){ { ST_CLASS_SUCCESS, NULL }, 200, NULL, 0, 0 }, now + 1450, 0, NULL);
    CHECK(st_pump(&D, u, now + 1450, &a, NULL) == NULL);
    CHECK_EQ_INT(a.wake_ms, now + 1498);
    CHECK(st_pump(&D, u, now + 1498, &a, NULL) == &ahead);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
}

/* ---- the fleet's breaker ------------------------------------------------------ */

static void test_open_until(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_call c;
    st_admission a;
    st_events ev;
    int64_t now = T0;

    st_upstream_config_defaults(&uc);
    fresh(&D, &uc);
    u = key(&D, "k", now);
    memset(&ev, 0, sizeof ev);
    st_fleet_open_until(u, now, now + 4000, &ev);
    CHECK_EQ_INT(ev.n, 1);
    CHECK_EQ_INT(ev.ev[0].type, ST_EVENT_BREAKER);
    CHECK_EQ_INT(ev.ev[0].from, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(ev.ev[0].to, ST_BREAKER_OPEN);
    CHECK_EQ_INT(u->breaker.opens, 1);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now + 1000, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    CHECK(strcmp(a.refusal.kind, "circuit_open") == 0);
    CHECK_EQ_INT(c.retry_after_ms, 3000);
    /* a later end extends it without a new open or event; an earlier one changes nothing */
    memset(&ev, 0, sizeof ev);
    st_fleet_open_until(u, now + 1000, now + 9000, &ev);
    st_fleet_open_until(u, now + 1000, now + 2000, &ev);
    CHECK_EQ_INT(ev.n, 0);
    CHECK_EQ_INT(u->breaker.opens, 1);
    CHECK_EQ_INT(u->breaker.open_until_ms, now + 9000);
    /* after it: half-open with probes, as any open */
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    memset(&ev, 0, sizeof ev);
    st_admit(&D, u, &c, now + 9000, &a, &ev);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    CHECK(c.permit.probe);
    CHECK_EQ_INT(ev.n, 1);
    CHECK_EQ_INT(ev.ev[0].to, ST_BREAKER_HALF_OPEN);
    /* an end in the past does nothing; nor anything with the breaker off */
    st_release(&D, u, &c, now + 9000, NULL);
    fresh(&D, &uc);
    u = key(&D, "k", now);
    st_fleet_open_until(u, now, now - 1, NULL);
    CHECK_EQ_INT(st_breaker_state_now(&u->breaker), ST_BREAKER_CLOSED);
    uc.breaker_enabled = 0;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    memset(&ev, 0, sizeof ev);
    st_fleet_open_until(u, now, now + 4000, &ev);
    CHECK_EQ_INT(ev.n, 0);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
}

static void test_fleet_window(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_call c;
    st_admission a;
    st_events ev;
    int64_t now = T0;

    st_upstream_config_defaults(&uc);
    uc.breaker.min_calls = 20;
    uc.breaker.failure_rate = 0.5;
    uc.breaker.open_ms = 3000;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    memset(&ev, 0, sizeof ev);
    /* too few calls, or too few failures: stays closed */
    CHECK_EQ_INT(st_fleet_window(u, now, 19, 19, 0, &ev), 0);
    CHECK_EQ_INT(st_fleet_window(u, now, 40, 19, 0, &ev), 0);
    CHECK_EQ_INT(ev.n, 0);
    /* the fleet's 20 calls trip it though this process made none */
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 10, 0, &ev), 1);
    CHECK_EQ_INT(count_events(&ev, ST_EVENT_BREAKER), 1);
    CHECK_EQ_INT(st_breaker_state_now(&u->breaker), ST_BREAKER_OPEN);
    CHECK_EQ_INT(u->breaker.open_until_ms, now + 3000);
    CHECK_EQ_INT(u->breaker.sum_calls, 0); /* the fleet's counts stay out of the local window */
    /* open already: nothing more */
    CHECK_EQ_INT(st_fleet_window(u, now + 10, 100, 100, 0, &ev), 0);
    CHECK_EQ_INT(ev.n, 1);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now + 100, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_REFUSED);
    /* slow calls trip it too when tracked */
    uc.breaker.slow_call_ms = 1000;
    uc.breaker.slow_rate = 0.8;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 0, 15, NULL), 0);
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 0, 16, NULL), 1);
    /* metrics-only: the state moves, calls still pass */
    uc.breaker_mode = ST_BREAKER_METRICS_ONLY;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 20, 0, NULL), 1);
    CHECK_EQ_INT(st_breaker_state_now(&u->breaker), ST_BREAKER_OPEN);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    /* forced open and disabled judge nothing */
    uc.breaker_mode = ST_BREAKER_FORCED_OPEN;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 20, 0, NULL), 0);
    uc.breaker_mode = ST_BREAKER_DISABLED;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 20, 0, NULL), 0);
    CHECK_EQ_INT(st_breaker_state_now(&u->breaker), ST_BREAKER_CLOSED);
    uc.breaker_mode = ST_BREAKER_NORMAL;
    uc.breaker_enabled = 0;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    CHECK_EQ_INT(st_fleet_window(u, now, 20, 20, 0, NULL), 0);
}

/* The running totals a store adds up: every counted call, never reset. */
static void test_recorded_totals(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_call c;
    st_admission a;
    st_attempt_end ok = ok_end(), bad = failed_end(), slow = ok_end();
    int64_t now = T0;
    int i;

    st_upstream_config_defaults(&uc);
    uc.breaker.min_calls = 4;
    uc.breaker.slow_call_ms = 1000;
    uc.breaker.open_ms = 1000;
    uc.breaker.probes = 1;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    slow.total_us = 2000000;
    for (i = 0; i < 3; i++) {
        st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
        st_admit(&D, u, &c, now, &a, NULL);
        st_report(&D, u, &c, i == 0 ? &ok : (i == 1 ? &slow : &bad), now, 0, NULL);
    }
    CHECK_EQ_INT(u->breaker.recorded_calls, 3);
    CHECK_EQ_INT(u->breaker.recorded_failures, 1);
    CHECK_EQ_INT(u->breaker.recorded_slow, 1);
    /* a canceled call is not a sample */
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now, &a, NULL);
    st_release(&D, u, &c, now, NULL);
    CHECK_EQ_INT(u->breaker.recorded_calls, 3);
    /* one more failure trips it (4 calls, 2 failures); a probe closes it with a
     * fresh window, and the totals go on */
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now, &a, NULL);
    st_report(&D, u, &c, &bad, now, 0, NULL);
    CHECK_EQ_INT(st_breaker_state_now(&u->breaker), ST_BREAKER_OPEN);
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now + 1000, &a, NULL);
    CHECK_EQ_INT(a.verdict, ST_ADMIT_START);
    st_report(&D, u, &c, &ok, now + 1000, 0, NULL);
    CHECK_EQ_INT(st_breaker_state_now(&u->breaker), ST_BREAKER_CLOSED);
    CHECK_EQ_INT(u->breaker.sum_calls, 0);
    CHECK_EQ_INT(u->breaker.recorded_calls, 5);
    CHECK_EQ_INT(u->breaker.recorded_failures, 2);
}

/* ---- this process's share of a limit ---------------------------------------- */

/* Calls admitted in [from, to) by a key admitting greedily every ms. */
static unsigned admitted(st_upstream *u, int64_t from, int64_t to)
{
    unsigned n = 0;
    int64_t t;
    for (t = from; t < to; t++)
        while (st_limiter_acquire(&u->limiter, t, NULL) == 0)
            n++;
    return n;
}

static void test_share(void)
{
    st_upstream_config uc;
    st_upstream *u;
    st_events ev;
    st_headers h;
    st_call c;
    st_admission a;
    st_attempt_end end = ok_end();
    int64_t now = T0;
    unsigned n;

    st_upstream_config_defaults(&uc);
    uc.limits_per_min[ST_DIM_REQUESTS] = 6000; /* 100/s, burst 100 */
    fresh(&D, &uc);
    u = key(&D, "k", now);
    st_fleet_share(u, now, 4);
    CHECK_NEAR(st_limiter_limit(&u->limiter, ST_DIM_REQUESTS), 1500, 1e-9);
    CHECK_NEAR(u->limiter.configured[ST_DIM_REQUESTS], 6000, 1e-9); /* as configured */
    /* 25/s, starting with nothing left: 10 s of greedy calls pass 250 */
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, NULL), 40);
    n = admitted(u, now, now + 10000);
    CHECK(n >= 249 && n <= 251);
    /* the whole limit again: 100/s */
    now += 10000;
    st_fleet_share(u, now, 1);
    CHECK_NEAR(st_limiter_limit(&u->limiter, ST_DIM_REQUESTS), 6000, 1e-9);
    n = admitted(u, now + 2000, now + 12000);
    CHECK(n >= 1099 && n <= 1101);

    /* a limit learned from headers while shared is divided too; the event
     * carries both the header's limit and the effective one */
    st_upstream_config_defaults(&uc);
    fresh(&D, &uc);
    u = key(&D, "k", now);
    st_fleet_share(u, now, 4);
    CHECK_NEAR(st_limiter_limit(&u->limiter, ST_DIM_REQUESTS), 0, 0);
    memset(&h, 0, sizeof h);
    st_headers_add_line(&h, "anthropic-ratelimit-requests-limit: 3000\r\n", 42);
    end.headers = &h;
    st_call_init(&c, &D, now, 0, 0, ST_PRIORITY_NORMAL, 0, 0);
    st_admit(&D, u, &c, now, &a, NULL);
    memset(&ev, 0, sizeof ev);
    st_report(&D, u, &c, &end, now, 0, &ev);
    CHECK_EQ_INT(count_events(&ev, ST_EVENT_LIMIT_LEARNED), 1);
    CHECK_NEAR(ev.ev[0].learned, 3000, 1e-9);
    CHECK_NEAR(ev.ev[0].limit, 750, 1e-9);
    CHECK_NEAR(st_limiter_limit(&u->limiter, ST_DIM_REQUESTS), 750, 1e-9);
    st_headers_free(&h);

    /* debt is kept in time: 110 units (the burst of 100 and 10 more) wait
     * 1100 + 10 - 1000 ms at 100/s; at 25/s the same 1100 ms of debt against
     * a burst of 25 (still one second's worth) wait 1100 + 40 - 1000 */
    st_upstream_config_defaults(&uc);
    uc.limits_per_min[ST_DIM_REQUESTS] = 6000;
    fresh(&D, &uc);
    u = key(&D, "k", now);
    st_limiter_correct(&u->limiter, now, ST_DIM_REQUESTS, 110); /* burst of 100 + 10 owed */
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, NULL), 110);
    st_fleet_share(u, now, 4);
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, NULL), 140);
    /* a larger share keeps the time too */
    st_fleet_share(u, now, 2);
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, NULL), 120);
    /* an empty bucket ("remaining 0" at the full rate) is one interval of the
     * share away from its next call, not n bursts */
    fresh(&D, &uc);
    u = key(&D, "k", now);
    st_limiter_learn(&u->limiter, now, ST_DIM_REQUESTS, 0, 0, -1);
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, NULL), 10);
    st_fleet_share(u, now, 4);
    CHECK_EQ_INT(st_limiter_wait_ms(&u->limiter, now, NULL), 40);

    /* hostile divisors: below 1 or NaN is the whole limit, huge is capped */
    st_fleet_share(u, now, 0);
    CHECK_NEAR(st_limiter_limit(&u->limiter, ST_DIM_REQUESTS), 6000, 1e-9);
    st_fleet_share(u, now, -3);
    CHECK_NEAR(u->limiter.share, 1, 0);
    st_fleet_share(u, now, NAN);
    CHECK_NEAR(u->limiter.share, 1, 0);
    st_fleet_share(u, now, INFINITY);
    CHECK_NEAR(u->limiter.share, 1e6, 0);
    CHECK_NEAR(st_limiter_limit(&u->limiter, ST_DIM_REQUESTS), 0.006, 1e-12);
    st_fleet_share(u, now, 1e300);
    CHECK_NEAR(u->limiter.share, 1e6, 0);
}

int main(void)
{
    test_max_wait();
    test_not_before_waits();
    test_not_before_and_local_limiter();
    test_not_before_bounds();
    test_open_until();
    test_fleet_window();
    test_recorded_totals();
    test_share();
    st_decider_free(&D);
    return TEST_REPORT();
}
