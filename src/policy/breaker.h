/* Circuit breaker: stops calling an upstream that is failing or slow, then lets a
 * few probe calls test it before traffic flows again. Pure: time is passed in.
 *
 * Window: a ring of `buckets` buckets of bucket_ms = window_ms / buckets (at least
 * 1 ms), so the effective window is buckets * bucket_ms. A call counts from the time
 * it is recorded until the end of the buckets-th bucket (with the defaults, one
 * recorded at t=0 counts at t=29999 and is gone at t=30000). Buckets are evicted
 * lazily with subtract-on-evict, so every call is O(1) whatever the idle gap. Time
 * that goes backwards is treated as the latest time seen.
 *
 * States:
 *   closed    every call is admitted. After each record, with at least min_calls in
 *             the window, failures/calls >= failure_rate or slow/calls >= slow_rate
 *             opens the breaker for current_open_ms (starting at open_ms).
 *   open      calls are refused until open_until; the first acquire at or after it
 *             moves to half-open (lazily: nothing happens without a call).
 *   half-open `probes` probe permits are handed out. A probe that fails or is slow
 *             re-opens with the open time doubled (capped at max_open_ms); `probes`
 *             probes that succeed close the breaker, reset the window and bring the
 *             open time back to open_ms. A released (canceled) probe frees its slot.
 *             If probes are out and none completes or is released within
 *             probe_timeout_ms (counted from the last probe event), the next acquire
 *             re-opens as after a failed probe, so lost permits never wedge it.
 *
 * Permits carry a token. Recording or releasing clears p->valid, so doing it twice
 * is harmless; a probe permit only counts for the half-open period that issued it.
 * A call admitted in closed and recorded later while open or half-open (it started
 * before the state changed) is counted in the window but changes no state; one
 * recorded after the window was reset (the breaker closed again, or the mode was
 * changed) is not counted at all.
 *
 * Modes:
 *   normal        as above.
 *   forced-open   refuses every call (retry_in_ms = INT64_MAX: no end is known);
 *                 reports open; counts nothing, as every permit predates it.
 *   disabled      admits every call and counts nothing; reports closed.
 *   metrics-only  runs the state machine as normal mode would (on the calls it would
 *                 have admitted, probes included) and reports that state, but admits
 *                 every call: a call that would have been refused gets a plain permit,
 *                 counted like a late call.
 * Switching between normal and metrics-only keeps state and window; any other mode
 * change starts afresh: closed, empty window, open time back to open_ms.
 *
 * Config values out of range fall back: window_ms < 1, open_ms < 0, probe_timeout_ms
 * < 1, NaN rates -> default; buckets 0 -> 10, > ST_BREAKER_MAX_BUCKETS -> max;
 * min_calls 0 -> 1; probes 0 -> 1, > ST_BREAKER_MAX_PROBES -> max; slow_call_ms < 0
 * -> 0 (off); max_open_ms < open_ms -> open_ms. A rate above 1 never trips. */
#ifndef STURDY_BREAKER_H
#define STURDY_BREAKER_H

#include <stdint.h>

#include "outcome.h"

typedef enum { ST_BREAKER_CLOSED = 0, ST_BREAKER_OPEN, ST_BREAKER_HALF_OPEN } st_breaker_state;
typedef enum {
    ST_BREAKER_NORMAL = 0, ST_BREAKER_FORCED_OPEN, ST_BREAKER_DISABLED, ST_BREAKER_METRICS_ONLY
} st_breaker_mode;

#define ST_BREAKER_MAX_BUCKETS 64
#define ST_BREAKER_MAX_PROBES 64
#define ST_BREAKER_CLASS(c) (1u << (c))
#define ST_BREAKER_DEFAULT_FAILURES \
    (ST_BREAKER_CLASS(ST_CLASS_OVERLOADED) | ST_BREAKER_CLASS(ST_CLASS_TRANSIENT) | \
     ST_BREAKER_CLASS(ST_CLASS_TIMEOUT))

typedef struct st_breaker_config {
    int64_t window_ms;        /* default 30000 */
    unsigned buckets;         /* ring size, default 10, <= ST_BREAKER_MAX_BUCKETS */
    unsigned min_calls;       /* default 20 */
    double failure_rate;      /* default 0.5 */
    int64_t slow_call_ms;     /* default 20000; 0 = no slow-call tracking */
    double slow_rate;         /* default 0.8 */
    int64_t open_ms;          /* default 15000 */
    int64_t max_open_ms;      /* cap for growth on repeated opens, default 300000 */
    unsigned probes;          /* permits in half-open, default 3, <= ST_BREAKER_MAX_PROBES */
    int64_t probe_timeout_ms; /* half-open with no probe completion within this re-opens; default 60000 */
    unsigned failure_classes; /* bitmask of ST_BREAKER_CLASS(st_class): default ST_BREAKER_DEFAULT_FAILURES */
} st_breaker_config;

