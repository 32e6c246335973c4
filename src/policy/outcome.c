#include "outcome.h"

#include <string.h>

static const char *const class_names[ST_CLASS_COUNT] = {
    "success", "throttled", "overloaded", "transient", "timeout", "fatal", "canceled"
};

/* The one table of HTTP statuses: anything not listed falls to its range below. */
static const struct { long status; st_outcome outcome; } status_table[] = {
    { 400, { ST_CLASS_FATAL, "bad_request" } },
    { 401, { ST_CLASS_FATAL, "auth" } },
    { 403, { ST_CLASS_FATAL, "permission" } },
    { 404, { ST_CLASS_FATAL, "not_found" } },
    { 408, { ST_CLASS_TRANSIENT, "request_timeout" } },
    { 409, { ST_CLASS_TRANSIENT, "conflict" } },
    { 413, { ST_CLASS_FATAL, "too_large" } },
    { 422, { ST_CLASS_FATAL, "bad_request" } },
    { 429, { ST_CLASS_THROTTLED, "rate_limited" } },
    { 500, { ST_CLASS_TRANSIENT, "server" } },
    { 502, { ST_CLASS_TRANSIENT, "server" } },
    { 503, { ST_CLASS_OVERLOADED, "overloaded" } },
    { 504, { ST_CLASS_TRANSIENT, "server" } },
    { 529, { ST_CLASS_OVERLOADED, "overloaded" } },
};

st_outcome st_outcome_of_status(long status)
{
    static const st_outcome success = { ST_CLASS_SUCCESS, NULL };
    static const st_outcome client_error = { ST_CLASS_FATAL, "client_error" };
    static const st_outcome server_error = { ST_CLASS_TRANSIENT, "server" };
    static const st_outcome unexpected = { ST_CLASS_FATAL, "bad_response" };
    size_t i;

    for (i = 0; i < sizeof status_table / sizeof status_table[0]; i++)
        if (status_table[i].status == status)
            return status_table[i].outcome;
    if (status >= 200 && status < 300)
        return success;
    if (status >= 400 && status < 500)
        return client_error;
    if (status >= 500 && status < 600)
        return server_error;
    return unexpected; /* 1xx/3xx as a final answer: redirects are not followed */
}

const char *st_class_name(st_class c)
{
    return (unsigned)c < ST_CLASS_COUNT ? class_names[c] : "?";
}

int st_class_parse(const char *name, st_class *out)
{
    int i;
    for (i = 0; i < ST_CLASS_COUNT; i++)
        if (strcmp(name, class_names[i]) == 0) {
            *out = (st_class)i;
            return 1;
        }
    return 0;
}

int st_class_retried_by_default(st_class c)
{
    return c == ST_CLASS_THROTTLED || c == ST_CLASS_OVERLOADED
        || c == ST_CLASS_TRANSIENT || c == ST_CLASS_TIMEOUT;
}
