/* libFuzzer target for the rate-limit header parsers and the limiter they feed
 * (src/policy/ratelimit.c). The input is a script, one command per line:
 *   I c0 c1 c2 c3 burst now   st_limiter_init (configured limits per dimension)
 *   H name:value              st_limiter_feed_header at the current times
 *   D                         st_limiter_response_done
 *   T ms                      move the monotonic clock by ms (negative: backwards)
 *   E ms                      set the wall clock to the monotonic clock + ms
 *   W c0 c1 c2 c3             st_limiter_wait_ms with these costs (none: NULL)
 *   A c0 c1 c2 c3             st_limiter_acquire
 *   C dim delta               st_limiter_correct
 *   P ms                      st_limiter_pause_until(now + ms)
 *   L dim limit remaining reset_ms   st_limiter_learn
 *   R text / G text / N text  st_rfc3339_parse / st_go_duration_parse /
 *                             st_ratelimit_header alone
 *   S limit burst count seed  pacing of `count` requests on a fresh limiter
 *                             (the first 4 S lines of an input)
 * Numbers are strtod's (nan, inf, 1e300 included) or saturating decimal
 * integers. Anything else on a line is ignored. The limiter starts with nothing
 * configured at now = 0, wall clock 2025-11-25T12:00:00Z.
 *
 * Checked at every step: header names are classified exactly as a table
 * written here says; RFC 3339 and Go duration values agree with readings
 * written here (a duration within 1 ms of a long double sum, exactly when it
 * has no fraction); every value a parser returns is within its clamp. The
 * limiter's limits stay in [0, 1e12] and its GCRA consistent with them; waits
 * are never negative, and while the clock only moves forward never above the
 * pause or ST_RATELIMIT_MAX_MS; a wait is exact (at now + wait the request
 * passes, 1 ms earlier it does not); an acquire that must wait changes nothing;
 * paced requests never exceed the rate plus the burst over any window.
 * Values passed with a length are copied into buffers of exactly that length,
 * so reading past them is an ASan finding. Any difference aborts. */
#define _DEFAULT_SOURCE

#include "ratelimit.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NOW_LIMIT_MS INT64_C(1000000000000000)
#define MAX_MS ST_RATELIMIT_MAX_MS
#define DEFAULT_EPOCH_MS INT64_C(1764072000000)

static char *dup_bytes(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d == NULL)
        abort();
    if (n)
        memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* A copy of exactly n bytes, no terminator: reading past it is an ASan finding. */
