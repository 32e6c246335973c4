/* Server-sent events, read as the WHATWG HTML standard's "interpreting an event
 * stream" says, from chunks cut at any byte (inside "\r\n" or a BOM included).
 * Pure: no I/O, so the curl engine and a cosocket transport can share it.
 *
 *   - Lines end with "\r\n", "\n" or "\r". A line is handled as soon as its end
 *     is seen; a "\r" that ends a chunk is remembered, so a "\n" that starts the
 *     next chunk is not taken for a second (blank) line.
 *   - One UTF-8 BOM at the start of the stream is skipped. Bytes are otherwise
 *     passed through as they are (no U+FFFD replacement; the JSON decoder above
 *     rejects bad UTF-8), and field names are compared byte for byte.
 *   - Fields: "event" sets the type, "data" lines are joined with "\n", "id"
 *     sets the last event id unless its value holds a NUL (and it persists
 *     across events), "retry" of ASCII digits only sets the reconnection time
 *     (saturating at LONG_MAX). Others are ignored. ":..." lines are comments,
 *     counted so a caller can see keep-alive pings. A line without ':' is a
 *     field name with an empty value; one space after the colon is dropped.
 *   - A blank line dispatches: nothing when no data line was seen (the type is
 *     still reset), else the event with its last "\n" removed, type "message"
 *     when none (or an empty one) was given.
 *   - Limit: the data of the event being built (one byte more per data line, for
 *     the "\n") plus the line being read may not exceed max_event_bytes. Past it
 *     the parser stops with ST_SSE_TOO_LARGE, so memory stays bounded by a small
 *     multiple of the limit whatever the server sends. */
#ifndef STURDY_SSE_H
#define STURDY_SSE_H

#include <stddef.h>

#define ST_SSE_DEFAULT_MAX ((size_t)16 << 20)   /* 16 MiB */

/* st_sse_feed results. Every one but ST_SSE_OK sticks until st_sse_reset:
 * after a stop the rest of that chunk was not read, so going on would parse
 * from the middle of the stream. */
#define ST_SSE_OK 0
#define ST_SSE_STOPPED 1      /* the callback asked to stop */
#define ST_SSE_TOO_LARGE 2    /* an event or line went past max_event_bytes */
#define ST_SSE_NOMEM 3

/* Fields point into the parser and are valid only during the callback. Each is
 * followed by a NUL, but data may hold NULs itself: use the lengths. */
typedef struct st_sse_event {
    const char *event; size_t event_len;   /* "message" when no event field */
    const char *data;  size_t data_len;
    const char *id;    size_t id_len;      /* last event id so far ("" if none) */
} st_sse_event;

/* Return nonzero to stop parsing. It must not feed, reset or free the parser
 * that called it. */
typedef int (*st_sse_callback)(void *ud, const st_sse_event *ev);

typedef struct st_sse st_sse;

/* 0 = ST_SSE_DEFAULT_MAX. NULL when out of memory. */
st_sse *st_sse_new(size_t max_event_bytes);
void st_sse_free(st_sse *p);   /* NULL is fine */
/* For a new stream (a retried attempt): as freshly made with the same limit. It
 * drops partial state, error, last id, retry time and the comment count, and
 * gives back buffer memory above 64 KiB. */
void st_sse_reset(st_sse *p);
/* Reads len bytes, calling cb (may be NULL) for each complete event. Returns
 * one of the ST_SSE_ codes above. */
int st_sse_feed(st_sse *p, const char *buf, size_t len, st_sse_callback cb, void *ud);
/* End of stream. An event not closed by a blank line is discarded, not
 * dispatched, as the standard says. Returns 1 when the stream was cut short:
 * a field line since the last blank line, a line with no end yet, or a
 * ST_SSE_TOO_LARGE / ST_SSE_NOMEM error; else 0. Pending bytes are dropped, so
 * more input would start a fresh stream (BOM allowed) that keeps the last id. */
int st_sse_finish(st_sse *p);
long st_sse_retry_ms(const st_sse *p);     /* last valid retry field, -1 if none */
size_t st_sse_comments(const st_sse *p);   /* comment lines seen */

#endif
