/* Spend caps that hold under concurrency: cost and tokens over a sliding hour and
 * a sliding day. Pure: time is passed in; no allocation, no clock reads, no
 * pointers (the struct can be copied into shared memory as it is).
 *
 * Amounts are int64: cost in micro-dollars (µUSD), tokens as counted. Integers
 * because a cap must compare exactly: 50 reservations of a fiftieth of the cap
 * must fill it exactly, and amounts added to slots and subtracted again when the
 * slots expire must come back to zero, which doubles do not promise. A µUSD is
 * fine enough: the caller rounds each amount up, so a cheap call is over-counted
 * by less than one µUSD, on the safe side. Amounts below 0 count as 0, above
 * ST_SPEND_MAX as ST_SPEND_MAX; a slot's spend and the reservations in flight
 * saturate there too.
 *
 * Reserve, then settle. Before a call is sent, the caller reserves its worst
 * case (input estimate + max_tokens at the output price, computed by the caller).
 * A reservation passes only if, for every capped span and dimension,
 *     settled in the window + reserved in flight + amount <= cap,
 * so any number of calls reserving at once can never take more than the cap
 * between them. When the reply comes, settle charges the actual amount in place
 * of the reservation (the rest is freed); a call that failed without being
 * charged releases its reservation. If the actual amount exceeds what was
 * reserved, it still counts: the cap then holds only as well as the worst case
 * was estimated. charge records spend that was never reserved (the cost of a
 * cancelled hedge, for one). A hold is settled or released once; doing it again
 * is ignored. A hold that is never returned keeps its amount reserved.
 *
 * Refusal never consumes. st_spend_reserve returns
 *   ST_SPEND_OK        reserved; *h holds it
 *   ST_SPEND_WAIT      refused; *retry_after_ms = when enough settled spend has
 *                      left the windows for it to pass, reservations in flight
 *                      counted as they are. Exact: at now + retry_after_ms it
 *                      passes, 1 ms earlier it does not (nothing else changing).
 *   ST_SPEND_HELD      refused; it would not pass even with the windows empty,
 *                      because of the reservations in flight: when it can pass
 *                      depends on how those settle. *retry_after_ms = -1.
 *   ST_SPEND_TOO_BIG   refused; the amount alone is above a cap.
 *                      *retry_after_ms = INT64_MAX.
 *
 * Windows. Each span is a ring of ST_SPEND_SLOTS slots (hour: 37.5 s each, day:
 * 15 min each) with subtract-on-evict, as in budget.c. Settled spend counts from
 * the time it is settled until the end of the 96th slot: spend settled at t=0
 * counts at t=3599999 and is gone at t=3600000 from the hour (and at t=86400000
 * from the day). Slots are aligned on multiples of their width. Time that goes
 * backwards is taken as the latest time seen; times are clamped to +-1e15 ms
 * (30,000 years), far from overflow. Reservations in flight belong to
 * no slot: they count against every span until settled or released.
 *
 * Warnings. For a capped span and dimension with warn > 0, the first charge that
 * brings the settled spend of the window to at least warn * cap (rounded up)
 * returns its bit, ST_SPEND_WARN_BIT(span, dim), for the caller to turn into an
 * alert; the bit is not returned again until the settled spend has fallen below
 * 0.9 * warn * cap (as the window slides), so spend hovering at the line does not
 * raise an alert per slot. Reservations do not count here: they are worst cases
 * that come and go, and an alert on them would flap.
 *
 * Config: a cap of 0 or below means none; above ST_SPEND_MAX it is ST_SPEND_MAX.
 * warn NaN or below 0 -> 0.8, above 1 -> 1, 0 = no warnings.
 *
 * Cost: reserve, settle, release and charge are O(1) plus the slots the clock
 * has moved past; a refusal walks the slots, O(ST_SPEND_SLOTS). */
#ifndef STURDY_SPEND_H
#define STURDY_SPEND_H

#include <stddef.h>
#include <stdint.h>

#include "blob.h"

#define ST_SPEND_SLOTS 96
#define ST_SPEND_MAX ((int64_t)1000000000000000)   /* 1e15: a billion dollars in µUSD */

typedef enum { ST_SPEND_COST = 0, ST_SPEND_TOKENS, ST_SPEND_DIMS } st_spend_dim;
typedef enum { ST_SPEND_HOUR = 0, ST_SPEND_DAY, ST_SPEND_SPANS } st_spend_span;
typedef enum { ST_SPEND_OK = 0, ST_SPEND_WAIT, ST_SPEND_HELD, ST_SPEND_TOO_BIG } st_spend_result;

