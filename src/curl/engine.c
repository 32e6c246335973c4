#define _POSIX_C_SOURCE 200809L

#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/select.h>
#include <time.h>

#include <curl/curl.h>

#include "buf.h"
#include "headers.h"
#include "httpdate.h"
#include "timerheap.h"

#define KEY_BUCKETS 64
#define EASY_POOL_MAX 64
#define REQUEST_POOL_MAX 64
#define POOLED_BUF_MAX (256 * 1024) /* larger buffers go back to the system */

enum { TIMER_REQUEST = 0, TIMER_UPSTREAM }; /* st_timer.kind */

typedef struct st_list {
    st_request *head, *tail;
} st_list;

struct st_request {
    st_engine *eng;
    st_request *prev, *next;   /* in running, waiting or done list */
    st_list *list;             /* which one, NULL when none */
    st_timer timer;            /* retry wait, or the deadline while queued */
    st_qnode qnode;            /* place in its upstream's queue */
    st_req_state state;
    CURL *easy;
    void *userdata;

    /* what was asked */
    char *method, *url, *body;
    size_t body_len;
    struct curl_slist *headers;
    st_upstream *up;
    st_permit permit;           /* the breaker's, for the attempt under way */
    int priority;
    double cost[ST_DIM_COUNT];  /* what one attempt takes from the rate limiter */
    int64_t connect_ms, first_byte_ms, idle_ms, deadline_ms; /* deadline: absolute, 0 none */
    size_t max_response;
    unsigned max_attempts;
    int stream;
    int auto_commit;            /* handing out body bytes commits the call */
    size_t streamed;            /* body bytes of this attempt already handed out */
    unsigned started;           /* attempts started */
    int paced;                  /* held back by the limiter at least once (counted once) */

    /* the attempt under way */
    int64_t attempt_start_ms, last_byte_ms;
    uint64_t rx_bytes, rx_seen; /* received, and as of last_byte_ms: callbacks read no clock */
    int got_bytes, too_large;
    st_headers headers_in;      /* of the latest response */
    int head_too_large;
    st_buf body_buf;
    char errbuf[CURL_ERROR_SIZE];

    /* across attempts */
    st_attempt *attempts;
    size_t nattempts, cap_attempts;
    double prev_delay_ms;
    char request_id[128];
    int64_t retry_after_ms;     /* last usable hint, -1 none */
    int committed;

    /* the outcome */
    st_outcome outcome;
    long status;
    st_outcome cause;
    long cause_status;
    st_timings timings;
    int http_version;
};

