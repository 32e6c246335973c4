/* HTTP/1.x response heads, parsed the same way by every transport: the status
 * line, then header lines, kept as received in one block of "name\0value\0"
 * pairs (names as sent, values trimmed of OWS), in arrival order. Pure: no I/O.
 *
 * Status line: "HTTP/" DIGIT "." DIGIT SP 3DIGIT [SP reason] (RFC 9112 section 4),
 * also "HTTP/2" and "HTTP/3" as libcurl reports them; the status must be 100-599.
 * Anything else is not a status line (a transport reports it as bad_response).
 *
 * Header lines: `name ":" OWS value OWS`, a trailing CR LF or LF removed. The name
 * must be a token (RFC 9110 tchar). A line without a colon, an obsolete folded
 * line (starting with SP or HTAB), an empty name or one with non-token bytes is
 * rejected (ST_HEADERS_MALFORMED) and not stored; the caller decides whether that
 * ends the response. A NUL inside a value is rejected too (values are C strings),
 * and so is a CR or LF (a value never holds a line break, whoever reads it).
 * The block never exceeds max_bytes (stored name + value + 2 per header);
 * a line that would pass it is ST_HEADERS_TOO_LARGE and is not stored.
 *
 * Lookups are case-insensitive and return the first header of that name. The
 * few headers every response is asked about (retry hints, x-should-retry, request
 * ids) are indexed as they are added, and so are rate-limit headers (names
 * starting "anthropic-ratelimit-" or "x-ratelimit-", the first
 * ST_HEADERS_MAX_LIMITS of them), so reading them costs no scan. */
#ifndef STURDY_HEADERS_H
#define STURDY_HEADERS_H

#include <stddef.h>

#include "buf.h"

#define ST_HEADERS_DEFAULT_MAX (256 * 1024)

enum { ST_HEADERS_OK = 0, ST_HEADERS_MALFORMED = -1, ST_HEADERS_TOO_LARGE = -2, ST_HEADERS_NOMEM = -3 };

/* The indexed headers. */
typedef enum {
    ST_H_RETRY_AFTER = 0, ST_H_RETRY_AFTER_MS, ST_H_SHOULD_RETRY, ST_H_REQUEST_ID, ST_H_X_REQUEST_ID, ST_H_KNOWN
} st_known_header;

#define ST_HEADERS_MAX_LIMITS 32

typedef struct st_headers {
    st_buf block;      /* "name\0value\0" pairs */
    size_t count;
    size_t max_bytes;  /* 0 = ST_HEADERS_DEFAULT_MAX */
    size_t known[ST_H_KNOWN];             /* offset + 1 of the first such pair, 0 = none */
    size_t limits[ST_HEADERS_MAX_LIMITS]; /* offsets of rate-limit pairs */
    unsigned nlimits;
} st_headers;

/* Parses a status line (with or without its CR LF). Returns 1 and sets *status
 * and *version (10, 11, 20, 30), or 0. Either out pointer may be NULL. */
int st_status_line_parse(const char *line, size_t len, int *status, int *version);

/* Forgets the stored headers, keeping the memory (a new response begins). */
void st_headers_reset(st_headers *h);
void st_headers_free(st_headers *h);

/* Adds one raw header line. A blank line (the end of the head) is ST_HEADERS_OK
 * and stores nothing. Returns ST_HEADERS_OK or one of the errors above. */
int st_headers_add_line(st_headers *h, const char *line, size_t len);

/* The value of the first header named name (any case), or NULL. */
const char *st_headers_find(const st_headers *h, const char *name);

/* The value of an indexed header, or NULL. */
const char *st_headers_known(const st_headers *h, st_known_header which);

/* Iteration: start with *cursor = 0; returns 0 at the end. */
int st_headers_next(const st_headers *h, size_t *cursor, const char **name, const char **value);

/* The i-th rate-limit header (0-based, i < h->nlimits). */
void st_headers_limit(const st_headers *h, unsigned i, const char **name, const char **value);

#endif
