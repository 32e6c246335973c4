/* The decision core: every decision a transport needs about a call, made once,
 * here, with time passed in. Transports (the curl engine, the OpenResty cosocket
 * transport) move bytes and obey the answers; none re-implements a decision.
 *
 *   st_admit        may a call start an attempt now?  start (it then holds an
 *                   in-flight slot and, with a breaker, a permit) | queued (wait for
 *                   a slot, or until the limiter opens at wake_ms) | refused
 *                   (circuit_open, queue_full, rate_limited, total_timeout).
 *   st_pump         after a slot frees or the limiter's wake time: the next queued
 *                   call that is decided (started or refused), one at a time.
 *   st_report       an attempt ended: frees its slot, feeds the breaker, the latency
 *                   windows, the limiter (rate-limit headers; a 429 pauses the key)
 *                   and the retry budget; reads the server's retry hint.
 *   st_retry_decide after st_report: finish, or retry after delay_ms; says whether
 *                   the outcome is retryable (err.retryable) and, for a retryable one
 *                   that is not retried, what stopped it.
 *   st_release      a call is canceled: its slot, permit and queue place go back.
 *
 * Beyond these (each in its own section below): adaptive concurrency (a key's
 * in-flight cap follows st_adaptive: st_admit takes a ticket as an attempt
 * starts, st_report and st_release give it back), spend caps (st_admit reserves
 * a call's worst case before anything else; st_call_spend_end parks or releases
 * it when the call is over; st_decider_spend_settle charges the actual cost), and hedges
 * (st_hedge_plan, st_hedge_admit, st_hedge_lost).
 *
 * Every state change an operator wants to see (breaker transitions, limits learned,
 * pauses) is returned as events in an st_events the caller passes in (NULL = not
 * wanted); nothing here calls back into the caller, so a transport emits the events
 * once its own state is consistent.
 *
 * Slots. A call holds at most one in-flight slot; st_report and st_release give it
 * back exactly once (`holding`), whatever order they come in, so a key's in-flight
 * count never drifts. A call is queued at most once (`qnode.queued`).
 *
 * Retry hints. retry-after-ms, then retry-after (delta-seconds or HTTP-date, wall
 * clock), parsed by st_report into call->hint_ms (-1 none), clamped to
 * ST_RETRY_AFTER_MAX_MS. A hint above honor_retry_after_ms ends the call (stop
 * "hint_too_long") with retry_after set to the whole hint. A 429 pauses the key for
 * its hint (else the throttled backoff base), an overloaded reply whose hint passes
 * honor_retry_after_ms opens the breaker until then; both are capped at
 * max_pause_ms and the breaker's max_open_ms, so a lying server cannot park a key
 * for years. So is a hold learned from rate-limit headers ("remaining 0" until a
 * reset, for a dimension without a known rate): it lasts at most max_pause_ms.
 *
 * Retry decision, in this order: success finishes. Otherwise the outcome is
 * retryable when x-should-retry says "true" ("false": not), else a status override,
 * else its class (retried per class); canceled never is. A retryable outcome is
 * retried unless: the call is committed (stop "committed"), the attempts are used
 * up ("attempts"), the hint is too long ("hint_too_long"), the delay would pass the
 * deadline ("deadline"), or the retry budget refuses ("budget_exhausted"; only then is the
 * budget charged). The delay is the hint when there is one, else jittered backoff
 * with the class's base. */
#ifndef STURDY_DECIDE_H
#define STURDY_DECIDE_H

#include <stdint.h>

#include "backoff.h"
#include "headers.h"
#include "outcome.h"
#include "spendbook.h"
#include "upstream.h"

#define ST_STATUS_OVERRIDES 600

typedef struct st_retry_policy {
    unsigned attempts;                     /* attempts in all, first included, >= 1 */
    double base_ms[ST_CLASS_COUNT];        /* backoff base per class */
    double cap_ms;
    st_jitter jitter;
    int64_t honor_retry_after_ms;          /* a longer server hint ends the call instead */
    unsigned char retried[ST_CLASS_COUNT]; /* per class: 1 = retried */
    signed char status_retried[ST_STATUS_OVERRIDES]; /* -1 = as its class, 0 never, 1 always */
    int budget_enabled;                    /* its figures are in st_upstream_config */
} st_retry_policy;

void st_retry_policy_defaults(st_retry_policy *p);

#define ST_KEY_BUCKETS 64

typedef struct st_decider {
    st_retry_policy retry;
    st_upstream_config upstream;
    st_rng rng;
    st_upstream *keys[ST_KEY_BUCKETS];
    st_spend_book *spend;      /* spend caps; NULL = none (see st_decider_set_spend) */
} st_decider;