struct st_engine {
    CURLM *multi;
    st_transport_config tc;     /* strings owned */
    st_retry_policy policy;
    st_rng rng;
    st_timerheap timers;
    st_list running, waiting, done;
    st_upstream_config upstream_config;
    st_upstream *keys[KEY_BUCKETS];
    CURL *easy_pool[EASY_POOL_MAX];
    int npool;
    st_request *request_pool[REQUEST_POOL_MAX]; /* released requests, buffers kept */
    int nrequests_pooled;
    st_retry_hook retry_hook;
    void *retry_hook_ud;
    st_event_hook event_hook;
    void *event_hook_ud;
    uint64_t n_requests, n_attempts, n_retries, n_connections;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t st_engine_now_ms(void)
{
    return mono_ms();
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *dup_str(const char *s)
{
    size_t n;
    char *d;
    if (s == NULL)
        return NULL;
    n = strlen(s) + 1;
    d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

static void set_err(char *err, size_t errlen, const char *msg)
{
    if (errlen)
        snprintf(err, errlen, "%s", msg);
}

/* ---- lists ---------------------------------------------------------------- */

static void list_push(st_list *l, st_request *r)
{
    r->list = l;
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void list_unlink(st_request *r)
{
    st_list *l = r->list;
    if (l == NULL)
        return;
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
    r->list = NULL;
}

static int list_count(const st_list *l)
{
    int n = 0;
    const st_request *r;
    for (r = l->head; r; r = r->next)
        n++;
    return n;
}

/* ---- keys ----------------------------------------------------------------- */

static unsigned key_hash(const char *s)
{
    unsigned h = 2166136261u; /* FNV-1a */
    while (*s)
        h = (h ^ (unsigned char)*s++) * 16777619u;
    return h;
}

static st_upstream *upstream_find(st_engine *e, const char *name)
{
    st_upstream *u;
    for (u = e->keys[key_hash(name) % KEY_BUCKETS]; u; u = u->next)
        if (strcmp(u->name, name) == 0)
            return u;
    return NULL;
}

static st_upstream *upstream_get(st_engine *e, const char *name)
{
    unsigned b = key_hash(name) % KEY_BUCKETS;
    st_upstream *u = upstream_find(e, name);

    if (u != NULL)
        return u;
    u = st_upstream_new(name, &e->upstream_config, mono_ms());
    if (u == NULL)
        return NULL;
    u->wake.kind = TIMER_UPSTREAM;
    u->next = e->keys[b];
    e->keys[b] = u;
    return u;
}

st_upstream *st_engine_upstream(st_engine *e, const char *key)
{
    return upstream_find(e, key);
}

void st_engine_each_upstream(st_engine *e, void (*fn)(void *ud, st_upstream *u), void *ud)
{
    int i;
    st_upstream *u;
    for (i = 0; i < KEY_BUCKETS; i++)
        for (u = e->keys[i]; u; u = u->next)
            fn(ud, u);
}

static void emit(st_engine *e, const st_event *ev)
{
    if (e->event_hook)
        e->event_hook(e->event_hook_ud, ev);
}

static void emit_breaker_change(st_engine *e, st_upstream *u, st_breaker_state from)
{
    st_breaker_state to = st_breaker_state_now(&u->breaker);
    st_event ev;

    if (to == from)
        return;
    memset(&ev, 0, sizeof ev);
    ev.type = ST_EVENT_BREAKER;
    ev.key = u->name;
    ev.from = from;
    ev.to = to;
    emit(e, &ev);
}

/* ---- response headers ----------------------------------------------------- */

static const char *header_find(const st_request *r, const char *name)
{
    return st_headers_find(&r->headers_in, name);
}

static size_t on_header(char *data, size_t size, size_t n, void *ud)
{
    st_request *r = ud;
    size_t len = size * n;
    int rc;

    r->rx_bytes += len;
    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        /* a new response (after 100-continue or a proxy's CONNECT): forget the last one */
        st_headers_reset(&r->headers_in);
        return len;
    }
    rc = st_headers_add_line(&r->headers_in, data, len);
    if (rc == ST_HEADERS_TOO_LARGE || rc == ST_HEADERS_NOMEM) {
        r->head_too_large = rc == ST_HEADERS_TOO_LARGE;
        return 0;
    }
    return len; /* a malformed line is skipped, as libcurl itself accepted it */
}

static size_t on_body(char *data, size_t size, size_t n, void *ud)
{
    st_request *r = ud;
    size_t len = size * n;

    r->rx_bytes += len;
    if (len > r->max_response - (r->streamed + r->body_buf.len)) {
        r->too_large = 1;
        return 0;
    }
    if (!st_buf_append(&r->body_buf, data, len))
        return 0;
    return len;
}

/* ---- attempts ------------------------------------------------------------- */

/* Options that stay the same for every transfer of an engine, set once per
 * easy handle; pooled handles keep them (no curl_easy_reset on the hot path). */
static void easy_init_engine_options(st_engine *e, CURL *c)
{
    const st_transport_config *tc = &e->tc;

    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    if (tc->ca_file)
        curl_easy_setopt(c, CURLOPT_CAINFO, tc->ca_file);
    if (tc->ca_path)
        curl_easy_setopt(c, CURLOPT_CAPATH, tc->ca_path);
    if (tc->client_cert)
        curl_easy_setopt(c, CURLOPT_SSLCERT, tc->client_cert);
    if (tc->client_key)
        curl_easy_setopt(c, CURLOPT_SSLKEY, tc->client_key);
    if (tc->client_key_password)
        curl_easy_setopt(c, CURLOPT_KEYPASSWD, tc->client_key_password);
    if (tc->proxy)
        curl_easy_setopt(c, CURLOPT_PROXY, tc->proxy);
    if (tc->no_proxy)
        curl_easy_setopt(c, CURLOPT_NOPROXY, tc->no_proxy);
    if (tc->user_agent)
        curl_easy_setopt(c, CURLOPT_USERAGENT, tc->user_agent);
}

static CURL *easy_get(st_engine *e)
{
    CURL *c;
    if (e->npool > 0)
        return e->easy_pool[--e->npool];
    c = curl_easy_init();
    if (c != NULL)
        easy_init_engine_options(e, c);
    return c;
}

static void easy_put(st_engine *e, CURL *easy)
{
    if (e->npool < EASY_POOL_MAX)
        e->easy_pool[e->npool++] = easy;
    else
        curl_easy_cleanup(easy);
}

/* Options of this request. Every one that any request sets is set here each
 * time, since a pooled handle still carries the previous request's. */
static void easy_setup(st_request *r)
{
    CURL *c = r->easy;
    const char *m = r->method;
    int get = strcmp(m, "GET") == 0, head = strcmp(m, "HEAD") == 0, post = strcmp(m, "POST") == 0;

    curl_easy_setopt(c, CURLOPT_URL, r->url);
    curl_easy_setopt(c, CURLOPT_PRIVATE, r);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)r->connect_ms); /* 0: libcurl's default */
    curl_easy_setopt(c, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)r->max_response);
    if (r->body == NULL && !post) {
        if (head)
            curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
        else
            curl_easy_setopt(c, CURLOPT_HTTPGET, 1L); /* also clears NOBODY and POST */
    } else {
        curl_easy_setopt(c, CURLOPT_NOBODY, 0L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, r->body ? r->body : "");
    }
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, (get || head || post) ? NULL : m);
}

static int attempt_start(st_engine *e, st_request *r)
{
    r->attempt_start_ms = mono_ms();
    r->last_byte_ms = r->attempt_start_ms;
    r->rx_bytes = r->rx_seen = 0;
    r->got_bytes = 0;
    r->too_large = 0;
    r->errbuf[0] = '\0';
    r->head_too_large = 0;
    r->streamed = 0;
    st_headers_reset(&r->headers_in);
    st_buf_reset(&r->body_buf);
    if (curl_multi_add_handle(e->multi, r->easy) != CURLM_OK)
        return 0;
    r->state = ST_REQ_RUNNING;
    list_push(&e->running, r);
    r->started++;
    e->n_attempts++;
    return 1;
}

static int attempt_log(st_request *r, long status, const char *kind)
{
    if (r->nattempts == r->cap_attempts) {
        size_t cap = r->cap_attempts ? r->cap_attempts * 2 : 4;
        st_attempt *a = realloc(r->attempts, cap * sizeof *a);
        if (a == NULL)
            return 0;
        r->attempts = a;
        r->cap_attempts = cap;
    }
    r->attempts[r->nattempts].status = status;
    r->attempts[r->nattempts].kind = kind;
    r->attempts[r->nattempts].delay_ms = 0;
    r->nattempts++;
    return 1;
}

static void finish(st_engine *e, st_request *r, st_outcome o)
{
    r->outcome = o;
    r->state = ST_REQ_DONE;
    list_push(&e->done, r);
}

static int64_t server_hint_ms(const st_request *r)
{
    const char *v;
    int64_t ms;

    if ((v = header_find(r, "retry-after-ms")) != NULL && st_retry_after_ms_parse(v, strlen(v), &ms))
        return ms;
    if ((v = header_find(r, "retry-after")) != NULL && st_retry_after_parse(v, strlen(v), wall_ms(), &ms))
        return ms;
    return -1;
}

