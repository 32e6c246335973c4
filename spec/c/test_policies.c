/* Specs for the pure C policies: backoff + RNG, HTTP-date and retry hints, retry
 * budget (also as the hedge budget). Time is a plain int64 passed in, so hours
 * of traffic run in milliseconds. */
#include "test.h"

#include "backoff.h"
#include "budget.h"
#include "httpdate.h"

#include <float.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- rng */

static void test_rng(void)
{
    st_rng a, b, c;
    int i, same = 1, differ = 0, in_range = 1;
    double lo = 1, hi = 0;

    /* splitmix64 reference vector for seed 0 */
    st_rng_seed(&a, 0);
    CHECK(st_rng_next(&a) == UINT64_C(0xE220A8397B1DCDAF));
    CHECK(st_rng_next(&a) == UINT64_C(0x6E789E6AA1B965F4));
    CHECK(st_rng_next(&a) == UINT64_C(0x06C45D188009454F));

    st_rng_seed(&a, 12345);
    st_rng_seed(&b, 12345);
    st_rng_seed(&c, 12346);
    for (i = 0; i < 1000; i++) {
        uint64_t x = st_rng_next(&a), y = st_rng_next(&b), z = st_rng_next(&c);
        same &= x == y;
        differ += x != z;
    }
    CHECK(same);
    CHECK_EQ_INT(differ, 1000);

    st_rng_seed(&a, 99);
    for (i = 0; i < 100000; i++) {
        double u = st_rng_unit(&a);
        in_range &= u >= 0 && u < 1;
        if (u < lo) lo = u;
        if (u > hi) hi = u;
    }
    CHECK(in_range);
    CHECK(lo < 0.001);
    CHECK(hi > 0.999);

    /* the largest draw must stay below 1 */
    a.s = UINT64_MAX - UINT64_C(0x9E3779B97F4A7C15) + 1;
    CHECK(st_rng_unit(&a) < 1);
}

/* ---------------------------------------------------------------- backoff */

static void test_jitter_names(void)
{
    st_jitter j = ST_JITTER_NONE;
    CHECK(st_jitter_parse("full", &j) && j == ST_JITTER_FULL);
    CHECK(st_jitter_parse("equal", &j) && j == ST_JITTER_EQUAL);
    CHECK(st_jitter_parse("decorrelated", &j) && j == ST_JITTER_DECORRELATED);
    CHECK(st_jitter_parse("none", &j) && j == ST_JITTER_NONE);
    j = ST_JITTER_EQUAL;
    CHECK(!st_jitter_parse("FULL", &j) && j == ST_JITTER_EQUAL);
    CHECK(!st_jitter_parse("", &j));
    CHECK(!st_jitter_parse("fullx", &j));
    CHECK(!st_jitter_parse(NULL, &j));
    CHECK(strcmp(st_jitter_name(ST_JITTER_FULL), "full") == 0);
    CHECK(strcmp(st_jitter_name(ST_JITTER_EQUAL), "equal") == 0);
    CHECK(strcmp(st_jitter_name(ST_JITTER_DECORRELATED), "decorrelated") == 0);
    CHECK(strcmp(st_jitter_name(ST_JITTER_NONE), "none") == 0);
    CHECK(strcmp(st_jitter_name((st_jitter)42), "unknown") == 0);
}

#define BASE 500.0
#define CAP 30000.0
#define DRAWS 10000

static double exp_ref(unsigned n)
{
    double e = n - 1 >= 20 ? CAP : BASE * (double)(1u << (n - 1));
    return e < CAP ? e : CAP;
}

static void test_backoff_bounds(void)
{
    st_rng rng;
    unsigned n;
    int i;

    st_rng_seed(&rng, 42);
    for (n = 1; n <= 40; n++) {
        double e = exp_ref(n), sum = 0, prev = 0;
        int bad_full = 0, bad_equal = 0, bad_none = 0, bad_dec = 0;
        double sum_equal = 0;

        for (i = 0; i < DRAWS; i++) {
            double d = st_backoff_delay(ST_JITTER_FULL, BASE, CAP, n, 0, &rng);
            bad_full += !(d >= 0 && d <= e);
            sum += d;
            d = st_backoff_delay(ST_JITTER_EQUAL, BASE, CAP, n, 0, &rng);
            bad_equal += !(d >= e / 2 && d <= e);
            sum_equal += d;
            d = st_backoff_delay(ST_JITTER_NONE, BASE, CAP, n, 0, &rng);
            bad_none += d != e;
            d = st_backoff_delay(ST_JITTER_DECORRELATED, BASE, CAP, n, prev, &rng);
            bad_dec += !(d >= BASE && d <= (prev > 0 ? prev * 3 : BASE * 3) && d <= CAP);
            prev = d;
        }
        CHECK_EQ_INT(bad_full, 0);
        CHECK_EQ_INT(bad_equal, 0);
        CHECK_EQ_INT(bad_none, 0);
        CHECK_EQ_INT(bad_dec, 0);
        CHECK_NEAR(sum / DRAWS, e / 2, 0.03 * e / 2);
        CHECK_NEAR(sum_equal / DRAWS, e * 0.75, 0.03 * e * 0.75);
    }
}

