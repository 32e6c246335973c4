/*
 * micro: nanoseconds per operation of the pure policies on the hot path, with a
 * naive latency tracker beside them as the anchor.
 *
 *   breaker acquire+record   one admitted call, healthy traffic (1% failures)
 *   latency record           one sample into a 12 x 5 s window
 *   latency p50+p95+p99      one query of three percentiles, window of 100k samples
 *   naive record             store into a ring of the last 1000 samples
 *   naive p50+p95+p99        copy the ring, qsort it, pick three ranks
 *   adaptive start+done      one call ended and one started, 64 in flight, windows
 *                            rolling and judged as they fill
 *   spend reserve+settle     one call's worst case reserved and its actual settled,
 *                            every cap set, the windows sliding
 *   spend refusal            a reservation refused: walks the slots for retry_after
 *   hedge budget             one call deposited, and one in ten asking for a hedge
 *
 * The per-call costs of the new policies are also given as a ratio to the
 * breaker's acquire+record, measured in the same run.
 *
 * Each figure is the median of ROUNDS timed loops (CLOCK_MONOTONIC around millions
 * of operations); results feed a volatile sink so the work cannot be dropped.
 *
 * usage: micro [ROUNDS]       (default 7)
 */
#define _POSIX_C_SOURCE 200809L

#include "adaptive.h"
#include "breaker.h"
#include "budget.h"
#include "latency.h"
#include "ratelimit.h"
#include "spend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NVALUES 4096                          /* power of two: index with a mask */
#define NAIVE_N 1000
#define WINDOW_SAMPLES 100000

static volatile uint64_t sink;
static uint64_t values[NVALUES];

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static uint64_t rng = 42;

static uint64_t rnd(void)                     /* splitmix64 */
{
    uint64_t z = (rng += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* LLM-like latencies: mostly 0.3..3 s, a tail to a minute (log-uniform pieces). */
static void make_values(void)
{
    size_t i;
    for (i = 0; i < NVALUES; i++) {
        uint64_t base = rnd() % 10 ? 300000 : 3000000;
        values[i] = base + rnd() % (base * 9);
    }
}

/* ---------------------------------------------------------------- ops */

static double run_breaker(long n)
{
    st_breaker b;
    st_permit p;
    uint64_t acc = 0;
    double t0;
    long i;

    st_breaker_init(&b, NULL, 0);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        int64_t t = (int64_t)(i >> 10);       /* ~1000 calls per virtual ms */
        if (st_breaker_acquire(&b, t, &p, NULL)) {
            st_class cls = (i % 100) == 0 ? ST_CLASS_TRANSIENT : ST_CLASS_SUCCESS;
            st_breaker_record(&b, t, &p, cls, (int64_t)(values[i & (NVALUES - 1)] / 1000));
            acc += p.token;
        }
    }
    sink += acc;
    return (now_ns() - t0) / (double)n;
}

/* A limiter check as the engine makes it per attempt: every dimension paced
 * (requests and tokens), most checks admitted. */
static double run_limiter(long n)
{
    static const double per_min[ST_DIM_COUNT] = { 600000, 4e8, 8e7, 5e8 };
    static const double cost[ST_DIM_COUNT] = { 1, 500, 100, 600 };
    st_limiter l;
    uint64_t acc = 0;
    double t0;
    long i;

    st_limiter_init(&l, per_min, 1, 0);
    t0 = now_ns();
    for (i = 0; i < n; i++)
        acc += (uint64_t)st_limiter_acquire(&l, (int64_t)(i >> 7), cost);
    sink += acc;
    return (now_ns() - t0) / (double)n;
}

/* As the engine drives it: each operation ends the oldest of 64 calls in flight
 * (LLM-like latencies, one in a thousand overloaded) and starts the next. */
static double run_adaptive(long n)
{
    static st_adaptive_ticket ring[64];
    st_adaptive a;
    uint64_t acc = 0;
    double t0;
    long i;

    st_adaptive_init(&a, NULL, 0);
    for (i = 0; i < 64; i++)
        st_adaptive_start(&a, 0, &ring[i]);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        int64_t t = (int64_t)i * 1000 / 64;   /* 64 calls a virtual second */
        st_adaptive_ticket *k = &ring[i & 63];
        st_adaptive_done(&a, t, k, (int64_t)(values[i & (NVALUES - 1)] / 1000),
                         (i % 1000) == 0 ? ST_CLASS_OVERLOADED : ST_CLASS_SUCCESS);
        st_adaptive_start(&a, t, k);
        acc += st_adaptive_limit(&a);
    }
    sink += acc;
    return (now_ns() - t0) / (double)n;
}