static int is_retried(const st_retry_policy *p, st_class cls, long status, const char *should_retry)
{
    if (cls == ST_CLASS_SUCCESS || cls == ST_CLASS_CANCELED)
        return 0;
    if (should_retry != NULL) {
        if (strcasecmp(should_retry, "true") == 0)
            return 1;
        if (strcasecmp(should_retry, "false") == 0)
            return 0;
    }
    if (status > 0 && status < ST_STATUS_OVERRIDES && p->status_retried[status] >= 0)
        return p->status_retried[status];
    return p->retried[cls];
}

static void keep_request_id(st_request *r)
{
    const char *id = header_find(r, "request-id");
    if (id == NULL)
        id = header_find(r, "x-request-id");
    if (id != NULL)
        snprintf(r->request_id, sizeof r->request_id, "%s", id);
}

/* Tells the upstream's policies how an attempt went: the breaker, the latency
 * windows, and the limiter (headers it learns from; a 429 pauses the key). */
static void report_attempt(st_engine *e, st_request *r, st_outcome o, long status, int64_t hint, int64_t now)
{
    st_upstream *u = r->up;
    st_breaker_state before = st_breaker_state_now(&u->breaker);
    int64_t latency = now - r->attempt_start_ms;

    if (u->in_flight > 0)
        u->in_flight--;
    if (u->breaker_enabled) {
        st_breaker_record(&u->breaker, now, &r->permit, o.cls, latency);
        if (o.cls == ST_CLASS_OVERLOADED && hint > e->policy.honor_retry_after_ms)
            st_breaker_open_until(&u->breaker, now, now + hint);
        emit_breaker_change(e, u, before);
    }
    if (status > 0) {
        size_t cursor = 0;
        const char *name, *v;
        int64_t wall = wall_ms();

        u->replied = 1;
        st_upstream_record_latency(u, now, (uint64_t)(r->timings.ttfb * 1e6),
                                   (uint64_t)(r->timings.total * 1e6));
        while (st_headers_next(&r->headers_in, &cursor, &name, &v)) {
            if (st_limiter_feed_header(&u->limiter, now, wall, name, v)) {
                st_event ev;
                memset(&ev, 0, sizeof ev);
                ev.type = ST_EVENT_LIMIT_LEARNED;
                ev.key = u->name;
                st_ratelimit_header(name, &ev.dim, &(int){ 0 }, &(int){ 0 });
                ev.limit = st_limiter_limit(&u->limiter, ev.dim);
                emit(e, &ev);
            }
        }
        st_limiter_response_done(&u->limiter, now);
    }
    if (o.cls == ST_CLASS_THROTTLED) {
        /* a 429 pauses the whole key, not only this request */
        int64_t pause = hint > 0 ? hint : (int64_t)e->policy.base_ms[ST_CLASS_THROTTLED];
        st_event ev;
        u->throttled++;
        st_limiter_pause_until(&u->limiter, now + pause);
        memset(&ev, 0, sizeof ev);
        ev.type = ST_EVENT_PAUSED;
        ev.key = u->name;
        ev.pause_ms = (double)pause;
        emit(e, &ev);
    }
}

static void pump(st_engine *e, st_upstream *u, int64_t now);

static void retry_or_finish(st_engine *e, st_request *r, st_outcome o, long status, int64_t hint, int64_t now);

/* An attempt ended with outcome o: finish the request or schedule the next attempt. */
static void attempt_done(st_engine *e, st_request *r, st_outcome o, long status)
{
    int64_t now = mono_ms(), hint;

    list_unlink(r);
    curl_multi_remove_handle(e->multi, r->easy);
    r->status = status;
    keep_request_id(r);
    attempt_log(r, status, o.kind);
    hint = status > 0 ? server_hint_ms(r) : -1;
    report_attempt(e, r, o, status, hint, now);
    pump(e, r->up, now);
    retry_or_finish(e, r, o, status, hint, now);
}

/* After an attempt: finish the request, or wait and try again. */
static void retry_or_finish(st_engine *e, st_request *r, st_outcome o, long status, int64_t hint, int64_t now)
{
    const st_retry_policy *p = &e->policy;
    double delay;

    if (o.cls == ST_CLASS_SUCCESS) {
        st_budget_deposit(&r->up->budget, now);
        finish(e, r, o);
        return;
    }
    if (hint > 0)
        r->retry_after_ms = hint;
    if (r->committed || r->nattempts >= r->max_attempts
        || !is_retried(p, o.cls, status, header_find(r, "x-should-retry"))
        || (hint > 0 && hint > p->honor_retry_after_ms)) {
        finish(e, r, o);
        return;
    }
    if (hint > 0) {
        delay = (double)hint;
    } else {
        delay = st_backoff_delay(p->jitter, p->base_ms[o.cls], p->cap_ms,
                                 (unsigned)r->nattempts, r->prev_delay_ms, &e->rng);
    }
    if (r->deadline_ms > 0 && now + (int64_t)delay >= r->deadline_ms) {
        finish(e, r, o);
        return;
    }
    if (p->budget_enabled && !st_budget_try_withdraw(&r->up->budget, now)) {
        st_outcome exhausted = { o.cls, "budget_exhausted" };
        r->cause = o;
        r->cause_status = status;
        finish(e, r, exhausted);
        return;
    }
    r->prev_delay_ms = delay;
    r->attempts[r->nattempts - 1].delay_ms = delay;
    if (r->stream)
        st_buf_reset(&r->body_buf); /* never handed out: the next attempt starts afresh */
    r->timer.due_ms = now + (int64_t)delay;
    if (!st_timerheap_push(&e->timers, &r->timer)) {
        finish(e, r, o);
        return;
    }
    r->state = ST_REQ_WAITING;
    list_push(&e->waiting, r);
    e->n_retries++;
    if (e->retry_hook) {
        st_retry_info info;
        info.key = r->up->name;
        info.attempt = (unsigned)r->nattempts;
        info.cls = o.cls;
        info.kind = o.kind;
        info.status = status;
        info.delay_ms = delay;
        info.hinted = hint > 0;
        e->retry_hook(e->retry_hook_ud, &info);
    }
}

