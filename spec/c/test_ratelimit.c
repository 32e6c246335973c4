/* Specs for the rate limiter: GCRA pacing per dimension, learned limits and
 * holds, 429 pauses, and the header parsers. Time is a plain int64 passed in,
 * so an hour of traffic runs in milliseconds. */
#include "test.h"

#include "ratelimit.h"

#include <stdlib.h>
#include <string.h>

/* 2026-11-25T12:00:00Z */
#define EPOCH_MS INT64_C(1795608000000)

static const double one_request[ST_DIM_COUNT] = { 1, 0, 0, 0 };

static void limits(double out[ST_DIM_COUNT], double rpm, double itpm, double otpm, double tpm)
{
    out[ST_DIM_REQUESTS] = rpm;
    out[ST_DIM_INPUT_TOKENS] = itpm;
    out[ST_DIM_OUTPUT_TOKENS] = otpm;
    out[ST_DIM_TOKENS] = tpm;
}

static void costs(double out[ST_DIM_COUNT], double in, double outp)
{
    out[ST_DIM_REQUESTS] = 1;
    out[ST_DIM_INPUT_TOKENS] = in;
    out[ST_DIM_OUTPUT_TOKENS] = outp;
    out[ST_DIM_TOKENS] = in + outp;
}

/* Admits as many requests as pass at one instant. */
static int drain(st_limiter *l, int64_t now, const double *cost)
{
    int n = 0;
    while (n < 100000 && st_limiter_acquire(l, now, cost) == 0)
        n++;
    return n;
}

/* ---------------------------------------------------------------- basics */

static void test_names(void)
{
    CHECK(strcmp(st_dim_name(ST_DIM_REQUESTS), "requests") == 0);
    CHECK(strcmp(st_dim_name(ST_DIM_INPUT_TOKENS), "input_tokens") == 0);
    CHECK(strcmp(st_dim_name(ST_DIM_OUTPUT_TOKENS), "output_tokens") == 0);
    CHECK(strcmp(st_dim_name(ST_DIM_TOKENS), "tokens") == 0);
    CHECK(strcmp(st_dim_name(ST_DIM_COUNT), "unknown") == 0);
    CHECK(strcmp(st_dim_name((st_dim)-1), "unknown") == 0);
}

static void test_unknown_and_limits(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT];

    st_limiter_init(&l, NULL, 0, 0);
    CHECK_EQ_INT(st_limiter_known(&l), 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 0);
    CHECK_EQ_INT(drain(&l, 0, one_request), 100000);     /* nothing paces an unknown key */
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, NULL), 0);

    /* a token limit alone does not make the key known */
    limits(cfg, 0, 0, 0, 90000);
    st_limiter_init(&l, cfg, 0, 0);
    CHECK_EQ_INT(st_limiter_known(&l), 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_INPUT_TOKENS, 40000, -1, -1), 1);
    CHECK_EQ_INT(st_limiter_known(&l), 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 50, -1, -1), 1);
    CHECK_EQ_INT(st_limiter_known(&l), 1);

    limits(cfg, 100, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    CHECK_EQ_INT(st_limiter_known(&l), 1);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 100, 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_TOKENS), 0, 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_COUNT), 0, 0);
    /* configured and learned: the lower wins, either way round */
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 500, -1, -1), 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 100, 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 60, -1, -1), 1);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 60, 0);
    CHECK_NEAR(l.dims[ST_DIM_REQUESTS].per_min, 60, 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 60, -1, -1), 0);   /* same again */
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 80, -1, -1), 1);   /* tier went up */
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 80, 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 0, -1, -1), 0);    /* absent */
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_COUNT, 10, 0, 1000), 0);
    /* only learned */
    st_limiter_init(&l, NULL, 0, 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_OUTPUT_TOKENS, 8000, -1, -1), 1);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_OUTPUT_TOKENS), 8000, 0);

    /* garbage configuration is no limit */
    limits(cfg, -5, NAN, 0, 0);
    st_limiter_init(&l, cfg, -1, 0);
    CHECK_EQ_INT(st_limiter_known(&l), 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_INPUT_TOKENS), 0, 0);
}

/* ---------------------------------------------------------------- pacing */

static void test_burst(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT];

    /* default burst: one second's worth, 600/min -> 10 at once, then one per 100 ms */
    limits(cfg, 600, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 5000);
    CHECK_NEAR(l.dims[ST_DIM_REQUESTS].burst, 10, 1e-12);
    CHECK_EQ_INT(drain(&l, 5000, one_request), 10);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 5000, one_request), 100);
    CHECK_EQ_INT(drain(&l, 5099, one_request), 0);
    CHECK_EQ_INT(drain(&l, 5100, one_request), 1);
    CHECK_EQ_INT(drain(&l, 5350, one_request), 2);   /* 5200 and 5300 were due */
    /* after a second idle, the full burst is back, and no more */
    CHECK_EQ_INT(drain(&l, 7000, one_request), 10);

    /* below 60/min a second's worth is under one unit: the burst is 1 */
    limits(cfg, 30, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    CHECK_NEAR(l.dims[ST_DIM_REQUESTS].burst, 1, 0);
    CHECK_EQ_INT(drain(&l, 0, one_request), 1);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 2000);
    CHECK_EQ_INT(drain(&l, 2000, one_request), 1);

    /* burst_seconds given */
    limits(cfg, 600, 0, 0, 0);
    st_limiter_init(&l, cfg, 5, 0);
    CHECK_EQ_INT(drain(&l, 0, one_request), 50);
    st_limiter_init(&l, cfg, 0.01, 0);
    CHECK_EQ_INT(drain(&l, 0, one_request), 1);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 100);
    st_limiter_init(&l, cfg, 1e9, 0);                /* clamped to an hour */
    CHECK_EQ_INT(drain(&l, 0, one_request), 36000);
}