static char *exact_copy(const char *s, size_t n)
{
    char *d = malloc(n ? n : 1);
    if (d == NULL)
        abort();
    if (n)
        memcpy(d, s, n);
    return d;
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* ---------------------------------------------------------------- header names */

static void check_name(const char *name)
{
    static const char *const a_kinds[] = { "requests", "tokens", "input-tokens", "output-tokens" };
    static const st_dim a_dims[] = {
        ST_DIM_REQUESTS, ST_DIM_TOKENS, ST_DIM_INPUT_TOKENS, ST_DIM_OUTPUT_TOKENS
    };
    static const char *const o_kinds[] = { "requests", "tokens" };
    static const st_dim o_dims[] = { ST_DIM_REQUESTS, ST_DIM_TOKENS };
    static const char *const fields[] = { "limit", "remaining", "reset" };
    char want[64];
    int found = 0, want_field = -1, want_format = -1, field = -7, format = -7, ok;
    st_dim want_dim = ST_DIM_COUNT, dim = ST_DIM_COUNT;
    unsigned k, f;

    for (k = 0; k < 4; k++)
        for (f = 0; f < 3; f++) {
            strcpy(want, "anthropic-ratelimit-");
            strcat(want, a_kinds[k]);
            strcat(want, "-");
            strcat(want, fields[f]);
            if (strcasecmp(name, want) == 0) {
                found = 1;
                want_dim = a_dims[k];
                want_field = (int)f;
                want_format = f == 2 ? 1 : 0;
            }
        }
    for (k = 0; k < 2; k++)
        for (f = 0; f < 3; f++) {
            strcpy(want, "x-ratelimit-");
            strcat(want, fields[f]);
            strcat(want, "-");
            strcat(want, o_kinds[k]);
            if (strcasecmp(name, want) == 0) {
                found = 1;
                want_dim = o_dims[k];
                want_field = (int)f;
                want_format = f == 2 ? 2 : 0;
            }
        }
    ok = st_ratelimit_header(name, &dim, &field, &format);
    if (ok != found)
        abort();
    if (ok && (dim != want_dim || field != want_field || format != want_format))
        abort();
    if (!ok && (dim != ST_DIM_COUNT || field != -7 || format != -7))
        abort();
    if (st_ratelimit_header(name, NULL, NULL, NULL) != ok)
        abort();
}

/* ---------------------------------------------------------------- RFC 3339 */

static int fixed(const char *s, size_t n, size_t *i, int width, int *v)
{
    int k;
    *v = 0;
    if (n - *i < (size_t)width)
        return 0;
    for (k = 0; k < width; k++) {
        if (!is_digit(s[*i]))
            return 0;
        *v = *v * 10 + (s[(*i)++] - '0');
    }
    return 1;
}

static int at(const char *s, size_t n, size_t *i, const char *set)
{
    if (*i >= n || s[*i] == '\0' || strchr(set, s[*i]) == NULL)
        return 0;
    (*i)++;
    return 1;
}

/* The grammar read independently; the instant from the C library's timegm. */
static int ref_rfc3339(const char *s, size_t n, int64_t *ms)
{
    static const int mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    size_t i = 0;
    int y, mo, d, h, mi, sec, oh = 0, om = 0, sign = 0, leap, frac = 0, digits = 0, more = 0;
    struct tm tm;

    if (!(fixed(s, n, &i, 4, &y) && at(s, n, &i, "-") && fixed(s, n, &i, 2, &mo)
          && at(s, n, &i, "-") && fixed(s, n, &i, 2, &d) && at(s, n, &i, "Tt ")
          && fixed(s, n, &i, 2, &h) && at(s, n, &i, ":") && fixed(s, n, &i, 2, &mi)
          && at(s, n, &i, ":") && fixed(s, n, &i, 2, &sec)))
        return 0;
    if (i < n && s[i] == '.') {
        for (i++; i < n && is_digit(s[i]); i++, digits++) {
            if (digits < 3)
                frac = frac * 10 + (s[i] - '0');
            else if (s[i] != '0')
                more = 1;
        }
        if (digits == 0)
            return 0;
        for (; digits < 3; digits++)
            frac *= 10;
    }
    if (at(s, n, &i, "+-")) {
        sign = s[i - 1] == '+' ? 1 : -1;
        if (!(fixed(s, n, &i, 2, &oh) && at(s, n, &i, ":") && fixed(s, n, &i, 2, &om)))
            return 0;
    } else if (!at(s, n, &i, "Zz")) {
        return 0;
    }
    leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (i != n || mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] + (mo == 2 && leap) || h > 23
        || mi > 59 || sec > 60 || oh > 23 || om > 59)
        return 0;
    memset(&tm, 0, sizeof tm);
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    *ms = ((int64_t)timegm(&tm) - sign * (oh * 3600 + om * 60)) * 1000 + frac + more;
    return 1;
}

static void check_rfc3339(const char *s, size_t n)
{
    char *copy = exact_copy(s, n);
    int64_t got = -1, want = -1;
    int ok = st_rfc3339_parse(copy, n, &got), rok = ref_rfc3339(s, n, &want);
    free(copy);
    if (ok != rok || (ok && got != want))
        abort();
}

/* ---------------------------------------------------------------- Go durations */