/* ---- admission: breaker, then limiter, then concurrency ------------------- */

static void fail_now(st_engine *e, st_request *r, const char *kind, st_class cls, const char *detail)
{
    st_outcome o;
    o.cls = cls;
    o.kind = kind;
    attempt_log(r, 0, kind);
    snprintf(r->errbuf, sizeof r->errbuf, "%s", detail);
    finish(e, r, o);
}

/* Starts r's next attempt if its upstream lets it now: the breaker (refusal
 * ends the call at once, sending nothing), then the concurrency cap, then the
 * rate limiter. Returns 1 when r is dealt with (started, or finished with an
 * error), 0 when it has to wait in the queue. */
static int try_start(st_engine *e, st_request *r, int64_t now)
{
    st_upstream *u = r->up;
    int64_t wait, retry_in = 0;

    if (u->breaker_enabled) {
        st_breaker_state before = st_breaker_state_now(&u->breaker);
        int allowed = st_breaker_acquire(&u->breaker, now, &r->permit, &retry_in);
        emit_breaker_change(e, u, before);
        if (!allowed) {
            u->circuit_open++;
            r->retry_after_ms = retry_in > 0 ? retry_in : 1;
            fail_now(e, r, "circuit_open", ST_CLASS_OVERLOADED,
                     "the circuit breaker for this upstream is open; nothing was sent");
            return 1;
        }
    }
    wait = u->in_flight >= st_upstream_cap(u) ? -1 : st_limiter_acquire(&u->limiter, now, r->cost);
    if (wait > e->policy.honor_retry_after_ms || (wait > 0 && r->deadline_ms > 0 && now + wait >= r->deadline_ms)) {
        /* a wait this long (a 429's long pause) is surfaced, not sat through */
        if (u->breaker_enabled)
            st_breaker_release(&u->breaker, now, &r->permit);
        r->retry_after_ms = wait;
        if (wait > e->policy.honor_retry_after_ms)
            fail_now(e, r, "rate_limited", ST_CLASS_THROTTLED,
                     "the upstream is paused by the rate limit longer than honor_retry_after; nothing was sent");
        else
            fail_now(e, r, "total_timeout", ST_CLASS_TIMEOUT,
                     "the rate limit would hold the call past its deadline; nothing was sent");
        return 1;
    }
    if (wait != 0) {
        if (u->breaker_enabled)
            st_breaker_release(&u->breaker, now, &r->permit);
        if (wait > 0 && !r->paced) {
            r->paced = 1;
            u->paced++;
        }
        if (wait > 0 && (u->wake.slot == 0 || u->wake.due_ms > now + wait)) {
            /* the limiter opens at a known time: wake the queue then */
            st_timerheap_remove(&e->timers, &u->wake);
            u->wake.due_ms = now + wait;
            st_timerheap_push(&e->timers, &u->wake);
        }
        return 0;
    }
    u->in_flight++;
    if (!attempt_start(e, r)) {
        u->in_flight--;
        if (u->breaker_enabled)
            st_breaker_release(&u->breaker, now, &r->permit);
        fail_now(e, r, "transport", ST_CLASS_FATAL, "could not start the transfer");
    }
    return 1;
}

/* A request that is new or back from a retry wait: start it, or queue it
 * behind the ones already waiting on its upstream. */
static void admit(st_engine *e, st_request *r, int64_t now)
{
    st_upstream *u = r->up;

    if (u->queued == 0 && try_start(e, r, now))
        return;
    if (u->breaker_enabled && st_breaker_state_now(&u->breaker) == ST_BREAKER_OPEN) {
        /* an open breaker refuses at once even with others queued */
        if (try_start(e, r, now))
            return;
    }
    if (!st_upstream_enqueue(u, &r->qnode, r->priority)) {
        u->queue_full++;
        fail_now(e, r, "queue_full", ST_CLASS_OVERLOADED,
                 "the queue for this upstream is full; nothing was sent");
        return;
    }
    r->state = ST_REQ_QUEUED;
    if (r->deadline_ms > 0) {
        r->timer.due_ms = r->deadline_ms;
        st_timerheap_push(&e->timers, &r->timer);
    }
}

/* Starts queued requests of an upstream, in priority order, while it lets them. */
static void pump(st_engine *e, st_upstream *u, int64_t now)
{
    st_qnode *n;

    while ((n = st_upstream_peek(u)) != NULL) {
        st_request *r = (st_request *)((char *)n - offsetof(st_request, qnode));
        if (!try_start(e, r, now))
            return;
        st_upstream_dequeue(u, n);
        st_timerheap_remove(&e->timers, &r->timer);
    }
}

static st_outcome outcome_of_transport(CURLcode code)
{
    st_outcome o = { ST_CLASS_TRANSIENT, "connection" };

    switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        o.kind = "dns";
        break;
    case CURLE_COULDNT_CONNECT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        break;
    case CURLE_OPERATION_TIMEDOUT:
        /* the only curl timeout we set is the connect one; ours are watchdogs */
        o.cls = ST_CLASS_TIMEOUT;
        o.kind = "connect_timeout";
        break;
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
        o.cls = ST_CLASS_FATAL;
        o.kind = "tls";
        break;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
        o.cls = ST_CLASS_FATAL;
        o.kind = "bad_url";
        break;
    default:
        o.cls = ST_CLASS_FATAL;
        o.kind = "transport";
        break;
    }
    return o;
}