#define HOUR_MS 3600000
#define WINDOW_MS 60000

/* A client trying every ms for an hour: the limiter admits the rate and no more,
 * in total and in every trailing minute. */
static long long_run(double rpm, long want, long slack)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT];
    int64_t *at = malloc(sizeof *at * (size_t)(want + slack + 1000)), t;
    long n = 0, i, j = 0, worst = 0;
    double burst;

    limits(cfg, rpm, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    burst = l.dims[ST_DIM_REQUESTS].burst;
    for (t = 0; t < HOUR_MS; t++)
        while (st_limiter_acquire(&l, t, one_request) == 0 && n < want + slack + 1000)
            at[n++] = t;
    if (!CHECK(n >= want - slack && n <= want + slack))
        fprintf(stderr, "    rpm %g: admitted %ld, want %ld +/- %ld\n", rpm, n, want, slack);
    for (i = 0; i < n; i++) {
        while (at[j] <= at[i] - WINDOW_MS)
            j++;
        if (i - j + 1 > worst)
            worst = i - j + 1;
    }
    if (!CHECK(worst <= (long)(rpm + burst)))
        fprintf(stderr, "    rpm %g: %ld in one minute, limit %g + burst %g\n", rpm, worst, rpm, burst);
    free(at);
    return n;
}

static void test_long_run(void)
{
    /* the burst of 10 at t=0, then one every 100 ms up to 3599.9 s */
    CHECK_EQ_INT(long_run(600, 36000, 10), 36009);
    long_run(7, 420, 1);            /* an interval of 8571428.57 µs */
    long_run(45, 2700, 1);          /* with a burst of 1, sub-ms lateness is not banked */
    long_run(4000, 240000, 67);
    long_run(1, 60, 1);
}

/* The wait is exact: 1 ms before it the request is refused, at it admitted. */
static void test_wait_exact(void)
{
    static const double rates[] = { 600, 7, 1000, 45, 59, 61, 3000 };
    unsigned k;
    int bad_early = 0, bad_late = 0, waits = 0;
    uint64_t seed = 42;

    for (k = 0; k < sizeof rates / sizeof rates[0]; k++) {
        st_limiter l;
        double cfg[ST_DIM_COUNT], c[ST_DIM_COUNT];
        int64_t now = 1000 * (int64_t)k, w;
        int step;

        limits(cfg, rates[k], 60000, 0, 100000);
        st_limiter_init(&l, cfg, 0, now);
        for (step = 0; step < 3000; step++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            costs(c, (double)(seed >> 33) / 4294967296.0 * 1500, (double)(seed >> 40 & 255));
            w = st_limiter_wait_ms(&l, now, c);
            if (w > 0) {
                waits++;
                bad_early += st_limiter_acquire(&l, now + w - 1, c) == 0;
                now += w;
            }
            bad_late += st_limiter_acquire(&l, now, c) != 0;
            now += (int64_t)(seed >> 60);    /* sometimes a little idle time */
        }
    }
    CHECK(waits > 1000);
    CHECK_EQ_INT(bad_early, 0);
    CHECK_EQ_INT(bad_late, 0);
}

/* ---------------------------------------------------------------- tokens */

