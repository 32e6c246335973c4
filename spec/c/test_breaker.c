/* Specs for the circuit breaker, driven by a virtual clock: thresholds, lazy
 * half-open, probes and their permits, windows, modes, and a long random run
 * checked against a brute-force recount. */
#include "test.h"

#include "backoff.h"
#include "breaker.h"

#include <stdlib.h>
#include <string.h>

#define T0 INT64_C(1000000)     /* a window-aligned start, away from zero */

static st_rng rng;              /* the project's seedable splitmix64 */

static uint64_t rnd(void)
{
    return st_rng_next(&rng);
}

static unsigned rnd_below(unsigned n)
{
    return (unsigned)(rnd() % n);
}

static int acquire(st_breaker *b, int64_t t, st_permit *p)
{
    int64_t wait = -1;
    return st_breaker_acquire(b, t, p, &wait);
}

/* One whole call: 1 when it was admitted (and recorded). */
static int call(st_breaker *b, int64_t t, st_class cls, int64_t latency_ms)
{
    st_permit p;
    if (!acquire(b, t, &p))
        return 0;
    st_breaker_record(b, t, &p, cls, latency_ms);
    return 1;
}

static st_breaker_stats stats(st_breaker *b, int64_t t)
{
    st_breaker_stats s;
    st_breaker_stats_get(b, t, &s);
    return s;
}

/* Open a default breaker at time t with 20 failures. */
static void trip(st_breaker *b, int64_t t)
{
    int i;
    for (i = 0; i < 20; i++)
        call(b, t, ST_CLASS_TRANSIENT, 10);
}

/* ---------------------------------------------------------------- config */

static void test_defaults(void)
{
    st_breaker_config c;
    st_breaker b;
    st_permit p;

    st_breaker_config_defaults(&c);
    CHECK_EQ_INT(c.window_ms, 30000);
    CHECK_EQ_INT(c.buckets, 10);
    CHECK_EQ_INT(c.min_calls, 20);
    CHECK(c.failure_rate == 0.5);
    CHECK_EQ_INT(c.slow_call_ms, 20000);
    CHECK(c.slow_rate == 0.8);
    CHECK_EQ_INT(c.open_ms, 15000);
    CHECK_EQ_INT(c.max_open_ms, 300000);
    CHECK_EQ_INT(c.probes, 3);
    CHECK_EQ_INT(c.probe_timeout_ms, 60000);
    CHECK_EQ_INT(c.failure_classes, (1u << ST_CLASS_OVERLOADED) | (1u << ST_CLASS_TRANSIENT) |
                                    (1u << ST_CLASS_TIMEOUT));

    st_breaker_init(&b, NULL, 0);
    CHECK_EQ_INT(b.cfg.window_ms, 30000);
    CHECK_EQ_INT(b.bucket_ms, 3000);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    CHECK(acquire(&b, 0, &p) && p.valid && !p.probe);

    /* out of range values fall back */
    c.window_ms = 0;
    c.buckets = 1000;
    c.min_calls = 0;
    c.failure_rate = 0.0 / 0.0;
    c.slow_rate = -1;
    c.slow_call_ms = -5;
    c.open_ms = -1;
    c.max_open_ms = 10;
    c.probes = 1000;
    c.probe_timeout_ms = 0;
    st_breaker_init(&b, &c, 0);
    CHECK_EQ_INT(b.cfg.window_ms, 30000);
    CHECK_EQ_INT(b.cfg.buckets, ST_BREAKER_MAX_BUCKETS);
    CHECK_EQ_INT(b.bucket_ms, 30000 / 64);
    CHECK_EQ_INT(b.cfg.min_calls, 1);
    CHECK(b.cfg.failure_rate == 0.5);
    CHECK(b.cfg.slow_rate == 0);
    CHECK_EQ_INT(b.cfg.slow_call_ms, 0);
    CHECK_EQ_INT(b.cfg.open_ms, 15000);
    CHECK_EQ_INT(b.cfg.max_open_ms, 15000);
    CHECK_EQ_INT(b.cfg.probes, ST_BREAKER_MAX_PROBES);
    CHECK_EQ_INT(b.cfg.probe_timeout_ms, 60000);

    c.buckets = 0;
    c.probes = 0;
    c.window_ms = 5;
    st_breaker_init(&b, &c, 0);
    CHECK_EQ_INT(b.cfg.buckets, 10);
    CHECK_EQ_INT(b.bucket_ms, 1);             /* 5 / 10 rounds up to 1 ms */
    CHECK_EQ_INT(b.cfg.probes, 1);
}

/* ---------------------------------------------------------------- thresholds */

