#define _POSIX_C_SOURCE 200809L

#include "ratelimit.h"

#include <string.h>
#include <strings.h>

#include "httpdate.h"

#define NOW_LIMIT_MS INT64_C(1000000000000000)          /* ±1e15 ms, ~31,700 years */
#define MAX_SPAN_US (ST_RATELIMIT_MAX_MS * 1000)
#define MAX_SPAN_NS (ST_RATELIMIT_MAX_MS * 1000000)
#define AMOUNT_MAX 1e12
#define BURST_SECONDS_MAX 3600.0

static const char *const dim_names[ST_DIM_COUNT] = {
    "requests", "input_tokens", "output_tokens", "tokens"
};

const char *st_dim_name(st_dim d)
{
    return (unsigned)d < ST_DIM_COUNT ? dim_names[d] : "unknown";
}

/* ---------------------------------------------------------------- helpers */

static int64_t clamp_now(int64_t ms)
{
    if (ms < -NOW_LIMIT_MS)
        return -NOW_LIMIT_MS;
    return ms > NOW_LIMIT_MS ? NOW_LIMIT_MS : ms;
}

static int64_t clamp_span_ms(int64_t ms)
{
    if (ms < 0)
        return 0;
    return ms > ST_RATELIMIT_MAX_MS ? ST_RATELIMIT_MAX_MS : ms;
}

static double clamp_amount(double x)
{
    if (!(x >= 0))
        return 0;
    return x > AMOUNT_MAX ? AMOUNT_MAX : x;
}

static int valid_dim(st_dim d)
{
    return (unsigned)d < ST_DIM_COUNT;
}

/* Time that `units` cost at `interval_us` per unit, rounded up to a whole µs so
 * the configured rate is never exceeded. Products a hair above an integer (60e6/70
 * * 7) snap to it, or exact rates would lose a µs to float noise. No libm: the
 * module is linked without -lm. */
static int64_t span_us(double units, double interval_us)
{
    double v = units * interval_us, tol;
    int64_t r;
    if (!(v > 0))
        return 0;
    if (v >= (double)MAX_SPAN_US)
        return MAX_SPAN_US;
    r = (int64_t)(v + 0.5);
    tol = 1e-9 + v * 1e-12;
    if ((double)r - v <= tol && v - (double)r <= tol)
        return r;
    r = (int64_t)v;
    return (double)r < v ? r + 1 : r;
}

static int64_t ceil_ms(int64_t us)
{
    return us / 1000 + (us % 1000 != 0);
}

static int hold_active(const st_limiter *l, int d, int64_t now_ms)
{
    return l->hold_left[d] >= 0 && now_ms < l->hold_until_ms[d];
}

/* While a hold lasts, a cost must fit in what is left; a cost of 0 (no estimate)
 * needs something left, as the provider would refuse it too. */
static int hold_blocks(const st_limiter *l, int d, int64_t now_ms, double c)
{
    if (!hold_active(l, d, now_ms))
        return 0;
    return c > 0 ? c > l->hold_left[d] + 1e-9 : !(l->hold_left[d] > 0);
}

/* Re-derive the GCRA of one dimension from its effective limit. The debt it
 * carries is kept in units, so tokens already spent are not forgotten (or
 * double-charged) when a tier changes. Returns 1 when the limit changed. */
static int set_rate(st_limiter *l, int d, int64_t now_ms)
{
    st_gcra *g = &l->dims[d];
    double lim = st_limiter_limit(l, (st_dim)d), debt = 0;
    int64_t now_us = now_ms * 1000;

    if (lim == g->per_min)
        return 0;
    if (g->per_min > 0 && g->tat_us > now_us)
        debt = (double)(g->tat_us - now_us) / g->interval_us;
    g->per_min = lim;
    if (lim > 0) {
        g->interval_us = 60e6 / lim;
        g->burst = l->burst_seconds * lim / 60.0;
        if (g->burst < 1)
            g->burst = 1;
        g->burst_us = span_us(g->burst, g->interval_us);
        g->tat_us = now_us + span_us(debt, g->interval_us);
    } else {
        g->interval_us = 0;
        g->burst = 0;
        g->burst_us = 0;
        g->tat_us = now_us;
    }
    return 1;
}

