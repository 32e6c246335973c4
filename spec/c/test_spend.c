/* Specs for spend caps, driven by a virtual clock: reserve/settle/release under
 * concurrency, exact retry_after, window expiry, warnings, and a long random run
 * of overlapping calls checked against a brute-force recount. */
#include "test.h"

#include "backoff.h"
#include "spend.h"

#include <stdlib.h>
#include <string.h>

#define HOUR INT64_C(3600000)
#define DAY INT64_C(86400000)
#define SLOT_H (HOUR / ST_SPEND_SLOTS)          /* 37.5 s */
#define SLOT_D (DAY / ST_SPEND_SLOTS)           /* 15 min */

/* A worst case: 1000 input tokens at $3/M + 1024 max_tokens at $15/M, in µUSD. */
#define WORST (3000 + 15360)
#define WORST_TOKENS (1000 + 1024)

static void amounts(int64_t out[ST_SPEND_DIMS], int64_t cost, int64_t tokens)
{
    out[ST_SPEND_COST] = cost;
    out[ST_SPEND_TOKENS] = tokens;
}

static st_spend_config caps(int64_t usd_hour, int64_t usd_day, int64_t tok_hour, int64_t tok_day)
{
    st_spend_config c;
    st_spend_config_defaults(&c);
    c.cap[ST_SPEND_HOUR][ST_SPEND_COST] = usd_hour;
    c.cap[ST_SPEND_DAY][ST_SPEND_COST] = usd_day;
    c.cap[ST_SPEND_HOUR][ST_SPEND_TOKENS] = tok_hour;
    c.cap[ST_SPEND_DAY][ST_SPEND_TOKENS] = tok_day;
    return c;
}

static st_spend_result reserve(st_spend *s, int64_t t, int64_t cost, int64_t tokens, st_spend_hold *h,
                               int64_t *ra)
{
    int64_t a[ST_SPEND_DIMS];
    amounts(a, cost, tokens);
    return st_spend_reserve(s, t, a, h, ra);
}

static unsigned charge(st_spend *s, int64_t t, int64_t cost, int64_t tokens)
{
    int64_t a[ST_SPEND_DIMS];
    amounts(a, cost, tokens);
    return st_spend_charge(s, t, a);
}

static unsigned settle(st_spend *s, int64_t t, st_spend_hold *h, int64_t cost, int64_t tokens)
{
    int64_t a[ST_SPEND_DIMS];
    amounts(a, cost, tokens);
    return st_spend_settle(s, t, h, a);
}

/* ---------------------------------------------------------------- config */

static void test_config(void)
{
    st_spend_config c;
    st_spend s;
    st_spend_hold h;
    int64_t ra = 7;
    int i, ok = 0;

    st_spend_config_defaults(&c);
    CHECK(c.warn == 0.8);
    CHECK_EQ_INT(c.cap[ST_SPEND_HOUR][ST_SPEND_COST], 0);
    st_spend_init(&s, NULL, 0);
    for (i = 0; i < 1000; i++)
        ok += reserve(&s, 0, ST_SPEND_MAX, ST_SPEND_MAX, &h, &ra) == ST_SPEND_OK;
    CHECK_EQ_INT(ok, 1000);                             /* no caps: everything passes */
    CHECK_EQ_INT(ra, 0);
    CHECK_EQ_INT(st_spend_reserved(&s, ST_SPEND_COST), ST_SPEND_MAX);   /* saturated */

    c = caps(-5, INT64_MAX, 0, INT64_MIN);
    c.warn = NAN;
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(s.cap[ST_SPEND_HOUR][ST_SPEND_COST], 0);
    CHECK_EQ_INT(s.cap[ST_SPEND_DAY][ST_SPEND_COST], ST_SPEND_MAX);
    CHECK_EQ_INT(s.cap[ST_SPEND_DAY][ST_SPEND_TOKENS], 0);
    CHECK_EQ_INT(s.warn_at[ST_SPEND_DAY][ST_SPEND_COST], ST_SPEND_MAX / 10 * 8);

    c = caps(1000, 0, 0, 0);
    c.warn = 7;
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(s.warn_at[ST_SPEND_HOUR][ST_SPEND_COST], 1000);
    c.warn = -1;
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(s.warn_at[ST_SPEND_HOUR][ST_SPEND_COST], 800);
    c.warn = 0;
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(s.warn_at[ST_SPEND_HOUR][ST_SPEND_COST], 0);
    CHECK_EQ_INT(charge(&s, 0, 1000, 0), 0);
    c.warn = 0.333;
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(s.warn_at[ST_SPEND_HOUR][ST_SPEND_COST], 333);
    c.warn = 0.3335;
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(s.warn_at[ST_SPEND_HOUR][ST_SPEND_COST], 334);    /* rounded up */
}

