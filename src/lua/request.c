#define _POSIX_C_SOURCE 200809L

#include "request.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>

#include "compat.h"
#include "convert.h"

#define MAX_SECONDS 315360000.0   /* 10 years, as every option in seconds */
#define MAX_LINE 8192

static const char *const timeout_names[4] = { "connect", "first_byte", "idle", "total" };

/* ---- small helpers -------------------------------------------------------- */

static int is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Pushes a string and returns it (lua_pushlstring returns nothing before 5.2). */
static const char *push_str(lua_State *L, const char *s, size_t len)
{
    lua_pushlstring(L, s, len);
    return lua_tostring(L, -1);
}

static int has_control(const char *s, size_t len, int allow_space)
{
    size_t i;
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f || (!allow_space && c == ' '))
            return 1;
    }
    return 0;
}

/* The host (and port) of a URL without userinfo: *len bytes from the result. */
static const char *url_host(const char *url, size_t *len)
{
    const char *p = strstr(url, "://"), *end, *at;
    if (p == NULL)
        return NULL;
    p += 3;
    end = p + strcspn(p, "/?#");
    for (at = end; at > p && at[-1] != '@'; at--)
        ;
    if (at > p)
        p = at;
    *len = (size_t)(end - p);
    return *len ? p : NULL;
}

/* A value shown in an error: a short string quoted, else its type. */
static const char *shown(lua_State *L, int i)
{
    if (lua_type(L, i) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(L, i, &len);
        char out[48];
        size_t k, n = 0;
        for (k = 0; k < len && n < 40; k++)
            out[n++] = (unsigned char)s[k] < 0x20 ? ' ' : s[k];
        return lua_pushfstring(L, "\"%s%s\"", push_str(L, out, n), len > 40 ? "..." : "");
    }
    return luaL_typename(L, i);
}

static int wrong(lua_State *L, const char *name, const char *want, int i)
{
    return sl_error(L, "sturdy: option '%s' in request must be %s, got %s", name, want, shown(L, i));
}

static int is_whole(lua_Number v, lua_Number lo, lua_Number hi)
{
    return v >= lo && v <= hi && v == floor(v);
}

/* seconds (> 0, at most 10 years) or false, to ms rounded up; 0 = none */
static int64_t timeout_ms(lua_State *L, int i, const char *name)
{
    lua_Number v;
    if (lua_isboolean(L, i) && !lua_toboolean(L, i))
        return 0;
    v = lua_type(L, i) == LUA_TNUMBER ? lua_tonumber(L, i) : -1;
    if (!(v > 0))
        sl_error(L, "sturdy: option '%s' in request.timeout must be a positive number or false, got %s", name,
                   shown(L, i));
    if (v > MAX_SECONDS)
        sl_error(L, "sturdy: option '%s' in request.timeout must be at most %d (seconds)", name,
                   (int)MAX_SECONDS);
    return (int64_t)ceil(v * 1000);
}

size_t sl_check_header_line(lua_State *L, const char *line, size_t len, const char *where)
{
    static const char *const framing[] = { "content-length", "transfer-encoding", "host", "connection",
                                           "upgrade", "te", "trailer", "keep-alive", "proxy-connection",
                                           "expect", NULL };
    size_t i, name_len;
    const char *colon = memchr(line, ':', len);

    if (colon == NULL || colon == line)
        sl_error(L, "sturdy: a header line in %s has no 'Name: value' form", where);
    name_len = (size_t)(colon - line);
    for (i = 0; i < name_len; i++)
        if (!is_tchar((unsigned char)line[i]))
            sl_error(L, "sturdy: header name \"%s\" in %s is not a valid HTTP token",
                       push_str(L, line, name_len < 64 ? name_len : 64), where);
    for (i = name_len + 1; i < len; i++)
        if (line[i] == '\r' || line[i] == '\n' || line[i] == '\0')
            sl_error(L, "sturdy: header '%s' in %s contains CR, LF or NUL",
                       push_str(L, line, name_len), where);
    if (len > MAX_LINE)
        sl_error(L, "sturdy: header '%s' in %s is longer than %d bytes",
                   push_str(L, line, name_len < 64 ? name_len : 64), where, MAX_LINE);
    for (i = 0; framing[i]; i++)
        if (strlen(framing[i]) == name_len && strncasecmp(line, framing[i], name_len) == 0)
            sl_error(L, "sturdy: header '%s' in %s frames the message and is set by sturdy itself; remove it",
                       push_str(L, line, name_len), where);
    return name_len;
}

