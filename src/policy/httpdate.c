#include "httpdate.h"

static const char *const day_short[] = { "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun" };
static const char *const day_long[] = {
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"
};
static const char *const month_names[] = {
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
};

/* Bounds for "now" in the RFC 850 year rule (0001-01-01 .. 9999-12-31): any clock
 * value stays far from int64 overflow once years are turned back into seconds. */
#define NOW_MIN_S INT64_C(-62135596800)
#define NOW_MAX_S INT64_C(253402300799)

typedef struct cursor {
    const char *s;
    size_t len, i;
} cursor;

typedef struct civil {
    int64_t year;
    int month, day, hour, min, sec;   /* month 1-12 */
} civil;

static int is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static int lit(cursor *c, const char *t)
{
    size_t i = c->i;
    for (; *t; t++, i++)
        if (i >= c->len || c->s[i] != *t)
            return 0;
    c->i = i;
    return 1;
}

/* Exactly n digits. */
static int digits(cursor *c, int n, int *v)
{
    int k, x = 0;
    if (c->len - c->i < (size_t)n)
        return 0;
    for (k = 0; k < n; k++) {
        char ch = c->s[c->i + (size_t)k];
        if (!is_digit(ch))
            return 0;
        x = x * 10 + (ch - '0');
    }
    c->i += (size_t)n;
    *v = x;
    return 1;
}

/* Index of the name in the table that matches at the cursor, or -1. No name is a
 * prefix of another within one table, so the first match is the only one. */
static int name(cursor *c, const char *const *names, int n)
{
    int k;
    for (k = 0; k < n; k++)
        if (lit(c, names[k]))
            return k;
    return -1;
}

static int month(cursor *c, int *m)
{
    int k = name(c, month_names, 12);
    *m = k + 1;
    return k >= 0;
}

static int time_of_day(cursor *c, civil *t)
{
    return digits(c, 2, &t->hour) && lit(c, ":") && digits(c, 2, &t->min) && lit(c, ":")
        && digits(c, 2, &t->sec);
}

static int is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