static void test_tokens(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT], c[ST_DIM_COUNT];

    /* 60000 input tokens/min: 1 token per ms, burst 1000 */
    limits(cfg, 0, 60000, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    costs(c, 800, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, 0, c), 0);
    /* debt 800 ms; 800 more needs it down to 200 */
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 600);
    /* the reply used 500: 300 come back */
    st_limiter_correct(&l, 10, ST_DIM_INPUT_TOKENS, 500 - 800);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 10, c), 290);
    /* it used more than estimated: +1500 makes it overdrawn, even a cost of 0 waits */
    st_limiter_correct(&l, 10, ST_DIM_INPUT_TOKENS, 1500);
    costs(c, 0, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 10, c), 990);    /* debt 1990 ms, burst 1000 */
    CHECK_EQ_INT(st_limiter_acquire(&l, 999, c), 1);
    CHECK_EQ_INT(st_limiter_acquire(&l, 1000, c), 0);

    /* negative corrections never make it better than empty */
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_correct(&l, 0, ST_DIM_INPUT_TOKENS, -50000);
    costs(c, 1000, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, 0, c), 0);
    costs(c, 1, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 1);
    st_limiter_correct(&l, 0, ST_DIM_INPUT_TOKENS, -50000);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 0);
    CHECK_EQ_INT(l.dims[ST_DIM_INPUT_TOKENS].tat_us, 0);
    st_limiter_correct(&l, 0, ST_DIM_INPUT_TOKENS, NAN);   /* ignored */
    st_limiter_correct(&l, 0, ST_DIM_COUNT, 100);                /* ignored */
    CHECK_EQ_INT(l.dims[ST_DIM_INPUT_TOKENS].tat_us, 0);

    /* an estimate bigger than the burst passes on an empty bucket and pays in full */
    costs(c, 5000, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, 0, c), 0);
    costs(c, 0, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 4000);
    costs(c, 1, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 4001);
    costs(c, 5000, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 5000);

    /* costs on a dimension without a limit are ignored */
    costs(c, 0, 1e9);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 6000, c), 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, 6000, c), 0);
    st_limiter_correct(&l, 6000, ST_DIM_OUTPUT_TOKENS, 1e9);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 6000, c), 0);

    /* every dimension must pass: the total-token dimension binds here */
    limits(cfg, 6000, 600000, 600000, 60000);
    st_limiter_init(&l, cfg, 0, 0);
    costs(c, 600, 400);
    CHECK_EQ_INT(st_limiter_acquire(&l, 0, c), 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 1000);

    /* a long run at a token rate, a client waiting as told with random sizes (some
     * beyond the burst of 1500): the tokens admitted track the limit */
    {
        long admitted = 0;
        int64_t t = 0, w;
        uint64_t seed = 1;
        int late = 0;
        limits(cfg, 0, 0, 0, 90000);
        st_limiter_init(&l, cfg, 0, 0);
        costs(c, 0, 0);
        for (;;) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            c[ST_DIM_TOKENS] = (double)(100 + (seed >> 33) % 2900);
            t += st_limiter_wait_ms(&l, t, c);
            if (t >= HOUR_MS)
                break;
            w = st_limiter_acquire(&l, t, c);
            late += w != 0;
            admitted += (long)c[ST_DIM_TOKENS];
        }
        CHECK_EQ_INT(late, 0);
        if (!CHECK(admitted <= 90000L * 60 + 1500 + 2999 && admitted >= 90000L * 60 - 2999))
            fprintf(stderr, "    admitted %ld tokens\n", admitted);
    }
}

/* ---------------------------------------------------------------- pause, holds */

static void test_pause(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT];

    st_limiter_init(&l, NULL, 0, 0);
    st_limiter_pause_until(&l, 5000);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 5000);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 4000, NULL), 1000);
    CHECK_EQ_INT(st_limiter_acquire(&l, 4999, one_request), 1);
    st_limiter_pause_until(&l, 3000);                /* an earlier end does not shorten it */
    CHECK_EQ_INT(l.paused_until_ms, 5000);
    CHECK_EQ_INT(st_limiter_acquire(&l, 5000, one_request), 0);
    st_limiter_pause_until(&l, 9000);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 5000, one_request), 4000);

    /* the pause and pacing: the larger wait wins */
    limits(cfg, 60, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, 0, one_request), 0);
    st_limiter_pause_until(&l, 300);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 1000);
    st_limiter_pause_until(&l, 2500);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 2500);
}

static void test_holds(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT], c[ST_DIM_COUNT];

    /* remaining 0, reset in 2 s: nothing passes for 2 s, with or without a limit */
    st_limiter_init(&l, NULL, 0, 0);
    CHECK_EQ_INT(st_limiter_learn(&l, 100, ST_DIM_REQUESTS, -1, 0, 2000), 0);
    CHECK_NEAR(l.remaining[ST_DIM_REQUESTS], 0, 0);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_REQUESTS], 2100);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 100, one_request), 2000);
    CHECK_EQ_INT(st_limiter_acquire(&l, 2099, one_request), 1);
    CHECK_EQ_INT(st_limiter_acquire(&l, 2100, one_request), 0);
    CHECK_EQ_INT(drain(&l, 2100, one_request), 100000);

    /* with a rate the provider refills continuously: the reset is when it is full
     * again, and remaining 0 means the next unit in one interval (10 ms at 6000/min) */
    limits(cfg, 6000, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, -1, 0, 2000);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_REQUESTS], 2000);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 10);
    CHECK_EQ_INT(drain(&l, 9, one_request), 0);
    CHECK_EQ_INT(drain(&l, 10, one_request), 1);
    CHECK_EQ_INT(drain(&l, 2000, one_request), 100);

    /* remaining 3 until the reset: 3 pass, then nothing until it */
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 50, 3, 10000);
    CHECK_EQ_INT(drain(&l, 0, one_request), 1);       /* learned 50/min: burst 1 */
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, -1, 3, 10000);
    CHECK_EQ_INT(drain(&l, 0, one_request), 3);      /* then the configured pace */
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 10);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 5000, one_request), 0);
    CHECK_EQ_INT(drain(&l, 10000, one_request), 100);

    /* a token hold: a cost must fit in what is left */
    st_limiter_init(&l, NULL, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_INPUT_TOKENS, -1, 1000, 5000);
    costs(c, 600, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, 0, c), 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 5000);
    costs(c, 400, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 0);
    costs(c, 0, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, c), 0);    /* something is left */
    /* the reply used 300 only: 300 come back, but never beyond the learned 1000 */
    st_limiter_correct(&l, 10, ST_DIM_INPUT_TOKENS, -300);
    costs(c, 700, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 10, c), 0);
    st_limiter_correct(&l, 10, ST_DIM_INPUT_TOKENS, -5000);
    CHECK_NEAR(l.hold_left[ST_DIM_INPUT_TOKENS], 1000, 0);
    st_limiter_correct(&l, 10, ST_DIM_INPUT_TOKENS, 1000);
    costs(c, 0, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 10, c), 4990); /* nothing left: even a 0 waits */

    /* remaining without a reset tightens the pacing: 2 pass now, then the refill */
    limits(cfg, 600, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, -1, 2, -1);
    CHECK_EQ_INT(drain(&l, 0, one_request), 2);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 100);
    /* ... and a remaining above what pacing allows changes nothing */
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, -1, 500, -1);
    CHECK_EQ_INT(drain(&l, 0, one_request), 10);
    st_limiter_init(&l, cfg, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, -1, 500, 60000);
    CHECK_EQ_INT(drain(&l, 0, one_request), 10);

    /* a newer response replaces the hold; a reset already passed ends it */
    st_limiter_init(&l, NULL, 0, 0);
    st_limiter_learn(&l, 0, ST_DIM_REQUESTS, -1, 0, 60000);
    st_limiter_learn(&l, 100, ST_DIM_REQUESTS, -1, 0, 500);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 100, one_request), 500);
    st_limiter_learn(&l, 200, ST_DIM_REQUESTS, -1, 0, 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 200, one_request), 0);
    /* a lone remaining refreshes an active hold's count */
    st_limiter_learn(&l, 200, ST_DIM_REQUESTS, -1, 5, 1000);
    st_limiter_learn(&l, 300, ST_DIM_REQUESTS, -1, 0, -1);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 300, one_request), 900);
}