/* ---- client header lines -------------------------------------------------- */

static char *dup_mem(const char *p, size_t n, int lower)
{
    char *d = malloc(n + 1);
    size_t i;
    if (d == NULL)
        return NULL;
    for (i = 0; i < n; i++)
        d[i] = (char)(lower && p[i] >= 'A' && p[i] <= 'Z' ? p[i] + 32 : p[i]);
    d[n] = '\0';
    return d;
}

void sl_lines_read(lua_State *L, int t, sl_lines *out)
{
    size_t n, i;

    t = lua_absindex(L, t);
    if (lua_isnil(L, t))
        return;
    luaL_checktype(L, t, LUA_TTABLE);
    n = lua_rawlen(L, t);
    if (n > SL_MAX_HEADERS)
        luaL_error(L, "sturdy: too many client headers (%d at most)", SL_MAX_HEADERS);
    out->lines = calloc(n ? n : 1, sizeof *out->lines);
    out->names = calloc(n ? n : 1, sizeof *out->names);
    if (out->lines == NULL || out->names == NULL)
        luaL_error(L, "sturdy: out of memory");
    for (i = 0; i < n; i++) {
        size_t len, name_len;
        const char *line;
        lua_rawgeti(L, t, (int)i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "sturdy: client header line %d is not a string", (int)i + 1);
        line = lua_tolstring(L, -1, &len);
        name_len = sl_check_header_line(L, line, len, "client headers");
        out->lines[i] = dup_mem(line, len, 0);
        out->names[i] = dup_mem(line, name_len, 1);
        if (out->lines[i] == NULL || out->names[i] == NULL) {
            free(out->lines[i]);
            free(out->names[i]);
            out->lines[i] = out->names[i] = NULL;
            luaL_error(L, "sturdy: out of memory");
        }
        out->n = i + 1;
        lua_pop(L, 1);
    }
}

void sl_lines_free(sl_lines *l)
{
    size_t i;
    for (i = 0; i < l->n; i++) {
        memset(l->lines[i], 0, strlen(l->lines[i])); /* they may hold keys */
        free(l->lines[i]);
        free(l->names[i]);
    }
    free(l->lines);
    free(l->names);
    memset(l, 0, sizeof *l);
}

const char *sl_line_secret(const char *line, size_t *len)
{
    static const char *const names[] = { "authorization", "proxy-authorization", "x-api-key", "api-key",
                                         "x-goog-api-key", "cookie", NULL };
    const char *colon = strchr(line, ':'), *v;
    size_t i, name_len;

    if (colon == NULL)
        return NULL;
    name_len = (size_t)(colon - line);
    for (i = 0; names[i]; i++)
        if (strlen(names[i]) == name_len && strncasecmp(line, names[i], name_len) == 0)
            break;
    if (names[i] == NULL)
        return NULL;
    v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
    if (strncasecmp(v, "Bearer ", 7) == 0)
        v += 7;
    *len = strlen(v);
    return *len ? v : NULL;
}

const char *sl_url_userinfo(const char *url, size_t *len)
{
    const char *start = strstr(url, "://"), *end;
    if (start == NULL)
        return NULL;
    start += 3;
    end = start + strcspn(start, "/?#@");
    if (*end != '@' || end == start)
        return NULL;
    *len = (size_t)(end - start);
    return start;
}

