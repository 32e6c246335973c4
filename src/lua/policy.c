/* sturdy.policy: the parts of sturdy every transport shares, without libcurl:
 * the SSE parser, the HTTP response-head parser, SHA-256 (cache keys), the
 * options' enums and defaults, the monotonic and wall clocks, windows
 * (sliding sums, latency percentiles) on a clock the caller passes in, and the
 * decision core with the request reader for transports written in Lua (decider.c).
 * Value conversion only; the logic lives in src/policy. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>

#include <lua.h>
#include <lauxlib.h>

#include "compat.h"
#include "convert.h"
#include "counts.h"
#include "decider.h"
#include "head.h"
#include "headers.h"
#include "latency.h"
#include "sha256.h"
#include "sse.h"

#define SSE_MT "sturdy.sse"
#define HEAD_MT SL_HEAD_MT
#define COUNTS_MT "sturdy.counts"
#define LATENCY_MT "sturdy.latency"

/* ---- header blocks -------------------------------------------------------- */

/* policy.header_table(block) -> { lowercase name = value | { values } } */
static int l_header_table(lua_State *L)
{
    size_t len;
    const char *raw = luaL_checklstring(L, 1, &len);
    sl_push_header_table(L, raw, len);
    return 1;
}

/* policy.status_line(line) -> status, version (1.0, 1.1, 2, 3) or nil */
static int l_status_line(lua_State *L)
{
    size_t len;
    const char *line = luaL_checklstring(L, 1, &len);
    int status, version;

    if (!st_status_line_parse(line, len, &status, &version))
        return 0;
    lua_pushinteger(L, status);
    lua_pushnumber(L, version / 10.0);
    return 2;
}

typedef sl_head l_head;

/* policy.head([max_bytes]) -> a response head being read line by line */
static int l_head_new(lua_State *L)
{
    lua_Number max = luaL_optnumber(L, 1, 0);
    l_head *lh = lua_newuserdata(L, sizeof *lh);

    memset(lh, 0, sizeof *lh);
    luaL_setmetatable(L, HEAD_MT);
    if (max > 0)
        lh->h.max_bytes = max < (lua_Number)SIZE_MAX / 2 ? (size_t)max : SIZE_MAX / 2;
    return 1;
}

/* head:add(line) -> true, or nil and "malformed" | "too_large" | "out of memory" */
static int l_head_add(lua_State *L)
{
    l_head *lh = luaL_checkudata(L, 1, HEAD_MT);
    size_t len;
    const char *line = luaL_checklstring(L, 2, &len);

    switch (st_headers_add_line(&lh->h, line, len)) {
    case ST_HEADERS_OK:
        lua_pushboolean(L, 1);
        return 1;
    case ST_HEADERS_MALFORMED:
        lua_pushnil(L);
        lua_pushliteral(L, "malformed");
        return 2;
    case ST_HEADERS_TOO_LARGE:
        lua_pushnil(L);
        lua_pushliteral(L, "too_large");
        return 2;
    default:
        return sl_error(L, "sturdy: out of memory");
    }
}

/* head:get(name) -> value of the first header of that name (any case), or nil */
static int l_head_get(lua_State *L)
{
    l_head *lh = luaL_checkudata(L, 1, HEAD_MT);
    const char *v = st_headers_find(&lh->h, luaL_checkstring(L, 2));
    if (v == NULL)
        return 0;
    lua_pushstring(L, v);
    return 1;
}

/* head:block() -> the "name\0value\0" block, as res.raw_headers carries it */
static int l_head_block(lua_State *L)
{
    l_head *lh = luaL_checkudata(L, 1, HEAD_MT);
    lua_pushlstring(L, lh->h.block.data ? lh->h.block.data : "", lh->h.block.len);
    return 1;
}

static int l_head_reset(lua_State *L)
{
    st_headers_reset(&((l_head *)luaL_checkudata(L, 1, HEAD_MT))->h);
    return 0;
}

static int l_head_gc(lua_State *L)
{
    st_headers_free(&((l_head *)luaL_checkudata(L, 1, HEAD_MT))->h);
    return 0;
}

static const luaL_Reg head_methods[] = {
    { "add", l_head_add },
    { "get", l_head_get },
    { "block", l_head_block },
    { "reset", l_head_reset },
    { NULL, NULL }
};

/* ---- SSE parser ----------------------------------------------------------- */

typedef struct l_sse {
    st_sse *p;
} l_sse;

