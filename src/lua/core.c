/* sturdy.core: the binding. It turns Lua values into engine structs and
 * results back into tables; the logic lives in the engine and the policies. */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "compat.h"
#include "engine.h"

#define ENGINE_MT "sturdy.engine"
#define REQUEST_MT "sturdy.request"
#define MAX_FDS 1024
#define MAX_SPEC_HEADERS 256

typedef struct l_engine {
    st_engine *e;
    lua_State *L;       /* the state driving the engine right now, for hooks */
    int on_retry_ref, on_event_ref;
} l_engine;

/* A submitted request. Its user value is { handle, engine }: the Lua handle
 * the results go to, and the engine, kept alive while the request is. While in
 * flight the request is referenced from the registry, so a handle nobody holds
 * still completes and fires its callback. */
typedef struct l_request {
    st_request *r;   /* NULL once finished and taken, or detached by close */
    l_engine *le;
    int ref;         /* registry reference while in flight */
} l_request;

#define check_engine(L, i) ((l_engine *)luaL_checkudata((L), (i), ENGINE_MT))
#define check_request(L, i) ((l_request *)luaL_checkudata((L), (i), REQUEST_MT))

static l_engine *open_engine(lua_State *L, int i)
{
    l_engine *le = check_engine(L, i);
    if (le->e == NULL)
        luaL_error(L, "sturdy: the client is closed");
    return le;
}

/* ---- reading option tables ------------------------------------------------ */

static const char *opt_string(lua_State *L, int t, const char *name)
{
    const char *s;
    lua_getfield(L, t, name);
    s = lua_isnil(L, -1) ? NULL : lua_tostring(L, -1);
    lua_pop(L, 1); /* the string stays alive: the table holds it */
    return s;
}