/* Is lname (lowercase) among the request's own header names? */
static int overridden(const char *const *own, size_t n, const char *lname)
{
    size_t i, len = strlen(lname);
    for (i = 0; i < n; i++)
        if (strncasecmp(own[i], lname, len) == 0 && own[i][len] == ':')
            return 1;
    return 0;
}

size_t sl_assemble_headers(lua_State *L, const sl_lines *client, const sl_request *req, const char **out)
{
    size_t n = 0, k;
    int has_type = 0;

    if (req->nlines + client->n + 2 > SL_MAX_HEADERS)
        luaL_error(L, "sturdy: too many headers (%d at most)", SL_MAX_HEADERS - 2);
    for (k = 0; k < req->nlines; k++) {
        out[n++] = req->lines[k];
        if (strncasecmp(req->lines[k], "content-type:", 13) == 0)
            has_type = 1;
    }
    for (k = 0; k < client->n; k++) {
        if (req->nlines && overridden(req->lines, req->nlines, client->names[k]))
            continue;
        if (strcmp(client->names[k], "content-type") == 0)
            has_type = 1;
        out[n++] = client->lines[k];
    }
    if (req->body != NULL && !has_type)
        out[n++] = "Content-Type: application/json";
    return n;
}

/* ---- clients -------------------------------------------------------------- */

static char *dup_field(lua_State *L, int t, const char *field)
{
    size_t len;
    const char *s;
    char *d;
    lua_getfield(L, t, field);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING)
        sl_error(L, "sturdy: configuration field 'client.%s' must be a string", field);
    s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len)
        sl_error(L, "sturdy: configuration field 'client.%s' contains a NUL byte", field);
    d = malloc(len + 1);
    if (d == NULL)
        sl_error(L, "sturdy: out of memory");
    memcpy(d, s, len + 1);
    lua_pop(L, 1);
    return d;
}

void sl_client_read(lua_State *L, int t, sl_client *c)
{
    int i;
    t = lua_absindex(L, t);
    memset(c, 0, sizeof *c);
    lua_getfield(L, t, "client");
    if (!lua_istable(L, -1))
        sl_error(L, "sturdy: configuration field 'client' must be a table");
    t = lua_gettop(L);
    c->base_url = dup_field(L, t, "base_url");
    c->base_len = c->base_url ? strlen(c->base_url) : 0;
    c->base_key = dup_field(L, t, "key");
    if (c->base_key == NULL && (c->base_key = calloc(1, 1)) == NULL)
        sl_error(L, "sturdy: out of memory");
    lua_getfield(L, t, "explicit_key");
    c->explicit_key = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, t, "timeout_ms");
    if (!lua_istable(L, -1))
        sl_error(L, "sturdy: configuration field 'client.timeout_ms' must be a table");
    for (i = 0; i < 4; i++) {
        lua_Number v;
        lua_getfield(L, -1, timeout_names[i]);
        v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1; /* strict: no "5" */
        if (!(v >= 0 && v <= MAX_SECONDS * 1000))
            sl_error(L, "sturdy: configuration field 'client.timeout_ms.%s' is out of range", timeout_names[i]);
        c->timeout_ms[i] = (int64_t)v;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_getfield(L, t, "max_response");
    c->max_response = lua_isnil(L, -1) ? 0 : lua_tonumber(L, -1);
    lua_pop(L, 2);
}

void sl_client_free(sl_client *c)
{
    if (c->base_url) {
        memset(c->base_url, 0, c->base_len); /* it may hold a password */
        free(c->base_url);
    }
    free(c->base_key);
    memset(c, 0, sizeof *c);
}

/* ---- requests ------------------------------------------------------------- */

typedef struct fields {
    int method, path, url, headers, body, json, key, timeout, max_response, attempts,
        on_data, commit, priority, tokens, tag, reserve;
} fields;

