/* Adaptive concurrency per upstream key: the in-flight limit follows the latency
 * the key sees against its best recent latency, in the spirit of TCP Vegas,
 * Netflix's concurrency-limits (Vegas, Gradient2) and Envoy's adaptive
 * concurrency filter. Pure: time is passed in; no allocation, no clock reads.
 *
 * Calls. The caller asks st_adaptive_start when a call is sent (it gets a
 * ticket) and st_adaptive_done when it ends, with the latency it wants judged
 * (time to first byte is the better signal for LLM calls: total time grows with
 * the length of the answer, not with the upstream's load) and its class:
 *   success, timeout   a latency sample (a timeout's latency is a lower bound of
 *                      the real one, so it can only understate inflation)
 *   overloaded         an overload (529, 503): the upstream says it is full
 *   anything else      no sample: a 429 is about quota (the rate limiter's job),
 *                      other errors and cancellations say nothing of latency and
 *                      their durations would mislead. The call only stops counting.
 * The limit is only advice: the caller keeps in flight at most st_adaptive_limit().
 *
 * Windows. A window is the set of calls *started* during it, and it is judged
 * only when every one of them has come back. Judging calls by when they finish
 * would see the fast ones first after a burst or a change, and a baseline built
 * on those is too low. A window takes starts until it has min_samples of them and
 * is at least window_ms and half a baseline latency old (so that the
 * ST_ADAPTIVE_WINDOWS open windows span a few latencies); the next start opens a
 * new one. When a new window needs a slot and all ST_ADAPTIVE_WINDOWS are open,
 * the oldest is judged at once, its calls still out counted at their age so far;
 * their tickets go stale. Windows are judged in the order they opened.
 *
 * Baseline. Each window with at least min_samples latency samples offers
 * mean + 2 * standard error as a candidate; the baseline is the lowest candidate
 * of the last ST_ADAPTIVE_BASELINE windows. The standard error makes a window of
 * noisy samples a cautious candidate.
 *
 * Decisions. A window decides only if it started at or after the last change of
 * the limit (calls sent under an older limit say nothing about this one) and
 * holds at least min_samples samples and overloads. Then, in this order:
 *   1. overloads: limit *= 1 - share, share = overloads / (overloads + samples),
 *      at most halving it. Sporadic 529s cost little, a cliff costs a lot.
 *   2. inflated, i.e. mean - 2 * standard error > baseline * (1 + tolerance) + 1
 *      (the 1 ms is the samples' resolution: a sub-millisecond upstream's
 *      baseline of 0 is not inflated by a sample of 1):
 *      limit *= baseline / mean, at most halving it. Past the knee latency grows
 *      with concurrency, so this lands at or below the knee, and the windows
 *      there renew the baseline.
 *      If a run of such shrinks has halved the limit (or reached min_limit) and
 *      the mean is still at least 0.9 of the mean that began the run, the
 *      latency is not ours: the upstream got slower for everyone. The baseline
 *      is then replaced by this window's candidate and the limit is kept.
 *   3. a call of the window was started with the limit in use (in flight >=
 *      limit): limit += max(1, limit * g), g = 0.25 until the first shrink
 *      (slow start), then growth.
 *   4. otherwise the key is not using its limit: nothing changes, so an idle key
 *      does not drift to max_limit.
 * The limit is kept as a real number in [min_limit, max_limit];
 * st_adaptive_limit() is its integer part. Only a change of that integer counts
 * as a change for the rule above.
 *
 * Tickets. done with a ticket already done, never started, or stale is ignored,
 * so reporting twice is harmless. A ticket that is never returned is counted at
 * its age when its window is forced out, so a lost ticket never wedges anything.
 * Time that goes backwards is taken as the latest time seen. Latencies below 0
 * count as 0, above ST_ADAPTIVE_MAX_LATENCY_MS as that.
 *
 * Config values are normalised: min_limit NaN or below 1 -> 1, max_limit NaN ->
 * 1000; both above ST_ADAPTIVE_MAX_LIMIT -> that, fractions dropped, max_limit
 * below min_limit -> min_limit; initial_limit NaN -> 20, then clamped into
 * [min_limit, max_limit]; window_ms below 1 -> 1000, above ST_ADAPTIVE_MAX_WINDOW_MS
 * -> that; min_samples 0 -> 20, 1 -> 2, above ST_ADAPTIVE_MAX_SAMPLES -> that;
 * tolerance NaN or below 0 -> 0.1, above 10 -> 10; growth NaN or not above 0 ->
 * 0.05, above 1 -> 1.
 *
 * Cost: start and done are O(1); judging a window (once per window) is
 * O(ST_ADAPTIVE_BASELINE). */