static void record_timings(st_engine *e, st_request *r)
{
    curl_off_t dns = 0, conn = 0, tls = 0, ttfb = 0, total = 0;
    long version = 0, nconn = 0;
    CURL *c = r->easy;

    curl_easy_getinfo(c, CURLINFO_NAMELOOKUP_TIME_T, &dns);
    curl_easy_getinfo(c, CURLINFO_CONNECT_TIME_T, &conn);
    curl_easy_getinfo(c, CURLINFO_APPCONNECT_TIME_T, &tls);
    curl_easy_getinfo(c, CURLINFO_STARTTRANSFER_TIME_T, &ttfb);
    curl_easy_getinfo(c, CURLINFO_TOTAL_TIME_T, &total);
    curl_easy_getinfo(c, CURLINFO_HTTP_VERSION, &version);
    curl_easy_getinfo(c, CURLINFO_NUM_CONNECTS, &nconn);
    /* phases, not curl's cumulative marks; a reused connection has no connect or TLS phase */
    r->timings.dns = dns / 1e6;
    r->timings.connect = conn > dns ? (conn - dns) / 1e6 : 0;
    r->timings.tls = tls > conn ? (tls - conn) / 1e6 : 0;
    r->timings.ttfb = ttfb / 1e6;
    r->timings.total = total / 1e6;
    switch (version) {
    case CURL_HTTP_VERSION_1_0: r->http_version = 10; break;
    case CURL_HTTP_VERSION_1_1: r->http_version = 11; break;
    case CURL_HTTP_VERSION_2_0: r->http_version = 20; break;
    default: r->http_version = 0; break;
    }
    e->n_connections += (uint64_t)nconn;
}