/* The grammar read independently, the value summed in long double ns. */
static int ref_go(const char *s, size_t n, long double *ns, int *has_fraction)
{
    static const struct { const char *u; long double ns; } units[] = {
        { "ns", 1 }, { "us", 1e3L }, { "\xC2\xB5s", 1e3L }, { "\xCE\xBCs", 1e3L },
        { "ms", 1e6L }, { "h", 3.6e12L }, { "m", 6e10L }, { "s", 1e9L },
    };
    size_t i = 0;
    *ns = 0;
    *has_fraction = 0;
    if (n > 0 && s[0] == '+')
        i = 1;
    if (i == n)
        return 0;
    if (n - i == 1 && s[i] == '0')
        return 1;
    while (i < n) {
        long double v = 0, scale = 1;
        size_t digits = 0, u, k;
        int matched = 0;
        for (; i < n && is_digit(s[i]); i++, digits++)
            v = v * 10 + (s[i] - '0');
        if (i < n && s[i] == '.') {
            *has_fraction = 1;
            for (i++; i < n && is_digit(s[i]); i++, digits++) {
                scale /= 10;
                v += (s[i] - '0') * scale;
            }
        }
        if (digits == 0)
            return 0;
        /* the longest unit that matches: "ms" before "m", "m" only when not "ms" */
        for (u = 0; u < sizeof units / sizeof units[0] && !matched; u++) {
            k = strlen(units[u].u);
            if (n - i >= k && memcmp(s + i, units[u].u, k) == 0) {
                *ns += v * units[u].ns;
                i += k;
                matched = 1;
            }
        }
        if (!matched)
            return 0;
    }
    return 1;
}

/* A decimal without fraction: the exact ms, saturating; -1 when not that form. */
static int64_t exact_go_ms(const char *s, size_t n)
{
    static const struct { const char *u; int64_t ns; } units[] = {
        { "ns", 1 }, { "us", 1000 }, { "\xC2\xB5s", 1000 }, { "\xCE\xBCs", 1000 },
        { "ms", 1000000 }, { "h", INT64_C(3600000000000) }, { "m", INT64_C(60000000000) },
        { "s", 1000000000 },
    };
    const int64_t cap_ns = MAX_MS * 1000000;
    int64_t total = 0;
    size_t i = 0;
    if (n > 0 && s[0] == '+')
        i = 1;
    if (n - i == 1 && s[i] == '0')
        return 0;
    while (i < n) {
        int64_t v = 0;
        size_t u, k;
        int matched = 0;
        for (; i < n && is_digit(s[i]); i++)
            if (v <= cap_ns)
                v = v * 10 + (s[i] - '0');
        for (u = 0; u < sizeof units / sizeof units[0] && !matched; u++) {
            k = strlen(units[u].u);
            if (n - i >= k && memcmp(s + i, units[u].u, k) == 0) {
                total += v > cap_ns / units[u].ns ? cap_ns : v * units[u].ns;
                if (total > cap_ns)
                    total = cap_ns;
                i += k;
                matched = 1;
            }
        }
        if (!matched)
            return -1;
    }
    return total / 1000000 + (total % 1000000 != 0);
}

static void check_go(const char *s, size_t n)
{
    char *copy = exact_copy(s, n);
    int64_t got = -1, want;
    long double ns, want_ms;
    int fraction, ok = st_go_duration_parse(copy, n, &got), rok = ref_go(s, n, &ns, &fraction);

    free(copy);
    if (ok != rok)
        abort();
    if (!ok)
        return;
    if (got < 0 || got > MAX_MS)
        abort();
    want_ms = ns / 1e6L;
    if (want_ms >= (long double)MAX_MS) {
        want = MAX_MS;
    } else {
        want = (int64_t)want_ms;
        if ((long double)want < want_ms)
            want++;
    }
    if (got > want + 1 || got < want - 1)
        abort();
    if (!fraction && got != exact_go_ms(s, n))
        abort();
}

/* ---------------------------------------------------------------- the limiter */

