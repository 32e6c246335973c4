/* The engine: one curl multi handle, a timer heap for retry waits, the
 * requests in flight, and the per-key policy state. It is the only layer that
 * does I/O; it asks the pure policies what to do and reports outcomes to them. */
#ifndef STURDY_ENGINE_H
#define STURDY_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "backoff.h"
#include "outcome.h"
#include "upstream.h"

typedef struct st_engine st_engine;
typedef struct st_request st_request;

/* Transport settings shared by every request of one client. NULL = unset. */
typedef struct st_transport_config {
    const char *ca_file, *ca_path;
    const char *client_cert, *client_key, *client_key_password;
    const char *proxy;      /* NULL: libcurl reads the *_proxy environment variables */
    const char *no_proxy;
    const char *user_agent;
} st_transport_config;

#define ST_STATUS_OVERRIDES 600

typedef struct st_retry_policy {
    unsigned attempts;                     /* attempts in all, first included */
    double base_ms[ST_CLASS_COUNT];        /* backoff base per class */
    double cap_ms;
    st_jitter jitter;
    int64_t honor_retry_after_ms;          /* a longer server hint ends the call instead */
    unsigned char retried[ST_CLASS_COUNT]; /* per class: 1 = retried */
    signed char status_retried[ST_STATUS_OVERRIDES]; /* -1 = as its class, 0 never, 1 always */
    int budget_enabled;                    /* its figures are in st_upstream_config */
} st_retry_policy;

void st_retry_policy_defaults(st_retry_policy *p);

typedef struct st_request_spec {
    const char *method, *url, *key;
    const char *body;
    size_t body_len;
    const char *const *headers; /* "Name: value" lines, already validated */
    size_t nheaders;
    int64_t connect_ms, first_byte_ms, idle_ms, total_ms; /* 0 = no limit */
    size_t max_response;
    unsigned attempts;          /* 0 = the policy's */
    int stream;                 /* body handed out as it arrives (st_request_pending_body); */
                                /* ST_STREAM_MANUAL_COMMIT: the owner commits with st_request_commit */
    int priority;               /* ST_PRIORITY_HIGH, _NORMAL (0 here means normal), _LOW */
    double input_tokens, output_tokens; /* estimates for the rate limiter; 0 = unknown */
} st_request_spec;

#define ST_STREAM_MANUAL_COMMIT 2

typedef enum st_req_state {
    ST_REQ_RUNNING = 1, ST_REQ_WAITING, ST_REQ_QUEUED, ST_REQ_DONE
} st_req_state;

typedef struct st_attempt {
    long status;       /* 0 when there was no response */
    const char *kind;  /* NULL for success */
    double delay_ms;   /* wait before the next attempt; 0 for the last */
} st_attempt;

typedef struct st_timings {
    double dns, connect, tls, ttfb, total; /* seconds */
} st_timings;

/* What a finished request tells its owner. Valid until st_request_free. */
typedef struct st_result {
    st_outcome outcome;       /* outcome.kind NULL = success */
    long status;              /* 0 = no response */
    const char *body;
    size_t body_len;
    const char *headers;      /* "name\0value\0" pairs as received, in arrival order */
    size_t headers_len;
    st_timings timings;
    int http_version;         /* 10, 11, 20, 30; 0 unknown */
    const st_attempt *attempts;
    size_t nattempts;
    const char *detail;       /* transport error text, "" if none */
    const char *request_id;   /* last seen, "" if none */
    double retry_after;       /* seconds from the last usable server hint; < 0 none */
    int committed;
    st_outcome cause;         /* for budget_exhausted: the error that wanted a retry */
    long cause_status;
} st_result;

typedef struct st_retry_info {
    const char *key;
    unsigned attempt;         /* the attempt that failed, 1-based */
    st_class cls;
    const char *kind;
    long status;
    double delay_ms;
    int hinted;               /* delay came from retry-after(-ms) */
} st_retry_info;

typedef void (*st_retry_hook)(void *ud, const st_retry_info *info);