static void test_rate_change_keeps_debt(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT];

    limits(cfg, 600, 0, 0, 0);
    st_limiter_init(&l, cfg, 0, 0);
    CHECK_EQ_INT(drain(&l, 0, one_request), 10);       /* a debt of 10 units */
    /* at 60/min those 10 units take 10 s; the burst is 1 unit */
    CHECK_EQ_INT(st_limiter_learn(&l, 0, ST_DIM_REQUESTS, 60, -1, -1), 1);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 0, one_request), 10000);
    /* back up to 600 at 5 s: the 5 units still owed cost 0.5 s, the burst is 10 */
    CHECK_EQ_INT(st_limiter_learn(&l, 5000, ST_DIM_REQUESTS, 600, -1, -1), 1);
    CHECK_EQ_INT(drain(&l, 5000, one_request), 5);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, 5000, one_request), 100);
}

static void test_extremes(void)
{
    st_limiter l;
    double cfg[ST_DIM_COUNT], c[ST_DIM_COUNT];

    limits(cfg, 1e30, 1e-9, 0, 0);
    st_limiter_init(&l, cfg, 0, INT64_MAX);
    costs(c, 1e300, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, INT64_MAX, c), 0);   /* oversize on an empty bucket */
    CHECK(st_limiter_wait_ms(&l, INT64_MAX, c) > 0);
    CHECK(st_limiter_wait_ms(&l, INT64_MIN, c) > 0);
    st_limiter_correct(&l, INT64_MIN, ST_DIM_INPUT_TOKENS, 1e300);
    st_limiter_correct(&l, INT64_MAX, ST_DIM_INPUT_TOKENS, -1e300);
    st_limiter_learn(&l, INT64_MAX, ST_DIM_REQUESTS, 1e300, 1e300, INT64_MAX);
    st_limiter_learn(&l, INT64_MIN, ST_DIM_TOKENS, 1, 0, INT64_MAX);
    st_limiter_pause_until(&l, INT64_MAX);
    CHECK(st_limiter_wait_ms(&l, INT64_MIN, c) > 0);
    CHECK(st_limiter_feed_header(&l, INT64_MAX, INT64_MIN, "x-ratelimit-reset-tokens",
                                 "99999999999999999999h") == 0);
    CHECK(st_limiter_feed_header(&l, INT64_MIN, INT64_MAX, "anthropic-ratelimit-requests-reset",
                                 "9999-12-31T23:59:60.999999Z") == 0);
    st_limiter_response_done(&l, INT64_MAX);
}

/* ---------------------------------------------------------------- header names */

static int hdr(const char *name, st_dim dim, int field, int format)
{
    st_dim d = ST_DIM_COUNT;
    int fi = -1, fo = -1;
    return st_ratelimit_header(name, &d, &fi, &fo) && d == dim && fi == field && fo == format;
}