static void collect(st_engine *e)
{
    CURLMsg *m;
    int left;

    while ((m = curl_multi_info_read(e->multi, &left)) != NULL) {
        st_request *r = NULL;
        long status = 0;
        st_outcome o;

        if (m->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        if (r == NULL || r->state != ST_REQ_RUNNING)
            continue;
        record_timings(e, r);
        if (m->data.result == CURLE_OK) {
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
            o = st_outcome_of_status(status);
        } else if (r->too_large || m->data.result == CURLE_FILESIZE_EXCEEDED) {
            o.cls = ST_CLASS_FATAL;
            o.kind = "response_too_large";
            snprintf(r->errbuf, sizeof r->errbuf, "response body exceeds max_response (%lu bytes)",
                     (unsigned long)r->max_response);
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        } else {
            o = outcome_of_transport(m->data.result);
            if (r->errbuf[0] == '\0')
                snprintf(r->errbuf, sizeof r->errbuf, "%s", curl_easy_strerror(m->data.result));
        }
        attempt_done(e, r, o, status);
    }
}

/* Our own timeouts: first byte, idle and the overall deadline. Returns the
 * earliest time one of them can next fire (INT64_MAX when none). */
static int64_t watchdogs(st_engine *e, int64_t now)
{
    int64_t next = INT64_MAX;
    st_request *r = e->running.head;

    while (r) {
        st_request *following = r->next;
        const char *kind = NULL;
        int64_t due = INT64_MAX;

        if (r->rx_bytes != r->rx_seen) { /* bytes came in since the last look */
            r->rx_seen = r->rx_bytes;
            r->last_byte_ms = now;
            r->got_bytes = 1;
        }

        if (r->deadline_ms > 0) {
            due = r->deadline_ms;
            if (now >= due)
                kind = "total_timeout";
        }
        if (kind == NULL && !r->got_bytes && r->first_byte_ms > 0) {
            int64_t d = r->attempt_start_ms + r->first_byte_ms;
            if (now >= d)
                kind = "first_byte_timeout";
            else if (d < due)
                due = d;
        }
        if (kind == NULL && r->got_bytes && r->idle_ms > 0) {
            int64_t d = r->last_byte_ms + r->idle_ms;
            if (now >= d)
                kind = "idle_timeout";
            else if (d < due)
                due = d;
        }
        if (kind != NULL) {
            st_outcome o;
            long status = 0;
            o.cls = ST_CLASS_TIMEOUT;
            o.kind = kind;
            record_timings(e, r);
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
            snprintf(r->errbuf, sizeof r->errbuf, "%s after %.3f s", kind,
                     (now - r->attempt_start_ms) / 1000.0);
            attempt_done(e, r, o, status);
        } else if (due < next) {
            next = due;
        }
        r = following;
    }
    return next;
}

/* Due timers: an upstream whose limiter opens again, a retry wait that is
 * over, or a queued request whose deadline passed. */
static void fire_timers(st_engine *e, int64_t now)
{
    st_timer *t;
    while ((t = st_timerheap_peek(&e->timers)) != NULL && t->due_ms <= now) {
        st_timerheap_remove(&e->timers, t);
        if (t->kind == TIMER_UPSTREAM) {
            pump(e, (st_upstream *)((char *)t - offsetof(st_upstream, wake)), now);
            continue;
        }
        {
            st_request *r = (st_request *)((char *)t - offsetof(st_request, timer));
            if (r->state == ST_REQ_QUEUED) {
                st_upstream_dequeue(r->up, &r->qnode);
                snprintf(r->errbuf, sizeof r->errbuf, "the deadline passed while queued");
                {
                    st_outcome o = { ST_CLASS_TIMEOUT, "total_timeout" };
                    attempt_log(r, 0, o.kind);
                    finish(e, r, o);
                }
            } else {
                list_unlink(r);
                admit(e, r, now);
            }
        }
    }
}

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static int active_count(const st_engine *e)
{
    int n = list_count(&e->running) + list_count(&e->waiting), i;
    const st_upstream *u;
    for (i = 0; i < KEY_BUCKETS; i++)
        for (u = e->keys[i]; u; u = u->next)
            n += (int)u->queued;
    return n;
}

int st_engine_step(st_engine *e, int64_t max_wait_ms)
{
    int still = 0;
    int64_t now = mono_ms(), next, wait;
    long curl_wait = -1;
    st_timer *t;

    fire_timers(e, now);
    curl_multi_perform(e->multi, &still);
    collect(e);
    next = watchdogs(e, mono_ms());

    if (e->done.head == NULL && max_wait_ms > 0 && (e->running.head || st_timerheap_peek(&e->timers))) {
        now = mono_ms();
        wait = max_wait_ms;
        curl_multi_timeout(e->multi, &curl_wait);
        if (curl_wait >= 0)
            wait = min64(wait, curl_wait);
        if ((t = st_timerheap_peek(&e->timers)) != NULL)
            wait = min64(wait, t->due_ms - now);
        if (next != INT64_MAX)
            wait = min64(wait, next - now);
        if (wait > 0)
            curl_multi_poll(e->multi, NULL, 0, (int)min64(wait, 1000000), NULL);
        fire_timers(e, mono_ms());
        curl_multi_perform(e->multi, &still);
        collect(e);
        watchdogs(e, mono_ms());
    }
    return active_count(e);
}

int64_t st_engine_timeout(st_engine *e)
{
    int64_t now = mono_ms(), wait = -1;
    long curl_wait = -1;
    st_timer *t;
    const st_request *r;

    if (e->done.head)
        return 0;
    if (e->running.head) {
        curl_multi_timeout(e->multi, &curl_wait);
        wait = curl_wait;
    }
    if ((t = st_timerheap_peek(&e->timers)) != NULL) {
        int64_t d = t->due_ms - now;
        wait = wait < 0 ? d : min64(wait, d);
    }
    for (r = e->running.head; r; r = r->next) {
        int64_t d = INT64_MAX;
        if (r->deadline_ms > 0)
            d = r->deadline_ms;
        if (!r->got_bytes && r->first_byte_ms > 0)
            d = min64(d, r->attempt_start_ms + r->first_byte_ms);
        if (r->got_bytes && r->idle_ms > 0)
            d = min64(d, r->last_byte_ms + r->idle_ms);
        if (d != INT64_MAX)
            wait = wait < 0 ? d - now : min64(wait, d - now);
    }
    return wait < 0 ? wait : (wait > 0 ? wait : 0);
}

/* ---- requests ------------------------------------------------------------- */

static void request_destroy(st_request *r)
{
    free(r->attempts);
    st_headers_free(&r->headers_in);
    st_buf_free(&r->body_buf);
    free(r);
}

/* Frees what a request asked for; the request itself, with its buffers, is
 * kept for the next one, sparing the allocator on the hot path. */
static void request_release(st_request *r)
{
    st_engine *e = r->eng;

    if (r->easy)
        easy_put(e, r->easy);
    curl_slist_free_all(r->headers);
    free(r->method);
    free(r->url);
    free(r->body);
    if (e->nrequests_pooled == REQUEST_POOL_MAX) {
        request_destroy(r);
        return;
    }
    if (r->body_buf.cap > POOLED_BUF_MAX)
        st_buf_free(&r->body_buf);
    if (r->headers_in.block.cap > POOLED_BUF_MAX)
        st_headers_free(&r->headers_in);
    e->request_pool[e->nrequests_pooled++] = r;
}

/* A zeroed request, reusing a pooled one's buffers when there is one. */
static st_request *request_new(st_engine *e)
{
    st_request *r;
    st_headers raw;
    st_buf body;
    st_attempt *attempts;
    size_t cap_attempts;

    if (e->nrequests_pooled == 0)
        return calloc(1, sizeof(st_request));
    r = e->request_pool[--e->nrequests_pooled];
    raw = r->headers_in;
    body = r->body_buf;
    attempts = r->attempts;
    cap_attempts = r->cap_attempts;
    memset(r, 0, sizeof *r);
    st_headers_reset(&raw);
    st_buf_reset(&body);
    r->headers_in = raw;
    r->body_buf = body;
    r->attempts = attempts;
    r->cap_attempts = cap_attempts;
    return r;
}

st_request *st_engine_submit(st_engine *e, const st_request_spec *spec, char *err, size_t errlen)
{
    st_request *r = request_new(e);
    size_t i;

    if (r == NULL) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    r->eng = e;
    r->retry_after_ms = -1;
    r->method = dup_str(spec->method ? spec->method : "GET");
    r->url = dup_str(spec->url);
    if (spec->body != NULL) {
        r->body = malloc(spec->body_len + 1);
        if (r->body) {
            memcpy(r->body, spec->body, spec->body_len);
            r->body[spec->body_len] = '\0';
        }
        r->body_len = spec->body_len;
    }
    r->easy = easy_get(e);
    if (r->method == NULL || r->url == NULL || r->easy == NULL || (spec->body && r->body == NULL))
        goto oom;
    for (i = 0; i < spec->nheaders; i++) {
        struct curl_slist *l = curl_slist_append(r->headers, spec->headers[i]);
        if (l == NULL)
            goto oom;
        r->headers = l;
    }
    if ((r->up = upstream_get(e, spec->key ? spec->key : "")) == NULL)
        goto oom;
    r->priority = spec->priority;
    r->cost[ST_DIM_REQUESTS] = 1;
    r->cost[ST_DIM_INPUT_TOKENS] = spec->input_tokens;
    r->cost[ST_DIM_OUTPUT_TOKENS] = spec->output_tokens;
    r->cost[ST_DIM_TOKENS] = spec->input_tokens + spec->output_tokens;
    r->connect_ms = spec->connect_ms;
    r->first_byte_ms = spec->first_byte_ms;
    r->idle_ms = spec->idle_ms;
    r->deadline_ms = spec->total_ms > 0 ? mono_ms() + spec->total_ms : 0;
    r->max_response = spec->max_response ? spec->max_response : (size_t)64 << 20;
    r->stream = spec->stream;
    r->auto_commit = spec->stream != ST_STREAM_MANUAL_COMMIT;
    r->max_attempts = spec->attempts ? spec->attempts : e->policy.attempts;
    if (r->max_attempts == 0)
        r->max_attempts = 1;
    easy_setup(r);
    e->n_requests++;
    admit(e, r, mono_ms());
    return r;
oom:
    set_err(err, errlen, "out of memory");
    request_release(r);
    return NULL;
}

void st_engine_cancel(st_engine *e, st_request *r)
{
    static const st_outcome canceled = { ST_CLASS_CANCELED, "canceled" };
    int64_t now = mono_ms();

    if (r->state == ST_REQ_DONE)
        return;
    list_unlink(r);
    st_timerheap_remove(&e->timers, &r->timer);
    if (r->state == ST_REQ_QUEUED)
        st_upstream_dequeue(r->up, &r->qnode);
    attempt_log(r, 0, canceled.kind);
    snprintf(r->errbuf, sizeof r->errbuf, "canceled by the caller");
    if (r->state == ST_REQ_RUNNING) {
        curl_multi_remove_handle(e->multi, r->easy);
        if (r->up->in_flight > 0)
            r->up->in_flight--;
        if (r->up->breaker_enabled)
            st_breaker_release(&r->up->breaker, now, &r->permit);
        finish(e, r, canceled);
        pump(e, r->up, now); /* its place in flight is free */
        return;
    }
    finish(e, r, canceled);
}

st_request *st_engine_take_done(st_engine *e)
{
    st_request *r = e->done.head;
    while (r && r->userdata == NULL)
        r = r->next;
    if (r)
        list_unlink(r);
    return r;
}

st_req_state st_request_state(const st_request *r)
{
    return r->state;
}

const char *st_request_pending_body(const st_request *r, size_t *len)
{
    /* a failed attempt's bytes are not handed out: it may yet be retried, or it ends in an error */
    int usable = r->state == ST_REQ_RUNNING || (r->state == ST_REQ_DONE && r->outcome.kind == NULL);
    *len = r->stream && usable ? r->body_buf.len : 0;
    return r->body_buf.data;
}

void st_request_body_delivered(st_request *r)
{
    if (!r->stream || r->body_buf.len == 0)
        return;
    if (r->auto_commit)
        r->committed = 1;
    r->streamed += r->body_buf.len;
    st_buf_reset(&r->body_buf);
}

void st_request_commit(st_request *r)
{
    r->committed = 1;
}

unsigned st_request_attempt(const st_request *r)
{
    return r->started;
}

void st_engine_fail_attempt(st_engine *e, st_request *r, st_class cls, const char *kind, const char *detail)
{
    st_outcome o;
    int64_t now = mono_ms();

    o.cls = cls;
    o.kind = kind;
    if (r->state == ST_REQ_RUNNING) {
        long status = 0;
        record_timings(e, r);
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        snprintf(r->errbuf, sizeof r->errbuf, "%s", detail);
        attempt_done(e, r, o, status);
    } else if (r->state == ST_REQ_DONE && r->outcome.kind == NULL && r->list == &e->done) {
        /* the transfer ended well but its body says otherwise: judge the attempt again */
        list_unlink(r);
        if (r->nattempts > 0)
            r->attempts[r->nattempts - 1].kind = kind;
        snprintf(r->errbuf, sizeof r->errbuf, "%s", detail);
        retry_or_finish(e, r, o, r->status, -1, now);
    }
}

size_t st_engine_streams(st_engine *e, st_request **out, size_t max)
{
    st_list *lists[2];
    size_t n = 0, i;
    st_request *r;

    lists[0] = &e->running;
    lists[1] = &e->done;
    for (i = 0; i < 2; i++)
        for (r = lists[i]->head; r; r = r->next) {
            size_t len;
            if (r->stream && r->userdata && (st_request_pending_body(r, &len), len > 0)) {
                if (n < max)
                    out[n] = r;
                n++;
            }
        }
    return n;
}

void st_request_set_userdata(st_request *r, void *ud)
{
    r->userdata = ud;
}

void *st_request_userdata(const st_request *r)
{
    return r->userdata;
}

void st_request_result(st_request *r, st_result *out)
{
    memset(out, 0, sizeof *out);
    out->outcome = r->outcome;
    out->status = r->status;
    out->body = r->body_buf.data ? r->body_buf.data : "";
    out->body_len = r->body_buf.len;
    out->headers = r->headers_in.block.data ? r->headers_in.block.data : "";
    out->headers_len = r->headers_in.block.len;
    out->timings = r->timings;
    out->http_version = r->http_version;
    out->attempts = r->attempts;
    out->nattempts = r->nattempts;
    out->detail = r->outcome.kind ? r->errbuf : "";
    out->request_id = r->request_id;
    out->retry_after = r->retry_after_ms > 0 ? r->retry_after_ms / 1000.0 : -1;
    out->committed = r->committed;
    out->cause = r->cause;
    out->cause_status = r->cause_status;
}

void st_request_free(st_request *r)
{
    if (r == NULL)
        return;
    if (r->state != ST_REQ_DONE)
        st_engine_cancel(r->eng, r);
    list_unlink(r);
    request_release(r);
}

/* ---- engine --------------------------------------------------------------- */

void st_retry_policy_defaults(st_retry_policy *p)
{
    int i;

    memset(p, 0, sizeof *p);
    p->attempts = 4;
    p->base_ms[ST_CLASS_THROTTLED] = 1000;
    p->base_ms[ST_CLASS_OVERLOADED] = 2000;
    p->base_ms[ST_CLASS_TRANSIENT] = 500;
    p->base_ms[ST_CLASS_TIMEOUT] = 500;
    p->base_ms[ST_CLASS_FATAL] = 500;
    p->cap_ms = 30000;
    p->jitter = ST_JITTER_FULL;
    p->honor_retry_after_ms = 60000;
    for (i = 0; i < ST_CLASS_COUNT; i++)
        p->retried[i] = (unsigned char)st_class_retried_by_default((st_class)i);
    memset(p->status_retried, -1, sizeof p->status_retried);
    p->budget_enabled = 1;
}

static int copy_config(st_transport_config *dst, const st_transport_config *src)
{
    const char *const *from[] = { &src->ca_file, &src->ca_path, &src->client_cert, &src->client_key,
                                  &src->client_key_password, &src->proxy, &src->no_proxy, &src->user_agent };
    const char **to[] = { &dst->ca_file, &dst->ca_path, &dst->client_cert, &dst->client_key,
                          &dst->client_key_password, &dst->proxy, &dst->no_proxy, &dst->user_agent };
    size_t i;

    memset(dst, 0, sizeof *dst);
    for (i = 0; i < sizeof from / sizeof from[0]; i++) {
        if (*from[i] != NULL && (*to[i] = dup_str(*from[i])) == NULL)
            return 0;
    }
    return 1;
}

static void free_config(st_transport_config *tc)
{
    /* the password is wiped, not only freed: it is a secret */
    if (tc->client_key_password) {
        volatile char *p = (volatile char *)tc->client_key_password;
        while (*p)
            *p++ = 0;
    }
    free((char *)tc->ca_file);
    free((char *)tc->ca_path);
    free((char *)tc->client_cert);
    free((char *)tc->client_key);
    free((char *)tc->client_key_password);
    free((char *)tc->proxy);
    free((char *)tc->no_proxy);
    free((char *)tc->user_agent);
    memset(tc, 0, sizeof *tc);
}

st_engine *st_engine_new(const st_transport_config *tc, const st_retry_policy *rp,
                         const st_upstream_config *uc, uint64_t seed, char *err, size_t errlen)
{
    static int curl_ready = 0;
    st_engine *e;

    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            set_err(err, errlen, "libcurl failed to initialize");
            return NULL;
        }
        curl_ready = 1;
    }
    e = calloc(1, sizeof *e);
    if (e == NULL) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    e->multi = curl_multi_init();
    if (e->multi == NULL || !copy_config(&e->tc, tc)) {
        set_err(err, errlen, "out of memory");
        st_engine_free(e);
        return NULL;
    }
    if (rp)
        e->policy = *rp;
    else
        st_retry_policy_defaults(&e->policy);
    if (uc)
        e->upstream_config = *uc;
    else
        st_upstream_config_defaults(&e->upstream_config);
    st_rng_seed(&e->rng, seed);
    curl_multi_setopt(e->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    return e;
}

