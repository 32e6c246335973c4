/* Specs for the latency window, driven by a virtual clock: percentiles against a
 * sorted reference for several distributions, slot expiry at the exact boundary,
 * exact count/min/max/mean, clamping, empty windows and clocks that go backwards. */
#include "test.h"

#include "backoff.h"
#include "latency.h"

#include <stdlib.h>
#include <string.h>

#define NSAMPLES 1000000
#define SLOTS 12
#define SLOT_MS 5000

/* ---------------------------------------------------------------- helpers */

static st_rng rng;              /* the project's seedable splitmix64 */

static uint64_t rnd(void)
{
    return st_rng_next(&rng);
}

static double unit(void)        /* (0, 1) */
{
    return ((double)(rnd() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double normal(void)      /* Box-Muller */
{
    return sqrt(-2.0 * log(unit())) * cos(6.283185307179586 * unit());
}

static uint64_t to_us(double x)
{
    if (x < 0)
        return 0;
    if (x > 1.8e19)
        return UINT64_MAX;
    return (uint64_t)(x + 0.5);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The documented rank: ceil(q * n), a product a hair above an integer taken as it. */
static uint64_t ref_rank(double q, uint64_t n)
{
    double x, f;
    uint64_t r;
    if (!(q > 0))
        return 1;
    if (q >= 1)
        return n;
    x = q * (double)n;
    f = floor(x);
    r = (uint64_t)f;
    if (x - f > x * 1e-12)
        r++;
    return r < 1 ? 1 : r > n ? n : r;
}

/* Checks every quantile of the window against sorted (n values, ascending), and
 * the summary exactly. Returns the worst relative error seen. */
static double check_against(st_latency *l, int64_t now, const uint64_t *sorted, size_t n,
                            const double *qs, size_t nq, int *ok)
{
    uint64_t *out = malloc(nq * sizeof *out);
    st_latency_summary s;
    uint64_t sum = 0;
    double worst = 0;
    size_t i;

    if (out == NULL) {
        *ok = 0;
        return 1;
    }
    for (i = 0; i < n; i++)
        sum += sorted[i];
    *ok &= st_latency_query(l, now, qs, nq, out, &s) == n;
    *ok &= s.count == n;
    if (n == 0) {
        free(out);
        return 0;
    }
    *ok &= s.min_us == sorted[0] && s.max_us == sorted[n - 1];
    *ok &= s.mean_us == (double)sum / (double)n;
    for (i = 0; i < nq; i++) {
        uint64_t want = sorted[ref_rank(qs[i], n) - 1];
        double err = want ? fabs((double)out[i] - (double)want) / (double)want
                          : (double)(out[i] != 0);
        if (err > worst)
            worst = err;
    }
    *ok &= worst <= 0.001;
    free(out);
    return worst;
}

/* ---------------------------------------------------------------- distributions */

enum { D_UNIFORM, D_LOGNORMAL, D_EXPONENTIAL, D_BIMODAL, D_CONSTANT, D_LOGUNIFORM, D_SMALL, ND };
static const char *const dist_names[ND] = {
    "uniform", "lognormal", "exponential", "bimodal", "constant", "log-uniform", "small"
};

static uint64_t draw(int d)
{
    switch (d) {
    case D_UNIFORM:     return 1 + rnd() % 1000000;
    case D_LOGNORMAL:   return to_us(exp(log(800000.0) + 1.0 * normal()));       /* median 0.8 s */
    case D_EXPONENTIAL: return to_us(-log(unit()) * 200000.0);                   /* mean 0.2 s */
    case D_BIMODAL:     return rnd() % 10 < 7 ? to_us(50000 + 5000 * normal())   /* 50 ms cache hits */
                                              : to_us(5e6 + 1e6 * normal());     /* 5 s generations */
    case D_CONSTANT:    return 123456;
    case D_LOGUNIFORM:  return to_us(exp(unit() * log(4294967295.0)));          /* 1 us .. 71 min */
    default:            return rnd() % 3000;                                     /* exact region and first buckets */
    }
}

static void test_distributions(void)
{
    static double qs[1001 + 5];
    static const double common[] = { 0.5, 0.9, 0.95, 0.99, 0.999 };
    uint64_t *v = malloc(NSAMPLES * sizeof *v);
    size_t i, nq = 0;
    int d;

    if (v == NULL) {
        CHECK(v != NULL);
        return;
    }
    for (i = 0; i <= 1000; i++)
        qs[nq++] = (double)i / 1000.0;
    for (d = 0; d < ND; d++) {
        st_latency *l = st_latency_new(SLOTS, SLOT_MS, 0);
        uint64_t out[5];
        st_latency_summary s;
        double worst;
        int ok = 1;

        st_rng_seed(&rng, 1000 + (uint64_t)d);
        for (i = 0; i < NSAMPLES; i++) {
            v[i] = draw(d);
            /* spread over the whole window: 0 .. 59999 ms */
            st_latency_record(l, (int64_t)(i * 60000 / NSAMPLES), v[i]);
        }
        qsort(v, NSAMPLES, sizeof *v, cmp_u64);
        worst = check_against(l, 59999, v, NSAMPLES, qs, nq, &ok);
        if (!ok)
            fprintf(stderr, "    %s: worst relative error %.6g\n", dist_names[d], worst);
        CHECK(ok);
        /* the usual five in one call agree with the reference too */
        ok = 1;
        (void)check_against(l, 59999, v, NSAMPLES, common, 5, &ok);
        CHECK(ok);
        CHECK(st_latency_query(l, 59999, common, 5, out, &s) == NSAMPLES);
        CHECK(out[0] <= out[1] && out[1] <= out[2] && out[2] <= out[3] && out[3] <= out[4]);
        CHECK(s.min_us <= out[0] && out[4] <= s.max_us);
        if (d == D_CONSTANT)
            CHECK(out[0] == 123456 && out[4] == 123456 && s.mean_us == 123456.0);
        st_latency_free(l);
    }
    free(v);
}

/* ---------------------------------------------------------------- expiry */

static void test_expiry_boundary(void)
{
    st_latency *l = st_latency_new(SLOTS, SLOT_MS, 0);
    st_latency_summary s;
    const double q = 0.5;
    uint64_t out = 7;
    int k;

    /* one at t=0 counts up to 59999 and is gone at 60000 */
    st_latency_record(l, 0, 1000);
    CHECK_EQ_INT(st_latency_query(l, 59999, &q, 1, &out, &s), 1);
    CHECK_EQ_INT(out, 1000);
    CHECK_EQ_INT(st_latency_query(l, 60000, &q, 1, &out, &s), 0);
    st_latency_free(l);

    /* slots are aligned: t=4999 leaves at 60000 too, t=5000 at 65000 */
    l = st_latency_new(SLOTS, SLOT_MS, 0);
    st_latency_record(l, 4999, 1);
    st_latency_record(l, 5000, 2);
    CHECK_EQ_INT(st_latency_query(l, 59999, NULL, 0, NULL, &s), 2);
    CHECK_EQ_INT(st_latency_query(l, 60000, NULL, 0, NULL, &s), 1);
    CHECK_EQ_INT(s.min_us, 2);
    CHECK_EQ_INT(st_latency_query(l, 64999, NULL, 0, NULL, &s), 1);
    CHECK_EQ_INT(st_latency_query(l, 65000, NULL, 0, NULL, &s), 0);
    st_latency_free(l);

    /* one slot leaves at a time; min, max, mean and count follow exactly */
    l = st_latency_new(SLOTS, SLOT_MS, 0);
    for (k = 0; k < SLOTS; k++) {
        st_latency_record(l, k * SLOT_MS, (uint64_t)(k + 1) * 1000);
        st_latency_record(l, k * SLOT_MS + 4999, (uint64_t)(k + 1) * 1000 + 500);
    }
    for (k = 0; k <= SLOTS; k++) {
        int64_t t = 60000 + (int64_t)k * SLOT_MS - 1;
        uint64_t n = st_latency_query(l, t, &q, 1, &out, &s);
        uint64_t live = (uint64_t)(SLOTS - k);
        CHECK_EQ_INT(n, 2 * live);
        if (live) {
            CHECK_EQ_INT(s.min_us, (uint64_t)(k + 1) * 1000);
            CHECK_EQ_INT(s.max_us, (uint64_t)SLOTS * 1000 + 500);
            /* mean of (j+1)*1000 + 250 over the live j */
            CHECK_NEAR(s.mean_us, ((double)(k + 1 + SLOTS) / 2.0) * 1000.0 + 250.0, 1e-9);
        }
    }
    st_latency_free(l);
}

/* A long run with idle gaps and small steps back, compared at checkpoints with a
 * brute-force recount of the live samples: shows expiry subtracts exactly what it added. */
static void test_sliding(void)
{
    enum { N = 300000 };
    uint64_t *val = malloc(N * sizeof *val), *live = malloc(N * sizeof *live);
    int64_t *when = malloc(N * sizeof *when);
    static double qs[101];
    int64_t t = 0, latest = 0;
    size_t i, j, first = 0;
    int ok = 1, checks = 0;
    st_latency *l = st_latency_new(SLOTS, SLOT_MS, 0);

    if (!val || !live || !when || !l) {
        CHECK(0);
        goto done;
    }
    for (i = 0; i <= 100; i++)
        qs[i] = (double)i / 100.0;
    st_rng_seed(&rng, 77);
    for (i = 0; i < N; i++) {
        uint64_t r = rnd() % 100000;
        if (r == 0)
            t += 70000 + (int64_t)(rnd() % 100000);   /* idle: everything expires */
        else if (r < 5)
            t -= (int64_t)(rnd() % 20000);            /* the clock steps back */
        else
            t += (int64_t)(rnd() % 7);
        if (t > latest)
            latest = t;
        /* a time from the past lands in the newest slot */
        when[i] = latest;
        val[i] = draw((int)(rnd() % ND));
        st_latency_record(l, t, val[i]);
        if (i % 1000 == 999) {
            int64_t p_now = latest / SLOT_MS;
            size_t n = 0;
            while (first <= i && when[first] / SLOT_MS <= p_now - SLOTS)
                first++;
            for (j = first; j <= i; j++)
                live[n++] = val[j];
            qsort(live, n, sizeof *live, cmp_u64);
            (void)check_against(l, t, live, n, qs, 101, &ok);
            checks++;
        }
    }
    CHECK(ok);
    CHECK_EQ_INT(checks, N / 1000);
done:
    st_latency_free(l);
    free(val);
    free(live);
    free(when);
}

/* ---------------------------------------------------------------- edges */

static void test_empty(void)
{
    st_latency *l = st_latency_new(SLOTS, SLOT_MS, 123);
    st_latency_summary s;
    static const double qs[] = { 0.5, 0.99 };
    uint64_t out[2] = { 42, 43 };

    memset(&s, 0xff, sizeof s);
    CHECK_EQ_INT(st_latency_query(l, 123, qs, 2, out, &s), 0);
    CHECK(out[0] == 42 && out[1] == 43);
    CHECK(s.count == 0 && s.min_us == 0 && s.max_us == 0 && s.mean_us == 0);
    CHECK_EQ_INT(st_latency_query(l, 123, qs, 2, out, NULL), 0);
    st_latency_record(l, 123, 5);
    CHECK_EQ_INT(st_latency_query(l, 123, qs, 2, out, NULL), 1);
    CHECK(out[0] == 5 && out[1] == 5);
    CHECK_EQ_INT(st_latency_query(l, 123 + 60000, qs, 2, out, &s), 0);
    CHECK(s.count == 0);
    st_latency_free(l);
}

static void test_exact_summary(void)
{
    st_latency *l = st_latency_new(SLOTS, SLOT_MS, 0);
    st_latency_summary s;
    static const double qs[] = { 0, 0.25, 0.5, 0.75, 1 };
    uint64_t out[5];
    uint64_t i;

    /* 1..1000 is the exact region: every percentile is the sample itself */
    for (i = 1000; i >= 1; i--)
        st_latency_record(l, (int64_t)i, i);
    CHECK_EQ_INT(st_latency_query(l, 1000, qs, 5, out, &s), 1000);
    CHECK_EQ_INT(s.min_us, 1);
    CHECK_EQ_INT(s.max_us, 1000);
    CHECK(s.mean_us == 500.5);
    CHECK(out[0] == 1 && out[1] == 250 && out[2] == 500 && out[3] == 750 && out[4] == 1000);

    /* min and max are exact wherever they fall in a sub-bucket */
    st_latency_record(l, 1000, 1234567891);
    st_latency_record(l, 1000, 0);
    CHECK_EQ_INT(st_latency_query(l, 1000, qs, 5, out, &s), 1002);
    CHECK_EQ_INT(s.min_us, 0);
    CHECK_EQ_INT(s.max_us, 1234567891);
    CHECK(out[0] == 0 && out[4] == 1234567891);
    CHECK(s.mean_us == (500500.0 + 1234567891.0) / 1002.0);
    st_latency_free(l);

    /* out-of-order and out-of-range q */
    l = st_latency_new(SLOTS, SLOT_MS, 0);
    for (i = 1; i <= 100; i++)
        st_latency_record(l, 0, i);
    {
        const double odd[] = { 0.9, 0.1, 0.5, -1, 2, 0.0 / 0.0, 0.05 };
        uint64_t o[7];
        CHECK_EQ_INT(st_latency_query(l, 0, odd, 7, o, NULL), 100);
        CHECK(o[0] == 90 && o[1] == 10 && o[2] == 50 && o[3] == 1 && o[4] == 100 && o[5] == 1 && o[6] == 5);
    }
    /* q * n rounding a hair above an integer: 0.7 * 100 is rank 70, not 71 */
    {
        const double q7[] = { 0.7, 0.1 * 3, 0.29 };
        uint64_t o[3];
        CHECK_EQ_INT(st_latency_query(l, 0, q7, 1, o, NULL), 100);
        CHECK_EQ_INT(o[0], 70);
        st_latency_query(l, 0, q7 + 1, 2, o, NULL);
        CHECK_EQ_INT(o[0], 30);
        CHECK_EQ_INT(o[1], 29);
    }
    st_latency_free(l);
}

static void test_clamp(void)
{
    st_latency *l = st_latency_new(SLOTS, SLOT_MS, 0);
    st_latency_summary s;
    static const double qs[] = { 0, 0.5, 1 };
    uint64_t out[3];

    st_latency_record(l, 0, UINT64_MAX);
    st_latency_record(l, 0, ST_LATENCY_MAX_US + 1);
    st_latency_record(l, 0, ST_LATENCY_MAX_US);
    CHECK_EQ_INT(st_latency_query(l, 0, qs, 3, out, &s), 3);
    CHECK(s.min_us == ST_LATENCY_MAX_US && s.max_us == ST_LATENCY_MAX_US);
    CHECK(s.mean_us == (double)ST_LATENCY_MAX_US);
    CHECK(out[0] == ST_LATENCY_MAX_US && out[1] == ST_LATENCY_MAX_US && out[2] == ST_LATENCY_MAX_US);
    st_latency_record(l, 0, 1);
    st_latency_record(l, 0, 1);
    st_latency_record(l, 0, UINT64_MAX);
    CHECK_EQ_INT(st_latency_query(l, 0, qs, 3, out, &s), 6);
    CHECK(out[0] == 1 && out[2] == ST_LATENCY_MAX_US);
    /* rank 3 of 6 is a clamped huge value, reported from its sub-bucket */
    CHECK(out[1] <= ST_LATENCY_MAX_US && (double)(ST_LATENCY_MAX_US - out[1]) <= 0.001 * (double)ST_LATENCY_MAX_US);
    st_latency_free(l);
}

static void test_backwards_and_extremes(void)
{
    st_latency *l = st_latency_new(SLOTS, SLOT_MS, 0);
    st_latency_summary s;

    /* a sample from the past lands in the newest slot (period 20: 100..105 s) */
    st_latency_record(l, 100000, 10);
    st_latency_record(l, 0, 20);
    CHECK_EQ_INT(st_latency_query(l, 0, NULL, 0, NULL, &s), 2);
    CHECK_EQ_INT(st_latency_query(l, 50000, NULL, 0, NULL, &s), 2);
    CHECK_EQ_INT(st_latency_query(l, 159999, NULL, 0, NULL, &s), 2);
    CHECK_EQ_INT(st_latency_query(l, 160000, NULL, 0, NULL, &s), 0);
    st_latency_record(l, -5000000, 30);
    CHECK_EQ_INT(st_latency_query(l, 160000, NULL, 0, NULL, &s), 1);
    st_latency_free(l);

    l = st_latency_new(SLOTS, SLOT_MS, INT64_MIN);
    st_latency_record(l, INT64_MIN, 1);
    CHECK_EQ_INT(st_latency_query(l, INT64_MIN + 1, NULL, 0, NULL, &s), 1);
    st_latency_record(l, INT64_MAX, 2);
    st_latency_record(l, INT64_MAX, 3);
    CHECK_EQ_INT(st_latency_query(l, INT64_MAX, NULL, 0, NULL, &s), 2);
    CHECK_EQ_INT(s.min_us, 2);
    CHECK_EQ_INT(st_latency_query(l, 0, NULL, 0, NULL, &s), 2);
    st_latency_free(l);

    l = st_latency_new(1, INT64_MAX, 0);
    st_latency_record(l, INT64_MAX, 4);
    st_latency_record(l, INT64_MIN, 5);
    CHECK_EQ_INT(st_latency_query(l, INT64_MAX, NULL, 0, NULL, &s), 2);
    st_latency_free(l);
}

static void test_args_and_size(void)
{
    st_latency *l;

    CHECK(st_latency_new(0, SLOT_MS, 0) == NULL);
    CHECK(st_latency_new(SLOTS, 0, 0) == NULL);
    CHECK(st_latency_new(SLOTS, -1, 0) == NULL);
    CHECK(st_latency_new(ST_LATENCY_MAX_SLOTS + 1, SLOT_MS, 0) == NULL);
    l = st_latency_new(ST_LATENCY_MAX_SLOTS, 1, 0);
    CHECK(l != NULL);
    st_latency_record(l, 0, 1);
    st_latency_record(l, 1000, 1);
    CHECK_EQ_INT(st_latency_query(l, 255, NULL, 0, NULL, NULL), 1);
    st_latency_free(l);
    st_latency_free(NULL);

    /* a single slot is a tumbling window */
    l = st_latency_new(1, 1000, 0);
    st_latency_record(l, 999, 1);
    CHECK_EQ_INT(st_latency_query(l, 999, NULL, 0, NULL, NULL), 1);
    CHECK_EQ_INT(st_latency_query(l, 1000, NULL, 0, NULL, NULL), 0);
    st_latency_free(l);

    printf("latency window: %zu bytes with %d slots\n", st_latency_bytes(SLOTS), SLOTS);
    CHECK(st_latency_bytes(SLOTS) < 700 * 1024);
}

int main(void)
{
    test_args_and_size();
    test_empty();
    test_exact_summary();
    test_clamp();
    test_expiry_boundary();
    test_backwards_and_extremes();
    test_sliding();
    test_distributions();
    return TEST_REPORT();
}