typedef struct run {
    st_limiter l;
    int64_t now, epoch_off;
    int backwards;   /* the clock went back: the wait bound no longer applies */
    int pacings;     /* S commands run: at most 4 per input, each is O(count^2) */
} run;

static int64_t sat_add(int64_t a, int64_t b)
{
    if (b > 0 && a > INT64_MAX - b)
        return INT64_MAX;
    if (b < 0 && a < INT64_MIN - b)
        return INT64_MIN;
    return a + b;
}

static int64_t clamp_now(int64_t ms)
{
    return ms < -NOW_LIMIT_MS ? -NOW_LIMIT_MS : ms > NOW_LIMIT_MS ? NOW_LIMIT_MS : ms;
}

static void check_wait(const run *r, const double *cost)
{
    st_limiter copy;
    int64_t now = clamp_now(r->now), w = st_limiter_wait_ms(&r->l, r->now, cost), bound;

    memcpy(&copy, &r->l, sizeof copy);
    if (w < 0)
        abort();
    if (!r->backwards) {
        bound = r->l.paused_until_ms - now;
        if (bound < MAX_MS)
            bound = MAX_MS;
        if (w > bound + 1)
            abort();
    }
    if (w > 0 && now + w <= NOW_LIMIT_MS) {
        if (st_limiter_wait_ms(&r->l, now + w, cost) != 0)
            abort();
        if (st_limiter_wait_ms(&r->l, now + w - 1, cost) == 0)
            abort();
    }
    /* an acquire that has to wait takes nothing */
    if (w > 0 && (st_limiter_acquire(&copy, r->now, cost) != w || memcmp(&copy, &r->l, sizeof copy) != 0))
        abort();
}

static void check_state(const run *r)
{
    static const double one[ST_DIM_COUNT] = { 1, 0, 0, 0 };
    static const double heavy[ST_DIM_COUNT] = { 1, 1e6, 1e6, 2e6 };
    const st_limiter *l = &r->l;
    int d;

    for (d = 0; d < ST_DIM_COUNT; d++) {
        const st_gcra *g = &l->dims[d];
        double lim = st_limiter_limit(l, (st_dim)d);
        if (!(lim >= 0 && lim <= 1e12) || g->per_min != lim)
            abort();
        /* a tiny positive limit makes the interval infinite: allowed, never NaN */
        if (lim > 0 && !(g->interval_us > 0 && g->burst >= 1
                         && g->burst_us >= 0 && g->burst_us <= MAX_MS * 1000))
            abort();
        if (!(l->hold_left[d] == -1 || (l->hold_left[d] >= 0 && l->hold_left[d] <= 1e12)))
            abort();
        if (l->pend_remaining[d] != -1 && !(l->pend_remaining[d] >= 0 && l->pend_remaining[d] <= 1e12))
            abort();
    }
    if (l->paused_until_ms < -NOW_LIMIT_MS || l->paused_until_ms > NOW_LIMIT_MS)
        abort();
    if (st_limiter_known(l) != (st_limiter_limit(l, ST_DIM_REQUESTS) > 0))
        abort();
    check_wait(r, NULL);
    check_wait(r, one);
    check_wait(r, heavy);
}

/* Pacing, black-box: a fresh limiter with one configured limit on the requests
 * and tokens dimensions; `count` requests, each started as soon as the limiter
 * allows it (plus a seeded extra delay), with seeded token costs, some above
 * the burst. Over every window [t_i, t_j] the units that passed may not exceed
 * limit * W / 60 + max(B, the largest cost in the window), as the header says. */
#define PACE_MAX 200

