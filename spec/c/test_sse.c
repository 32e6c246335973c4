/* Specs for the SSE parser: real Anthropic and OpenAI stream shapes, every way of
 * cutting a stream into chunks giving the same events, each field rule, limits,
 * reset, stop, and NUL bytes. */
#include "test.h"

#include "backoff.h"
#include "sse.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- helpers */

/* Events are logged as "<len>:<bytes>" for type, data and id, then ";", so two
 * runs compare with one memcmp and a NUL or newline in data is kept exact. */
typedef struct log_t {
    char *s;
    size_t len, cap;
    int events;
    int stop_at;   /* stop after this many events; 0 = never */
} log_t;

static void log_bytes(log_t *l, const char *p, size_t n)
{
    if (l->len + n + 1 > l->cap) {
        size_t cap = l->cap ? l->cap : 256;
        while (cap < l->len + n + 1)
            cap *= 2;
        l->s = realloc(l->s, cap);
        if (l->s == NULL)
            abort();
        l->cap = cap;
    }
    if (n)
        memcpy(l->s + l->len, p, n);
    l->len += n;
}

static void log_field(log_t *l, const char *p, size_t n)
{
    char num[32];
    int k = sprintf(num, "%lu:", (unsigned long)n);
    log_bytes(l, num, (size_t)k);
    log_bytes(l, p, n);
}

static void log_event(log_t *l, const char *type, const char *data, size_t data_len, const char *id)
{
    log_field(l, type, strlen(type));
    log_field(l, data, data_len);
    log_field(l, id, strlen(id));
    log_bytes(l, ";", 1);
}

static int nul_terminated;   /* every event so far had a NUL after each field */

static int on_event(void *ud, const st_sse_event *ev)
{
    log_t *l = ud;
    log_field(l, ev->event, ev->event_len);
    log_field(l, ev->data, ev->data_len);
    log_field(l, ev->id, ev->id_len);
    log_bytes(l, ";", 1);
    nul_terminated &= ev->event[ev->event_len] == '\0' && ev->data[ev->data_len] == '\0'
        && ev->id[ev->id_len] == '\0';
    l->events++;
    return l->stop_at && l->events >= l->stop_at;
}

static void log_free(log_t *l)
{
    free(l->s);
    l->s = NULL;
    l->len = l->cap = 0;
}

/* Everything observable about one run. */
typedef struct run_t {
    log_t log;
    int rc;        /* last st_sse_feed result */
    int cut;       /* st_sse_finish */
    long retry;
    size_t comments;
} run_t;

static st_rng rng;              /* the project's seedable splitmix64 */

static uint64_t rnd(void)
{
    return st_rng_next(&rng);
}

/* Chunk sizes for a run: whole, two pieces at `cut`, one byte, or random. */
enum { WHOLE, SPLIT, BYTES, RANDOM };

/* Feeds s in chunks; the chunk after an error is still offered, to see that the
 * error sticks. */
static void run(const char *s, size_t n, int mode, size_t cut, size_t max, int stop_at, run_t *r)
{
    st_sse *p = st_sse_new(max);
    size_t i = 0;
    memset(r, 0, sizeof *r);
    r->log.stop_at = stop_at;
    if (p == NULL)
        abort();
    while (i < n) {
        size_t k;
        switch (mode) {
        case SPLIT:  k = i < cut ? cut - i : n - i; break;
        case BYTES:  k = 1; break;
        case RANDOM: k = (size_t)(rnd() % 9); break;   /* empty chunks too */
        default:     k = n; break;
        }
        if (k > n - i)
            k = n - i;
        r->rc = st_sse_feed(p, s + i, k, on_event, &r->log);
        i += k;
    }
    r->cut = st_sse_finish(p);
    r->retry = st_sse_retry_ms(p);
    r->comments = st_sse_comments(p);
    st_sse_free(p);
}

static int same_log(const log_t *a, const log_t *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->s, b->s, a->len) == 0);
}

static int same_run(const run_t *a, const run_t *b)
{
    return same_log(&a->log, &b->log)
        && a->rc == b->rc && a->cut == b->cut && a->retry == b->retry
        && a->comments == b->comments;
}

