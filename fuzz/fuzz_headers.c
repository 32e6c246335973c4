/* libFuzzer target for the response-head parser (src/policy/headers.c).
 * Input: 2 header bytes, then the head.
 *   byte 0   max_bytes: 0 = default, 1..127 as is, 128..255 = (b - 127) * 32
 *   byte 1   low bit: 0 = lines end after each LF (kept in the line),
 *                     1 = lines are separated by 0xFF (so a line may hold LF and NUL)
 * The first line goes to st_status_line_parse, and every line (the first too)
 * to st_headers_add_line. Each line is copied to the very end of a heap
 * buffer, so reading past it is an ASan finding. A model written here decides
 * every result by the header's contract and keeps what must be stored; the
 * parser must agree on each return code, on the stored pairs (in order, names
 * as sent, values trimmed), on the count and on the block's size, which never
 * exceeds the limit. Lookups of every stored name (in flipped case) and of
 * names taken from the input must return the first match or NULL. Reset and a
 * second pass must give the same result. Any difference aborts. */
#include "headers.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct pair {
    const char *name, *value;   /* within the input */
    size_t name_len, value_len;
} pair;

typedef struct model {
    pair *pairs;
    size_t count, bytes, max;
} model;

/* ---------------------------------------------------------------- reference */

static int ref_tchar(unsigned char c)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    size_t i;
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return 1;
    for (i = 0; i < sizeof extra - 1; i++)
        if (c == (unsigned char)extra[i])
            return 1;
    return 0;
}

static size_t ref_chomp(const char *s, size_t n)
{
    while (n > 0 && (s[n - 1] == '\r' || s[n - 1] == '\n'))
        n--;
    return n;
}

static int ref_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* The status line by the header's grammar, one version prefix at a time. */
static int ref_status(const char *s, size_t n, int *status, int *version)
{
    static const struct { const char *p; int v; } forms[] = {
        { "HTTP/1.0", 10 }, { "HTTP/1.1", 11 }, { "HTTP/2.0", 20 }, { "HTTP/3.0", 30 },
        { "HTTP/2", 20 }, { "HTTP/3", 30 },
    };
    size_t f;
    n = ref_chomp(s, n);
    for (f = 0; f < sizeof forms / sizeof forms[0]; f++) {
        size_t k = strlen(forms[f].p);
        int code;
        if (n < k + 4 || memcmp(s, forms[f].p, k) != 0 || s[k] != ' ')
            continue;
        if (!ref_digit(s[k + 1]) || !ref_digit(s[k + 2]) || !ref_digit(s[k + 3]))
            continue;
        if (n > k + 4 && s[k + 4] != ' ')
            continue;
        code = (s[k + 1] - '0') * 100 + (s[k + 2] - '0') * 10 + (s[k + 3] - '0');
        if (code < 100 || code > 599)
            continue;
        *status = code;
        *version = forms[f].v;
        return 1;
    }
    return 0;
}

/* The header line by the contract; stores what the parser must store. */
static int ref_add(model *m, const char *s, size_t n)
{
    size_t c, a, b, i;

    n = ref_chomp(s, n);
    if (n == 0)
        return ST_HEADERS_OK;
    if (s[0] == ' ' || s[0] == '\t')
        return ST_HEADERS_MALFORMED;
    for (c = 0; c < n && s[c] != ':'; c++)
        ;
    if (c == n || c == 0)
        return ST_HEADERS_MALFORMED;
    for (i = 0; i < c; i++)
        if (!ref_tchar((unsigned char)s[i]))
            return ST_HEADERS_MALFORMED;
    a = c + 1;
    b = n;
    while (a < b && (s[a] == ' ' || s[a] == '\t'))
        a++;
    while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t'))
        b--;
    for (i = a; i < b; i++)
        if (s[i] == '\0')
            return ST_HEADERS_MALFORMED;
    if (m->bytes + c + (b - a) + 2 > m->max)
        return ST_HEADERS_TOO_LARGE;
    m->pairs[m->count].name = s;
    m->pairs[m->count].name_len = c;
    m->pairs[m->count].value = s + a;
    m->pairs[m->count].value_len = b - a;
    m->count++;
    m->bytes += c + (b - a) + 2;
    return ST_HEADERS_OK;
}

static void model_clear(model *m)
{
    m->count = 0;
    m->bytes = 0;
}

static char ref_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static int ref_same_name(const pair *p, const char *name)
{
    size_t i;
    for (i = 0; i < p->name_len; i++)
        if (name[i] == '\0' || ref_lower(p->name[i]) != ref_lower(name[i]))
            return 0;
    return name[i] == '\0';
}

static const pair *ref_find(const model *m, const char *name)
{
    size_t i;
    for (i = 0; i < m->count; i++)
        if (ref_same_name(&m->pairs[i], name))
            return &m->pairs[i];
    return NULL;
}

/* ---------------------------------------------------------------- checks */

static void check_lookup(const st_headers *h, const model *m, const char *name)
{
    const char *got = st_headers_find(h, name);
    const pair *want = ref_find(m, name);
    if ((got == NULL) != (want == NULL))
        abort();
    if (want && (strlen(got) != want->value_len || memcmp(got, want->value, want->value_len) != 0))
        abort();
}

