/* An upstream key ("api.anthropic.com/claude-sonnet-4-5"): the policy state
 * every request naming it shares — retry budget, circuit breaker, latency
 * windows, rate limiter, adaptive concurrency limit, hedge budget — plus its
 * in-flight count and its priority queue. No I/O: the engine drives it. */
#ifndef STURDY_UPSTREAM_H
#define STURDY_UPSTREAM_H

#include <stdint.h>

#include "adaptive.h"
#include "blob.h"
#include "breaker.h"
#include "budget.h"
#include "latency.h"
#include "ratelimit.h"
#include "timerheap.h"

enum { ST_PRIORITY_HIGH = 0, ST_PRIORITY_NORMAL, ST_PRIORITY_LOW, ST_PRIORITY_COUNT };

typedef struct st_upstream_config {
    int breaker_enabled;
    st_breaker_config breaker;
    st_breaker_mode breaker_mode;
    double limits_per_min[ST_DIM_COUNT]; /* configured; 0 = learn from headers */
    double burst_seconds;
    int64_t max_pause_ms;                /* longest pause a 429 may put on the key */
    unsigned concurrency;                /* in flight at most */
    unsigned queue_max;                  /* waiting at most */
    double budget_ratio, budget_min_per_s;
    int64_t budget_slot_ms;
    unsigned latency_slots;
    int64_t latency_slot_ms;
    int adaptive_enabled;                /* the in-flight cap follows st_adaptive, not `concurrency` */
    st_adaptive_config adaptive;
} st_upstream_config;

void st_upstream_config_defaults(st_upstream_config *c);

/* A queued request's place; embedded in the request. */
typedef struct st_qnode {
    struct st_qnode *prev, *next;
    int priority;
    int queued;
} st_qnode;

typedef struct st_upstream {
    struct st_upstream *next;      /* hash chain */
    st_budget budget;
    st_breaker breaker;
    int breaker_enabled;
    st_limiter limiter;
    st_latency *total, *ttfb;      /* made on first use */
    unsigned latency_slots;
    int64_t latency_slot_ms;
    unsigned concurrency, queue_max;
    int64_t max_pause_ms;
    unsigned in_flight, queued;
    int replied;                   /* a response has come back: slow start is over */
    st_qnode *head[ST_PRIORITY_COUNT], *tail[ST_PRIORITY_COUNT];
    st_timer wake;                 /* a transport's timer for the limiter's next opening */
    uint64_t throttled, circuit_open, queue_full; /* 429s received; calls refused */
    uint64_t paced;                /* attempts the rate limiter held back rather than send */
    int adaptive_enabled;
    st_adaptive adaptive;          /* the in-flight cap when adaptive_enabled */
    st_budget hedge;               /* hedge budget: every hedged call deposits, every hedge withdraws */
    uint64_t hedges, hedges_refused; /* hedges started; hedges a cap refused */
    struct st_spend_named *spend;  /* the key's spend cap (owned by the decider's spend book), NULL none */
    char name[];
} st_upstream;

st_upstream *st_upstream_new(const char *name, const st_upstream_config *c, int64_t now_ms);
void st_upstream_free(st_upstream *u);

/* How many may be in flight now: the cap (the adaptive limit when that is on),
 * or a few until the first response (slow start: that reply teaches the limits,
 * when the provider sends them). */
#define ST_SLOW_START 4
unsigned st_upstream_cap(const st_upstream *u);

/* FIFO within a priority level, higher levels first. Returns 0 when full. */
int st_upstream_enqueue(st_upstream *u, st_qnode *n, int priority);
st_qnode *st_upstream_peek(const st_upstream *u);
void st_upstream_dequeue(st_upstream *u, st_qnode *n);

/* Records one finished attempt's time to first byte and total time (µs). */
void st_upstream_record_latency(st_upstream *u, int64_t now_ms, uint64_t ttfb_us, uint64_t total_us);

/* The shared part of an upstream as a blob, for processes that decide about the
 * same key together (the workers of one nginx keep it in an ngx.shared dict): the
 * breaker (state, window, open time, probe permits), the rate limiter (limits,
 * GCRA debt per dimension, holds, pause), the retry budget, and whether a response
 * has come back (slow start). Latency windows, the in-flight count, the queue and
 * the counters stay with each process.
 *
 * The frame of blob.h, magic "stU1", version ST_UPSTREAM_BLOB_VERSION, layout
 * the sizes of st_breaker, st_limiter and st_budget, fingerprint
 * st_upstream_fingerprint; the payload is st_breaker, st_limiter, st_budget as
 * in memory and one byte `replied`.
 *
 * st_upstream_load refuses, leaving u unchanged, a blob of another length, magic,
 * version or struct size (another build: after a binary upgrade the old workers'
 * state is not read), of another fingerprint (made under other settings: the
 * breaker, limits, burst, budget or mode differ, so its windows and debts mean
 * something else), or one whose values are out of range (a state or mode outside
 * its enum, a bucket index beyond the window, more probes out than permits).
 * Times in it are monotonic ms, which all processes of one machine share. */
#define ST_UPSTREAM_BLOB_VERSION 1

/* FNV-1a over the settings the shared state depends on (see above). */
uint64_t st_upstream_fingerprint(const st_upstream *u);
size_t st_upstream_blob_size(void);
/* Writes the blob into out; returns its size, or 0 when cap is too small. */
size_t st_upstream_save(const st_upstream *u, uint32_t stamp, void *out, size_t cap);
/* Replaces u's shared part with the blob's. Returns ST_BLOB_OK or why it was refused. */
int st_upstream_load(st_upstream *u, const void *blob, size_t len);

#endif