/* rp / uc NULL = defaults. Counts are clamped: attempts to [1, 1000]. */
void st_decider_init(st_decider *d, const st_retry_policy *rp, const st_upstream_config *uc, uint64_t seed);
void st_decider_free(st_decider *d);  /* frees every upstream */
/* The upstream of a key, made on first use (NULL when memory runs out). */
st_upstream *st_decider_upstream(st_decider *d, const char *key, int64_t now_ms);
/* The upstream of a key, NULL if none was made. */
st_upstream *st_decider_find(const st_decider *d, const char *key);
void st_decider_each(const st_decider *d, void (*fn)(void *ud, st_upstream *u), void *ud);

/* Things an operator wants to see happen to an upstream key. */
typedef enum { ST_EVENT_BREAKER = 1, ST_EVENT_LIMIT_LEARNED, ST_EVENT_PAUSED, ST_EVENT_BUDGET_WARNING } st_event_type;
typedef struct st_event {
    st_event_type type;
    const st_upstream *up;      /* NULL for a budget warning that no call's key brought */
    st_breaker_state from, to;  /* ST_EVENT_BREAKER */
    st_dim dim;                 /* ST_EVENT_LIMIT_LEARNED */
    double limit;               /* per minute: the effective limit now */
    double learned;             /* per minute: what the headers said */
    double pause_ms;            /* ST_EVENT_PAUSED */
    st_spend_warning warning;   /* ST_EVENT_BUDGET_WARNING */
} st_event;

#define ST_EVENTS_MAX 16
typedef struct st_events {
    unsigned n;                 /* events beyond ST_EVENTS_MAX are dropped, counted here */
    unsigned dropped;
    st_event ev[ST_EVENTS_MAX];
} st_events;

/* One call's state across its attempts; embedded in the transport's request. */
typedef struct st_call {
    st_qnode qnode;             /* place in its upstream's queue; first member */
    st_permit permit;           /* the breaker's, while holding */
    int priority;               /* ST_PRIORITY_* */
    double cost[ST_DIM_COUNT];  /* what one attempt takes from the rate limiter */
    int64_t deadline_ms;        /* absolute; 0 = none */
    unsigned max_attempts;
    unsigned attempts;          /* attempts started */
    double prev_delay_ms;
    int64_t hint_ms;            /* the last attempt's server hint, -1 none */
    int64_t retry_after_ms;     /* for the caller's error: hint or refusal wait, -1 none */
    int64_t not_before_ms;      /* no attempt starts before this (a shared limiter's place), 0 none */
    unsigned char holding;      /* holds an in-flight slot */
    unsigned char committed;    /* part of the reply reached the caller: never retried */
    unsigned char paced;        /* held back by the limiter at least once (counted once) */
    st_adaptive_ticket ticket;  /* the adaptive limit's, while holding */
    st_call_spend spend;        /* its spend cap reservations (st_call_spend_init) */
} st_call;

/* total_ms 0 = no deadline; attempts 0 = the policy's; tokens are estimates (0 unknown). */
void st_call_init(st_call *c, const st_decider *d, int64_t now_ms, int64_t total_ms, unsigned attempts,
                  int priority, double input_tokens, double output_tokens);

typedef enum { ST_ADMIT_START = 0, ST_ADMIT_QUEUED, ST_ADMIT_REFUSED } st_admit_verdict;

typedef struct st_admission {
    st_admit_verdict verdict;
    int64_t wake_ms;            /* QUEUED: when the limiter opens (absolute), 0 = when a slot frees */
    st_outcome refusal;         /* REFUSED */
    const char *detail;         /* REFUSED: one line for err.detail */
} st_admission;

/* A new call, or one back from its retry wait, asks to start an attempt. START:
 * the attempt may begin now (c->attempts counts it). QUEUED: the call waits in
 * the key's queue (FIFO within priority, higher first); st_pump hands it back.
 * REFUSED: nothing is sent; c->retry_after_ms says when trying again makes sense. */
void st_admit(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_admission *out, st_events *ev);

/* The next queued call of u that is decided now (started or refused), or NULL
 * when none can be; out->wake_ms then says when the limiter opens (0 = on a free
 * slot). Call it until NULL after a slot frees and at the wake time. */
st_call *st_pump(st_decider *d, st_upstream *u, int64_t now_ms, st_admission *out, st_events *ev);

typedef struct st_attempt_end {
    st_outcome outcome;
    long status;                /* 0 = no response */
    const st_headers *headers;  /* the response head; NULL = none */
    uint64_t ttfb_us, total_us; /* latency of the attempt, recorded when status > 0 */
} st_attempt_end;