static void test_header_names(void)
{
    CHECK(hdr("anthropic-ratelimit-requests-limit", ST_DIM_REQUESTS, 0, 0));
    CHECK(hdr("anthropic-ratelimit-requests-remaining", ST_DIM_REQUESTS, 1, 0));
    CHECK(hdr("anthropic-ratelimit-requests-reset", ST_DIM_REQUESTS, 2, 1));
    CHECK(hdr("anthropic-ratelimit-tokens-limit", ST_DIM_TOKENS, 0, 0));
    CHECK(hdr("anthropic-ratelimit-tokens-remaining", ST_DIM_TOKENS, 1, 0));
    CHECK(hdr("anthropic-ratelimit-tokens-reset", ST_DIM_TOKENS, 2, 1));
    CHECK(hdr("anthropic-ratelimit-input-tokens-limit", ST_DIM_INPUT_TOKENS, 0, 0));
    CHECK(hdr("anthropic-ratelimit-input-tokens-remaining", ST_DIM_INPUT_TOKENS, 1, 0));
    CHECK(hdr("anthropic-ratelimit-input-tokens-reset", ST_DIM_INPUT_TOKENS, 2, 1));
    CHECK(hdr("anthropic-ratelimit-output-tokens-limit", ST_DIM_OUTPUT_TOKENS, 0, 0));
    CHECK(hdr("anthropic-ratelimit-output-tokens-remaining", ST_DIM_OUTPUT_TOKENS, 1, 0));
    CHECK(hdr("anthropic-ratelimit-output-tokens-reset", ST_DIM_OUTPUT_TOKENS, 2, 1));
    CHECK(hdr("x-ratelimit-limit-requests", ST_DIM_REQUESTS, 0, 0));
    CHECK(hdr("x-ratelimit-remaining-requests", ST_DIM_REQUESTS, 1, 0));
    CHECK(hdr("x-ratelimit-reset-requests", ST_DIM_REQUESTS, 2, 2));
    CHECK(hdr("x-ratelimit-limit-tokens", ST_DIM_TOKENS, 0, 0));
    CHECK(hdr("x-ratelimit-remaining-tokens", ST_DIM_TOKENS, 1, 0));
    CHECK(hdr("x-ratelimit-reset-tokens", ST_DIM_TOKENS, 2, 2));
    /* any case */
    CHECK(hdr("Anthropic-RateLimit-Input-Tokens-Reset", ST_DIM_INPUT_TOKENS, 2, 1));
    CHECK(hdr("ANTHROPIC-RATELIMIT-REQUESTS-LIMIT", ST_DIM_REQUESTS, 0, 0));
    CHECK(hdr("X-RateLimit-Remaining-Tokens", ST_DIM_TOKENS, 1, 0));
    CHECK(hdr("X-RATELIMIT-RESET-REQUESTS", ST_DIM_REQUESTS, 2, 2));
    /* NULL outs are fine */
    CHECK(st_ratelimit_header("x-ratelimit-limit-tokens", NULL, NULL, NULL));

    CHECK(!st_ratelimit_header("", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header(NULL, NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("retry-after", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-limit", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-limit-", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-limit-requests-", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-limit-requestsx", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-limit-input-tokens", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-requests-limit", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-ratelimit-", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-ratelimit-requests", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-ratelimit-requests-", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-ratelimit-requests-limits", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-ratelimit-limit-requests", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-ratelimit-unified-5h-reset", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("anthropic-priority-input-tokens-limit", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header(" x-ratelimit-limit-tokens", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("x-ratelimit-limit-tokens ", NULL, NULL, NULL));
    CHECK(!st_ratelimit_header("ratelimit-limit", NULL, NULL, NULL));
}

/* ---------------------------------------------------------------- RFC 3339 */

static int rfc(const char *s, int64_t *ms)
{
    return st_rfc3339_parse(s, strlen(s), ms);
}

static void test_rfc3339(void)
{
    int64_t ms = -1;

    CHECK(rfc("2026-11-25T12:00:00Z", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-25t12:00:00z", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-25 12:00:00Z", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-25T13:00:00+01:00", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-25T06:30:00-05:30", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-25T12:00:00-00:00", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-26T00:00:00+12:00", &ms) && ms == EPOCH_MS);
    CHECK(rfc("2026-11-25T12:00:00.5Z", &ms) && ms == EPOCH_MS + 500);
    CHECK(rfc("2026-11-25T12:00:00.123Z", &ms) && ms == EPOCH_MS + 123);
    CHECK(rfc("2026-11-25T12:00:00.123000000Z", &ms) && ms == EPOCH_MS + 123);
    CHECK(rfc("2026-11-25T12:00:00.1231Z", &ms) && ms == EPOCH_MS + 124);   /* rounds up */
    CHECK(rfc("2026-11-25T12:00:00.000001Z", &ms) && ms == EPOCH_MS + 1);
    CHECK(rfc("2026-11-25T12:00:00.999999+00:00", &ms) && ms == EPOCH_MS + 1000);
    CHECK(rfc("1970-01-01T00:00:00Z", &ms) && ms == 0);
    CHECK(rfc("1969-12-31T23:59:59Z", &ms) && ms == -1000);
    CHECK(rfc("1970-01-01T00:00:00+01:00", &ms) && ms == -3600000);
    CHECK(rfc("2024-02-29T00:00:00Z", &ms) && ms == INT64_C(1709164800000));
    CHECK(rfc("2000-02-29T00:00:00Z", &ms) && ms == INT64_C(951782400000));
    CHECK(rfc("2016-12-31T23:59:60Z", &ms) && ms == INT64_C(1483228800000)); /* leap second */
    CHECK(rfc("0000-01-01T00:00:00Z", &ms) && ms == INT64_C(-62167219200000));
    CHECK(rfc("9999-12-31T23:59:59Z", &ms) && ms == INT64_C(253402300799000));

    ms = 7;
    CHECK(!rfc("2026-13-01T00:00:00Z", &ms));
    CHECK(!rfc("2026-00-01T00:00:00Z", &ms));
    CHECK(!rfc("2026-02-30T00:00:00Z", &ms));
    CHECK(!rfc("2026-02-29T00:00:00Z", &ms));
    CHECK(!rfc("1900-02-29T00:00:00Z", &ms));
    CHECK(!rfc("2026-04-31T00:00:00Z", &ms));
    CHECK(!rfc("2026-11-00T00:00:00Z", &ms));
    CHECK(!rfc("2026-11-25T24:00:00Z", &ms));
    CHECK(!rfc("2026-11-25T12:60:00Z", &ms));
    CHECK(!rfc("2026-11-25T12:00:61Z", &ms));
    CHECK(!rfc("2026-11-25T12:00:00+24:00", &ms));
    CHECK(!rfc("2026-11-25T12:00:00+01:60", &ms));
    CHECK(!rfc("2026-11-25T12:00:00", &ms));          /* no offset */
    CHECK(!rfc("2026-11-25T12:00:00+0100", &ms));
    CHECK(!rfc("2026-11-25T12:00:00+01", &ms));
    CHECK(!rfc("2026-11-25T12:00:00.Z", &ms));
    CHECK(!rfc("2026-11-25T12:00Z", &ms));
    CHECK(!rfc("2026-11-25X12:00:00Z", &ms));
    CHECK(!rfc("2026-11-25", &ms));
    CHECK(!rfc("26-11-25T12:00:00Z", &ms));
    CHECK(!rfc("2026-1-25T12:00:00Z", &ms));
    CHECK(!rfc("2026-11-25T12:00:00ZZ", &ms));
    CHECK(!rfc(" 2026-11-25T12:00:00Z", &ms));
    CHECK(!rfc("2026-11-25T12:00:00Z ", &ms));
    CHECK(!rfc("2026/11/25T12:00:00Z", &ms));
    CHECK(!rfc("", &ms));
    CHECK(!st_rfc3339_parse(NULL, 0, &ms));
    CHECK(!st_rfc3339_parse("2026-11-25T12:00:00Z", 19, &ms));   /* length is honoured */
    CHECK_EQ_INT(ms, 7);
}

/* ---------------------------------------------------------------- Go durations */

static int64_t dur(const char *s)
{
    int64_t ms = -12345;
    return st_go_duration_parse(s, strlen(s), &ms) ? ms : -1;
}

static void test_go_duration(void)
{
    int64_t ms = 7;

    CHECK_EQ_INT(dur("6m0s"), 360000);
    CHECK_EQ_INT(dur("1s"), 1000);
    CHECK_EQ_INT(dur("12ms"), 12);
    CHECK_EQ_INT(dur("1h2m3.5s"), 3723500);
    CHECK_EQ_INT(dur("0.4ms"), 1);
    CHECK_EQ_INT(dur("250us"), 1);
    CHECK_EQ_INT(dur("250\xC2\xB5s"), 1);        /* micro sign */
    CHECK_EQ_INT(dur("250\xCE\xBCs"), 1);        /* Greek mu */
    CHECK_EQ_INT(dur("20ns"), 1);
    CHECK_EQ_INT(dur("0s"), 0);
    CHECK_EQ_INT(dur("0"), 0);
    CHECK_EQ_INT(dur("+0"), 0);
    CHECK_EQ_INT(dur("+1s"), 1000);
    CHECK_EQ_INT(dur("1.5s"), 1500);
    CHECK_EQ_INT(dur(".5s"), 500);
    CHECK_EQ_INT(dur("1.s"), 1000);
    CHECK_EQ_INT(dur("17.862s"), 17862);
    CHECK_EQ_INT(dur("2m59.56s"), 179560);
    CHECK_EQ_INT(dur("1.0000001s"), 1001);
    CHECK_EQ_INT(dur("1.0000000000000001s"), 1001);  /* beyond ns, still rounds up */
    CHECK_EQ_INT(dur("1.000000000000000s"), 1000);
    CHECK_EQ_INT(dur("0.333333333333h"), 1200000);
    CHECK_EQ_INT(dur("1000000ns"), 1);
    CHECK_EQ_INT(dur("1000001ns"), 2);
    CHECK_EQ_INT(dur("1500us"), 2);
    CHECK_EQ_INT(dur("1h"), 3600000);
    CHECK_EQ_INT(dur("24h0m0s"), 86400000);
    CHECK_EQ_INT(dur("1s1s"), 2000);
    CHECK_EQ_INT(dur("99999999999999999999999h"), ST_RATELIMIT_MAX_MS);
    CHECK_EQ_INT(dur("87600h"), ST_RATELIMIT_MAX_MS);
    CHECK_EQ_INT(dur("87601h"), ST_RATELIMIT_MAX_MS);

    CHECK_EQ_INT(dur(""), -1);
    CHECK_EQ_INT(dur("-1s"), -1);
    CHECK_EQ_INT(dur("-0s"), -1);
    CHECK_EQ_INT(dur("+"), -1);
    CHECK_EQ_INT(dur("1"), -1);
    CHECK_EQ_INT(dur("10"), -1);
    CHECK_EQ_INT(dur("s"), -1);
    CHECK_EQ_INT(dur(".s"), -1);
    CHECK_EQ_INT(dur("1x"), -1);
    CHECK_EQ_INT(dur("1sec"), -1);
    CHECK_EQ_INT(dur("1m1"), -1);
    CHECK_EQ_INT(dur("1 s"), -1);
    CHECK_EQ_INT(dur(" 1s"), -1);
    CHECK_EQ_INT(dur("1s "), -1);
    CHECK_EQ_INT(dur("1e3s"), -1);
    CHECK_EQ_INT(dur("1.2.3s"), -1);
    CHECK_EQ_INT(dur("1\xC2s"), -1);
    CHECK_EQ_INT(dur("1\xCEs"), -1);
    CHECK_EQ_INT(dur("abc"), -1);
    CHECK(!st_go_duration_parse(NULL, 0, &ms));
    CHECK(!st_go_duration_parse("1s", 1, &ms));
    CHECK(st_go_duration_parse("1s", 2, &ms) && ms == 1000);
}

/* ---------------------------------------------------------------- feeding headers */

static int feed(st_limiter *l, int64_t now, const char *name, const char *value)
{
    return st_limiter_feed_header(l, now, EPOCH_MS + now, name, value);
}

static void test_feed_anthropic(void)
{
    st_limiter l;
    double c[ST_DIM_COUNT];
    int64_t t = 1000;

    st_limiter_init(&l, NULL, 0, 0);
    CHECK_EQ_INT(st_limiter_known(&l), 0);
    /* the clock of the epoch here: wall time at t=1000 is EPOCH_MS + 1000 */
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-limit", "50"), 1);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-remaining", "0"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-reset", "2026-11-25T12:00:03Z"), 0);
    CHECK_EQ_INT(feed(&l, t, "Anthropic-RateLimit-Input-Tokens-Limit", " 40000 "), 1);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-input-tokens-remaining", "39000"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-input-tokens-reset", "2026-11-25T12:00:02.5Z"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-output-tokens-limit", "8000"), 1);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-output-tokens-reset", "2026-11-25T13:00:02+01:00"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-output-tokens-remaining", "7000"), 0);
    /* the aggregate tokens-* family is recognised and not fed */
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-tokens-limit", "8000"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-tokens-remaining", "0"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-tokens-reset", "2026-11-25T12:01:00Z"), 0);
    CHECK_EQ_INT(feed(&l, t, "content-type", "application/json"), 0);
    st_limiter_response_done(&l, t);

    CHECK_EQ_INT(st_limiter_known(&l), 1);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 50, 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_INPUT_TOKENS), 40000, 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_OUTPUT_TOKENS), 8000, 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_TOKENS), 0, 0);
    CHECK_NEAR(l.remaining[ST_DIM_INPUT_TOKENS], 39000, 0);
    CHECK_NEAR(l.remaining[ST_DIM_OUTPUT_TOKENS], 7000, 0);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_REQUESTS], 3000);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_INPUT_TOKENS], 2500);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_OUTPUT_TOKENS], 2000);
    /* remaining 0 (full again at 12:00:03 = t 3000); learned 50/min refills
     * continuously: the next request in one interval, 1.2 s */
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, one_request), 1200);
    CHECK_EQ_INT(st_limiter_acquire(&l, t + 1199, one_request), 1);
    costs(c, 600, 0);
    CHECK_EQ_INT(st_limiter_acquire(&l, t + 1200, c), 0);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t + 1200, c), 1200);

    /* the same limits again report no change */
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-limit", "50"), 0);
    /* garbage values are ignored */
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-limit", "fifty"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-limit", "-5"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-limit", "0"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-limit", ""), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-remaining", "1e3"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-reset", "2026-02-30T00:00:00Z"), 0);
    CHECK_EQ_INT(feed(&l, t, "anthropic-ratelimit-requests-reset", "6m0s"), 0);
    CHECK_EQ_INT(st_limiter_feed_header(&l, t, 0, NULL, "1"), 0);
    CHECK_EQ_INT(st_limiter_feed_header(&l, t, 0, "anthropic-ratelimit-requests-limit", NULL), 0);
    st_limiter_response_done(&l, t);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 50, 0);
    CHECK_EQ_INT(l.pend_has_reset[ST_DIM_REQUESTS], 0);

    /* a reset in the past is a reset now: no hold */
    st_limiter_init(&l, NULL, 0, 0);
    feed(&l, t, "anthropic-ratelimit-requests-remaining", "0");
    feed(&l, t, "anthropic-ratelimit-requests-reset", "2026-11-25T11:00:00Z");
    st_limiter_response_done(&l, t);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, one_request), 0);
}

