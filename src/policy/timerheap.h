/* A binary min-heap of timers, each embedded in its owner and knowing its slot,
 * so removal (a canceled retry wait) is O(log n). */
#ifndef STURDY_TIMERHEAP_H
#define STURDY_TIMERHEAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct st_timer {
    int64_t due_ms;
    size_t slot;   /* index in the heap + 1; 0 = not scheduled */
    int kind;      /* the owner's tag: which struct the timer is embedded in */
} st_timer;

typedef struct st_timerheap {
    st_timer **items;
    size_t len, cap;
} st_timerheap;

int st_timerheap_push(st_timerheap *h, st_timer *t);   /* 0 when memory runs out */
st_timer *st_timerheap_peek(const st_timerheap *h);
void st_timerheap_remove(st_timerheap *h, st_timer *t); /* no-op if not scheduled */
void st_timerheap_free(st_timerheap *h);

#endif