static void check_stored(const st_headers *h, const model *m)
{
    size_t cursor = 0, i = 0;
    const char *name, *value;

    if (h->count != m->count || h->block.len != m->bytes || m->bytes > m->max)
        abort();
    while (st_headers_next(h, &cursor, &name, &value)) {
        const pair *p = &m->pairs[i];
        if (i >= m->count || cursor > h->block.len)
            abort();
        if (strlen(name) != p->name_len || memcmp(name, p->name, p->name_len) != 0)
            abort();
        if (strlen(value) != p->value_len || memcmp(value, p->value, p->value_len) != 0)
            abort();
        i++;
    }
    if (i != m->count || cursor != h->block.len)
        abort();
}

/* Every stored name (of the first 64), its case flipped, finds the first
 * header of that name. scratch holds the longest name and its NUL. */
static void check_lookups(const st_headers *h, const model *m, char *scratch)
{
    size_t i, k;
    for (i = 0; i < m->count && i < 64; i++) {
        for (k = 0; k < m->pairs[i].name_len; k++) {
            char c = m->pairs[i].name[k];
            if (c >= 'a' && c <= 'z')
                c = (char)(c - 'a' + 'A');
            else if (c >= 'A' && c <= 'Z')
                c = (char)(c - 'A' + 'a');
            scratch[k] = c;
        }
        scratch[k] = '\0';
        check_lookup(h, m, scratch);
    }
}

/* ---------------------------------------------------------------- driver */

typedef struct line {
    const char *s;
    size_t n;
} line;

static size_t split(const char *s, size_t n, int sep_ff, line *out)
{
    size_t count = 0, start = 0, i;
    for (i = 0; i < n; i++) {
        if (sep_ff ? (unsigned char)s[i] == 0xFF : s[i] == '\n') {
            out[count].s = s + start;
            out[count].n = sep_ff ? i - start : i + 1 - start;
            count++;
            start = i + 1;
        }
    }
    if (start < n) {
        out[count].s = s + start;
        out[count].n = n - start;
        count++;
    }
    return count;
}

/* Feeds every line, each copied to the very end of `end_buf` (n bytes), so
 * reading past a line hits the allocation's end; checks each result. */
static void feed(st_headers *h, model *m, const line *lines, size_t count, char *end_buf, size_t n)
{
    size_t i;
    for (i = 0; i < count; i++) {
        char *copy = end_buf + (n - lines[i].n);
        int got, want;
        memcpy(copy, lines[i].s, lines[i].n);
        got = st_headers_add_line(h, copy, lines[i].n);
        want = ref_add(m, lines[i].s, lines[i].n);
        if (got != want)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s;
    size_t n, count, max, i;
    char *end_buf, *scratch;
    line *lines;
    st_headers h;
    model m;

    if (size < 2)
        return 0;
    max = data[0] == 0 ? ST_HEADERS_DEFAULT_MAX
        : data[0] < 128 ? data[0] : (size_t)(data[0] - 127) * 32;
    s = (const char *)data + 2;
    n = size - 2;
    lines = malloc((n + 1) * sizeof *lines);
    m.pairs = malloc((n + 1) * sizeof *m.pairs);
    end_buf = malloc(n ? n : 1);
    scratch = malloc(n + 1);
    if (lines == NULL || m.pairs == NULL || end_buf == NULL || scratch == NULL)
        abort();
    count = split(s, n, data[1] & 1, lines);

    if (count > 0) {
        int st = -1, ver = -1, rst = -1, rver = -1, ok, rok;
        char *copy = end_buf + (n - lines[0].n);
        memcpy(copy, lines[0].s, lines[0].n);
        ok = st_status_line_parse(copy, lines[0].n, &st, &ver);
        rok = ref_status(lines[0].s, lines[0].n, &rst, &rver);
        if (ok != rok || (ok && (st != rst || ver != rver)))
            abort();
        if (!ok && (st != -1 || ver != -1))   /* outputs untouched on failure */
            abort();
        if (st_status_line_parse(copy, lines[0].n, NULL, NULL) != ok)
            abort();
    }

    memset(&h, 0, sizeof h);
    h.max_bytes = data[0] == 0 ? 0 : max;
    m.max = max;
    model_clear(&m);

    feed(&h, &m, lines, count, end_buf, n);
    check_stored(&h, &m);
    check_lookups(&h, &m, scratch);
    /* names taken from the input: the text of a line before a colon, or all of
     * it, for the first lines (each lookup walks every stored header) */
    for (i = 0; i < count && i < 64; i++) {
        size_t k = 0;
        while (k < lines[i].n && lines[i].s[k] != ':' && lines[i].s[k] != '\0') {
            scratch[k] = lines[i].s[k];
            k++;
        }
        scratch[k] = '\0';
        check_lookup(&h, &m, scratch);
    }

    /* a new response on the same memory reads the same way */
    st_headers_reset(&h);
    if (h.count != 0 || st_headers_find(&h, "") != NULL)
        abort();
    model_clear(&m);
    feed(&h, &m, lines, count, end_buf, n);
    check_stored(&h, &m);

    st_headers_free(&h);
    free(scratch);
    free(end_buf);
    free(m.pairs);
    free(lines);
    return 0;
}