static int l_sse_new(lua_State *L)
{
    lua_Number max = luaL_optnumber(L, 1, 0);
    l_sse *ls = lua_newuserdata(L, sizeof *ls);
    ls->p = NULL;
    luaL_setmetatable(L, SSE_MT);
    /* clamped before the cast: NaN, negatives and huge values are not sizes */
    ls->p = st_sse_new(max > 0 ? (max < (lua_Number)SIZE_MAX / 2 ? (size_t)max : SIZE_MAX / 2) : 0);
    if (ls->p == NULL)
        return sl_error(L, "sturdy: out of memory");
    return 1;
}

static int push_sse_event(void *ud, const st_sse_event *ev)
{
    lua_State *L = ud;
    lua_createtable(L, 0, 3);
    lua_pushlstring(L, ev->event, ev->event_len);
    lua_setfield(L, -2, "event");
    lua_pushlstring(L, ev->data, ev->data_len);
    lua_setfield(L, -2, "data");
    if (ev->id_len) {
        lua_pushlstring(L, ev->id, ev->id_len);
        lua_setfield(L, -2, "id");
    }
    lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
    return 0;
}

/* parser:feed(chunk) -> list of { event, data, id }; nil, message on error. */
static int l_sse_feed(lua_State *L)
{
    l_sse *ls = luaL_checkudata(L, 1, SSE_MT);
    size_t len;
    const char *chunk = luaL_checklstring(L, 2, &len);
    int rc;

    lua_newtable(L);
    rc = st_sse_feed(ls->p, chunk, len, push_sse_event, L);
    if (rc == ST_SSE_TOO_LARGE || rc == ST_SSE_NOMEM) {
        lua_pushnil(L);
        lua_pushstring(L, rc == ST_SSE_TOO_LARGE ? "an event is larger than the limit" : "out of memory");
        return 2;
    }
    return 1;
}

/* parser:finish() -> true when the stream ended inside an event. */
static int l_sse_finish(lua_State *L)
{
    l_sse *ls = luaL_checkudata(L, 1, SSE_MT);
    lua_pushboolean(L, st_sse_finish(ls->p));
    return 1;
}

static int l_sse_reset(lua_State *L)
{
    l_sse *ls = luaL_checkudata(L, 1, SSE_MT);
    st_sse_reset(ls->p);
    return 0;
}

static int l_sse_retry(lua_State *L)
{
    l_sse *ls = luaL_checkudata(L, 1, SSE_MT);
    long ms = st_sse_retry_ms(ls->p);
    if (ms < 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, ms / 1000.0);
    return 1;
}

static int l_sse_gc(lua_State *L)
{
    l_sse *ls = luaL_checkudata(L, 1, SSE_MT);
    st_sse_free(ls->p);
    ls->p = NULL;
    return 0;
}

static const luaL_Reg sse_methods[] = {
    { "feed", l_sse_feed },
    { "finish", l_sse_finish },
    { "reset", l_sse_reset },
    { "retry", l_sse_retry },
    { NULL, NULL }
};

/* ---- windows on the caller's clock --------------------------------------- */

/* 2^53 ms: beyond it a double no longer holds every millisecond */
#define MAX_MS 9007199254740992.0

/* Seconds (argument i) to milliseconds, clamped before the conversion. */
static int64_t check_ms(lua_State *L, int i, const char *what)
{
    lua_Number s = luaL_checknumber(L, i);
    double ms;
    if (s != s)
        luaL_argerror(L, i, lua_pushfstring(L, "%s must be a number, got NaN", what));
    ms = floor(s * 1000.0);
    if (ms > MAX_MS)
        ms = MAX_MS;
    if (ms < -MAX_MS)
        ms = -MAX_MS;
    return (int64_t)ms;
}

/* A window's slot count and width (arguments i, i+1), checked. */
static unsigned check_slots(lua_State *L, int i, unsigned max)
{
    lua_Number n = luaL_checknumber(L, i);
    if (!(n >= 1 && n <= max) || n != floor(n))
        luaL_argerror(L, i, lua_pushfstring(L, "slots must be a whole number from 1 to %d", (int)max));
    return (unsigned)n;
}

static int64_t check_slot_ms(lua_State *L, int i)
{
    lua_Number s = luaL_checknumber(L, i);
    if (!(s >= 0.001 && s <= 315360000.0))
        luaL_argerror(L, i, "slot width must be seconds from 0.001 to 315360000");
    return (int64_t)ceil(s * 1000.0);
}