static void test_min_calls(void)
{
    st_breaker b;
    st_breaker_stats s;
    int i, admitted = 0;

    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 19; i++)
        admitted += call(&b, T0, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(admitted, 19);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(s.calls, 19);
    CHECK_EQ_INT(s.failures, 19);
    CHECK(s.failure_rate == 1.0);
    CHECK_EQ_INT(s.opens, 0);

    CHECK(call(&b, T0, ST_CLASS_OVERLOADED, 10));
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(s.calls, 20);
    CHECK(s.failure_rate == 1.0);
    CHECK_EQ_INT(s.opens, 1);
    CHECK_EQ_INT(s.open_until_ms, T0 + 15000);
    CHECK_EQ_INT(s.current_open_ms, 15000);
    CHECK(!call(&b, T0, ST_CLASS_SUCCESS, 10));

    /* 19 failures then a success: 0.95 at 20 calls opens too */
    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 19; i++)
        call(&b, T0, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    call(&b, T0, ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
}

static void test_rate_boundary(void)
{
    st_breaker b;
    st_breaker_stats s;
    int i;

    /* 10 + 10 at rate 0.5 opens, whichever comes first */
    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 10; i++)
        call(&b, T0, ST_CLASS_SUCCESS, 10);
    for (i = 0; i < 9; i++)
        call(&b, T0, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    call(&b, T0, ST_CLASS_TRANSIENT, 10);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(s.calls, 20);
    CHECK(s.failure_rate == 0.5);

    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 20; i++)
        call(&b, T0, i % 2 ? ST_CLASS_TIMEOUT : ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);

    /* 9 + 11 does not, nor does the 21st call making it 10 of 21 */
    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 9; i++)
        call(&b, T0, ST_CLASS_TRANSIENT, 10);
    for (i = 0; i < 11; i++)
        call(&b, T0, ST_CLASS_SUCCESS, 10);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(s.calls, 20);
    CHECK(s.failure_rate == 0.45);
    call(&b, T0, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    call(&b, T0, ST_CLASS_TRANSIENT, 10);     /* 11 of 22 */
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);

    /* a decimal rate trips where it says, products that round up included */
    {
        st_breaker_config c;
        st_breaker_config_defaults(&c);
        c.min_calls = 10;
        c.failure_rate = 0.1 * 3;             /* 0.30000000000000004 */
        st_breaker_init(&b, &c, T0);
        for (i = 0; i < 7; i++)
            call(&b, T0, ST_CLASS_SUCCESS, 10);
        for (i = 0; i < 3; i++)
            call(&b, T0, ST_CLASS_TRANSIENT, 10);
        CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    }
}

static void test_classes(void)
{
    st_breaker b;
    st_breaker_config c;
    int i;
    static const st_class harmless[] = { ST_CLASS_SUCCESS, ST_CLASS_THROTTLED, ST_CLASS_FATAL };
    static const st_class failing[] = { ST_CLASS_OVERLOADED, ST_CLASS_TRANSIENT, ST_CLASS_TIMEOUT };
    size_t k;

    for (k = 0; k < 3; k++) {
        st_breaker_init(&b, NULL, T0);
        for (i = 0; i < 100; i++)
            call(&b, T0, harmless[k], 10);
        CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
        CHECK_EQ_INT(stats(&b, T0).calls, 100);
        CHECK_EQ_INT(stats(&b, T0).failures, 0);

        st_breaker_init(&b, NULL, T0);
        for (i = 0; i < 20; i++)
            call(&b, T0, failing[k], 10);
        CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    }

    /* canceled is a release: nothing counted */
    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 50; i++)
        call(&b, T0, ST_CLASS_CANCELED, 10);
    CHECK_EQ_INT(stats(&b, T0).calls, 0);

    /* a class outside the enum is no failure */
    for (i = 0; i < 50; i++)
        call(&b, T0, (st_class)99, 10);
    CHECK_EQ_INT(stats(&b, T0).calls, 50);
    CHECK_EQ_INT(stats(&b, T0).failures, 0);

    /* the mask is configurable: throttled counts, timeout does not */
    st_breaker_config_defaults(&c);
    c.failure_classes = ST_BREAKER_CLASS(ST_CLASS_THROTTLED);
    st_breaker_init(&b, &c, T0);
    for (i = 0; i < 30; i++)
        call(&b, T0, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    for (i = 0; i < 30; i++)
        call(&b, T0, ST_CLASS_THROTTLED, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
}

static void test_slow_calls(void)
{
    st_breaker b;
    st_breaker_config c;
    st_breaker_stats s;
    int i;

    /* 16 slow of 20 is 0.8 */
    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 4; i++)
        call(&b, T0, ST_CLASS_SUCCESS, 19999);
    for (i = 0; i < 15; i++)
        call(&b, T0, ST_CLASS_SUCCESS, 20000);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(s.slow, 15);
    CHECK_EQ_INT(s.failures, 0);
    call(&b, T0, ST_CLASS_FATAL, 50000);      /* slow whatever the class */
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_OPEN);
    CHECK(s.slow_rate == 0.8);

    /* 15 of 20 does not */
    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 5; i++)
        call(&b, T0, ST_CLASS_SUCCESS, 100);
    for (i = 0; i < 15; i++)
        call(&b, T0, ST_CLASS_SUCCESS, 25000);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    CHECK(stats(&b, T0).slow_rate == 0.75);

    /* a slow failure counts as both */
    st_breaker_init(&b, NULL, T0);
    call(&b, T0, ST_CLASS_TIMEOUT, 30000);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.failures, 1);
    CHECK_EQ_INT(s.slow, 1);

    /* slow_call_ms 0: no slow tracking */
    st_breaker_config_defaults(&c);
    c.slow_call_ms = 0;
    st_breaker_init(&b, &c, T0);
    for (i = 0; i < 100; i++)
        call(&b, T0, ST_CLASS_SUCCESS, INT64_C(1) << 40);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(s.slow, 0);
}