/* Every chunking of s gives the run fed whole, which is checked against the
 * expected log, rc and cut. Returns 1 when all agreed. */
static int chunkings_agree(const char *name, const char *s, size_t n, size_t max, int stop_at)
{
    run_t whole, other;
    size_t cut;
    int t, ok = 1;

    run(s, n, WHOLE, 0, max, stop_at, &whole);
    for (cut = 0; cut <= n; cut++) {
        run(s, n, SPLIT, cut, max, stop_at, &other);
        if (!same_run(&whole, &other)) {
            if (ok)
                fprintf(stderr, "    %s: split at %lu differs\n", name, (unsigned long)cut);
            ok = 0;
        }
        log_free(&other.log);
    }
    run(s, n, BYTES, 0, max, stop_at, &other);
    if (!same_run(&whole, &other)) {
        fprintf(stderr, "    %s: byte at a time differs\n", name);
        ok = 0;
    }
    log_free(&other.log);
    st_rng_seed(&rng, 42);
    for (t = 0; t < 50; t++) {
        run(s, n, RANDOM, 0, max, stop_at, &other);
        if (!same_run(&whole, &other)) {
            if (ok)
                fprintf(stderr, "    %s: random chunking %d differs\n", name, t);
            ok = 0;
        }
        log_free(&other.log);
    }
    log_free(&whole.log);
    return ok;
}

/* A stream's expected outcome, checked fed whole and in every chunking. */
static void expect_stream(const char *name, const char *s, size_t n, const log_t *want,
                          int want_rc, int want_cut, long want_retry, size_t want_comments)
{
    run_t r;
    run(s, n, WHOLE, 0, 0, 0, &r);
    if (!CHECK(same_log(&r.log, want)))
        fprintf(stderr, "    %s: got %.*s\n    want %.*s\n", name, (int)r.log.len, r.log.s,
                (int)want->len, want->s);
    if (!CHECK(r.rc == want_rc && r.cut == want_cut && r.retry == want_retry
               && r.comments == want_comments))
        fprintf(stderr, "    %s: rc %d cut %d retry %ld comments %lu\n", name, r.rc, r.cut,
                r.retry, (unsigned long)r.comments);
    CHECK(chunkings_agree(name, s, n, 0, 0));
    log_free(&r.log);
}

/* Rewrites "\n" in s as "\r\n" or "\r". */
static char *with_eol(const char *s, const char *eol, size_t *n)
{
    size_t len = strlen(s), e = strlen(eol), i, o = 0;
    char *d = malloc(len * 2 + 1);
    if (d == NULL)
        abort();
    for (i = 0; i < len; i++) {
        if (s[i] == '\n') {
            memcpy(d + o, eol, e);
            o += e;
        } else {
            d[o++] = s[i];
        }
    }
    d[o] = '\0';
    *n = o;
    return d;
}

#define S(lit) lit, sizeof(lit) - 1

/* ---------------------------------------------------------------- streams */

static const char anthropic[] =
    "event: message_start\n"
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\","
    "\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,"
    "\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n"
    "\n"
    "event: content_block_start\n"
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n"
    "\n"
    "event: ping\n"
    "data: {\"type\": \"ping\"}\n"
    "\n"
    "event: content_block_delta\n"
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n"
    "\n"
    "event: content_block_delta\n"
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\\n\"}}\n"
    "\n"
    "event: content_block_delta\n"
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" \xc3\xa9t\xc3\xa9\"}}\n"
    "\n"
    "event: content_block_stop\n"
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n"
    "\n"
    "event: message_delta\n"
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},"
    "\"usage\":{\"output_tokens\":15}}\n"
    "\n"
    "event: message_stop\n"
    "data: {\"type\":\"message_stop\"}\n"
    "\n";

