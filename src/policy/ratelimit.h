/* Client-side pacing per upstream key, so 429s become rare: one GCRA (generic
 * cell rate algorithm) per dimension, with limits that are configured and/or
 * learned from the provider's rate-limit headers. Pure: monotonic time (ms) and,
 * for absolute reset timestamps, wall-clock epoch ms are passed in.
 *
 * Pacing. A limit is per minute and is enforced as a smooth rate, because
 * providers refill continuously: 600/min lets one request through every 100 ms,
 * after a burst of up to B units at one instant, where
 *   B = max(1, burst_seconds * limit / 60)    (burst_seconds defaults to 1 s)
 * so 600/min has B = 10, and 30/min has B = 1. Over any window of W seconds at
 * most limit * W / 60 + B units pass (+ the cost of one oversize request instead
 * of B, see below). A unit's cost in time is rounded up to the next µs, so the
 * rate is never exceeded. A request must pass every dimension that has a limit;
 * a dimension without one is not paced.
 *   - A request costing more than B (a large token estimate) passes once the
 *     dimension has no debt at all, and then pays in full: the long-run rate
 *     holds and an oversize request never waits forever.
 *   - A cost of 0 (no estimate) still waits while the dimension is overdrawn,
 *     e.g. after a correction showed more tokens were used than estimated.
 *   - The caller fills cost[ST_DIM_TOKENS] (normally input + output estimate);
 *     it is not derived from the other two.
 *
 * Learned state from responses.
 *   - limit: replaces the previous learned limit (tiers change). The effective
 *     limit is the lower of configured and learned. On a change, the debt a
 *     dimension carries is kept in units and re-timed at the new rate.
 *     Limits are read as per minute, as both providers report them for paid
 *     tiers; a daily limit sent instead would pace too loosely, but its
 *     remaining + reset hold still stops requests when it runs out.
 *   - remaining with a reset, for a dimension with no known rate ("hold"): at
 *     most `remaining` more units may pass until the reset, then the hold ends.
 *     "remaining 0, reset in 2 s" means nothing for 2 s. While a hold lasts, a
 *     request passes when its cost fits in what is left (a cost of 0 needs
 *     something left). Requests still in flight when the response was produced
 *     are not subtracted: we cannot know which of them the provider had counted.
 *   - remaining with a reset, for a dimension with a rate: both providers refill
 *     continuously and their reset is when the bucket is full again, so it is
 *     paced from what remains, as below; the reset is recorded for stats.
 *   - remaining without a reset: tightens the GCRA of a limited dimension so that
 *     at most `remaining` units pass now (then the normal refill); an active
 *     hold's count is replaced by it.
 *   - A remaining at or above what pacing allows changes nothing in practice:
 *     learned state only ever tightens.
 *
 * Headers. limit, remaining and reset arrive as separate headers, in any order.
 * st_limiter_feed_header applies a limit at once (so it can report a change), and
 * buffers remaining and reset per dimension; a pair is applied as soon as both
 * halves of one dimension are in. The engine calls st_limiter_response_done after
 * feeding all headers of one response: it applies a lone remaining (as above) or
 * a lone reset (recorded only) and clears the buffer, so halves of different
 * responses never pair.
 * Anthropic's anthropic-ratelimit-tokens-* headers are recognised but not fed:
 * they repeat whichever of the input or output limit is most restrictive, and
 * reading that as a limit on input + output would throttle far below the real
 * limits, which the input-tokens-* and output-tokens-* headers carry exactly.
 *
 * A 429 pauses the whole key: st_limiter_pause_until keeps the later of the
 * current and the new end, since a shorter pause than one already known would
 * only earn another 429.
 *
 * Slow start: a key with no configured or learned request limit is "unknown"
 * (st_limiter_known returns 0); the engine then lets one request in flight until
 * a response teaches the limits.
 *
 * Times are clamped to ±1e15 ms, and reset delays and debts to ST_RATELIMIT_MAX_MS
 * (10 years, as ST_RETRY_AFTER_MAX_MS), far from int64 overflow. Costs and limits
 * below 0 or NaN count as 0, above 1e12 as 1e12. */
#ifndef STURDY_RATELIMIT_H
#define STURDY_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

#define ST_RATELIMIT_MAX_MS ((int64_t)315360000 * 1000)

typedef enum {
    ST_DIM_REQUESTS = 0, ST_DIM_INPUT_TOKENS, ST_DIM_OUTPUT_TOKENS, ST_DIM_TOKENS, ST_DIM_COUNT
} st_dim;

/* "requests", "input_tokens", "output_tokens", "tokens"; "unknown" outside the enum. */
const char *st_dim_name(st_dim d);

typedef struct st_gcra {
    double per_min;       /* effective limit per minute, 0 = not paced */
    double burst;         /* B: units that may pass at one instant */
    int64_t tat_us;       /* theoretical arrival time, µs; at or before now = no debt */
    double interval_us;   /* time one unit costs: 60e6 / per_min */
    int64_t burst_us;     /* tolerance: the time cost of B units */
} st_gcra;

typedef struct st_limiter {
    st_gcra dims[ST_DIM_COUNT];
    double configured[ST_DIM_COUNT];   /* per minute, 0 = none */
    double learned[ST_DIM_COUNT];      /* per minute from headers, 0 = none */
    double remaining[ST_DIM_COUNT];    /* last learned, -1 = unknown (information only) */
    int64_t reset_at_ms[ST_DIM_COUNT]; /* monotonic ms of the last learned reset, 0 = unknown */
    int64_t paused_until_ms;           /* 429 pause, 0 = none */
    double burst_seconds;
    double share;                      /* every effective limit is divided by it, >= 1 */
    /* hold from a remaining + reset pair; active while now < hold_until_ms */
    double hold_left[ST_DIM_COUNT];    /* units that may still pass, -1 = no hold */
    double hold_cap[ST_DIM_COUNT];     /* the learned remaining: corrections give back up to it */
    int64_t hold_until_ms[ST_DIM_COUNT];
    /* remaining / reset headers of the response being fed */
    double pend_remaining[ST_DIM_COUNT];     /* -1 = none */
    int64_t pend_reset_at_ms[ST_DIM_COUNT];  /* monotonic, valid when pend_has_reset */
    unsigned char pend_has_reset[ST_DIM_COUNT];
} st_limiter;

