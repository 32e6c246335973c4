/* A growable byte buffer. */
#ifndef STURDY_BUF_H
#define STURDY_BUF_H

#include <stddef.h>

typedef struct st_buf {
    char *data;
    size_t len, cap;
} st_buf;

/* Makes room for n more bytes; returns 0 when memory runs out. */
int st_buf_reserve(st_buf *b, size_t n);
/* Appends n bytes; returns 0 when memory runs out (the buffer is left as it was). */
int st_buf_append(st_buf *b, const void *p, size_t n);
void st_buf_reset(st_buf *b);   /* empty, keep the memory */
void st_buf_free(st_buf *b);

#endif