typedef struct l_counts {
    st_counts *c;
    unsigned n;
} l_counts;

/* policy.counts(slots, slot_seconds, n[, now]) -> sliding sums of n counters
 * over slots * slot_seconds (see src/policy/counts.h); times in seconds. */
static int l_counts_new(lua_State *L)
{
    unsigned slots = check_slots(L, 1, ST_COUNTS_MAX_SLOTS);
    int64_t slot_ms = check_slot_ms(L, 2);
    lua_Number n = luaL_checknumber(L, 3);
    int64_t now = lua_isnoneornil(L, 4) ? 0 : check_ms(L, 4, "now");
    l_counts *lc;
    if (!(n >= 1 && n <= ST_COUNTS_MAX_N) || n != floor(n))
        return luaL_argerror(L, 3, "counters must be a whole number from 1 to 64");
    lc = lua_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    lc->n = (unsigned)n;
    luaL_setmetatable(L, COUNTS_MT);
    lc->c = st_counts_new(slots, slot_ms, lc->n, now);
    if (lc->c == NULL)
        return luaL_error(L, "sturdy: out of memory");
    return 1;
}

static l_counts *check_counts(lua_State *L)
{
    l_counts *lc = luaL_checkudata(L, 1, COUNTS_MT);
    if (lc->c == NULL)
        luaL_error(L, "sturdy: the window is freed");
    return lc;
}

/* counts:add(now, i, v) -> true, or false when v is refused (not finite, negative) */
static int l_counts_add(lua_State *L)
{
    l_counts *lc = check_counts(L);
    int64_t now = check_ms(L, 2, "now");
    lua_Number i = luaL_checknumber(L, 3);
    if (!(i >= 1 && i <= lc->n) || i != floor(i))
        return luaL_argerror(L, 3, "no such counter");
    lua_pushboolean(L, st_counts_add(lc->c, now, (unsigned)i - 1, luaL_checknumber(L, 4)));
    return 1;
}

/* counts:sums(now) -> the n sums over the window */
static int l_counts_sums(lua_State *L)
{
    l_counts *lc = check_counts(L);
    double out[ST_COUNTS_MAX_N];
    unsigned i;
    st_counts_sums(lc->c, check_ms(L, 2, "now"), out);
    luaL_checkstack(L, (int)lc->n, "too many counters");
    for (i = 0; i < lc->n; i++)
        lua_pushnumber(L, out[i]);
    return (int)lc->n;
}

static int l_counts_gc(lua_State *L)
{
    l_counts *lc = luaL_checkudata(L, 1, COUNTS_MT);
    st_counts_free(lc->c);
    lc->c = NULL;
    return 0;
}

static const luaL_Reg counts_methods[] = {
    { "add", l_counts_add },
    { "sums", l_counts_sums },
    { NULL, NULL }
};

typedef struct l_latency {
    st_latency *l;
} l_latency;

/* policy.latency(slots, slot_seconds[, now]) -> a latency window (see
 * src/policy/latency.h); times and values in seconds. */
static int l_latency_new(lua_State *L)
{
    unsigned slots = check_slots(L, 1, ST_LATENCY_MAX_SLOTS);
    int64_t slot_ms = check_slot_ms(L, 2);
    int64_t now = lua_isnoneornil(L, 3) ? 0 : check_ms(L, 3, "now");
    l_latency *ll = lua_newuserdata(L, sizeof *ll);
    ll->l = NULL;
    luaL_setmetatable(L, LATENCY_MT);
    ll->l = st_latency_new(slots, slot_ms, now);
    if (ll->l == NULL)
        return luaL_error(L, "sturdy: out of memory");
    return 1;
}

static st_latency *check_latency(lua_State *L)
{
    l_latency *ll = luaL_checkudata(L, 1, LATENCY_MT);
    if (ll->l == NULL)
        luaL_error(L, "sturdy: the window is freed");
    return ll->l;
}

