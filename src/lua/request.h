/* Request tables, read and checked once, in C, for every transport: the one
 * declaration of a request's options (names, types, ranges), the URL built from
 * the client's base, the upstream key, the header lines. A request that uses the
 * defaults costs one pass over its fields. */
#ifndef STURDY_REQUEST_H
#define STURDY_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "buf.h"

#define SL_MAX_HEADERS 256

/* What a client gives every request: read from the compiled configuration's
 * `client` table by sl_client_read. */
typedef struct sl_client {
    char *base_url;          /* may hold userinfo: only sent, never shown; NULL = none */
    size_t base_len;
    char *base_key;          /* the key of path requests: the `key` option, or the base URL's host */
    int explicit_key;        /* the `key` option also keys absolute URLs */
    int64_t timeout_ms[4];   /* connect, first_byte, idle, total; 0 = none */
    double max_response;     /* 0 = the transport's default */
} sl_client;

enum { SL_STREAM_NONE = 0, SL_STREAM_AUTO, SL_STREAM_MANUAL };

typedef struct sl_request {
    const char *method;
    const char *url;
    const char *key;
    const char *body;        /* NULL = none */
    size_t body_len;
    const char **lines;      /* the request's own header lines, "Name: value" */
    size_t nlines;
    int64_t timeout_ms[4];
    double max_response;     /* 0 = the client's */
    unsigned attempts;       /* 0 = the policy's */
    int stream;              /* SL_STREAM_* (on_data given) */
    int priority;            /* 0 high, 1 normal, 2 low */
    double tokens_in, tokens_out;
    const char *tag;         /* a tenant or feature the spend caps know it by; NULL none */
    double reserve_usd;      /* its worst-case cost for the spend caps, dollars */
    double reserve_tokens;   /* and tokens; < 0: not given (the token estimates stand) */
} sl_request;

void sl_client_read(lua_State *L, int t, sl_client *c);
void sl_client_free(sl_client *c);

/* Reads the request table at idx. body_idx: the index of its JSON body already
 * encoded (a string), or 0 when it has no `json`. The built strings live in
 * scratch, and lines in line_ptrs (SL_MAX_HEADERS entries), until the next
 * read. Raises naming the first problem. */
void sl_request_read(lua_State *L, int idx, int body_idx, const sl_client *c, st_buf *scratch,
                     const char **line_ptrs, sl_request *out);

/* The upstream key of the request table at idx (see sl_request_read); pushes it. */
void sl_push_request_key(lua_State *L, int idx, const sl_client *c);

/* A client's own header lines, checked once and kept in C: they often carry keys. */
typedef struct sl_lines {
    char **lines;            /* "Name: value" */
    char **names;            /* their names, lowercase */
    size_t n;
} sl_lines;

/* Reads the list of "Name: value" strings at index t (nil: none) into out, which
 * must be zeroed; raises naming the problem (what is read so far stays in out). */
void sl_lines_read(lua_State *L, int t, sl_lines *out);
/* Frees the lines, wiping them first. */
void sl_lines_free(sl_lines *l);

/* The header lines a request sends: its own, then the client's it does not
 * override (by name, any case), then "Content-Type: application/json" for a body
 * that names none. out has room for SL_MAX_HEADERS; at least one slot stays free
 * for the transport. Raises when they do not fit. Returns how many. */
size_t sl_assemble_headers(lua_State *L, const sl_lines *client, const sl_request *req, const char **out);

/* The secret in a header line: the value of Authorization, Proxy-Authorization,
 * x-api-key, api-key, x-goog-api-key or Cookie (without "Bearer "), or NULL.
 * *len is its length. Errors show it masked. */
const char *sl_line_secret(const char *line, size_t *len);
/* The userinfo of "scheme://user:password@host/...", a credential; NULL if none. */
const char *sl_url_userinfo(const char *url, size_t *len);

/* Checks a "Name: value" line: a token name, no CR, LF or NUL, not a header that
 * frames the message (those belong to the transport). Returns the name's length.
 * Never echoes the value: it may be a secret. */
size_t sl_check_header_line(lua_State *L, const char *line, size_t len, const char *where);

#endif