static void test_feed_openai(void)
{
    st_limiter l;
    double c[ST_DIM_COUNT];
    int64_t t = 500;

    st_limiter_init(&l, NULL, 0, 0);
    /* OpenAI's order: all limits, all remainings, all resets */
    CHECK_EQ_INT(feed(&l, t, "x-ratelimit-limit-requests", "5000"), 1);
    CHECK_EQ_INT(feed(&l, t, "x-ratelimit-limit-tokens", "160000"), 1);
    CHECK_EQ_INT(feed(&l, t, "x-ratelimit-remaining-requests", "4999"), 0);
    CHECK_EQ_INT(feed(&l, t, "x-ratelimit-remaining-tokens", "0"), 0);
    CHECK_EQ_INT(feed(&l, t, "X-RateLimit-Reset-Requests", "12ms"), 0);
    CHECK_EQ_INT(feed(&l, t, "x-ratelimit-reset-tokens", "\t6m0s "), 0);
    /* a pair is applied as soon as it is complete; with the rate known it
     * tightens the pace instead of holding until the reset */
    CHECK_EQ_INT(l.hold_until_ms[ST_DIM_TOKENS], 0);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_TOKENS], t + 360000);
    st_limiter_response_done(&l, t);

    CHECK_EQ_INT(st_limiter_known(&l), 1);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_REQUESTS), 5000, 0);
    CHECK_NEAR(st_limiter_limit(&l, ST_DIM_TOKENS), 160000, 0);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_REQUESTS], t + 12);
    CHECK_EQ_INT(l.reset_at_ms[ST_DIM_TOKENS], t + 360000);
    /* tokens: remaining 0 at 160000/min; 200 tokens refill in 75 ms */
    costs(c, 100, 100);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, c), 75);
    CHECK_EQ_INT(st_limiter_acquire(&l, t + 74, c), 1);
    CHECK_EQ_INT(st_limiter_acquire(&l, t + 75, c), 0);

    /* the other order: reset before remaining, and a lone remaining at the end */
    st_limiter_init(&l, NULL, 0, 0);
    feed(&l, t, "x-ratelimit-reset-requests", "1s");
    CHECK_EQ_INT(l.hold_left[ST_DIM_REQUESTS], -1);    /* waits for its remaining */
    feed(&l, t, "x-ratelimit-remaining-requests", "0");
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, one_request), 1000);

    st_limiter_init(&l, NULL, 0, 0);
    feed(&l, t, "x-ratelimit-limit-tokens", "60000");
    feed(&l, t, "x-ratelimit-remaining-tokens", "10");
    CHECK_NEAR(l.pend_remaining[ST_DIM_TOKENS], 10, 0);
    st_limiter_response_done(&l, t);
    CHECK_NEAR(l.pend_remaining[ST_DIM_TOKENS], -1, 0);
    CHECK_NEAR(l.remaining[ST_DIM_TOKENS], 10, 0);
    /* without a reset it tightens the pacing: 10 tokens now, then 1 per ms */
    c[ST_DIM_REQUESTS] = 0;
    c[ST_DIM_INPUT_TOKENS] = c[ST_DIM_OUTPUT_TOKENS] = 0;
    c[ST_DIM_TOKENS] = 10;
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, c), 0);
    c[ST_DIM_TOKENS] = 11;
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, c), 1);

    /* halves of different responses never pair */
    st_limiter_init(&l, NULL, 0, 0);
    feed(&l, t, "x-ratelimit-reset-requests", "30s");
    st_limiter_response_done(&l, t);
    feed(&l, t, "x-ratelimit-remaining-requests", "0");
    st_limiter_response_done(&l, t);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, one_request), 0);

    /* garbage durations are ignored */
    st_limiter_init(&l, NULL, 0, 0);
    feed(&l, t, "x-ratelimit-remaining-requests", "0");
    feed(&l, t, "x-ratelimit-reset-requests", "-1s");
    feed(&l, t, "x-ratelimit-reset-requests", "2026-11-25T12:00:03Z");
    CHECK_EQ_INT(l.pend_has_reset[ST_DIM_REQUESTS], 0);
    st_limiter_response_done(&l, t);
    CHECK_EQ_INT(st_limiter_wait_ms(&l, t, one_request), 0);   /* no limit to tighten */
}