static double opt_number(lua_State *L, int t, const char *name, double def)
{
    double v = def;
    lua_getfield(L, t, name);
    if (!lua_isnil(L, -1))
        v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

static void read_retry_policy(lua_State *L, int t, st_retry_policy *p)
{
    int i;

    st_retry_policy_defaults(p);
    p->attempts = (unsigned)opt_number(L, t, "attempts", p->attempts);
    p->cap_ms = opt_number(L, t, "cap_ms", p->cap_ms);
    p->honor_retry_after_ms = (int64_t)opt_number(L, t, "honor_retry_after_ms",
                                                  (double)p->honor_retry_after_ms);
    {
        const char *j = opt_string(L, t, "jitter");
        if (j && !st_jitter_parse(j, &p->jitter))
            luaL_error(L, "sturdy: unknown jitter mode '%s'", j);
    }
    lua_getfield(L, t, "base_ms");
    if (lua_istable(L, -1)) {
        for (i = 0; i < ST_CLASS_COUNT; i++)
            p->base_ms[i] = opt_number(L, lua_gettop(L), st_class_name((st_class)i), p->base_ms[i]);
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "retried");
    if (lua_istable(L, -1)) {
        for (i = 0; i < ST_CLASS_COUNT; i++) {
            lua_getfield(L, -1, st_class_name((st_class)i));
            if (!lua_isnil(L, -1))
                p->retried[i] = (unsigned char)lua_toboolean(L, -1);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "status_retried");
    if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            lua_Number status = lua_tonumber(L, -2);
            if (status >= 100 && status < ST_STATUS_OVERRIDES)
                p->status_retried[(int)status] = (signed char)lua_toboolean(L, -1);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "budget");
    if (lua_isboolean(L, -1) && !lua_toboolean(L, -1))
        p->budget_enabled = 0;
    lua_pop(L, 1);
}

static const char *const breaker_modes[] = { "normal", "forced_open", "disabled", "metrics_only", NULL };
static const char *const breaker_states[] = { "closed", "open", "half_open" };
static const char *const priorities[] = { "high", "normal", "low", NULL };

/* Per-upstream settings: budget, breaker, limits, queue, latency windows. */
static void read_upstream_config(lua_State *L, int t, st_upstream_config *c)
{
    int i;

    st_upstream_config_defaults(c);
    lua_getfield(L, t, "budget");
    if (lua_istable(L, -1)) {
        int b = lua_gettop(L);
        c->budget_ratio = opt_number(L, b, "ratio", c->budget_ratio);
        c->budget_min_per_s = opt_number(L, b, "min_per_s", c->budget_min_per_s);
        c->budget_slot_ms = (int64_t)opt_number(L, b, "slot_ms", (double)c->budget_slot_ms);
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "breaker");
    if (lua_istable(L, -1)) {
        int b = lua_gettop(L);
        st_breaker_config *bc = &c->breaker;
        bc->window_ms = (int64_t)opt_number(L, b, "window_ms", (double)bc->window_ms);
        bc->buckets = (unsigned)opt_number(L, b, "buckets", bc->buckets);
        bc->min_calls = (unsigned)opt_number(L, b, "min_calls", bc->min_calls);
        bc->failure_rate = opt_number(L, b, "failure_rate", bc->failure_rate);
        bc->slow_call_ms = (int64_t)opt_number(L, b, "slow_call_ms", (double)bc->slow_call_ms);
        bc->slow_rate = opt_number(L, b, "slow_rate", bc->slow_rate);
        bc->open_ms = (int64_t)opt_number(L, b, "open_ms", (double)bc->open_ms);
        bc->max_open_ms = (int64_t)opt_number(L, b, "max_open_ms", (double)bc->max_open_ms);
        bc->probes = (unsigned)opt_number(L, b, "probes", bc->probes);
        bc->probe_timeout_ms = (int64_t)opt_number(L, b, "probe_timeout_ms", (double)bc->probe_timeout_ms);
        lua_getfield(L, b, "failure_classes");
        if (lua_istable(L, -1)) {
            bc->failure_classes = 0;
            for (i = 1; i <= (int)lua_rawlen(L, -1); i++) {
                st_class cls;
                lua_rawgeti(L, -1, i);
                if (lua_isstring(L, -1) && st_class_parse(lua_tostring(L, -1), &cls))
                    bc->failure_classes |= ST_BREAKER_CLASS(cls);
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
        lua_getfield(L, b, "mode");
        if (!lua_isnil(L, -1))
            c->breaker_mode = (st_breaker_mode)luaL_checkoption(L, -1, NULL, breaker_modes);
        lua_pop(L, 1);
    } else if (lua_isboolean(L, -1) && !lua_toboolean(L, -1)) {
        c->breaker_enabled = 0;
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "limits");
    if (lua_istable(L, -1)) {
        int b = lua_gettop(L);
        for (i = 0; i < ST_DIM_COUNT; i++)
            c->limits_per_min[i] = opt_number(L, b, st_dim_name((st_dim)i), 0);
        c->burst_seconds = opt_number(L, b, "burst_s", c->burst_seconds);
        c->concurrency = (unsigned)opt_number(L, b, "concurrency", c->concurrency);
        c->queue_max = (unsigned)opt_number(L, b, "queue", c->queue_max);
    }
    lua_pop(L, 1);
}

/* ---- results -------------------------------------------------------------- */

static void set_num(lua_State *L, const char *k, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, long v)
{
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void push_outcome_fields(lua_State *L, st_outcome o, long status)
{
    set_str(L, "kind", o.kind);
    set_str(L, "class", st_class_name(o.cls));
    if (status > 0)
        set_int(L, "status", status);
}

static void push_result(lua_State *L, st_request *r)
{
    st_result res;
    size_t i;

    st_request_result(r, &res);
    lua_createtable(L, 0, 12);
    if (res.status > 0)
        set_int(L, "status", res.status);
    lua_pushlstring(L, res.body, res.body_len);
    lua_setfield(L, -2, "body");
    lua_pushlstring(L, res.headers, res.headers_len);
    lua_setfield(L, -2, "raw_headers");
    lua_createtable(L, 0, 5);
    set_num(L, "dns", res.timings.dns);
    set_num(L, "connect", res.timings.connect);
    set_num(L, "tls", res.timings.tls);
    set_num(L, "ttfb", res.timings.ttfb);
    set_num(L, "total", res.timings.total);
    lua_setfield(L, -2, "timings");
    if (res.http_version)
        set_num(L, "http_version", res.http_version / 10.0);
    lua_createtable(L, (int)res.nattempts, 0);
    for (i = 0; i < res.nattempts; i++) {
        lua_createtable(L, 0, 3);
        if (res.attempts[i].status > 0)
            set_int(L, "status", res.attempts[i].status);
        if (res.attempts[i].kind)
            set_str(L, "kind", res.attempts[i].kind);
        set_num(L, "delay", res.attempts[i].delay_ms / 1000.0);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "attempts");
    if (res.request_id[0])
        set_str(L, "request_id", res.request_id);
    if (res.outcome.kind == NULL)
        return;
    push_outcome_fields(L, res.outcome, res.status);
    set_str(L, "detail", res.detail);
    if (res.retry_after >= 0)
        set_num(L, "retry_after", res.retry_after);
    lua_pushboolean(L, res.committed);
    lua_setfield(L, -2, "committed");
    if (res.cause.kind) {
        lua_createtable(L, 0, 3);
        push_outcome_fields(L, res.cause, res.cause_status);
        lua_setfield(L, -2, "cause");
    }
}

/* ---- hooks ---------------------------------------------------------------- */

static int call_retry_hook(lua_State *L)
{
    const st_retry_info *info = lua_touserdata(L, 1);
    lua_pushvalue(L, 2); /* the hook */
    lua_createtable(L, 0, 7);
    set_str(L, "key", info->key);
    set_int(L, "attempt", (long)info->attempt);
    set_str(L, "class", st_class_name(info->cls));
    set_str(L, "kind", info->kind);
    if (info->status > 0)
        set_int(L, "status", info->status);
    set_num(L, "delay", info->delay_ms / 1000.0);
    lua_pushboolean(L, info->hinted);
    lua_setfield(L, -2, "hinted");
    lua_call(L, 1, 0);
    return 0;
}

/* Runs a hook from inside the engine: push(L) builds its argument from data
 * in protected mode, so neither a raising hook nor a memory error unwinds
 * through the engine; a failure is reported and the request goes on. */
static void run_hook(l_engine *le, int ref, lua_CFunction push, const void *data, const char *name)
{
    lua_State *L = le->L;

    if (L == NULL || ref == LUA_NOREF)
        return;
    lua_pushcfunction(L, push);
    lua_pushlightuserdata(L, (void *)data);
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    if (lua_pcall(L, 2, 0, 0) != 0) {
        fprintf(stderr, "sturdy: %s hook failed: %s\n", name, lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

static void retry_hook(void *ud, const st_retry_info *info)
{
    l_engine *le = ud;
    run_hook(le, le->on_retry_ref, call_retry_hook, info, "on_retry");
}

static int call_event_hook(lua_State *L)
{
    const st_event *ev = lua_touserdata(L, 1);
    lua_pushvalue(L, 2);
    lua_createtable(L, 0, 6);
    set_str(L, "key", ev->key);
    switch (ev->type) {
    case ST_EVENT_BREAKER:
        set_str(L, "type", "breaker");
        set_str(L, "from", breaker_states[ev->from]);
        set_str(L, "to", breaker_states[ev->to]);
        break;
    case ST_EVENT_LIMIT_LEARNED:
        set_str(L, "type", "limit_learned");
        set_str(L, "dimension", st_dim_name(ev->dim));
        set_num(L, "limit", ev->limit);
        break;
    case ST_EVENT_PAUSED:
        set_str(L, "type", "paused");
        set_num(L, "pause", ev->pause_ms / 1000.0);
        break;
    }
    lua_call(L, 1, 0);
    return 0;
}

static void event_hook(void *ud, const st_event *ev)
{
    l_engine *le = ud;
    run_hook(le, le->on_event_ref, call_event_hook, ev, "on_event");
}

/* ---- engine methods ------------------------------------------------------- */

static int l_engine_new(lua_State *L)
{
    st_transport_config tc;
    st_retry_policy policy;
    st_upstream_config upstream;
    l_engine *le;
    uint64_t seed;
    char err[256];

    luaL_checktype(L, 1, LUA_TTABLE);
    memset(&tc, 0, sizeof tc);
    tc.ca_file = opt_string(L, 1, "ca_file");
    tc.ca_path = opt_string(L, 1, "ca_path");
    tc.client_cert = opt_string(L, 1, "client_cert");
    tc.client_key = opt_string(L, 1, "client_key");
    tc.client_key_password = opt_string(L, 1, "client_key_password");
    tc.proxy = opt_string(L, 1, "proxy");
    tc.no_proxy = opt_string(L, 1, "no_proxy");
    tc.user_agent = opt_string(L, 1, "user_agent");
    read_retry_policy(L, 1, &policy);
    read_upstream_config(L, 1, &upstream);

    /* the userdata exists in a safe state before anything can fail */
    le = lua_newuserdata(L, sizeof *le);
    le->e = NULL;
    le->L = NULL;
    le->on_retry_ref = LUA_NOREF;
    le->on_event_ref = LUA_NOREF;
    luaL_setmetatable(L, ENGINE_MT);

    seed = (uint64_t)opt_number(L, 1, "seed", 0);
    if (seed == 0) /* no seed asked for: jitter must differ between clients and processes */
        seed = (uint64_t)(uintptr_t)le ^ ((uint64_t)time(NULL) << 20);
    le->e = st_engine_new(&tc, &policy, &upstream, seed, err, sizeof err);
    if (le->e == NULL)
        return luaL_error(L, "sturdy: %s", err);
    lua_getfield(L, 1, "on_retry");
    if (lua_isfunction(L, -1)) {
        le->on_retry_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        st_engine_set_retry_hook(le->e, retry_hook, le);
    } else {
        lua_pop(L, 1);
    }
    lua_getfield(L, 1, "on_event");
    if (lua_isfunction(L, -1)) {
        le->on_event_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        st_engine_set_event_hook(le->e, event_hook, le);
    } else {
        lua_pop(L, 1);
    }
    return 1;
}

/* The request arrives as positional arguments from `first` on, cheaper than a
 * table on the hot path: method, url, key, body, header lines, connect_ms,
 * first_byte_ms, idle_ms, total_ms, max_response, attempts, on_data, priority,
 * input_tokens, output_tokens (estimates). */
static void read_spec(lua_State *L, int first, st_request_spec *spec, const char **headers)
{
    size_t n, i;

    memset(spec, 0, sizeof *spec);
    spec->method = luaL_checkstring(L, first);
    spec->url = luaL_checkstring(L, first + 1);
    spec->key = luaL_optstring(L, first + 2, NULL);
    spec->body = luaL_optlstring(L, first + 3, NULL, &spec->body_len);
    luaL_checktype(L, first + 4, LUA_TTABLE);
    n = lua_rawlen(L, first + 4);
    if (n > MAX_SPEC_HEADERS)
        luaL_error(L, "sturdy: too many headers (%d at most)", MAX_SPEC_HEADERS);
    for (i = 0; i < n; i++) {
        lua_rawgeti(L, first + 4, (int)i + 1);
        headers[i] = lua_tostring(L, -1);
        lua_pop(L, 1); /* the table keeps the string alive */
        if (headers[i] == NULL)
            luaL_error(L, "sturdy: header line %d is not a string", (int)i + 1);
    }
    spec->headers = headers;
    spec->nheaders = n;
    spec->connect_ms = (int64_t)luaL_optnumber(L, first + 5, 0);
    spec->first_byte_ms = (int64_t)luaL_optnumber(L, first + 6, 0);
    spec->idle_ms = (int64_t)luaL_optnumber(L, first + 7, 0);
    spec->total_ms = (int64_t)luaL_optnumber(L, first + 8, 0);
    spec->max_response = (size_t)luaL_optnumber(L, first + 9, 0);
    spec->attempts = (unsigned)luaL_optnumber(L, first + 10, 0);
    /* a function: blocking delivery to on_data; true: submitted, taken with take_data */
    spec->stream = lua_isfunction(L, first + 11) ? 1 : (lua_toboolean(L, first + 11) ? ST_STREAM_MANUAL_COMMIT : 0);
    spec->priority = luaL_checkoption(L, first + 12, "normal", priorities);
    spec->input_tokens = luaL_optnumber(L, first + 13, 0);
    spec->output_tokens = luaL_optnumber(L, first + 14, 0);
}

/* Hands the body bytes received so far to on_data (at the stack index given).
 * Returns 1 to go on, 0 when the callback asked to stop by returning false,
 * -1 when it raised (its error is left on the stack). */
static int deliver_body(lua_State *L, st_request *r, int on_data)
{
    size_t len;
    const char *p = st_request_pending_body(r, &len);
    int keep_going;

    if (len == 0)
        return 1;
    lua_pushvalue(L, on_data);
    lua_pushlstring(L, p, len);
    st_request_body_delivered(r);
    if (lua_pcall(L, 1, 1, 0) != 0)
        return -1; /* the error is on the stack */
    keep_going = !(lua_isboolean(L, -1) && !lua_toboolean(L, -1));
    lua_pop(L, 1);
    return keep_going;
}

/* engine:perform(...) -> result table (arguments as read_spec reads them). Submits, then drives the engine until
 * this request is done. */
static int l_engine_perform(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *headers[MAX_SPEC_HEADERS];
    st_request_spec spec;
    st_request *r;
    lua_State *saved;
    int on_data;
    char err[256];

    read_spec(L, 2, &spec, headers);
    on_data = 13;
    saved = le->L;
    le->L = L; /* hooks may fire from submit itself (a breaker refusing) */
    r = st_engine_submit(le->e, &spec, err, sizeof err);
    if (r == NULL) {
        le->L = saved;
        return luaL_error(L, "sturdy: %s", err);
    }
    for (;;) {
        st_engine_step(le->e, 1000);
        if (spec.stream) {
            int go_on = deliver_body(L, r, on_data);
            if (go_on < 0) {
                le->L = saved;
                st_request_free(r);
                return lua_error(L);
            }
            if (!go_on)
                st_engine_cancel(le->e, r);
        }
        if (st_request_state(r) == ST_REQ_DONE)
            break;
    }
    le->L = saved;
    push_result(L, r);
    st_request_free(r);
    return 1;
}

/* engine:submit(handle, ...) -> request. Starts the request (arguments as
 * read_spec reads them, from the second on) without waiting for anything. */
static int l_engine_submit(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    const char *headers[MAX_SPEC_HEADERS];
    st_request_spec spec;
    l_request *lr;
    lua_State *saved;
    char err[256];

    luaL_checktype(L, 2, LUA_TTABLE);
    read_spec(L, 3, &spec, headers);
    if (lua_isfunction(L, 3 + 11))
        return luaL_error(L, "sturdy: on_data is only for blocking requests");
    lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    lr->le = le;
    lr->ref = LUA_NOREF;
    luaL_setmetatable(L, REQUEST_MT);
    lua_createtable(L, 2, 0);
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, 1);
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 2);
    lua_setuservalue(L, -2);

    saved = le->L;
    le->L = L;
    lr->r = st_engine_submit(le->e, &spec, err, sizeof err);
    le->L = saved;
    if (lr->r == NULL)
        return luaL_error(L, "sturdy: %s", err);
    st_request_set_userdata(lr->r, lr);
    lua_pushvalue(L, -1);
    lr->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

/* engine:step(max_wait_ms) -> requests still active. */
static int l_engine_step(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    lua_Number wait = luaL_optnumber(L, 2, 0);
    int active;

    lua_State *saved = le->L;

    le->L = L;
    active = st_engine_step(le->e, wait > 0 ? (int64_t)wait : 0);
    le->L = saved;
    lua_pushinteger(L, active);
    return 1;
}

/* Stores a finished request's result in its handle's `raw` field and lets it go. */
static void finish_request(lua_State *L, l_request *lr, int request_index)
{
    st_request *r = lr->r;

    lua_getuservalue(L, request_index);
    lua_rawgeti(L, -1, 1);          /* the handle */
    push_result(L, r);
    lua_setfield(L, -2, "raw");
    lua_remove(L, -2);              /* leaves the handle */
    lr->r = NULL;
    st_request_free(r);
    luaL_unref(L, LUA_REGISTRYINDEX, lr->ref);
    lr->ref = LUA_NOREF;
}

/* engine:take_done() -> list of the handles of requests that finished. */
static int l_engine_take_done(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_request *r;
    int n = 0;

    lua_newtable(L);
    while ((r = st_engine_take_done(le->e)) != NULL) {
        l_request *lr = st_request_userdata(r);
        lua_rawgeti(L, LUA_REGISTRYINDEX, lr->ref);
        finish_request(L, lr, lua_gettop(L));
        lua_remove(L, -2);
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

/* engine:take_data() -> list of { handle, chunk, attempt } for streamed
 * requests with body bytes waiting. */
static int l_engine_take_data(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_request *streams[256];
    size_t n = st_engine_streams(le->e, streams, 256), i;

    if (n > 256)
        n = 256; /* the rest come with the next call */
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
        st_request *r = streams[i];
        l_request *lr = st_request_userdata(r);
        size_t len;
        const char *p = st_request_pending_body(r, &len);

        lua_createtable(L, 3, 0);
        lua_rawgeti(L, LUA_REGISTRYINDEX, lr->ref);
        lua_getuservalue(L, -1);
        lua_rawgeti(L, -1, 1);
        lua_rawseti(L, -4, 1);
        lua_pop(L, 2);
        lua_pushlstring(L, p, len);
        lua_rawseti(L, -2, 2);
        lua_pushinteger(L, (lua_Integer)st_request_attempt(r));
        lua_rawseti(L, -2, 3);
        st_request_body_delivered(r);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

/* engine:cancel_all(): every unfinished request ends as canceled (take_done hands them out). */
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

static int l_request_cancel(lua_State *L)
{
    l_request *lr = check_request(L, 1);
    if (lr->r != NULL && lr->le->e != NULL)
        st_engine_cancel(lr->le->e, lr->r);
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
    l_request *lr = check_request(L, 1);
    st_class cls;
    const char *name = luaL_checkstring(L, 2);

    if (!st_class_parse(name, &cls))
        return luaL_error(L, "sturdy: unknown class '%s'", name);
    if (lr->r != NULL && lr->le->e != NULL) {
        /* kinds live as long as the engine: intern the few a provider uses */
        static const char *const kinds[] = { "overloaded", "rate_limited", "server", "bad_request", "auth",
                                             "permission", "not_found", "too_large", "stream_error", NULL };
        int k = luaL_checkoption(L, 3, NULL, kinds);
        st_engine_fail_attempt(lr->le->e, lr->r, cls, kinds[k], luaL_optstring(L, 4, ""));
    }
    return 0;
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

static int l_engine_stats(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_engine_stats s;

    st_engine_stats_get(le->e, &s);
    lua_createtable(L, 0, 6);
    set_num(L, "requests", (double)s.requests);
    set_num(L, "attempts", (double)s.attempts);
    set_num(L, "retries", (double)s.retries);
    set_num(L, "connections", (double)s.connections);
    set_int(L, "running", s.running);
    set_int(L, "waiting", s.waiting);
    set_int(L, "queued", s.queued);
    set_int(L, "done", s.done);
    return 1;
}

static void push_latency(lua_State *L, st_latency *l, int64_t now)
{
    static const double qs[] = { 0.5, 0.9, 0.95, 0.99, 0.999 };
    static const char *const names[] = { "p50", "p90", "p95", "p99", "p999" };
    uint64_t out[5];
    st_latency_summary sum;
    size_t i;

    lua_createtable(L, 0, 9);
    if (l == NULL || st_latency_query(l, now, qs, 5, out, &sum) == 0) {
        set_int(L, "count", 0); /* an empty window has no percentiles, not zeros */
        return;
    }
    set_num(L, "count", (double)sum.count);
    set_num(L, "min", sum.min_us / 1e6);
    set_num(L, "max", sum.max_us / 1e6);
    set_num(L, "mean", sum.mean_us / 1e6);
    for (i = 0; i < 5; i++)
        set_num(L, names[i], out[i] / 1e6);
}

/* engine:upstream_stats(key) -> table, or nil when no request named the key. */
static int l_engine_upstream_stats(lua_State *L)
{
    l_engine *le = open_engine(L, 1);
    st_upstream *u = st_engine_upstream(le->e, luaL_checkstring(L, 2));
    int64_t now = st_engine_now_ms();
    st_breaker_stats bs;
    int i;

    if (u == NULL)
        return 0;
    lua_createtable(L, 0, 10);
    set_str(L, "key", u->name);
    set_int(L, "in_flight", (long)u->in_flight);
    set_int(L, "queued", (long)u->queued);
    set_num(L, "throttled", (double)u->throttled);
    set_num(L, "circuit_open", (double)u->circuit_open);
    set_num(L, "queue_full", (double)u->queue_full);
    set_num(L, "paced", (double)u->paced);
    set_num(L, "budget", st_budget_balance(&u->budget, now));

    st_breaker_stats_get(&u->breaker, now, &bs);
    lua_createtable(L, 0, 9);
    set_str(L, "state", u->breaker_enabled ? breaker_states[bs.state] : "disabled");
    set_str(L, "mode", u->breaker_enabled ? breaker_modes[bs.mode] : "disabled");
    set_num(L, "calls", bs.calls);
    set_num(L, "failures", bs.failures);
    set_num(L, "slow", bs.slow);
    set_num(L, "failure_rate", bs.failure_rate);
    set_num(L, "slow_rate", bs.slow_rate);
    set_num(L, "opens", bs.opens);
    set_num(L, "open_for", bs.current_open_ms / 1000.0);
    if (bs.state == ST_BREAKER_OPEN && bs.open_until_ms != INT64_MAX)
        set_num(L, "retry_in", bs.open_until_ms > now ? (bs.open_until_ms - now) / 1000.0 : 0);
    lua_setfield(L, -2, "breaker");

    push_latency(L, u->total, now);
    lua_setfield(L, -2, "latency");
    push_latency(L, u->ttfb, now);
    lua_setfield(L, -2, "ttfb");

    lua_createtable(L, 0, ST_DIM_COUNT + 1);
    for (i = 0; i < ST_DIM_COUNT; i++) {
        double limit = st_limiter_limit(&u->limiter, (st_dim)i);
        if (limit <= 0 && u->limiter.remaining[i] < 0)
            continue;
        lua_createtable(L, 0, 5);
        if (limit > 0)
            set_num(L, "limit", limit);
        if (u->limiter.configured[i] > 0)
            set_num(L, "configured", u->limiter.configured[i]);
        if (u->limiter.learned[i] > 0)
            set_num(L, "learned", u->limiter.learned[i]);
        if (u->limiter.remaining[i] >= 0)
            set_num(L, "remaining", u->limiter.remaining[i]);
        if (u->limiter.reset_at_ms[i] > now)
            set_num(L, "reset_in", (u->limiter.reset_at_ms[i] - now) / 1000.0);
        lua_setfield(L, -2, st_dim_name((st_dim)i));
    }
    if (u->limiter.paused_until_ms > now)
        set_num(L, "paused_for", (u->limiter.paused_until_ms - now) / 1000.0);
    lua_setfield(L, -2, "limits");
    return 1;
}

/* engine:correct(key, dimension, delta): real usage known after a reply
 * corrects the key's token buckets by (actual - estimated). */
static int l_engine_correct(lua_State *L)
{
    static const char *const dims[] = { "requests", "input_tokens", "output_tokens", "tokens", NULL };
    l_engine *le = open_engine(L, 1);
    st_upstream *u = st_engine_upstream(le->e, luaL_checkstring(L, 2));
    int d = luaL_checkoption(L, 3, NULL, dims);
    lua_Number delta = luaL_checknumber(L, 4);

    if (u != NULL && delta != 0)
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
    st_engine_each_upstream(le->e, push_key, L);
    return 1;
}

static int l_engine_close(lua_State *L)
{
    l_engine *le = check_engine(L, 1);
    st_request *r;

    if (le->e && le->L != NULL)
        return luaL_error(L, "sturdy: the client cannot be closed from a hook while it waits on a request");
    if (le->e) {
        /* requests still held by Lua are let go first, so none points into a freed engine */
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
    luaL_unref(L, LUA_REGISTRYINDEX, le->on_retry_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, le->on_event_ref);
    le->on_retry_ref = le->on_event_ref = LUA_NOREF;
    return 0;
}

static int l_engine_tostring(lua_State *L)
{
    l_engine *le = check_engine(L, 1);
    lua_pushfstring(L, "sturdy.engine (%s)", le->e ? "open" : "closed");
    return 1;
}

static const luaL_Reg engine_methods[] = {
    { "perform", l_engine_perform },
    { "submit", l_engine_submit },
    { "step", l_engine_step },
    { "take_done", l_engine_take_done },
    { "take_data", l_engine_take_data },
    { "cancel_all", l_engine_cancel_all },
    { "fds", l_engine_fds },
    { "timeout", l_engine_timeout },
    { "stats", l_engine_stats },
    { "upstream_stats", l_engine_upstream_stats },
    { "keys", l_engine_keys },
    { "correct", l_engine_correct },
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
    { "commit", l_request_commit },
    { "fail_attempt", l_request_fail_attempt },
    { NULL, NULL }
};

static const luaL_Reg request_meta[] = {
    { "__gc", l_request_gc },
    { NULL, NULL }
};

static int l_isatty(lua_State *L)
{
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
    return 1;
}

static const luaL_Reg core_functions[] = {
    { "isatty", l_isatty },
    { "engine", l_engine_new },
    { NULL, NULL }
};

ST_EXPORT int luaopen_sturdy_core(lua_State *L);

ST_EXPORT int luaopen_sturdy_core(lua_State *L)
{
    luaL_newmetatable(L, ENGINE_MT);
    luaL_setfuncs(L, engine_meta, 0);
    luaL_newlib(L, engine_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, REQUEST_MT);
    luaL_setfuncs(L, request_meta, 0);
    luaL_newlib(L, request_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newlib(L, core_functions);
    return 1;
}
