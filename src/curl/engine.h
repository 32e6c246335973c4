/* The curl transport: one curl multi handle, a timer heap for retry waits and
 * limiter wake-ups, the requests in flight, pools of easy handles and requests.
 * It moves bytes and asks the decision core (decide.h) every question: whether an
 * attempt may start, what an outcome does to the key, whether to retry.
 *
 * Re-entrancy. The engine never calls out while it walks its lists: what an
 * operator or a hook should hear (retries scheduled, breaker transitions, limits
 * learned, pauses) is queued as notices, taken with st_engine_take_notice once a
 * call into the engine has returned. So any public function may be called from
 * whatever the owner runs on a notice or a finished request. */
#ifndef STURDY_ENGINE_H
#define STURDY_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "decide.h"

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

/* ST_STREAM_AUTO: body bytes are handed out as they arrive (st_request_pending_body)
 * and the first handed out commits the call. ST_STREAM_MANUAL: the same, but the
 * owner commits with st_request_commit (a parser holding back a prelude). */
enum { ST_STREAM_NONE = 0, ST_STREAM_AUTO, ST_STREAM_MANUAL };

typedef struct st_request_spec {
    const char *method, *url, *key;
    const char *body;
    size_t body_len;
    const char *const *headers; /* "Name: value" lines, already validated */
    size_t nheaders;
    int64_t connect_ms, first_byte_ms, idle_ms, total_ms; /* 0 = no limit */
    size_t max_response;        /* 0 = 64 MiB */
    unsigned attempts;          /* 0 = the policy's */
    int stream;                 /* ST_STREAM_* */
    int priority;               /* ST_PRIORITY_* */
    double input_tokens, output_tokens; /* estimates for the rate limiter; 0 = unknown */
    int held;                   /* waits for st_engine_gate before it is admitted */
    const char *tag;            /* for the spend caps: a tenant or feature; NULL none */
    double reserve_usd, reserve_tokens; /* the worst case the spend caps reserve */
} st_request_spec;

typedef enum st_req_state {
    ST_REQ_RUNNING = 1, ST_REQ_WAITING, ST_REQ_QUEUED, ST_REQ_DONE
} st_req_state;

typedef struct st_attempt {
    long status;       /* 0 when there was no response */
    const char *kind;  /* NULL for success */
    double delay_ms;   /* wait before the next attempt; 0 for the last */
    int hinted;        /* the delay was the server's retry hint */
    double ttfb, total; /* seconds; 0 for an attempt never sent */
} st_attempt;

typedef struct st_timings {
    double dns, connect, tls, ttfb, total; /* seconds */
} st_timings;

/* What a finished request tells its owner. Valid until st_request_free. */
typedef struct st_result {
    st_outcome outcome;       /* outcome.kind NULL = success */
    long status;              /* 0 = no response */
    int from_status;          /* the outcome is the status's (the body may explain it) */
    const char *body;
    size_t body_len;
    const char *headers;      /* "name\0value\0" pairs as received, in arrival order */
    size_t headers_len;
    st_timings timings;
    int http_version;         /* 10, 11, 20, 30; 0 unknown */
    const st_attempt *attempts;
    size_t nattempts;
    const char *detail;       /* why it failed, "" if nothing more to say */
    const char *request_id;   /* last seen, "" if none */
    const char *key;          /* the upstream key */
    double retry_after;       /* seconds: the server's hint or the refusal's wait; < 0 none */
    int committed;
    int retryable;            /* the decision core's: the outcome is of a retried kind */
    const char *stop;         /* retryable but not retried: "attempts", "deadline", "budget_exhausted",
                               * "committed", "hint_too_long"; NULL otherwise */
    uint64_t spend_id;        /* its parked spend reservation, to settle (st_decider_spend_settle); 0 none */
} st_result;

typedef struct st_retry_info {
    const char *key;
    unsigned attempt;         /* the attempt that failed, 1-based */
    st_class cls;
    const char *kind;
    long status;
    double delay_ms;
    int hinted;               /* delay came from retry-after(-ms) */
    st_request *request;      /* the request that waits to retry; valid until its end is taken */
} st_retry_info;

typedef enum { ST_NOTICE_RETRY = 1, ST_NOTICE_EVENT } st_notice_type;
typedef struct st_notice {
    st_notice_type type;
    st_retry_info retry;      /* ST_NOTICE_RETRY */
    st_event event;           /* ST_NOTICE_EVENT; event.up lives as long as the engine */
} st_notice;

st_engine *st_engine_new(const st_transport_config *tc, const st_retry_policy *rp,
                         const st_upstream_config *uc, uint64_t seed, char *err, size_t errlen);