size_t st_engine_fds(const st_engine *e, st_fd *out, size_t max)
{
    fd_set rd, wr, ex;
    int maxfd = -1, fd;
    size_t n = 0;

    FD_ZERO(&rd);
    FD_ZERO(&wr);
    FD_ZERO(&ex);
    if (curl_multi_fdset(e->multi, &rd, &wr, &ex, &maxfd) != CURLM_OK)
        return 0;
    for (fd = 0; fd <= maxfd; fd++) {
        int events = (FD_ISSET(fd, &rd) || FD_ISSET(fd, &ex) ? ST_FD_READ : 0)
                   | (FD_ISSET(fd, &wr) ? ST_FD_WRITE : 0);
        if (events == 0)
            continue;
        if (n < max) {
            out[n].fd = fd;
            out[n].events = events;
        }
        n++;
    }
    return n;
}

void st_engine_cancel_all(st_engine *e)
{
    st_request *r;
    int i;
    st_upstream *u;
    st_qnode *n;

    /* queued ones first, so canceling a running one does not start them */
    for (i = 0; i < KEY_BUCKETS; i++)
        for (u = e->keys[i]; u; u = u->next)
            while ((n = st_upstream_peek(u)) != NULL)
                st_engine_cancel(e, (st_request *)((char *)n - offsetof(st_request, qnode)));
    while ((r = e->running.head) != NULL || (r = e->waiting.head) != NULL)
        st_engine_cancel(e, r);
}

