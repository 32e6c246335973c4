#include "timerheap.h"

#include <stdlib.h>

static void place(st_timerheap *h, size_t i, st_timer *t)
{
    h->items[i] = t;
    t->slot = i + 1;
}

static void sift_up(st_timerheap *h, size_t i)
{
    st_timer *t = h->items[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (h->items[parent]->due_ms <= t->due_ms)
            break;
        place(h, i, h->items[parent]);
        i = parent;
    }
    place(h, i, t);
}

static void sift_down(st_timerheap *h, size_t i)
{
    st_timer *t = h->items[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->len)
            break;
        if (child + 1 < h->len && h->items[child + 1]->due_ms < h->items[child]->due_ms)
            child++;
        if (t->due_ms <= h->items[child]->due_ms)
            break;
        place(h, i, h->items[child]);
        i = child;
    }
    place(h, i, t);
}

int st_timerheap_push(st_timerheap *h, st_timer *t)
{
    if (h->len == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 16;
        st_timer **items = realloc(h->items, cap * sizeof *items);
        if (items == NULL)
            return 0;
        h->items = items;
        h->cap = cap;
    }
    h->items[h->len++] = t;
    sift_up(h, h->len - 1);
    return 1;
}

st_timer *st_timerheap_peek(const st_timerheap *h)
{
    return h->len ? h->items[0] : NULL;
}

void st_timerheap_remove(st_timerheap *h, st_timer *t)
{
    size_t i;
    st_timer *last;

    if (t->slot == 0)
        return;
    i = t->slot - 1;
    t->slot = 0;
    last = h->items[--h->len];
    if (i == h->len)
        return;
    place(h, i, last);
    if (i > 0 && h->items[(i - 1) / 2]->due_ms > last->due_ms)
        sift_up(h, i);
    else
        sift_down(h, i);
}

void st_timerheap_free(st_timerheap *h)
{
    free(h->items);
    h->items = NULL;
    h->len = h->cap = 0;
}