int st_days_in_month(int64_t y, int m)
{
    static const int days[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    return m == 2 && is_leap(y) ? 29 : days[m - 1];
}

/* Howard Hinnant's days_from_civil: days since 1970-01-01 in the proleptic
 * Gregorian calendar, exact for any year. */
int64_t st_days_from_civil(int64_t y, int m, int d)
{
    int64_t era, yoe, doy, doe;
    y -= m <= 2;
    era = floor_div(y, 400);
    yoe = y - era * 400;
    doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_epoch(int64_t t, civil *c)
{
    int64_t days = floor_div(t, 86400), secs = t - days * 86400;
    int64_t z = days + 719468, era = floor_div(z, 146097);
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    c->day = (int)(doy - (153 * mp + 2) / 5 + 1);
    c->month = (int)(mp < 10 ? mp + 3 : mp - 9);
    c->year = yoe + era * 400 + (c->month <= 2);
    c->hour = (int)(secs / 3600);
    c->min = (int)(secs / 60 % 60);
    c->sec = (int)(secs % 60);
}

/* Field-by-field order, so "50 years from now" needs no day arithmetic (and
 * 29 Feb + 50 years is simply compared, not normalised). */
static int civil_cmp(const civil *a, const civil *b)
{
    int64_t x[6], y[6];
    int k;
    x[0] = a->year; x[1] = a->month; x[2] = a->day; x[3] = a->hour; x[4] = a->min; x[5] = a->sec;
    y[0] = b->year; y[1] = b->month; y[2] = b->day; y[3] = b->hour; y[4] = b->min; y[5] = b->sec;
    for (k = 0; k < 6; k++)
        if (x[k] != y[k])
            return x[k] < y[k] ? -1 : 1;
    return 0;
}

/* RFC 9110: a two-digit year that would put the date more than 50 years in the
 * future means the past century. Picking the latest candidate not past that
 * limit also carries the window forward (in 2090, "10" is 2110, not 2010). */
static void resolve_two_digit_year(civil *t, int yy, int64_t now_s)
{
    civil now, limit;
    if (now_s < NOW_MIN_S)
        now_s = NOW_MIN_S;
    if (now_s > NOW_MAX_S)
        now_s = NOW_MAX_S;
    civil_from_epoch(now_s, &now);
    limit = now;
    limit.year += 50;
    t->year = now.year - now.year % 100 + yy;   /* now.year >= 1, so % is a plain remainder */
    if (civil_cmp(t, &limit) > 0) {
        t->year -= 100;
    } else {
        t->year += 100;
        if (civil_cmp(t, &limit) > 0)
            t->year -= 100;
    }
}

int st_http_date_parse(const char *s, size_t len, int64_t now_epoch_s, int64_t *epoch_s)
{
    cursor c;
    civil t = { 0, 0, 0, 0, 0, 0 };
    int wd, y = 0, ok;

    if (s == NULL)
        return 0;
    c.s = s;
    c.len = len;
    c.i = 0;
    if ((wd = name(&c, day_short, 7)) < 0)
        return 0;

    if (lit(&c, ", ")) {                                /* IMF-fixdate */
        ok = digits(&c, 2, &t.day) && lit(&c, " ") && month(&c, &t.month) && lit(&c, " ")
            && digits(&c, 4, &y) && lit(&c, " ") && time_of_day(&c, &t) && lit(&c, " GMT");
        t.year = y;
    } else if (lit(&c, " ")) {                          /* asctime */
        ok = month(&c, &t.month) && lit(&c, " ");
        if (ok)
            ok = lit(&c, " ") ? digits(&c, 1, &t.day) : digits(&c, 2, &t.day);
        ok = ok && lit(&c, " ") && time_of_day(&c, &t) && lit(&c, " ") && digits(&c, 4, &y);
        t.year = y;
    } else {                                            /* RFC 850 */
        c.i = 0;
        if (name(&c, day_long, 7) != wd)
            return 0;
        ok = lit(&c, ", ") && digits(&c, 2, &t.day) && lit(&c, "-") && month(&c, &t.month)
            && lit(&c, "-") && digits(&c, 2, &y) && lit(&c, " ") && time_of_day(&c, &t)
            && lit(&c, " GMT");
        if (ok)
            resolve_two_digit_year(&t, y, now_epoch_s);
    }
    if (!ok)
        return 0;
    while (c.i < c.len && is_ows(c.s[c.i]))
        c.i++;
    if (c.i != c.len)
        return 0;
    if (t.hour > 23 || t.min > 59 || t.sec > 60 || t.day < 1
        || t.day > st_days_in_month(t.year, t.month))
        return 0;
    *epoch_s = st_days_from_civil(t.year, t.month, t.day) * 86400
        + t.hour * 3600 + t.min * 60 + t.sec;
    return 1;
}

static void trim(const char *v, size_t *a, size_t *b)
{
    while (*a < *b && is_ows(v[*a]))
        (*a)++;
    while (*b > *a && is_ows(v[*b - 1]))
        (*b)--;
}

/* Digits in v[*i..b) as a count, saturating at max. Returns how many were read. */
static size_t read_count(const char *v, size_t *i, size_t b, int64_t max, int64_t *out)
{
    size_t start = *i;
    int64_t x = 0;
    for (; *i < b && is_digit(v[*i]); (*i)++) {
        if (x <= max)   /* past max the rest cannot matter; stop growing before overflow */
            x = x * 10 + (v[*i] - '0');
    }
    *out = x > max ? max : x;
    return *i - start;
}

int st_retry_after_parse(const char *v, size_t len, int64_t now_epoch_ms, int64_t *delay_ms)
{
    size_t a = 0, b = len, i;
    int64_t secs, when_ms, d;

    if (v == NULL)
        return 0;
    trim(v, &a, &b);
    if (a == b)
        return 0;
    i = a;
    if (read_count(v, &i, b, ST_RETRY_AFTER_MAX_MS / 1000, &secs) > 0 && i == b) {
        if (secs == 0)
            return 0;
        *delay_ms = secs * 1000;
        return 1;
    }
    if (!st_http_date_parse(v + a, b - a, floor_div(now_epoch_ms, 1000), &secs))
        return 0;
    /* secs is within years 0..9999, so when_ms is small; only now can be extreme,
     * hence the comparisons before any subtraction */
    when_ms = secs * 1000;
    if (now_epoch_ms >= when_ms)
        return 0;
    if (now_epoch_ms < when_ms - ST_RETRY_AFTER_MAX_MS)
        d = ST_RETRY_AFTER_MAX_MS;
    else
        d = when_ms - now_epoch_ms;
    *delay_ms = d;
    return 1;
}

int st_retry_after_ms_parse(const char *v, size_t len, int64_t *delay_ms)
{
    size_t a = 0, b = len, i, nint, nfrac = 0;
    int64_t ms;
    int frac_nonzero = 0;

    if (v == NULL)
        return 0;
    trim(v, &a, &b);
    i = a;
    nint = read_count(v, &i, b, ST_RETRY_AFTER_MAX_MS, &ms);
    if (i < b && v[i] == '.') {
        for (i++; i < b && is_digit(v[i]); i++, nfrac++)
            frac_nonzero |= v[i] != '0';
    }
    if (i != b || nint + nfrac == 0)
        return 0;
    if (frac_nonzero && ms < ST_RETRY_AFTER_MAX_MS)   /* exact ceil, no float rounding */
        ms++;
    if (ms == 0)
        return 0;
    *delay_ms = ms;
    return 1;
}
