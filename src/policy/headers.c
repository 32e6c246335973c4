#define _POSIX_C_SOURCE 200809L

#include "headers.h"

#include <string.h>
#include <strings.h>

/* RFC 9110 tchar, as a table: header names are checked byte by byte. */
static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1,
    ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1, ['I'] = 1,
    ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1,
    ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1,
    ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1,
    ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

/* Which indexed header a name is, by length first; -1 none. */
static int known_of(const char *name, size_t len)
{
    switch (len) {
    case 10:
        return strncasecmp(name, "request-id", 10) == 0 ? ST_H_REQUEST_ID : -1;
    case 11:
        return strncasecmp(name, "retry-after", 11) == 0 ? ST_H_RETRY_AFTER : -1;
    case 12:
        return strncasecmp(name, "x-request-id", 12) == 0 ? ST_H_X_REQUEST_ID : -1;
    case 14:
        if (strncasecmp(name, "retry-after-ms", 14) == 0)
            return ST_H_RETRY_AFTER_MS;
        return strncasecmp(name, "x-should-retry", 14) == 0 ? ST_H_SHOULD_RETRY : -1;
    default:
        return -1;
    }
}

static int is_limit_name(const char *name, size_t len)
{
    return (len > 20 && (name[0] | 0x20) == 'a' && strncasecmp(name, "anthropic-ratelimit-", 20) == 0)
        || (len > 12 && (name[0] | 0x20) == 'x' && strncasecmp(name, "x-ratelimit-", 12) == 0);
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* the length without a trailing CR LF, LF or CR */
static size_t chomp(const char *line, size_t len)
{
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        len--;
    return len;
}

int st_status_line_parse(const char *line, size_t len, int *status, int *version)
{
    size_t i;
    int v, code;

    len = chomp(line, len);
    if (len < 5 || memcmp(line, "HTTP/", 5) != 0)
        return 0;
    i = 5;
    if (i < len && is_digit(line[i]) && i + 2 < len && line[i + 1] == '.' && is_digit(line[i + 2])) {
        v = (line[i] - '0') * 10 + (line[i + 2] - '0');
        i += 3;
    } else if (i < len && (line[i] == '2' || line[i] == '3')) {
        v = (line[i] - '0') * 10;
        i += 1;
    } else {
        return 0;
    }
    if (v != 10 && v != 11 && v != 20 && v != 30)
        return 0;
    if (i + 4 > len || line[i] != ' ' || !is_digit(line[i + 1]) || !is_digit(line[i + 2])
        || !is_digit(line[i + 3]))
        return 0;
    code = (line[i + 1] - '0') * 100 + (line[i + 2] - '0') * 10 + (line[i + 3] - '0');
    i += 4;
    if (i < len && line[i] != ' ')
        return 0; /* "200x" */
    if (code < 100 || code > 599)
        return 0;
    if (status)
        *status = code;
    if (version)
        *version = v;
    return 1;
}

void st_headers_reset(st_headers *h)
{
    st_buf_reset(&h->block);
    h->count = 0;
    memset(h->known, 0, sizeof h->known);
    h->nlimits = 0;
}

void st_headers_free(st_headers *h)
{
    st_buf_free(&h->block);
    st_headers_reset(h);
}

int st_headers_add_line(st_headers *h, const char *line, size_t len)
{
    size_t name_len, i, max = h->max_bytes ? h->max_bytes : ST_HEADERS_DEFAULT_MAX;
    const char *colon, *value, *end;
    char *dst;
    size_t value_len;

    len = chomp(line, len);
    if (len == 0)
        return ST_HEADERS_OK;
    if (line[0] == ' ' || line[0] == '\t')
        return ST_HEADERS_MALFORMED; /* obs-fold */
    colon = memchr(line, ':', len);
    if (colon == NULL || colon == line)
        return ST_HEADERS_MALFORMED;
    name_len = (size_t)(colon - line);
    for (i = 0; i < name_len; i++)
        if (!tchar[(unsigned char)line[i]])
            return ST_HEADERS_MALFORMED;
    end = line + len;
    value = colon + 1;
    while (value < end && (*value == ' ' || *value == '\t'))
        value++;
    while (end > value && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    value_len = (size_t)(end - value);
    for (i = 0; i < value_len; i++)
        if (value[i] == '\0' || value[i] == '\r' || value[i] == '\n')
            return ST_HEADERS_MALFORMED;
    if (h->block.len > max || name_len + value_len + 2 > max - h->block.len)
        return ST_HEADERS_TOO_LARGE;
    if (!st_buf_reserve(&h->block, name_len + value_len + 2))
        return ST_HEADERS_NOMEM;
    {
        int k = known_of(line, name_len);
        if (k >= 0 && h->known[k] == 0)
            h->known[k] = h->block.len + name_len + 2;
        else if (k < 0 && h->nlimits < ST_HEADERS_MAX_LIMITS && is_limit_name(line, name_len))
            h->limits[h->nlimits++] = h->block.len;
    }
    dst = h->block.data + h->block.len;
    memcpy(dst, line, name_len);
    dst[name_len] = '\0';
    memcpy(dst + name_len + 1, value, value_len);
    dst[name_len + 1 + value_len] = '\0';
    h->block.len += name_len + value_len + 2;
    h->count++;
    return ST_HEADERS_OK;
}

int st_headers_next(const st_headers *h, size_t *cursor, const char **name, const char **value)
{
    const char *p;

    if (*cursor >= h->block.len)
        return 0;
    p = h->block.data + *cursor;
    *name = p;
    p += strlen(p) + 1;
    *value = p;
    p += strlen(p) + 1;
    *cursor = (size_t)(p - h->block.data);
    return 1;
}

const char *st_headers_known(const st_headers *h, st_known_header which)
{
    size_t at = (unsigned)which < ST_H_KNOWN ? h->known[which] : 0;
    return at ? h->block.data + at - 1 : NULL;
}

void st_headers_limit(const st_headers *h, unsigned i, const char **name, const char **value)
{
    const char *p = h->block.data + h->limits[i];
    *name = p;
    *value = p + strlen(p) + 1;
}

const char *st_headers_find(const st_headers *h, const char *name)
{
    size_t cursor = 0;
    const char *n, *v;

    while (st_headers_next(h, &cursor, &n, &v))
        if (strcasecmp(n, name) == 0)
            return v;
    return NULL;
}
