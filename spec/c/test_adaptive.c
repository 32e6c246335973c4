/* Specs for adaptive concurrency, driven by a virtual clock: config, windows and
 * tickets, each decision rule with exact numbers, and a simulated upstream whose
 * latency grows past a knee and which answers 529 past a cliff. The simulation
 * prints its figures (goodput against the best fixed limit, where the limit
 * settles, the capacity-change case). */
#include "test.h"

#include "adaptive.h"
#include "backoff.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- helpers */

#define MAXT 2048
static st_adaptive_ticket tickets[MAXT];

/* Starts n calls at t (tickets[first..first+n)). */
static void start_n(st_adaptive *a, int64_t t, int first, int n)
{
    int i;
    for (i = 0; i < n; i++)
        st_adaptive_start(a, t, &tickets[first + i]);
}

static void done_n(st_adaptive *a, int64_t t, int first, int n, int64_t latency, st_class cls)
{
    int i;
    for (i = 0; i < n; i++)
        st_adaptive_done(a, t, &tickets[first + i], latency, cls);
}

/* One window's worth: n calls started at t, all back at t + latency. */
static void batch(st_adaptive *a, int64_t t, int n, int64_t latency, st_class cls)
{
    start_n(a, t, 0, n);
    done_n(a, t + latency, 0, n, latency, cls);
}

/* A started call: what judges the window before it (when that one is complete). */
static void nudge(st_adaptive *a, int64_t t)
{
    st_adaptive_ticket k;
    st_adaptive_start(a, t, &k);
    st_adaptive_done(a, t, &k, 0, ST_CLASS_CANCELED);
}

static st_adaptive_stats stats(const st_adaptive *a)
{
    st_adaptive_stats s;
    st_adaptive_stats_get(a, &s);
    return s;
}

/* A limiter with a known baseline of 100 ms, out of slow start, at limit 42 (or
 * the config's initial limit + 5%). Returns the time of the next window: the
 * window the nudge opened, which the next batch joins. */
static int64_t steady(st_adaptive *a, const st_adaptive_config *c)
{
    st_adaptive_config d;
    if (c == NULL) {
        st_adaptive_config_defaults(&d);
        d.initial_limit = 40;
        c = &d;
    }
    st_adaptive_init(a, c, 0);
    a->slow_start = 0;          /* the grows below are the steady 5% */
    batch(a, 0, (int)c->initial_limit, 100, ST_CLASS_SUCCESS);
    nudge(a, 1000);             /* judges window 1: baseline 100, grows 40 -> 42 */
    return 1000;
}

/* ---------------------------------------------------------------- config */