static void test_backoff_decorrelated(void)
{
    st_rng rng;
    int i, at_cap = 0, bad = 0;
    double d, mx = 0;

    st_rng_seed(&rng, 5);
    /* the first retry (prev 0) draws from [base, 3 * base] */
    for (i = 0; i < DRAWS; i++) {
        d = st_backoff_delay(ST_JITTER_DECORRELATED, BASE, CAP, 1, 0, &rng);
        bad += !(d >= BASE && d <= 3 * BASE);
        if (d > mx) mx = d;
    }
    CHECK_EQ_INT(bad, 0);
    CHECK(mx > 2.9 * BASE);
    /* a prev near the cap: min(cap, ...) puts mass exactly at cap */
    for (i = 0; i < DRAWS; i++) {
        d = st_backoff_delay(ST_JITTER_DECORRELATED, BASE, CAP, 7, CAP, &rng);
        at_cap += d == CAP;
        bad += !(d >= BASE && d <= CAP);
    }
    CHECK_EQ_INT(bad, 0);
    CHECK(at_cap > DRAWS / 2);
    /* a prev below base, or NaN, is taken as base */
    d = st_backoff_delay(ST_JITTER_DECORRELATED, BASE, CAP, 3, 1, &rng);
    CHECK(d >= BASE && d <= 3 * BASE);
    d = st_backoff_delay(ST_JITTER_DECORRELATED, BASE, CAP, 3, NAN, &rng);
    CHECK(d >= BASE && d <= 3 * BASE);
    d = st_backoff_delay(ST_JITTER_DECORRELATED, BASE, CAP, 3, INFINITY, &rng);
    CHECK(d >= BASE && d <= CAP);
}

static void test_backoff_fixed_seed(void)
{
    double run1[4][40], run2[4][40];
    st_rng rng;
    int m, k, same = 1, differ = 0;

    for (k = 0; k < 2; k++) {
        double (*run)[40] = k == 0 ? run1 : run2;
        st_rng_seed(&rng, 2024);
        for (m = 0; m < 4; m++) {
            unsigned n;
            double prev = 0;
            for (n = 1; n <= 40; n++)
                prev = run[m][n - 1] = st_backoff_delay((st_jitter)m, BASE, CAP, n, prev, &rng);
        }
    }
    for (m = 0; m < 4; m++)
        for (k = 0; k < 40; k++)
            same &= run1[m][k] == run2[m][k];
    CHECK(same);

    st_rng_seed(&rng, 2025);
    for (k = 0; k < 40; k++)
        differ += st_backoff_delay(ST_JITTER_FULL, BASE, CAP, (unsigned)k + 1, 0, &rng) != run1[0][k];
    CHECK(differ > 30);
}

static void test_backoff_extremes(void)
{
    static const unsigned retries[] = { 0, 1, 31, 32, 33, 64, 1024, 1075, 2000, 100000,
                                        UINT_MAX / 2, UINT_MAX - 1, UINT_MAX };
    st_rng rng;
    size_t i;
    int m, bad = 0;

    st_rng_seed(&rng, 1);
    for (i = 0; i < sizeof retries / sizeof retries[0]; i++) {
        for (m = 0; m < 4; m++) {
            double d = st_backoff_delay((st_jitter)m, BASE, CAP, retries[i], CAP, &rng);
            bad += !(d >= 0 && d <= CAP);   /* NaN fails both */
            d = st_backoff_delay((st_jitter)m, 1e-300, 1e300, retries[i], 0, &rng);
            bad += !(d >= 0 && d <= 1e300);
            d = st_backoff_delay((st_jitter)m, DBL_MIN / 4, DBL_MAX, retries[i], DBL_MAX, &rng);
            bad += !(d >= 0 && d <= DBL_MAX);
        }
    }
    CHECK_EQ_INT(bad, 0);
    CHECK(st_backoff_delay(ST_JITTER_NONE, BASE, CAP, UINT_MAX, 0, NULL) == CAP);
    CHECK(st_backoff_delay(ST_JITTER_NONE, 1e-300, 1e300, UINT_MAX, 0, NULL) == 1e300);
    CHECK(st_backoff_delay(ST_JITTER_NONE, BASE, CAP, 0, 0, NULL) == BASE);   /* 0 counts as 1 */
    CHECK(st_backoff_delay(ST_JITTER_NONE, BASE, CAP, 7, 0, NULL) == 30000);
    CHECK(st_backoff_delay(ST_JITTER_NONE, BASE, CAP, 6, 0, NULL) == 16000);
    CHECK(st_backoff_delay(ST_JITTER_NONE, BASE, INFINITY, 5000, 0, NULL) == DBL_MAX);
    /* broken inputs give 0 or stay within the cap, never NaN */
    CHECK(st_backoff_delay(ST_JITTER_FULL, NAN, CAP, 3, 0, &rng) == 0);
    CHECK(st_backoff_delay(ST_JITTER_FULL, BASE, NAN, 3, 0, &rng) == 0);
    CHECK(st_backoff_delay(ST_JITTER_FULL, 0, CAP, 3, 0, &rng) == 0);
    CHECK(st_backoff_delay(ST_JITTER_FULL, -1, CAP, 3, 0, &rng) == 0);
    CHECK(st_backoff_delay(ST_JITTER_NONE, 900, 100, 1, 0, NULL) == 100);
    {
        double d = st_backoff_delay((st_jitter)77, BASE, CAP, 2, 0, &rng);   /* treated as full */
        CHECK(d >= 0 && d <= 1000);
    }
}

