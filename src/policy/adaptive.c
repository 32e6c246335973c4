#include "adaptive.h"

#include <math.h>
#include <stddef.h>

#define Z 2.0               /* standard errors a window mean is given before it counts */
#define NOT_OURS 0.9        /* a mean still this close to the run's first is not ours */
#define RESOLUTION 1.0      /* ms: latencies are whole milliseconds */

void st_adaptive_config_defaults(st_adaptive_config *c)
{
    c->min_limit = 1;
    c->max_limit = 1000;
    c->initial_limit = 20;
    c->window_ms = 1000;
    c->min_samples = 20;
    c->tolerance = 0.1;
    c->growth = 0.05;
}

static double whole_limit(double x)
{
    return x > ST_ADAPTIVE_MAX_LIMIT ? ST_ADAPTIVE_MAX_LIMIT : floor(x);
}

static void normalise(st_adaptive_config *c)
{
    st_adaptive_config d;
    st_adaptive_config_defaults(&d);
    c->min_limit = !(c->min_limit >= 1) ? 1 : whole_limit(c->min_limit);
    c->max_limit = c->max_limit != c->max_limit ? d.max_limit : whole_limit(c->max_limit);
    if (c->max_limit < c->min_limit)
        c->max_limit = c->min_limit;
    if (c->initial_limit != c->initial_limit)
        c->initial_limit = d.initial_limit;
    if (c->initial_limit < c->min_limit)
        c->initial_limit = c->min_limit;
    if (c->initial_limit > c->max_limit)
        c->initial_limit = c->max_limit;
    if (c->window_ms < 1)
        c->window_ms = d.window_ms;
    if (c->window_ms > ST_ADAPTIVE_MAX_WINDOW_MS)
        c->window_ms = ST_ADAPTIVE_MAX_WINDOW_MS;
    if (c->min_samples == 0)
        c->min_samples = d.min_samples;
    if (c->min_samples < 2)
        c->min_samples = 2;
    if (c->min_samples > ST_ADAPTIVE_MAX_SAMPLES)
        c->min_samples = ST_ADAPTIVE_MAX_SAMPLES;
    if (!(c->tolerance >= 0))
        c->tolerance = d.tolerance;
    if (c->tolerance > 10)
        c->tolerance = 10;
    if (!(c->growth > 0))
        c->growth = d.growth;
    if (c->growth > 1)
        c->growth = 1;
}

static st_adaptive_window *slot(st_adaptive *a, uint32_t serial)
{
    return &a->win[serial % ST_ADAPTIVE_WINDOWS];
}

static void open_window(st_adaptive *a, uint32_t serial, int64_t now)
{
    st_adaptive_window *w = slot(a, serial);
    w->serial = serial;
    w->start_ms = now;
    w->started = w->out = w->n = w->overloads = 0;
    w->mean = w->m2 = w->out_offset = 0;
    w->tested = 0;
}

void st_adaptive_init(st_adaptive *a, const st_adaptive_config *c, int64_t now_ms)
{
    if (c != NULL)
        a->cfg = *c;
    else
        st_adaptive_config_defaults(&a->cfg);
    normalise(&a->cfg);
    a->limit = a->cfg.initial_limit;
    a->last_ms = now_ms;
    a->changed_ms = now_ms;
    a->in_flight = 0;
    a->oldest = a->head = 1;
    open_window(a, 1, now_ms);
    a->n_candidates = 0;
    a->baseline = -1;
    a->run_limit = a->run_mean = 0;
    a->slow_start = 1;
    a->windows = a->grows = a->shrinks_latency = a->shrinks_overload = 0;
    a->baseline_resets = a->forced = 0;
}

unsigned st_adaptive_limit(const st_adaptive *a)
{
    return (unsigned)a->limit;
}

/* now - since for now >= since, exact even when the two are far apart in sign. */
static double elapsed(int64_t now, int64_t since)
{
    return (double)((uint64_t)now - (uint64_t)since);
}

static int64_t clock_of(st_adaptive *a, int64_t now_ms)
{
    if (now_ms > a->last_ms)
        a->last_ms = now_ms;
    return a->last_ms;
}

/* Adds k values of mean m (and no spread among them) to the window's samples:
 * Chan et al.'s merge of two groups, so a forced close is O(1). */
static void add_samples(st_adaptive_window *w, double k, double m)
{
    double n = (double)w->n, total = n + k, d = m - w->mean;
    w->mean += d * k / total;
    w->m2 += d * d * n * k / total;
    w->n += (uint32_t)k;
}

static void offer_candidate(st_adaptive *a, double cand)
{
    uint32_t k, n;
    double best = cand;

    a->candidates[a->n_candidates % ST_ADAPTIVE_BASELINE] = cand;
    a->n_candidates++;
    n = a->n_candidates < ST_ADAPTIVE_BASELINE ? a->n_candidates : ST_ADAPTIVE_BASELINE;
    for (k = 0; k < n; k++)
        if (a->candidates[k] < best)
            best = a->candidates[k];
    a->baseline = best;
}

static void set_limit(st_adaptive *a, int64_t now, double limit)
{
    unsigned before = st_adaptive_limit(a);
    if (limit < a->cfg.min_limit)
        limit = a->cfg.min_limit;
    if (limit > a->cfg.max_limit)
        limit = a->cfg.max_limit;
    a->limit = limit;
    if (st_adaptive_limit(a) != before)
        a->changed_ms = now;
}

