/* Value conversion shared by the bindings (sturdy.core and sturdy.policy):
 * the compiled configuration read strictly into the decision core's structs,
 * and upstream stats, events, enums and defaults pushed as Lua tables. */
#ifndef STURDY_CONVERT_H
#define STURDY_CONVERT_H

#include <stdint.h>

#include <lua.h>

#include "decide.h"

/* Raises a message as it is, without the caller's position: the messages say
 * which option or argument is wrong, "file:line:" would only be noise. */
int sl_error(lua_State *L, const char *fmt, ...);

/* Reads the compiled configuration (lua/sturdy/options.lua makes it) at index t:
 * fields `retry` and `upstream`. Strict: a missing field, a wrong type, a NaN or
 * a value outside its C type raises, naming the field. */
void sl_read_policy(lua_State *L, int t, st_retry_policy *rp, st_upstream_config *uc);

/* Reads the compiled configuration's `budget` at index t (absent: returns 0 and
 * nothing changes) into a spend book that d owns from then on (so a raise
 * leaks nothing); returns 1. Strict as sl_read_policy. */
int sl_read_spend(lua_State *L, int t, st_decider *d, int64_t now_ms);

/* Pushes a spend's state: used (per cap name, in the window now), reserved
 * (usd, tokens), caps, passed (reservations it let through), refused. */
void sl_push_spend(lua_State *L, st_spend *s, int64_t now_ms);

/* A string field of table t, or NULL when absent; raises on another type. The
 * string stays alive while the table holds it. */
const char *sl_opt_string(lua_State *L, int t, const char *field);

/* Pushes the stats of an upstream: in-flight, queue, breaker, latency, limits. */
void sl_push_upstream_stats(lua_State *L, st_upstream *u, int64_t now_ms);
void sl_push_upstream_gauges(lua_State *L, st_upstream *u, int64_t now_ms);

/* Arguments of the fleet scope's methods: a time in ms (NaN and negatives are
 * 0, clamped to ST_RETRY_AFTER_MAX_MS) and a count (NaN and negatives are 0,
 * clamped to 2^53). */
lua_Number sl_ms_arg(lua_State *L, int i);
uint64_t sl_count_arg(lua_State *L, int i);

/* Pushes what a fleet scope adds to its store from u's breaker: calls, failures,
 * slow (counted since u was made), state ("closed", "open", "half_open") and
 * open_in (ms; 0 = its open time is over). Returns 5. */
int sl_push_fleet_counts(lua_State *L, st_upstream *u, int64_t now_ms);

/* Pushes an event as { type, key, ... }. */
void sl_push_event(lua_State *L, const st_event *ev);

/* The spend methods of both bindings, on decider d, arguments from index 2:
 *   sl_spend_settle (hold, usd, tokens) -> settled, events: the actual cost of
 *     a call whose result carried `hold`;
 *   sl_spend_charge (key, tag, usd, tokens) -> events: spend without a
 *     reservation in the scopes of the key and tag (nil: none);
 *   sl_push_budget  () -> { client = spend?, tags = { [tag] = spend }, expired },
 *     or nothing without spend caps.
 * Amounts must be numbers from 0 to 1e15 (nil: 0); events are lists of
 * sl_push_event tables. */
int sl_spend_settle(lua_State *L, st_decider *d, int64_t now_ms);
int sl_spend_charge(lua_State *L, st_decider *d, int64_t now_ms);
int sl_push_budget(lua_State *L, st_decider *d, int64_t now_ms);

/* Pushes the enum name lists the options schema checks against, and the
 * decision core's defaults in the compiled configuration's shape. */
void sl_push_enums(lua_State *L);
void sl_push_defaults(lua_State *L);

/* Headers as a table keyed by lowercase name from a "name\0value\0" block; a
 * repeated header becomes a list. A block cut short ends the table there. */
void sl_push_header_table(lua_State *L, const char *p, size_t len);

#endif