/* ---------------------------------------------------------------- http-date */

/* Parsers get an exact-length heap copy with no terminator, so ASan sees any over-read. */
static char *dup_exact(const char *s, size_t *n)
{
    char *p;
    *n = strlen(s);
    p = malloc(*n ? *n : 1);
    if (p == NULL)
        abort();
    memcpy(p, s, *n);
    return p;
}

static int date(const char *s, int64_t now_s, int64_t *out)
{
    size_t n;
    char *p = dup_exact(s, &n);
    int r = st_http_date_parse(p, n, now_s, out);
    free(p);
    return r;
}

static int64_t date_or(const char *s, int64_t now_s, int64_t fail)
{
    int64_t t;
    return date(s, now_s, &t) ? t : fail;
}

#define NOW2019 INT64_C(1559347200)   /* 2019-06-01 00:00:00 */
#define NOW2026 INT64_C(1780272000)   /* 2026-06-01 00:00:00 */
#define NOW2090 INT64_C(3799958400)   /* 2090-06-01 00:00:00 */
#define FAIL INT64_C(-999999999999)

static const char *const good_dates[] = {
    "Sun, 06 Nov 1994 08:49:37 GMT",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
};

static void test_http_date_formats(void)
{
    size_t i, k;
    int bad_prefix = 0;

    for (i = 0; i < 3; i++)
        CHECK_EQ_INT(date_or(good_dates[i], NOW2026, FAIL), 784111777);
    CHECK_EQ_INT(date_or("Sun Nov 06 08:49:37 1994", NOW2026, FAIL), 784111777);
    CHECK_EQ_INT(date_or("Thu, 01 Jan 1970 00:00:00 GMT", NOW2026, FAIL), 0);
    CHECK_EQ_INT(date_or("Fri, 31 Dec 1999 23:59:59 GMT", NOW2026, FAIL), 946684799);
    CHECK_EQ_INT(date_or("Fri, 31 Dec 9999 23:59:59 GMT", NOW2026, FAIL), INT64_C(253402300799));
    CHECK_EQ_INT(date_or("Mon, 01 Jan 0001 00:00:00 GMT", NOW2026, FAIL), INT64_C(-62135596800));
    CHECK_EQ_INT(date_or("Wed, 28 Feb 1900 00:00:00 GMT", NOW2026, FAIL), INT64_C(-2203977600));
    /* leap second */
    CHECK_EQ_INT(date_or("Sun, 06 Nov 1994 08:49:60 GMT", NOW2026, FAIL), 784111800);
    /* trailing OWS */
    CHECK_EQ_INT(date_or("Sun, 06 Nov 1994 08:49:37 GMT  \t", NOW2026, FAIL), 784111777);
    CHECK_EQ_INT(date_or("Sunday, 06-Nov-94 08:49:37 GMT ", NOW2026, FAIL), 784111777);
    CHECK_EQ_INT(date_or("Sun Nov  6 08:49:37 1994\t", NOW2026, FAIL), 784111777);

    /* leap days */
    CHECK_EQ_INT(date_or("Thu, 29 Feb 2024 00:00:00 GMT", NOW2026, FAIL), 1709164800);
    CHECK_EQ_INT(date_or("Thu Feb 29 00:00:00 2024", NOW2026, FAIL), 1709164800);
    CHECK_EQ_INT(date_or("Tue, 29 Feb 2000 00:00:00 GMT", NOW2026, FAIL), 951782400);
    CHECK(!date("Wed, 29 Feb 2023 00:00:00 GMT", NOW2026, NULL));
    CHECK(!date("Thu, 29 Feb 1900 00:00:00 GMT", NOW2026, NULL));
    CHECK(!date("Wed Feb 29 00:00:00 2023", NOW2026, NULL));
    CHECK(!date("Thu, 30 Feb 2024 00:00:00 GMT", NOW2026, NULL));
    CHECK(!date("Mon, 31 Nov 1994 00:00:00 GMT", NOW2026, NULL));
    CHECK(!date("Mon, 00 Nov 1994 00:00:00 GMT", NOW2026, NULL));
    CHECK(!date("Mon, 32 Dec 1994 00:00:00 GMT", NOW2026, NULL));
    CHECK_EQ_INT(date_or("Sat, 31 Dec 1994 00:00:00 GMT", NOW2026, FAIL) != FAIL, 1);

    /* every proper prefix of a valid date is rejected (and never over-read) */
    for (i = 0; i < 3; i++) {
        size_t n = strlen(good_dates[i]);
        for (k = 0; k < n; k++) {
            char *p = malloc(k ? k : 1);
            int64_t t;
            if (p == NULL)
                abort();
            memcpy(p, good_dates[i], k);
            bad_prefix += st_http_date_parse(p, k, NOW2026, &t);
            free(p);
        }
    }
    CHECK_EQ_INT(bad_prefix, 0);
    CHECK(!st_http_date_parse(NULL, 0, NOW2026, NULL));
    /* len is honoured: a valid date followed by junk outside len */
    {
        int64_t t = 0;
        const char *s = "Sun, 06 Nov 1994 08:49:37 GMTjunk";
        CHECK(st_http_date_parse(s, 29, NOW2026, &t) && t == 784111777);
        CHECK(!st_http_date_parse(s, 30, NOW2026, &t));
    }
}