/* ---------------------------------------------------------------- concurrency */

/* 200 calls reserve at once against a cap worth 50 worst cases. */
static void test_concurrent_reservations(void)
{
    static st_spend_hold holds[200];
    st_spend_config c = caps(50 * WORST, 0, 0, 0);
    st_spend s;
    st_rng rng;
    int64_t ra, spent = 0, used;
    int i, admitted = 0, held = 0, more = 0;

    st_rng_seed(&rng, 17);
    st_spend_init(&s, &c, 1000);
    for (i = 0; i < 200; i++) {
        st_spend_result r = reserve(&s, 1000, WORST, WORST_TOKENS, &holds[i], &ra);
        admitted += r == ST_SPEND_OK;
        held += r == ST_SPEND_HELD && ra == -1;
        if (r != ST_SPEND_OK)
            holds[i].valid = 0;
    }
    CHECK_EQ_INT(admitted, 50);
    CHECK_EQ_INT(held, 150);
    /* refusals took nothing */
    CHECK_EQ_INT(st_spend_reserved(&s, ST_SPEND_COST), 50 * WORST);
    CHECK_EQ_INT(s.refused, 150);

    /* the replies settle below the worst case: the actual spend is under the cap */
    for (i = 0; i < 200; i++) {
        int64_t actual;
        if (!holds[i].valid)
            continue;
        actual = WORST / 5 + (int64_t)(st_rng_unit(&rng) * (WORST - WORST / 5));
        spent += actual;
        (void)settle(&s, 2000 + i, &holds[i], actual, WORST_TOKENS / 2);
        CHECK(st_spend_used(&s, 2000 + i, ST_SPEND_HOUR, ST_SPEND_COST) +
              st_spend_reserved(&s, ST_SPEND_COST) <= 50 * WORST);
    }
    used = st_spend_used(&s, 3000, ST_SPEND_HOUR, ST_SPEND_COST);
    CHECK_EQ_INT(used, spent);
    CHECK(used <= 50 * WORST);
    CHECK_EQ_INT(st_spend_reserved(&s, ST_SPEND_COST), 0);

    /* what was not spent admits more: exactly the worst cases that fit */
    for (i = 0; i < 200; i++)
        more += reserve(&s, 3000, WORST, WORST_TOKENS, &holds[i], &ra) == ST_SPEND_OK;
    CHECK(more > 0);
    CHECK_EQ_INT(more, (50 * WORST - used) / WORST);
    CHECK_EQ_INT(st_spend_reserved(&s, ST_SPEND_COST), (int64_t)more * WORST);
    /* the next one waits for the window: exactly the hour after the first settle's slot */
    CHECK_EQ_INT(reserve(&s, 3000, WORST, WORST_TOKENS, &holds[199], &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, HOUR - 3000);
}

static void test_settle_release(void)
{
    st_spend_config c = caps(100, 0, 0, 0);
    st_spend s;
    st_spend_hold a, b;
    int64_t ra;

    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(reserve(&s, 0, 60, 0, &a, &ra), ST_SPEND_OK);
    CHECK_EQ_INT(reserve(&s, 0, 60, 0, &b, &ra), ST_SPEND_HELD);
    st_spend_release(&s, 10, &a);
    CHECK_EQ_INT(st_spend_reserved(&s, ST_SPEND_COST), 0);
    CHECK_EQ_INT(st_spend_used(&s, 10, ST_SPEND_HOUR, ST_SPEND_COST), 0);
    st_spend_release(&s, 10, &a);                       /* twice: ignored */
    CHECK_EQ_INT(settle(&s, 10, &a, 50, 0), 0);         /* after release: ignored */
    CHECK_EQ_INT(st_spend_used(&s, 10, ST_SPEND_HOUR, ST_SPEND_COST), 0);

    CHECK_EQ_INT(reserve(&s, 20, 60, 0, &a, &ra), ST_SPEND_OK);
    (void)settle(&s, 30, &a, 25, 0);
    (void)settle(&s, 30, &a, 25, 0);                    /* twice: ignored */
    CHECK_EQ_INT(st_spend_used(&s, 30, ST_SPEND_HOUR, ST_SPEND_COST), 25);
    CHECK_EQ_INT(st_spend_reserved(&s, ST_SPEND_COST), 0);
    CHECK_EQ_INT(reserve(&s, 30, 75, 0, &b, &ra), ST_SPEND_OK);
    CHECK_EQ_INT(reserve(&s, 30, 1, 0, &a, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, HOUR - 30);

    /* an actual above the reservation still counts: the cap is then overrun */
    (void)settle(&s, 40, &b, 90, 0);
    CHECK_EQ_INT(st_spend_used(&s, 40, ST_SPEND_HOUR, ST_SPEND_COST), 115);
    CHECK_EQ_INT(reserve(&s, 40, 1, 0, &a, &ra), ST_SPEND_WAIT);

    /* charges without a hold; a settle with no actual is a release */
    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 40, 0);
    CHECK_EQ_INT(reserve(&s, 0, 60, 0, &a, &ra), ST_SPEND_OK);
    CHECK_EQ_INT(reserve(&s, 0, 1, 0, &b, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(st_spend_settle(&s, 0, &a, NULL), 0);
    CHECK_EQ_INT(reserve(&s, 0, 60, 0, &b, &ra), ST_SPEND_OK);

    /* amounts below 0 are 0, above ST_SPEND_MAX are ST_SPEND_MAX */
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(reserve(&s, 0, -50, -1, &a, &ra), ST_SPEND_OK);
    CHECK_EQ_INT(a.amount[ST_SPEND_COST], 0);
    (void)settle(&s, 0, &a, -7, INT64_MAX);
    CHECK_EQ_INT(st_spend_used(&s, 0, ST_SPEND_HOUR, ST_SPEND_COST), 0);
    CHECK_EQ_INT(st_spend_used(&s, 0, ST_SPEND_HOUR, ST_SPEND_TOKENS), ST_SPEND_MAX);
    CHECK_EQ_INT(reserve(&s, 0, INT64_MAX, 0, &a, &ra), ST_SPEND_TOO_BIG);
    CHECK_EQ_INT(ra, INT64_MAX);
    CHECK_EQ_INT(reserve(&s, 0, 101, 0, &a, &ra), ST_SPEND_TOO_BIG);
    CHECK_EQ_INT(reserve(&s, 0, 100, 0, &a, &ra), ST_SPEND_OK);
    CHECK_EQ_INT(st_spend_used(&s, 0, (st_spend_span)7, ST_SPEND_COST), 0);
    CHECK_EQ_INT(st_spend_reserved(&s, (st_spend_dim)-1), 0);
}

/* ---------------------------------------------------------------- windows */

static void test_expiry(void)
{
    st_spend_config c = caps(100, 1000, 0, 0);
    st_spend s;

    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 60, 0);
    CHECK_EQ_INT(st_spend_used(&s, HOUR - 1, ST_SPEND_HOUR, ST_SPEND_COST), 60);
    CHECK_EQ_INT(st_spend_used(&s, HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 0);
    CHECK_EQ_INT(st_spend_used(&s, DAY - 1, ST_SPEND_DAY, ST_SPEND_COST), 60);
    CHECK_EQ_INT(st_spend_used(&s, DAY, ST_SPEND_DAY, ST_SPEND_COST), 0);

    /* slots are aligned on their width: 37499 is in the first, 37500 in the second */
    st_spend_init(&s, &c, 0);
    (void)charge(&s, SLOT_H - 1, 10, 0);
    (void)charge(&s, SLOT_H, 20, 0);
    CHECK_EQ_INT(st_spend_used(&s, HOUR - 1, ST_SPEND_HOUR, ST_SPEND_COST), 30);
    CHECK_EQ_INT(st_spend_used(&s, HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 20);
    CHECK_EQ_INT(st_spend_used(&s, HOUR + SLOT_H - 1, ST_SPEND_HOUR, ST_SPEND_COST), 20);
    CHECK_EQ_INT(st_spend_used(&s, HOUR + SLOT_H, ST_SPEND_HOUR, ST_SPEND_COST), 0);
    CHECK_EQ_INT(st_spend_used(&s, HOUR + SLOT_H, ST_SPEND_DAY, ST_SPEND_COST), 30);

    /* a long idle gap clears everything; time going back reads as the latest */
    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 60, 5);
    CHECK_EQ_INT(st_spend_used(&s, 10 * DAY, ST_SPEND_DAY, ST_SPEND_COST), 0);
    (void)charge(&s, 10 * DAY, 30, 0);
    CHECK_EQ_INT(st_spend_used(&s, 0, ST_SPEND_HOUR, ST_SPEND_COST), 30);
    (void)charge(&s, -HOUR, 30, 0);                     /* lands at 10 days */
    CHECK_EQ_INT(st_spend_used(&s, 10 * DAY + HOUR - 1, ST_SPEND_HOUR, ST_SPEND_COST), 60);
    CHECK_EQ_INT(st_spend_used(&s, 10 * DAY + HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 0);

    /* negative times and the ends of the clock */
    st_spend_init(&s, &c, -5 * HOUR);
    (void)charge(&s, -5 * HOUR, 60, 0);
    CHECK_EQ_INT(st_spend_used(&s, -4 * HOUR - 1, ST_SPEND_HOUR, ST_SPEND_COST), 60);
    CHECK_EQ_INT(st_spend_used(&s, -4 * HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 0);
    st_spend_init(&s, &c, INT64_MIN);
    (void)charge(&s, INT64_MIN, 60, 0);
    CHECK_EQ_INT(st_spend_used(&s, INT64_MIN, ST_SPEND_HOUR, ST_SPEND_COST), 60);
    (void)charge(&s, INT64_MAX, 70, 0);
    CHECK_EQ_INT(st_spend_used(&s, INT64_MAX, ST_SPEND_HOUR, ST_SPEND_COST), 70);
    {
        st_spend_hold h;
        int64_t ra;
        CHECK_EQ_INT(reserve(&s, INT64_MAX, 31, 0, &h, &ra), ST_SPEND_WAIT);
        CHECK(ra > 0 && ra <= HOUR);
    }
}

/* retry_after is the first time it passes: walked over the slots, the later of
 * every capped span and dimension. */
static void test_retry_after(void)
{
    st_spend_config c = caps(100, 0, 0, 0);
    st_spend s;
    st_spend_hold h;
    int64_t ra, t0 = 1000000;       /* slot 26 of the hour starts at 975000 */

    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 60, 0);
    (void)charge(&s, t0, 30, 0);
    /* needs 40 freed: slot 0 (60) leaves at 3600000 */
    CHECK_EQ_INT(reserve(&s, 2 * t0, 50, 0, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, HOUR - 2 * t0);
    CHECK_EQ_INT(reserve(&s, 2 * t0 + ra - 1, 50, 0, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, 1);
    CHECK_EQ_INT(reserve(&s, HOUR, 50, 0, &h, &ra), ST_SPEND_OK);
    st_spend_release(&s, HOUR, &h);
    /* needs 70 freed: slot 0 and slot 26, which leaves at 975000 + HOUR */
    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 60, 0);
    (void)charge(&s, t0, 30, 0);
    CHECK_EQ_INT(reserve(&s, 2 * t0, 80, 0, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, 975000 + HOUR - 2 * t0);
    CHECK_EQ_INT(reserve(&s, 975000 + HOUR - 1, 80, 0, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(reserve(&s, 975000 + HOUR, 80, 0, &h, &ra), ST_SPEND_OK);
    /* reservations in flight count as they are: with 20 held, 60 more needs 70 freed */
    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 60, 0);
    {
        st_spend_hold held;
        CHECK_EQ_INT(reserve(&s, 0, 20, 0, &held, &ra), ST_SPEND_OK);
        (void)charge(&s, t0, 30, 0);
        CHECK_EQ_INT(reserve(&s, 2 * t0, 60, 0, &h, &ra), ST_SPEND_WAIT);
        CHECK_EQ_INT(ra, 975000 + HOUR - 2 * t0);
        /* and past what the windows can free: held */
        CHECK_EQ_INT(reserve(&s, 2 * t0, 91, 0, &h, &ra), ST_SPEND_HELD);
        CHECK_EQ_INT(ra, -1);
        st_spend_release(&s, 2 * t0, &held);
        CHECK_EQ_INT(reserve(&s, 2 * t0, 91, 0, &h, &ra), ST_SPEND_WAIT);
    }

    /* the later of the hour and the day, and of cost and tokens */
    c = caps(100, 150, 1000, 0);
    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 90, 0);                         /* hour frees at 1 h, day at 24 h */
    CHECK_EQ_INT(reserve(&s, HOUR, 70, 0, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, DAY - HOUR);                       /* the hour is free, the day is not */
    CHECK_EQ_INT(reserve(&s, DAY - 1, 70, 0, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(reserve(&s, DAY, 70, 0, &h, &ra), ST_SPEND_OK);
    st_spend_init(&s, &c, 0);
    (void)charge(&s, 0, 50, 0);
    (void)charge(&s, 10 * SLOT_H, 0, 900);
    CHECK_EQ_INT(reserve(&s, 20 * SLOT_H, 60, 200, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, 10 * SLOT_H + HOUR - 20 * SLOT_H); /* tokens free later than cost */
    CHECK_EQ_INT(reserve(&s, 20 * SLOT_H, 60, 100, &h, &ra), ST_SPEND_WAIT);
    CHECK_EQ_INT(ra, HOUR - 20 * SLOT_H);
    /* too big wins over the rest */
    CHECK_EQ_INT(reserve(&s, 20 * SLOT_H, 60, 1001, &h, &ra), ST_SPEND_TOO_BIG);
    CHECK_EQ_INT(s.admitted, 0);
}

/* ---------------------------------------------------------------- warnings */

static void test_warnings(void)
{
    const unsigned hour_cost = ST_SPEND_WARN_BIT(ST_SPEND_HOUR, ST_SPEND_COST);
    const unsigned day_cost = ST_SPEND_WARN_BIT(ST_SPEND_DAY, ST_SPEND_COST);
    const unsigned hour_tok = ST_SPEND_WARN_BIT(ST_SPEND_HOUR, ST_SPEND_TOKENS);
    st_spend_config c = caps(1000, 0, 100, 0), day = caps(0, 10000, 0, 0);
    st_spend s;
    st_spend_hold h;
    int64_t ra;

    CHECK(hour_cost != day_cost && hour_cost != hour_tok && day_cost != hour_tok);
    st_spend_init(&s, &c, 0);                           /* lines: 800, 8000, 80; re-arm below 720 */
    CHECK_EQ_INT(charge(&s, 0, 700, 79), 0);
    /* a reservation over the line warns nothing */
    CHECK_EQ_INT(reserve(&s, 0, 250, 0, &h, &ra), ST_SPEND_OK);
    st_spend_release(&s, 0, &h);
    CHECK_EQ_INT(charge(&s, 0, 100, 1), hour_cost | hour_tok);
    CHECK_EQ_INT(charge(&s, 0, 100, 10), 0);            /* once */
    /* slides below 800 but not below 720: still quiet */
    CHECK_EQ_INT(charge(&s, SLOT_H, 100, 0), 0);        /* 1000 */
    CHECK_EQ_INT(st_spend_used(&s, HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 100);
    /* the slot at 0 left: 100 < 720, re-armed */
    CHECK_EQ_INT(charge(&s, HOUR, 700, 0), hour_cost);
    /* the day crosses 8000 on its own */
    st_spend_init(&s, &day, 0);
    CHECK_EQ_INT(charge(&s, 0, 7999, 0), 0);
    CHECK_EQ_INT(charge(&s, HOUR, 1, 0), day_cost);

    /* hysteresis: hovering over the line does not warn per slot */
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(charge(&s, 0, 750, 0), 0);
    CHECK_EQ_INT(charge(&s, SLOT_H, 50, 0), hour_cost);
    CHECK_EQ_INT(st_spend_used(&s, HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 50);
    CHECK_EQ_INT(charge(&s, HOUR, 740, 0), 0);          /* 790: the 750 left, but it was re-armed */
    st_spend_init(&s, &c, 0);
    CHECK_EQ_INT(charge(&s, 0, 30, 0), 0);
    CHECK_EQ_INT(charge(&s, SLOT_H, 800, 0), hour_cost);
    CHECK_EQ_INT(st_spend_used(&s, HOUR, ST_SPEND_HOUR, ST_SPEND_COST), 800);
    CHECK_EQ_INT(charge(&s, HOUR, 10, 0), 0);           /* 810, never below 720: quiet */
}

/* ---------------------------------------------------------------- random run */

/* Days of overlapping calls against caps on both spans and dimensions:
 * reservations, settles at or below the worst case, and releases. At every step: settled + reserved never exceeds a cap; every refusal
 * was needed (admitting it would have crossed a cap); each WAIT's retry_after is
 * the first time it would have passed. Recounted by brute force from a log. */
#define RUN_CALLS 20000
#define LOG_MAX (RUN_CALLS + 10)

typedef struct logged { int64_t t, cost, tokens; } logged;
static logged charges[LOG_MAX];
static int n_charges;

static int64_t brute_used(int64_t now, int span, int dim)
{
    int64_t slot = span == ST_SPEND_HOUR ? SLOT_H : SLOT_D, sum = 0;
    int i;
    for (i = 0; i < n_charges; i++)
        if (charges[i].t / slot > now / slot - ST_SPEND_SLOTS)
            sum += dim == ST_SPEND_COST ? charges[i].cost : charges[i].tokens;
    return sum;
}

/* Would a reservation pass at time `at`, with the reservations in flight held as now? */
static int brute_fits(const st_spend *s, int64_t at, const int64_t want[ST_SPEND_DIMS])
{
    int sp, d;
    for (sp = 0; sp < ST_SPEND_SPANS; sp++)
        for (d = 0; d < ST_SPEND_DIMS; d++)
            if (s->cap[sp][d] > 0 && brute_used(at, sp, d) + s->reserved[d] + want[d] > s->cap[sp][d])
                return 0;
    return 1;
}

typedef struct open_call { st_spend_hold h; int64_t done_at; int release; } open_call;
static open_call open_calls[256];

static void test_random_run(void)
{
    st_spend_config c = caps(10 * WORST, 100 * WORST, 15 * WORST_TOKENS, 0);
    st_spend s;
    st_rng rng;
    int64_t t = 0;
    int i, k, n_open = 0, over = 0, unneeded = 0, bad_retry = 0, admitted = 0, waits = 0, helds = 0;

    st_rng_seed(&rng, 99);
    st_spend_init(&s, &c, 0);
    n_charges = 0;
    for (i = 0; i < RUN_CALLS; i++) {
        int64_t want[ST_SPEND_DIMS], ra;
        st_spend_result r;

        /* bursts of calls at one instant, minutes apart, with quiet hours now and
         * then (the windows empty and a burst meets only reservations): ~4 days */
        {
            double u = st_rng_unit(&rng);
            if (u < 0.002)
                t += (int64_t)(st_rng_unit(&rng) * 4 * HOUR);
            else if (u < 0.05)
                t += (int64_t)(st_rng_unit(&rng) * 200000);
        }

        /* calls due by now come back */
        for (k = 0; k < n_open; k++) {
            if (open_calls[k].done_at > t)
                continue;
            if (open_calls[k].release) {
                st_spend_release(&s, t, &open_calls[k].h);
            } else {
                int64_t cost = (int64_t)(st_rng_unit(&rng) * (double)open_calls[k].h.amount[ST_SPEND_COST]);
                int64_t tok = (int64_t)(st_rng_unit(&rng) * (double)open_calls[k].h.amount[ST_SPEND_TOKENS]);
                charges[n_charges].t = t;
                charges[n_charges].cost = cost;
                charges[n_charges].tokens = tok;
                n_charges++;
                (void)settle(&s, t, &open_calls[k].h, cost, tok);
            }
            open_calls[k--] = open_calls[--n_open];
        }
        amounts(want, WORST / 2 + (int64_t)(st_rng_unit(&rng) * WORST),
                WORST_TOKENS / 2 + (int64_t)(st_rng_unit(&rng) * WORST_TOKENS));
        r = st_spend_reserve(&s, t, want, &open_calls[n_open].h, &ra);
        if (r == ST_SPEND_OK) {
            admitted++;
            open_calls[n_open].done_at = t + 1000 + (int64_t)(st_rng_unit(&rng) * 600000);
            open_calls[n_open].release = st_rng_unit(&rng) < 0.1;
            if (n_open < 255)
                n_open++;
            else
                st_spend_release(&s, t, &open_calls[n_open].h);
        } else {
            unneeded += brute_fits(&s, t, want);
            if (r == ST_SPEND_WAIT) {
                waits++;
                bad_retry += ra <= 0 || brute_fits(&s, t + ra - 1, want) || !brute_fits(&s, t + ra, want);
            } else {
                helds += r == ST_SPEND_HELD;
            }
        }
        {
            int sp, d;
            for (sp = 0; sp < ST_SPEND_SPANS; sp++)
                for (d = 0; d < ST_SPEND_DIMS; d++)
                    if (s.cap[sp][d] > 0)
                        over += brute_used(t, sp, d) + s.reserved[d] > s.cap[sp][d] ||
                                st_spend_used(&s, t, (st_spend_span)sp, (st_spend_dim)d) != brute_used(t, sp, d);
        }
    }
    CHECK_EQ_INT(over, 0);
    CHECK_EQ_INT(unneeded, 0);
    CHECK_EQ_INT(bad_retry, 0);
    /* the run did press on the caps, both ways */
    printf("spend, random run: %d calls, %d admitted, %d waited, %d held\n", RUN_CALLS, admitted, waits, helds);
    CHECK(waits > 100);
    CHECK(helds > 100);
    CHECK(admitted > 500);
}

/* Two processes' spends of one cap, passed through the blob as a shared dict
 * would: each sees the other's reservation and settlement; a blob of other caps,
 * of another size or out of range is refused and leaves the spend as it was. */
static void test_blob(void)
{
    st_spend_config c = caps(2 * WORST, 0, 0, 0), other = caps(3 * WORST, 0, 0, 0);
    st_spend a, b, o;
    st_spend_hold ha, hb, hc;
    char blob[sizeof(st_spend) + 64];
    int64_t actual[ST_SPEND_DIMS], ra;
    size_t n;

    st_spend_init(&a, &c, 0);
    st_spend_init(&b, &c, 0);
    st_spend_init(&o, &other, 0);
    CHECK(st_spend_fingerprint(&a) == st_spend_fingerprint(&b));
    CHECK(st_spend_fingerprint(&a) != st_spend_fingerprint(&o));
    CHECK(st_spend_save(&a, 1, blob, st_spend_blob_size() - 1) == 0);

    CHECK_EQ_INT(reserve(&a, 1000, WORST, 0, &ha, &ra), ST_SPEND_OK);
    n = st_spend_save(&a, 1, blob, sizeof blob);
    CHECK_EQ_INT(n, st_spend_blob_size());
    CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_OK);
    CHECK_EQ_INT(st_spend_reserved(&b, ST_SPEND_COST), WORST);
    CHECK_EQ_INT(reserve(&b, 2000, WORST, 0, &hb, &ra), ST_SPEND_OK);
    n = st_spend_save(&b, 2, blob, sizeof blob);
    CHECK_EQ_INT(st_spend_load(&a, blob, n), ST_BLOB_OK);
    /* the cap is full between them: a third call waits for one of them */
    CHECK_EQ_INT(reserve(&a, 3000, 1, 0, &hc, &ra), ST_SPEND_HELD);
    amounts(actual, WORST / 4, 0);
    (void)st_spend_settle(&a, 4000, &ha, actual);
    n = st_spend_save(&a, 3, blob, sizeof blob);
    CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_OK);
    CHECK_EQ_INT(st_spend_used(&b, 5000, ST_SPEND_HOUR, ST_SPEND_COST), WORST / 4);
    CHECK_EQ_INT(st_spend_reserved(&b, ST_SPEND_COST), WORST);

    CHECK_EQ_INT(st_spend_load(&o, blob, n), ST_BLOB_CONFIG);
    CHECK_EQ_INT(st_spend_load(&b, blob, n - 1), ST_BLOB_SIZE);
    CHECK_EQ_INT(st_spend_load(&b, NULL, n), ST_BLOB_SIZE);
    blob[5] ^= 1;
    CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_MAGIC);
    blob[5] ^= 1;
    {
        /* the frame of blob.h: the stamp at both ends, the version at 8, the
         * layout (the size of st_spend, then zeros) at 12 */
        uint32_t first, last, v;
        memcpy(&first, blob, sizeof first);
        memcpy(&last, blob + n - sizeof last, sizeof last);
        CHECK_EQ_INT(first, 3);
        CHECK_EQ_INT(last, 3);
        memcpy(&v, blob + 12, sizeof v);
        CHECK_EQ_INT(v, sizeof(st_spend));
        v = ST_SPEND_BLOB_VERSION + 1;
        memcpy(blob + 8, &v, sizeof v);
        CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_VERSION);
        v = ST_SPEND_BLOB_VERSION;
        memcpy(blob + 8, &v, sizeof v);
        v = 1;
        memcpy(blob + 16, &v, sizeof v);
        CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_LAYOUT);
        v = 0;
        memcpy(blob + 16, &v, sizeof v);
        CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_OK);
    }
    {
        st_spend bad = a;
        bad.reserved[ST_SPEND_COST] = -1;
        n = st_spend_save(&bad, 4, blob, sizeof blob);
        CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_INVALID);
        bad = a;
        bad.win[ST_SPEND_DAY].slot_ms = SLOT_H;
        n = st_spend_save(&bad, 5, blob, sizeof blob);
        CHECK_EQ_INT(st_spend_load(&b, blob, n), ST_BLOB_INVALID);
    }
    /* refused, all of them: b is as the last good blob left it */
    CHECK_EQ_INT(st_spend_used(&b, 5000, ST_SPEND_HOUR, ST_SPEND_COST), WORST / 4);
    CHECK_EQ_INT(st_spend_reserved(&b, ST_SPEND_COST), WORST);
}

int main(void)
{
    test_config();
    test_concurrent_reservations();
    test_settle_release();
    test_expiry();
    test_retry_after();
    test_warnings();
    test_random_run();
    test_blob();
    return TEST_REPORT();
}
