/* sturdy.core: the binding of the curl engine. Value conversion only: Lua
 * values into engine structs (checked here too, since the module is public),
 * results, notices and stats back into tables. No Lua code runs while the
 * engine works: hooks and callbacks run from what `take` hands to Lua. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "compat.h"
#include "convert.h"
#include "engine.h"
#include "httpdate.h"
#include "request.h"

#define ENGINE_MT "sturdy.engine"
#define REQUEST_MT "sturdy.request"
#define DETAIL_MT "sturdy.result_detail"
#define MAX_FDS 1024
#define MAX_HEADERS SL_MAX_HEADERS

typedef struct l_engine {
    st_engine *e;
    sl_client client;      /* base URL, key, timeouts: what every request starts from */
    st_buf scratch;        /* strings built for the request being read */
    sl_lines lines;        /* the client's header lines */
} l_engine;

/* A submitted request. While in flight its handle (a Lua table) is referenced
 * from the registry, so a handle nobody holds still completes. */
typedef struct l_request {
    st_request *r;   /* NULL once finished and taken, or detached by close */
    l_engine *le;
    int ref;         /* registry reference to the handle while in flight */
    unsigned last;   /* once taken: the attempt it ended with */
} l_request;

#define check_engine(L, i) ((l_engine *)luaL_checkudata((L), (i), ENGINE_MT))
#define check_request(L, i) ((l_request *)luaL_checkudata((L), (i), REQUEST_MT))

static l_engine *open_engine(lua_State *L, int i)
{
    l_engine *le = check_engine(L, i);
    if (le->e == NULL)
        sl_error(L, "sturdy: the client is closed");
    return le;
}