static void test_http_date_rejects(void)
{
    static const char *const bad[] = {
        "",
        "   ",
        " Sun, 06 Nov 1994 08:49:37 GMT",        /* leading OWS */
        "Sux, 06 Nov 1994 08:49:37 GMT",         /* weekday name */
        "sun, 06 Nov 1994 08:49:37 GMT",         /* case-sensitive */
        "SUN, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nox 1994 08:49:37 GMT",         /* month name */
        "Sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 06 November 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37",             /* GMT missing */
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 gmt",
        "Sun, 06 Nov 1994 08:49:37 GMT+1",
        "Sun, 06 Nov 1994 08:49:37 GMTx",
        "Sun, 06 Nov 1994 24:00:00 GMT",         /* ranges */
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, 06 Nov 1994 99:49:37 GMT",
        "Sun,  06 Nov 1994 08:49:37 GMT",        /* spacing */
        "Sun,06 Nov 1994 08:49:37 GMT",
        "Sun 06 Nov 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06  Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov  1994 08:49:37 GMT",
        "Sun, 06 Nov 1994  08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37  GMT",
        "Sun,\t06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",           /* 2-digit year in IMF */
        "Sun, 06 Nov 01994 08:49:37 GMT",
        "Sun, 06 Nov 1994 8:49:37 GMT",
        "Sun, 06 Nov 1994 08:49 GMT",
        "Sun, 06 Nov 1994 08.49.37 GMT",
        "Sun, +6 Nov 1994 08:49:37 GMT",
        "Sun, 06-Nov-1994 08:49:37 GMT",
        "Sunday, 06 Nov 1994 08:49:37 GMT",      /* long name, IMF layout */
        "Sun, 06-Nov-94 08:49:37 GMT",           /* short name, RFC 850 layout */
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37",
        "Sunday, 6-Nov-94 08:49:37 GMT",
        "Sunday,06-Nov-94 08:49:37 GMT",
        "Sundy, 06-Nov-94 08:49:37 GMT",
        "Sunday, 06-Nov-94 24:49:37 GMT",
        "Sun Nov 6 08:49:37 1994",               /* asctime: day needs SP DIGIT or 2DIGIT */
        "Sun Nov   6 08:49:37 1994",
        "Sun Nov  16 08:49:37 1994",
        "Sun  Nov  6 08:49:37 1994",
        "Sun Nov  6 08:49:37 94",
        "Sun Nov  6 08:49:37 1994 GMT",
        "Sun Nov  6 08:49:37  1994",
        "Sun Nov  0 08:49:37 1994",
        "Sun Nov 31 08:49:37 1994",
        "Sun, 06 Nov 1994 08:49:37 GMT\r\n",
        "1994-11-06T08:49:37Z",
        "120",
    };
    size_t i;
    int64_t t;

    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (!CHECK(!date(bad[i], NOW2026, &t)))
            fprintf(stderr, "    accepted \"%s\"\n", bad[i]);
    }
    /* an embedded NUL is just a bad byte */
    CHECK(!st_http_date_parse("Sun, 06 Nov 1994 08:49:37 GMT\0", 30, NOW2026, &t));
    CHECK(!st_http_date_parse("Sun, 06 Nov\0994 08:49:37 GMT", 29, NOW2026, &t));
}

static void test_http_date_two_digit_year(void)
{
    int64_t t;

    /* In 2026, 2070 is 44 years ahead: not more than 50, so it stays 2070. */
    CHECK_EQ_INT(date_or("Thursday, 01-Jan-70 00:00:00 GMT", NOW2026, FAIL), INT64_C(3155760000));
    /* In mid-2019, 2070-01-01 is more than 50 years ahead: 1970. */
    CHECK_EQ_INT(date_or("Thursday, 01-Jan-70 00:00:00 GMT", NOW2019, FAIL), 0);
    CHECK_EQ_INT(date_or("Tuesday, 01-Jan-75 00:00:00 GMT", NOW2026, FAIL), INT64_C(3313526400));
    /* the exact edge: now + 50 years to the second stays, one second later flips */
    CHECK_EQ_INT(date_or("Monday, 01-Jun-76 00:00:00 GMT", NOW2026, FAIL), INT64_C(3358195200));
    CHECK_EQ_INT(date_or("Sunday, 31-May-76 23:59:59 GMT", NOW2026, FAIL), INT64_C(3358195199));
    CHECK_EQ_INT(date_or("Tuesday, 01-Jun-76 00:00:01 GMT", NOW2026, FAIL), INT64_C(202435201));
    CHECK_EQ_INT(date_or("Wednesday, 01-Jan-77 00:00:00 GMT", NOW2026, FAIL) < 0 ? 1 : 0, 0);
    CHECK_EQ_INT(date_or("Sunday, 06-Nov-94 08:49:37 GMT", NOW2026 + 1, FAIL), 784111777);
    CHECK_EQ_INT(date_or("Monday, 01-Jun-26 00:00:00 GMT", NOW2026, FAIL), NOW2026);
    CHECK_EQ_INT(date_or("Monday, 15-Mar-10 00:00:00 GMT", NOW2026, FAIL), INT64_C(1268611200));
    /* the window moves forward with now: in 2090, "10" is 2110 */
    CHECK_EQ_INT(date_or("Saturday, 15-Mar-10 00:00:00 GMT", NOW2090, FAIL), INT64_C(4424284800));
    /* the leap day is checked in the year the rule picks */
    CHECK_EQ_INT(date_or("Tuesday, 29-Feb-00 00:00:00 GMT", NOW2026, FAIL), 951782400);
    CHECK(!date("Monday, 29-Feb-00 00:00:00 GMT", NOW2090, &t));   /* 2100 */
    /* any clock value is safe */
    CHECK(date("Sunday, 06-Nov-94 08:49:37 GMT", INT64_MIN, &t));
    CHECK(date("Sunday, 06-Nov-94 08:49:37 GMT", INT64_MAX, &t));
    CHECK(date("Sunday, 06-Nov-94 08:49:37 GMT", 0, &t) && t == 784111777);
}