#ifndef STURDY_ADAPTIVE_H
#define STURDY_ADAPTIVE_H

#include <stdint.h>

#include "outcome.h"

#define ST_ADAPTIVE_WINDOWS 8
#define ST_ADAPTIVE_BASELINE 64
#define ST_ADAPTIVE_MAX_LIMIT 1000000.0
#define ST_ADAPTIVE_MAX_WINDOW_MS ((int64_t)3600000)
#define ST_ADAPTIVE_MAX_SAMPLES 100000u
#define ST_ADAPTIVE_MAX_LATENCY_MS ((int64_t)86400000)
#define ST_ADAPTIVE_SLOW_START 0.25

typedef struct st_adaptive_config {
    double min_limit;        /* default 1 */
    double max_limit;        /* default 1000 */
    double initial_limit;    /* default 20 */
    int64_t window_ms;       /* shortest window, default 1000 */
    unsigned min_samples;    /* calls a window needs to decide, default 20 */
    double tolerance;        /* latency above the baseline that is not yet a queue, default 0.1 */
    double growth;           /* share the limit grows by per clean window after slow start, default 0.05 */
} st_adaptive_config;

void st_adaptive_config_defaults(st_adaptive_config *c);

/* One call in flight; filled by st_adaptive_start. */
typedef struct st_adaptive_ticket {
    uint32_t window;         /* serial of the window it was started in */
    int64_t start_ms;
    unsigned char valid;
} st_adaptive_ticket;

typedef struct st_adaptive_window {
    uint32_t serial;
    int64_t start_ms;
    uint32_t started, out;   /* calls started in it; still out */
    uint32_t n, overloads;   /* latency samples; overloaded replies */
    double mean, m2;         /* of the samples (Welford) */
    double out_offset;       /* sum of (start - start_ms) of the calls still out */
    unsigned char tested;    /* a call was started with the limit in use */
} st_adaptive_window;

typedef struct st_adaptive {
    st_adaptive_config cfg;  /* normalised */
    double limit;
    int64_t last_ms;         /* latest time seen */
    int64_t changed_ms;      /* when the integer limit last changed */
    uint32_t in_flight;      /* tickets out */
    uint32_t oldest, head;   /* open windows: serials oldest..head; head takes starts */
    st_adaptive_window win[ST_ADAPTIVE_WINDOWS];
    double candidates[ST_ADAPTIVE_BASELINE];
    uint32_t n_candidates;   /* offered since the last reset (the ring keeps the last 64) */
    double baseline;         /* lowest candidate; < 0 = none yet */
    double run_limit, run_mean; /* the run of latency shrinks: where it began; 0 = none */
    unsigned char slow_start;
    /* counters */
    uint64_t windows, grows, shrinks_latency, shrinks_overload, baseline_resets, forced;
} st_adaptive;

/* c NULL = defaults. */
void st_adaptive_init(st_adaptive *a, const st_adaptive_config *c, int64_t now_ms);

/* Calls that may be in flight now: an integer in [min_limit, max_limit]. */
unsigned st_adaptive_limit(const st_adaptive *a);

/* A call is sent now. */
void st_adaptive_start(st_adaptive *a, int64_t now_ms, st_adaptive_ticket *t);

/* The call holding t ended after latency_ms with class cls (see the header notes). */
void st_adaptive_done(st_adaptive *a, int64_t now_ms, st_adaptive_ticket *t, int64_t latency_ms,
                      st_class cls);

typedef struct st_adaptive_stats {
    unsigned limit;
    double baseline_ms;      /* -1 before the first full window */
    uint32_t in_flight;
    uint64_t windows, grows, shrinks_latency, shrinks_overload, baseline_resets, forced;
} st_adaptive_stats;
void st_adaptive_stats_get(const st_adaptive *a, st_adaptive_stats *out);

#endif
