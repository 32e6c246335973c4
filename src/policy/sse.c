#include "sse.h"

#include "buf.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define KEEP_CAP ((size_t)64 << 10)   /* reset frees buffers larger than this */
#define BOM_DECIDED (-1)

struct st_sse {
    size_t max;       /* bound on data.len + line.len */
    st_buf line;        /* a line cut by a chunk boundary */
    st_buf data;        /* each data value followed by "\n" */
    st_buf type;        /* event type buffer */
    st_buf id;          /* last event id buffer; outlives events */
    long retry_ms;
    size_t comments;
    int status;       /* ST_SSE_OK, or the stop/error that sticks */
    int bom;          /* BOM bytes matched at stream start, or BOM_DECIDED */
    int skip_lf;      /* the last line ended in "\r": a "\n" next is part of it */
    int fields;       /* a field line was seen since the last blank line */
};

static const unsigned char bom_bytes[3] = { 0xEF, 0xBB, 0xBF };

/* Replace the contents, keeping a NUL after them for C callers. */
static int sbuf_set(st_buf *b, const char *s, size_t n)
{
    b->len = 0;
    if (!st_buf_reserve(b, n + 1))
        return 0;
    if (n)
        memcpy(b->data, s, n);
    b->data[n] = '\0';
    b->len = n;
    return 1;
}

static void sbuf_shrink(st_buf *b)
{
    b->len = 0;
    if (b->cap > KEEP_CAP) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
}

static void clear_state(st_sse *p)
{
    p->line.len = 0;
    p->data.len = 0;
    p->type.len = 0;
    p->id.len = 0;
    p->retry_ms = -1;
    p->comments = 0;
    p->status = ST_SSE_OK;
    p->bom = 0;
    p->skip_lf = 0;
    p->fields = 0;
}

st_sse *st_sse_new(size_t max_event_bytes)
{
    st_sse *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->max = max_event_bytes ? max_event_bytes : ST_SSE_DEFAULT_MAX;
    clear_state(p);
    return p;
}

void st_sse_free(st_sse *p)
{
    if (p == NULL)
        return;
    free(p->line.data);
    free(p->data.data);
    free(p->type.data);
    free(p->id.data);
    free(p);
}

void st_sse_reset(st_sse *p)
{
    sbuf_shrink(&p->line);
    sbuf_shrink(&p->data);
    sbuf_shrink(&p->type);
    sbuf_shrink(&p->id);
    clear_state(p);
}

static int name_is(const char *name, size_t n, const char *lit)
{
    size_t k = strlen(lit);
    return n == k && memcmp(name, lit, k) == 0;
}

static void set_retry(st_sse *p, const char *v, size_t n)
{
    long ms = 0;
    size_t i;
    if (n == 0)
        return;
    for (i = 0; i < n; i++)
        if (v[i] < '0' || v[i] > '9')
            return;
    for (i = 0; i < n; i++) {
        int d = v[i] - '0';
        ms = ms > (LONG_MAX - d) / 10 ? LONG_MAX : ms * 10 + d;
    }
    p->retry_ms = ms;
}

static int dispatch(st_sse *p, st_sse_callback cb, void *ud)
{
    st_sse_event ev;
    int stop = 0;

    p->fields = 0;
    if (p->data.len == 0) {
        p->type.len = 0;
        return ST_SSE_OK;
    }
    /* the trailing "\n" becomes the terminator */
    p->data.data[p->data.len - 1] = '\0';
    ev.data = p->data.data;
    ev.data_len = p->data.len - 1;
    ev.event = p->type.len ? p->type.data : "message";
    ev.event_len = p->type.len ? p->type.len : 7;
    ev.id = p->id.len ? p->id.data : "";
    ev.id_len = p->id.len;
    if (cb != NULL)
        stop = cb(ud, &ev);
    p->data.len = 0;
    p->type.len = 0;
    return stop ? ST_SSE_STOPPED : ST_SSE_OK;
}