static void test_http_date_fuzz(void)
{
    st_rng rng;
    int i, k;
    size_t n;
    char buf[40];
    int64_t t;

    /* mutate valid dates byte by byte: no crash, no over-read; results are checked
     * for sanity only, since a mutation can stay valid (another digit, say) */
    st_rng_seed(&rng, 3);
    for (i = 0; i < 200000; i++) {
        const char *src = good_dates[i % 3];
        char *p;
        n = strlen(src);
        memcpy(buf, src, n);
        for (k = 0; k < 2; k++)
            buf[st_rng_next(&rng) % n] = (char)(st_rng_next(&rng) & 0xFF);
        p = malloc(n);
        if (p == NULL)
            abort();
        memcpy(p, buf, n);
        if (st_http_date_parse(p, n, NOW2026, &t))
            CHECK(t >= INT64_C(-62135596800) && t <= INT64_C(253402300799));
        free(p);
    }
    CHECK(1);
}

/* ---------------------------------------------------------------- retry hints */

#define NOW_MS (NOW2026 * 1000)

static int64_t ra(const char *s, int64_t now_ms)
{
    size_t n;
    char *p = dup_exact(s, &n);
    int64_t d = -1;
    if (!st_retry_after_parse(p, n, now_ms, &d))
        d = 0;
    free(p);
    return d;
}

static int64_t ra_ms(const char *s)
{
    size_t n;
    char *p = dup_exact(s, &n);
    int64_t d = -1;
    if (!st_retry_after_ms_parse(p, n, &d))
        d = 0;
    free(p);
    return d;
}

static void test_retry_after(void)
{
    int64_t d = 12345;

    CHECK_EQ_INT(ra("120", NOW_MS), 120000);
    CHECK_EQ_INT(ra(" 7 ", NOW_MS), 7000);
    CHECK_EQ_INT(ra("\t42\t", NOW_MS), 42000);
    CHECK_EQ_INT(ra("1", NOW_MS), 1000);
    CHECK_EQ_INT(ra("007", NOW_MS), 7000);
    CHECK_EQ_INT(ra("0", NOW_MS), 0);
    CHECK_EQ_INT(ra("000", NOW_MS), 0);
    CHECK_EQ_INT(ra("-5", NOW_MS), 0);
    CHECK_EQ_INT(ra("+5", NOW_MS), 0);
    CHECK_EQ_INT(ra("1.5", NOW_MS), 0);
    CHECK_EQ_INT(ra("5s", NOW_MS), 0);
    CHECK_EQ_INT(ra("1 2", NOW_MS), 0);
    CHECK_EQ_INT(ra("abc", NOW_MS), 0);
    CHECK_EQ_INT(ra("", NOW_MS), 0);
    CHECK_EQ_INT(ra("   ", NOW_MS), 0);
    CHECK(!st_retry_after_parse(NULL, 0, NOW_MS, &d));
    CHECK(!st_retry_after_parse("0", 1, NOW_MS, &d) && d == 12345);   /* untouched on 0 */
    /* clamped, never overflowed */
    CHECK_EQ_INT(ra("99999999999999999999", NOW_MS), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ra("99999999999999999999999999999999999999999", NOW_MS), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ra("315360000", NOW_MS), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ra("315359999", NOW_MS), ST_RETRY_AFTER_MAX_MS - 1000);
    CHECK_EQ_INT(ra("315360001", NOW_MS), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ST_RETRY_AFTER_MAX_MS, INT64_C(315360000000));

    /* dates, relative to now */
    CHECK_EQ_INT(ra("Mon, 01 Jun 2026 00:00:30 GMT", NOW_MS), 30000);
    CHECK_EQ_INT(ra("Monday, 01-Jun-26 00:00:30 GMT", NOW_MS), 30000);
    CHECK_EQ_INT(ra("Mon Jun  1 00:00:30 2026", NOW_MS), 30000);
    CHECK_EQ_INT(ra("  Mon, 01 Jun 2026 00:00:30 GMT ", NOW_MS), 30000);
    CHECK_EQ_INT(ra("Mon, 01 Jun 2026 00:00:30 GMT", NOW_MS + 400), 29600);
    CHECK_EQ_INT(ra("Mon, 01 Jun 2026 00:00:01 GMT", NOW_MS + 999), 1);
    CHECK_EQ_INT(ra("Mon, 01 Jun 2026 00:00:00 GMT", NOW_MS), 0);         /* now */
    CHECK_EQ_INT(ra("Mon, 01 Jun 2026 00:00:00 GMT", NOW_MS + 1), 0);
    CHECK_EQ_INT(ra("Sun, 31 May 2026 23:59:59 GMT", NOW_MS), 0);         /* past */
    CHECK_EQ_INT(ra("Sun, 06 Nov 1994 08:49:37 GMT", NOW_MS), 0);
    CHECK_EQ_INT(ra("Tue, 01 Jun 2027 00:00:00 GMT", NOW_MS), INT64_C(31536000000));
    CHECK_EQ_INT(ra("Fri, 31 Dec 9999 23:59:59 GMT", NOW_MS), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ra("Fri, 31 Dec 9999 23:59:59 GMT", INT64_MIN), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ra("Mon, 01 Jan 0001 00:00:00 GMT", INT64_MAX), 0);
    CHECK_EQ_INT(ra("Mon, 01 Jun 2026 00:00:30 UTC", NOW_MS), 0);
}

