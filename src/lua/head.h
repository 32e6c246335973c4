/* The response-head parser as a Lua value (sturdy.policy's `policy.head()`):
 * sturdy.cosocket reads a response into one, and the decision core's binding
 * reads the retry hints and rate-limit headers out of the same struct. */
#ifndef STURDY_HEAD_H
#define STURDY_HEAD_H

#include "headers.h"

#define SL_HEAD_MT "sturdy.head"

typedef struct sl_head {
    st_headers h;
} sl_head;

#endif