void st_breaker_config_defaults(st_breaker_config *c);

typedef struct st_permit { uint32_t token; unsigned char probe; unsigned char valid; } st_permit;

typedef struct st_breaker {
    st_breaker_config cfg;             /* normalized */
    int64_t bucket_ms;
    st_breaker_state state;
    st_breaker_mode mode;
    /* window: bucket k holds period p with p mod buckets == k, for the periods
     * head-buckets+1 .. head; head_start/head_end bound the head period */
    int64_t head, head_start, head_end;
    unsigned head_k;
    uint32_t calls[ST_BREAKER_MAX_BUCKETS], failures[ST_BREAKER_MAX_BUCKETS],
             slow[ST_BREAKER_MAX_BUCKETS];
    uint64_t sum_calls, sum_failures, sum_slow;
    /* tokens: serial is the last one issued (never 0); permits issued at or before
     * reset_serial predate the last window reset */
    uint32_t serial, reset_serial;
    int64_t open_until_ms;             /* when open */
    int64_t current_open_ms;           /* length of the current or next open */
    uint32_t opens;                    /* times it opened, all modes but disabled */
    /* half-open: token of each probe out (0 = free slot) */
    uint32_t probe_tok[ST_BREAKER_MAX_PROBES];
    unsigned probes_out, probes_ok;
    int64_t probe_event_ms;            /* last probe issued with none out, completed or released */
    /* every call counted into the window since init, never reset: a store that
     * keeps a window for many processes (sturdy.shared) adds the differences */
    uint64_t recorded_calls, recorded_failures, recorded_slow;
} st_breaker;

/* c NULL = defaults. */
void st_breaker_init(st_breaker *b, const st_breaker_config *c, int64_t now_ms);
/* May a call start? 1 = yes, *p filled (a probe permit in half-open). 0 = refused;
 * *retry_in_ms = ms until it would half-open (>= 0); in half-open with every probe out,
 * ms until the probe timeout would re-open it; INT64_MAX when forced open.
 * retry_in_ms may be NULL. */
int  st_breaker_acquire(st_breaker *b, int64_t now_ms, st_permit *p, int64_t *retry_in_ms);
/* The call holding p finished with class cls after latency_ms (see the header notes).
 * ST_CLASS_CANCELED is a release. A class outside the enum counts as no failure. */
void st_breaker_record(st_breaker *b, int64_t now_ms, st_permit *p, st_class cls, int64_t latency_ms);
/* Gives a permit back without an outcome (the call was canceled). */
void st_breaker_release(st_breaker *b, int64_t now_ms, st_permit *p);
/* An overloaded reply with a long Retry-After: open now until until_ms, if that is
 * later than now and than any current open end. Counts as an open; does not change
 * the open time used by later opens. Ignored when disabled or forced open. */
void st_breaker_open_until(st_breaker *b, int64_t now_ms, int64_t until_ms);
/* A window kept elsewhere (the counts of every process sharing the key, this
 * one's included) is judged as this breaker's own window would be: a breaker
 * that is closed, in normal or metrics-only mode, opens for its current open
 * time when these counts trip its thresholds. Returns 1 when it opened. The
 * counts do not enter the local window. */
int st_breaker_judge(st_breaker *b, int64_t now_ms, uint64_t calls, uint64_t failures, uint64_t slow);
void st_breaker_set_mode(st_breaker *b, st_breaker_mode m, int64_t now_ms);
/* The state as stored (an open breaker past open_until stays open until the next
 * acquire); forced-open reports open, disabled reports closed. */
st_breaker_state st_breaker_state_now(const st_breaker *b);

typedef struct st_breaker_stats {
    st_breaker_state state; st_breaker_mode mode;
    uint32_t calls, failures, slow;    /* in the window (saturating) */
    double failure_rate, slow_rate;    /* 0 when the window is empty */
    int64_t open_until_ms;             /* when open (INT64_MAX when forced open), else 0 */
    int64_t current_open_ms;
    uint32_t opens;
} st_breaker_stats;
void st_breaker_stats_get(st_breaker *b, int64_t now_ms, st_breaker_stats *out);

#endif