/* ---------------------------------------------------------------- half-open */

static void test_lazy_half_open(void)
{
    st_breaker b;
    st_permit p;
    int64_t wait, d;
    int ok = 1;

    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    for (d = 0; d < 15000; d += 7) {
        wait = -1;
        ok &= !st_breaker_acquire(&b, T0 + d, &p, &wait) && wait == 15000 - d && !p.valid;
    }
    CHECK(ok);
    wait = -1;
    CHECK(!st_breaker_acquire(&b, T0 + 14999, &p, &wait));
    CHECK_EQ_INT(wait, 1);
    /* nothing happens without a call */
    CHECK_EQ_INT(stats(&b, T0 + 40000).state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    CHECK(st_breaker_acquire(&b, T0 + 40000, &p, NULL));
    CHECK(p.valid && p.probe);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);

    /* exactly at open_until */
    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    CHECK(st_breaker_acquire(&b, T0 + 15000, &p, NULL) && p.probe);
}

static void test_probes_close(void)
{
    st_breaker b;
    st_permit p[4];
    st_breaker_stats s;
    int64_t wait = -1;
    int i;

    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    for (i = 0; i < 3; i++)
        CHECK(st_breaker_acquire(&b, T0 + 15000, &p[i], NULL) && p[i].probe);
    CHECK(!st_breaker_acquire(&b, T0 + 15000, &p[3], &wait));
    CHECK_EQ_INT(wait, 60000);                /* until the probe timeout */
    CHECK(!st_breaker_acquire(&b, T0 + 16000, &p[3], &wait));
    CHECK_EQ_INT(wait, 59000);
    st_breaker_record(&b, T0 + 16000, &p[0], ST_CLASS_SUCCESS, 1000);
    CHECK(!p[0].valid);
    /* one success and two out: still no fourth probe */
    CHECK(!st_breaker_acquire(&b, T0 + 16000, &p[3], NULL));
    st_breaker_record(&b, T0 + 16000, &p[1], ST_CLASS_FATAL, 1000);   /* a 4xx is a success here */
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    st_breaker_record(&b, T0 + 16001, &p[2], ST_CLASS_THROTTLED, 1000);
    s = stats(&b, T0 + 16001);
    CHECK_EQ_INT(s.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(s.calls, 0);                 /* fresh window */
    CHECK_EQ_INT(s.current_open_ms, 15000);
    CHECK_EQ_INT(s.opens, 1);
    CHECK_EQ_INT(s.open_until_ms, 0);
    CHECK(st_breaker_acquire(&b, T0 + 16001, &p[3], NULL) && !p[3].probe);
    /* 19 more failures are not enough in the fresh window */
    st_breaker_record(&b, T0 + 16001, &p[3], ST_CLASS_TIMEOUT, 10);
    for (i = 0; i < 18; i++)
        call(&b, T0 + 16001, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    call(&b, T0 + 16001, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
}

static void test_failed_probe_backoff(void)
{
    st_breaker b;
    st_permit p;
    int64_t t = T0, wait;
    static const int64_t expect[] = { 30000, 60000, 120000, 240000, 300000, 300000 };
    size_t k;

    st_breaker_init(&b, NULL, t);
    trip(&b, t);
    t += 15000;
    for (k = 0; k < sizeof expect / sizeof expect[0]; k++) {
        CHECK(st_breaker_acquire(&b, t, &p, NULL) && p.probe);
        st_breaker_record(&b, t, &p, ST_CLASS_OVERLOADED, 10);
        CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
        CHECK_EQ_INT(stats(&b, t).current_open_ms, expect[k]);
        CHECK(!st_breaker_acquire(&b, t, &p, &wait));
        CHECK_EQ_INT(wait, expect[k]);
        CHECK(!st_breaker_acquire(&b, t + expect[k] - 1, &p, &wait));
        CHECK_EQ_INT(wait, 1);
        t += expect[k];
    }
    CHECK_EQ_INT(stats(&b, t).opens, 7);

    /* a slow success is a failed probe too */
    CHECK(st_breaker_acquire(&b, t, &p, NULL) && p.probe);
    st_breaker_record(&b, t, &p, ST_CLASS_SUCCESS, 20000);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    t += 300000;

    /* closing brings the open time back */
    for (k = 0; k < 3; k++) {
        CHECK(st_breaker_acquire(&b, t, &p, NULL) && p.probe);
        st_breaker_record(&b, t, &p, ST_CLASS_SUCCESS, 10);
    }
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    trip(&b, t);
    CHECK(!st_breaker_acquire(&b, t, &p, &wait));
    CHECK_EQ_INT(wait, 15000);
}

static void test_canceled_probe(void)
{
    st_breaker b;
    st_permit p[3], q, copy;
    int i;

    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    for (i = 0; i < 3; i++)
        CHECK(st_breaker_acquire(&b, T0 + 15000, &p[i], NULL));
    CHECK(!st_breaker_acquire(&b, T0 + 15000, &q, NULL));

    /* a released probe lets another in, once */
    copy = p[0];
    st_breaker_release(&b, T0 + 15001, &p[0]);
    CHECK(!p[0].valid);
    st_breaker_release(&b, T0 + 15001, &p[0]);
    st_breaker_record(&b, T0 + 15001, &p[0], ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    CHECK(st_breaker_acquire(&b, T0 + 15001, &q, NULL) && q.probe);
    CHECK(!st_breaker_acquire(&b, T0 + 15001, &copy, NULL));
    /* a stale copy of the released permit frees nothing */
    copy.valid = 1;
    copy.token = p[0].token;
    st_breaker_release(&b, T0 + 15002, &copy);
    CHECK_EQ_INT(b.probes_out, 3);
    CHECK(!st_breaker_acquire(&b, T0 + 15002, &copy, NULL));

    /* recording canceled releases */
    st_breaker_record(&b, T0 + 15003, &p[1], ST_CLASS_CANCELED, 10);
    CHECK_EQ_INT(b.probes_out, 2);
    CHECK(st_breaker_acquire(&b, T0 + 15003, &p[1], NULL) && p[1].probe);

    /* the three probes out succeed: closed */
    st_breaker_record(&b, T0 + 15004, &q, ST_CLASS_SUCCESS, 10);
    st_breaker_record(&b, T0 + 15004, &p[1], ST_CLASS_SUCCESS, 10);
    st_breaker_record(&b, T0 + 15004, &q, ST_CLASS_SUCCESS, 10);    /* twice: ignored */
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    st_breaker_record(&b, T0 + 15004, &p[2], ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);

    /* a NULL permit is harmless */
    st_breaker_release(&b, T0, NULL);
    st_breaker_record(&b, T0, NULL, ST_CLASS_SUCCESS, 1);
}

static void test_stale_probe(void)
{
    st_breaker b;
    st_permit old, fail, p;
    int i;

    /* a probe from an earlier half-open does not count toward closing the next */
    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    CHECK(st_breaker_acquire(&b, T0 + 15000, &old, NULL) && old.probe);
    CHECK(st_breaker_acquire(&b, T0 + 15000, &fail, NULL));
    st_breaker_record(&b, T0 + 15000, &fail, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    CHECK(st_breaker_acquire(&b, T0 + 45000, &p, NULL) && p.probe);
    st_breaker_record(&b, T0 + 45000, &old, ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(b.probes_ok, 0);
    CHECK_EQ_INT(b.probes_out, 1);
    st_breaker_release(&b, T0 + 45000, &old);      /* already used: harmless */
    CHECK_EQ_INT(b.probes_out, 1);
    st_breaker_record(&b, T0 + 45000, &p, ST_CLASS_SUCCESS, 10);
    for (i = 0; i < 2; i++)
        call(&b, T0 + 45000, ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);

    /* a stale failing probe does not re-open either */
    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    CHECK(st_breaker_acquire(&b, T0 + 15000, &old, NULL));
    CHECK(st_breaker_acquire(&b, T0 + 15000, &fail, NULL));
    st_breaker_record(&b, T0 + 15000, &fail, ST_CLASS_TIMEOUT, 10);
    CHECK(st_breaker_acquire(&b, T0 + 45000, &p, NULL));
    st_breaker_record(&b, T0 + 45000, &old, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
}

static void test_probe_timeout(void)
{
    st_breaker b;
    st_permit p[3], q;
    int64_t wait, t;
    int i;

    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    t = T0 + 15000;
    /* half-open with nothing out never times out */
    CHECK(st_breaker_acquire(&b, t, &p[0], NULL));
    st_breaker_release(&b, t, &p[0]);
    t += 1000000;
    for (i = 0; i < 3; i++)
        CHECK(st_breaker_acquire(&b, t + i, &p[i], NULL) && p[i].probe);
    /* the clock runs from the first probe out */
    CHECK(!st_breaker_acquire(&b, t + 59999, &q, &wait));
    CHECK_EQ_INT(wait, 1);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    CHECK(!st_breaker_acquire(&b, t + 60000, &q, &wait));
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    CHECK_EQ_INT(wait, 30000);
    CHECK_EQ_INT(stats(&b, t).current_open_ms, 30000);
    t += 90000;
    /* recovers: the lost permits are stale now */
    for (i = 0; i < 3; i++) {
        CHECK(st_breaker_acquire(&b, t, &q, NULL) && q.probe);
        st_breaker_record(&b, t, &q, ST_CLASS_SUCCESS, 10);
    }
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    st_breaker_record(&b, t, &p[0], ST_CLASS_TIMEOUT, 10);   /* late lost probe: not counted */
    CHECK_EQ_INT(stats(&b, t).calls, 0);

    /* a completion restarts the clock */
    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    t = T0 + 15000;
    CHECK(st_breaker_acquire(&b, t, &p[0], NULL));
    CHECK(st_breaker_acquire(&b, t, &p[1], NULL));
    st_breaker_record(&b, t + 50000, &p[0], ST_CLASS_SUCCESS, 10);
    CHECK(st_breaker_acquire(&b, t + 109999, &q, NULL) && q.probe);   /* 59999 ms after it */
    st_breaker_release(&b, t + 109999, &q);     /* a release restarts it too */
    CHECK(st_breaker_acquire(&b, t + 169998, &q, NULL) && q.probe);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    CHECK(!st_breaker_acquire(&b, t + 170000, &q, NULL));
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
}

/* ---------------------------------------------------------------- window */

static void test_window_eviction(void)
{
    st_breaker b;
    int i;

    /* failures at t count until the end of the 10th bucket of 3 s */
    st_breaker_init(&b, NULL, 0);
    for (i = 0; i < 19; i++)
        call(&b, 0, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(stats(&b, 29999).calls, 19);
    call(&b, 29999, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);

    st_breaker_init(&b, NULL, 0);
    for (i = 0; i < 19; i++)
        call(&b, 2999, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(stats(&b, 29999).calls, 19);
    CHECK_EQ_INT(stats(&b, 30000).calls, 0);
    call(&b, 30000, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    CHECK_EQ_INT(stats(&b, 30000).failures, 1);

    /* a call per second: the window holds the last 27 to 30 of them */
    st_breaker_init(&b, NULL, 0);
    for (i = 0; i < 100; i++)
        call(&b, i * 1000, ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(stats(&b, 99000).calls, 28);   /* buckets 24..33: 72..99 s */
    CHECK_EQ_INT(stats(&b, 101999).calls, 28);
    CHECK_EQ_INT(stats(&b, 102000).calls, 25);  /* buckets 25..34: 75..99 s */
    CHECK_EQ_INT(stats(&b, 10000000).calls, 0);

    /* a long idle gap, then time going backwards: the call lands in the newest
     * bucket (33, 99..102 s) and leaves with it */
    st_breaker_init(&b, NULL, 0);
    call(&b, 100000, ST_CLASS_TRANSIENT, 10);
    call(&b, 0, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(stats(&b, 50).calls, 2);
    CHECK_EQ_INT(stats(&b, 128999).calls, 2);
    CHECK_EQ_INT(stats(&b, 129000).calls, 0);

    /* extreme clocks do not overflow */
    st_breaker_init(&b, NULL, INT64_MIN);
    call(&b, INT64_MIN, ST_CLASS_TRANSIENT, INT64_MIN);
    call(&b, INT64_MAX, ST_CLASS_TRANSIENT, INT64_MAX);
    CHECK_EQ_INT(stats(&b, INT64_MAX).calls, 1);
    trip(&b, INT64_MAX);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    CHECK_EQ_INT(stats(&b, INT64_MAX).open_until_ms, INT64_MAX);
    {
        st_permit p;
        int64_t wait = -1;
        CHECK(!st_breaker_acquire(&b, INT64_MIN, &p, &wait));
        CHECK_EQ_INT(wait, INT64_MAX);
    }
}

static void test_late_records(void)
{
    st_breaker b;
    st_permit p[25], late;
    st_breaker_stats s;
    int i;

    st_breaker_init(&b, NULL, T0);
    for (i = 0; i < 25; i++)
        CHECK(acquire(&b, T0, &p[i]));
    for (i = 0; i < 20; i++)
        st_breaker_record(&b, T0 + 1, &p[i], ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    /* calls that started before the open are counted, state unchanged */
    st_breaker_record(&b, T0 + 2, &p[20], ST_CLASS_TRANSIENT, 10);
    st_breaker_record(&b, T0 + 2, &p[21], ST_CLASS_SUCCESS, 10);
    st_breaker_record(&b, T0 + 2, &p[21], ST_CLASS_SUCCESS, 10);    /* twice: once */
    s = stats(&b, T0 + 2);
    CHECK_EQ_INT(s.calls, 22);
    CHECK_EQ_INT(s.failures, 21);
    CHECK_EQ_INT(s.open_until_ms, T0 + 1 + 15000);
    CHECK_EQ_INT(s.opens, 1);

    /* recorded in half-open: counted, no state change */
    CHECK(st_breaker_acquire(&b, T0 + 15001, &late, NULL) && late.probe);
    st_breaker_record(&b, T0 + 15001, &p[22], ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    CHECK_EQ_INT(stats(&b, T0 + 15001).calls, 23);
    st_breaker_record(&b, T0 + 15001, &late, ST_CLASS_SUCCESS, 10);
    call(&b, T0 + 15001, ST_CLASS_SUCCESS, 10);
    call(&b, T0 + 15001, ST_CLASS_SUCCESS, 10);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    /* after the window reset they no longer count */
    st_breaker_record(&b, T0 + 15002, &p[23], ST_CLASS_TIMEOUT, 10);
    st_breaker_release(&b, T0 + 15002, &p[24]);
    CHECK_EQ_INT(stats(&b, T0 + 15002).calls, 0);
}

/* ---------------------------------------------------------------- open until */

static void test_open_until(void)
{
    st_breaker b;
    st_permit p;
    st_breaker_stats s;
    int64_t wait;

    st_breaker_init(&b, NULL, T0);
    st_breaker_open_until(&b, T0, T0);              /* not later than now: nothing */
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    st_breaker_open_until(&b, T0, T0 + 60000);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(s.open_until_ms, T0 + 60000);
    CHECK_EQ_INT(s.opens, 1);
    CHECK_EQ_INT(s.current_open_ms, 15000);
    CHECK(!st_breaker_acquire(&b, T0 + 1000, &p, &wait));
    CHECK_EQ_INT(wait, 59000);
    st_breaker_open_until(&b, T0 + 1000, T0 + 30000);   /* earlier: ignored */
    CHECK_EQ_INT(stats(&b, T0).open_until_ms, T0 + 60000);
    st_breaker_open_until(&b, T0 + 1000, T0 + 90000);   /* later: extends */
    CHECK(!st_breaker_acquire(&b, T0 + 89999, &p, &wait));
    CHECK_EQ_INT(wait, 1);
    CHECK_EQ_INT(stats(&b, T0).opens, 1);
    CHECK(st_breaker_acquire(&b, T0 + 90000, &p, NULL) && p.probe);
    /* from half-open: open again, probes out become stale */
    st_breaker_open_until(&b, T0 + 90000, T0 + 100000);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    CHECK_EQ_INT(stats(&b, T0).opens, 2);
    st_breaker_record(&b, T0 + 100000, &p, ST_CLASS_SUCCESS, 10);
    CHECK(st_breaker_acquire(&b, T0 + 100000, &p, NULL) && p.probe);
    CHECK_EQ_INT(b.probes_out, 1);
    CHECK_EQ_INT(b.probes_ok, 0);
    /* an open from a threshold uses the configured open time still */
    st_breaker_record(&b, T0 + 100000, &p, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(stats(&b, T0).current_open_ms, 30000);

    /* ignored when disabled or forced open */
    st_breaker_init(&b, NULL, T0);
    st_breaker_set_mode(&b, ST_BREAKER_DISABLED, T0);
    st_breaker_open_until(&b, T0, T0 + 60000);
    CHECK(acquire(&b, T0 + 1, &p));
}

/* ---------------------------------------------------------------- modes */

static void test_modes(void)
{
    st_breaker b;
    st_permit p;
    st_breaker_stats s;
    int64_t wait;
    int i, admitted;

    /* forced open */
    st_breaker_init(&b, NULL, T0);
    call(&b, T0, ST_CLASS_TRANSIENT, 10);
    CHECK(acquire(&b, T0, &p));
    st_breaker_set_mode(&b, ST_BREAKER_FORCED_OPEN, T0);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    wait = 0;
    CHECK(!st_breaker_acquire(&b, T0 + 100000000, &p, &wait));
    CHECK_EQ_INT(wait, INT64_MAX);
    CHECK(!p.valid);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(s.mode, ST_BREAKER_FORCED_OPEN);
    CHECK_EQ_INT(s.open_until_ms, INT64_MAX);
    CHECK_EQ_INT(s.calls, 0);                 /* fresh window */
    st_breaker_set_mode(&b, ST_BREAKER_NORMAL, T0);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    CHECK(acquire(&b, T0, &p));
    st_breaker_set_mode(&b, ST_BREAKER_FORCED_OPEN, T0);
    st_breaker_record(&b, T0, &p, ST_CLASS_TIMEOUT, 10);
    CHECK_EQ_INT(stats(&b, T0).calls, 0);     /* issued before the mode change */

    /* disabled: admits all, counts nothing */
    st_breaker_init(&b, NULL, T0);
    trip(&b, T0);
    st_breaker_set_mode(&b, ST_BREAKER_DISABLED, T0);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    admitted = 0;
    for (i = 0; i < 1000; i++)
        admitted += call(&b, T0 + i, ST_CLASS_TRANSIENT, 100000);
    CHECK_EQ_INT(admitted, 1000);
    s = stats(&b, T0 + 1000);
    CHECK_EQ_INT(s.state, ST_BREAKER_CLOSED);
    CHECK_EQ_INT(s.mode, ST_BREAKER_DISABLED);
    CHECK_EQ_INT(s.calls, 0);
    CHECK(s.failure_rate == 0);
    st_breaker_set_mode(&b, ST_BREAKER_DISABLED, T0);     /* same mode: no-op */
    st_breaker_set_mode(&b, (st_breaker_mode)42, T0);     /* unknown: ignored */
    CHECK_EQ_INT(b.mode, ST_BREAKER_DISABLED);
    st_breaker_set_mode(&b, ST_BREAKER_NORMAL, T0 + 1000);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    CHECK_EQ_INT(stats(&b, T0 + 1000).calls, 0);

    /* metrics-only: admits all, reports what it would do */
    st_breaker_init(&b, NULL, T0);
    st_breaker_set_mode(&b, ST_BREAKER_METRICS_ONLY, T0);
    admitted = 0;
    for (i = 0; i < 40; i++)
        admitted += call(&b, T0, ST_CLASS_TRANSIENT, 10);
    CHECK_EQ_INT(admitted, 40);
    s = stats(&b, T0);
    CHECK_EQ_INT(s.state, ST_BREAKER_OPEN);
    CHECK_EQ_INT(s.mode, ST_BREAKER_METRICS_ONLY);
    CHECK_EQ_INT(s.calls, 40);                /* the 20 it would have refused count as late calls */
    CHECK_EQ_INT(s.opens, 1);
    CHECK(st_breaker_acquire(&b, T0 + 14999, &p, NULL) && !p.probe);
    st_breaker_release(&b, T0 + 14999, &p);
    CHECK(st_breaker_acquire(&b, T0 + 15000, &p, NULL) && p.probe);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_HALF_OPEN);
    st_breaker_record(&b, T0 + 15000, &p, ST_CLASS_SUCCESS, 10);
    for (i = 0; i < 2; i++) {
        CHECK(st_breaker_acquire(&b, T0 + 15000, &p, NULL) && p.probe);
        st_breaker_record(&b, T0 + 15000, &p, ST_CLASS_SUCCESS, 10);
    }
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_CLOSED);
    /* to normal keeps what it learned: trip it, then switch */
    trip(&b, T0 + 20000);
    CHECK_EQ_INT(st_breaker_state_now(&b), ST_BREAKER_OPEN);
    st_breaker_set_mode(&b, ST_BREAKER_NORMAL, T0 + 20000);
    CHECK(!st_breaker_acquire(&b, T0 + 20001, &p, &wait));
    CHECK_EQ_INT(wait, 14999);
    st_breaker_set_mode(&b, ST_BREAKER_METRICS_ONLY, T0 + 20001);
    CHECK(acquire(&b, T0 + 20001, &p));
    CHECK_EQ_INT(stats(&b, T0 + 20001).calls, 20);
}

/* ---------------------------------------------------------------- simulation */

/* Random traffic with healthy and sick phases, lost permits and cancels, checked
 * step by step against a model: the window counts equal a brute-force recount of the
 * calls that should count, thresholds trip exactly when the recount says so, probes
 * out never exceed the configured number, and the breaker never stays shut longer
 * than its probes and the longest open allow. */
#define SIM_STEPS 300000
#define SIM_FLIGHT 64

typedef struct { int64_t t; unsigned char failed, slow; } sim_event;
typedef struct { st_permit p; int64_t end; unsigned gen; unsigned char lost; } sim_call;

static void simulate(st_breaker_mode mode, uint64_t seed)
{
    st_breaker_config c;
    st_breaker b;
    sim_event *log = malloc(sizeof *log * (SIM_STEPS * 2 + 16));
    sim_call fl[SIM_FLIGHT];
    size_t nlog = 0, first = 0;
    unsigned nfl = 0, gen = 0;
    int64_t t = 0, shut_since = -1, longest_shut = 0;
    int counts_ok = 1, trip_ok = 1, probes_ok = 1, mode_ok = 1;
    long transitions = 0, admitted = 0, refused = 0;
    int step;

    if (log == NULL) {
        CHECK(log != NULL);
        return;
    }
    st_rng_seed(&rng, seed);
    st_breaker_config_defaults(&c);
    c.window_ms = 10000;
    c.buckets = 10;
    c.min_calls = 10;
    c.slow_call_ms = 2000;
    c.slow_rate = 0.5;
    c.open_ms = 1000;
    c.max_open_ms = 8000;
    c.probe_timeout_ms = 5000;
    st_breaker_init(&b, &c, t);
    st_breaker_set_mode(&b, mode, t);

    for (step = 0; step < SIM_STEPS; step++) {
        int sick = (t / 60000) % 3 == 1;
        unsigned i;
        st_breaker_stats s;
        uint64_t calls = 0, failures = 0, slow = 0;
        size_t e;

        t += rnd_below(40);
        /* finish calls that are due */
        for (i = 0; i < nfl;) {
            if (fl[i].end <= t && !fl[i].lost) {
                st_breaker_state before = b.state;
                unsigned r = rnd_below(100);
                st_class cls = r < (sick ? 60u : 5u) ? (st_class)(ST_CLASS_OVERLOADED + rnd_below(3))
                             : r < 95 ? (st_class)(ST_CLASS_SUCCESS + rnd_below(2) * ST_CLASS_FATAL)
                             : ST_CLASS_CANCELED;
                int64_t lat = sick && rnd_below(2) ? 1500 + rnd_below(1000) : rnd_below(500);
                int counted = cls != ST_CLASS_CANCELED && fl[i].gen == gen;
                st_breaker_record(&b, t, &fl[i].p, cls, lat);
                if (counted) {
                    int failed = cls >= ST_CLASS_OVERLOADED && cls <= ST_CLASS_TIMEOUT;
                    log[nlog].t = t;
                    log[nlog].failed = (unsigned char)failed;
                    log[nlog].slow = lat >= c.slow_call_ms;
                    nlog++;
                }
                if (before != b.state)
                    transitions++;
                if (before == ST_BREAKER_HALF_OPEN && b.state == ST_BREAKER_CLOSED) {
                    gen++;                      /* the window was reset */
                    first = nlog;
                }
                /* a counted call in closed trips exactly when the recount says so */
                if (before == ST_BREAKER_CLOSED && counted) {
                    uint64_t n = 0, f = 0, sl = 0;
                    int64_t p_now = t / 1000;
                    for (e = first; e < nlog; e++) {
                        if (log[e].t / 1000 > p_now - 10) {
                            n++;
                            f += log[e].failed;
                            sl += log[e].slow;
                        }
                    }
                    trip_ok &= (b.state == ST_BREAKER_OPEN) ==
                               (n >= 10 && ((double)f >= 0.5 * (double)n || (double)sl >= 0.5 * (double)n));
                }
                fl[i] = fl[--nfl];
            } else {
                i++;
            }
        }
        /* maybe start a call */
        if (nfl < SIM_FLIGHT && rnd_below(2)) {
            st_permit p;
            if (st_breaker_acquire(&b, t, &p, NULL)) {
                fl[nfl].p = p;
                fl[nfl].end = t + (sick ? rnd_below(3000) : rnd_below(600));
                fl[nfl].gen = gen;
                fl[nfl].lost = rnd_below(200) == 0;
                nfl++;
                admitted++;
                if (shut_since >= 0 && t - shut_since > longest_shut)
                    longest_shut = t - shut_since;
                shut_since = -1;
            } else {
                refused++;
                if (shut_since < 0)
                    shut_since = t;
            }
        }
        /* lost permits are forgotten after a while (never released) */
        for (i = 0; i < nfl;) {
            if (fl[i].lost && t - fl[i].end > 20000)
                fl[i] = fl[--nfl];
            else
                i++;
        }

        while (first < nlog && log[first].t / 1000 <= t / 1000 - 10)
            first++;
        for (e = first; e < nlog; e++) {
            calls++;
            failures += log[e].failed;
            slow += log[e].slow;
        }
        st_breaker_stats_get(&b, t, &s);
        counts_ok &= s.calls == calls && s.failures == failures && s.slow == slow;
        probes_ok &= b.probes_out + b.probes_ok <= c.probes;
        mode_ok &= s.mode == mode;
    }
    CHECK(counts_ok);
    CHECK(trip_ok);
    CHECK(probes_ok);
    CHECK(mode_ok);
    /* refused at most while half-open waits on its probes (each may take up to
     * the probe timeout) and then the longest open */
    CHECK(longest_shut <= 3 * 5000 + 8000 + 80);
    CHECK(transitions > 100);
    CHECK(b.opens > 100);
    if (mode == ST_BREAKER_METRICS_ONLY) {
        CHECK_EQ_INT(refused, 0);
    } else {
        CHECK(refused > 1000);
        CHECK(longest_shut >= 8000);           /* the open time grew to its cap */
    }
    CHECK(admitted > 10000);
    free(log);
}

static void test_simulation(void)
{
    simulate(ST_BREAKER_NORMAL, 1);
    simulate(ST_BREAKER_NORMAL, 2);
    simulate(ST_BREAKER_METRICS_ONLY, 3);
}

int main(void)
{
    test_defaults();
    test_min_calls();
    test_rate_boundary();
    test_classes();
    test_slow_calls();
    test_lazy_half_open();
    test_probes_close();
    test_failed_probe_backoff();
    test_canceled_probe();
    test_stale_probe();
    test_probe_timeout();
    test_window_eviction();
    test_late_records();
    test_open_until();
    test_modes();
    test_simulation();
    return TEST_REPORT();
}