static int process_line(st_sse *p, const char *s, size_t n, st_sse_callback cb, void *ud)
{
    const char *colon, *v;
    size_t name_len, vn;

    if (n == 0)
        return dispatch(p, cb, ud);
    if (s[0] == ':') {
        p->comments++;
        return ST_SSE_OK;
    }
    p->fields = 1;
    colon = memchr(s, ':', n);
    if (colon != NULL) {
        name_len = (size_t)(colon - s);
        v = colon + 1;
        vn = n - name_len - 1;
        if (vn > 0 && v[0] == ' ') {
            v++;
            vn--;
        }
    } else {
        name_len = n;
        v = s + n;
        vn = 0;
    }

    if (name_is(s, name_len, "data")) {
        if (!st_buf_reserve(&p->data, vn + 1))
            return ST_SSE_NOMEM;
        st_buf_append(&p->data, v, vn);
        st_buf_append(&p->data, "\n", 1);
    } else if (name_is(s, name_len, "event")) {
        if (!sbuf_set(&p->type, v, vn))
            return ST_SSE_NOMEM;
    } else if (name_is(s, name_len, "id")) {
        if (memchr(v, '\0', vn) == NULL && !sbuf_set(&p->id, v, vn))
            return ST_SSE_NOMEM;
    } else if (name_is(s, name_len, "retry")) {
        set_retry(p, v, vn);
    }
    return ST_SSE_OK;
}

static int fail(st_sse *p, int rc)
{
    p->status = rc;
    return rc;
}

/* Split s into lines. A complete line inside s is read in place; only a line
 * cut by the end of s is copied, to be finished by the next chunk. */
static int scan(st_sse *p, const char *s, size_t n, st_sse_callback cb, void *ud)
{
    size_t i = 0, j;
    int rc;

    if (n > 0 && p->skip_lf) {
        p->skip_lf = 0;
        if (s[0] == '\n')
            i = 1;
    }
    while (i < n) {
        const char *line = s + i;
        size_t len;
        for (j = i; j < n && s[j] != '\n' && s[j] != '\r'; j++)
            ;
        /* data.len + line.len <= max holds between calls, so this cannot wrap */
        if (j - i > p->max - p->data.len - p->line.len)
            return fail(p, ST_SSE_TOO_LARGE);
        if (j == n) {
            if (!st_buf_append(&p->line, s + i, n - i))
                return fail(p, ST_SSE_NOMEM);
            return ST_SSE_OK;
        }
        len = j - i;
        if (p->line.len > 0) {
            if (!st_buf_append(&p->line, s + i, len))
                return fail(p, ST_SSE_NOMEM);
            line = p->line.data;
            len = p->line.len;
        }
        rc = process_line(p, line, len, cb, ud);
        p->line.len = 0;
        if (s[j] == '\r') {
            if (j + 1 == n)
                p->skip_lf = 1;
            else if (s[j + 1] == '\n')
                j++;
        }
        i = j + 1;
        if (rc != ST_SSE_OK)
            return fail(p, rc);
    }
    return ST_SSE_OK;
}

int st_sse_feed(st_sse *p, const char *buf, size_t len, st_sse_callback cb, void *ud)
{
    size_t i = 0;

    if (p->status != ST_SSE_OK)
        return p->status;
    if (len == 0)
        return ST_SSE_OK;
    if (p->bom != BOM_DECIDED) {
        while (i < len && p->bom < 3 && (unsigned char)buf[i] == bom_bytes[p->bom]) {
            p->bom++;
            i++;
        }
        if (p->bom < 3 && i == len)
            return ST_SSE_OK;   /* still may be a BOM */
        if (p->bom < 3) {
            /* not a BOM after all: the bytes held back start the first line */
            size_t held = (size_t)p->bom;
            int rc;
            p->bom = BOM_DECIDED;
            rc = scan(p, (const char *)bom_bytes, held, cb, ud);
            if (rc != ST_SSE_OK)
                return rc;
        }
        p->bom = BOM_DECIDED;
    }
    return scan(p, buf + i, len - i, cb, ud);
}

int st_sse_finish(st_sse *p)
{
    int cut = p->status == ST_SSE_TOO_LARGE || p->status == ST_SSE_NOMEM
        || p->fields || p->line.len > 0 || p->bom > 0;
    p->line.len = 0;
    p->data.len = 0;
    p->type.len = 0;
    p->fields = 0;
    p->skip_lf = 0;
    p->bom = 0;
    return cut;
}

long st_sse_retry_ms(const st_sse *p)
{
    return p->retry_ms;
}

size_t st_sse_comments(const st_sse *p)
{
    return p->comments;
}