static void test_retry_after_ms(void)
{
    int64_t d = 777;

    CHECK_EQ_INT(ra_ms("1500"), 1500);
    CHECK_EQ_INT(ra_ms("250.5"), 251);
    CHECK_EQ_INT(ra_ms("250.0"), 250);
    CHECK_EQ_INT(ra_ms("250.000001"), 251);
    CHECK_EQ_INT(ra_ms("250."), 250);
    CHECK_EQ_INT(ra_ms(".5"), 1);
    CHECK_EQ_INT(ra_ms("0.0001"), 1);
    CHECK_EQ_INT(ra_ms(" 100 "), 100);
    CHECK_EQ_INT(ra_ms("1"), 1);
    CHECK_EQ_INT(ra_ms("0"), 0);
    CHECK_EQ_INT(ra_ms("0.0"), 0);
    CHECK_EQ_INT(ra_ms("-1"), 0);
    CHECK_EQ_INT(ra_ms("-0.5"), 0);
    CHECK_EQ_INT(ra_ms("x"), 0);
    CHECK_EQ_INT(ra_ms(""), 0);
    CHECK_EQ_INT(ra_ms("."), 0);
    CHECK_EQ_INT(ra_ms("1e3"), 0);
    CHECK_EQ_INT(ra_ms("1.2.3"), 0);
    CHECK_EQ_INT(ra_ms("12ms"), 0);
    CHECK_EQ_INT(ra_ms("inf"), 0);
    CHECK_EQ_INT(ra_ms("nan"), 0);
    CHECK_EQ_INT(ra_ms("99999999999999999999999"), ST_RETRY_AFTER_MAX_MS);
    CHECK_EQ_INT(ra_ms("99999999999999999999999.5"), ST_RETRY_AFTER_MAX_MS);
    CHECK(!st_retry_after_ms_parse(NULL, 0, &d) && d == 777);
}

/* ---------------------------------------------------------------- budget */

static int withdraw_all(st_budget *b, int64_t now, int limit)
{
    int n = 0;
    while (n < limit && st_budget_try_withdraw(b, now))
        n++;
    return n;
}

static void deposits(st_budget *b, int64_t now, int n)
{
    while (n-- > 0)
        st_budget_deposit(b, now);
}

static void test_budget_defaults(void)
{
    st_budget b;

    st_budget_init(&b, 0.2, 3, 1000, 0);
    CHECK_EQ_INT(st_budget_balance(&b, 0), 30);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 30);
    CHECK(!st_budget_try_withdraw(&b, 0));
    CHECK_EQ_INT(st_budget_balance(&b, 0), 0);
    deposits(&b, 0, 100);
    CHECK_EQ_INT(st_budget_balance(&b, 0), 20);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 20);
    CHECK(!st_budget_try_withdraw(&b, 0));
    /* refusals are not counted */
    CHECK_EQ_INT(st_budget_balance(&b, 0), 0);
    /* after a full window without traffic, back to 30 */
    CHECK_EQ_INT(st_budget_balance(&b, 10000), 30);
    CHECK_EQ_INT(withdraw_all(&b, 10000, 1000), 30);
}

static void test_budget_formula(void)
{
    st_budget b;
    int i, bad = 0;

    st_budget_init(&b, 0.2, 3, 1000, 0);
    deposits(&b, 0, 5);
    CHECK_NEAR(st_budget_balance(&b, 0), 31, 1e-12);
    CHECK_EQ_INT(withdraw_all(&b, 0, 3), 3);
    CHECK_NEAR(st_budget_balance(&b, 0), 28, 1e-12);
    st_budget_deposit(&b, 0);
    CHECK_NEAR(st_budget_balance(&b, 0), 28.2, 1e-12);

    /* spread over the window: every slot counts */
    st_budget_init(&b, 0.2, 3, 1000, 0);
    for (i = 0; i < 10; i++) {
        deposits(&b, i * 1000 + 500, 10);
        CHECK(st_budget_try_withdraw(&b, i * 1000 + 600));
    }
    CHECK_NEAR(st_budget_balance(&b, 9999), 30 + 0.2 * 100 - 10, 1e-12);
    /* t=10000 drops slot 0: its 10 deposits and 1 withdrawal */
    CHECK_NEAR(st_budget_balance(&b, 10000), 30 + 0.2 * 90 - 9, 1e-12);

    /* floating error does not cost a retry: 0.29 * 100 is 29 */
    st_budget_init(&b, 0.29, 3, 1000, 0);
    deposits(&b, 0, 100);
    CHECK_EQ_INT(st_budget_balance(&b, 0), 59);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 59);
    for (i = 1; i <= 1000; i++) {   /* ratio 0.01 * n deposits: exactly floor(n / 100) */
        st_budget_init(&b, 0.01, 0, 1000, 0);
        deposits(&b, 0, i);
        bad += withdraw_all(&b, 0, 1000) != i / 100;
    }
    CHECK_EQ_INT(bad, 0);

    /* other slot widths: window = 10 slots */
    st_budget_init(&b, 0.2, 3, 100, 0);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 3);
    st_budget_init(&b, 0.2, 3, 0, 0);            /* invalid width -> 1000 */
    CHECK_EQ_INT(b.slot_ms, 1000);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 30);
    st_budget_init(&b, NAN, -1, -5, 0);
    CHECK(b.ratio == 0 && b.min_per_s == 0 && b.slot_ms == 1000);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 0);
}