static void fill_cost(const double *cost, double c[ST_DIM_COUNT])
{
    int d;
    for (d = 0; d < ST_DIM_COUNT; d++)
        c[d] = cost ? clamp_amount(cost[d]) : (d == ST_DIM_REQUESTS ? 1 : 0);
}

/* ---------------------------------------------------------------- limiter */

void st_limiter_init(st_limiter *l, const double configured_per_min[ST_DIM_COUNT],
                     double burst_seconds, int64_t now_ms)
{
    int d;
    now_ms = clamp_now(now_ms);
    if (!(burst_seconds > 0))
        burst_seconds = 1;
    l->burst_seconds = burst_seconds > BURST_SECONDS_MAX ? BURST_SECONDS_MAX : burst_seconds;
    l->paused_until_ms = 0;
    l->share = 1;
    for (d = 0; d < ST_DIM_COUNT; d++) {
        st_gcra *g = &l->dims[d];
        g->per_min = 0;
        g->burst = 0;
        g->tat_us = now_ms * 1000;
        g->interval_us = 0;
        g->burst_us = 0;
        l->configured[d] = configured_per_min ? clamp_amount(configured_per_min[d]) : 0;
        l->learned[d] = 0;
        l->remaining[d] = -1;
        l->reset_at_ms[d] = 0;
        l->hold_left[d] = -1;
        l->hold_cap[d] = 0;
        l->hold_until_ms[d] = 0;
        l->pend_remaining[d] = -1;
        l->pend_reset_at_ms[d] = 0;
        l->pend_has_reset[d] = 0;
        (void)set_rate(l, d, now_ms);
    }
}

double st_limiter_limit(const st_limiter *l, st_dim d)
{
    double c, k;
    if (!valid_dim(d))
        return 0;
    c = l->configured[d];
    k = l->learned[d];
    if (c > 0 && k > 0)
        c = c < k ? c : k;
    else if (!(c > 0))
        c = k;
    return c / l->share;
}

void st_limiter_share(st_limiter *l, int64_t now_ms, double n)
{
    int d, smaller;
    if (!(n >= 1 && n <= 1e6))
        n = n > 1e6 ? 1e6 : 1;
    if (n == l->share)
        return;
    smaller = n > l->share;
    l->share = n;
    now_ms = clamp_now(now_ms);
    for (d = 0; d < ST_DIM_COUNT; d++) {
        st_gcra *g = &l->dims[d];
        int64_t tat = g->tat_us;
        (void)set_rate(l, d, now_ms);
        if (g->per_min <= 0)
            continue;
        /* the debt is kept in time: the rate and the burst shrink alike */
        g->tat_us = tat;
        /* a smaller share starts with nothing left: the others used the
         * same bucket, and how much of it is left nobody here knows */
        if (smaller && g->tat_us < now_ms * 1000 + g->burst_us)
            g->tat_us = now_ms * 1000 + g->burst_us;
    }
}

int st_limiter_known(const st_limiter *l)
{
    return st_limiter_limit(l, ST_DIM_REQUESTS) > 0;
}

static int64_t wait_for(const st_limiter *l, int64_t now_ms, const double c[ST_DIM_COUNT])
{
    int64_t w = 0, now_us = now_ms * 1000;
    int d;

    if (l->paused_until_ms > now_ms)
        w = l->paused_until_ms - now_ms;
    for (d = 0; d < ST_DIM_COUNT; d++) {
        const st_gcra *g = &l->dims[d];
        if (g->per_min > 0) {
            /* an oversize cost only needs the whole burst, i.e. no debt */
            double need = c[d] < g->burst ? c[d] : g->burst;
            int64_t us = (g->tat_us - now_us) + span_us(need, g->interval_us) - g->burst_us;
            if (us > 0 && ceil_ms(us) > w)
                w = ceil_ms(us);
        }
        if (hold_blocks(l, d, now_ms, c[d]) && l->hold_until_ms[d] - now_ms > w)
            w = l->hold_until_ms[d] - now_ms;
    }
    return w;
}

int64_t st_limiter_wait_ms(const st_limiter *l, int64_t now_ms, const double cost[ST_DIM_COUNT])
{
    double c[ST_DIM_COUNT];
    fill_cost(cost, c);
    return wait_for(l, clamp_now(now_ms), c);
}