/* Which field a key names: its stack index goes into the slot. Unknown raises. */
static int *slot_of(lua_State *L, fields *f, const char *k, size_t len)
{
    switch (len) {
    case 3:
        if (memcmp(k, "url", 3) == 0) return &f->url;
        if (memcmp(k, "key", 3) == 0) return &f->key;
        if (memcmp(k, "tag", 3) == 0) return &f->tag;
        break;
    case 4:
        if (memcmp(k, "path", 4) == 0) return &f->path;
        if (memcmp(k, "body", 4) == 0) return &f->body;
        if (memcmp(k, "json", 4) == 0) return &f->json;
        break;
    case 6:
        if (memcmp(k, "method", 6) == 0) return &f->method;
        if (memcmp(k, "tokens", 6) == 0) return &f->tokens;
        if (memcmp(k, "commit", 6) == 0) return &f->commit;
        if (memcmp(k, "stream", 6) == 0)
            sl_error(L, "sturdy: option 'stream' in request is not supported: give on_data to receive the "
                          "body as it arrives");
        break;
    case 7:
        if (memcmp(k, "headers", 7) == 0) return &f->headers;
        if (memcmp(k, "timeout", 7) == 0) return &f->timeout;
        if (memcmp(k, "on_data", 7) == 0) return &f->on_data;
        if (memcmp(k, "reserve", 7) == 0) return &f->reserve;
        break;
    case 8:
        if (memcmp(k, "attempts", 8) == 0) return &f->attempts;
        if (memcmp(k, "priority", 8) == 0) return &f->priority;
        break;
    case 12:
        if (memcmp(k, "max_response", 12) == 0) return &f->max_response;
        break;
    }
    sl_error(L, "sturdy: unknown option '%s' in request", k);
    return NULL;
}

static void want_type(lua_State *L, int i, int type, const char *name)
{
    if (i && lua_type(L, i) != type) {
        const char *want = type == LUA_TSTRING ? "a string" : type == LUA_TTABLE ? "a table"
                         : type == LUA_TFUNCTION ? "a function" : "a number";
        wrong(L, name, want, i);
    }
}

static void read_timeouts(lua_State *L, int t, const sl_client *c, int64_t *out)
{
    int i;
    memcpy(out, c->timeout_ms, sizeof c->timeout_ms);
    lua_pushnil(L);
    while (lua_next(L, t)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        for (i = 0; k && i < 4; i++)
            if (strcmp(k, timeout_names[i]) == 0)
                break;
        if (k == NULL || i == 4)
            sl_error(L, "sturdy: unknown option '%s' in request.timeout", lua_pushfstring(L, "%s",
                       k ? k : luaL_typename(L, -2)));
        out[i] = timeout_ms(L, lua_gettop(L), k);
        lua_pop(L, 1);
    }
}

static void read_tokens(lua_State *L, int t, sl_request *out)
{
    lua_pushnil(L);
    while (lua_next(L, t)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
        lua_Number v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
        int input = strcmp(k, "input") == 0;
        if (!input && strcmp(k, "output") != 0)
            sl_error(L, "sturdy: unknown option '%s' in request.tokens",
                       lua_type(L, -2) == LUA_TSTRING ? k : luaL_typename(L, -2));
        if (!(v >= 0 && v <= 1e12))
            sl_error(L, "sturdy: option 'tokens.%s' in request must be a number from 0 to 1e12, got %s", k,
                       shown(L, -1));
        if (input)
            out->tokens_in = v;
        else
            out->tokens_out = v;
        lua_pop(L, 1);
    }
}

/* reserve = { usd =, tokens = }: the call's worst case for the spend caps. */
static void read_reserve(lua_State *L, int t, sl_request *out)
{
    lua_pushnil(L);
    while (lua_next(L, t)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
        lua_Number v = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
        int usd = strcmp(k, "usd") == 0;
        if (!usd && strcmp(k, "tokens") != 0)
            sl_error(L, "sturdy: unknown option '%s' in request.reserve",
                       lua_type(L, -2) == LUA_TSTRING ? k : luaL_typename(L, -2));
        if (!(v >= 0 && v <= (usd ? 1e9 : 1e15)))
            sl_error(L, "sturdy: option 'reserve.%s' in request must be a number from 0 to %s, got %s", k,
                       usd ? "1e9" : "1e15", shown(L, -1));
        if (usd)
            out->reserve_usd = v;
        else
            out->reserve_tokens = v;
        lua_pop(L, 1);
    }
}

