/* libFuzzer target for the SSE parser. Input: 4 header bytes, then the stream.
 *   byte 0   limit: 0 = default, 1..127 as is, 128..255 = (b - 127) * 64
 *   byte 1   stop after this many events (0 = never)
 *   byte 2-3 seed for the chunk sizes
 * The stream goes to three readers that must agree on every event, the feed
 * result, finish(), retry and the comment count: the parser fed whole, the
 * parser fed in seeded pieces (empty ones included), and a plain whole-buffer
 * reading of the standard written separately here. Any difference aborts. */
#include "sse.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct outcome {
    uint64_t hash;      /* FNV-1a over every event's type, data and id, length-prefixed */
    size_t events;
    int stop_at;
    int rc, cut;
    long retry;
    size_t comments;
} outcome;

static void mix(uint64_t *h, const void *p, size_t n)
{
    const unsigned char *b = p;
    size_t i;
    for (i = 0; i < n; i++) {
        *h ^= b[i];
        *h *= UINT64_C(0x100000001B3);
    }
}

static void mix_field(uint64_t *h, const char *p, size_t n)
{
    uint64_t len = n;
    mix(h, &len, sizeof len);
    mix(h, p, n);
}

/* Returns nonzero to stop, as a callback does. */
static int record(outcome *o, const char *type, size_t tn, const char *d, size_t dn,
                  const char *id, size_t idn)
{
    mix_field(&o->hash, type, tn);
    mix_field(&o->hash, d, dn);
    mix_field(&o->hash, id, idn);
    o->events++;
    return o->stop_at && o->events >= (size_t)o->stop_at;
}

static int on_event(void *ud, const st_sse_event *ev)
{
    /* the NULs promised after each field */
    if (ev->event[ev->event_len] || ev->data[ev->data_len] || ev->id[ev->id_len])
        abort();
    return record(ud, ev->event, ev->event_len, ev->data, ev->data_len, ev->id, ev->id_len);
}

static void start(outcome *o, int stop_at)
{
    memset(o, 0, sizeof *o);
    o->hash = UINT64_C(0xCBF29CE484222325);
    o->stop_at = stop_at;
}

static void finish(st_sse *p, outcome *o)
{
    o->cut = st_sse_finish(p);
    o->retry = st_sse_retry_ms(p);
    o->comments = st_sse_comments(p);
}

/* ---------------------------------------------------------------- reference */

typedef struct ref {
    const char *s;
    size_t n, max;
    char *data, *type, *id;   /* each at most n bytes long */
    size_t data_len, type_len, id_len;
    int fields;
    outcome *o;
} ref;

static int is_eol(char c)
{
    return c == '\r' || c == '\n';
}

static int same(const char *a, size_t an, const char *lit)
{
    return an == strlen(lit) && memcmp(a, lit, an) == 0;
}

/* One line, by the standard's steps. Returns nonzero to stop. */
static int ref_line(ref *r, const char *l, size_t n)
{
    size_t c = 0, vn;
    const char *v;

    if (n == 0) {
        r->fields = 0;
        if (r->data_len == 0) {
            r->type_len = 0;
            return 0;
        }
        r->data_len--;
        {
            int stop = r->type_len
                ? record(r->o, r->type, r->type_len, r->data, r->data_len, r->id, r->id_len)
                : record(r->o, "message", 7, r->data, r->data_len, r->id, r->id_len);
            r->data_len = 0;
            r->type_len = 0;
            return stop;
        }
    }
    if (l[0] == ':') {
        r->o->comments++;
        return 0;
    }
    r->fields = 1;
    while (c < n && l[c] != ':')
        c++;
    v = l + c;
    vn = 0;
    if (c < n) {
        v = l + c + 1;
        vn = n - c - 1;
        if (vn && *v == ' ') {
            v++;
            vn--;
        }
    }
    if (same(l, c, "event")) {
        memcpy(r->type, v, vn);
        r->type_len = vn;
    } else if (same(l, c, "data")) {
        memcpy(r->data + r->data_len, v, vn);
        r->data_len += vn;
        r->data[r->data_len++] = '\n';
    } else if (same(l, c, "id")) {
        if (memchr(v, 0, vn) == NULL) {
            memcpy(r->id, v, vn);
            r->id_len = vn;
        }
    } else if (same(l, c, "retry") && vn > 0) {
        size_t k;
        long ms = 0;
        for (k = 0; k < vn && v[k] >= '0' && v[k] <= '9'; k++)
            ms = ms > (LONG_MAX - (v[k] - '0')) / 10 ? LONG_MAX : ms * 10 + (v[k] - '0');
        if (k == vn)
            r->o->retry = ms;
    }
    return 0;
}

