/* Specs for the sliding sums, driven by a virtual clock: the exact boundary
 * where a value leaves the window, slot reuse after idle gaps of any length,
 * clocks that go backwards, refused values, negative times, and sums of
 * fractions against a reference kept by brute force. */
#include "test.h"

#include "counts.h"

#include <stdlib.h>

static double sum_of(st_counts *c, int64_t now, unsigned i)
{
    double out[ST_COUNTS_MAX_N];
    st_counts_sums(c, now, out);
    return out[i];
}

static void boundary(void)
{
    st_counts *c = st_counts_new(6, 10000, 2, 0);
    CHECK(c != NULL);
    CHECK(st_counts_add(c, 0, 0, 1));
    CHECK(st_counts_add(c, 9999, 1, 2.5));
    CHECK_NEAR(sum_of(c, 0, 0), 1, 0);
    CHECK_NEAR(sum_of(c, 59999, 0), 1, 0);      /* still in the 6th slot */
    CHECK_NEAR(sum_of(c, 59999, 1), 2.5, 0);
    CHECK_NEAR(sum_of(c, 60000, 0), 0, 0);      /* gone with its slot */
    CHECK_NEAR(sum_of(c, 60000, 1), 0, 0);
    st_counts_free(c);
}

static void idle_gaps(void)
{
    st_counts *c = st_counts_new(4, 1000, 1, 0);
    int64_t t;
    CHECK(st_counts_add(c, 0, 0, 5));
    /* a gap of exactly one window lands on the same slot index: it must be cleared */
    CHECK(st_counts_add(c, 4000, 0, 1));
    CHECK_NEAR(sum_of(c, 4000, 0), 1, 0);
    /* a gap of years */
    t = (int64_t)1e12;
    CHECK(st_counts_add(c, t, 0, 7));
    CHECK_NEAR(sum_of(c, t, 0), 7, 0);
    CHECK_NEAR(sum_of(c, t + 3999, 0), 7, 0);
    CHECK_NEAR(sum_of(c, t + 4000, 0), 0, 0);
    st_counts_free(c);
}

static void backwards(void)
{
    st_counts *c = st_counts_new(3, 1000, 1, 0);
    CHECK(st_counts_add(c, 5000, 0, 1));
    /* an earlier time counts as the latest seen: in the current slot, not a gone one */
    CHECK(st_counts_add(c, 100, 0, 1));
    CHECK_NEAR(sum_of(c, 0, 0), 2, 0);
    CHECK_NEAR(sum_of(c, 7999, 0), 2, 0);
    CHECK_NEAR(sum_of(c, 8000, 0), 0, 0);
    st_counts_free(c);
}

static void refused(void)
{
    st_counts *c = st_counts_new(2, 1000, 2, 0);
    CHECK(st_counts_new(0, 1000, 1, 0) == NULL);
    CHECK(st_counts_new(ST_COUNTS_MAX_SLOTS + 1, 1000, 1, 0) == NULL);
    CHECK(st_counts_new(2, 0, 1, 0) == NULL);
    CHECK(st_counts_new(2, 1000, 0, 0) == NULL);
    CHECK(st_counts_new(2, 1000, ST_COUNTS_MAX_N + 1, 0) == NULL);
    CHECK(!st_counts_add(c, 0, 2, 1));
    CHECK(!st_counts_add(c, 0, 0, -1));
    CHECK(!st_counts_add(c, 0, 0, NAN));
    CHECK(!st_counts_add(c, 0, 0, INFINITY));
    CHECK_NEAR(sum_of(c, 0, 0), 0, 0);
    CHECK_NEAR(sum_of(c, 0, 1), 0, 0);
    st_counts_free(c);
}

static void negative_times(void)
{
    st_counts *c = st_counts_new(2, 1000, 1, -5000);
    CHECK(st_counts_add(c, -1500, 0, 1));       /* period -2 */
    CHECK(st_counts_add(c, -1, 0, 1));          /* period -1 */
    CHECK_NEAR(sum_of(c, -1, 0), 2, 0);
    CHECK_NEAR(sum_of(c, 0, 0), 1, 0);          /* period 0: -2 has gone */
    CHECK_NEAR(sum_of(c, 1000, 0), 0, 0);
    c = (st_counts_free(c), st_counts_new(3, 1, 1, INT64_MIN));
    CHECK(st_counts_add(c, INT64_MIN + 1, 0, 1));
    CHECK_NEAR(sum_of(c, INT64_MIN + 1, 0), 1, 0);
    CHECK_NEAR(sum_of(c, INT64_MAX, 0), 0, 0);
    st_counts_free(c);
}

/* Random adds over a long run against a brute-force list of (time, value). */
static void against_reference(void)
{
    enum { N = 20000, SLOTS = 60, SLOT = 1000 };
    static int64_t at[N];
    static double val[N];
    st_counts *c = st_counts_new(SLOTS, SLOT, 1, 0);
    unsigned seed = 12345;
    int64_t t = 0;
    int i, j, bad = 0;
    for (i = 0; i < N; i++) {
        seed = seed * 1103515245u + 12345u;
        t += (seed >> 16) % 700;                 /* 0 to 0.7 s apart */
        at[i] = t;
        val[i] = ((seed >> 8) % 1000) / 1e6;     /* dollars, fractional */
        st_counts_add(c, t, 0, val[i]);
        if (i % 97 == 0) {
            int64_t p = t / SLOT;
            double want = 0;
            for (j = 0; j <= i; j++)
                if (at[j] / SLOT > p - SLOTS)
                    want += val[j];
            if (fabs(sum_of(c, t, 0) - want) > 1e-9)
                bad++;
        }
    }
    CHECK_EQ_INT(bad, 0);
    st_counts_free(c);
}

int main(void)
{
    boundary();
    idle_gaps();
    backwards();
    refused();
    negative_times();
    against_reference();
    return TEST_REPORT();
}