/* Appends "Name: value" lines of the headers table at t; returns how many. */
static size_t read_header_table(lua_State *L, int t, st_buf *scratch, size_t *offsets)
{
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        size_t name_len, value_len, i;
        const char *name, *value;
        if (lua_type(L, -2) != LUA_TSTRING)
            sl_error(L, "sturdy: header name %s in request headers is not a valid HTTP token",
                       luaL_typename(L, -2));
        name = lua_tolstring(L, -2, &name_len);
        for (i = 0; i < name_len; i++)
            if (!is_tchar((unsigned char)name[i]))
                sl_error(L, "sturdy: header name %s in request headers is not a valid HTTP token",
                           shown(L, -2));
        if (name_len == 0)
            sl_error(L, "sturdy: header name \"\" in request headers is not a valid HTTP token");
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
            sl_error(L, "sturdy: header '%s' in request headers must be a string, got %s", name,
                       luaL_typename(L, -1));
        lua_pushvalue(L, -1); /* tolstring must not turn the value into a string in the table */
        value = lua_tolstring(L, -1, &value_len);
        if (n >= SL_MAX_HEADERS - 8)
            sl_error(L, "sturdy: too many request headers");
        offsets[n++] = scratch->len;
        if (!st_buf_reserve(scratch, name_len + value_len + 3))
            sl_error(L, "sturdy: out of memory");
        memcpy(scratch->data + scratch->len, name, name_len);
        memcpy(scratch->data + scratch->len + name_len, ": ", 2);
        memcpy(scratch->data + scratch->len + name_len + 2, value, value_len);
        scratch->len += name_len + 2 + value_len;
        scratch->data[scratch->len++] = '\0';
        sl_check_header_line(L, scratch->data + offsets[n - 1], name_len + 2 + value_len, "request headers");
        lua_pop(L, 2);
    }
    return n;
}

/* Appends the key of a request to scratch; returns its offset. */
static size_t append_key(lua_State *L, const fields *f, const sl_client *c, st_buf *scratch)
{
    size_t off = scratch->len, hlen = 0, mlen = 0;
    const char *host = NULL, *model = NULL;

    if (f->key) {
        size_t len;
        const char *k = lua_tolstring(L, f->key, &len);
        if (has_control(k, len, 1))
            sl_error(L, "sturdy: request 'key' contains a control character or NUL byte");
        host = k;
        hlen = len;
    } else {
        if (f->url && !c->explicit_key)
            host = url_host(lua_tostring(L, f->url), &hlen);
        if (host == NULL) {
            host = c->base_key;
            hlen = strlen(host);
        }
        if (f->json) {
            lua_getfield(L, f->json, "model");
            if (lua_type(L, -1) == LUA_TSTRING) {
                model = lua_tolstring(L, -1, &mlen);
                if (has_control(model, mlen, 1)) /* a NUL would cut the key short */
                    sl_error(L, "sturdy: request json 'model' contains a control character or NUL byte");
            }
            lua_pop(L, 1); /* the json table holds the string */
        }
    }
    if (!st_buf_reserve(scratch, hlen + mlen + 2))
        sl_error(L, "sturdy: out of memory");
    memcpy(scratch->data + scratch->len, host, hlen);
    scratch->len += hlen;
    if (model) {
        scratch->data[scratch->len++] = '/';
        memcpy(scratch->data + scratch->len, model, mlen);
        scratch->len += mlen;
    }
    scratch->data[scratch->len++] = '\0';
    return off;
}