/* configured_per_min may be NULL (nothing configured). burst_seconds <= 0 or NaN
 * means the default, 1 s; above 3600 it is 3600. */
void st_limiter_init(st_limiter *l, const double configured_per_min[ST_DIM_COUNT],
                     double burst_seconds, int64_t now_ms);

/* The effective limit of a dimension: the configured one if set, else the learned
 * one (if both, the lower), divided by the share. 0 = none. */
double st_limiter_limit(const st_limiter *l, st_dim d);

/* This process's share of limits that n processes share (their common store is
 * away, so each paces itself to limit / n): every effective limit, configured
 * or learned, now or later, is divided by n. n below 1 or NaN is 1 (the whole
 * limit); above 1e6, infinity included, it is 1e6. Unlike a new limit, a new
 * share keeps each dimension's debt in time, not in units: rate and burst
 * shrink alike, so a bucket that was empty (a provider's "remaining 0") stays
 * just empty rather than owing n times as long. A smaller share than before
 * also starts with nothing left (a debt of one burst at least): the others
 * drew on the same provider bucket, and how much of it is left is unknown. */
void st_limiter_share(st_limiter *l, int64_t now_ms, double n);

/* 1 when the request dimension has a configured or learned limit. */
int st_limiter_known(const st_limiter *l);

/* Ms until a request with these costs may start; 0 = now. Does not consume.
 * cost[ST_DIM_REQUESTS] is normally 1, token estimates may be 0; cost may be NULL
 * for one request without estimates. Considers the pause, every dimension with a
 * limit and every active hold. Exact: at now + wait the request passes, 1 ms
 * earlier it does not (with nothing else changed). */
int64_t st_limiter_wait_ms(const st_limiter *l, int64_t now_ms, const double cost[ST_DIM_COUNT]);

/* Consumes the costs when the wait is 0 and returns 0; otherwise consumes nothing
 * and returns the wait. */
int64_t st_limiter_acquire(st_limiter *l, int64_t now_ms, const double cost[ST_DIM_COUNT]);

/* Real usage known after the reply: adds delta = actual - estimated to the
 * dimension. A negative delta gives capacity back, but never more than an empty
 * bucket at now (debt cannot go below zero), nor beyond a hold's learned remaining. */
void st_limiter_correct(st_limiter *l, int64_t now_ms, st_dim d, double delta);

/* Nothing passes before until_ms (the later of this and any earlier pause). */
void st_limiter_pause_until(st_limiter *l, int64_t until_ms);

/* A limit, remaining and reset learned from one response; any may be absent
 * (limit <= 0, remaining < 0, reset_in_ms < 0). Returns 1 when the effective limit
 * of the dimension changed. */
int st_limiter_learn(st_limiter *l, int64_t now_ms, st_dim d, double limit, double remaining,
                     int64_t reset_in_ms);

/* Header recognition, case-insensitive names:
 *   Anthropic: anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset},
 *              reset = RFC 3339 timestamp
 *   OpenAI:    x-ratelimit-{limit,remaining,reset}-{requests,tokens}, reset = Go duration
 * Returns 1 and sets *dim, *field (0 limit, 1 remaining, 2 reset) and *format
 * (0 number, 1 RFC 3339, 2 Go duration) for a rate-limit header; 0 otherwise.
 * Any out pointer may be NULL. */
int st_ratelimit_header(const char *name, st_dim *dim, int *field, int *format);

/* RFC 3339 date-time: "2026-11-25T12:00:00Z", with "t"/"z" in any case, a space
 * allowed for "T", fractional seconds (rounded up to the next whole ms) and
 * "+01:00"/"-00:00" offsets. Strict otherwise: month 1-12, day valid for its month
 * and year, hour 0-23, minute 0-59, second 0-60, no surrounding space.
 * Returns 1 and *epoch_ms, else 0. */
int st_rfc3339_parse(const char *s, size_t len, int64_t *epoch_ms);

/* Go time.Duration strings as OpenAI sends them: "6m0s", "1s", "12ms",
 * "1h2m3.5s", "0.4ms", "250us"/"250µs", "20ns", "0s", a lone "0", an optional
 * leading "+". Rounded up to whole ms ("0.4ms" -> 1, "20ns" -> 1, "0s" -> 0),
 * clamped to ST_RATELIMIT_MAX_MS. Returns 1 and *ms, or 0 for garbage, empty,
 * negative, a number without a unit, and surrounding space. */
int st_go_duration_parse(const char *s, size_t len, int64_t *ms);

/* Feeds one response header into the limiter (see "Headers" above). The value
 * may have surrounding OWS. An RFC 3339 reset is turned into a delay relative to
 * now_epoch_ms (a time in the past is a delay of 0); a duration is taken as is.
 * Unparsable values are ignored. Returns 1 if it was a rate-limit header and the
 * effective limit changed, else 0. */
int st_limiter_feed_header(st_limiter *l, int64_t now_ms, int64_t now_epoch_ms,
                           const char *name, const char *value);

/* After all headers of one response were fed: applies what is buffered and
 * clears it. */
void st_limiter_response_done(st_limiter *l, int64_t now_ms);

#endif
