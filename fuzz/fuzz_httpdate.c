/* libFuzzer target for the HTTP-date and retry hint parsers (src/policy/httpdate.c).
 * Input: "NOW\nVALUE": NOW is the wall clock in epoch ms (a decimal integer,
 * optionally negative, saturating at the int64 range); without a LF, or when NOW
 * is not a number, now is 2025-11-25T12:00:00Z and the whole input is the value.
 * The value is copied into a buffer of exactly its length, so reading past it is
 * an ASan finding, and goes to all three parsers:
 *   st_http_date_parse   a parsed date lies in years -99..10100 and has the day,
 *                        month, year and time written in it; formatted back as
 *                        an IMF-fixdate and as an asctime date (years 0..9999)
 *                        it parses to the same instant; timegm() of the IMF
 *                        form agrees; an RFC 850 date formatted back as RFC 850
 *                        parses to the same instant under the same now.
 *   st_retry_after_parse a delay is > 0 and <= ST_RETRY_AFTER_MAX_MS, and equals
 *                        what a reading written here expects (delta-seconds
 *                        saturated, or the date minus now, clamped); a refusal
 *                        is zero, a date at or before now, or not a hint at all.
 *   st_retry_after_ms_parse  the same bounds, and exactly the ceiling of the
 *                        decimal, clamped, by a reading written here.
 * Any difference aborts. */
#define _GNU_SOURCE

#include "httpdate.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define DEFAULT_NOW_MS INT64_C(1764072000000)
#define MAX_MS ST_RETRY_AFTER_MAX_MS

static const char *const wday_short[] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
static const char *const wday_long[] = {
    "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"
};
static const char *const mon_short[] = {
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
};

typedef struct fields {
    int64_t year;
    int mon, day, hour, min, sec, wday;   /* mon 1-12, wday 0 = Sunday */
} fields;

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* Calendar fields of an instant, by a different route than the parser's:
 * whole 400-year eras, then years one at a time. */
static void to_fields(int64_t t, fields *f)
{
    static const int mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    int64_t days = floor_div(t, 86400), secs = t - days * 86400, era;
    int64_t y = 1970;
    int leap, m;

    f->wday = (int)(((days % 7) + 7 + 4) % 7);   /* 1970-01-01 was a Thursday */
    era = floor_div(days, 146097);
    days -= era * 146097;
    y += era * 400;
    for (;;) {
        int64_t len;
        leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        len = 365 + leap;
        if (days < len)
            break;
        days -= len;
        y++;
    }
    for (m = 0; m < 12; m++) {
        int len = mdays[m] + (m == 1 && leap);
        if (days < len)
            break;
        days -= len;
    }
    f->year = y;
    f->mon = m + 1;
    f->day = (int)days + 1;
    f->hour = (int)(secs / 3600);
    f->min = (int)(secs / 60 % 60);
    f->sec = (int)(secs % 60);
}

static size_t fmt_imf(char *out, size_t cap, const fields *f)
{
    return (size_t)snprintf(out, cap, "%s, %02d %s %04d %02d:%02d:%02d GMT", wday_short[f->wday],
                            f->day, mon_short[f->mon - 1], (int)f->year, f->hour, f->min, f->sec);
}

static size_t fmt_asctime(char *out, size_t cap, const fields *f)
{
    return (size_t)snprintf(out, cap, "%s %s %2d %02d:%02d:%02d %04d", wday_short[f->wday],
                            mon_short[f->mon - 1], f->day, f->hour, f->min, f->sec, (int)f->year);
}

static size_t fmt_rfc850(char *out, size_t cap, const fields *f)
{
    return (size_t)snprintf(out, cap, "%s, %02d-%s-%02d %02d:%02d:%02d GMT", wday_long[f->wday],
                            f->day, mon_short[f->mon - 1], (int)((f->year % 100 + 100) % 100), f->hour, f->min,
                            f->sec);
}

static int num_at(const char *s, size_t pos, int width)
{
    int v = 0, k;
    for (k = 0; k < width; k++)
        v = v * 10 + (s[pos + (size_t)k] == ' ' ? 0 : s[pos + (size_t)k] - '0');
    return v;
}