/* latency:record(now, seconds): a negative or NaN value is refused (false) */
static int l_latency_record(lua_State *L)
{
    st_latency *l = check_latency(L);
    int64_t now = check_ms(L, 2, "now");
    lua_Number v = luaL_checknumber(L, 3);
    double us;
    if (!(v >= 0)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    us = v * 1e6 + 0.5;
    st_latency_record(l, now, us >= (double)ST_LATENCY_MAX_US ? ST_LATENCY_MAX_US : (uint64_t)us);
    lua_pushboolean(L, 1);
    return 1;
}

/* latency:query(now, q) -> count in the window, and the q-quantile in seconds
 * (nil when the window is empty) */
static int l_latency_query(lua_State *L)
{
    st_latency *l = check_latency(L);
    int64_t now = check_ms(L, 2, "now");
    lua_Number q = luaL_checknumber(L, 3);
    double qs[1];
    uint64_t out[1], count;
    if (!(q >= 0 && q <= 1))
        return luaL_argerror(L, 3, "a quantile from 0 to 1");
    qs[0] = q;
    count = st_latency_query(l, now, qs, 1, out, NULL);
    lua_pushnumber(L, (lua_Number)count);
    if (count == 0)
        return 1;
    lua_pushnumber(L, out[0] / 1e6);
    return 2;
}

static int l_latency_gc(lua_State *L)
{
    l_latency *ll = luaL_checkudata(L, 1, LATENCY_MT);
    st_latency_free(ll->l);
    ll->l = NULL;
    return 0;
}

static const luaL_Reg latency_methods[] = {
    { "record", l_latency_record },
    { "query", l_latency_query },
    { NULL, NULL }
};

/* policy.sha256(s) -> the SHA-256 digest of s as 64 lowercase hex digits */
static int l_sha256(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    unsigned char digest[ST_SHA256_DIGEST];
    char hex[ST_SHA256_HEX];

    st_sha256_digest(s, len, digest);
    st_sha256_hex(digest, hex);
    lua_pushlstring(L, hex, ST_SHA256_HEX - 1);
    return 1;
}

/* Monotonic seconds, for timeouts measured in Lua. */
static int l_monotime(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + ts.tv_nsec / 1e9);
    return 1;
}

/* Wall-clock seconds since the epoch, to the microsecond (logs, spans). */
static int l_walltime(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + ts.tv_nsec / 1e9);
    return 1;
}

/* policy.enums() -> the name lists the options schema checks against */
static int l_enums(lua_State *L)
{
    sl_push_enums(L);
    return 1;
}

/* policy.defaults() -> the decision core's defaults, in the compiled configuration's shape */
static int l_defaults(lua_State *L)
{
    sl_push_defaults(L);
    return 1;
}

/* policy.sleep(seconds): blocks the thread that long (at most a day), for
 * waits where nothing else can wait (a chain waiting for a cooldown while its
 * client is idle: client:poll returns at once then). Never inside nginx:
 * ngx.sleep yields instead. */
static int l_sleep(lua_State *L)
{
    lua_Number s = luaL_checknumber(L, 1);
    struct timespec ts;

    if (!(s >= 0))
        return luaL_error(L, "sturdy: sleep takes seconds >= 0, got %f", (double)s);
    if (s > 86400)
        s = 86400;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (lua_Number)ts.tv_sec) * 1e9);
    if (ts.tv_nsec > 999999999L)
        ts.tv_nsec = 999999999L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
    return 0;
}

/* policy.isatty(fd) -> whether fd is a terminal (progress lines) */
static int l_isatty(lua_State *L)
{
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
    return 1;
}

static const luaL_Reg policy_functions[] = {
    { "isatty", l_isatty },
    { "sleep", l_sleep },
    { "enums", l_enums },
    { "defaults", l_defaults },
    { "sse", l_sse_new },
    { "head", l_head_new },
    { "header_table", l_header_table },
    { "status_line", l_status_line },
    { "sha256", l_sha256 },
    { "monotime", l_monotime },
    { "walltime", l_walltime },
    { "counts", l_counts_new },
    { "latency", l_latency_new },
    { NULL, NULL }
};

static void new_class(lua_State *L, const char *name, lua_CFunction gc, const luaL_Reg *methods)
{
    luaL_newmetatable(L, name);
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

ST_EXPORT int luaopen_sturdy_policy(lua_State *L);

ST_EXPORT int luaopen_sturdy_policy(lua_State *L)
{
    new_class(L, SSE_MT, l_sse_gc, sse_methods);
    new_class(L, HEAD_MT, l_head_gc, head_methods);
    new_class(L, COUNTS_MT, l_counts_gc, counts_methods);
    new_class(L, LATENCY_MT, l_latency_gc, latency_methods);
    luaL_newlib(L, policy_functions);
    sl_open_decider(L);
    return 1;
}