/* The attempt c started has ended. wall_ms: the wall clock, for HTTP-dates and
 * RFC 3339 resets. */
void st_report(st_decider *d, st_upstream *u, st_call *c, const st_attempt_end *a, int64_t now_ms,
               int64_t wall_ms, st_events *ev);

typedef struct st_retry_decision {
    int retry;                  /* 1: wait delay_ms, then st_admit again */
    double delay_ms;
    int hinted;                 /* the delay is the server's hint */
    int retryable;              /* the outcome is of a kind that is retried */
    const char *stop;           /* retryable but not retried: why; else NULL */
} st_retry_decision;

/* After st_report, for a finished attempt a of c. */
void st_retry_decide(st_decider *d, st_upstream *u, st_call *c, const st_attempt_end *a, int64_t now_ms,
                     st_retry_decision *out);

/* The call is canceled or abandoned: gives back its slot and permit (once), and
 * its queue place. Safe in any state, any number of times. */
void st_release(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_events *ev);

/* A queued call whose deadline passed leaves the queue (its outcome is total_timeout). */
void st_unqueue(st_upstream *u, st_call *c);

/* Retry hint of a response head: retry-after-ms, then retry-after; -1 none. */
int64_t st_retry_hint_ms(const st_headers *h, int64_t wall_ms);

/* ---- The fleet scope --------------------------------------------------------
 * When processes share their limits and breakers through a store (sturdy.shared,
 * over Redis), the store answers a few questions for all of them: how long a call
 * waits for its place in the fleet's rate limit, until when the fleet's breaker is
 * open, what the fleet's breaker window holds, and, while the store is away, what
 * this process's share of each limit is. The answers are handed to the core here;
 * the core still makes every decision with them. */

/* The longest wait before its next attempt that call c may still sit through:
 * st_admit refuses a longer wait (rate_limited above honor_retry_after_ms,
 * total_timeout when the wait reaches the deadline). >= 0. A shared limiter
 * reserves a place only for a wait within this bound, so a call it cannot place
 * in time is refused without taking a place from the others. */
int64_t st_call_max_wait_ms(const st_decider *d, const st_call *c, int64_t now_ms);

/* No attempt of c starts before now_ms + wait_ms (its place in a shared limit):
 * st_admit and st_pump treat the time left as a limiter wait, so the call is
 * queued with that wake time, or refused as above when it is too long. The local
 * limiter is charged only when the call starts. Replaces an earlier time;
 * wait_ms <= 0 clears it. Waits are clamped to ST_RETRY_AFTER_MAX_MS. */
void st_call_not_before(st_call *c, int64_t now_ms, int64_t wait_ms);

/* The fleet's breaker for u's key is open until until_ms: u's breaker opens until
 * then, or stays open longer if it already was (see st_breaker_open_until). An
 * event tells of a change of state. */
void st_fleet_open_until(st_upstream *u, int64_t now_ms, int64_t until_ms, st_events *ev);

/* The fleet's window for u's key (the calls, failures and slow calls of every
 * process, this one's included): u's closed breaker opens when they trip its
 * thresholds, as its own window would (st_breaker_judge). Returns 1 when it
 * opened; an event tells of it. */
int st_fleet_window(st_upstream *u, int64_t now_ms, uint64_t calls, uint64_t failures, uint64_t slow,
                    st_events *ev);

/* This process's share of u's limits while n processes pace themselves without
 * their store: see st_limiter_share (n = 1: the whole limit again). */
void st_fleet_share(st_upstream *u, int64_t now_ms, double n);

/* ---- Adaptive concurrency ----------------------------------------------------
 * With st_upstream_config.adaptive_enabled, a key's in-flight cap is
 * st_adaptive_limit (st_upstream_cap). Each attempt that starts takes a ticket
 * (st_admit, st_pump); st_report gives it back with the attempt's class and its
 * time to first byte (its total time when it has none), st_release with no
 * sample. Nothing else is asked of the transport. */

/* ---- Spend caps -------------------------------------------------------------
 * The decider's st_spend_book (spendbook.h) caps spend per client, key and tag.
 * A call says what it may cost at worst (st_call_spend_init, before its first
 * st_admit); st_admit reserves that in every scope that caps the call before
 * anything else, once per call: a refusal is kind "budget_exceeded" (class
 * throttled; nothing was sent) with c->retry_after_ms set when waiting helps
 * (-1 when the reservations in flight decide it, or when the call alone is above
 * a cap). st_release gives the reservation back. When the call is over,
 * st_call_spend_end parks it (its last attempt got a 2xx: the reply may be
 * billed) or gives it back; st_decider_spend_settle charges the actual cost of a parked
 * call, st_decider_spend_charge spend that had no reservation. Threshold crossings come
 * back as ST_EVENT_BUDGET_WARNING events. */