static void check_pacing(double limit, double burst_s, int64_t count, uint32_t seed)
{
    static int64_t t[PACE_MAX];
    static double cost[PACE_MAX][2];
    double conf[ST_DIM_COUNT] = { 0, 0, 0, 0 }, b, c[ST_DIM_COUNT] = { 1, 0, 0, 0 };
    st_limiter l;
    int64_t now = 0;
    int i, j, n, d;

    if (!(limit >= 1 && limit <= 1e6) || !(burst_s >= 0.001 && burst_s <= 60) || count < 1)
        return;
    n = count > PACE_MAX ? PACE_MAX : (int)count;
    conf[ST_DIM_REQUESTS] = limit;
    conf[ST_DIM_TOKENS] = limit;
    st_limiter_init(&l, conf, burst_s, now);
    b = burst_s * limit / 60 < 1 ? 1 : burst_s * limit / 60;
    for (i = 0; i < n; i++) {
        int64_t w;
        seed = seed * 1103515245u + 12345u;
        switch ((seed >> 16) & 3) {
        case 0: c[ST_DIM_TOKENS] = 0; break;
        case 1: c[ST_DIM_TOKENS] = 1; break;
        case 2: c[ST_DIM_TOKENS] = (double)((seed >> 18) & 1023) / 64; break;
        default: c[ST_DIM_TOKENS] = b * (1 + (double)((seed >> 20) & 7)); break;
        }
        w = st_limiter_wait_ms(&l, now, c);
        if (w < 0)
            abort();
        now += w + ((seed >> 24) & 1 ? (int64_t)((seed >> 25) & 15) : 0);
        if (st_limiter_acquire(&l, now, c) != 0)
            abort();
        t[i] = now;
        cost[i][0] = 1;
        cost[i][1] = c[ST_DIM_TOKENS];
    }
    for (d = 0; d < 2; d++)
        for (i = 0; i < n; i++) {
            double sum = 0, biggest = b;
            for (j = i; j < n; j++) {
                double allowed;
                sum += cost[j][d];
                if (cost[j][d] > biggest)
                    biggest = cost[j][d];
                allowed = limit * (double)(t[j] - t[i]) / 60000.0 + biggest;
                if (sum > allowed * (1 + 1e-12) + 1e-9)
                    abort();
            }
        }
}

/* ---------------------------------------------------------------- script */

typedef struct words {
    const char *s;
    size_t n, i;
} words;

/* The next space-separated word, as a NUL-terminated copy (caller frees), or NULL. */
static char *next_word(words *w)
{
    size_t start;
    while (w->i < w->n && w->s[w->i] == ' ')
        w->i++;
    if (w->i >= w->n)
        return NULL;
    start = w->i;
    while (w->i < w->n && w->s[w->i] != ' ')
        w->i++;
    return dup_bytes(w->s + start, w->i - start);
}

static double word_double(words *w, double dflt)
{
    char *t = next_word(w);
    double v = dflt;
    if (t) {
        v = strtod(t, NULL);
        free(t);
    }
    return v;
}

static int64_t word_int(words *w, int64_t dflt)
{
    char *t = next_word(w), *p;
    int64_t v = 0;
    int neg;
    if (t == NULL)
        return dflt;
    p = t;
    neg = *p == '-';
    if (*p == '-' || *p == '+')
        p++;
    for (; is_digit(*p); p++) {
        int dg = *p - '0';
        if (neg)
            v = v < (INT64_MIN + dg) / 10 ? INT64_MIN : v * 10 - dg;
        else
            v = v > (INT64_MAX - dg) / 10 ? INT64_MAX : v * 10 + dg;
    }
    free(t);
    return v;
}

/* Costs from up to four words; returns cost, or NULL when the line has none. */
static const double *word_costs(words *w, double cost[ST_DIM_COUNT])
{
    int d;
    size_t before = w->i;
    for (d = 0; d < ST_DIM_COUNT; d++)
        cost[d] = word_double(w, 0);
    return w->i == before ? NULL : cost;
}

static st_dim word_dim(words *w)
{
    /* out-of-range dimensions are part of the contract too */
    return (st_dim)(int)word_int(w, 0);
}