/* Things an operator wants to see happen to an upstream key. */
typedef enum { ST_EVENT_BREAKER = 1, ST_EVENT_LIMIT_LEARNED, ST_EVENT_PAUSED } st_event_type;
typedef struct st_event {
    st_event_type type;
    const char *key;
    st_breaker_state from, to;  /* ST_EVENT_BREAKER */
    st_dim dim;                 /* ST_EVENT_LIMIT_LEARNED */
    double limit;               /* per minute */
    double pause_ms;            /* ST_EVENT_PAUSED */
} st_event;
typedef void (*st_event_hook)(void *ud, const st_event *ev);

st_engine *st_engine_new(const st_transport_config *tc, const st_retry_policy *rp,
                         const st_upstream_config *uc, uint64_t seed, char *err, size_t errlen);
void st_engine_free(st_engine *e);   /* cancels and frees every request it still holds */
void st_engine_set_retry_hook(st_engine *e, st_retry_hook hook, void *ud);
void st_engine_set_event_hook(st_engine *e, st_event_hook hook, void *ud);
/* The upstream of a key, NULL if no request has named it yet. */
st_upstream *st_engine_upstream(st_engine *e, const char *key);
/* Calls fn for every upstream key. */
void st_engine_each_upstream(st_engine *e, void (*fn)(void *ud, st_upstream *u), void *ud);

/* Starts a request without waiting for anything. NULL with err set on failure. */
st_request *st_engine_submit(st_engine *e, const st_request_spec *spec, char *err, size_t errlen);
/* Ends a request that is not done yet with kind "canceled". */
void st_engine_cancel(st_engine *e, st_request *r);
/* Drives transfers and timers, waiting at most max_wait_ms for activity.
 * Returns how many requests are still running or waiting. */
int st_engine_step(st_engine *e, int64_t max_wait_ms);
/* Finished requests that carry userdata, oldest first; each is handed out
 * once. One without userdata is waited on by its owner, who frees it. */
st_request *st_engine_take_done(st_engine *e);
/* Milliseconds until the engine next needs driving (-1: nothing pending). */
int64_t st_engine_timeout(st_engine *e);
/* Ends every request that is not done yet with kind "canceled". */
void st_engine_cancel_all(st_engine *e);

/* The sockets libcurl is waiting on, for event loops that wait on them and
 * then drive the engine. (Through curl_multi_fdset: sockets numbered at or
 * above FD_SETSIZE are not listed; st_engine_timeout still bounds the wait.) */
#define ST_FD_READ 1
#define ST_FD_WRITE 2
typedef struct st_fd {
    int fd;
    int events; /* ST_FD_READ | ST_FD_WRITE */
} st_fd;
/* Copies up to max entries; returns how many sockets there are in all. */
size_t st_engine_fds(const st_engine *e, st_fd *out, size_t max);

st_req_state st_request_state(const st_request *r);
void st_request_result(st_request *r, st_result *out);
/* For a streamed request: the body bytes received and not yet handed out.
 * Once the caller has them the call is committed and is never retried. */
const char *st_request_pending_body(const st_request *r, size_t *len);
void st_request_body_delivered(st_request *r);
/* The caller has seen part of the reply: the call is never retried now. */
void st_request_commit(st_request *r);
/* Attempts started so far (a new one means a fresh body). */
unsigned st_request_attempt(const st_request *r);
/* The body of a successful transfer turned out to be a failure (an error event
 * inside a 200 stream): the attempt is judged again with this outcome and
 * retried by the usual rules, unless committed. For running or finished
 * (not yet taken) requests. */
void st_engine_fail_attempt(st_engine *e, st_request *r, st_class cls, const char *kind, const char *detail);
/* Streamed requests with body bytes waiting to be handed out. */
size_t st_engine_streams(st_engine *e, st_request **out, size_t max);
void st_request_set_userdata(st_request *r, void *ud);
void *st_request_userdata(const st_request *r);
/* Frees a finished request (or cancels and frees an unfinished one). */
void st_request_free(st_request *r);

typedef struct st_engine_stats {
    uint64_t requests, attempts, retries, connections;
    int running, waiting, queued, done; /* done: finished, not yet taken */
} st_engine_stats;
void st_engine_stats_get(const st_engine *e, st_engine_stats *out);

/* The engine's monotonic clock, in ms. */
int64_t st_engine_now_ms(void);

#endif