static void decide(st_adaptive *a, int64_t now, const st_adaptive_window *w, double se)
{
    int inflated = w->n >= 2 && a->baseline >= 0 &&
                   w->mean - Z * se > a->baseline * (1 + a->cfg.tolerance) + RESOLUTION;

    if (!inflated)
        a->run_limit = a->run_mean = 0;
    if (w->overloads > 0) {
        double share = (double)w->overloads / ((double)w->overloads + (double)w->n);
        a->shrinks_overload++;
        a->slow_start = 0;
        set_limit(a, now, a->limit * (share > 0.5 ? 0.5 : 1 - share));
    } else if (inflated) {
        double g = a->baseline / w->mean;
        if (a->run_limit == 0) {
            a->run_limit = a->limit;
            a->run_mean = w->mean;
        } else if ((a->limit <= a->run_limit * 0.5 || a->limit <= a->cfg.min_limit) &&
                   w->mean >= NOT_OURS * a->run_mean) {
            /* shrinking did not bring latency down: the upstream is slower for
             * everyone, so this is the best it does now */
            a->n_candidates = 0;
            offer_candidate(a, w->mean + Z * se);
            a->run_limit = a->run_mean = 0;
            a->baseline_resets++;
            return;
        }
        a->shrinks_latency++;
        a->slow_start = 0;
        set_limit(a, now, a->limit * (g < 0.5 ? 0.5 : g));
    } else if (w->tested) {
        double step = a->limit * (a->slow_start ? ST_ADAPTIVE_SLOW_START : a->cfg.growth);
        a->grows++;
        set_limit(a, now, a->limit + (step < 1 ? 1 : step));
    }
}

/* Judges the oldest open window; its calls still out count at their age. */
static void close_oldest(st_adaptive *a, int64_t now)
{
    st_adaptive_window *w = slot(a, a->oldest);
    double se = 0;

    if (w->out > 0) {
        double age = elapsed(now, w->start_ms) - w->out_offset / (double)w->out;
        add_samples(w, (double)w->out, age);
        a->in_flight -= w->out;
        w->out = 0;
        a->forced++;
    }
    a->oldest++;
    a->windows++;
    if (w->n >= 2)
        se = sqrt(w->m2 / (double)(w->n - 1) / (double)w->n);
    if (w->n >= a->cfg.min_samples)
        offer_candidate(a, w->mean + Z * se);
    if (w->start_ms >= a->changed_ms && w->n + w->overloads >= a->cfg.min_samples)
        decide(a, now, w, se);
}

/* Judges, in order, the windows that no longer take starts and have all come back. */
static void settle(st_adaptive *a, int64_t now)
{
    while (a->oldest != a->head && slot(a, a->oldest)->out == 0)
        close_oldest(a, now);
}

void st_adaptive_start(st_adaptive *a, int64_t now_ms, st_adaptive_ticket *t)
{
    int64_t now = clock_of(a, now_ms);
    st_adaptive_window *w = slot(a, a->head);
    double age = elapsed(now, w->start_ms);

    if (w->started >= a->cfg.min_samples && age >= (double)a->cfg.window_ms && age >= a->baseline / 2) {
        if (a->head - a->oldest + 1 >= ST_ADAPTIVE_WINDOWS)
            close_oldest(a, now);
        a->head++;
        open_window(a, a->head, now);
        settle(a, now);
        w = slot(a, a->head);
    }
    w->started++;
    w->out++;
    w->out_offset += elapsed(now, w->start_ms);
    a->in_flight++;
    if (a->in_flight >= st_adaptive_limit(a))
        w->tested = 1;
    t->window = a->head;
    t->start_ms = now;
    t->valid = 1;
}

void st_adaptive_done(st_adaptive *a, int64_t now_ms, st_adaptive_ticket *t, int64_t latency_ms,
                      st_class cls)
{
    int64_t now = clock_of(a, now_ms);
    st_adaptive_window *w;

    if (!t->valid)
        return;
    t->valid = 0;
    /* unsigned distance: a ticket of a window already judged lands outside */
    if (t->window - a->oldest > a->head - a->oldest)
        return;
    w = slot(a, t->window);
    if (w->out == 0)
        return;
    w->out--;
    w->out_offset -= elapsed(t->start_ms, w->start_ms);
    a->in_flight--;
    if (latency_ms < 0)
        latency_ms = 0;
    if (latency_ms > ST_ADAPTIVE_MAX_LATENCY_MS)
        latency_ms = ST_ADAPTIVE_MAX_LATENCY_MS;
    if (cls == ST_CLASS_OVERLOADED)
        w->overloads++;
    else if (cls == ST_CLASS_SUCCESS || cls == ST_CLASS_TIMEOUT)
        add_samples(w, 1, (double)latency_ms);
    settle(a, now);
}

void st_adaptive_stats_get(const st_adaptive *a, st_adaptive_stats *out)
{
    out->limit = st_adaptive_limit(a);
    out->baseline_ms = a->baseline;
    out->in_flight = a->in_flight;
    out->windows = a->windows;
    out->grows = a->grows;
    out->shrinks_latency = a->shrinks_latency;
    out->shrinks_overload = a->shrinks_overload;
    out->baseline_resets = a->baseline_resets;
    out->forced = a->forced;
}