int64_t st_limiter_acquire(st_limiter *l, int64_t now_ms, const double cost[ST_DIM_COUNT])
{
    double c[ST_DIM_COUNT];
    int64_t w, now_us;
    int d;

    fill_cost(cost, c);
    now_ms = clamp_now(now_ms);
    if ((w = wait_for(l, now_ms, c)) > 0)
        return w;
    now_us = now_ms * 1000;
    for (d = 0; d < ST_DIM_COUNT; d++) {
        st_gcra *g = &l->dims[d];
        if (g->per_min > 0) {
            int64_t base = g->tat_us > now_us ? g->tat_us : now_us;
            g->tat_us = base + span_us(c[d], g->interval_us);
            if (g->tat_us - now_us > MAX_SPAN_US)
                g->tat_us = now_us + MAX_SPAN_US;
        }
        if (hold_active(l, d, now_ms)) {
            l->hold_left[d] -= c[d];
            if (l->hold_left[d] < 0)
                l->hold_left[d] = 0;
        }
    }
    return 0;
}

void st_limiter_correct(st_limiter *l, int64_t now_ms, st_dim d, double delta)
{
    st_gcra *g;
    int64_t now_us, base;

    if (!valid_dim(d) || delta != delta)
        return;
    now_ms = clamp_now(now_ms);
    now_us = now_ms * 1000;
    g = &l->dims[d];
    if (g->per_min > 0) {
        base = g->tat_us > now_us ? g->tat_us : now_us;
        if (delta >= 0) {
            g->tat_us = base + span_us(delta, g->interval_us);
            if (g->tat_us - now_us > MAX_SPAN_US)
                g->tat_us = now_us + MAX_SPAN_US;
        } else {
            g->tat_us = base - span_us(-delta, g->interval_us);
            if (g->tat_us < now_us)     /* an empty bucket is as good as it gets */
                g->tat_us = now_us;
        }
    }
    if (hold_active(l, d, now_ms)) {
        double left = l->hold_left[d] - delta;
        if (!(left >= 0))
            left = 0;
        l->hold_left[d] = left > l->hold_cap[d] ? l->hold_cap[d] : left;
    }
}

void st_limiter_pause_until(st_limiter *l, int64_t until_ms)
{
    until_ms = clamp_now(until_ms);
    if (until_ms > l->paused_until_ms)
        l->paused_until_ms = until_ms;
}

/* A learned remaining, with the monotonic time of its reset if one came with it. */
static void apply_remaining(st_limiter *l, int64_t now_ms, int d, double remaining,
                            int has_reset, int64_t reset_at_ms)
{
    double r = clamp_amount(remaining);
    st_gcra *g = &l->dims[d];

    l->remaining[d] = r;
    if (has_reset)
        l->reset_at_ms[d] = reset_at_ms;
    if (has_reset && g->per_min <= 0) {
        /* no rate known: remaining until the reset is all there is to go by.
         * With a rate, the provider refills continuously and the reset is only
         * when it is full again: pacing from what remains (below) is right. */
        if (reset_at_ms > now_ms) {
            l->hold_left[d] = r;
            l->hold_cap[d] = r;
            l->hold_until_ms[d] = reset_at_ms;
        } else {
            l->hold_left[d] = -1;       /* already reset: the provider is full again */
        }
        return;
    }
    if (hold_active(l, d, now_ms)) {
        l->hold_left[d] = r;
        l->hold_cap[d] = r;
    }
    if (g->per_min > 0) {
        /* leave exactly r units of the burst: tat = now + burst - cost(r) */
        int64_t now_us = now_ms * 1000;
        int64_t tat = now_us + g->burst_us - span_us(r < g->burst ? r : g->burst, g->interval_us);
        if (tat > g->tat_us)
            g->tat_us = tat;
    }
}

int st_limiter_learn(st_limiter *l, int64_t now_ms, st_dim d, double limit, double remaining,
                     int64_t reset_in_ms)
{
    int changed = 0;
    int64_t reset_at = 0;

    if (!valid_dim(d))
        return 0;
    now_ms = clamp_now(now_ms);
    if (limit > 0) {
        l->learned[d] = clamp_amount(limit);
        changed = set_rate(l, d, now_ms);
    }
    if (reset_in_ms >= 0) {
        reset_at = now_ms + clamp_span_ms(reset_in_ms);
        l->reset_at_ms[d] = reset_at;
    }
    if (remaining >= 0)
        apply_remaining(l, now_ms, d, remaining, reset_in_ms >= 0, reset_at);
    return changed;
}