/* Takes ownership of b (NULL: no caps); the upstreams made so far learn their
 * key's cap. Call before the first call, or between calls. */
void st_decider_set_spend(st_decider *d, st_spend_book *b, int64_t now_ms);

/* The spend part of st_admit alone, for a transport that shares the spends
 * with other processes and so reserves under a lock of its own before st_admit
 * (which then finds the call's reservation held): reserves c's worst case and
 * returns 1 (out->verdict ST_ADMIT_START; also when nothing caps the call or it
 * holds its reservation already), or 0 with out refused as st_admit would. */
int st_admit_spend(st_decider *d, st_upstream *u, st_call *c, int64_t now_ms, st_admission *out, st_events *ev);

/* Sets up c's spend part: its upstream u's key cap, the tag's (NULL = none) and
 * the worst case: usd (dollars, rounded up to µUSD) and tokens. Without a book
 * the call is not capped. */
void st_call_spend_init(st_decider *d, st_upstream *u, st_call *c, const char *tag, double usd, double tokens,
                        int64_t now_ms);

/* The call is over and last_status its last attempt's status (0 none): returns
 * the id of its parked reservation (2xx), or 0 (released, or there was none). */
uint64_t st_call_spend_end(st_decider *d, st_upstream *u, st_call *c, long last_status, int64_t now_ms,
                           st_events *ev);

/* The actual cost of a parked call (id from st_call_spend_end): usd and
 * tokens. 1 when charged; 0 when the id is unknown, settled already, or was
 * charged in full when it expired. */
int st_decider_spend_settle(st_decider *d, uint64_t id, double usd, double tokens, int64_t now_ms, st_events *ev);

/* Spend that had no reservation (a cancelled hedge's input): charged in the
 * scopes that cap a call of key u (may be NULL) and tag (may be NULL). */
void st_decider_spend_charge(st_decider *d, st_upstream *u, const char *tag, double usd, double tokens, int64_t now_ms,
                     st_events *ev);

/* ---- Hedges -----------------------------------------------------------------
 * A call whose first byte is late may start one hedge: a second request of the
 * same call, on the same key or on another target's. The transport (or the
 * provider layer above it) holds both and cancels the loser; the core decides
 * when and whether:
 *   st_hedge_plan   at the call's start: how long to wait for the first byte
 *                   before hedging; deposits into the key's hedge budget.
 *   st_hedge_admit  when that wait is over and no byte came: may the hedge go
 *                   to key h? Refused when the time left before the deadline is
 *                   shorter than the hedge key's median time to first byte (or
 *                   when no time is left), when h's breaker is not closed, its
 *                   in-flight cap is reached or its limiter would make the hedge
 *                   wait, and last (only then is it charged) when the hedge
 *                   budget of the primary's key has no room: at most max_ratio
 *                   of the hedged calls in its window (10 s) hedge. The hedge
 *                   itself then goes through st_admit like any call.
 *   st_hedge_lost   the loser is cancelled before its first byte: the time it
 *                   waited counts in its key's time-to-first-byte window as a
 *                   sample (a lower bound of the real one), so a quantile delay
 *                   learns of the slow calls that hedging cuts short. */

typedef struct st_hedge_policy {
    int64_t after_ms;           /* a fixed wait; < 0: the quantile below */
    double quantile;            /* of the key's time to first byte, e.g. 0.95 */
    double max_ratio;           /* share of hedged calls that may hedge, in [0, 1] */
} st_hedge_policy;

/* A quantile wait needs this many samples in the window; fewer: no hedge. */
#define ST_HEDGE_MIN_SAMPLES 20

/* The wait before hedging call c of key u, in ms, or -1: no hedge (a quantile
 * of a window holding fewer than ST_HEDGE_MIN_SAMPLES, or a wait that reaches
 * the deadline). Deposits into u's hedge budget. */
int64_t st_hedge_plan(st_decider *d, st_upstream *u, const st_call *c, const st_hedge_policy *p, int64_t now_ms);

/* May a hedge of call c (of key u) go to key h (u itself for the same target)
 * now? 1: yes (u's hedge budget is charged); 0: no, *why (may be NULL) says
 * which cap: "deadline", "breaker", "concurrency", "limiter", "budget". */
int st_hedge_admit(st_decider *d, st_upstream *u, st_upstream *h, const st_call *c, const st_hedge_policy *p,
                   int64_t now_ms, const char **why);

/* A hedge leg of key u cancelled after waiting waited_ms without a byte. */
void st_hedge_lost(st_upstream *u, int64_t now_ms, int64_t waited_ms);

#endif