static void anthropic_events(log_t *w)
{
    log_event(w, "message_start", S("{\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\","
              "\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\","
              "\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}"), "");
    log_event(w, "content_block_start", S("{\"type\":\"content_block_start\",\"index\":0,"
              "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}"), "");
    log_event(w, "ping", S("{\"type\": \"ping\"}"), "");
    log_event(w, "content_block_delta", S("{\"type\":\"content_block_delta\",\"index\":0,"
              "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}"), "");
    log_event(w, "content_block_delta", S("{\"type\":\"content_block_delta\",\"index\":0,"
              "\"delta\":{\"type\":\"text_delta\",\"text\":\"!\\n\"}}"), "");
    log_event(w, "content_block_delta", S("{\"type\":\"content_block_delta\",\"index\":0,"
              "\"delta\":{\"type\":\"text_delta\",\"text\":\" \xc3\xa9t\xc3\xa9\"}}"), "");
    log_event(w, "content_block_stop", S("{\"type\":\"content_block_stop\",\"index\":0}"), "");
    log_event(w, "message_delta", S("{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":"
              "\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}"), "");
    log_event(w, "message_stop", S("{\"type\":\"message_stop\"}"), "");
}

static const char openai[] =
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
    "\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n"
    "\n"
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
    "\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n"
    "\n"
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
    "\"delta\":{},\"finish_reason\":\"stop\"}]}\n"
    "\n"
    "data: [DONE]\n"
    "\n";

static void openai_events(log_t *w)
{
    log_event(w, "message", S("{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
              "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
              "\"finish_reason\":null}]}"), "");
    log_event(w, "message", S("{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
              "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}"), "");
    log_event(w, "message", S("{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
              "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}"), "");
    log_event(w, "message", S("[DONE]"), "");
}

/* Comments, multi-line data, id and retry, a field with no colon, "data" with no
 * space or two spaces, unknown fields, and an event with no data. */
static const char mixed[] =
    ": hello\n"
    "retry: 3000\n"
    "id: 7\n"
    "event: first\n"
    "data: line one\n"
    "data:line two\n"
    "data:  indented\n"
    "data\n"
    "data: \n"
    "foo: bar\n"
    "\n"
    ": ping\n"
    "\n"
    "data: after ping\n"
    "\n"
    "event: lonely\n"
    "id\n"
    "\n"
    "data:{}\n"
    "retry: 12x\n"
    "retry:\n"
    "event\n"
    "\n"
    "id: 9\n"
    "data: last\n"
    "\n";

static void mixed_events(log_t *w)
{
    log_event(w, "first", S("line one\nline two\n indented\n\n"), "7");
    log_event(w, "message", S("after ping"), "7");
    log_event(w, "message", S("{}"), "");    /* "id" alone cleared it; lonely had no data */
    log_event(w, "message", S("last"), "9");
}

/* ---------------------------------------------------------------- tests */

static void test_anthropic(void)
{
    static const char *const eols[] = { "\n", "\r\n", "\r" };
    log_t want = { 0 };
    int k;
    anthropic_events(&want);
    for (k = 0; k < 3; k++) {
        size_t n;
        char *s = with_eol(anthropic, eols[k], &n);
        expect_stream("anthropic", s, n, &want, ST_SSE_OK, 0, -1, 0);
        free(s);
    }
    log_free(&want);
}

static void test_openai(void)
{
    static const char *const eols[] = { "\n", "\r\n", "\r" };
    log_t want = { 0 };
    int k;
    openai_events(&want);
    for (k = 0; k < 3; k++) {
        size_t n;
        char *s = with_eol(openai, eols[k], &n);
        expect_stream("openai", s, n, &want, ST_SSE_OK, 0, -1, 0);
        free(s);
    }
    log_free(&want);
}

static void test_fields(void)
{
    static const char *const eols[] = { "\n", "\r\n", "\r" };
    log_t want = { 0 };
    int k;
    mixed_events(&want);
    for (k = 0; k < 3; k++) {
        size_t n;
        char *s = with_eol(mixed, eols[k], &n);
        expect_stream("fields", s, n, &want, ST_SSE_OK, 0, 3000, 2);
        free(s);
    }
    log_free(&want);
}