static void spend_caps(st_spend_config *c, int64_t scale)
{
    st_spend_config_defaults(c);
    c->cap[ST_SPEND_HOUR][ST_SPEND_COST] = 1000 * scale;
    c->cap[ST_SPEND_DAY][ST_SPEND_COST] = 20000 * scale;
    c->cap[ST_SPEND_HOUR][ST_SPEND_TOKENS] = 100 * scale;
    c->cap[ST_SPEND_DAY][ST_SPEND_TOKENS] = 2000 * scale;
}

/* A call's reservation and settlement, every cap set and roomy: admitted. */
static double run_spend(long n)
{
    static const int64_t worst[ST_SPEND_DIMS] = { 18360, 2024 };
    static const int64_t actual[ST_SPEND_DIMS] = { 9000, 1200 };
    st_spend_config c;
    st_spend s;
    st_spend_hold h;
    uint64_t acc = 0;
    double t0;
    long i;

    spend_caps(&c, INT64_C(100000000000));
    st_spend_init(&s, &c, 0);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        int64_t t = (int64_t)(i >> 4);       /* 16 calls a virtual ms: slots keep sliding */
        if (st_spend_reserve(&s, t, worst, &h, NULL) == ST_SPEND_OK)
            acc += st_spend_settle(&s, t, &h, actual) + 1;
    }
    sink += acc;
    return (now_ns() - t0) / (double)n;
}

/* A refusal: spend spread over every slot of both windows, and a reservation
 * that only fits once most of it has gone. */
static double run_spend_refused(long n)
{
    static const int64_t one[ST_SPEND_DIMS] = { 10, 1 };
    static const int64_t big[ST_SPEND_DIMS] = { 900, 90 };
    st_spend_config c;
    st_spend s;
    st_spend_hold h;
    int64_t ra = 0, t;
    uint64_t acc = 0;
    double t0;
    long i;

    spend_caps(&c, 1);
    st_spend_init(&s, &c, 0);
    for (t = 0; t < 86400000; t += 37500)
        (void)st_spend_charge(&s, t, one);
    t = 86400000 - 1;
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        acc += (uint64_t)st_spend_reserve(&s, t, big, &h, &ra);
        acc += (uint64_t)ra;
    }
    sink += acc;
    return (now_ns() - t0) / (double)n;
}

/* The hedge budget per call: a deposit, and a withdrawal for one call in ten. */
static double run_hedge_budget(long n)
{
    st_budget b;
    uint64_t acc = 0;
    double t0;
    long i;

    st_budget_init(&b, 0.05, 0, 1000, 0);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        int64_t t = (int64_t)(i >> 10);
        st_budget_deposit(&b, t);
        if (i % 10 == 0)
            acc += (uint64_t)st_budget_try_withdraw(&b, t);
    }
    sink += acc;
    return (now_ns() - t0) / (double)n;
}

static double run_latency_record(long n)
{
    st_latency *l = st_latency_new(12, 5000, 0);
    double t0, ns;
    long i;

    if (l == NULL)
        return -1;
    t0 = now_ns();
    for (i = 0; i < n; i++)
        st_latency_record(l, (int64_t)(i >> 10), values[i & (NVALUES - 1)]);
    ns = (now_ns() - t0) / (double)n;
    sink += st_latency_query(l, (int64_t)(n >> 10), NULL, 0, NULL, NULL);
    st_latency_free(l);
    return ns;
}

static double run_latency_query(long n)
{
    static const double qs[3] = { 0.5, 0.95, 0.99 };
    st_latency *l = st_latency_new(12, 5000, 0);
    uint64_t out[3], acc = 0;
    double t0, ns;
    long i;

    if (l == NULL)
        return -1;
    for (i = 0; i < WINDOW_SAMPLES; i++)
        st_latency_record(l, (int64_t)(i * 60000 / WINDOW_SAMPLES), values[rnd() & (NVALUES - 1)]);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        acc += st_latency_query(l, 59999, qs, 3, out, NULL);
        acc += out[0] + out[1] + out[2];
    }
    ns = (now_ns() - t0) / (double)n;
    sink += acc;
    st_latency_free(l);
    return ns;
}

/* The anchor: what a tracker written in a hurry does. */
typedef struct naive { uint64_t ring[NAIVE_N]; size_t next, len; } naive;