static void reference(const char *s, size_t n, size_t max, outcome *o)
{
    static const char bom[] = "\xEF\xBB\xBF";
    ref r;
    size_t i = 0, j, alloc = n ? n : 1;

    memset(&r, 0, sizeof r);
    r.o = o;
    r.max = max ? max : ST_SSE_DEFAULT_MAX;
    r.data = malloc(alloc);
    r.type = malloc(alloc);
    r.id = malloc(alloc);
    if (!r.data || !r.type || !r.id)
        abort();
    o->retry = -1;

    if (n < 3 && n > 0 && memcmp(s, bom, n) == 0) {
        o->cut = 1;   /* may yet be a BOM: held, not a line */
        goto out;
    }
    if (n >= 3 && memcmp(s, bom, 3) == 0)
        i = 3;
    while (i < n) {
        for (j = i; j < n && !is_eol(s[j]); j++)
            ;
        if (r.data_len + (j - i) > r.max) {
            o->rc = ST_SSE_TOO_LARGE;
            o->cut = 1;
            goto out;
        }
        if (j == n) {   /* no line end: discarded */
            o->cut = 1;
            goto out;
        }
        if (ref_line(&r, s + i, j - i)) {
            o->rc = ST_SSE_STOPPED;
            goto out;
        }
        if (s[j] == '\r' && j + 1 < n && s[j + 1] == '\n')
            j++;
        i = j + 1;
    }
    o->cut = r.fields;
out:
    free(r.data);
    free(r.type);
    free(r.id);
}

/* ---------------------------------------------------------------- driver */

static void check(const outcome *a, const outcome *b)
{
    if (a->hash != b->hash || a->events != b->events || a->rc != b->rc || a->cut != b->cut
        || a->retry != b->retry || a->comments != b->comments)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s;
    size_t n, max, i = 0;
    int stop_at;
    uint32_t seed;
    outcome whole, pieces, model;
    st_sse *a, *b;

    if (size < 4)
        return 0;
    max = data[0] < 128 ? data[0] : (size_t)(data[0] - 127) * 64;
    stop_at = data[1];
    seed = (uint32_t)data[2] << 8 | data[3];
    s = (const char *)data + 4;
    n = size - 4;

    a = st_sse_new(max);
    b = st_sse_new(max);
    if (a == NULL || b == NULL)
        abort();

    start(&whole, stop_at);
    whole.rc = st_sse_feed(a, s, n, on_event, &whole);
    finish(a, &whole);

    start(&pieces, stop_at);
    while (i < n) {
        /* pieces of 0 to 2^k - 1 bytes, k from the seed, so some inputs go
         * byte by byte and others in larger runs */
        size_t k;
        seed = seed * 1103515245u + 12345u;
        k = (seed >> 16) & ((1u << ((data[2] & 7) + 1)) - 1);
        if (k > n - i)
            k = n - i;
        pieces.rc = st_sse_feed(b, s + i, k, on_event, &pieces);
        i += k;
    }
    finish(b, &pieces);

    start(&model, stop_at);
    reference(s, n, max, &model);

    check(&whole, &pieces);
    check(&whole, &model);

    /* after reset the parser reads the same stream the same way */
    st_sse_reset(a);
    start(&pieces, stop_at);
    pieces.rc = st_sse_feed(a, s, n, on_event, &pieces);
    finish(a, &pieces);
    check(&whole, &pieces);

    st_sse_free(a);
    st_sse_free(b);
    return 0;
}