#define ST_SPEND_WARN_BIT(span, dim) (1u << ((unsigned)(span) * ST_SPEND_DIMS + (unsigned)(dim)))

typedef struct st_spend_config {
    int64_t cap[ST_SPEND_SPANS][ST_SPEND_DIMS];  /* per window; 0 = none */
    double warn;                                  /* share of a cap that warns, default 0.8 */
} st_spend_config;

/* No caps, warn 0.8. */
void st_spend_config_defaults(st_spend_config *c);

typedef struct st_spend_hold {
    int64_t amount[ST_SPEND_DIMS];
    unsigned char valid;
} st_spend_hold;

typedef struct st_spend_window {
    int64_t slot_ms;
    int64_t head;                                /* start of the newest slot; INT64_MIN = none */
    int64_t slot_start[ST_SPEND_SLOTS];          /* INT64_MIN = holds no period */
    int64_t amount[ST_SPEND_SLOTS][ST_SPEND_DIMS];
    int64_t sum[ST_SPEND_DIMS];                  /* over the live slots */
} st_spend_window;

typedef struct st_spend {
    int64_t cap[ST_SPEND_SPANS][ST_SPEND_DIMS];  /* normalised; 0 = none */
    int64_t warn_at[ST_SPEND_SPANS][ST_SPEND_DIMS];   /* 0 = no warning */
    int64_t rearm_below[ST_SPEND_SPANS][ST_SPEND_DIMS];
    unsigned char warned[ST_SPEND_SPANS][ST_SPEND_DIMS];
    st_spend_window win[ST_SPEND_SPANS];
    int64_t reserved[ST_SPEND_DIMS];             /* in flight */
    int64_t last_ms;                             /* latest time seen */
    uint64_t admitted, refused;
} st_spend;

/* c NULL = no caps. */
void st_spend_init(st_spend *s, const st_spend_config *c, int64_t now_ms);

/* amount[ST_SPEND_COST] µUSD, amount[ST_SPEND_TOKENS] tokens. retry_after_ms may
 * be NULL. See the header notes for the results. */
st_spend_result st_spend_reserve(st_spend *s, int64_t now_ms, const int64_t amount[ST_SPEND_DIMS],
                                 st_spend_hold *h, int64_t *retry_after_ms);

/* Charges actual in place of the hold; returns warning bits (0 = none).
 * actual NULL = nothing was charged (a release). */
unsigned st_spend_settle(st_spend *s, int64_t now_ms, st_spend_hold *h, const int64_t actual[ST_SPEND_DIMS]);

/* Frees a hold without a charge (the call failed before being charged, or was
 * cancelled before sending). */
void st_spend_release(st_spend *s, int64_t now_ms, st_spend_hold *h);

/* Records spend that had no hold; returns warning bits. */
unsigned st_spend_charge(st_spend *s, int64_t now_ms, const int64_t actual[ST_SPEND_DIMS]);

/* Settled spend in a span's window now, and what is reserved in flight. */
int64_t st_spend_used(st_spend *s, int64_t now_ms, st_spend_span span, st_spend_dim dim);
int64_t st_spend_reserved(const st_spend *s, st_spend_dim dim);

/* An st_spend as a blob, for processes that reserve against one cap together
 * (the workers of one nginx keep it in an ngx.shared dict): the windows of
 * settled spend, the reservations in flight, the warnings given and the
 * counters. The holds stay with the process that reserved them.
 *
 * The frame of blob.h, magic "stS1", version ST_SPEND_BLOB_VERSION, layout the
 * size of st_spend, fingerprint st_spend_fingerprint; the payload is st_spend
 * as in memory. st_spend_load refuses, leaving s unchanged, a blob
 * of another length, magic, version or layout (ST_BLOB_* of blob.h), of other
 * caps or warn lines (ST_BLOB_CONFIG), or one whose values are out of range
 * (ST_BLOB_INVALID: negative amounts, slots of another width). Times in it are
 * monotonic ms, which all processes of one machine share. */
#define ST_SPEND_BLOB_VERSION 2

/* FNV-1a over the caps and warning lines of s. */
uint64_t st_spend_fingerprint(const st_spend *s);
size_t st_spend_blob_size(void);
/* Writes the blob into out; returns its size, or 0 when cap is too small. */
size_t st_spend_save(const st_spend *s, uint32_t stamp, void *out, size_t cap);
/* Replaces s with the blob's spend. Returns ST_BLOB_OK or why it was refused. */
int st_spend_load(st_spend *s, const void *blob, size_t len);

#endif