static void test_budget_expiry(void)
{
    st_budget b;

    /* deposits at t=0 count through t=9999 and are gone at t=10000 */
    st_budget_init(&b, 0.2, 3, 1000, 0);
    deposits(&b, 0, 100);
    CHECK_EQ_INT(st_budget_balance(&b, 9999), 50);
    CHECK_EQ_INT(st_budget_balance(&b, 10000), 30);

    /* same for withdrawals: spent at t=0, still spent at 9999, back at 10000 */
    st_budget_init(&b, 0.2, 3, 1000, 0);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 30);
    CHECK(!st_budget_try_withdraw(&b, 9999));
    CHECK(st_budget_try_withdraw(&b, 10000));

    /* slots are aligned to multiples of slot_ms, not to init time */
    st_budget_init(&b, 0.2, 3, 1000, 1234);
    deposits(&b, 1999, 10);
    CHECK_EQ_INT(st_budget_balance(&b, 10999), 32);
    CHECK_EQ_INT(st_budget_balance(&b, 11000), 30);

    /* withdrawals outliving the deposits that paid for them: balance goes negative */
    st_budget_init(&b, 0.2, 3, 1000, 0);
    deposits(&b, 0, 100);
    CHECK_EQ_INT(withdraw_all(&b, 5000, 1000), 50);
    CHECK_EQ_INT(st_budget_balance(&b, 10000), -20);
    CHECK(!st_budget_try_withdraw(&b, 10000));
    CHECK_EQ_INT(st_budget_balance(&b, 15000), 30);

    /* negative and zero-crossing times */
    st_budget_init(&b, 0.2, 3, 1000, -5000);
    deposits(&b, -5000, 100);
    CHECK_EQ_INT(st_budget_balance(&b, 4999), 50);
    CHECK_EQ_INT(st_budget_balance(&b, 5000), 30);
}

static void test_budget_idle_and_backwards(void)
{
    st_budget b;
    int i;

    /* a long idle gap resets */
    st_budget_init(&b, 0.2, 3, 1000, 0);
    deposits(&b, 0, 1000);
    CHECK_EQ_INT(withdraw_all(&b, 0, 10000), 230);
    CHECK_EQ_INT(st_budget_balance(&b, 3600000), 30);
    CHECK_EQ_INT(withdraw_all(&b, 3600000, 1000), 30);
    CHECK_EQ_INT(b.dep_sum, 0);
    CHECK_EQ_INT(b.wd_sum, 30);

    /* time going backwards is read as the latest time seen: nothing is forgotten */
    st_budget_init(&b, 0.2, 3, 1000, 0);
    CHECK_EQ_INT(withdraw_all(&b, 20000, 1000), 30);
    CHECK(!st_budget_try_withdraw(&b, 5000));
    CHECK(!st_budget_try_withdraw(&b, -1000000));
    CHECK(!st_budget_try_withdraw(&b, INT64_MIN));
    CHECK_EQ_INT(st_budget_balance(&b, 0), 0);
    for (i = 0; i < 5; i++)
        st_budget_deposit(&b, 5000);             /* counted in the latest slot */
    CHECK_EQ_INT(st_budget_balance(&b, 5000), 1);
    CHECK_EQ_INT(st_budget_balance(&b, 29999), 1);
    CHECK_EQ_INT(st_budget_balance(&b, 30000), 30);

    /* extreme clock values do not overflow */
    st_budget_init(&b, 0.2, 3, 1000, INT64_MIN);
    CHECK_EQ_INT(withdraw_all(&b, INT64_MIN, 1000), 30);
    CHECK_EQ_INT(withdraw_all(&b, INT64_MAX, 1000), 30);
    CHECK_EQ_INT(withdraw_all(&b, INT64_MAX, 1000), 0);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 0);
    st_budget_init(&b, 0.2, 3, INT64_MAX, 0);
    CHECK(st_budget_try_withdraw(&b, INT64_MAX));
}

