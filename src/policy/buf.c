#include "buf.h"

#include <stdlib.h>
#include <string.h>

int st_buf_reserve(st_buf *b, size_t n)
{
    if (n > b->cap - b->len) {
        size_t cap = b->cap ? b->cap : 256;
        char *d;
        while (cap - b->len < n) {
            if (cap > ((size_t)-1) / 2)
                return 0;
            cap *= 2;
        }
        d = realloc(b->data, cap);
        if (d == NULL)
            return 0;
        b->data = d;
        b->cap = cap;
    }
    return 1;
}

int st_buf_append(st_buf *b, const void *p, size_t n)
{
    if (!st_buf_reserve(b, n))
        return 0;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return 1;
}

void st_buf_reset(st_buf *b)
{
    b->len = 0;
}

void st_buf_free(st_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
