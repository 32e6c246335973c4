#define _POSIX_C_SOURCE 200809L

#include "headers.h"

#include <string.h>
#include <strings.h>

static int is_tchar(unsigned char c)
{
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return 1;
    return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
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
}

void st_headers_free(st_headers *h)
{
    st_buf_free(&h->block);
    h->count = 0;
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
        if (!is_tchar((unsigned char)line[i]))
            return ST_HEADERS_MALFORMED;
    end = line + len;
    value = colon + 1;
    while (value < end && (*value == ' ' || *value == '\t'))
        value++;
    while (end > value && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    value_len = (size_t)(end - value);
    if (memchr(value, '\0', value_len) != NULL)
        return ST_HEADERS_MALFORMED;
    if (h->block.len > max || name_len + value_len + 2 > max - h->block.len)
        return ST_HEADERS_TOO_LARGE;
    if (!st_buf_reserve(&h->block, name_len + value_len + 2))
        return ST_HEADERS_NOMEM;
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

const char *st_headers_find(const st_headers *h, const char *name)
{
    size_t cursor = 0;
    const char *n, *v;

    while (st_headers_next(h, &cursor, &n, &v))
        if (strcasecmp(n, name) == 0)
            return v;
    return NULL;
}