static int month_at(const char *s, size_t pos)
{
    int m;
    for (m = 0; m < 12; m++)
        if (memcmp(s + pos, mon_short[m], 3) == 0)
            return m + 1;
    return 0;
}

/* The fields as written in an accepted date, read at their fixed places, must
 * be the instant's own: a day that does not exist in its month (29 Feb 1900)
 * would come back as another date. A second of 60 is the next minute's 0. */
static void check_written_fields(const char *s, size_t n, const fields *f)
{
    int day, mon, hour, min, sec;
    int64_t year;
    const char *comma = memchr(s, ',', n);
    size_t p;

    if (n >= 29 && s[3] == ',') {                 /* Sun, 06 Nov 1994 08:49:37 GMT */
        day = num_at(s, 5, 2);
        mon = month_at(s, 8);
        year = num_at(s, 12, 4);
        hour = num_at(s, 17, 2);
        min = num_at(s, 20, 2);
        sec = num_at(s, 23, 2);
    } else if (n >= 24 && s[3] == ' ') {          /* Sun Nov  6 08:49:37 1994 */
        mon = month_at(s, 4);
        day = num_at(s, 8, 2);
        hour = num_at(s, 11, 2);
        min = num_at(s, 14, 2);
        sec = num_at(s, 17, 2);
        year = num_at(s, 20, 4);
    } else if (comma && (p = (size_t)(comma - s) + 2) + 18 <= n) {   /* Sunday, 06-Nov-94 08:49:37 */
        day = num_at(s, p, 2);
        mon = month_at(s, p + 3);
        year = num_at(s, p + 7, 2);
        hour = num_at(s, p + 10, 2);
        min = num_at(s, p + 13, 2);
        sec = num_at(s, p + 16, 2);
        if (year != (f->year % 100 + 100) % 100 && sec != 60)
            abort();
        year = f->year;
    } else {
        abort();   /* accepted, yet none of the three forms */
    }
    if (sec == 60)
        return;
    if (year != f->year || mon != f->mon || day != f->day || hour != f->hour || min != f->min
        || sec != f->sec)
        abort();
}

/* Parses s (exactly n bytes, no terminator) from a heap copy of that length. */
static int parse_date(const char *s, size_t n, int64_t now_s, int64_t *t)
{
    char *copy = malloc(n ? n : 1);
    int ok;
    if (copy == NULL)
        abort();
    if (n)
        memcpy(copy, s, n);
    ok = st_http_date_parse(copy, n, now_s, t);
    free(copy);
    return ok;
}

