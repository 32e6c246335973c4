/* sturdy.policy.decider: the decision core (decide.h) for transports written in
 * Lua, such as the OpenResty cosocket transport (lua/sturdy/ngx.lua). Value
 * conversion only: requests are read by the same reader as the curl engine's
 * (request.c), decisions are the core's, and the shared part of an upstream goes
 * in and out as the blob of upstream.h.
 *
 *   local d = policy.decider(compiled)       -- options.client's compiled config
 *   local call, spec = d:call(req, json)     -- raises as the curl engine's submit
 *   call:load(blob) ; call:admit(owner) ; call:save()   -- under the caller's lock
 *   ... call:report(...) ; d:pump(key) ; call:decide(...) ...
 *
 * A queued call keeps its owner (any Lua value) referenced until it is decided;
 * d:pump(key) hands back the owners it decided, each of whose calls then says its
 * verdict. A call that is collected while it holds a slot or a queue place gives
 * them back, so a lost call never wedges its key. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "compat.h"
#include "convert.h"
#include "decide.h"
#include "decider.h"
#include "head.h"
#include "request.h"

#define DECIDER_MT "sturdy.decider"
#define CALL_MT "sturdy.call"
#define MAX_SECRETS 8
#define MAX_EVENTS 4096  /* pending for d:events(); beyond, they are dropped and counted */

typedef struct l_decider {
    st_decider d;
    int open;
    sl_client client;        /* base URL, key, timeouts */
    sl_lines lines;          /* the client's header lines */
    char *user_agent;        /* "User-Agent: ..." or NULL */
    st_buf scratch;          /* strings of the request being read */
    uint64_t fingerprint;    /* of the settings the shared state depends on */
    uint32_t saves;          /* stamps the blobs it saves */
    int want_events;
    st_event *events;        /* pending for d:events() */
    size_t nevents, cap_events, dropped;
} l_decider;

typedef struct l_call {
    st_call call;            /* first: st_pump hands back &call.qnode, this very address */
    l_decider *ld;           /* kept alive by the user value */
    st_upstream *up;
    int owner;               /* registry reference while queued, else LUA_NOREF */
    st_admission verdict;    /* the last admission (from admit or a pump) */
    char *secrets[MAX_SECRETS];
    size_t nsecrets;
} l_call;

#define check_decider(L, i) ((l_decider *)luaL_checkudata((L), (i), DECIDER_MT))
#define check_call(L, i) ((l_call *)luaL_checkudata((L), (i), CALL_MT))

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static l_decider *open_decider(lua_State *L, int i)
{
    l_decider *ld = check_decider(L, i);
    if (!ld->open)
        luaL_error(L, "sturdy: the client is closed");
    return ld;
}