static void set_num(lua_State *L, const char *k, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, double v)
{
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

/* ---- engine --------------------------------------------------------------- */

/* core.engine(config) -> engine; config as lua/sturdy/options.lua compiles it */
static int l_engine_new(lua_State *L)
{
    st_transport_config tc;
    st_retry_policy policy;
    st_upstream_config upstream;
    l_engine *le;
    uint64_t seed;
    lua_Number seed_n;
    char err[256];
    int t;

    luaL_checktype(L, 1, LUA_TTABLE);
    sl_read_policy(L, 1, &policy, &upstream);
    lua_getfield(L, 1, "transport");
    luaL_checktype(L, -1, LUA_TTABLE);
    t = lua_gettop(L);
    memset(&tc, 0, sizeof tc);
    tc.ca_file = sl_opt_string(L, t, "ca_file");
    tc.ca_path = sl_opt_string(L, t, "ca_path");
    tc.client_cert = sl_opt_string(L, t, "client_cert");
    tc.client_key = sl_opt_string(L, t, "client_key");
    tc.client_key_password = sl_opt_string(L, t, "client_key_password");
    tc.proxy = sl_opt_string(L, t, "proxy");
    tc.no_proxy = sl_opt_string(L, t, "no_proxy");
    tc.user_agent = sl_opt_string(L, t, "user_agent");

    /* the userdata exists in a safe state before anything can fail */
    le = lua_newuserdata(L, sizeof *le);
    memset(le, 0, sizeof *le);
    luaL_setmetatable(L, ENGINE_MT);
    lua_getfield(L, t, "headers");
    sl_lines_read(L, -1, &le->lines);
    lua_pop(L, 1);
    sl_client_read(L, 1, &le->client);

    lua_getfield(L, 1, "seed");
    seed_n = lua_isnil(L, -1) ? 0 : luaL_checknumber(L, -1);
    lua_pop(L, 1);
    if (!(seed_n >= 0 && seed_n < 9007199254740992.0))
        return sl_error(L, "sturdy: option 'seed' must be a whole number below 2^53");
    seed = (uint64_t)seed_n;
    if (seed == 0) /* no seed asked for: jitter must differ between clients and processes */
        seed = (uint64_t)(uintptr_t)le ^ ((uint64_t)time(NULL) << 20) ^ ((uint64_t)getpid() << 40);
    le->e = st_engine_new(&tc, &policy, &upstream, seed, err, sizeof err);
    if (le->e == NULL)
        return sl_error(L, "sturdy: %s", err);
    sl_read_spend(L, 1, st_engine_decider(le->e), st_engine_now_ms());
    lua_getfield(L, 1, "notices");
    if (lua_istable(L, -1)) {
        int retries, events;
        lua_getfield(L, -1, "retries");
        retries = lua_toboolean(L, -1);
        lua_getfield(L, -2, "events");
        events = lua_toboolean(L, -1);
        lua_pop(L, 2);
        st_engine_want_notices(le->e, retries, events);
    }
    lua_pop(L, 1);
    return 1;
}

/* Reads the request at idx (its encoded JSON body at body_idx, or 0) into spec. */
static void read_request(lua_State *L, l_engine *le, int idx, int body_idx, st_request_spec *spec,
                         const char **headers)
{
    const char *own[SL_MAX_HEADERS];
    sl_request req;

    sl_request_read(L, idx, body_idx, &le->client, &le->scratch, own, &req);
    memset(spec, 0, sizeof *spec);
    spec->method = req.method;
    spec->url = req.url;
    spec->key = req.key;
    spec->body = req.body;
    spec->body_len = req.body_len;
    spec->nheaders = sl_assemble_headers(L, &le->lines, &req, headers);
    headers[spec->nheaders++] = "Expect:"; /* libcurl's 100-continue only adds a round trip for API calls */
    spec->headers = headers;
    spec->connect_ms = req.timeout_ms[0];
    spec->first_byte_ms = req.timeout_ms[1];
    spec->idle_ms = req.timeout_ms[2];
    spec->total_ms = req.timeout_ms[3];
    spec->max_response = req.max_response > 0 && req.max_response < (double)SIZE_MAX ? (size_t)req.max_response : 0;
    spec->attempts = req.attempts;
    spec->stream = req.stream == SL_STREAM_MANUAL ? ST_STREAM_MANUAL
                 : req.stream == SL_STREAM_AUTO ? ST_STREAM_AUTO : ST_STREAM_NONE;
    spec->priority = req.priority;
    spec->input_tokens = req.tokens_in;
    spec->output_tokens = req.tokens_out;
    spec->tag = req.tag;
    spec->reserve_usd = req.reserve_usd;
    /* without a figure of its own, the token estimates are the worst case */
    spec->reserve_tokens = req.reserve_tokens >= 0 ? req.reserve_tokens : req.tokens_in + req.tokens_out;
}

/* engine:submit(handle, request, json_body, held) -> request userdata. Checks
 * the request table and starts it without waiting; json_body is its `json`
 * already encoded (or nil). A held request waits for request:gate. */
static int l_engine_submit(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *headers[MAX_HEADERS];
    st_request_spec spec;
    l_request *lr;
    char err[256];
    int held = lua_toboolean(L, 5); /* before read_request pushes the fields it reads */

    luaL_checktype(L, 2, LUA_TTABLE);
    read_request(L, le, 3, lua_isnoneornil(L, 4) ? 0 : 4, &spec, headers);
    spec.held = held;
    lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    lr->le = le;
    lr->ref = LUA_NOREF;
    lr->last = 0;
    luaL_setmetatable(L, REQUEST_MT);
    lr->r = st_engine_submit(le->e, &spec, err, sizeof err);
    if (lr->r == NULL)
        return sl_error(L, "sturdy: %s", err);
    st_request_set_userdata(lr->r, lr);
    lua_pushvalue(L, 2);
    lr->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

/* engine:check(request, json_body): raises as submit would, sends nothing. */
static int l_engine_check(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *headers[MAX_HEADERS];
    st_request_spec spec;
    read_request(L, le, 2, lua_isnoneornil(L, 3) ? 0 : 3, &spec, headers);
    return 0;
}

/* engine:key_for(request) -> the upstream key the request would go under */
static int l_engine_key_for(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    sl_push_request_key(L, 2, &le->client);
    return 1;
}

/* engine:step(max_wait_ms) -> active, ready: requests still active, and whether
 * take() has anything (finished requests, body bytes, notices). */
static int l_engine_step(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    lua_Number wait = luaL_optnumber(L, 2, 0);
    int active = st_engine_step(le->e, wait > 0 ? (int64_t)(wait < 1e9 ? wait : 1e9) : 0);

    lua_pushinteger(L, active);
    lua_pushboolean(L, st_engine_ready(le->e));
    return 2;
}

/* The parts of a result most callers never read (timings, attempts, the
 * header block, ids, HTTP version) are kept in one userdata and made into Lua
 * values on first access (see Response.__index in init.lua): one allocation
 * per call instead of several tables. */
typedef struct l_detail {
    st_timings timings;
    int http_version;
    size_t nattempts;
    size_t headers_len, key_len, id_len; /* the bytes follow the attempts */
    st_attempt attempts[1];              /* nattempts of them (at least room for one) */
} l_detail;

static char *detail_bytes(l_detail *d)
{
    return (char *)&d->attempts[d->nattempts ? d->nattempts : 1];
}

static void push_detail(lua_State *L, const st_result *res)
{
    size_t n = res->nattempts ? res->nattempts : 1, key_len = strlen(res->key), id_len = strlen(res->request_id);
    size_t size = offsetof(l_detail, attempts) + n * sizeof(st_attempt) + res->headers_len + key_len + id_len;
    l_detail *d = lua_newuserdata(L, size);
    char *p;

    luaL_setmetatable(L, DETAIL_MT);
    d->timings = res->timings;
    d->http_version = res->http_version;
    d->nattempts = res->nattempts;
    d->headers_len = res->headers_len;
    d->key_len = key_len;
    d->id_len = id_len;
    if (res->nattempts)
        memcpy(d->attempts, res->attempts, res->nattempts * sizeof(st_attempt));
    p = detail_bytes(d);
    memcpy(p, res->headers, res->headers_len);
    memcpy(p + res->headers_len, res->key, key_len);
    memcpy(p + res->headers_len + key_len, res->request_id, id_len);
}

/* detail:get(name) -> the value of a lazy result field, or nil */
static int l_detail_get(lua_State *L)
{
    l_detail *d = luaL_checkudata(L, 1, DETAIL_MT);
    const char *k = luaL_checkstring(L, 2), *p = detail_bytes(d);
    size_t i;

    if (strcmp(k, "timings") == 0) {
        lua_createtable(L, 0, 5);
        set_num(L, "dns", d->timings.dns);
        set_num(L, "connect", d->timings.connect);
        set_num(L, "tls", d->timings.tls);
        set_num(L, "ttfb", d->timings.ttfb);
        set_num(L, "total", d->timings.total);
    } else if (strcmp(k, "attempts") == 0) {
        lua_createtable(L, (int)d->nattempts, 0);
        for (i = 0; i < d->nattempts; i++) {
            const st_attempt *a = &d->attempts[i];
            lua_createtable(L, 0, 6);
            if (a->status > 0)
                set_int(L, "status", a->status);
            if (a->kind)
                set_str(L, "kind", a->kind);
            set_num(L, "delay", a->delay_ms / 1000.0);
            if (a->hinted) {
                lua_pushboolean(L, 1);
                lua_setfield(L, -2, "hinted");
            }
            if (a->total > 0) {
                set_num(L, "ttfb", a->ttfb);
                set_num(L, "latency", a->total);
            }
            lua_rawseti(L, -2, (int)i + 1);
        }
    } else if (strcmp(k, "raw_headers") == 0) {
        lua_pushlstring(L, p, d->headers_len);
    } else if (strcmp(k, "key") == 0) {
        lua_pushlstring(L, p + d->headers_len, d->key_len);
    } else if (strcmp(k, "request_id") == 0 && d->id_len) {
        lua_pushlstring(L, p + d->headers_len + d->key_len, d->id_len);
    } else if (strcmp(k, "http_version") == 0 && d->http_version) {
        lua_pushnumber(L, d->http_version / 10.0);
    } else {
        lua_pushnil(L);
    }
    return 1;
}

static void push_result(lua_State *L, st_request *r)
{
    st_result res;

    st_request_result(r, &res);
    lua_createtable(L, 0, res.outcome.kind ? 12 : 3);
    if (res.status > 0)
        set_int(L, "status", res.status);
    if (res.spend_id)
        set_int(L, "hold", (double)res.spend_id);
    lua_pushlstring(L, res.body, res.body_len);
    lua_setfield(L, -2, "body");
    push_detail(L, &res);
    lua_setfield(L, -2, "_detail");
    if (res.outcome.kind == NULL)
        return;
    set_str(L, "kind", res.outcome.kind);
    set_str(L, "class", st_class_name(res.outcome.cls));
    set_str(L, "detail", res.detail);
    if (res.retry_after >= 0)
        set_num(L, "retry_after", res.retry_after);
    lua_pushboolean(L, res.committed);
    lua_setfield(L, -2, "committed");
    lua_pushboolean(L, res.retryable);
    lua_setfield(L, -2, "retryable");
    lua_pushboolean(L, res.from_status);
    lua_setfield(L, -2, "from_status");
    if (res.stop)
        set_str(L, "stopped", res.stop);
}

static void push_notice(lua_State *L, const st_notice *n)
{
    if (n->type == ST_NOTICE_EVENT) {
        lua_pushliteral(L, "event");
        sl_push_event(L, &n->event);
        return;
    }
    lua_pushliteral(L, "retry");
    lua_createtable(L, 0, 7);
    set_str(L, "key", n->retry.key);
    set_int(L, "attempt", n->retry.attempt);
    set_str(L, "class", st_class_name(n->retry.cls));
    set_str(L, "kind", n->retry.kind);
    if (n->retry.status > 0)
        set_int(L, "status", n->retry.status);
    set_num(L, "delay", n->retry.delay_ms / 1000.0);
    lua_pushboolean(L, n->retry.hinted);
    lua_setfield(L, -2, "hinted");
    if (n->retry.request) {
        /* its handle: the request is alive until its end is taken, after this */
        l_request *lr = st_request_userdata(n->retry.request);
        if (lr != NULL && lr->ref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, lr->ref);
            lua_setfield(L, -2, "handle");
        }
    }
}

static void append(lua_State *L, int list, int *n, int count)
{
    /* the top `count` values go to list[n+1 .. n+4], padded with false */
    int k;
    for (k = count; k < 4; k++)
        lua_pushboolean(L, 0);
    for (k = 4; k >= 1; k--)
        lua_rawseti(L, list, *n + k);
    *n += 4;
}

/* engine:take(queue, n) -> n, more: appends what is ready for Lua to
 * queue[n+1 ...], in order, four slots each, and returns the new length:
 *   "retry", info | "event", event         (notices, oldest first)
 *   "data", handle, chunk, attempt         (streamed body bytes)
 *   "done", handle, result                 (a finished request; its handle's
 *                                           registry reference is released)
 * Finished requests come only in a take without body bytes, so a stream reader
 * sees the last bytes (and may still judge the attempt) before the end.
 * `more` is true when more is ready. */
static int l_engine_take(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_engine *e = le->e;
    st_notice notice;
    st_request *streams[256], *r;
    size_t ns, i;
    int list = 2, n;

    luaL_checktype(L, 2, LUA_TTABLE);
    {
        lua_Integer at = luaL_checkinteger(L, 3);
        /* the count grows by 4 per item: far below INT_MAX, so it cannot overflow */
        luaL_argcheck(L, at >= 0 && at <= (1 << 30), 3, "queue length out of range");
        n = (int)at;
    }
    while (st_engine_take_notice(e, &notice)) {
        push_notice(L, &notice);
        append(L, list, &n, 2);
    }
    ns = st_engine_streams(e, streams, 256);
    if (ns > 256)
        ns = 256; /* the rest come with the next call */
    for (i = 0; i < ns; i++) {
        l_request *lr = st_request_userdata(streams[i]);
        size_t len;
        const char *p = st_request_pending_body(streams[i], &len);
        lua_pushliteral(L, "data");
        lua_rawgeti(L, LUA_REGISTRYINDEX, lr->ref);
        lua_pushlstring(L, p, len);
        lua_pushinteger(L, (lua_Integer)st_request_attempt(streams[i]));
        st_request_body_delivered(streams[i]);
        append(L, list, &n, 4);
    }
    while (ns == 0 && (r = st_engine_take_done(e)) != NULL) {
        l_request *lr = st_request_userdata(r);
        lua_pushliteral(L, "done");
        lua_rawgeti(L, LUA_REGISTRYINDEX, lr->ref);
        push_result(L, r);
        append(L, list, &n, 3);
        lr->r = NULL;
        lr->last = st_request_current(r, st_request_attempt(r)) ? st_request_attempt(r) : 0;
        st_request_free(r);
        luaL_unref(L, LUA_REGISTRYINDEX, lr->ref);
        lr->ref = LUA_NOREF;
    }
    lua_pushinteger(L, n);
    lua_pushboolean(L, st_engine_ready(e));
    return 2;
}

/* engine:cancel_all(): every unfinished request ends as canceled (take hands them out). */
static int l_engine_cancel_all(lua_State *L)
{
    st_engine_cancel_all(open_engine(L, 1)->e);
    return 0;
}

static int l_engine_fds(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_fd fds[MAX_FDS];
    size_t n = st_engine_fds(le->e, fds, MAX_FDS), i;

    if (n > MAX_FDS)
        n = MAX_FDS;
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
        lua_createtable(L, 0, 3);
        set_int(L, "fd", fds[i].fd);
        lua_pushboolean(L, fds[i].events & ST_FD_READ);
        lua_setfield(L, -2, "read");
        lua_pushboolean(L, (fds[i].events & ST_FD_WRITE) != 0);
        lua_setfield(L, -2, "write");
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

/* engine:timeout() -> ms until the engine needs driving, or nil when idle. */
static int l_engine_timeout(lua_State *L)
{
    int64_t t = st_engine_timeout(open_engine(L, 1)->e);
    if (t < 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, (lua_Number)t);
    return 1;
}

static int l_engine_stats(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_engine_stats s;

    st_engine_stats_get(le->e, &s);
    lua_createtable(L, 0, 8);
    set_int(L, "requests", (double)s.requests);
    set_int(L, "attempts", (double)s.attempts);
    set_int(L, "retries", (double)s.retries);
    set_int(L, "connections", (double)s.connections);
    set_int(L, "running", s.running);
    set_int(L, "waiting", s.waiting);
    set_int(L, "queued", s.queued);
    set_int(L, "done", s.done);
    return 1;
}

/* The table push makes of the key at 2, or nothing when no request named it. */
static int push_upstream(lua_State *L, void (*push)(lua_State *, st_upstream *, int64_t))
{
    l_engine *le = open_engine(L, 1);
    st_upstream *u = st_decider_find(st_engine_decider(le->e), luaL_checkstring(L, 2));

    if (u == NULL)
        return 0;
    push(L, u, st_engine_now_ms());
    return 1;
}

/* engine:upstream_stats(key) -> table, or nil when no request named the key. */
static int l_engine_upstream_stats(lua_State *L)
{
    return push_upstream(L, sl_push_upstream_stats);
}

/* engine:upstream_gauges(key) -> the gauges of upstream_stats alone, or nil. */
static int l_engine_upstream_gauges(lua_State *L)
{
    return push_upstream(L, sl_push_upstream_gauges);
}

/* engine:correct(key, dimension, delta): real usage known after a reply
 * corrects the key's token buckets by (actual - estimated). */
static int l_engine_correct(lua_State *L)
{
    static const char *const dims[] = { "requests", "input_tokens", "output_tokens", "tokens", NULL };
    l_engine *le = open_engine(L, 1);
    st_upstream *u = st_decider_find(st_engine_decider(le->e), luaL_checkstring(L, 2));
    int d = luaL_checkoption(L, 3, NULL, dims);
    lua_Number delta = luaL_checknumber(L, 4);

    if (u != NULL && delta == delta && delta != 0)
        st_limiter_correct(&u->limiter, st_engine_now_ms(), (st_dim)d, delta);
    return 0;
}

static void push_key(void *ud, st_upstream *u)
{
    lua_State *L = ud;
    lua_pushstring(L, u->name);
    lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
}

/* engine:keys() -> the upstream keys requests have named. */
static int l_engine_keys(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    lua_newtable(L);
    st_decider_each(st_engine_decider(le->e), push_key, L);
    return 1;
}

/* engine:want_notices(retries, events): queue those notices for take (off
 * when nobody listens: they cost a table each). */
static int l_engine_want_notices(lua_State *L)
{
    st_engine_want_notices(open_engine(L, 1)->e, lua_toboolean(L, 2), lua_toboolean(L, 3));
    return 0;
}

/* ---- the fleet scope (sturdy.shared) -------------------------------------- */

/* engine:open_until(key, ms): the fleet's breaker for key is open for ms more. */
static int l_engine_open_until(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *key = luaL_checkstring(L, 2);
    int64_t ms = (int64_t)ceil(sl_ms_arg(L, 3));
    if (!st_engine_open_until(le->e, key, st_engine_now_ms() + ms))
        return luaL_error(L, "sturdy: out of memory");
    return 0;
}

/* engine:fleet_window(key, calls, failures, slow) -> opened: the fleet's window. */
static int l_engine_fleet_window(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *key = luaL_checkstring(L, 2);
    lua_pushboolean(L, st_engine_fleet_window(le->e, key, sl_count_arg(L, 3), sl_count_arg(L, 4), sl_count_arg(L, 5)));
    return 1;
}

/* engine:share(key, n): this process paces key's limits at limit / n. */
static int l_engine_share(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *key = luaL_checkstring(L, 2);
    if (!st_engine_share(le->e, key, luaL_checknumber(L, 3)))
        return luaL_error(L, "sturdy: out of memory");
    return 0;
}

/* engine:fleet_counts(key) -> calls, failures, slow, state, open_in: see
 * sl_push_fleet_counts; nothing for a key no request named. */
static int l_engine_fleet_counts(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_upstream *u = st_decider_find(st_engine_decider(le->e), luaL_checkstring(L, 2));

    if (u == NULL)
        return 0;
    return sl_push_fleet_counts(L, u, st_engine_now_ms());
}

static int l_engine_active(lua_State *L)
{
    lua_pushinteger(L, st_engine_active(open_engine(L, 1)->e));
    return 1;
}

/* engine:close(): frees the engine. Requests still held by Lua are let go
 * first, so none points into a freed engine. Take what is done first. */
static int l_engine_close(lua_State *L)
{
    l_engine *le = check_engine(L, 1);
    st_request *r;

    if (le->e) {
        st_engine_cancel_all(le->e);
        while ((r = st_engine_take_done(le->e)) != NULL) {
            l_request *lr = st_request_userdata(r);
            lr->r = NULL;
            if (lr->ref != LUA_NOREF)
                luaL_unref(L, LUA_REGISTRYINDEX, lr->ref);
            lr->ref = LUA_NOREF;
            st_request_free(r);
        }
        st_engine_free(le->e);
        le->e = NULL;
    }
    sl_lines_free(&le->lines);
    sl_client_free(&le->client);
    st_buf_free(&le->scratch);
    return 0;
}

static int l_engine_tostring(lua_State *L)
{
    l_engine *le = check_engine(L, 1);
    lua_pushfstring(L, "sturdy.engine (%s)", le->e ? "open" : "closed");
    return 1;
}

/* engine:settle(hold, usd, tokens) -> settled, events: the actual cost of a
 * call whose result carried `hold`. */
static int l_engine_settle(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    return sl_spend_settle(L, st_engine_decider(le->e), st_engine_now_ms());
}

/* engine:charge(key, tag, usd, tokens) -> events: spend without a reservation
 * (a cancelled hedge's input) in the scopes of the key and tag (nil: none). */
static int l_engine_charge(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    return sl_spend_charge(L, st_engine_decider(le->e), st_engine_now_ms());
}

/* engine:budget() -> { client = spend?, tags = { [tag] = spend } }, or nil
 * without spend caps. */
static int l_engine_budget(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    return sl_push_budget(L, st_engine_decider(le->e), st_engine_now_ms());
}

/* ---- requests ------------------------------------------------------------- */

/* request:cancel() -> true when it ended the call, false when its end stands */
static int l_request_cancel(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    lua_pushboolean(L, lr->r != NULL && lr->le->e != NULL && st_engine_cancel(lr->le->e, lr->r));
    return 1;
}

/* request:current(attempt) -> whether bytes of that attempt, taken earlier,
 * may still reach the caller (no retry of it since, see st_request_current) */
static int l_request_current(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    lua_Integer attempt = luaL_checkinteger(L, 2);
    int ok;
    if (attempt < 1 || (lua_Integer)(unsigned)attempt != attempt)
        ok = 0;
    else if (lr->r != NULL && lr->le->e != NULL)
        ok = st_request_current(lr->r, (unsigned)attempt);
    else
        ok = (unsigned)attempt == lr->last; /* taken: the end, which comes after these bytes, says */
    lua_pushboolean(L, ok);
    return 1;
}

/* request:received() -> bytes of the current attempt's response so far */
static int l_request_received(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    lua_pushnumber(L, lr->r != NULL ? (lua_Number)st_request_received(lr->r) : 0);
    return 1;
}

/* A hedge policy { after = ms | nil, quantile =, max_ratio = } at index i. */
static void read_hedge_policy(lua_State *L, int i, st_hedge_policy *p)
{
    lua_Number v;
    luaL_checktype(L, i, LUA_TTABLE);
    lua_getfield(L, i, "after");
    v = lua_isnil(L, -1) ? -1 : luaL_checknumber(L, -1);
    if (!(v == -1 || (v >= 0 && v <= (lua_Number)ST_RETRY_AFTER_MAX_MS)))
        sl_error(L, "sturdy: hedge 'after' must be a number of ms from 0 to %d", (int)ST_RETRY_AFTER_MAX_MS);
    p->after_ms = v < 0 ? -1 : (int64_t)ceil(v);
    lua_getfield(L, i, "quantile");
    v = lua_isnil(L, -1) ? 0.95 : luaL_checknumber(L, -1);
    if (!(v >= 0 && v <= 1))
        sl_error(L, "sturdy: hedge 'quantile' must be a number from 0 to 1");
    p->quantile = v;
    lua_getfield(L, i, "max_ratio");
    v = luaL_checknumber(L, -1);
    if (!(v >= 0 && v <= 1))
        sl_error(L, "sturdy: hedge 'max_ratio' must be a number from 0 to 1");
    p->max_ratio = v;
    lua_pop(L, 3);
}

/* request:hedge_plan(policy) -> ms to wait for the first byte before asking
 * hedge_admit, or nil: no hedge for this call. */
static int l_request_hedge_plan(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    st_hedge_policy p;
    int64_t ms;

    read_hedge_policy(L, 2, &p);
    if (lr->r == NULL || lr->le->e == NULL || (ms = st_request_hedge_plan(lr->le->e, lr->r, &p)) < 0)
        return 0;
    lua_pushnumber(L, (lua_Number)ms);
    return 1;
}

/* request:hedge_admit(policy, key?) -> true and the ms left before the deadline
 * (nil: none), or false and the cap that refused */
static int l_request_hedge_admit(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    const char *key = luaL_optstring(L, 3, NULL), *why = "done";
    st_hedge_policy p;
    int ok = 0;

    read_hedge_policy(L, 2, &p);
    if (lr->r != NULL && lr->le->e != NULL && st_request_state(lr->r) == ST_REQ_RUNNING)
        ok = st_request_hedge_admit(lr->le->e, lr->r, key, &p, &why);
    lua_pushboolean(L, ok);
    if (ok) {
        int64_t left = st_request_deadline_left(lr->r);
        if (left < 0)
            return 1;
        lua_pushnumber(L, (lua_Number)left);
        return 2;
    }
    lua_pushstring(L, why);
    return 2;
}

/* request:lose(): cancels a hedge leg that lost (see st_engine_cancel_lost). */
static int l_request_lose(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    if (lr->r != NULL && lr->le->e != NULL)
        st_engine_cancel_lost(lr->le->e, lr->r);
    return 0;
}

static int l_request_commit(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    if (lr->r != NULL)
        st_request_commit(lr->r);
    return 0;
}

/* request:fail_attempt(class, kind, detail): the body says the attempt failed. */
static int l_request_fail_attempt(lua_State *L)
{
    /* kinds live as long as the engine: the few a body may report are interned */
    static const char *const kinds[] = { "overloaded", "rate_limited", "server", "bad_request", "auth",
                                         "permission", "not_found", "too_large", "stream_error",
                                         "bad_response", NULL };
    l_request *lr = check_request(L, 1);
    st_class cls;
    const char *name = luaL_checkstring(L, 2);
    int k = luaL_checkoption(L, 3, NULL, kinds);

    if (!st_class_parse(name, &cls) || cls == ST_CLASS_SUCCESS)
        return sl_error(L, "sturdy: unknown failure class '%s'", name);
    if (lr->r != NULL && lr->le->e != NULL)
        st_engine_fail_attempt(lr->le->e, lr->r, cls, kinds[k], luaL_optstring(L, 4, ""));
    return 0;
}

/* request:gate(wait_ms) -> true, or false when it no longer waits: its next
 * attempt starts no earlier than wait_ms from now; a held request is admitted,
 * a queued one stays in its queue until then. */
static int l_request_gate(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    int64_t ms = (int64_t)ceil(sl_ms_arg(L, 2));
    lua_pushboolean(L, lr->r != NULL && lr->le->e != NULL && st_engine_gate(lr->le->e, lr->r, ms));
    return 1;
}

/* request:admission(at_ms) -> key, max_wait_ms, requests, input_tokens,
 * output_tokens, tokens, state: what a shared limiter needs to place the next
 * attempt, asked at_ms from now (default 0), and where the request is
 * ("held", "waiting", "queued", "running"); nothing once it is over. */
static int l_request_admission(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    int64_t at = lua_isnoneornil(L, 2) ? 0 : (int64_t)ceil(sl_ms_arg(L, 2));
    st_result res;
    const double *cost;
    int d;

    if (lr->r == NULL || lr->le->e == NULL)
        return 0;
    st_request_result(lr->r, &res);
    lua_pushstring(L, res.key);
    lua_pushnumber(L, (lua_Number)st_request_max_wait(lr->r, at));
    cost = st_request_cost(lr->r);
    for (d = 0; d < ST_DIM_COUNT; d++)
        lua_pushnumber(L, cost[d]);
    switch (st_request_state(lr->r)) {
    case ST_REQ_RUNNING: lua_pushliteral(L, "running"); break;
    case ST_REQ_QUEUED: lua_pushliteral(L, "queued"); break;
    case ST_REQ_WAITING: lua_pushstring(L, st_request_held(lr->r) ? "held" : "waiting"); break;
    default: lua_pushliteral(L, "done"); break;
    }
    return 3 + ST_DIM_COUNT;
}

static int l_request_gc(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    /* at state close an unfinished request may be collected before its engine */
    if (lr->r != NULL && lr->le->e != NULL)
        st_request_free(lr->r);
    lr->r = NULL;
    return 0;
}

/* ---- module --------------------------------------------------------------- */

static const luaL_Reg engine_methods[] = {
    { "submit", l_engine_submit },
    { "check", l_engine_check },
    { "key_for", l_engine_key_for },
    { "step", l_engine_step },
    { "take", l_engine_take },
    { "cancel_all", l_engine_cancel_all },
    { "fds", l_engine_fds },
    { "timeout", l_engine_timeout },
    { "stats", l_engine_stats },
    { "upstream_stats", l_engine_upstream_stats },
    { "upstream_gauges", l_engine_upstream_gauges },
    { "keys", l_engine_keys },
    { "correct", l_engine_correct },
    { "active", l_engine_active },
    { "want_notices", l_engine_want_notices },
    { "open_until", l_engine_open_until },
    { "fleet_window", l_engine_fleet_window },
    { "share", l_engine_share },
    { "fleet_counts", l_engine_fleet_counts },
    { "settle", l_engine_settle },
    { "charge", l_engine_charge },
    { "budget", l_engine_budget },
    { "close", l_engine_close },
    { NULL, NULL }
};

static const luaL_Reg engine_meta[] = {
    { "__gc", l_engine_close },
    { "__tostring", l_engine_tostring },
    { NULL, NULL }
};

static const luaL_Reg request_methods[] = {
    { "cancel", l_request_cancel },
    { "current", l_request_current },
    { "commit", l_request_commit },
    { "fail_attempt", l_request_fail_attempt },
    { "gate", l_request_gate },
    { "admission", l_request_admission },
    { "received", l_request_received },
    { "hedge_plan", l_request_hedge_plan },
    { "hedge_admit", l_request_hedge_admit },
    { "lose", l_request_lose },
    { NULL, NULL }
};

static const luaL_Reg request_meta[] = {
    { "__gc", l_request_gc },
    { NULL, NULL }
};

static const luaL_Reg detail_methods[] = {
    { "get", l_detail_get },
    { NULL, NULL }
};

static const luaL_Reg no_meta[] = {
    { NULL, NULL }
};

static const luaL_Reg core_functions[] = {
    { "engine", l_engine_new },
    { NULL, NULL }
};

static void new_class(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods)
{
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

ST_EXPORT int luaopen_sturdy_core(lua_State *L);

ST_EXPORT int luaopen_sturdy_core(lua_State *L)
{
    new_class(L, ENGINE_MT, engine_meta, engine_methods);
    new_class(L, REQUEST_MT, request_meta, request_methods);
    new_class(L, DETAIL_MT, no_meta, detail_methods);
    luaL_newlib(L, core_functions);
    return 1;
}