static void check_date(const char *s, size_t n, int64_t now_ms)
{
    int64_t now_s = floor_div(now_ms, 1000), t, back;
    char buf[96];
    size_t k;
    fields f;

    if (!parse_date(s, n, now_s, &t))
        return;
    /* years -99..10100: the RFC 850 window reaches 50 years past now clamped to 1..9999 */
    if (t < st_days_from_civil(-99, 1, 1) * 86400 || t >= st_days_from_civil(10101, 1, 1) * 86400)
        abort();
    to_fields(t, &f);
    check_written_fields(s, n, &f);
    if (st_days_from_civil(f.year, f.mon, f.day) * 86400 + f.hour * 3600 + f.min * 60 + f.sec != t)
        abort();
    if (f.year >= 0 && f.year <= 9999) {
        struct tm tm;
        char *end;

        k = fmt_imf(buf, sizeof buf, &f);
        if (!parse_date(buf, k, now_s, &back) || back != t)
            abort();
        k = fmt_asctime(buf, sizeof buf, &f);
        if (!parse_date(buf, k, now_s, &back) || back != t)
            abort();
        /* the C library's own reading of the IMF form */
        k = fmt_imf(buf, sizeof buf, &f);
        memset(&tm, 0, sizeof tm);
        end = strptime(buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        if (end == NULL || *end != '\0' || (int64_t)timegm(&tm) != t)
            abort();
    }
    /* an RFC 850 date (long weekday name) reads back the same under the same now */
    if (n > 6 && memchr(s, '-', n) != NULL && s[3] != ',' && s[3] != ' ') {
        k = fmt_rfc850(buf, sizeof buf, &f);
        if (!parse_date(buf, k, now_s, &back) || back != t)
            abort();
    }
}

/* ---------------------------------------------------------------- retry hints */

static int is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static void ref_trim(const char *s, size_t n, size_t *a, size_t *b)
{
    *a = 0;
    *b = n;
    while (*a < *b && is_ows(s[*a]))
        (*a)++;
    while (*b > *a && is_ows(s[*b - 1]))
        (*b)--;
}

/* Retry-After by RFC 9110: delta-seconds or an HTTP-date; 1 and the delay, or 0. */
static int ref_retry_after(const char *s, size_t n, int64_t now_ms, int64_t *delay)
{
    size_t a, b, i;
    int64_t secs = 0, when;

    ref_trim(s, n, &a, &b);
    if (a == b)
        return 0;
    for (i = a; i < b && is_digit(s[i]); i++)
        if (secs <= MAX_MS / 1000)
            secs = secs * 10 + (s[i] - '0');
    if (i == b) {
        if (secs > MAX_MS / 1000)
            secs = MAX_MS / 1000;
        *delay = secs * 1000;
        return secs > 0;
    }
    if (!parse_date(s + a, b - a, floor_div(now_ms, 1000), &when))
        return 0;
    when *= 1000;
    if (when <= now_ms)
        return 0;
    /* when is small (years 0..10100), so only a very negative now can overflow */
    *delay = now_ms < when - MAX_MS ? MAX_MS : when - now_ms;
    return 1;
}

/* retry-after-ms: the ceiling of 1*DIGIT ["." *DIGIT] / "." 1*DIGIT, clamped. */
static int ref_retry_after_ms(const char *s, size_t n, int64_t *delay)
{
    size_t a, b, i, digits = 0;
    int64_t ms = 0;
    int frac = 0;

    ref_trim(s, n, &a, &b);
    for (i = a; i < b && is_digit(s[i]); i++, digits++)
        if (ms <= MAX_MS)
            ms = ms * 10 + (s[i] - '0');
    if (i < b && s[i] == '.')
        for (i++; i < b && is_digit(s[i]); i++, digits++)
            frac |= s[i] != '0';
    if (i != b || digits == 0)
        return 0;
    ms += frac;
    if (ms > MAX_MS)
        ms = MAX_MS;
    *delay = ms;
    return ms > 0;
}

static void check_hints(const char *s, size_t n, int64_t now_ms)
{
    char *copy = malloc(n ? n : 1);
    int64_t got = -1, want = -1;
    int ok, rok;

    if (copy == NULL)
        abort();
    if (n)
        memcpy(copy, s, n);

    ok = st_retry_after_parse(copy, n, now_ms, &got);
    rok = ref_retry_after(s, n, now_ms, &want);
    if (ok != rok || (ok && (got != want || got <= 0 || got > MAX_MS)))
        abort();

    got = want = -1;
    ok = st_retry_after_ms_parse(copy, n, &got);
    rok = ref_retry_after_ms(s, n, &want);
    if (ok != rok || (ok && (got != want || got <= 0 || got > MAX_MS)))
        abort();
    free(copy);
}

/* ---------------------------------------------------------------- driver */

/* A decimal int64, saturating; 0 when s[0..n) is not one. */
static int parse_now(const char *s, size_t n, int64_t *out)
{
    size_t i = 0;
    int neg = 0;
    int64_t v = 0;

    if (i < n && (s[i] == '-' || s[i] == '+'))
        neg = s[i++] == '-';
    if (i == n)
        return 0;
    for (; i < n; i++) {
        int d;
        if (!is_digit(s[i]))
            return 0;
        d = s[i] - '0';
        if (neg)
            v = v < (INT64_MIN + d) / 10 ? INT64_MIN : v * 10 - d;
        else
            v = v > (INT64_MAX - d) / 10 ? INT64_MAX : v * 10 + d;
    }
    *out = v;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data, *lf = memchr(data, '\n', size);
    int64_t now_ms = DEFAULT_NOW_MS;
    size_t n = size;

    if (lf && parse_now(s, (size_t)(lf - s), &now_ms)) {
        n = size - (size_t)(lf - s) - 1;
        s = lf + 1;
    }
    check_date(s, n, now_ms);
    check_hints(s, n, now_ms);
    return 0;
}