void st_engine_free(st_engine *e);   /* cancels and frees every request it still holds */
/* 1 to queue notices for st_engine_take_notice (off by default: nobody listens). */
void st_engine_want_notices(st_engine *e, int retries, int events);
/* The oldest queued notice: 1 and *out, or 0 when none. */
int st_engine_take_notice(st_engine *e, st_notice *out);
/* The decision core, for stats and corrections. */
st_decider *st_engine_decider(st_engine *e);

/* Starts a request without waiting for anything. NULL with err set on failure. */
st_request *st_engine_submit(st_engine *e, const st_request_spec *spec, char *err, size_t errlen);
/* Ends a request that is not done yet with kind "canceled": 1, or 0 when it
 * was done already (its end stands). */
int st_engine_cancel(st_engine *e, st_request *r);
/* Drives transfers and timers, waiting at most max_wait_ms for activity.
 * Returns how many requests are still running, waiting or queued. */
int st_engine_step(st_engine *e, int64_t max_wait_ms);
/* Finished requests that carry userdata, oldest first; each is handed out once. */
st_request *st_engine_take_done(st_engine *e);
/* Milliseconds until the engine next needs driving (-1: nothing pending). */
int64_t st_engine_timeout(st_engine *e);
/* Ends every request that is not done yet with kind "canceled". */
void st_engine_cancel_all(st_engine *e);
/* 1 when there is something to take: a notice, a finished request with
 * userdata, or streamed body bytes. */
int st_engine_ready(st_engine *e);
/* Requests running, waiting or queued. */
int st_engine_active(const st_engine *e);

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
/* For a streamed request: the body bytes received and not yet handed out. */
const char *st_request_pending_body(const st_request *r, size_t *len);
/* The caller has the pending bytes (ST_STREAM_AUTO: the call is now committed). */
void st_request_body_delivered(st_request *r);
/* The caller has seen part of the reply: the call is never retried now. */
void st_request_commit(st_request *r);
/* Attempts started so far (a new one means a fresh body). */
unsigned st_request_attempt(const st_request *r);
/* 1 while bytes of this attempt may still reach the caller: it is the last one
 * started, it runs or the request ended with it, and no retry of it was
 * planned. Bytes handed out earlier (st_engine_streams) can outlive that. */
int st_request_current(const st_request *r, unsigned attempt);
/* The body of a transfer turned out to be a failure (an error event inside a 200
 * stream): the attempt is judged again with this outcome and retried by the
 * usual rules, unless committed. For running or finished (not yet taken) requests;
 * detail is copied. */
void st_engine_fail_attempt(st_engine *e, st_request *r, st_class cls, const char *kind, const char *detail);
/* Milliseconds left before r's deadline (at least 0), or -1 when it has none. */
int64_t st_request_deadline_left(const st_request *r);
/* Bytes of the current attempt's response received so far (0: none yet). */
uint64_t st_request_received(const st_request *r);
/* May call r (running, first byte late) start a hedge on key h (NULL: its own)?
 * See st_hedge_admit; *why says which cap refused. st_request_hedge_plan: the
 * wait before asking, or -1 (see st_hedge_plan). */
int64_t st_request_hedge_plan(st_engine *e, st_request *r, const st_hedge_policy *p);
int st_request_hedge_admit(st_engine *e, st_request *r, const char *hedge_key, const st_hedge_policy *p,
                           const char **why);
/* Cancels r as a hedge leg that lost: if no byte of it came, the time it waited
 * counts in its key's time-to-first-byte window (st_hedge_lost). */
void st_engine_cancel_lost(st_engine *e, st_request *r);
/* Streamed requests with body bytes waiting to be handed out: copies up to max,
 * returns how many there are. */
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

/* ---- The fleet scope (sturdy.shared) ----------------------------------------
 * A shared limiter places each attempt in the fleet's rate limit before it may
 * start, and a shared breaker hands the fleet's state of a key to the core
 * (decide.h, "The fleet scope"). Events the core produces are queued as notices. */

/* A held request (spec.held), one waiting to retry, or one queued for its key:
 * its next attempt starts no earlier than wait_ms from now (its place; 0 =
 * none). A held request is admitted at once. Returns 1, or 0 when the request
 * no longer waits (it started or is done): the place then goes unused. */
int st_engine_gate(st_engine *e, st_request *r, int64_t wait_ms);
/* The longest wait the request's next attempt, asking at_ms from now, may still
 * sit through (st_call_max_wait_ms), and what one attempt costs (per st_dim). */
int64_t st_request_max_wait(const st_request *r, int64_t at_ms);
/* 1 while the request is held (submitted held, not gated yet). */
int st_request_held(const st_request *r);
const double *st_request_cost(const st_request *r);
/* The fleet's answers for a key (made on first use; 0 = out of memory). */
int st_engine_open_until(st_engine *e, const char *key, int64_t until_ms);
int st_engine_fleet_window(st_engine *e, const char *key, uint64_t calls, uint64_t failures, uint64_t slow);
int st_engine_share(st_engine *e, const char *key, double n);

#endif