/* ---------------------------------------------------------------- header names */

/* Length of lit when s[0..n) starts with it (any case), else 0. */
static size_t iprefix(const char *s, size_t n, const char *lit)
{
    size_t len = strlen(lit);
    return len <= n && strncasecmp(s, lit, len) == 0 ? len : 0;
}

static const char *const field_names[3] = { "limit", "remaining", "reset" };

typedef struct kind_name { const char *name; st_dim dim; } kind_name;

static const kind_name anthropic_kinds[] = {
    { "requests", ST_DIM_REQUESTS },
    { "tokens", ST_DIM_TOKENS },
    { "input-tokens", ST_DIM_INPUT_TOKENS },
    { "output-tokens", ST_DIM_OUTPUT_TOKENS },
};

static const kind_name openai_kinds[] = {
    { "requests", ST_DIM_REQUESTS },
    { "tokens", ST_DIM_TOKENS },
};

/* The entry of kinds (n of them) named s[0..len) in any case, or -1. */
static int kind_of(const kind_name *kinds, size_t n, const char *s, size_t len)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (strlen(kinds[i].name) == len && iprefix(s, len, kinds[i].name) == len)
            return (int)i;
    return -1;
}

static int field_of(const char *s, size_t len)
{
    int f;
    for (f = 0; f < 3; f++)
        if (strlen(field_names[f]) == len && iprefix(s, len, field_names[f]) == len)
            return f;
    return -1;
}

/* *aggregate marks Anthropic's tokens-* family, which st_limiter_feed_header skips.
 * Anthropic names are PREFIX KIND "-" FIELD (a kind may hold '-'), OpenAI's are
 * PREFIX FIELD "-" KIND: split at the last or the first '-', then match exactly. */
static int classify(const char *name, st_dim *dim, int *field, int *format, int *aggregate)
{
    size_t n, split;
    const char *rest;
    int a, f;

    if (name == NULL)
        return 0;
    n = strlen(name);
    if (n > 20 && iprefix(name, n, "anthropic-ratelimit-") == 20) {
        rest = name + 20;
        n -= 20;
        for (split = n; split > 0 && rest[split - 1] != '-'; split--)
            ;
        if (split < 2 || (f = field_of(rest + split, n - split)) < 0
            || (a = kind_of(anthropic_kinds, 4, rest, split - 1)) < 0)
            return 0;
        *dim = anthropic_kinds[a].dim;
        *field = f;
        *format = f == 2 ? 1 : 0;
        *aggregate = anthropic_kinds[a].dim == ST_DIM_TOKENS;
        return 1;
    }
    if (n > 12 && iprefix(name, n, "x-ratelimit-") == 12) {
        rest = name + 12;
        n -= 12;
        for (split = 0; split < n && rest[split] != '-'; split++)
            ;
        if (split == n || (f = field_of(rest, split)) < 0
            || (a = kind_of(openai_kinds, 2, rest + split + 1, n - split - 1)) < 0)
            return 0;
        *dim = openai_kinds[a].dim;
        *field = f;
        *format = f == 2 ? 2 : 0;
        *aggregate = 0;
        return 1;
    }
    return 0;
}

int st_ratelimit_header(const char *name, st_dim *dim, int *field, int *format)
{
    st_dim d;
    int fi, fo, ag;
    if (!classify(name, &d, &fi, &fo, &ag))
        return 0;
    if (dim)
        *dim = d;
    if (field)
        *field = fi;
    if (format)
        *format = fo;
    return 1;
}

/* ---------------------------------------------------------------- values */

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Exactly n digits at s[*i..len). */
static int fixed_digits(const char *s, size_t len, size_t *i, int n, int *v)
{
    int k, x = 0;
    if (len - *i < (size_t)n)
        return 0;
    for (k = 0; k < n; k++) {
        char ch = s[*i + (size_t)k];
        if (!is_digit(ch))
            return 0;
        x = x * 10 + (ch - '0');
    }
    *i += (size_t)n;
    *v = x;
    return 1;
}