static void test_config(void)
{
    st_adaptive_config c;
    st_adaptive a;

    st_adaptive_config_defaults(&c);
    CHECK(c.min_limit == 1 && c.max_limit == 1000 && c.initial_limit == 20);
    CHECK_EQ_INT(c.window_ms, 1000);
    CHECK_EQ_INT(c.min_samples, 20);
    CHECK(c.tolerance == 0.1 && c.growth == 0.05);

    st_adaptive_init(&a, NULL, 0);
    CHECK_EQ_INT(st_adaptive_limit(&a), 20);
    CHECK(stats(&a).baseline_ms == -1);

    c.min_limit = NAN; c.max_limit = NAN; c.initial_limit = NAN;
    c.window_ms = 0; c.min_samples = 0; c.tolerance = NAN; c.growth = NAN;
    st_adaptive_init(&a, &c, 0);
    CHECK(a.cfg.min_limit == 1 && a.cfg.max_limit == 1000 && a.cfg.initial_limit == 20);
    CHECK_EQ_INT(a.cfg.window_ms, 1000);
    CHECK_EQ_INT(a.cfg.min_samples, 20);
    CHECK(a.cfg.tolerance == 0.1 && a.cfg.growth == 0.05);

    c.min_limit = -5; c.max_limit = 1e300; c.initial_limit = 1e300;
    c.window_ms = -1; c.min_samples = 1; c.tolerance = -1; c.growth = 0;
    st_adaptive_init(&a, &c, 0);
    CHECK(a.cfg.min_limit == 1 && a.cfg.max_limit == ST_ADAPTIVE_MAX_LIMIT);
    CHECK(a.cfg.initial_limit == ST_ADAPTIVE_MAX_LIMIT);
    CHECK_EQ_INT(st_adaptive_limit(&a), 1000000);
    CHECK_EQ_INT(a.cfg.window_ms, 1000);
    CHECK_EQ_INT(a.cfg.min_samples, 2);
    CHECK(a.cfg.tolerance == 0.1 && a.cfg.growth == 0.05);

    c.min_limit = 7.9; c.max_limit = 3.2; c.initial_limit = -INFINITY;
    c.window_ms = INT64_MAX; c.min_samples = UINT32_MAX; c.tolerance = INFINITY; c.growth = INFINITY;
    st_adaptive_init(&a, &c, 0);
    CHECK(a.cfg.min_limit == 7 && a.cfg.max_limit == 7 && a.cfg.initial_limit == 7);
    CHECK_EQ_INT(a.cfg.window_ms, ST_ADAPTIVE_MAX_WINDOW_MS);
    CHECK_EQ_INT(a.cfg.min_samples, ST_ADAPTIVE_MAX_SAMPLES);
    CHECK(a.cfg.tolerance == 10 && a.cfg.growth == 1);

    c.min_limit = INFINITY; c.max_limit = -1; c.initial_limit = 5;
    st_adaptive_init(&a, &c, 0);
    CHECK(a.cfg.min_limit == ST_ADAPTIVE_MAX_LIMIT && a.cfg.max_limit == ST_ADAPTIVE_MAX_LIMIT);
    CHECK_EQ_INT(st_adaptive_limit(&a), 1000000);

    st_adaptive_config_defaults(&c);
    c.min_limit = 4; c.max_limit = 64.5; c.initial_limit = 100;
    st_adaptive_init(&a, &c, 0);
    CHECK(a.cfg.max_limit == 64 && a.cfg.initial_limit == 64);
    c.initial_limit = 2;
    st_adaptive_init(&a, &c, 0);
    CHECK_EQ_INT(st_adaptive_limit(&a), 4);
}

/* ---------------------------------------------------------------- decisions */

static void test_slow_start_then_growth(void)
{
    st_adaptive a;

    st_adaptive_init(&a, NULL, 0);
    batch(&a, 0, 20, 100, ST_CLASS_SUCCESS);       /* 20 in flight: the limit was in use */
    CHECK_EQ_INT(stats(&a).windows, 0);            /* still the window taking starts */
    nudge(&a, 999);                                /* not yet window_ms old */
    CHECK_EQ_INT(stats(&a).windows, 0);
    nudge(&a, 1000);
    CHECK_EQ_INT(stats(&a).windows, 1);
    CHECK(stats(&a).baseline_ms == 100);
    CHECK(a.limit == 25);                           /* slow start: +25% */
    batch(&a, 1000, 25, 100, ST_CLASS_SUCCESS);
    nudge(&a, 2000);
    CHECK(a.limit == 31.25);
    CHECK_EQ_INT(st_adaptive_limit(&a), 31);
    CHECK_EQ_INT(stats(&a).grows, 2);

    /* after a shrink, steady growth: max(1, 5%) */
    steady(&a, NULL);
    CHECK(a.limit == 42);
    batch(&a, 2000, 42, 100, ST_CLASS_SUCCESS);
    nudge(&a, 3000);
    CHECK(a.limit == 44.1);
    st_adaptive_init(&a, NULL, 0);
    a.slow_start = 0;
    a.limit = 10;
    batch(&a, 0, 20, 100, ST_CLASS_SUCCESS);
    nudge(&a, 1000);
    CHECK(a.limit == 11);                           /* 5% of 10 is below one call */
}