static void read_fields(lua_State *L, int idx, fields *f)
{
    memset(f, 0, sizeof *f);
    if (lua_type(L, idx) != LUA_TTABLE)
        sl_error(L, "sturdy: request must be a table, got %s", luaL_typename(L, idx));
    luaL_checkstack(L, 40, "sturdy: request");
    /* each field's value is left on the stack, so its index stays valid */
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t len;
        const char *k;
        int *slot;
        if (lua_type(L, -2) != LUA_TSTRING)
            sl_error(L, "sturdy: unknown option '%s' in request", luaL_typename(L, -2));
        k = lua_tolstring(L, -2, &len);
        slot = slot_of(L, f, k, len);
        *slot = lua_gettop(L);
        lua_pushvalue(L, -2); /* the key, for lua_next */
    }
}

void sl_push_request_key(lua_State *L, int idx, const sl_client *c)
{
    st_buf scratch = { NULL, 0, 0 };
    fields f;
    int top = lua_gettop(L);
    idx = lua_absindex(L, idx);
    read_fields(L, idx, &f);
    want_type(L, f.key, LUA_TSTRING, "key");
    want_type(L, f.url, LUA_TSTRING, "url");
    want_type(L, f.json, LUA_TTABLE, "json");
    append_key(L, &f, c, &scratch); /* may raise: scratch is then lost, a few bytes */
    lua_settop(L, top);
    lua_pushstring(L, scratch.data);
    st_buf_free(&scratch);
}