/* One character of set at s[*i]. */
static int take(const char *s, size_t len, size_t *i, const char *set)
{
    const char *c;
    if (*i >= len)
        return 0;
    for (c = set; *c; c++)
        if (s[*i] == *c) {
            (*i)++;
            return 1;
        }
    return 0;
}

int st_rfc3339_parse(const char *s, size_t len, int64_t *epoch_ms)
{
    size_t i = 0;
    int y, mo, d, h, mi, sec, oh = 0, om = 0, sign = 0, frac = 0, k = 0, more = 0;
    int64_t secs;

    if (s == NULL)
        return 0;
    if (!(fixed_digits(s, len, &i, 4, &y) && take(s, len, &i, "-")
          && fixed_digits(s, len, &i, 2, &mo) && take(s, len, &i, "-")
          && fixed_digits(s, len, &i, 2, &d) && take(s, len, &i, "Tt ")
          && fixed_digits(s, len, &i, 2, &h) && take(s, len, &i, ":")
          && fixed_digits(s, len, &i, 2, &mi) && take(s, len, &i, ":")
          && fixed_digits(s, len, &i, 2, &sec)))
        return 0;
    if (i < len && s[i] == '.') {
        /* whole ms from the first three digits; anything finer rounds up */
        for (i++; i < len && is_digit(s[i]); i++, k++) {
            if (k < 3)
                frac = frac * 10 + (s[i] - '0');
            else
                more |= s[i] != '0';
        }
        if (k == 0)
            return 0;
        for (; k < 3; k++)
            frac *= 10;
        frac += more;
    }
    if (i >= len)
        return 0;
    if (s[i] == '+' || s[i] == '-') {
        sign = s[i++] == '+' ? 1 : -1;
        if (!(fixed_digits(s, len, &i, 2, &oh) && take(s, len, &i, ":")
              && fixed_digits(s, len, &i, 2, &om)))
            return 0;
    } else if (!take(s, len, &i, "Zz")) {
        return 0;
    }
    if (i != len || mo < 1 || mo > 12 || d < 1 || d > st_days_in_month(y, mo) || h > 23
        || mi > 59 || sec > 60 || oh > 23 || om > 59)
        return 0;
    secs = st_days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec
        - sign * (oh * 3600 + om * 60);
    *epoch_ms = secs * 1000 + frac;
    return 1;
}

/* The unit at s[*i..len) in ns, or 0. "ms" is tried before "m". */
static int64_t go_unit(const char *s, size_t len, size_t *i)
{
    static const struct { const char *name; int64_t ns; } units[] = {
        { "ns", 1 }, { "us", 1000 }, { "\xC2\xB5s", 1000 }, { "\xCE\xBCs", 1000 },
        { "ms", 1000000 }, { "s", INT64_C(1000000000) }, { "m", INT64_C(60000000000) },
        { "h", INT64_C(3600000000000) },
    };
    unsigned u;
    for (u = 0; u < sizeof units / sizeof units[0]; u++) {
        size_t k;
        for (k = 0; units[u].name[k] && *i + k < len && s[*i + k] == units[u].name[k]; k++)
            ;
        if (units[u].name[k] == '\0') {
            *i += k;
            return units[u].ns;
        }
    }
    return 0;
}

