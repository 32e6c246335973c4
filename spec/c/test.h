/* A tiny check-and-count helper for the C specs: failures print file:line and keep
 * going, TEST_REPORT() prints "N passed, M failed" and gives main's exit code. */
#ifndef STURDY_TEST_H
#define STURDY_TEST_H

#include <stdio.h>
#include <stdint.h>
#include <math.h>

static int test_passed, test_failed;

static inline int test_note(int ok, const char *file, int line, const char *what)
{
    if (ok) {
        test_passed++;
    } else {
        test_failed++;
        fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, what);
    }
    return ok;
}

#define CHECK(cond) test_note((cond) ? 1 : 0, __FILE__, __LINE__, #cond)

#define CHECK_EQ_INT(a, b) do { \
        long long ta_ = (long long)(a), tb_ = (long long)(b); \
        if (!test_note(ta_ == tb_, __FILE__, __LINE__, #a " == " #b)) \
            fprintf(stderr, "    got %lld, want %lld\n", ta_, tb_); \
    } while (0)

#define CHECK_NEAR(a, b, eps) do { \
        double ta_ = (double)(a), tb_ = (double)(b); \
        if (!test_note(fabs(ta_ - tb_) <= (eps), __FILE__, __LINE__, #a " ~= " #b)) \
            fprintf(stderr, "    got %.17g, want %.17g (+/- %g)\n", ta_, tb_, (double)(eps)); \
    } while (0)

#define TEST_REPORT() \
    (printf("%d passed, %d failed\n", test_passed, test_failed), test_failed ? 1 : 0)

#endif
