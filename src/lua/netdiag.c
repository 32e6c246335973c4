/* sturdy.netdiag: the binding of the network diagnosis (src/curl/diagnose.c).
 * Value conversion only; sturdy.diagnose (Lua) turns the facts into steps and
 * a verdict. A module of its own so that `require "sturdy"` does not load it. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <lua.h>
#include <lauxlib.h>

#include "compat.h"
#include "diagnose.h"

#define MAX_TIMEOUT_MS (24L * 3600 * 1000)

static const char *const OPTION_NAMES[] = {
    "url", "proxy", "ca_file", "ca_path", "user_agent", "connect_timeout_ms", "timeout_ms", NULL
};

/* A string option without NUL bytes, or NULL when absent. */
static const char *opt_string(lua_State *L, int t, const char *name)
{
    const char *s;
    size_t len;

    lua_getfield(L, t, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "sturdy: netdiag option '%s' must be a string, got %s", name, luaL_typename(L, -1));
    s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len)
        luaL_error(L, "sturdy: netdiag option '%s' contains a NUL byte", name);
    lua_pop(L, 1); /* the table keeps the string alive */
    return s;
}

static long opt_ms(lua_State *L, int t, const char *name)
{
    lua_Number v;

    lua_getfield(L, t, name);
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_error(L, "sturdy: netdiag option '%s' must be a number of ms, got %s", name, luaL_typename(L, -1));
    v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (!(v >= 1)) /* NaN too */
        luaL_error(L, "sturdy: netdiag option '%s' must be >= 1 ms", name);
    if (v > (lua_Number)MAX_TIMEOUT_MS)
        v = (lua_Number)MAX_TIMEOUT_MS;
    return (long)v;
}

static void check_names(lua_State *L, int t)
{
    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        int i, known = 0;
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "sturdy: netdiag options take string keys, got a %s key", luaL_typename(L, -1));
        for (i = 0; OPTION_NAMES[i] != NULL; i++)
            known |= strcmp(lua_tostring(L, -1), OPTION_NAMES[i]) == 0;
        if (!known)
            luaL_error(L, "sturdy: unknown netdiag option '%s'", lua_tostring(L, -1));
    }
}

/* ---- results ----------------------------------------------------------------- */

static void set_string(lua_State *L, const char *name, const char *v)
{
    if (v != NULL && v[0] != '\0') {
        lua_pushstring(L, v);
        lua_setfield(L, -2, name);
    }
}

static void set_number(lua_State *L, const char *name, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, name);
}

/* A step table { state = "ok" | "failed", time = s } on the stack; nil when it did not run. */
static int push_step(lua_State *L, st_diag_state state, double seconds)
{
    if (state == ST_DIAG_NOT_RUN)
        return 0;
    lua_newtable(L);
    lua_pushstring(L, state == ST_DIAG_OK ? "ok" : "failed");
    lua_setfield(L, -2, "state");
    set_number(L, "time", seconds);
    return 1;
}

static void push_report(lua_State *L, const st_diag_report *r)
{
    int i;

    lua_newtable(L);
    set_string(L, "scheme", r->scheme);
    set_string(L, "host", r->host);
    set_number(L, "port", (double)r->port);
    lua_pushboolean(L, r->via_proxy);
    lua_setfield(L, -2, "via_proxy");
    set_number(L, "total", r->total_s);
    set_number(L, "curl_code", r->curl_code);
    set_string(L, "error", r->error);

    if (push_step(L, r->dns, r->dns_s)) {
        set_string(L, "name", r->dns_name);
        set_number(L, "port", (double)r->dns_port);
        set_number(L, "count", r->naddrs_total);
        lua_createtable(L, r->naddrs, 0);
        for (i = 0; i < r->naddrs; i++) {
            lua_pushstring(L, r->addrs[i]);
            lua_rawseti(L, -2, i + 1);
        }
        lua_setfield(L, -2, "addresses");
        lua_setfield(L, -2, "dns");
    }
    if (push_step(L, r->connect, r->connect_s)) {
        set_string(L, "ip", r->ip);
        if (r->ip_port > 0)
            set_number(L, "port", (double)r->ip_port);
        if (r->os_errno != 0) {
            char text[128];
            set_number(L, "errno", (double)r->os_errno);
            if (strerror_r((int)r->os_errno, text, sizeof text) == 0)
                set_string(L, "os_error", text);
        }
        lua_setfield(L, -2, "connect");
    }
    if (push_step(L, r->tls, r->tls_s)) {
        set_string(L, "protocol", r->protocol);
        set_string(L, "cipher", r->cipher);
        set_string(L, "subject", r->subject);
        set_string(L, "issuer", r->issuer);
        set_string(L, "expire", r->expire);
        if (r->have_days)
            set_number(L, "days_left", (double)r->days_left);
        lua_pushboolean(L, r->cert_inspected);
        lua_setfield(L, -2, "inspected");
        set_number(L, "verify_result", (double)r->verify_result);
        lua_setfield(L, -2, "tls");
    }
    if (push_step(L, r->first_byte, r->first_byte_s)) {
        if (r->status > 0)
            set_number(L, "status", (double)r->status);
        set_string(L, "http_version", r->http_version);
        lua_setfield(L, -2, "first_byte");
    }
}

/* netdiag.run{ url, proxy, ca_file, ca_path, user_agent, connect_timeout_ms,
 * timeout_ms } -> facts, or nil and a message when the options are unusable. */
static int l_run(lua_State *L)
{
    st_diag_opts o;
    st_diag_report *r;

    luaL_checktype(L, 1, LUA_TTABLE);
    check_names(L, 1);
    memset(&o, 0, sizeof o);
    o.url = opt_string(L, 1, "url");
    if (o.url == NULL)
        return luaL_error(L, "sturdy: netdiag.run needs a url");
    o.proxy = opt_string(L, 1, "proxy");
    o.ca_file = opt_string(L, 1, "ca_file");
    o.ca_path = opt_string(L, 1, "ca_path");
    o.user_agent = opt_string(L, 1, "user_agent");
    o.connect_timeout_ms = opt_ms(L, 1, "connect_timeout_ms");
    o.timeout_ms = opt_ms(L, 1, "timeout_ms");

    /* a userdata, so a memory error while building the table leaks nothing */
    r = lua_newuserdata(L, sizeof *r);
    if (!st_diag_run(&o, r)) {
        lua_pushnil(L);
        lua_pushstring(L, r->error);
        return 2;
    }
    push_report(L, r);
    return 1;
}

/* netdiag.days_until(text [, now_epoch_s]) -> whole days, or nil. */
static int l_days_until(lua_State *L)
{
    const char *text = luaL_checkstring(L, 1);
    lua_Number now = luaL_optnumber(L, 2, (lua_Number)time(NULL));
    long days;

    if (!(now > -1e15 && now < 1e15)) /* NaN and absurd clocks */
        return luaL_argerror(L, 2, "sturdy: now must be an epoch in seconds");
    if (!st_diag_days_until(text, (long long)floor(now), &days))
        return 0;
    lua_pushnumber(L, (lua_Number)days);
    return 1;
}

static const luaL_Reg FUNCS[] = {
    { "run", l_run },
    { "days_until", l_days_until },
    { NULL, NULL }
};

ST_EXPORT int luaopen_sturdy_netdiag(lua_State *L);

ST_EXPORT int luaopen_sturdy_netdiag(lua_State *L)
{
    static int curl_ready = 0;

    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
            return luaL_error(L, "sturdy: libcurl failed to initialize");
        curl_ready = 1;
    }
    luaL_newlib(L, FUNCS);
    return 1;
}