int st_go_duration_parse(const char *s, size_t len, int64_t *ms)
{
    size_t i = 0;
    int64_t total = 0;
    int inexact = 0;

    if (s == NULL || len == 0)
        return 0;
    if (s[0] == '+')
        i++;
    if (i == len)
        return 0;
    if (len - i == 1 && s[i] == '0') {     /* Go's one unit-less form */
        *ms = 0;
        return 1;
    }
    while (i < len) {
        int64_t ip = 0, fv = 0, scale = 1, unit, part;
        size_t nint = 0, nfrac = 0;

        for (; i < len && is_digit(s[i]); i++, nint++)
            if (ip <= MAX_SPAN_NS)      /* saturate: past the clamp the rest cannot matter */
                ip = ip * 10 + (s[i] - '0');
        if (i < len && s[i] == '.') {
            /* nine digits are a ns of a second; finer ones only make it inexact */
            for (i++; i < len && is_digit(s[i]); i++, nfrac++) {
                if (scale < INT64_C(1000000000)) {
                    fv = fv * 10 + (s[i] - '0');
                    scale *= 10;
                } else {
                    inexact |= s[i] != '0';
                }
            }
        }
        if (nint + nfrac == 0 || (unit = go_unit(s, len, &i)) == 0)
            return 0;
        if (ip > MAX_SPAN_NS / unit) {
            part = MAX_SPAN_NS;
        } else {
            /* fv * unit / scale without overflow: fv < scale, so fv * (unit / scale) < unit */
            int64_t q = unit / scale, r = unit % scale;
            part = ip * unit + fv * q + fv * r / scale;
            inexact |= (fv * r) % scale != 0;
        }
        total += part;
        if (total > MAX_SPAN_NS)
            total = MAX_SPAN_NS;
    }
    *ms = total / 1000000 + (total % 1000000 != 0 || inexact);
    if (*ms > ST_RATELIMIT_MAX_MS)
        *ms = ST_RATELIMIT_MAX_MS;
    return 1;
}

/* A count as providers send it: 1*DIGIT ["." *DIGIT] or "." 1*DIGIT. */
static int parse_number(const char *s, size_t len, double *out)
{
    size_t i = 0, n = 0;
    double v = 0, scale = 1;
    for (; i < len && is_digit(s[i]); i++, n++)
        if (v < AMOUNT_MAX)
            v = v * 10 + (s[i] - '0');
    if (i < len && s[i] == '.')
        for (i++; i < len && is_digit(s[i]); i++, n++)
            if (scale > 1e-12) {
                scale /= 10;
                v += (s[i] - '0') * scale;
            }
    if (n == 0 || i != len)
        return 0;
    *out = clamp_amount(v);
    return 1;
}

/* ---------------------------------------------------------------- feeding headers */

static void clear_pending(st_limiter *l, int d)
{
    l->pend_remaining[d] = -1;
    l->pend_has_reset[d] = 0;
}

int st_limiter_feed_header(st_limiter *l, int64_t now_ms, int64_t now_epoch_ms,
                           const char *name, const char *value)
{
    st_dim d;
    int field, format, aggregate;
    size_t a = 0, b = 0;
    double v;
    int64_t delay, when;

    if (l == NULL || value == NULL || !classify(name, &d, &field, &format, &aggregate)
        || aggregate)
        return 0;
    now_ms = clamp_now(now_ms);
    while (value[b])
        b++;
    while (a < b && (value[a] == ' ' || value[a] == '\t'))
        a++;
    while (b > a && (value[b - 1] == ' ' || value[b - 1] == '\t'))
        b--;

    if (field == 0)
        return parse_number(value + a, b - a, &v) && v > 0
            ? st_limiter_learn(l, now_ms, d, v, -1, -1) : 0;
    if (field == 1) {
        if (!parse_number(value + a, b - a, &v))
            return 0;
        l->pend_remaining[d] = v;
    } else {
        if (format == 1) {
            if (!st_rfc3339_parse(value + a, b - a, &when))
                return 0;
            /* when is within years 0..9999, now_epoch is clamped: no overflow */
            delay = clamp_span_ms(when - clamp_now(now_epoch_ms));
        } else if (!st_go_duration_parse(value + a, b - a, &delay)) {
            return 0;
        }
        l->pend_reset_at_ms[d] = now_ms + delay;
        l->pend_has_reset[d] = 1;
        l->reset_at_ms[d] = now_ms + delay;
    }
    if (l->pend_remaining[d] >= 0 && l->pend_has_reset[d]) {
        apply_remaining(l, now_ms, d, l->pend_remaining[d], 1, l->pend_reset_at_ms[d]);
        clear_pending(l, d);
    }
    return 0;
}

void st_limiter_response_done(st_limiter *l, int64_t now_ms)
{
    int d;
    now_ms = clamp_now(now_ms);
    for (d = 0; d < ST_DIM_COUNT; d++) {
        if (l->pend_remaining[d] >= 0)
            apply_remaining(l, now_ms, d, l->pend_remaining[d], 0, 0);
        clear_pending(l, d);
    }
}