/* Random bytes must not upset the parsers (run under the sanitizers). */
static void test_fuzz(void)
{
    static const char alphabet[] = "0123456789.:+-TtZzhmsun\xC2\xB5 \xCE\xBC x-ratelimitanthropic";
    char buf[48];
    uint64_t seed = 7;
    int i, k, ok = 1;
    st_limiter l;

    st_limiter_init(&l, NULL, 0, 0);
    for (i = 0; i < 200000; i++) {
        int64_t v = 0;
        size_t n;
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        n = (size_t)(seed >> 59);
        for (k = 0; k < (int)n; k++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            buf[k] = alphabet[(seed >> 33) % (sizeof alphabet - 1)];
        }
        buf[n] = '\0';
        if (st_go_duration_parse(buf, n, &v))
            ok &= v >= 0 && v <= ST_RATELIMIT_MAX_MS;
        if (st_rfc3339_parse(buf, n, &v))
            ok &= n >= 20;
        (void)st_ratelimit_header(buf, NULL, NULL, NULL);
        (void)feed(&l, i, "x-ratelimit-reset-tokens", buf);
        (void)feed(&l, i, "x-ratelimit-remaining-tokens", buf);
        (void)feed(&l, i, "anthropic-ratelimit-requests-reset", buf);
    }
    CHECK(ok);
}

int main(void)
{
    test_names();
    test_unknown_and_limits();
    test_burst();
    test_long_run();
    test_wait_exact();
    test_tokens();
    test_pause();
    test_holds();
    test_rate_change_keeps_debt();
    test_extremes();
    test_header_names();
    test_rfc3339();
    test_go_duration();
    test_feed_anthropic();
    test_feed_openai();
    test_fuzz();
    return TEST_REPORT();
}