/* The call, with its decider still open. */
static l_call *open_call(lua_State *L, int i)
{
    l_call *lc = check_call(L, i);
    if (!lc->ld->open)
        luaL_error(L, "sturdy: the client is closed");
    return lc;
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void set_num(lua_State *L, const char *k, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

/* ---- events --------------------------------------------------------------- */

static void keep_events(l_decider *ld, const st_events *ev)
{
    unsigned i;
    if (!ld->want_events)
        return;
    ld->dropped += ev->dropped;
    for (i = 0; i < ev->n; i++) {
        if (ld->nevents == ld->cap_events) {
            size_t cap = ld->cap_events ? ld->cap_events * 2 : 16;
            st_event *grown;
            if (cap > MAX_EVENTS || (grown = realloc(ld->events, cap * sizeof *grown)) == NULL) {
                ld->dropped++;
                continue;
            }
            ld->events = grown;
            ld->cap_events = cap;
        }
        ld->events[ld->nevents++] = ev->ev[i];
    }
}

/* d:events() -> the events since the last call ({ type, key, ... } each), or nil. */
static int l_events(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    size_t i;

    if (ld->nevents == 0)
        return 0;
    lua_createtable(L, (int)ld->nevents, 0);
    for (i = 0; i < ld->nevents; i++) {
        sl_push_event(L, &ld->events[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    ld->nevents = 0;
    return 1;
}

/* ---- the decider ---------------------------------------------------------- */

/* policy.decider(compiled) -> decider; compiled as lua/sturdy/options.lua makes it. */
static int l_decider_new(lua_State *L)
{
    st_retry_policy policy;
    st_upstream_config upstream;
    st_upstream *probe;
    l_decider *ld;
    lua_Number seed_n;
    uint64_t seed;
    const char *ua;
    int t;

    luaL_checktype(L, 1, LUA_TTABLE);
    sl_read_policy(L, 1, &policy, &upstream);
    lua_getfield(L, 1, "transport");
    luaL_checktype(L, -1, LUA_TTABLE);
    t = lua_gettop(L);
    ua = sl_opt_string(L, t, "user_agent");

    /* the userdata exists in a safe state before anything can fail */
    ld = lua_newuserdata(L, sizeof *ld);
    memset(ld, 0, sizeof *ld);
    luaL_setmetatable(L, DECIDER_MT);
    /* its user value keeps it alive for its calls: { decider } */
    lua_createtable(L, 1, 0);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, 1);
    lua_setuservalue(L, -2);

    lua_getfield(L, t, "headers");
    sl_lines_read(L, -1, &ld->lines);
    lua_pop(L, 1);
    sl_client_read(L, 1, &ld->client);
    if (ua != NULL) {
        size_t n = strlen(ua);
        if (memchr(ua, '\r', n) || memchr(ua, '\n', n))
            return luaL_error(L, "sturdy: option 'user_agent' contains CR or LF");
        ld->user_agent = malloc(n + 13);
        if (ld->user_agent == NULL)
            return luaL_error(L, "sturdy: out of memory");
        memcpy(ld->user_agent, "User-Agent: ", 12);
        memcpy(ld->user_agent + 12, ua, n + 1);
    }

    lua_getfield(L, 1, "seed");
    seed_n = lua_isnil(L, -1) ? 0 : luaL_checknumber(L, -1);
    lua_pop(L, 1);
    if (!(seed_n >= 0 && seed_n < 9007199254740992.0))
        return luaL_error(L, "sturdy: option 'seed' must be a whole number below 2^53");
    seed = (uint64_t)seed_n;
    if (seed == 0) /* no seed asked for: jitter must differ between clients and processes */
        seed = (uint64_t)(uintptr_t)ld ^ ((uint64_t)time(NULL) << 20) ^ ((uint64_t)getpid() << 40);

    lua_getfield(L, 1, "notices");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "events");
        ld->want_events = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);

    st_decider_init(&ld->d, &policy, &upstream, seed);
    probe = st_upstream_new("", &ld->d.upstream, 0);
    if (probe == NULL)
        return luaL_error(L, "sturdy: out of memory");
    ld->fingerprint = st_upstream_fingerprint(probe);
    st_upstream_free(probe);
    ld->open = 1;
    sl_read_spend(L, 1, &ld->d, mono_ms()); /* the decider owns the book: a raise leaks nothing */
    return 1;
}

static int l_decider_close(lua_State *L)
{
    l_decider *ld = check_decider(L, 1);
    if (ld->open) {
        ld->open = 0;
        st_decider_free(&ld->d);
    }
    sl_lines_free(&ld->lines);
    sl_client_free(&ld->client);
    st_buf_free(&ld->scratch);
    free(ld->user_agent);
    ld->user_agent = NULL;
    free(ld->events);
    ld->events = NULL;
    ld->nevents = ld->cap_events = 0;
    return 0;
}

/* Reads the request at idx into req and its header lines into lines. */
static size_t read_request(lua_State *L, l_decider *ld, int idx, int body_idx, sl_request *req,
                           const char **lines)
{
    const char *own[SL_MAX_HEADERS];
    size_t n, i;

    sl_request_read(L, idx, body_idx, &ld->client, &ld->scratch, own, req);
    n = sl_assemble_headers(L, &ld->lines, req, lines);
    if (ld->user_agent) {
        for (i = 0; i < n && strncasecmp(lines[i], "user-agent:", 11) != 0; i++)
            ;
        if (i == n)
            lines[n++] = ld->user_agent;
    }
    return n;
}

static void push_timeout(lua_State *L, const char *k, int64_t ms)
{
    if (ms > 0)
        lua_pushnumber(L, ms / 1000.0);
    else
        lua_pushboolean(L, 0);
    lua_setfield(L, -2, k);
}

static void keep_secret(l_call *lc, const char *p, size_t len)
{
    char *copy;
    if (p == NULL || len < 4 || lc->nsecrets == MAX_SECRETS)
        return; /* too short to mask without mangling ordinary text */
    copy = malloc(len + 1);
    if (copy == NULL)
        return;
    memcpy(copy, p, len);
    copy[len] = '\0';
    lc->secrets[lc->nsecrets++] = copy;
}

/* d:call(request, json_body) -> call, spec. Checks the request table as the curl
 * engine does; json_body is its `json` already encoded (or nil). spec: url,
 * method, body, headers (a list of "Name: value" lines), timeout { connect,
 * first_byte, idle } (seconds or false), max_response, stream ("auto" | "manual"
 * | nil), key. */
static int l_decider_call(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    const char *lines[SL_MAX_HEADERS];
    sl_request req;
    l_call *lc;
    size_t n, i, len;
    int64_t now = mono_ms();
    const char *secret;

    n = read_request(L, ld, 2, lua_isnoneornil(L, 3) ? 0 : 3, &req, lines);
    lc = lua_newuserdata(L, sizeof *lc);
    memset(lc, 0, sizeof *lc);
    lc->owner = LUA_NOREF;
    lc->ld = ld;
    luaL_setmetatable(L, CALL_MT);
    lua_getuservalue(L, 1);
    lua_setuservalue(L, -2);
    lc->up = st_decider_upstream(&ld->d, req.key, now);
    if (lc->up == NULL)
        return luaL_error(L, "sturdy: out of memory");
    st_call_init(&lc->call, &ld->d, now, req.timeout_ms[3], req.attempts, req.priority, req.tokens_in,
                 req.tokens_out);
    st_call_spend_init(&ld->d, lc->up, &lc->call, req.tag, req.reserve_usd,
                       req.reserve_tokens >= 0 ? req.reserve_tokens : req.tokens_in + req.tokens_out, now);
    for (i = 0; i < n; i++)
        if ((secret = sl_line_secret(lines[i], &len)) != NULL)
            keep_secret(lc, secret, len);
    if ((secret = sl_url_userinfo(req.url, &len)) != NULL)
        keep_secret(lc, secret, len);

    lua_createtable(L, 0, 9);
    set_str(L, "url", req.url);
    set_str(L, "method", req.method);
    set_str(L, "key", req.key);
    if (req.body) {
        lua_pushlstring(L, req.body, req.body_len);
        lua_setfield(L, -2, "body");
    }
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
        lua_pushstring(L, lines[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "headers");
    lua_createtable(L, 0, 3);
    push_timeout(L, "connect", req.timeout_ms[0]);
    push_timeout(L, "first_byte", req.timeout_ms[1]);
    push_timeout(L, "idle", req.timeout_ms[2]);
    lua_setfield(L, -2, "timeout");
    set_num(L, "max_response", req.max_response > 0 ? req.max_response : 64.0 * 1024 * 1024);
    if (req.stream != SL_STREAM_NONE)
        set_str(L, "stream", req.stream == SL_STREAM_MANUAL ? "manual" : "auto");
    return 2;
}

/* d:check(request, json_body): raises as d:call would; decides nothing. */
static int l_decider_check(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    const char *lines[SL_MAX_HEADERS];
    sl_request req;
    read_request(L, ld, 2, lua_isnoneornil(L, 3) ? 0 : 3, &req, lines);
    return 0;
}

/* d:key_for(request) -> the upstream key the request would go under */
static int l_decider_key_for(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    sl_push_request_key(L, 2, &ld->client);
    return 1;
}

/* d:fingerprint() -> the settings the shared state depends on, as 16 hex digits:
 * processes share a key's state only under the same fingerprint. */
static int l_decider_fingerprint(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    char hex[17];
    int i;
    for (i = 0; i < 16; i++)
        hex[i] = "0123456789abcdef"[(ld->fingerprint >> (60 - 4 * i)) & 15];
    lua_pushlstring(L, hex, 16);
    return 1;
}

static const char *const blob_refusals[] = { "ok", "size", "magic", "version", "layout", "config", "invalid" };

/* The blob argument at idx, or NULL when it is nil (nothing stored yet). */
static const char *blob_arg(lua_State *L, int idx, size_t *len)
{
    return lua_isnoneornil(L, idx) ? NULL : luaL_checklstring(L, idx, len);
}

/* A load's answer: true, or false and why. */
static int push_loaded(lua_State *L, int rc)
{
    lua_pushboolean(L, rc == ST_BLOB_OK);
    if (rc == ST_BLOB_OK)
        return 1;
    lua_pushstring(L, blob_refusals[rc]);
    return 2;
}

/* Loads a blob (or nil: nothing stored yet) into u: true, or false and why. */
static int load_blob(lua_State *L, st_upstream *u, int idx)
{
    size_t len = 0;
    const char *blob = blob_arg(L, idx, &len);
    return push_loaded(L, blob ? st_upstream_load(u, blob, len) : ST_BLOB_OK);
}

static int save_blob(lua_State *L, l_decider *ld, const st_upstream *u)
{
    char blob[8192];
    size_t n = st_upstream_save(u, ++ld->saves, blob, sizeof blob);
    if (n == 0)
        return luaL_error(L, "sturdy: the upstream state does not fit its buffer");
    lua_pushlstring(L, blob, n);
    return 1;
}

/* d:load(key, blob) -> true, or false and why: the key's shared state from the blob
 * (the key's upstream is made if this process has none yet). */
static int l_decider_load(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_upstream *u = st_decider_upstream(&ld->d, luaL_checkstring(L, 2), mono_ms());
    if (u == NULL)
        return luaL_error(L, "sturdy: out of memory");
    return load_blob(L, u, 3);
}

/* d:save(key) -> the key's shared state as a blob, or nil when it has none. */
static int l_decider_save(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_upstream *u = st_decider_find(&ld->d, luaL_checkstring(L, 2));
    if (u == NULL)
        return 0;
    return save_blob(L, ld, u);
}

/* d:upstream_stats(key) -> table, or nil when nothing named the key. */
static int l_decider_upstream_stats(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_upstream *u = st_decider_find(&ld->d, luaL_checkstring(L, 2));
    if (u == NULL)
        return 0;
    sl_push_upstream_stats(L, u, mono_ms());
    return 1;
}

/* d:correct(key, dimension, delta): real usage corrects the token buckets. */
static int l_decider_correct(lua_State *L)
{
    static const char *const dims[] = { "requests", "input_tokens", "output_tokens", "tokens", NULL };
    l_decider *ld = open_decider(L, 1);
    st_upstream *u = st_decider_find(&ld->d, luaL_checkstring(L, 2));
    int d = luaL_checkoption(L, 3, NULL, dims);
    lua_Number delta = luaL_checknumber(L, 4);

    if (u != NULL && delta == delta && delta != 0)
        st_limiter_correct(&u->limiter, mono_ms(), (st_dim)d, delta);
    return 0;
}

/* ---- the fleet scope (sturdy.shared) --------------------------------------
 * What a store of the fleet answered, handed to the key's upstream; the caller
 * loads and saves the key's shared state around each, as around a decision. */

static st_upstream *fleet_upstream(lua_State *L, l_decider *ld, int64_t now)
{
    st_upstream *u = st_decider_upstream(&ld->d, luaL_checkstring(L, 2), now);
    if (u == NULL)
        luaL_error(L, "sturdy: out of memory");
    return u;
}

/* d:open_until(key, ms): the fleet's breaker for key is open for ms more. */
static int l_decider_open_until(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    int64_t now = mono_ms();
    st_upstream *u = fleet_upstream(L, ld, now);
    int64_t ms = (int64_t)ceil(sl_ms_arg(L, 3));
    st_events ev;

    ev.n = ev.dropped = 0;
    st_fleet_open_until(u, now, now + ms, &ev);
    keep_events(ld, &ev);
    return 0;
}

/* d:fleet_window(key, calls, failures, slow) -> opened: the fleet's window. */
static int l_decider_fleet_window(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    int64_t now = mono_ms();
    st_upstream *u = fleet_upstream(L, ld, now);
    st_events ev;
    int opened;

    ev.n = ev.dropped = 0;
    opened = st_fleet_window(u, now, sl_count_arg(L, 3), sl_count_arg(L, 4), sl_count_arg(L, 5), &ev);
    keep_events(ld, &ev);
    lua_pushboolean(L, opened);
    return 1;
}

/* d:share(key, n): key's limits are paced at limit / n here (pump the key after). */
static int l_decider_share(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    int64_t now = mono_ms();
    st_upstream *u = fleet_upstream(L, ld, now);
    st_fleet_share(u, now, luaL_checknumber(L, 3));
    return 0;
}

/* d:fleet_counts(key) -> calls, failures, slow, state, open_in (see
 * sl_push_fleet_counts); nothing for a key nothing named. */
static int l_decider_fleet_counts(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_upstream *u = st_decider_find(&ld->d, luaL_checkstring(L, 2));
    if (u == NULL)
        return 0;
    return sl_push_fleet_counts(L, u, mono_ms());
}

/* ---- spend caps (shared by the caller as blobs) ----------------------------
 * Every spend of the book (the client's, each capped key's and tag's) has a
 * scope name: "c|F", "k|F|key", "t|F|tag", where F is the 16 hex digits of its
 * caps' fingerprint (spends under other caps never share a name). The caller
 * loads them all before a spend operation (a reservation, call:spend_end,
 * d:settle, d:charge: any of them may charge parked holds that are due, in
 * any scope) and saves them after, under one lock. */

static void push_scope(lua_State *L, char kind, const st_spend *s, const char *name)
{
    uint64_t f = st_spend_fingerprint(s);
    char head[20];
    int i;

    head[0] = kind;
    head[1] = '|';
    for (i = 0; i < 16; i++)
        head[2 + i] = "0123456789abcdef"[(f >> (60 - 4 * i)) & 15];
    head[18] = '|';
    lua_pushlstring(L, head, name ? 19 : 18);
    if (name) {
        lua_pushstring(L, name);
        lua_concat(L, 2);
    }
    lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
}

static void push_scope_chain(lua_State *L, char kind, st_spend_named *const *buckets)
{
    int i;
    st_spend_named *n;
    for (i = 0; i < ST_SPEND_BUCKETS; i++)
        for (n = buckets[i]; n; n = n->next)
            push_scope(L, kind, &n->spend, n->name);
}

/* d:spend_scopes(key, tag) -> the scope names of every spend of the book, or
 * nil without spend caps. key and tag (may be nil) first make the spends that
 * would cap a charge of them, so that they are among those loaded. */
static int l_decider_spend_scopes(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_spend_book *b = ld->d.spend;
    const char *key = luaL_optstring(L, 2, NULL), *tag = luaL_optstring(L, 3, NULL);
    int64_t now = mono_ms();

    if (b == NULL)
        return 0;
    if (key && st_decider_upstream(&ld->d, key, now) == NULL)
        return luaL_error(L, "sturdy: out of memory");
    if (tag)
        (void)st_spend_book_tag(b, tag, now, NULL);
    lua_newtable(L);
    if (b->client_capped)
        push_scope(L, 'c', &b->client, NULL);
    push_scope_chain(L, 'k', b->keys);
    push_scope_chain(L, 't', b->tags);
    return 1;
}

/* The spend a scope name (of d:spend_scopes) names; raises for another name. */
static st_spend *scope_spend(lua_State *L, l_decider *ld, int idx)
{
    size_t len;
    const char *name = luaL_checklstring(L, idx, &len);
    st_spend_book *b = ld->d.spend;
    st_spend_named *n = NULL;

    if (b != NULL && len == 18 && name[0] == 'c' && b->client_capped)
        return &b->client;
    if (b != NULL && len > 19 && (name[0] == 'k' || name[0] == 't') && name[1] == '|' && name[18] == '|')
        n = st_spend_book_find(b, name[0] == 't' ? ST_SCOPE_TAG : ST_SCOPE_KEY, name + 19);
    if (n == NULL)
        luaL_error(L, "sturdy: no spend cap has the scope name '%s'", name);
    return &n->spend;
}

/* d:spend_load(scope, blob) -> true, or false and why (as d:load); nil blob:
 * nothing stored yet. */
static int l_decider_spend_load(lua_State *L)
{
    st_spend *s = scope_spend(L, open_decider(L, 1), 2);
    size_t len = 0;
    const char *blob = blob_arg(L, 3, &len);
    return push_loaded(L, blob ? st_spend_load(s, blob, len) : ST_BLOB_OK);
}

/* d:spend_save(scope) -> the spend as a blob. */
static int l_decider_spend_save(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_spend *s = scope_spend(L, ld, 2);
    char blob[sizeof(st_spend) + 64]; /* the frame takes 36 bytes */
    lua_pushlstring(L, blob, st_spend_save(s, ++ld->saves, blob, sizeof blob));
    return 1;
}

/* d:spend_close(): charges in full, now, the parked holds nobody will settle
 * once this decider is closed (its spends outlive it in the caller's store). */
static int l_decider_spend_close(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    if (ld->d.spend != NULL)
        st_spend_book_expire_all(ld->d.spend, mono_ms(), NULL);
    return 0;
}

/* d:settle(hold, usd, tokens) -> settled, events (see sl_spend_settle) */
static int l_decider_settle(lua_State *L)
{
    return sl_spend_settle(L, &open_decider(L, 1)->d, mono_ms());
}

/* d:charge(key, tag, usd, tokens) -> events (see sl_spend_charge) */
static int l_decider_charge(lua_State *L)
{
    return sl_spend_charge(L, &open_decider(L, 1)->d, mono_ms());
}

/* d:budget() -> the spend caps' state (see sl_push_budget), or nil */
static int l_decider_budget(lua_State *L)
{
    return sl_push_budget(L, &open_decider(L, 1)->d, mono_ms());
}

static void push_key(void *ud, st_upstream *u)
{
    lua_State *L = ud;
    lua_pushstring(L, u->name);
    lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
}

/* d:keys() -> the upstream keys requests have named. */
static int l_decider_keys(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    lua_newtable(L);
    st_decider_each(&ld->d, push_key, L);
    return 1;
}

static void count_queued(void *ud, st_upstream *u)
{
    *(lua_Number *)ud += u->queued;
}

/* d:queued() -> calls waiting in every key's queue */
static int l_decider_queued(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    lua_Number n = 0;
    st_decider_each(&ld->d, count_queued, &n);
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
}

static int l_decider_tostring(lua_State *L)
{
    l_decider *ld = check_decider(L, 1);
    lua_pushfstring(L, "sturdy.decider (%s)", ld->open ? "open" : "closed");
    return 1;
}

/* ---- calls ---------------------------------------------------------------- */

static void drop_owner(lua_State *L, l_call *lc)
{
    if (lc->owner != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, lc->owner);
        lc->owner = LUA_NOREF;
    }
}

/* Pushes verdict, then wake_in_ms (queued) or kind, class, detail (refused). */
static int push_verdict(lua_State *L, const st_admission *a, int64_t now)
{
    switch (a->verdict) {
    case ST_ADMIT_START:
        lua_pushliteral(L, "start");
        return 1;
    case ST_ADMIT_QUEUED:
        lua_pushliteral(L, "queued");
        if (a->wake_ms > 0)
            lua_pushnumber(L, (lua_Number)(a->wake_ms > now ? a->wake_ms - now : 0));
        else
            lua_pushnil(L);
        return 2;
    default:
        lua_pushliteral(L, "refused");
        lua_pushstring(L, a->refusal.kind);
        lua_pushstring(L, st_class_name(a->refusal.cls));
        lua_pushstring(L, a->detail ? a->detail : "");
        return 4;
    }
}

/* call:load(blob) -> true, or false and why (see upstream.h); nil blob: nothing stored. */
static int l_call_load(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    return load_blob(L, lc->up, 2);
}

/* call:save() -> the shared state of the call's key as a blob */
static int l_call_save(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    return save_blob(L, lc->ld, lc->up);
}

/* call:admit(owner) -> "start" | "queued", wake_in_ms (nil: on a free slot) |
 * "refused", kind, class, detail. A queued call keeps owner until a pump decides it. */
static int l_call_admit(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    int64_t now = mono_ms();
    st_events ev;

    ev.n = ev.dropped = 0;
    st_admit(&lc->ld->d, lc->up, &lc->call, now, &lc->verdict, &ev);
    keep_events(lc->ld, &ev);
    drop_owner(L, lc);
    if (lc->verdict.verdict == ST_ADMIT_QUEUED) {
        lua_pushvalue(L, 2);
        lc->owner = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return push_verdict(L, &lc->verdict, now);
}

/* call:verdict() -> the last admission, as call:admit returns it (a pumped call reads it here) */
static int l_call_verdict(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    return push_verdict(L, &lc->verdict, mono_ms());
}

/* d:pump(key) -> owners, wake_in_ms: the owners of the key's queued calls that
 * are decided now (started or refused; their calls say which), or nil; and when
 * the limiter opens for the next one (nil: on a free slot, or none waiting). */
static int l_decider_pump(lua_State *L)
{
    l_decider *ld = open_decider(L, 1);
    st_upstream *u = st_decider_find(&ld->d, luaL_checkstring(L, 2));
    int64_t now = mono_ms();
    st_admission a;
    st_events ev;
    st_call *c;
    int n = 0;

    if (u == NULL)
        return 0;
    ev.n = ev.dropped = 0;
    memset(&a, 0, sizeof a);
    lua_pushnil(L);
    while ((c = st_pump(&ld->d, u, now, &a, &ev)) != NULL) {
        l_call *woken = (l_call *)c;
        woken->verdict = a;
        if (n == 0) {
            lua_pop(L, 1);
            lua_newtable(L);
        }
        lua_rawgeti(L, LUA_REGISTRYINDEX, woken->owner);
        lua_rawseti(L, -2, ++n);
        drop_owner(L, woken);
        keep_events(ld, &ev);
        ev.n = ev.dropped = 0;
    }
    keep_events(ld, &ev);
    if (a.wake_ms > 0)
        lua_pushnumber(L, (lua_Number)(a.wake_ms > now ? a.wake_ms - now : 0));
    else
        lua_pushnil(L);
    return 2;
}

static uint64_t seconds_to_us(lua_State *L, int idx)
{
    lua_Number s = luaL_optnumber(L, idx, 0);
    return s > 0 && s < 1e12 ? (uint64_t)(s * 1e6) : 0;
}

/* The attempt's end from (status, head, kind, class) at idx.. */
static void read_end(lua_State *L, int idx, st_attempt_end *a)
{
    lua_Number status = luaL_optnumber(L, idx, 0);
    sl_head *head = lua_isnoneornil(L, idx + 1) ? NULL : luaL_checkudata(L, idx + 1, SL_HEAD_MT);

    memset(a, 0, sizeof *a);
    a->status = status >= 100 && status <= 999 ? (long)status : 0;
    a->headers = a->status > 0 && head ? &head->h : NULL;
    if (lua_isnoneornil(L, idx + 2)) {
        a->outcome = st_outcome_of_status(a->status);
    } else {
        const char *cls = luaL_checkstring(L, idx + 3);
        a->outcome.kind = luaL_checkstring(L, idx + 2);
        if (!st_class_parse(cls, &a->outcome.cls) || a->outcome.cls == ST_CLASS_SUCCESS)
            luaL_error(L, "sturdy: unknown failure class '%s'", cls);
    }
}

/* call:report(status, head, kind, class, ttfb_s, total_s) -> kind, class,
 * request_id: the attempt ended. status 0/nil = no response; head: the
 * policy.head it was read into; kind and class nil: the outcome is the status's.
 * Returns the outcome (kind nil for success) and the response's request-id or
 * x-request-id (nil: none). Frees its slot; feeds breaker, windows, limiter, budget. */
static int l_call_report(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    int64_t now = mono_ms();
    st_attempt_end a;
    st_events ev;

    read_end(L, 2, &a);
    a.ttfb_us = seconds_to_us(L, 6);
    a.total_us = seconds_to_us(L, 7);
    ev.n = ev.dropped = 0;
    st_report(&lc->ld->d, lc->up, &lc->call, &a, now, a.status > 0 ? wall_ms() : 0, &ev);
    keep_events(lc->ld, &ev);
    if (a.outcome.kind)
        lua_pushstring(L, a.outcome.kind);
    else
        lua_pushnil(L);
    lua_pushstring(L, st_class_name(a.outcome.cls));
    if (a.headers) {
        const char *id = st_headers_known(a.headers, ST_H_REQUEST_ID);
        if (id == NULL)
            id = st_headers_known(a.headers, ST_H_X_REQUEST_ID);
        if (id != NULL) {
            lua_pushstring(L, id);
            return 3;
        }
    }
    return 2;
}

/* call:decide(status, head, kind, class) -> retry, delay_ms, hinted, retryable,
 * stop: after report, whether and when to try again (see decide.h). */
static int l_call_decide(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    st_attempt_end a;
    st_retry_decision d;

    read_end(L, 2, &a);
    st_retry_decide(&lc->ld->d, lc->up, &lc->call, &a, mono_ms(), &d);
    lua_pushboolean(L, d.retry);
    lua_pushnumber(L, d.delay_ms);
    lua_pushboolean(L, d.hinted);
    lua_pushboolean(L, d.retryable);
    if (d.stop)
        lua_pushstring(L, d.stop);
    else
        lua_pushnil(L);
    return 5;
}

/* call:release(): canceled; its slot, permit and queue place go back (any state, any number of times). */
static int l_call_release(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    st_events ev;

    ev.n = ev.dropped = 0;
    st_release(&lc->ld->d, lc->up, &lc->call, mono_ms(), &ev);
    keep_events(lc->ld, &ev);
    drop_owner(L, lc);
    return 0;
}

/* call:reserve() -> "start" | "refused", kind, class, detail: reserves the
 * call's worst case in every spend cap that caps it (st_admit_spend), as its
 * first admission would; "start" also when nothing caps it. With the spends
 * loaded, before call:admit (which then reserves nothing more). */
static int l_call_reserve(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    int64_t now = mono_ms();
    st_events ev;

    ev.n = ev.dropped = 0;
    st_admit_spend(&lc->ld->d, lc->up, &lc->call, now, &lc->verdict, &ev);
    keep_events(lc->ld, &ev);
    return push_verdict(L, &lc->verdict, now);
}

/* call:spend_wanted() -> true when the call's spend caps still have to reserve
 * (call:reserve) or hold its reservation (call:spend_end): a spend operation. */
static int l_call_spend_wanted(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    unsigned char st = lc->call.spend.state;
    lua_pushboolean(L, lc->ld->d.spend != NULL && (st == ST_CALL_SPEND_WANTED || st == ST_CALL_SPEND_HELD));
    return 1;
}

/* call:spend_end(status) -> hold: the call is over, status its last attempt's
 * (0/nil: none). A 2xx parks its reservation and returns the id to settle it
 * by (d:settle); otherwise it is given back and nil is returned. */
static int l_call_spend_end(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    lua_Number status = luaL_optnumber(L, 2, 0);
    st_events ev;
    uint64_t id;

    ev.n = ev.dropped = 0;
    id = st_call_spend_end(&lc->ld->d, lc->up, &lc->call, status >= 100 && status <= 999 ? (long)status : 0,
                           mono_ms(), &ev);
    keep_events(lc->ld, &ev);
    if (id == 0)
        return 0;
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

/* call:unqueue(): its deadline passed while queued. */
static int l_call_unqueue(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    st_unqueue(lc->up, &lc->call);
    drop_owner(L, lc);
    return 0;
}

static int l_call_commit(lua_State *L)
{
    check_call(L, 1)->call.committed = 1;
    return 0;
}

/* call:info() -> attempts started, committed, retry_after (seconds or nil),
 * deadline (policy.monotime() seconds or nil), holding */
static int l_call_info(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    const st_call *c = &lc->call;

    lua_pushinteger(L, (lua_Integer)c->attempts);
    lua_pushboolean(L, c->committed);
    if (c->retry_after_ms > 0)
        lua_pushnumber(L, c->retry_after_ms / 1000.0);
    else
        lua_pushnil(L);
    if (c->deadline_ms > 0)
        lua_pushnumber(L, c->deadline_ms / 1000.0);
    else
        lua_pushnil(L);
    lua_pushboolean(L, c->holding);
    return 5;
}

/* call:not_before(wait_ms): no attempt starts before wait_ms from now (its
 * place in a shared limit); admit and pump treat the rest as a limiter wait. */
static int l_call_not_before(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    st_call_not_before(&lc->call, mono_ms(), (int64_t)ceil(sl_ms_arg(L, 2)));
    return 0;
}

/* call:admission(at_ms) -> max_wait_ms, requests, input_tokens, output_tokens,
 * tokens: the longest wait its attempt at_ms from now may sit through, and what
 * one attempt costs. */
static int l_call_admission(lua_State *L)
{
    l_call *lc = open_call(L, 1);
    int64_t at = lua_isnoneornil(L, 2) ? 0 : (int64_t)ceil(sl_ms_arg(L, 2));
    int d;

    lua_pushnumber(L, (lua_Number)st_call_max_wait_ms(&lc->ld->d, &lc->call, mono_ms() + at));
    for (d = 0; d < ST_DIM_COUNT; d++)
        lua_pushnumber(L, lc->call.cost[d]);
    return 1 + ST_DIM_COUNT;
}

/* call:scrub(s) -> s with every secret the request carries masked (same length):
 * for what an error hands out (an echoing server puts a key in its body). */
static int l_call_scrub(lua_State *L)
{
    l_call *lc = check_call(L, 1);
    size_t len, i;
    const char *s = luaL_checklstring(L, 2, &len);
    luaL_Buffer b;
    char *p;

    if (lc->nsecrets == 0 || len == 0) {
        lua_settop(L, 2);
        return 1;
    }
    p = malloc(len);
    if (p == NULL)
        return luaL_error(L, "sturdy: out of memory");
    memcpy(p, s, len);
    for (i = 0; i < lc->nsecrets; i++) {
        const char *sec = lc->secrets[i];
        size_t n = strlen(sec), at;
        if (n > len)
            continue;
        for (at = 0; at + n <= len; at++)
            if (p[at] == sec[0] && memcmp(p + at, sec, n) == 0) {
                memset(p + at, '*', n);
                at += n - 1;
            }
    }
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, p, len);
    free(p);
    luaL_pushresult(&b);
    return 1;
}

static int l_call_gc(lua_State *L)
{
    l_call *lc = check_call(L, 1);
    size_t i;

    /* a call dropped while it holds a slot or a queue place gives them back */
    if (lc->ld->open && (lc->call.holding || lc->call.qnode.queued)) {
        st_events ev;
        ev.n = ev.dropped = 0;
        st_release(&lc->ld->d, lc->up, &lc->call, mono_ms(), &ev);
    }
    drop_owner(L, lc);
    for (i = 0; i < lc->nsecrets; i++) {
        memset(lc->secrets[i], 0, strlen(lc->secrets[i]));
        free(lc->secrets[i]);
    }
    lc->nsecrets = 0;
    return 0;
}

/* ---- registration --------------------------------------------------------- */

static const luaL_Reg decider_methods[] = {
    { "call", l_decider_call },
    { "check", l_decider_check },
    { "key_for", l_decider_key_for },
    { "fingerprint", l_decider_fingerprint },
    { "load", l_decider_load },
    { "save", l_decider_save },
    { "upstream_stats", l_decider_upstream_stats },
    { "correct", l_decider_correct },
    { "keys", l_decider_keys },
    { "queued", l_decider_queued },
    { "pump", l_decider_pump },
    { "events", l_events },
    { "open_until", l_decider_open_until },
    { "fleet_window", l_decider_fleet_window },
    { "share", l_decider_share },
    { "fleet_counts", l_decider_fleet_counts },
    { "spend_scopes", l_decider_spend_scopes },
    { "spend_load", l_decider_spend_load },
    { "spend_save", l_decider_spend_save },
    { "spend_close", l_decider_spend_close },
    { "settle", l_decider_settle },
    { "charge", l_decider_charge },
    { "budget", l_decider_budget },
    { "close", l_decider_close },
    { NULL, NULL }
};

static const luaL_Reg call_methods[] = {
    { "load", l_call_load },
    { "save", l_call_save },
    { "admit", l_call_admit },
    { "verdict", l_call_verdict },
    { "report", l_call_report },
    { "decide", l_call_decide },
    { "release", l_call_release },
    { "reserve", l_call_reserve },
    { "spend_wanted", l_call_spend_wanted },
    { "spend_end", l_call_spend_end },
    { "unqueue", l_call_unqueue },
    { "commit", l_call_commit },
    { "info", l_call_info },
    { "scrub", l_call_scrub },
    { "not_before", l_call_not_before },
    { "admission", l_call_admission },
    { NULL, NULL }
};

static void new_class(lua_State *L, const char *name, lua_CFunction gc, lua_CFunction tostring,
                      const luaL_Reg *methods)
{
    luaL_newmetatable(L, name);
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    if (tostring) {
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

void sl_open_decider(lua_State *L)
{
    new_class(L, DECIDER_MT, l_decider_close, l_decider_tostring, decider_methods);
    new_class(L, CALL_MT, l_call_gc, NULL, call_methods);
    lua_pushcfunction(L, l_decider_new);
    lua_setfield(L, -2, "decider");
}
