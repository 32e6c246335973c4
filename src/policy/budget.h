/* Retry budget (Finagle RetryBudget semantics, counted exactly over a sliding
 * window): retries may be at most a fraction of recent successes, plus a small
 * always-available reserve, so a sick upstream is not hit by a retry storm.
 *
 *   window    = ST_BUDGET_SLOTS * slot_ms            (defaults: 10 * 1000 ms = 10 s)
 *   allowance = min_per_s * window_seconds
 *             + ratio * deposits_in_window
 *             - withdrawals_in_window
 *   a retry is allowed (and counted) when allowance >= 1.
 *
 * With the defaults (ratio 0.2, min_per_s 3) a fresh budget admits exactly 30
 * retries at one instant and refuses the 31st; 100 successes add exactly 20 more;
 * after a full window without traffic it is back to 30.
 *
 * With min_per_s 0 it is the hedge budget: deposit every call, withdraw every
 * hedge, and at most ratio of the calls in any window hedge (10,000 calls all
 * wanting one at ratio 0.05: exactly 500 do).
 *
 * The window is the slot holding `now` plus the 9 before it: an event counts from
 * its time until the end of the 10th slot, i.e. for 9 to 10 s with the defaults
 * (one made at t=0 counts at t=9999 and is gone at t=10000). Slots are evicted
 * lazily on each call with subtract-on-evict, so every call is O(1) whatever the
 * idle gap. Time that goes backwards is treated as the latest time seen.
 * The allowance is compared with a tolerance of ~1e-9 relative, so that
 * 0.29 * 100 counts as 29 and not 28.999999999999996. */
#ifndef STURDY_BUDGET_H
#define STURDY_BUDGET_H

#include <stdint.h>

#define ST_BUDGET_SLOTS 10

typedef struct st_budget {
    double ratio;          /* retries allowed per success in the window (default 0.2) */
    double min_per_s;      /* retries always allowed per second (default 3) */
    int64_t slot_ms;       /* slot width; window = ST_BUDGET_SLOTS * slot_ms (default 1000) */
    int64_t slot_start[ST_BUDGET_SLOTS];   /* start time of the period each slot holds; INT64_MIN = none */
    uint32_t deposits[ST_BUDGET_SLOTS];    /* successes in that slot (saturating) */
    uint32_t withdrawals[ST_BUDGET_SLOTS]; /* retries in that slot (saturating) */
    /* running sums over the live window, subtract-on-evict so reads are O(1) */
    uint64_t dep_sum, wd_sum;
} st_budget;

/* ratio and min_per_s below 0 or NaN become 0, above 1e12 become 1e12;
 * slot_ms < 1 becomes 1000. */
void st_budget_init(st_budget *b, double ratio, double min_per_s, int64_t slot_ms, int64_t now_ms);
/* A successful call (a first try or a retry that succeeded). */
void st_budget_deposit(st_budget *b, int64_t now_ms);
/* A retry wants to go: 1 = allowed (and counted), 0 = refused. */
int st_budget_try_withdraw(st_budget *b, int64_t now_ms);
/* The allowance now, floor-able (a value within the tolerance of an integer is
 * that integer). Negative when withdrawals outlive the deposits that paid for them. */
double st_budget_balance(st_budget *b, int64_t now_ms);

#endif