void sl_request_read(lua_State *L, int idx, int body_idx, const sl_client *c, st_buf *scratch,
                     const char **line_ptrs, sl_request *out)
{
    fields f;
    size_t offsets[SL_MAX_HEADERS], url_off = 0, key_off, i;
    const char *url = NULL;
    size_t url_len = 0;

    idx = lua_absindex(L, idx);
    read_fields(L, idx, &f);
    memset(out, 0, sizeof *out);
    st_buf_reset(scratch);
    luaL_checkstack(L, 8, "sturdy: request");

    want_type(L, f.method, LUA_TSTRING, "method");
    want_type(L, f.path, LUA_TSTRING, "path");
    want_type(L, f.url, LUA_TSTRING, "url");
    want_type(L, f.headers, LUA_TTABLE, "headers");
    want_type(L, f.body, LUA_TSTRING, "body");
    want_type(L, f.json, LUA_TTABLE, "json");
    want_type(L, f.key, LUA_TSTRING, "key");
    want_type(L, f.timeout, LUA_TTABLE, "timeout");
    want_type(L, f.max_response, LUA_TNUMBER, "max_response");
    want_type(L, f.attempts, LUA_TNUMBER, "attempts");
    want_type(L, f.on_data, LUA_TFUNCTION, "on_data");
    want_type(L, f.commit, LUA_TSTRING, "commit");
    want_type(L, f.priority, LUA_TSTRING, "priority");
    want_type(L, f.tokens, LUA_TTABLE, "tokens");
    want_type(L, f.tag, LUA_TSTRING, "tag");
    want_type(L, f.reserve, LUA_TTABLE, "reserve");

    /* URL: absolute, or the client's base plus path */
    if (f.url) {
        url = lua_tolstring(L, f.url, &url_len);
        if (!((url_len > 7 && memcmp(url, "http://", 7) == 0 && url[7] != '/')
              || (url_len > 8 && memcmp(url, "https://", 8) == 0 && url[8] != '/')))
            sl_error(L, "sturdy: request 'url' must start with http:// or https://, got %s", shown(L, f.url));
    } else {
        size_t plen = 1;
        const char *path = "/";
        if (c->base_url == NULL)
            sl_error(L, "sturdy: request needs 'url', or 'path' with a client base_url");
        if (f.path) {
            path = lua_tolstring(L, f.path, &plen);
            if (plen == 0 || path[0] != '/')
                sl_error(L, "sturdy: request 'path' must start with '/', got %s", shown(L, f.path));
        }
        url_off = scratch->len;
        if (!st_buf_reserve(scratch, c->base_len + plen + 1))
            sl_error(L, "sturdy: out of memory");
        memcpy(scratch->data + scratch->len, c->base_url, c->base_len);
        memcpy(scratch->data + scratch->len + c->base_len, path, plen);
        scratch->len += c->base_len + plen;
        scratch->data[scratch->len++] = '\0';
        url_len = c->base_len + plen;
    }
    if (has_control(f.url ? url : scratch->data + url_off, url_len, 0))
        sl_error(L, "sturdy: request url or path contains a control character, space or NUL byte");

    /* body: a string, or the JSON encoded by the caller */
    if (f.body && f.json)
        sl_error(L, "sturdy: request takes 'body' or 'json', not both");
    if (f.body)
        out->body = lua_tolstring(L, f.body, &out->body_len);
    else if (f.json) {
        if (body_idx == 0 || lua_type(L, body_idx) != LUA_TSTRING)
            sl_error(L, "sturdy: request 'json' was not encoded");
        out->body = lua_tolstring(L, body_idx, &out->body_len);
    }

    if (f.method) {
        size_t len;
        const char *m = lua_tolstring(L, f.method, &len);
        for (i = 0; i < len; i++)
            if (!(m[i] >= 'A' && m[i] <= 'Z'))
                break;
        if (len == 0 || i < len)
            sl_error(L, "sturdy: request 'method' must be an upper-case HTTP method, got %s", shown(L, f.method));
        out->method = m;
    } else {
        out->method = out->body ? "POST" : "GET";
    }

    memcpy(out->timeout_ms, c->timeout_ms, sizeof out->timeout_ms);
    if (f.timeout)
        read_timeouts(L, f.timeout, c, out->timeout_ms);
    if (f.max_response) {
        lua_Number v = lua_tonumber(L, f.max_response);
        if (!is_whole(v, 1, 9007199254740992.0))
            wrong(L, "max_response", "a whole number >= 1", f.max_response);
        out->max_response = v;
    } else {
        out->max_response = c->max_response;
    }
    if (f.attempts) {
        lua_Number v = lua_tonumber(L, f.attempts);
        if (!is_whole(v, 1, 1000))
            wrong(L, "attempts", "a whole number from 1 to 1000", f.attempts);
        out->attempts = (unsigned)v;
    }
    out->priority = 1;
    if (f.priority) {
        static const char *const names[] = { "high", "normal", "low" };
        const char *p = lua_tostring(L, f.priority);
        for (i = 0; i < 3 && strcmp(p, names[i]) != 0; i++)
            ;
        if (i == 3)
            sl_error(L, "sturdy: request 'priority' must be high, normal or low, got %s", shown(L, f.priority));
        out->priority = (int)i;
    }
    if (f.commit) {
        const char *m = lua_tostring(L, f.commit);
        if (strcmp(m, "auto") != 0 && strcmp(m, "manual") != 0)
            sl_error(L, "sturdy: request 'commit' must be auto or manual, got %s", shown(L, f.commit));
        if (!f.on_data)
            sl_error(L, "sturdy: request 'commit' needs on_data");
    }
    if (f.on_data)
        out->stream = f.commit && strcmp(lua_tostring(L, f.commit), "manual") == 0 ? SL_STREAM_MANUAL
                                                                                     : SL_STREAM_AUTO;
    if (f.tokens)
        read_tokens(L, f.tokens, out);
    out->reserve_tokens = -1;
    if (f.reserve)
        read_reserve(L, f.reserve, out);
    if (f.tag) {
        size_t len;
        out->tag = lua_tolstring(L, f.tag, &len);
        if (len == 0 || len > 256 || has_control(out->tag, len, 1))
            sl_error(L, "sturdy: request 'tag' must be 1 to 256 bytes without control characters or NUL, got %s",
                       shown(L, f.tag));
    }

    key_off = append_key(L, &f, c, scratch);
    out->nlines = f.headers ? read_header_table(L, f.headers, scratch, offsets) : 0;

    /* the scratch buffer has its final place now: point into it */
    out->url = f.url ? url : scratch->data + url_off;
    out->key = scratch->data + key_off;
    for (i = 0; i < out->nlines; i++)
        line_ptrs[i] = scratch->data + offsets[i];
    out->lines = line_ptrs;
}