static void test_budget_zero(void)
{
    st_budget b;

    st_budget_init(&b, 0, 0, 1000, 0);
    CHECK_EQ_INT(withdraw_all(&b, 0, 10), 0);
    deposits(&b, 0, 1000);
    CHECK_EQ_INT(withdraw_all(&b, 0, 10), 0);
    CHECK_EQ_INT(st_budget_balance(&b, 0), 0);

    st_budget_init(&b, 0, 3, 1000, 0);            /* reserve only */
    deposits(&b, 0, 1000);
    CHECK_EQ_INT(withdraw_all(&b, 0, 1000), 30);

    st_budget_init(&b, 0.2, 0, 1000, 0);          /* ratio only */
    CHECK_EQ_INT(withdraw_all(&b, 0, 10), 0);
    deposits(&b, 0, 4);
    CHECK_EQ_INT(withdraw_all(&b, 0, 10), 0);
    st_budget_deposit(&b, 0);
    CHECK_EQ_INT(withdraw_all(&b, 0, 10), 1);
}

/* An hour of traffic at 100 successes/s with a retry wanted every 10 ms: in every
 * window of 10 slots, retries never exceed 30 + 0.2 * successes, and the budget
 * does let that many through. */
#define SIM_SLOTS 3600

static void test_budget_simulation(void)
{
    static uint32_t dep[SIM_SLOTS], wd[SIM_SLOTS];
    st_budget b;
    int64_t t;
    int s, k, over = 0;
    long total = 0;

    st_budget_init(&b, 0.2, 3, 1000, 0);
    for (t = 0; t < (int64_t)SIM_SLOTS * 1000; t += 10) {
        s = (int)(t / 1000);
        st_budget_deposit(&b, t);
        dep[s]++;
        if (st_budget_try_withdraw(&b, t)) {
            wd[s]++;
            total++;
        }
    }
    for (s = 9; s < SIM_SLOTS; s++) {
        uint32_t d = 0, w = 0;
        for (k = s - 9; k <= s; k++) {
            d += dep[k];
            w += wd[k];
        }
        over += w > 30 + d / 5;
    }
    CHECK_EQ_INT(over, 0);
    /* steady state spends the whole allowance: 230 per 10 s */
    CHECK(total >= (long)SIM_SLOTS / 10 * 230 - 230);
    CHECK(total <= (long)SIM_SLOTS / 10 * 230 + 230);
}

/* The hedge budget is the retry budget with no reserve: each call deposits, each
 * hedge withdraws, so at most `ratio` of the calls in any window may hedge.
 * 10,000 calls at 100/s, every one slow enough to want a hedge (the worst case),
 * max_ratio 0.05: at most 5% (+1% allowed) hedge, in every window too, and the
 * budget does not starve them either. */
static void test_budget_as_hedge_ratio(void)
{
    static uint32_t calls[100], hedges[100];
    st_budget b;
    st_rng rng;
    int i, s, k, over = 0, hedged = 0, some = 0;

    memset(calls, 0, sizeof calls);
    memset(hedges, 0, sizeof hedges);
    st_budget_init(&b, 0.05, 0, 1000, 0);
    CHECK(!st_budget_try_withdraw(&b, 0));          /* no calls yet, no hedges */
    for (i = 0; i < 10000; i++) {
        int64_t t = (int64_t)i * 10;
        s = (int)(t / 1000);
        st_budget_deposit(&b, t);
        calls[s]++;
        if (st_budget_try_withdraw(&b, t)) {
            hedges[s]++;
            hedged++;
        }
    }
    printf("hedge budget: %d of 10000 calls hedged at max_ratio 0.05\n", hedged);
    CHECK(hedged <= 600);
    CHECK(hedged <= 500);                           /* the exact bound */
    CHECK(hedged >= 480);
    for (s = 0; s < 100; s++) {                     /* every window of 10 slots */
        uint32_t c = 0, h = 0;
        for (k = s - 9 < 0 ? 0 : s - 9; k <= s; k++) {
            c += calls[k];
            h += hedges[k];
        }
        over += h * 20 > c;
    }
    CHECK_EQ_INT(over, 0);

    /* the first hedge needs 20 calls */
    st_budget_init(&b, 0.05, 0, 1000, 0);
    for (i = 0; i < 19; i++)
        st_budget_deposit(&b, 0);
    CHECK(!st_budget_try_withdraw(&b, 0));
    st_budget_deposit(&b, 0);
    CHECK(st_budget_try_withdraw(&b, 0));
    CHECK(!st_budget_try_withdraw(&b, 0));

    /* when only the slow tail wants one (8% here), the ratio still holds */
    st_budget_init(&b, 0.05, 0, 1000, 0);
    st_rng_seed(&rng, 5);
    hedged = 0;
    for (i = 0; i < 10000; i++) {
        int64_t t = (int64_t)i * 10;
        st_budget_deposit(&b, t);
        if (st_rng_unit(&rng) < 0.08) {
            some++;
            hedged += st_budget_try_withdraw(&b, t);
        }
    }
    CHECK(hedged <= 500);
    CHECK(hedged >= 450);
    CHECK(some > 700);
}

int main(void)
{
    test_rng();
    test_jitter_names();
    test_backoff_bounds();
    test_backoff_decorrelated();
    test_backoff_fixed_seed();
    test_backoff_extremes();
    test_http_date_formats();
    test_http_date_rejects();
    test_http_date_two_digit_year();
    test_http_date_fuzz();
    test_retry_after();
    test_retry_after_ms();
    test_budget_defaults();
    test_budget_formula();
    test_budget_expiry();
    test_budget_idle_and_backwards();
    test_budget_zero();
    test_budget_simulation();
    test_budget_as_hedge_ratio();
    return TEST_REPORT();
}