static void naive_record(naive *t, uint64_t v)
{
    t->ring[t->next] = v;
    t->next = t->next + 1 == NAIVE_N ? 0 : t->next + 1;
    if (t->len < NAIVE_N)
        t->len++;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void naive_query(const naive *t, uint64_t out[3])
{
    uint64_t tmp[NAIVE_N];
    size_t n = t->len;
    memcpy(tmp, t->ring, n * sizeof tmp[0]);
    qsort(tmp, n, sizeof tmp[0], cmp_u64);
    out[0] = tmp[(n * 50 + 99) / 100 - 1];
    out[1] = tmp[(n * 95 + 99) / 100 - 1];
    out[2] = tmp[(n * 99 + 99) / 100 - 1];
}

static naive naive_tracker;

static double run_naive_record(long n)
{
    double t0, ns;
    long i;

    memset(&naive_tracker, 0, sizeof naive_tracker);
    t0 = now_ns();
    for (i = 0; i < n; i++)
        naive_record(&naive_tracker, values[i & (NVALUES - 1)]);
    ns = (now_ns() - t0) / (double)n;
    sink += naive_tracker.ring[(size_t)n % NAIVE_N];
    return ns;
}

static double run_naive_query(long n)
{
    uint64_t out[3], acc = 0;
    double t0, ns;
    long i;

    memset(&naive_tracker, 0, sizeof naive_tracker);
    for (i = 0; i < NAIVE_N; i++)
        naive_record(&naive_tracker, values[rnd() & (NVALUES - 1)]);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        naive_query(&naive_tracker, out);
        acc += out[0] + out[1] + out[2];
    }
    ns = (now_ns() - t0) / (double)n;
    sink += acc;
    return ns;
}

/* ---------------------------------------------------------------- driver */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_of(double (*fn)(long), long n, int rounds)
{
    double r[64];
    int k;
    (void)fn(n / 10 + 1);                     /* warm caches and page in */
    for (k = 0; k < rounds; k++)
        r[k] = fn(n);
    qsort(r, (size_t)rounds, sizeof r[0], cmp_double);
    return r[rounds / 2];
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 7;
    double br, lr, lq, nr, nq, lc, ad, sp, sr, hb;

    if (rounds < 1 || rounds > 64) {
        fprintf(stderr, "usage: micro [ROUNDS 1..64]\n");
        return 2;
    }
    make_values();
    br = median_of(run_breaker, 20000000, rounds);
    lr = median_of(run_latency_record, 50000000, rounds);
    lq = median_of(run_latency_query, 2000000, rounds);
    nr = median_of(run_naive_record, 50000000, rounds);
    nq = median_of(run_naive_query, 5000, rounds);
    lc = median_of(run_limiter, 20000000, rounds);
    ad = median_of(run_adaptive, 20000000, rounds);
    sp = median_of(run_spend, 20000000, rounds);
    sr = median_of(run_spend_refused, 2000000, rounds);
    hb = median_of(run_hedge_budget, 20000000, rounds);

    printf("micro-benchmark, median of %d rounds, ns per operation\n", rounds);
    printf("  %-30s %10.1f ns   target <= 50    %s\n", "breaker acquire+record", br, br <= 50 ? "ok" : "MISSED");
    printf("  %-30s %10.1f ns   target <= 10    %s\n", "latency record", lr, lr <= 10 ? "ok" : "MISSED");
    printf("  %-30s %10.1f ns   target <= 1000  %s\n", "latency p50+p95+p99 (100k)", lq, lq <= 1000 ? "ok" : "MISSED");
    printf("  %-30s %10.1f ns\n", "limiter check (4 dimensions)", lc);
    printf("  %-30s %10.1f ns   %5.2fx breaker\n", "adaptive start+done", ad, ad / br);
    printf("  %-30s %10.1f ns   %5.2fx breaker\n", "spend reserve+settle", sp, sp / br);
    printf("  %-30s %10.1f ns   %5.2fx breaker\n", "spend refusal (walks slots)", sr, sr / br);
    printf("  %-30s %10.1f ns   %5.2fx breaker\n", "hedge budget (budget.c)", hb, hb / br);
    printf("  %-30s %10.1f ns\n", "naive record (ring of 1000)", nr);
    printf("  %-30s %10.1f ns\n", "naive p50+p95+p99 (qsort 1000)", nq);
    printf("  latency window: %zu bytes (12 x 5 s); query %.0fx faster than naive over 100x the samples\n",
           st_latency_bytes(12), nq / lq);
    return 0;
}