static void test_bom(void)
{
    static const char *const eols[] = { "\n", "\r\n", "\r" };
    log_t want = { 0 }, none = { 0 };
    int k;
    openai_events(&want);
    for (k = 0; k < 3; k++) {
        size_t n;
        char *s = with_eol(openai, eols[k], &n), *b = malloc(n + 3);
        if (b == NULL)
            abort();
        memcpy(b, "\xEF\xBB\xBF", 3);
        memcpy(b + 3, s, n);
        expect_stream("bom", b, n + 3, &want, ST_SSE_OK, 0, -1, 0);
        free(s);
        free(b);
    }
    log_free(&want);

    /* only one BOM is skipped: a second one is part of the field name */
    expect_stream("two boms", S("\xEF\xBB\xBF\xEF\xBB\xBF" "data: x\n\n"), &none, ST_SSE_OK, 0, -1, 0);
    /* a partial BOM is not skipped, and its bytes are kept */
    expect_stream("part bom", S("\xEF\xBB" "data: x\n\n"), &none, ST_SSE_OK, 0, -1, 0);
    log_event(&want, "message", S("\xEF\xBB\xBF"), "");
    expect_stream("bom in data", S("data: \xEF\xBB\xBF\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    log_free(&want);
    /* a BOM prefix alone is an unfinished line */
    expect_stream("bom prefix", S("\xEF\xBB"), &none, ST_SSE_OK, 1, -1, 0);
    expect_stream("bom only", S("\xEF\xBB\xBF"), &none, ST_SSE_OK, 0, -1, 0);
    expect_stream("bom, comment", S("\xEF\xBB\xBF:x\n"), &none, ST_SSE_OK, 0, -1, 1);
    /* a "\r" before the BOM is decided ends a line of the held bytes */
    log_event(&want, "message", S("y"), "");
    expect_stream("bom cr", S("\xEF\r\ndata: y\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    log_free(&want);
}

static void test_line_endings(void)
{
    log_t want = { 0 }, none = { 0 };
    log_event(&want, "message", S("a"), "");
    log_event(&want, "message", S("b"), "");
    log_event(&want, "message", S("c"), "");
    log_event(&want, "message", S("d"), "");
    /* mixed in one stream; "\n\r" is two line ends, not one */
    expect_stream("mixed eol", S("data: a\r\rdata: b\n\rdata: c\r\n\r\ndata: d\n\n"), &want,
                  ST_SSE_OK, 0, -1, 0);
    log_free(&want);
    /* "\r\r\n" is a line end and then a blank line */
    log_event(&want, "message", S("x"), "");
    expect_stream("cr cr lf", S("data: x\r\r\n"), &want, ST_SSE_OK, 0, -1, 0);
    log_free(&want);
    /* blank lines with no event are harmless */
    expect_stream("blanks", S("\n\n\r\n\r\r"), &none, ST_SSE_OK, 0, -1, 0);
}

static void test_truncated(void)
{
    log_t want = { 0 }, none = { 0 };
    log_event(&want, "message", S("one"), "");
    /* a final event with no blank line is not dispatched, and finish says so */
    expect_stream("no blank", S("data: one\n\ndata: two\n"), &want, ST_SSE_OK, 1, -1, 0);
    expect_stream("no eol", S("data: one\n\ndata: tw"), &want, ST_SSE_OK, 1, -1, 0);
    expect_stream("event only", S("data: one\n\nevent: x\n"), &want, ST_SSE_OK, 1, -1, 0);
    expect_stream("part comment", S("data: one\n\n: pi"), &want, ST_SSE_OK, 1, -1, 0);
    /* comments after the last event are not a cut */
    expect_stream("trailing ping", S("data: one\n\n: ping\n"), &want, ST_SSE_OK, 0, -1, 1);
    /* a "\r" at the very end already ends the line */
    expect_stream("cr end", S("data: one\r\r"), &want, ST_SSE_OK, 0, -1, 0);
    expect_stream("empty", "", 0, &none, ST_SSE_OK, 0, -1, 0);
    log_free(&want);
}

static void test_id_and_retry(void)
{
    log_t want = { 0 };
    log_event(&want, "message", S("a"), "1");
    log_event(&want, "message", S("b"), "1");
    log_event(&want, "message", S("c"), "");
    log_event(&want, "message", S("d"), "2 ");
    log_event(&want, "message", S("e"), "2 ");
    expect_stream("ids", S("id: 1\ndata: a\n\ndata: b\n\nid:\ndata: c\n\nid: 2 \ndata: d\n\n"
                           "id: 3\0x\ndata: e\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    log_free(&want);

    /* an id in an event with no data still sticks */
    log_event(&want, "message", S("z"), "5");
    expect_stream("id, no data", S("id: 5\n\ndata: z\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    log_free(&want);

    expect_stream("retry ok", S("retry: 0\n\n"), &want, ST_SSE_OK, 0, 0, 0);
    expect_stream("retry last wins", S("retry: 10\nretry: 20\nretry: 3x\n\n"), &want,
                  ST_SSE_OK, 0, 20, 0);
    expect_stream("retry bad", S("retry: -1\nretry: 1.5\nretry: \nretry:  5\nretry\n"
                                 " retry: 5\nRetry: 5\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    expect_stream("retry huge", S("retry: 99999999999999999999999999\n\n"), &want,
                  ST_SSE_OK, 0, LONG_MAX, 0);
}

static void test_nul_bytes(void)
{
    log_t want = { 0 };
    log_event(&want, "message", S("x\0y\0\n\0"), "");
    expect_stream("nul data", S("data: x\0y\0\ndata: \0\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    log_free(&want);
    /* a NUL in a field name makes it another field */
    expect_stream("nul name", S("da\0ta: x\n\n"), &want, ST_SSE_OK, 0, -1, 0);
    CHECK(nul_terminated);
}

typedef struct typed {
    char type[16];
    size_t type_len, n;
} typed;

static int on_typed(void *ud, const st_sse_event *ev)
{
    typed *t = ud;
    if (ev->event_len < sizeof t->type)
        memcpy(t->type, ev->event, ev->event_len);
    t->type_len = ev->event_len;
    t->n++;
    return 0;
}

static void test_nul_in_type(void)
{
    st_sse *p = st_sse_new(0);
    typed t = { { 0 }, 0, 0 };
    CHECK_EQ_INT(st_sse_feed(p, S("event: a\0b\ndata\n\n"), on_typed, &t), ST_SSE_OK);
    CHECK_EQ_INT(t.n, 1);
    CHECK(t.type_len == 3 && memcmp(t.type, "a\0b", 3) == 0);
    st_sse_free(p);
}

static void test_max_size(void)
{
    st_sse *p;
    log_t l = { 0 };
    size_t i;
    char big[64];
    int rc = ST_SSE_OK;

    /* "data: 12345" is 11 bytes; the data buffer then holds "12345\n" (6) */
    p = st_sse_new(11);
    CHECK_EQ_INT(st_sse_feed(p, S("data: 12345\n"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("\n"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(l.events, 1);
    /* with 6 bytes held, a line may have 5 */
    CHECK_EQ_INT(st_sse_feed(p, S("data: 12345\nda"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("ta"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("x"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("y"), on_event, &l), ST_SSE_TOO_LARGE);
    /* the error sticks; no event comes out */
    CHECK_EQ_INT(st_sse_feed(p, S("\n\ndata: x\n\n"), on_event, &l), ST_SSE_TOO_LARGE);
    CHECK_EQ_INT(l.events, 1);
    CHECK_EQ_INT(st_sse_finish(p), 1);
    CHECK_EQ_INT(st_sse_feed(p, S("data: x\n\n"), on_event, &l), ST_SSE_TOO_LARGE);
    /* reset clears it */
    st_sse_reset(p);
    CHECK_EQ_INT(st_sse_feed(p, S("data: x\n\n"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(l.events, 2);

    /* a line that never ends is refused at max + 1 bytes, not buffered on */
    st_sse_reset(p);
    for (i = 0; i < 1000 && rc == ST_SSE_OK; i++)
        rc = st_sse_feed(p, "x", 1, on_event, &l);
    CHECK_EQ_INT(rc, ST_SSE_TOO_LARGE);
    CHECK_EQ_INT(i, 12);
    st_sse_reset(p);
    CHECK_EQ_INT(st_sse_feed(p, S(": a comment that is too long\n"), on_event, &l), ST_SSE_TOO_LARGE);
    st_sse_free(p);
    log_free(&l);

    /* the same limit holds in every chunking, right at the edge and one over */
    memset(big, 'x', sizeof big);
    memcpy(big, "data: ", 6);
    big[30] = '\n';
    big[31] = '\n';
    CHECK(chunkings_agree("at max", big, 32, 30, 0));
    CHECK(chunkings_agree("over max", big, 32, 29, 0));
    {
        run_t r;
        run(big, 32, WHOLE, 0, 30, 0, &r);
        CHECK(r.rc == ST_SSE_OK && r.log.events == 1 && r.cut == 0);
        log_free(&r.log);
        run(big, 32, WHOLE, 0, 29, 0, &r);
        CHECK(r.rc == ST_SSE_TOO_LARGE && r.log.events == 0 && r.cut == 1);
        log_free(&r.log);
    }
    {
        /* many data lines add up: 3 lines of "data: ab" hold 9 bytes */
        static const char s[] = "data: ab\ndata: ab\ndata: ab\n\n";
        run_t r;
        run(s, sizeof s - 1, WHOLE, 0, 14, 0, &r);   /* 6 held + 8 */
        CHECK(r.rc == ST_SSE_OK && r.log.events == 1);
        log_free(&r.log);
        run(s, sizeof s - 1, WHOLE, 0, 13, 0, &r);
        CHECK(r.rc == ST_SSE_TOO_LARGE && r.log.events == 0);
        log_free(&r.log);
        CHECK(chunkings_agree("sum", s, sizeof s - 1, 13, 0));
        CHECK(chunkings_agree("sum ok", s, sizeof s - 1, 14, 0));
    }
}

static void test_default_max(void)
{
    st_sse *p = st_sse_new(0);
    size_t n = (size_t)1 << 20, i;
    char *s = malloc(n);
    log_t l = { 0 };
    if (s == NULL)
        abort();
    memset(s, 'y', n);
    memcpy(s, "data: ", 6);
    CHECK_EQ_INT(st_sse_feed(p, s, n, on_event, &l), ST_SSE_OK);
    for (i = 0; i < 15; i++)
        CHECK_EQ_INT(st_sse_feed(p, s + 6, n - 6, on_event, &l), ST_SSE_OK);
    /* 16 MiB - 90 bytes so far; 100 more go over */
    CHECK_EQ_INT(st_sse_feed(p, s + 6, 100, on_event, &l), ST_SSE_TOO_LARGE);
    st_sse_free(p);

    p = st_sse_new(0);
    CHECK_EQ_INT(st_sse_feed(p, s, n, on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("\n\n"), on_event, &l), ST_SSE_OK);
    CHECK(l.events == 1 && l.len > n - 6);
    st_sse_free(p);
    free(s);
    log_free(&l);
}

static void test_reset(void)
{
    st_sse *p = st_sse_new(0);
    log_t l = { 0 }, want = { 0 };

    CHECK_EQ_INT(st_sse_feed(p, S("\xEF\xBB\xBFretry: 50\n: c\nid: 4\nevent: e\ndata: part"),
                             on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_retry_ms(p), 50);
    CHECK_EQ_INT(st_sse_comments(p), 1);
    st_sse_reset(p);
    CHECK_EQ_INT(st_sse_retry_ms(p), -1);
    CHECK_EQ_INT(st_sse_comments(p), 0);
    CHECK_EQ_INT(st_sse_finish(p), 0);
    /* partial line, type and id are gone; a BOM is skipped again */
    CHECK_EQ_INT(st_sse_feed(p, S("\xEF\xBB\xBF" "data: new\n\n"), on_event, &l), ST_SSE_OK);
    log_event(&want, "message", S("new"), "");
    CHECK(same_log(&l, &want));

    /* finish drops the unfinished event but keeps the id, and a new stream may
     * start with a BOM */
    CHECK_EQ_INT(st_sse_feed(p, S("id: 8\ndata: a\n\nevent: x\ndata: lost\n"), on_event, &l),
                 ST_SSE_OK);
    CHECK_EQ_INT(st_sse_finish(p), 1);
    CHECK_EQ_INT(st_sse_finish(p), 0);
    CHECK_EQ_INT(st_sse_feed(p, S("\xEF\xBB\xBF" "data: b\n\n"), on_event, &l), ST_SSE_OK);
    log_event(&want, "message", S("a"), "8");
    log_event(&want, "message", S("b"), "8");
    CHECK(same_log(&l, &want));

    /* a held "\r" does not leak into the next stream */
    st_sse_reset(p);
    log_free(&l);
    log_free(&want);
    CHECK_EQ_INT(st_sse_feed(p, S("data: a\r"), on_event, &l), ST_SSE_OK);
    st_sse_reset(p);
    CHECK_EQ_INT(st_sse_feed(p, S("\ndata: b\n\n"), on_event, &l), ST_SSE_OK);
    log_event(&want, "message", S("b"), "");
    CHECK(same_log(&l, &want));
    st_sse_free(p);
    log_free(&l);
    log_free(&want);
}

static void test_big_reset(void)
{
    /* reset gives large buffers back; the parser still works afterwards */
    st_sse *p = st_sse_new(0);
    size_t n = (size_t)1 << 18;
    char *s = malloc(n);
    log_t l = { 0 };
    if (s == NULL)
        abort();
    memset(s, 'z', n);
    memcpy(s, "data: ", 6);
    CHECK_EQ_INT(st_sse_feed(p, s, n, on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, s, 10, on_event, &l), ST_SSE_OK);   /* cut line */
    st_sse_reset(p);
    CHECK_EQ_INT(st_sse_feed(p, S("event: e\nid: i\ndata: d\n\n"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(l.events, 1);
    st_sse_free(p);
    free(s);
    log_free(&l);
}

static void test_stop(void)
{
    st_sse *p = st_sse_new(0);
    log_t l = { 0 };
    size_t n;
    char *s = with_eol(anthropic, "\r\n", &n);

    l.stop_at = 2;
    CHECK_EQ_INT(st_sse_feed(p, s, n, on_event, &l), ST_SSE_STOPPED);
    CHECK_EQ_INT(l.events, 2);
    CHECK_EQ_INT(st_sse_feed(p, S("data: x\n\n"), on_event, &l), ST_SSE_STOPPED);
    CHECK_EQ_INT(l.events, 2);
    CHECK_EQ_INT(st_sse_finish(p), 0);
    st_sse_reset(p);
    l.stop_at = 0;
    l.events = 0;
    CHECK_EQ_INT(st_sse_feed(p, s, n, on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(l.events, 9);
    st_sse_free(p);
    log_free(&l);

    /* stopping gives the same events in every chunking */
    CHECK(chunkings_agree("stop 1", s, n, 0, 1));
    CHECK(chunkings_agree("stop 5", s, n, 0, 5));
    CHECK(chunkings_agree("stop 9", s, n, 0, 9));
    free(s);
}

static void test_api_edges(void)
{
    st_sse *p = st_sse_new(0);
    log_t l = { 0 };
    CHECK(p != NULL);
    CHECK_EQ_INT(st_sse_feed(p, NULL, 0, on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("data: x\n\n"), NULL, NULL), ST_SSE_OK);
    CHECK_EQ_INT(st_sse_feed(p, S("data: y\n\n"), on_event, &l), ST_SSE_OK);
    CHECK_EQ_INT(l.events, 1);
    CHECK_EQ_INT(st_sse_finish(p), 0);
    st_sse_free(p);
    st_sse_free(NULL);
    log_free(&l);
}

/* Random streams from a small alphabet of troublesome bytes, checked across
 * chunkings and small limits. */
static void test_random_streams(void)
{
    static const char alphabet[] = "\r\n\n:: data\xEF\xBB\xBF" "event id retry 123";
    char s[96];
    int t, ok = 1;
    for (t = 0; t < 300 && ok; t++) {
        size_t n, i, max;
        st_rng_seed(&rng, (uint64_t)t * 7919);
        n = (size_t)(rnd() % sizeof s);
        for (i = 0; i < n; i++)
            s[i] = alphabet[rnd() % (sizeof alphabet - 1)];
        max = t % 3 == 0 ? 0 : (size_t)(rnd() % 40);
        ok = chunkings_agree("random", s, n, max, (int)(rnd() % 4));
    }
    CHECK(ok);
}

int main(void)
{
    nul_terminated = 1;
    test_anthropic();
    test_openai();
    test_fields();
    test_bom();
    test_line_endings();
    test_truncated();
    test_id_and_retry();
    test_nul_bytes();
    test_nul_in_type();
    test_max_size();
    test_default_max();
    test_reset();
    test_big_reset();
    test_stop();
    test_api_edges();
    test_random_streams();
    return TEST_REPORT();
}