static void test_latency_shrink(void)
{
    st_adaptive a;
    int64_t t;

    /* twice the baseline: halved (the floor of the factor) */
    t = steady(&a, NULL);
    batch(&a, t, 42, 200, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK(a.limit == 21);
    CHECK_EQ_INT(stats(&a).shrinks_latency, 1);

    /* 125 ms against 100: limit * 100/125 */
    t = steady(&a, NULL);
    batch(&a, t, 42, 125, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK_NEAR(a.limit, 42 * 0.8, 1e-12);

    /* up to the tolerance (10%) and the samples' resolution (1 ms) it is no
     * queue yet: grows */
    t = steady(&a, NULL);
    batch(&a, t, 42, 111, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK(a.limit == 44.1);
    t = steady(&a, NULL);
    batch(&a, t, 42, 112, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK_NEAR(a.limit, 42 * 100.0 / 112, 1e-12);

    /* a sub-millisecond upstream (baseline 0) is not inflated by 1 ms samples */
    st_adaptive_init(&a, NULL, 0);
    a.slow_start = 0;
    a.limit = 40;
    batch(&a, 0, 40, 0, ST_CLASS_SUCCESS);
    nudge(&a, 1000);
    CHECK(stats(&a).baseline_ms == 0);
    batch(&a, 1000, 42, 1, ST_CLASS_SUCCESS);
    nudge(&a, 2000);
    CHECK(a.limit == 44.1);
    batch(&a, 2000, 45, 2, ST_CLASS_SUCCESS);
    nudge(&a, 3000);
    CHECK(a.limit == 22.05);

    /* a noisy window above the line by less than two standard errors does not
     * shrink: half the calls at 60, half at 200 -> mean 130, se ~10.9 */
    t = steady(&a, NULL);
    start_n(&a, t, 0, 42);
    done_n(&a, t + 60, 0, 21, 60, ST_CLASS_SUCCESS);
    done_n(&a, t + 200, 21, 21, 200, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK_EQ_INT(stats(&a).shrinks_latency, 0);
    /* the same spread over 2000 calls is clear enough */
    {
        st_adaptive_config c;
        st_adaptive_config_defaults(&c);
        c.initial_limit = 2000;
        c.max_limit = 10000;
        t = steady(&a, &c);
        start_n(&a, t, 0, 2000);
        done_n(&a, t + 60, 0, 1000, 60, ST_CLASS_SUCCESS);
        done_n(&a, t + 200, 1000, 1000, 200, ST_CLASS_SUCCESS);
        nudge(&a, t + 1000);
        CHECK_EQ_INT(stats(&a).shrinks_latency, 1);
        CHECK_NEAR(a.limit, 2100 * 100.0 / 130, 1e-9);
    }

    /* timeouts are latency samples */
    t = steady(&a, NULL);
    batch(&a, t, 42, 400, ST_CLASS_TIMEOUT);
    nudge(&a, t + 1000);
    CHECK(a.limit == 21);

    /* the floor: min_limit */
    {
        st_adaptive_config c;
        st_adaptive_config_defaults(&c);
        c.initial_limit = 40;
        c.min_limit = 30;
        t = steady(&a, &c);
        batch(&a, t, 42, 1000, ST_CLASS_SUCCESS);
        nudge(&a, t + 1000);
        CHECK_EQ_INT(st_adaptive_limit(&a), 30);
    }
}

static void test_overload_shrink(void)
{
    st_adaptive a;
    int64_t t;

    /* 5 overloaded of 20: share 0.25 */
    t = steady(&a, NULL);
    start_n(&a, t, 0, 42);
    done_n(&a, t + 100, 0, 15, 100, ST_CLASS_SUCCESS);
    done_n(&a, t + 100, 15, 5, 20, ST_CLASS_OVERLOADED);
    done_n(&a, t + 100, 20, 22, 100, ST_CLASS_CANCELED);
    nudge(&a, t + 1000);
    CHECK_NEAR(a.limit, 42 * 0.75, 1e-12);
    CHECK_EQ_INT(stats(&a).shrinks_overload, 1);

    /* a cliff: most calls overloaded -> at most halved */
    t = steady(&a, NULL);
    start_n(&a, t, 0, 42);
    done_n(&a, t + 20, 0, 40, 20, ST_CLASS_OVERLOADED);
    done_n(&a, t + 100, 40, 2, 100, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK(a.limit == 21);

    /* one 503 in 200 calls: 0.5% */
    {
        st_adaptive_config c;
        st_adaptive_config_defaults(&c);
        c.initial_limit = 200;
        t = steady(&a, &c);
        start_n(&a, t, 0, 200);
        done_n(&a, t + 100, 0, 199, 100, ST_CLASS_SUCCESS);
        done_n(&a, t + 100, 199, 1, 100, ST_CLASS_OVERLOADED);
        nudge(&a, t + 1000);
        CHECK_NEAR(a.limit, 210 * 0.995, 1e-9);
    }

    /* overloads count toward min_samples: 20 of them decide alone */
    t = steady(&a, NULL);
    batch(&a, t, 20, 30, ST_CLASS_OVERLOADED);
    nudge(&a, t + 1000);
    CHECK(a.limit == 21);
}

static void test_no_sample_classes(void)
{
    static const st_class quiet[] = {
        ST_CLASS_THROTTLED, ST_CLASS_TRANSIENT, ST_CLASS_FATAL, ST_CLASS_CANCELED, ST_CLASS_COUNT,
        (st_class)-1
    };
    st_adaptive a;
    int64_t t;
    size_t k;

    for (k = 0; k < sizeof quiet / sizeof quiet[0]; k++) {
        t = steady(&a, NULL);
        batch(&a, t, 42, 5000, quiet[k]);
        nudge(&a, t + 1000);
        CHECK(a.limit == 42);                 /* no samples: no decision */
        CHECK_EQ_INT(stats(&a).in_flight, 0);
        CHECK_EQ_INT(stats(&a).windows, 2);
    }
    /* 19 samples and a 429: below min_samples, nothing decided */
    t = steady(&a, NULL);
    start_n(&a, t, 0, 42);
    done_n(&a, t + 100, 0, 19, 500, ST_CLASS_SUCCESS);
    done_n(&a, t + 100, 19, 23, 500, ST_CLASS_THROTTLED);
    nudge(&a, t + 1000);
    CHECK(a.limit == 42);
}

/* Not using the limit is no reason to raise it. */
static void test_app_limited(void)
{
    st_adaptive a;
    int64_t t = steady(&a, NULL);
    int i;

    for (i = 0; i < 10; i++, t += 1000)
        batch(&a, t, 41, 100, ST_CLASS_SUCCESS);   /* one short of 42 */
    nudge(&a, t);
    CHECK(a.limit == 42);
    CHECK_EQ_INT(stats(&a).windows, 11);
    CHECK_EQ_INT(stats(&a).grows, 1);
    /* 42 at once: grows */
    batch(&a, t, 42, 100, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK(a.limit == 44.1);
}

/* A window that started before the limit changed does not decide. */
static void test_stale_windows(void)
{
    st_adaptive a;
    int64_t t = steady(&a, NULL);

    /* window A at t: 42 calls back after 1500 ms (inflated: halves at t+1500) */
    start_n(&a, t, 0, 42);
    /* window B opens at t+1000 while A is out, and is inflated too */
    start_n(&a, t + 1000, 100, 42);
    done_n(&a, t + 1500, 0, 42, 1500, ST_CLASS_SUCCESS);
    CHECK(a.limit == 21);
    done_n(&a, t + 1600, 100, 42, 600, ST_CLASS_SUCCESS);
    nudge(&a, t + 2000);
    CHECK_EQ_INT(stats(&a).windows, 3);
    CHECK(a.limit == 21);                          /* B predates the change */
    CHECK_EQ_INT(stats(&a).shrinks_latency, 1);
    /* C started after it, and decides */
    batch(&a, t + 2000, 21, 100, ST_CLASS_SUCCESS);
    nudge(&a, t + 3000);
    CHECK(a.limit == 22.05);
}

/* A window is judged only when all its calls are back, in the order they opened. */
static void test_window_order(void)
{
    st_adaptive a;
    int64_t t = steady(&a, NULL);

    start_n(&a, t, 0, 42);                          /* A */
    start_n(&a, t + 1000, 100, 42);                 /* B */
    done_n(&a, t + 1100, 100, 42, 100, ST_CLASS_SUCCESS);
    done_n(&a, t + 1100, 0, 41, 100, ST_CLASS_SUCCESS);
    nudge(&a, t + 2000);                            /* C opens; A still has one out */
    CHECK_EQ_INT(stats(&a).windows, 1);
    CHECK_EQ_INT(stats(&a).in_flight, 1);
    done_n(&a, t + 2100, 41, 1, 2100, ST_CLASS_SUCCESS);
    CHECK_EQ_INT(stats(&a).windows, 3);             /* A, then B */
    CHECK_EQ_INT(stats(&a).in_flight, 0);
}

/* The upstream got slower for everyone: shrinking does not help, so the
 * baseline moves instead of the limit sinking to min_limit. */
static void test_baseline_reset(void)
{
    st_adaptive a;
    int64_t t = steady(&a, NULL);

    batch(&a, t, 42, 300, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK(a.limit == 21);                          /* run: began at 42, 300 ms */
    batch(&a, t + 1000, 21, 290, ST_CLASS_SUCCESS);
    nudge(&a, t + 2000);
    CHECK(a.limit == 21);                          /* halved and still 290 >= 0.9 * 300 */
    CHECK_EQ_INT(stats(&a).baseline_resets, 1);
    CHECK(stats(&a).baseline_ms == 290);
    batch(&a, t + 2000, 21, 290, ST_CLASS_SUCCESS);
    nudge(&a, t + 3000);
    CHECK(a.limit == 22.05);                       /* and grows again */

    /* queueing: the shrink helps (300 -> 150), so it keeps shrinking */
    t = steady(&a, NULL);
    batch(&a, t, 42, 300, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    batch(&a, t + 1000, 21, 150, ST_CLASS_SUCCESS);
    nudge(&a, t + 2000);
    CHECK_NEAR(a.limit, 21 * 100.0 / 150, 1e-12);
    CHECK_EQ_INT(stats(&a).baseline_resets, 0);

    /* a run at min_limit */
    {
        st_adaptive_config c;
        st_adaptive_config_defaults(&c);
        c.initial_limit = 40;
        c.min_limit = 40;
        t = steady(&a, &c);
        batch(&a, t, 42, 200, ST_CLASS_SUCCESS);
        nudge(&a, t + 1000);
        CHECK_EQ_INT(st_adaptive_limit(&a), 40);
        batch(&a, t + 1000, 40, 200, ST_CLASS_SUCCESS);
        nudge(&a, t + 2000);
        CHECK_EQ_INT(stats(&a).baseline_resets, 1);
    }
}

/* ---------------------------------------------------------------- tickets and time */

static void test_tickets(void)
{
    st_adaptive a;
    st_adaptive_ticket k, never;
    int64_t t = steady(&a, NULL);
    int i;

    st_adaptive_start(&a, t, &k);
    CHECK_EQ_INT(stats(&a).in_flight, 1);
    st_adaptive_done(&a, t + 10, &k, 10, ST_CLASS_SUCCESS);
    st_adaptive_done(&a, t + 10, &k, 10, ST_CLASS_SUCCESS);   /* twice: ignored */
    CHECK_EQ_INT(stats(&a).in_flight, 0);
    memset(&never, 0, sizeof never);
    st_adaptive_done(&a, t + 10, &never, 10, ST_CLASS_SUCCESS);
    CHECK_EQ_INT(stats(&a).in_flight, 0);

    /* lost tickets: their window is forced out when the ring is full, the calls
     * counted at their age (a stuck upstream shrinks the limit) */
    t = steady(&a, NULL);
    start_n(&a, t, 0, 42);                             /* never returned */
    for (i = 1; i < ST_ADAPTIVE_WINDOWS; i++)
        batch(&a, t + 1000 * i, 20, 100, ST_CLASS_SUCCESS);
    CHECK_EQ_INT(stats(&a).forced, 0);
    CHECK_EQ_INT(stats(&a).windows, 1);                /* all wait behind the first */
    nudge(&a, t + 1000 * ST_ADAPTIVE_WINDOWS);         /* a ninth window: forces the first */
    CHECK_EQ_INT(stats(&a).forced, 1);
    CHECK_EQ_INT(stats(&a).in_flight, 0);
    CHECK(a.limit == 21);                              /* 42 calls 8000 ms old */
    CHECK_EQ_INT(stats(&a).windows, 1 + ST_ADAPTIVE_WINDOWS);
    /* their tickets are stale now */
    done_n(&a, t + 10000, 0, 42, 10000, ST_CLASS_SUCCESS);
    CHECK_EQ_INT(stats(&a).in_flight, 0);
    CHECK(a.limit == 21);
}

static void test_time_and_extremes(void)
{
    st_adaptive a;
    st_adaptive_ticket k;
    int64_t t = steady(&a, NULL);
    int i;

    /* time going backwards reads as the latest time seen */
    start_n(&a, t, 0, 42);
    done_n(&a, t - 5000, 0, 42, 100, ST_CLASS_SUCCESS);
    nudge(&a, t + 999);
    CHECK_EQ_INT(stats(&a).windows, 1);
    nudge(&a, -1000000);                               /* = t + 999 */
    CHECK_EQ_INT(stats(&a).windows, 1);
    nudge(&a, t + 1000);
    CHECK_EQ_INT(stats(&a).windows, 2);

    /* latencies below 0 are 0, huge ones are clamped (and shrink as far as allowed) */
    t = steady(&a, NULL);
    batch(&a, t, 42, -50, ST_CLASS_SUCCESS);
    nudge(&a, t + 1000);
    CHECK(a.limit == 44.1);
    start_n(&a, t + 1000, 0, 45);
    done_n(&a, t + 1500, 0, 45, INT64_MAX, ST_CLASS_SUCCESS);
    nudge(&a, t + 2000);
    CHECK_NEAR(a.limit, 22.05, 1e-12);

    /* the whole clock range: no overflow */
    st_adaptive_init(&a, NULL, INT64_MIN);
    for (i = 0; i < 20; i++)
        st_adaptive_start(&a, INT64_MIN, &tickets[i]);
    st_adaptive_start(&a, INT64_MAX, &k);
    done_n(&a, INT64_MAX, 0, 20, INT64_MAX, ST_CLASS_SUCCESS);
    st_adaptive_done(&a, INT64_MAX, &k, 0, ST_CLASS_SUCCESS);
    nudge(&a, INT64_MAX);
    CHECK_EQ_INT(stats(&a).in_flight, 0);
    CHECK(stats(&a).windows >= 1);
    CHECK(st_adaptive_limit(&a) >= 1 && st_adaptive_limit(&a) <= 1000);

    /* the limit never leaves [min, max] */
    {
        st_adaptive_config c;
        st_adaptive_config_defaults(&c);
        c.max_limit = 50;
        c.initial_limit = 48;
        st_adaptive_init(&a, &c, 0);
        for (i = 0, t = 0; i < 5; i++, t += 1000)
            batch(&a, t, 50, 100, ST_CLASS_SUCCESS);
        nudge(&a, t);
        CHECK_EQ_INT(st_adaptive_limit(&a), 50);
    }
}

/* ---------------------------------------------------------------- simulation */

/* The upstream serves its calls by processor sharing: up to `knee` in service
 * each runs at full speed; above it they share the capacity, each at
 * (knee / n)^power of full speed, so latency grows with in-flight calls past the
 * knee (power 1: queueing, throughput flat; power 2: thrashing, throughput falls).
 * A call that would make more than `cliff` in service gets a 529 after
 * base / 50 ms. Work per call: base * U[1 - noise, 1 + noise].
 * The client always has work waiting: it keeps `limit` calls in flight. */
typedef struct phase { double ms, knee, cliff; } phase;

typedef struct sim_result {
    double goodput;            /* successful calls per simulated second */
    unsigned long overloaded;  /* 529s received */
    double median[4], p10[4], p90[4];  /* the limit over the second half of each phase */
} sim_result;

#define SIM_MAX 1024

typedef struct sim_call { double fin; double start; st_adaptive_ticket t; } sim_call;

static sim_call ps_heap[SIM_MAX];                  /* in service, min-heap on virtual finish */
static int ps_n;
static sim_call rejects[SIM_MAX];                  /* 529s on their way back, in order */
static int rej_head, rej_n;
static double limit_samples[100000];

static void heap_push(sim_call c)
{
    int i = ps_n++;
    while (i > 0 && ps_heap[(i - 1) / 2].fin > c.fin) {
        ps_heap[i] = ps_heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    ps_heap[i] = c;
}

static sim_call heap_pop(void)
{
    sim_call top = ps_heap[0], last = ps_heap[--ps_n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= ps_n)
            break;
        if (c + 1 < ps_n && ps_heap[c + 1].fin < ps_heap[c].fin)
            c++;
        if (ps_heap[c].fin >= last.fin)
            break;
        ps_heap[i] = ps_heap[c];
        i = c;
    }
    ps_heap[i] = last;
    return top;
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static void summarise(sim_result *r, int ph, int n)
{
    if (n == 0)
        return;
    qsort(limit_samples, (size_t)n, sizeof limit_samples[0], cmp_double);
    r->median[ph] = limit_samples[n / 2];
    r->p10[ph] = limit_samples[n / 10];
    r->p90[ph] = limit_samples[n * 9 / 10];
}

/* fixed > 0: a fixed limit; 0: adaptive with the default config. */
static sim_result simulate(unsigned fixed, const phase *phases, int nphases, double power,
                           double base, double noise, uint64_t seed)
{
    st_adaptive a;
    st_rng rng;
    sim_result r;
    double t = 0, v = 0, end = 0, phase_end, next_sample;
    long ok = 0;
    int ph = 0, ns = 0, in_flight = 0;

    memset(&r, 0, sizeof r);
    st_rng_seed(&rng, seed);
    st_adaptive_init(&a, NULL, 0);
    ps_n = rej_head = rej_n = 0;
    for (ph = 0; ph < nphases; ph++)
        end += phases[ph].ms;
    ph = 0;
    phase_end = phases[0].ms;
    next_sample = phases[0].ms / 2;
    for (;;) {
        unsigned limit = fixed ? fixed : st_adaptive_limit(&a);
        double rate, t_ps, t_rej;
        st_class cls;
        sim_call c;

        while (t >= phase_end && ph + 1 < nphases) {
            summarise(&r, ph, ns);
            ns = 0;
            next_sample = phase_end + phases[ph + 1].ms / 2;
            phase_end += phases[++ph].ms;
        }
        while (t >= next_sample && ns < (int)(sizeof limit_samples / sizeof limit_samples[0])) {
            limit_samples[ns++] = limit;
            next_sample += 100;
        }
        if (t >= end)
            break;
        while ((unsigned)in_flight < limit && in_flight < SIM_MAX) {
            c.start = t;
            if (!fixed)
                st_adaptive_start(&a, (int64_t)t, &c.t);
            if (ps_n + 1 > phases[ph].cliff) {
                c.fin = t + base / 50;
                rejects[(rej_head + rej_n++) % SIM_MAX] = c;
            } else {
                c.fin = v + base * (1 - noise + 2 * noise * st_rng_unit(&rng));
                heap_push(c);
            }
            in_flight++;
        }
        rate = ps_n <= phases[ph].knee ? 1 : pow(phases[ph].knee / ps_n, power);
        t_ps = ps_n ? t + (ps_heap[0].fin - v) / rate : INFINITY;
        t_rej = rej_n ? rejects[rej_head].fin : INFINITY;
        if (t_ps > end && t_rej > end) {
            t = end;
            continue;
        }
        if (t_ps <= t_rej) {
            v = ps_heap[0].fin;
            t = t_ps;
            c = heap_pop();
            cls = ST_CLASS_SUCCESS;
            ok++;
        } else {
            v += (t_rej - t) * rate;
            t = t_rej;
            c = rejects[rej_head];
            rej_head = (rej_head + 1) % SIM_MAX;
            rej_n--;
            cls = ST_CLASS_OVERLOADED;
            r.overloaded++;
        }
        in_flight--;
        if (!fixed)
            st_adaptive_done(&a, (int64_t)t, &c.t, (int64_t)t - (int64_t)c.start, cls);
    }
    summarise(&r, ph, ns);
    r.goodput = (double)ok / (end / 1000);
    return r;
}

#define BASE 1000.0
#define NOISE 0.5
#define SEED 7

/* The best fixed limit in hindsight: every fifth from 5 to 120, then each one
 * around the best of those. */
static double best_fixed(const phase *phases, int nphases, double power, unsigned *best_limit)
{
    double best = 0;
    unsigned f, coarse;
    for (f = 5; f <= 120; f += 5) {
        sim_result r = simulate(f, phases, nphases, power, BASE, NOISE, SEED);
        if (r.goodput > best) {
            best = r.goodput;
            *best_limit = f;
        }
    }
    coarse = *best_limit;
    for (f = coarse - 4; f <= coarse + 4; f++) {
        sim_result r = simulate(f, phases, nphases, power, BASE, NOISE, SEED);
        if (r.goodput > best) {
            best = r.goodput;
            *best_limit = f;
        }
    }
    return best;
}

static void test_simulated_upstream(const char *name, double power)
{
    static const phase steady_knee[] = { { 600000, 40, 80 } };
    unsigned best_limit = 0;
    double best = best_fixed(steady_knee, 1, power, &best_limit);
    sim_result r = simulate(0, steady_knee, 1, power, BASE, NOISE, SEED);

    printf("adaptive, %s upstream (knee 40, cliff 80, 1 s +-50%%, 600 s): goodput %.2f/s vs best fixed "
           "limit %u %.2f/s = %.3f; limit median %.0f (p10 %.0f, p90 %.0f); 529s %lu\n",
           name, r.goodput, best_limit, best, r.goodput / best, r.median[0], r.p10[0], r.p90[0], r.overloaded);
    CHECK(r.goodput >= 0.9 * best);
    CHECK(r.median[0] >= 40 * 0.8 && r.median[0] <= 40 * 1.2);
    CHECK(r.overloaded == 0);
}

/* Capacity halves for five minutes, then comes back. */
static void test_knee_moves(double power)
{
    static const phase moves[] = { { 300000, 40, 80 }, { 300000, 20, 40 }, { 300000, 40, 80 } };
    unsigned best_limit = 0;
    double best = best_fixed(moves, 3, power, &best_limit);
    sim_result r = simulate(0, moves, 3, power, BASE, NOISE, SEED);
    sim_result f64 = simulate(64, moves, 3, power, BASE, NOISE, SEED);
    int ph;

    printf("adaptive, knee 40 -> 20 -> 40 (power %.0f): limit median %.0f (%.0f-%.0f), %.0f (%.0f-%.0f), "
           "%.0f (%.0f-%.0f); goodput %.3f of best fixed (%u); 529s %lu vs %lu at a fixed 64\n",
           power, r.median[0], r.p10[0], r.p90[0], r.median[1], r.p10[1], r.p90[1], r.median[2], r.p10[2],
           r.p90[2], r.goodput / best, best_limit, r.overloaded, f64.overloaded);
    for (ph = 0; ph < 3; ph++) {
        CHECK(r.median[ph] >= moves[ph].knee * 0.8);
        CHECK(r.median[ph] <= moves[ph].knee * 1.2);
    }
    CHECK(r.goodput >= 0.9 * best);
    CHECK(r.overloaded * 100 <= f64.overloaded);
}

int main(void)
{
    test_config();
    test_slow_start_then_growth();
    test_latency_shrink();
    test_overload_shrink();
    test_no_sample_classes();
    test_app_limited();
    test_stale_windows();
    test_window_order();
    test_baseline_reset();
    test_tickets();
    test_time_and_extremes();
    test_simulated_upstream("queueing", 1);
    test_simulated_upstream("thrashing", 2);
    test_knee_moves(1);
    test_knee_moves(2);
    return TEST_REPORT();
}