static void command(run *r, const char *line, size_t n)
{
    words w;
    double cost[ST_DIM_COUNT];
    const double *c;
    char op;

    if (n == 0)
        return;
    op = line[0];
    w.s = line + 1;
    w.n = n - 1;
    w.i = 0;
    if (n >= 2 && (op == 'R' || op == 'G' || op == 'N' || op == 'H')) {
        /* the rest after one space, verbatim */
        const char *t = line + 2;
        size_t tn = n - 2;
        if (op == 'R') {
            check_rfc3339(t, tn);
        } else if (op == 'G') {
            check_go(t, tn);
        } else {
            const char *colon = memchr(t, ':', tn);
            size_t nn = colon ? (size_t)(colon - t) : tn;
            char *name = dup_bytes(t, nn), *value = colon ? dup_bytes(colon + 1, tn - nn - 1) : NULL;
            check_name(name);
            if (op == 'H' && value) {
                int64_t epoch = sat_add(r->now, r->epoch_off);
                /* the parsers see the value as the limiter will, trimmed */
                size_t a = 0, b = strlen(value);
                while (a < b && (value[a] == ' ' || value[a] == '\t'))
                    a++;
                while (b > a && (value[b - 1] == ' ' || value[b - 1] == '\t'))
                    b--;
                check_rfc3339(value + a, b - a);
                check_go(value + a, b - a);
                (void)st_limiter_feed_header(&r->l, r->now, epoch, name, value);
            }
            free(name);
            free(value);
        }
        return;
    }
    switch (op) {
    case 'I': {
        double conf[ST_DIM_COUNT], burst;
        int d;
        for (d = 0; d < ST_DIM_COUNT; d++)
            conf[d] = word_double(&w, 0);
        burst = word_double(&w, 1);
        r->now = word_int(&w, 0);
        r->backwards = 0;
        st_limiter_init(&r->l, conf, burst, r->now);
        break;
    }
    case 'D':
        st_limiter_response_done(&r->l, r->now);
        break;
    case 'S': {
        double limit = word_double(&w, 0), burst = word_double(&w, 1);
        int64_t count = word_int(&w, 0);
        if (r->pacings++ < 4)
            check_pacing(limit, burst, count, (uint32_t)word_int(&w, 0));
        return;
    }
    case 'T': {
        int64_t dt = word_int(&w, 1);
        if (dt < 0)
            r->backwards = 1;
        r->now = sat_add(r->now, dt);
        break;
    }
    case 'E':
        r->epoch_off = word_int(&w, 0);
        break;
    case 'W':
        c = word_costs(&w, cost);
        check_wait(r, c);
        break;
    case 'A': {
        int64_t before, got;
        c = word_costs(&w, cost);
        before = st_limiter_wait_ms(&r->l, r->now, c);
        got = st_limiter_acquire(&r->l, r->now, c);
        if (got != before || got < 0)
            abort();
        break;
    }
    case 'C': {
        st_dim d = word_dim(&w);
        st_limiter_correct(&r->l, r->now, d, word_double(&w, 0));
        break;
    }
    case 'P':
        st_limiter_pause_until(&r->l, sat_add(r->now, word_int(&w, 0)));
        break;
    case 'L': {
        st_dim d = word_dim(&w);
        double limit = word_double(&w, 0), remaining = word_double(&w, -1);
        int64_t reset = word_int(&w, -1);
        (void)st_limiter_learn(&r->l, r->now, d, limit, remaining, reset);
        break;
    }
    default:
        return;
    }
    check_state(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    size_t start = 0, i;
    run r;

    memset(&r, 0, sizeof r);
    st_limiter_init(&r.l, NULL, 0, 0);
    r.epoch_off = DEFAULT_EPOCH_MS;
    for (i = 0; i <= size; i++) {
        if (i == size || s[i] == '\n') {
            command(&r, s + start, i - start);
            start = i + 1;
        }
    }
    check_state(&r);
    return 0;
}
