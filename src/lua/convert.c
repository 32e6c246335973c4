#include "convert.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

#include <lauxlib.h>

#include "compat.h"
#include "httpdate.h"

static const char *const breaker_modes[] = { "normal", "forced_open", "disabled", "metrics_only", NULL };
static const char *const breaker_states[] = { "closed", "open", "half_open", NULL };
static const char *const priorities[] = { "high", "normal", "low", NULL };

#define MAX_MS ((double)ST_RETRY_AFTER_MAX_MS)

int sl_error(lua_State *L, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    lua_pushvfstring(L, fmt, ap);
    va_end(ap);
    return lua_error(L);
}

/* ---- strict readers ------------------------------------------------------- */

static int field_error(lua_State *L, const char *where, const char *field, const char *want)
{
    return sl_error(L, "sturdy: configuration field '%s.%s' must be %s", where, field, want);
}

/* Pushes t[field], which must be a table. */
static int sub_table(lua_State *L, int t, const char *where, const char *field)
{
    lua_getfield(L, t, field);
    if (!lua_istable(L, -1))
        field_error(L, where, field, "a table");
    return lua_gettop(L);
}

static double num_field(lua_State *L, int t, const char *where, const char *field, double lo, double hi)
{
    double v;
    lua_getfield(L, t, field);
    if (lua_type(L, -1) != LUA_TNUMBER)
        field_error(L, where, field, "a number");
    v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (!(v >= lo && v <= hi)) { /* NaN fails too */
        char want[96];
        snprintf(want, sizeof want, "a number in [%.17g, %.17g]", lo, hi);
        field_error(L, where, field, want);
    }
    return v;
}

static unsigned count_field(lua_State *L, int t, const char *where, const char *field, double lo, double hi)
{
    double v = num_field(L, t, where, field, lo, hi);
    if (v != floor(v))
        field_error(L, where, field, "a whole number");
    return (unsigned)v;
}

static int64_t ms_field(lua_State *L, int t, const char *where, const char *field, double lo)
{
    return (int64_t)ceil(num_field(L, t, where, field, lo, MAX_MS));
}