void st_engine_set_event_hook(st_engine *e, st_event_hook hook, void *ud)
{
    e->event_hook = hook;
    e->event_hook_ud = ud;
}

void st_engine_set_retry_hook(st_engine *e, st_retry_hook hook, void *ud)
{
    e->retry_hook = hook;
    e->retry_hook_ud = ud;
}

void st_engine_free(st_engine *e)
{
    st_request *r;
    int i;

    if (e == NULL)
        return;
    st_engine_cancel_all(e);
    while ((r = e->done.head) != NULL) {
        list_unlink(r);
        request_release(r);
    }
    for (i = 0; i < e->nrequests_pooled; i++)
        request_destroy(e->request_pool[i]);
    for (i = 0; i < KEY_BUCKETS; i++) {
        st_upstream *u = e->keys[i];
        while (u) {
            st_upstream *next = u->next;
            st_upstream_free(u);
            u = next;
        }
    }
    for (i = 0; i < e->npool; i++)
        curl_easy_cleanup(e->easy_pool[i]);
    if (e->multi)
        curl_multi_cleanup(e->multi);
    st_timerheap_free(&e->timers);
    free_config(&e->tc);
    free(e);
}

void st_engine_stats_get(const st_engine *e, st_engine_stats *out)
{
    out->requests = e->n_requests;
    out->attempts = e->n_attempts;
    out->retries = e->n_retries;
    out->connections = e->n_connections;
    out->running = list_count(&e->running);
    out->waiting = list_count(&e->waiting);
    out->done = list_count(&e->done);
    out->queued = 0;
    {
        int i;
        const st_upstream *u;
        for (i = 0; i < KEY_BUCKETS; i++)
            for (u = e->keys[i]; u; u = u->next)
                out->queued += (int)u->queued;
    }
}