static int bool_field(lua_State *L, int t, const char *where, const char *field)
{
    int v;
    lua_getfield(L, t, field);
    if (!lua_isboolean(L, -1))
        field_error(L, where, field, "a boolean");
    v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

static int option_field(lua_State *L, int t, const char *where, const char *field, const char *const *names)
{
    const char *s;
    int i;
    lua_getfield(L, t, field);
    s = lua_tostring(L, -1);
    for (i = 0; s != NULL && lua_type(L, -1) == LUA_TSTRING && names[i]; i++)
        if (strcmp(s, names[i]) == 0) {
            lua_pop(L, 1);
            return i;
        }
    return field_error(L, where, field, "one of the names the options schema lists");
}

const char *sl_opt_string(lua_State *L, int t, const char *field)
{
    const char *s = NULL;
    lua_getfield(L, t, field);
    if (lua_type(L, -1) == LUA_TSTRING) {
        size_t len;
        s = lua_tolstring(L, -1, &len);
        if (strlen(s) != len)
            sl_error(L, "sturdy: option '%s' contains a NUL byte", field);
        if (strpbrk(s, "\r\n") != NULL) /* user_agent becomes a header line */
            sl_error(L, "sturdy: option '%s' contains CR or LF", field);
    } else if (!lua_isnil(L, -1)) {
        sl_error(L, "sturdy: option '%s' must be a string", field);
    }
    lua_pop(L, 1);
    return s;
}

static int class_of(lua_State *L, int idx, const char *where)
{
    st_class cls = ST_CLASS_SUCCESS; /* luaL_error does not return; clang cannot tell */
    const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tostring(L, idx) : NULL;
    if (s == NULL || !st_class_parse(s, &cls))
        sl_error(L, "sturdy: configuration field '%s' holds an unknown class", where);
    return (int)cls;
}

static void read_retry(lua_State *L, int t, st_retry_policy *p)
{
    static const char *const where = "retry";
    int i, sub;

    st_retry_policy_defaults(p);
    p->attempts = count_field(L, t, where, "attempts", 1, 1000);
    p->cap_ms = num_field(L, t, where, "cap_ms", 0, MAX_MS);
    p->honor_retry_after_ms = ms_field(L, t, where, "honor_retry_after_ms", 0);
    {
        const char *const jitters[] = { "full", "equal", "decorrelated", "none", NULL };
        p->jitter = (st_jitter)option_field(L, t, where, "jitter", jitters);
    }
    p->budget_enabled = bool_field(L, t, where, "budget");
    sub = sub_table(L, t, where, "base_ms");
    for (i = 0; i < ST_CLASS_COUNT; i++) {
        const char *name = st_class_name((st_class)i);
        lua_getfield(L, sub, name);
        if (!lua_isnil(L, -1)) {
            lua_pop(L, 1);
            p->base_ms[i] = num_field(L, sub, "retry.base_ms", name, 0, MAX_MS);
        } else {
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    sub = sub_table(L, t, where, "retried");
    lua_pushnil(L);
    while (lua_next(L, sub)) {
        int cls = class_of(L, -2, "retry.retried");
        if (!lua_isboolean(L, -1))
            sl_error(L, "sturdy: configuration field 'retry.retried' takes booleans");
        p->retried[cls] = (unsigned char)lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    sub = sub_table(L, t, where, "status_retried");
    lua_pushnil(L);
    while (lua_next(L, sub)) {
        lua_Number status = lua_type(L, -2) == LUA_TNUMBER ? lua_tonumber(L, -2) : -1;
        if (!(status >= 100 && status < ST_STATUS_OVERRIDES && status == floor(status)) || !lua_isboolean(L, -1))
            sl_error(L, "sturdy: configuration field 'retry.status_retried' maps statuses 100-599 to booleans");
        p->status_retried[(int)status] = (signed char)lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void read_breaker(lua_State *L, int b, st_upstream_config *c)
{
    static const char *const where = "upstream.breaker";
    st_breaker_config *bc = &c->breaker;
    int i, n;

    bc->window_ms = ms_field(L, b, where, "window_ms", 1);
    bc->buckets = count_field(L, b, where, "buckets", 1, ST_BREAKER_MAX_BUCKETS);
    bc->min_calls = count_field(L, b, where, "min_calls", 1, 4294967295.0);
    bc->failure_rate = num_field(L, b, where, "failure_rate", 0, 1);
    bc->slow_call_ms = ms_field(L, b, where, "slow_call_ms", 0);
    bc->slow_rate = num_field(L, b, where, "slow_rate", 0, 1);
    bc->open_ms = ms_field(L, b, where, "open_ms", 1);
    bc->max_open_ms = ms_field(L, b, where, "max_open_ms", 1);
    bc->probes = count_field(L, b, where, "probes", 1, ST_BREAKER_MAX_PROBES);
    bc->probe_timeout_ms = ms_field(L, b, where, "probe_timeout_ms", 1);
    lua_getfield(L, b, "failure_classes");
    if (!lua_istable(L, -1))
        field_error(L, where, "failure_classes", "a list of class names");
    bc->failure_classes = 0;
    n = (int)lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        bc->failure_classes |= ST_BREAKER_CLASS(class_of(L, -1, "upstream.breaker.failure_classes"));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    c->breaker_mode = (st_breaker_mode)option_field(L, b, where, "mode", breaker_modes);
}

static void read_adaptive(lua_State *L, int t, st_upstream_config *c)
{
    static const char *const where = "upstream.adaptive";
    st_adaptive_config *a = &c->adaptive;

    c->adaptive_enabled = bool_field(L, t, where, "enabled");
    a->min_limit = count_field(L, t, where, "min_limit", 1, ST_ADAPTIVE_MAX_LIMIT);
    a->max_limit = count_field(L, t, where, "max_limit", 1, ST_ADAPTIVE_MAX_LIMIT);
    a->initial_limit = count_field(L, t, where, "initial_limit", 1, ST_ADAPTIVE_MAX_LIMIT);
    a->window_ms = ms_field(L, t, where, "window_ms", 1);
    if (a->window_ms > ST_ADAPTIVE_MAX_WINDOW_MS)
        field_error(L, where, "window_ms", "at most 3600000");
    a->min_samples = count_field(L, t, where, "min_samples", 2, ST_ADAPTIVE_MAX_SAMPLES);
    a->tolerance = num_field(L, t, where, "tolerance", 0, 10);
    a->growth = num_field(L, t, where, "growth", 1e-6, 1);
    if (a->max_limit < a->min_limit)
        field_error(L, where, "max_limit", "at least min_limit");
}

static void read_upstream(lua_State *L, int t, st_upstream_config *c)
{
    static const char *const where = "upstream";
    int sub, i;

    st_upstream_config_defaults(c);
    sub = sub_table(L, t, where, "budget");
    c->budget_ratio = num_field(L, sub, "upstream.budget", "ratio", 0, 1e12);
    c->budget_min_per_s = num_field(L, sub, "upstream.budget", "min_per_s", 0, 1e12);
    c->budget_slot_ms = ms_field(L, sub, "upstream.budget", "slot_ms", 1);
    lua_pop(L, 1);

    lua_getfield(L, t, "breaker");
    if (lua_istable(L, -1))
        read_breaker(L, lua_gettop(L), c);
    else if (lua_isboolean(L, -1) && !lua_toboolean(L, -1))
        c->breaker_enabled = 0;
    else
        field_error(L, where, "breaker", "a table or false");
    lua_pop(L, 1);

    sub = sub_table(L, t, where, "limits");
    for (i = 0; i < ST_DIM_COUNT; i++)
        c->limits_per_min[i] = num_field(L, sub, "upstream.limits", st_dim_name((st_dim)i), 0, 1e12);
    c->burst_seconds = num_field(L, sub, "upstream.limits", "burst_s", 0, 3600);
    c->concurrency = count_field(L, sub, "upstream.limits", "concurrency", 1, 1e6);
    c->queue_max = count_field(L, sub, "upstream.limits", "queue", 0, 1e7);
    c->max_pause_ms = ms_field(L, sub, "upstream.limits", "max_pause_ms", 1);
    lua_pop(L, 1);

    sub = sub_table(L, t, where, "adaptive");
    read_adaptive(L, sub, c);
    lua_pop(L, 1);
}

void sl_read_policy(lua_State *L, int t, st_retry_policy *rp, st_upstream_config *uc)
{
    int sub;
    t = lua_absindex(L, t);
    luaL_checktype(L, t, LUA_TTABLE);
    sub = sub_table(L, t, "config", "retry");
    read_retry(L, sub, rp);
    lua_pop(L, 1);
    sub = sub_table(L, t, "config", "upstream");
    read_upstream(L, sub, uc);
    lua_pop(L, 1);
}

/* ---- spend caps ------------------------------------------------------------ */

static const char *const cap_names[ST_SPEND_SPANS][ST_SPEND_DIMS] = {
    { "usd_per_hour", "tokens_per_hour" }, { "usd_per_day", "tokens_per_day" }
};

/* One scope's caps (absent = none) and warn share. */
static void read_caps(lua_State *L, int t, const char *where, st_spend_config *c)
{
    int span, dim;

    st_spend_config_defaults(c);
    for (span = 0; span < ST_SPEND_SPANS; span++)
        for (dim = 0; dim < ST_SPEND_DIMS; dim++) {
            const char *name = cap_names[span][dim];
            lua_getfield(L, t, name);
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                continue;
            }
            lua_pop(L, 1);
            if (dim == ST_SPEND_COST)
                c->cap[span][dim] = st_spend_usd(num_field(L, t, where, name, 1e-6, 1e9));
            else
                c->cap[span][dim] = (int64_t)count_field(L, t, where, name, 1, 1e15);
        }
    c->warn = num_field(L, t, where, "warn", 0, 1);
}

static void read_rules(lua_State *L, int t, const char *field, st_spend_scope scope, st_spend_book *b)
{
    int sub = sub_table(L, t, "budget", field);
    lua_pushnil(L);
    while (lua_next(L, sub)) {
        st_spend_config c;
        size_t len;
        const char *name;
        if (lua_type(L, -2) != LUA_TSTRING || !lua_istable(L, -1))
            sl_error(L, "sturdy: configuration field 'budget.%s' maps names to tables of caps", field);
        name = lua_tolstring(L, -2, &len);
        if (len == 0 || strlen(name) != len)
            sl_error(L, "sturdy: configuration field 'budget.%s' holds an empty name or a NUL byte", field);
        read_caps(L, lua_gettop(L), field, &c);
        if (!st_spend_book_rule(b, scope, name, &c))
            sl_error(L, "sturdy: out of memory");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

int sl_read_spend(lua_State *L, int t, st_decider *d, int64_t now_ms)
{
    st_spend_book *b;
    int sub;

    t = lua_absindex(L, t);
    lua_getfield(L, t, "budget");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    if (!lua_istable(L, -1))
        field_error(L, "config", "budget", "a table");
    sub = lua_gettop(L);
    b = st_spend_book_new(ms_field(L, sub, "budget", "settle_ms", 1), now_ms);
    if (b == NULL)
        sl_error(L, "sturdy: out of memory");
    st_decider_set_spend(d, b, now_ms); /* owned by the decider from here, whatever raises */
    lua_getfield(L, sub, "client");
    if (lua_istable(L, -1)) {
        st_spend_config c;
        read_caps(L, lua_gettop(L), "budget.client", &c);
        st_spend_book_cap_client(b, &c, now_ms);
    } else if (!lua_isnil(L, -1)) {
        field_error(L, "budget", "client", "a table or nil");
    }
    lua_pop(L, 1);
    read_rules(L, sub, "keys", ST_SCOPE_KEY, b);
    read_rules(L, sub, "tags", ST_SCOPE_TAG, b);
    st_decider_set_spend(d, b, now_ms); /* again: keys made meanwhile learn their rules */
    lua_pop(L, 1);
    return 1;
}

/* ---- defaults and enums --------------------------------------------------- */

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

static void set_bool(lua_State *L, const char *k, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

static void push_names(lua_State *L, const char *const *names)
{
    int i;
    lua_newtable(L);
    for (i = 0; names[i]; i++) {
        lua_pushstring(L, names[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

void sl_push_enums(lua_State *L)
{
    const char *classes[ST_CLASS_COUNT + 1], *dims[ST_DIM_COUNT + 1], *jitters[5];
    int i;

    for (i = 0; i < ST_CLASS_COUNT; i++)
        classes[i] = st_class_name((st_class)i);
    classes[ST_CLASS_COUNT] = NULL;
    for (i = 0; i < ST_DIM_COUNT; i++)
        dims[i] = st_dim_name((st_dim)i);
    dims[ST_DIM_COUNT] = NULL;
    for (i = 0; i < 4; i++)
        jitters[i] = st_jitter_name((st_jitter)i);
    jitters[4] = NULL;
    lua_createtable(L, 0, 6);
    push_names(L, classes);
    lua_setfield(L, -2, "class");
    push_names(L, jitters);
    lua_setfield(L, -2, "jitter");
    push_names(L, breaker_modes);
    lua_setfield(L, -2, "breaker_mode");
    push_names(L, breaker_states);
    lua_setfield(L, -2, "breaker_state");
    push_names(L, priorities);
    lua_setfield(L, -2, "priority");
    push_names(L, dims);
    lua_setfield(L, -2, "dimension");
}

void sl_push_defaults(lua_State *L)
{
    st_retry_policy p;
    st_upstream_config c;
    const st_breaker_config *b = &c.breaker;
    int i, n;

    st_retry_policy_defaults(&p);
    st_upstream_config_defaults(&c);
    lua_createtable(L, 0, 2);

    lua_createtable(L, 0, 8);
    set_int(L, "attempts", p.attempts);
    set_num(L, "cap_ms", p.cap_ms);
    set_num(L, "honor_retry_after_ms", (double)p.honor_retry_after_ms);
    set_str(L, "jitter", st_jitter_name(p.jitter));
    set_bool(L, "budget", p.budget_enabled);
    lua_createtable(L, 0, ST_CLASS_COUNT);
    for (i = 0; i < ST_CLASS_COUNT; i++)
        if (p.base_ms[i] > 0)
            set_num(L, st_class_name((st_class)i), p.base_ms[i]);
    lua_setfield(L, -2, "base_ms");
    lua_createtable(L, 0, ST_CLASS_COUNT);
    for (i = 0; i < ST_CLASS_COUNT; i++)
        set_bool(L, st_class_name((st_class)i), p.retried[i]);
    lua_setfield(L, -2, "retried");
    lua_newtable(L);
    lua_setfield(L, -2, "status_retried");
    lua_setfield(L, -2, "retry");

    lua_createtable(L, 0, 4);
    lua_createtable(L, 0, 3);
    set_num(L, "ratio", c.budget_ratio);
    set_num(L, "min_per_s", c.budget_min_per_s);
    set_num(L, "slot_ms", (double)c.budget_slot_ms);
    lua_setfield(L, -2, "budget");
    lua_createtable(L, 0, 12);
    set_num(L, "window_ms", (double)b->window_ms);
    set_int(L, "buckets", b->buckets);
    set_int(L, "min_calls", b->min_calls);
    set_num(L, "failure_rate", b->failure_rate);
    set_num(L, "slow_call_ms", (double)b->slow_call_ms);
    set_num(L, "slow_rate", b->slow_rate);
    set_num(L, "open_ms", (double)b->open_ms);
    set_num(L, "max_open_ms", (double)b->max_open_ms);
    set_int(L, "probes", b->probes);
    set_num(L, "probe_timeout_ms", (double)b->probe_timeout_ms);
    lua_newtable(L);
    for (i = 0, n = 0; i < ST_CLASS_COUNT; i++)
        if (b->failure_classes & ST_BREAKER_CLASS(i)) {
            lua_pushstring(L, st_class_name((st_class)i));
            lua_rawseti(L, -2, ++n);
        }
    lua_setfield(L, -2, "failure_classes");
    set_str(L, "mode", breaker_modes[c.breaker_mode]);
    lua_setfield(L, -2, "breaker");
    lua_createtable(L, 0, 8);
    for (i = 0; i < ST_DIM_COUNT; i++)
        set_num(L, st_dim_name((st_dim)i), c.limits_per_min[i]);
    set_num(L, "burst_s", c.burst_seconds);
    set_int(L, "concurrency", c.concurrency);
    set_int(L, "queue", c.queue_max);
    set_num(L, "max_pause_ms", (double)c.max_pause_ms);
    lua_setfield(L, -2, "limits");
    lua_createtable(L, 0, 8);
    set_bool(L, "enabled", c.adaptive_enabled);
    set_int(L, "min_limit", c.adaptive.min_limit);
    set_int(L, "max_limit", c.adaptive.max_limit);
    set_int(L, "initial_limit", c.adaptive.initial_limit);
    set_num(L, "window_ms", (double)c.adaptive.window_ms);
    set_int(L, "min_samples", c.adaptive.min_samples);
    set_num(L, "tolerance", c.adaptive.tolerance);
    set_num(L, "growth", c.adaptive.growth);
    lua_setfield(L, -2, "adaptive");
    lua_setfield(L, -2, "upstream");
}

/* ---- stats and events ----------------------------------------------------- */

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
    set_int(L, "count", (double)sum.count);
    set_num(L, "min", sum.min_us / 1e6);
    set_num(L, "max", sum.max_us / 1e6);
    set_num(L, "mean", sum.mean_us / 1e6);
    for (i = 0; i < 5; i++)
        set_num(L, names[i], out[i] / 1e6);
}

lua_Number sl_ms_arg(lua_State *L, int i)
{
    lua_Number v = luaL_checknumber(L, i);
    if (!(v > 0)) /* NaN and negatives are no time */
        return 0;
    return v < (lua_Number)ST_RETRY_AFTER_MAX_MS ? v : (lua_Number)ST_RETRY_AFTER_MAX_MS;
}

uint64_t sl_count_arg(lua_State *L, int i)
{
    lua_Number v = luaL_checknumber(L, i);
    if (!(v > 0))
        return 0;
    return v < 9007199254740992.0 ? (uint64_t)v : UINT64_C(9007199254740992);
}

int sl_push_fleet_counts(lua_State *L, st_upstream *u, int64_t now)
{
    static const char *const states[] = { "closed", "open", "half_open" };
    st_breaker_state state = u->breaker_enabled ? st_breaker_state_now(&u->breaker) : ST_BREAKER_CLOSED;

    lua_pushnumber(L, (lua_Number)u->breaker.recorded_calls);
    lua_pushnumber(L, (lua_Number)u->breaker.recorded_failures);
    lua_pushnumber(L, (lua_Number)u->breaker.recorded_slow);
    lua_pushstring(L, states[state]);
    lua_pushnumber(L, state == ST_BREAKER_OPEN && u->breaker.mode == ST_BREAKER_NORMAL
                   && u->breaker.open_until_ms > now ? (lua_Number)(u->breaker.open_until_ms - now) : 0);
    return 5;
}

/* A key's limits per dimension and its 429 pause. */
static void push_limits(lua_State *L, st_upstream *u, int64_t now)
{
    int i;

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
}

/* The part of a key's stats that changes call by call and costs no walk
 * over windows: in_flight, queued, paced, breaker.state and limits, as
 * sl_push_upstream_stats gives them. */
void sl_push_upstream_gauges(lua_State *L, st_upstream *u, int64_t now)
{
    lua_createtable(L, 0, 4);
    set_int(L, "in_flight", u->in_flight);
    set_int(L, "queued", u->queued);
    set_int(L, "paced", (double)u->paced);
    lua_createtable(L, 0, 1);
    set_str(L, "state", u->breaker_enabled ? breaker_states[st_breaker_state_now(&u->breaker)] : "disabled");
    lua_setfield(L, -2, "breaker");
    push_limits(L, u, now);
    lua_setfield(L, -2, "limits");
}

void sl_push_upstream_stats(lua_State *L, st_upstream *u, int64_t now)
{
    st_breaker_stats bs;

    lua_createtable(L, 0, 12);
    set_str(L, "key", u->name);
    set_int(L, "in_flight", u->in_flight);
    set_int(L, "queued", u->queued);
    set_int(L, "throttled", (double)u->throttled);
    set_int(L, "circuit_open", (double)u->circuit_open);
    set_int(L, "queue_full", (double)u->queue_full);
    set_int(L, "paced", (double)u->paced);
    set_num(L, "budget", st_budget_balance(&u->budget, now));

    st_breaker_stats_get(&u->breaker, now, &bs);
    lua_createtable(L, 0, 10);
    set_str(L, "state", u->breaker_enabled ? breaker_states[bs.state] : "disabled");
    set_str(L, "mode", u->breaker_enabled ? breaker_modes[bs.mode] : "disabled");
    set_int(L, "calls", bs.calls);
    set_int(L, "failures", bs.failures);
    set_int(L, "slow", bs.slow);
    set_num(L, "failure_rate", bs.failure_rate);
    set_num(L, "slow_rate", bs.slow_rate);
    set_int(L, "opens", bs.opens);
    set_num(L, "open_for", bs.current_open_ms / 1000.0);
    if (bs.state == ST_BREAKER_OPEN && bs.open_until_ms != INT64_MAX)
        set_num(L, "retry_in", bs.open_until_ms > now ? (bs.open_until_ms - now) / 1000.0 : 0);
    lua_setfield(L, -2, "breaker");

    push_latency(L, u->total, now);
    lua_setfield(L, -2, "latency");
    push_latency(L, u->ttfb, now);
    lua_setfield(L, -2, "ttfb");

    push_limits(L, u, now);
    lua_setfield(L, -2, "limits");

    if (u->adaptive_enabled) {
        st_adaptive_stats as;
        st_adaptive_stats_get(&u->adaptive, &as);
        lua_createtable(L, 0, 8);
        set_int(L, "limit", as.limit);
        if (as.baseline_ms >= 0)
            set_num(L, "baseline", as.baseline_ms / 1000.0);
        set_int(L, "windows", (double)as.windows);
        set_int(L, "grows", (double)as.grows);
        set_int(L, "shrinks_latency", (double)as.shrinks_latency);
        set_int(L, "shrinks_overload", (double)as.shrinks_overload);
        set_int(L, "baseline_resets", (double)as.baseline_resets);
        lua_setfield(L, -2, "adaptive");
    }
    if (u->hedges || u->hedges_refused) {
        lua_createtable(L, 0, 2);
        set_int(L, "started", (double)u->hedges);
        set_int(L, "refused", (double)u->hedges_refused);
        lua_setfield(L, -2, "hedges");
    }
    if (u->spend) {
        sl_push_spend(L, &u->spend->spend, now);
        lua_setfield(L, -2, "budget");
    }
}

void sl_push_spend(lua_State *L, st_spend *s, int64_t now)
{
    int span, dim;

    lua_createtable(L, 0, 3);
    lua_createtable(L, 0, 4);
    for (span = 0; span < ST_SPEND_SPANS; span++)
        for (dim = 0; dim < ST_SPEND_DIMS; dim++) {
            int64_t used = st_spend_used(s, now, (st_spend_span)span, (st_spend_dim)dim);
            if (dim == ST_SPEND_COST)
                set_num(L, cap_names[span][dim], used / 1e6);
            else
                set_int(L, cap_names[span][dim], (double)used);
        }
    lua_setfield(L, -2, "used");
    lua_createtable(L, 0, 2);
    set_num(L, "usd", st_spend_reserved(s, ST_SPEND_COST) / 1e6);
    set_int(L, "tokens", (double)st_spend_reserved(s, ST_SPEND_TOKENS));
    lua_setfield(L, -2, "reserved");
    lua_createtable(L, 0, 4);
    for (span = 0; span < ST_SPEND_SPANS; span++)
        for (dim = 0; dim < ST_SPEND_DIMS; dim++) {
            int64_t cap = s->cap[span][dim];
            if (cap <= 0)
                continue;
            if (dim == ST_SPEND_COST)
                set_num(L, cap_names[span][dim], cap / 1e6);
            else
                set_int(L, cap_names[span][dim], (double)cap);
        }
    lua_setfield(L, -2, "caps");
    set_int(L, "passed", (double)s->admitted); /* another scope may still have refused the call */
    set_int(L, "refused", (double)s->refused);
}

void sl_push_event(lua_State *L, const st_event *ev)
{
    static const char *const scopes[ST_SPEND_SCOPES] = { "client", "key", "tag" };
    const st_spend_warning *w = &ev->warning;

    lua_createtable(L, 0, 8);
    if (ev->up)
        set_str(L, "key", ev->up->name);
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
        set_num(L, "learned", ev->learned);
        break;
    case ST_EVENT_PAUSED:
        set_str(L, "type", "paused");
        set_num(L, "pause", ev->pause_ms / 1000.0);
        break;
    case ST_EVENT_BUDGET_WARNING:
        set_str(L, "type", "budget_warning");
        set_str(L, "scope", scopes[w->scope]);
        if (w->name)
            set_str(L, "name", w->name);
        set_str(L, "cap", cap_names[w->span][w->dim]);
        set_num(L, "used", w->dim == ST_SPEND_COST ? w->used / 1e6 : (double)w->used);
        set_num(L, "limit", w->dim == ST_SPEND_COST ? w->cap / 1e6 : (double)w->cap);
        set_num(L, "share", w->cap > 0 ? (double)w->used / (double)w->cap : 0);
        break;
    }
}

/* ---- spend caps: settle, charge, state ------------------------------------ */

/* Pushes the events of a spend operation as a list (empty when none). */
static void push_events(lua_State *L, const st_events *ev)
{
    unsigned i;
    lua_createtable(L, (int)ev->n, 0);
    for (i = 0; i < ev->n; i++) {
        sl_push_event(L, &ev->ev[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
}

/* A dollar or token amount argument: a finite number >= 0 (nil: 0). */
static double amount_arg(lua_State *L, int i, const char *what)
{
    lua_Number v = luaL_optnumber(L, i, 0);
    if (!(v >= 0 && v <= 1e15))
        sl_error(L, "sturdy: %s must be a number from 0 to 1e15", what);
    return v;
}

int sl_spend_settle(lua_State *L, st_decider *d, int64_t now_ms)
{
    lua_Number id = luaL_checknumber(L, 2);
    double usd = amount_arg(L, 3, "the cost"), tokens = amount_arg(L, 4, "the tokens");
    st_events ev;
    int done = 0;

    ev.n = ev.dropped = 0;
    if (id >= 1 && id < 9007199254740992.0 && id == floor(id))
        done = st_decider_spend_settle(d, (uint64_t)id, usd, tokens, now_ms, &ev);
    lua_pushboolean(L, done);
    push_events(L, &ev);
    return 2;
}

int sl_spend_charge(lua_State *L, st_decider *d, int64_t now_ms)
{
    const char *key = luaL_optstring(L, 2, NULL), *tag = luaL_optstring(L, 3, NULL);
    double usd = amount_arg(L, 4, "the cost"), tokens = amount_arg(L, 5, "the tokens");
    st_events ev;

    ev.n = ev.dropped = 0;
    st_decider_spend_charge(d, key ? st_decider_upstream(d, key, now_ms) : NULL, tag, usd, tokens, now_ms, &ev);
    push_events(L, &ev);
    return 1;
}

int sl_push_budget(lua_State *L, st_decider *d, int64_t now_ms)
{
    st_spend_book *b = d->spend;
    int i;

    if (b == NULL)
        return 0;
    lua_createtable(L, 0, 3);
    if (b->client_capped) {
        sl_push_spend(L, &b->client, now_ms);
        lua_setfield(L, -2, "client");
    }
    lua_newtable(L);
    for (i = 0; i < ST_SPEND_BUCKETS; i++) {
        st_spend_named *n;
        for (n = b->tags[i]; n; n = n->next) {
            sl_push_spend(L, &n->spend, now_ms);
            lua_setfield(L, -2, n->name);
        }
    }
    lua_setfield(L, -2, "tags");
    set_int(L, "expired", (double)b->expired);
    return 1;
}

/* ---- header blocks -------------------------------------------------------- */

/* Pushes name lowercased. */
static void push_lower(lua_State *L, const char *p, size_t len)
{
    char small[256];
    size_t i;

    if (len <= sizeof small) {
        for (i = 0; i < len; i++)
            small[i] = (char)tolower((unsigned char)p[i]);
        lua_pushlstring(L, small, len);
    } else {
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        for (i = 0; i < len; i++)
            luaL_addchar(&b, (char)tolower((unsigned char)p[i]));
        luaL_pushresult(&b);
    }
}

void sl_push_header_table(lua_State *L, const char *p, size_t len)
{
    const char *end = p + len;

    lua_newtable(L);
    while (p < end) {
        const char *name_end = memchr(p, '\0', (size_t)(end - p)), *value, *value_end;
        if (name_end == NULL)
            break;
        value = name_end + 1;
        value_end = value < end ? memchr(value, '\0', (size_t)(end - value)) : NULL;
        if (value_end == NULL)
            break;
        push_lower(L, p, (size_t)(name_end - p));
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, value, (size_t)(value_end - value));
        } else if (lua_istable(L, -1)) {
            lua_pushlstring(L, value, (size_t)(value_end - value));
            lua_rawseti(L, -2, (int)lua_rawlen(L, -2) + 1);
        } else {
            lua_createtable(L, 2, 0);
            lua_insert(L, -2);
            lua_rawseti(L, -2, 1);
            lua_pushlstring(L, value, (size_t)(value_end - value));
            lua_rawseti(L, -2, 2);
        }
        lua_rawset(L, -3);
        p = value_end + 1;
    }
}
