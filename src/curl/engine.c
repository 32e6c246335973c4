#define _POSIX_C_SOURCE 200809L

#include "engine.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/select.h>
#include <time.h>

#include <curl/curl.h>

#include "buf.h"
#include "headers.h"
#include "timerheap.h"

#define EASY_POOL_MAX 64
#define REQUEST_POOL_MAX 64
#define POOLED_BUF_MAX (256 * 1024) /* larger buffers go back to the system */
#define MAX_SECRETS 8               /* sensitive header values scrubbed from a request's errors */

enum { TIMER_REQUEST = 0, TIMER_UPSTREAM }; /* st_timer.kind */

typedef struct st_list {
    st_request *head, *tail;
    int count;
} st_list;

struct st_request {
    st_call call;              /* the decision core's state of this call */
    st_engine *eng;
    st_request *prev, *next;   /* in running, waiting or done list */
    st_list *list;             /* which one, NULL when none */
    st_timer timer;            /* retry wait, or the deadline while queued */
    st_req_state state;
    CURL *easy;
    void *userdata;

    /* what was asked: method, URL, body and header lines live in `text` */
    st_buf text;
    const char *method, *url, *body;
    size_t body_len;
    struct curl_slist *hdr;    /* nodes owned here (not curl_slist_append), lines in text */
    size_t nhdr, cap_hdr;
    struct { const char *p; size_t len; } secrets[MAX_SECRETS]; /* scrubbed from what an error carries */
    size_t nsecrets;
    st_upstream *up;
    int64_t connect_ms, first_byte_ms, idle_ms;
    size_t max_response;
    int stream;
    int held;                  /* submitted held: waits for st_engine_gate */
    size_t streamed;           /* body bytes of this attempt already handed out */
    unsigned retried;          /* the last attempt a retry was planned after (0: none) */

    /* the attempt under way */
    int64_t attempt_start_ms, last_byte_ms;
    uint64_t rx_bytes, rx_seen; /* received, and as of last_byte_ms: callbacks read no clock */
    int got_bytes, too_large, head_too_large, bad_status;
    st_headers head;           /* of the latest response */
    st_buf body_buf;
    char errbuf[CURL_ERROR_SIZE];

    /* across attempts */
    st_attempt *attempts;
    size_t nattempts, cap_attempts;
    char request_id[128];

    /* the outcome */
    st_outcome outcome;
    long status;
    int from_status, retryable;
    const char *stop;
    st_timings timings;
    int http_version;
    uint64_t spend_id;         /* the parked spend reservation once handed out */
};

typedef struct st_notices {
    st_notice *items;
    size_t head, len, cap;     /* a ring */
} st_notices;

struct st_engine {
    CURLM *multi;
    st_transport_config tc;     /* strings owned */
    st_decider decider;
    st_timerheap timers;
    st_list running, waiting, done;
    CURL *easy_pool[EASY_POOL_MAX];
    int npool;
    st_request *request_pool[REQUEST_POOL_MAX]; /* released requests, buffers kept */
    int nrequests_pooled;
    st_notices notices;
    int want_retries, want_events;
    uint64_t n_requests, n_attempts, n_retries, n_connections;
};

static const st_outcome CANCELED = { ST_CLASS_CANCELED, "canceled" };

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

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
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

static st_request *request_of_call(st_call *c)
{
    return (st_request *)((char *)c - offsetof(st_request, call));
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
    l->count++;
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
    l->count--;
}

/* ---- notices -------------------------------------------------------------- */

static st_notice *notice_add(st_engine *e, st_notice_type type)
{
    st_notices *q = &e->notices;
    st_notice *n;

    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 16, i;
        st_notice *items = malloc(cap * sizeof *items);
        if (items == NULL)
            return NULL; /* out of memory: the notice is lost, never the request */
        for (i = 0; i < q->len; i++)
            items[i] = q->items[(q->head + i) % q->cap];
        free(q->items);
        q->items = items;
        q->cap = cap;
        q->head = 0;
    }
    n = &q->items[(q->head + q->len) % q->cap];
    q->len++;
    memset(n, 0, sizeof *n);
    n->type = type;
    return n;
}

int st_engine_take_notice(st_engine *e, st_notice *out)
{
    st_notices *q = &e->notices;
    if (q->len == 0)
        return 0;
    *out = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->len--;
    return 1;
}

static void queue_events(st_engine *e, const st_events *ev)
{
    unsigned i;
    if (!e->want_events)
        return;
    for (i = 0; i < ev->n; i++) {
        st_notice *n = notice_add(e, ST_NOTICE_EVENT);
        if (n)
            n->event = ev->ev[i];
    }
}

/* ---- response ------------------------------------------------------------- */

static size_t on_header(char *data, size_t size, size_t n, void *ud)
{
    st_request *r = ud;
    size_t len = size * n;
    int rc;

    r->rx_bytes += len;
    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        /* a new response (after 100-continue or a proxy's CONNECT): forget the last one */
        if (!st_status_line_parse(data, len, NULL, NULL)) {
            r->bad_status = 1;
            return 0;
        }
        st_headers_reset(&r->head);
        return len;
    }
    rc = st_headers_add_line(&r->head, data, len);
    if (rc == ST_HEADERS_TOO_LARGE || rc == ST_HEADERS_NOMEM) {
        r->head_too_large = 1;
        return 0;
    }
    return len; /* a malformed line is skipped, as libcurl itself let it through */
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

/* ---- easy handles --------------------------------------------------------- */

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
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, r->nhdr ? r->hdr : NULL);
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

/* ---- attempts ------------------------------------------------------------- */

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
    memset(&r->attempts[r->nattempts], 0, sizeof r->attempts[0]);
    r->attempts[r->nattempts].status = status;
    r->attempts[r->nattempts].kind = kind;
    r->nattempts++;
    return 1;
}

/* The bytes secret s (n bytes) covers where p (len bytes) starts with it, a
 * '/' of it perhaps JSON-escaped, once or more ("\/", "\\\/": lua-cjson escapes
 * '/', and a server may quote JSON within JSON); 0 if it is not there. */
static size_t secret_at(const char *p, size_t len, const char *s, size_t n)
{
    size_t i = 0, k;
    for (k = 0; k < n; k++) {
        if (s[k] == '/')
            while (i < len && p[i] == '\\')
                i++;
        if (i >= len || p[i] != s[k])
            return 0;
        i++;
    }
    return i;
}

/* Masks every secret the request carries wherever it shows in what an error
 * hands out (an echoing server puts it in the body). In place. */
static void scrub(st_request *r, char *p, size_t len)
{
    size_t i, m;
    for (i = 0; i < r->nsecrets; i++) {
        const char *s = r->secrets[i].p;
        size_t n = r->secrets[i].len, at;
        if (n < 4 || n > len)
            continue; /* too short to scrub without mangling ordinary text */
        for (at = 0; at + n <= len; at++)
            if ((p[at] == s[0] || p[at] == '\\') && (m = secret_at(p + at, len - at, s, n)) > 0) {
                memset(p + at, '*', m);
                at += m - 1;
            }
    }
}

static void finish(st_engine *e, st_request *r, st_outcome o)
{
    r->outcome = o;
    r->state = ST_REQ_DONE;
    if (o.kind != NULL && r->nsecrets) {
        scrub(r, r->body_buf.data, r->body_buf.len);
        scrub(r, r->head.block.data, r->head.block.len);
        scrub(r, r->errbuf, strlen(r->errbuf));
    }
    list_push(&e->done, r);
}

static void fail_now(st_engine *e, st_request *r, const st_admission *a)
{
    attempt_log(r, 0, a->refusal.kind);
    snprintf(r->errbuf, sizeof r->errbuf, "%s", a->detail ? a->detail : "");
    finish(e, r, a->refusal);
}

static void attempt_start(st_engine *e, st_request *r, int64_t now)
{
    r->attempt_start_ms = now;
    r->last_byte_ms = now;
    r->rx_bytes = r->rx_seen = 0;
    r->got_bytes = 0;
    r->too_large = r->head_too_large = r->bad_status = 0;
    r->errbuf[0] = '\0';
    r->streamed = 0;
    st_headers_reset(&r->head);
    st_buf_reset(&r->body_buf);
    if (curl_multi_add_handle(e->multi, r->easy) != CURLM_OK) {
        st_admission a;
        st_events ev;
        ev.n = ev.dropped = 0;
        st_release(&e->decider, r->up, &r->call, now, &ev);
        queue_events(e, &ev);
        memset(&a, 0, sizeof a);
        a.refusal.cls = ST_CLASS_FATAL;
        a.refusal.kind = "transport";
        a.detail = "could not start the transfer";
        fail_now(e, r, &a);
        return;
    }
    r->state = ST_REQ_RUNNING;
    list_push(&e->running, r);
    e->n_attempts++;
}

static void schedule_wake(st_engine *e, st_upstream *u, int64_t wake_ms)
{
    if (wake_ms <= 0 || (u->wake.slot != 0 && u->wake.due_ms <= wake_ms))
        return;
    st_timerheap_remove(&e->timers, &u->wake);
    u->wake.kind = TIMER_UPSTREAM;
    u->wake.due_ms = wake_ms;
    st_timerheap_push(&e->timers, &u->wake);
}

/* Starts queued calls of an upstream, in priority order, while it lets them. */
static void pump(st_engine *e, st_upstream *u, int64_t now)
{
    st_admission a;
    st_events ev;
    st_call *c;

    ev.n = ev.dropped = 0;
    while ((c = st_pump(&e->decider, u, now, &a, &ev)) != NULL) {
        st_request *r = request_of_call(c);
        st_timerheap_remove(&e->timers, &r->timer);
        if (a.verdict == ST_ADMIT_START)
            attempt_start(e, r, now);
        else
            fail_now(e, r, &a);
        queue_events(e, &ev);
        ev.n = 0;
    }
    queue_events(e, &ev);
    schedule_wake(e, u, a.wake_ms);
}

/* A request that is new or back from a retry wait asks the core to start. */
static void admit(st_engine *e, st_request *r, int64_t now)
{
    st_admission a;
    st_events ev;

    ev.n = ev.dropped = 0;
    st_admit(&e->decider, r->up, &r->call, now, &a, &ev);
    queue_events(e, &ev);
    switch (a.verdict) {
    case ST_ADMIT_START:
        attempt_start(e, r, now);
        break;
    case ST_ADMIT_REFUSED:
        fail_now(e, r, &a);
        break;
    case ST_ADMIT_QUEUED:
        r->state = ST_REQ_QUEUED;
        if (r->call.deadline_ms > 0) {
            r->timer.kind = TIMER_REQUEST;
            r->timer.due_ms = r->call.deadline_ms;
            st_timerheap_push(&e->timers, &r->timer);
        }
        schedule_wake(e, r->up, a.wake_ms);
        break;
    }
}

static void keep_request_id(st_request *r)
{
    const char *id = st_headers_known(&r->head, ST_H_REQUEST_ID);
    if (id == NULL)
        id = st_headers_known(&r->head, ST_H_X_REQUEST_ID);
    if (id != NULL)
        snprintf(r->request_id, sizeof r->request_id, "%s", id);
}

static uint64_t seconds_to_us(double s)
{
    return s > 0 && s < 1e12 ? (uint64_t)(s * 1e6) : 0;
}

/* After an attempt ended (or its body was judged a failure): finish, or wait
 * and try again, as the core decides. */
static void decide(st_engine *e, st_request *r, st_outcome o, long status, int64_t now)
{
    st_attempt_end a;
    st_retry_decision d;

    a.outcome = o;
    a.status = status;
    a.headers = status > 0 ? &r->head : NULL;
    a.ttfb_us = seconds_to_us(r->timings.ttfb);
    a.total_us = seconds_to_us(r->timings.total);
    st_retry_decide(&e->decider, r->up, &r->call, &a, now, &d);
    r->retryable = d.retryable;
    r->stop = d.stop;
    if (!d.retry) {
        finish(e, r, o);
        return;
    }
    if (r->nattempts > 0) {
        r->attempts[r->nattempts - 1].delay_ms = d.delay_ms;
        r->attempts[r->nattempts - 1].hinted = d.hinted;
    }
    if (r->stream)
        st_buf_reset(&r->body_buf); /* never handed out: the next attempt starts afresh */
    r->timer.kind = TIMER_REQUEST;
    r->timer.due_ms = now + (int64_t)d.delay_ms;
    if (!st_timerheap_push(&e->timers, &r->timer)) {
        finish(e, r, o);
        return;
    }
    r->state = ST_REQ_WAITING;
    r->retried = r->call.attempts;
    list_push(&e->waiting, r);
    e->n_retries++;
    if (e->want_retries) {
        st_notice *n = notice_add(e, ST_NOTICE_RETRY);
        if (n) {
            n->retry.key = r->up->name;
            n->retry.attempt = r->call.attempts;
            n->retry.cls = o.cls;
            n->retry.kind = o.kind;
            n->retry.status = status;
            n->retry.delay_ms = d.delay_ms;
            n->retry.hinted = d.hinted;
            n->retry.request = r;
        }
    }
}

/* An attempt ended with outcome o: report it, free its place, decide. */
static void attempt_done(st_engine *e, st_request *r, st_outcome o, long status, int from_status, int64_t now)
{
    st_attempt_end a;
    st_events ev;

    list_unlink(r);
    curl_multi_remove_handle(e->multi, r->easy);
    r->status = status;
    r->from_status = from_status;
    keep_request_id(r);
    if (attempt_log(r, status, o.kind)) {
        r->attempts[r->nattempts - 1].ttfb = r->timings.ttfb;
        r->attempts[r->nattempts - 1].total = r->timings.total;
    }
    a.outcome = o;
    a.status = status;
    a.headers = status > 0 ? &r->head : NULL;
    a.ttfb_us = seconds_to_us(r->timings.ttfb);
    a.total_us = seconds_to_us(r->timings.total);
    ev.n = ev.dropped = 0;
    st_report(&e->decider, r->up, &r->call, &a, now, status > 0 ? wall_ms() : 0, &ev);
    queue_events(e, &ev);
    pump(e, r->up, now);
    decide(e, r, o, status, now);
}

static st_outcome outcome_of_transport(st_request *r, CURLcode code)
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
    case CURLE_WEIRD_SERVER_REPLY:
        o.cls = ST_CLASS_FATAL;
        o.kind = "bad_response";
        break;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL: {
        /* libcurl says the same of a status line it cannot read ("HTTP/1.1 abc",
         * "000"), which never reaches on_header: once the request went out, the
         * server answered */
        long sent = 0;
        curl_easy_getinfo(r->easy, CURLINFO_REQUEST_SIZE, &sent);
        o.cls = ST_CLASS_FATAL;
        o.kind = r->rx_bytes > 0 || sent > 0 ? "bad_response" : "bad_url";
        break;
    }
    case CURLE_OUT_OF_MEMORY:
        /* libcurl refuses a header line above its limit (100 KiB) this way, and
         * says nothing in the error buffer: the head had begun, no body yet */
        o.cls = ST_CLASS_FATAL;
        o.kind = "transport";
        if (r->rx_bytes > 0 && r->body_buf.len == 0 && r->streamed == 0) {
            o.kind = "bad_response";
            snprintf(r->errbuf, sizeof r->errbuf, "a response header line is too long");
        }
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

static void collect(st_engine *e, int64_t now)
{
    CURLMsg *m;
    int left;

    while ((m = curl_multi_info_read(e->multi, &left)) != NULL) {
        st_request *r = NULL;
        long status = 0;
        int from_status = 0;
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
            from_status = 1;
        } else if (r->too_large || m->data.result == CURLE_FILESIZE_EXCEEDED) {
            o.cls = ST_CLASS_FATAL;
            o.kind = "response_too_large";
            snprintf(r->errbuf, sizeof r->errbuf, "response body exceeds max_response (%lu bytes)",
                     (unsigned long)r->max_response);
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        } else if (r->bad_status || r->head_too_large) {
            o.cls = ST_CLASS_FATAL;
            o.kind = "bad_response";
            snprintf(r->errbuf, sizeof r->errbuf, "%s", r->bad_status ? "malformed status line"
                     : "response head too large");
        } else {
            o = outcome_of_transport(r, m->data.result);
            if (r->errbuf[0] == '\0')
                snprintf(r->errbuf, sizeof r->errbuf, "%s", curl_easy_strerror(m->data.result));
            if (o.kind[0] == 'b') /* bad_response: what it received says more than the code */
                curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        }
        attempt_done(e, r, o, status, from_status, now);
    }
}

/* Our own timeouts: first byte, idle and the overall deadline. Returns the
 * earliest time one of them can next fire (INT64_MAX when none). No hook runs
 * here, so the next request stays valid across attempt_done. */
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
        if (r->call.deadline_ms > 0) {
            due = r->call.deadline_ms;
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
            snprintf(r->errbuf, sizeof r->errbuf, "%s after %.3f s", kind, (now - r->attempt_start_ms) / 1000.0);
            attempt_done(e, r, o, status, 0, now);
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
        st_request *r;
        st_timerheap_remove(&e->timers, t);
        if (t->kind == TIMER_UPSTREAM) {
            pump(e, (st_upstream *)((char *)t - offsetof(st_upstream, wake)), now);
            continue;
        }
        r = (st_request *)((char *)t - offsetof(st_request, timer));
        if (r->state == ST_REQ_QUEUED) {
            static const st_outcome expired = { ST_CLASS_TIMEOUT, "total_timeout" };
            st_unqueue(r->up, &r->call);
            attempt_log(r, 0, expired.kind);
            snprintf(r->errbuf, sizeof r->errbuf, "the deadline passed while queued");
            finish(e, r, expired);
        } else if (r->state == ST_REQ_WAITING) {
            list_unlink(r);
            admit(e, r, now);
        }
    }
}

int st_engine_ready(st_engine *e)
{
    return e->notices.len > 0 || e->done.count > 0 || st_engine_streams(e, NULL, 0) > 0;
}

int st_engine_active(const st_engine *e)
{
    int n = e->running.count + e->waiting.count, i;
    const st_upstream *u;
    for (i = 0; i < ST_KEY_BUCKETS; i++)
        for (u = e->decider.keys[i]; u; u = u->next)
            n += (int)u->queued;
    return n;
}

int st_engine_step(st_engine *e, int64_t max_wait_ms)
{
    int still = 0;
    int64_t now = mono_ms(), next;

    fire_timers(e, now);
    curl_multi_perform(e->multi, &still);
    collect(e, now);
    next = watchdogs(e, now);

    if (e->done.count == 0 && e->notices.len == 0 && max_wait_ms > 0
        && (e->running.head || st_timerheap_peek(&e->timers))) {
        int64_t wait = max_wait_ms;
        long curl_wait = -1;
        st_timer *t;
        curl_multi_timeout(e->multi, &curl_wait);
        if (curl_wait >= 0)
            wait = min64(wait, curl_wait);
        if ((t = st_timerheap_peek(&e->timers)) != NULL)
            wait = min64(wait, t->due_ms - now);
        if (next != INT64_MAX)
            wait = min64(wait, next - now);
        if (wait > 0)
            curl_multi_poll(e->multi, NULL, 0, (int)min64(wait, 1000000), NULL);
        now = mono_ms();
        fire_timers(e, now);
        curl_multi_perform(e->multi, &still);
        collect(e, now);
        watchdogs(e, now);
    }
    return st_engine_active(e);
}

int64_t st_engine_timeout(st_engine *e)
{
    int64_t now = mono_ms(), wait = -1;
    long curl_wait = -1;
    st_timer *t;
    const st_request *r;

    if (e->done.head || e->notices.len)
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
        if (r->call.deadline_ms > 0)
            d = r->call.deadline_ms;
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
    free(r->hdr);
    st_buf_free(&r->text);
    st_headers_free(&r->head);
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
    r->easy = NULL;
    if (e->nrequests_pooled == REQUEST_POOL_MAX) {
        request_destroy(r);
        return;
    }
    if (r->body_buf.cap > POOLED_BUF_MAX)
        st_buf_free(&r->body_buf);
    if (r->text.cap > POOLED_BUF_MAX)
        st_buf_free(&r->text);
    if (r->head.block.cap > POOLED_BUF_MAX)
        st_headers_free(&r->head);
    e->request_pool[e->nrequests_pooled++] = r;
}

/* A zeroed request, reusing a pooled one's buffers when there is one. */
static st_request *request_new(st_engine *e)
{
    st_request *r;
    st_headers head;
    st_buf body, text;
    st_attempt *attempts;
    struct curl_slist *hdr;
    size_t cap_attempts, cap_hdr;

    if (e->nrequests_pooled == 0)
        return calloc(1, sizeof(st_request));
    r = e->request_pool[--e->nrequests_pooled];
    head = r->head;
    body = r->body_buf;
    text = r->text;
    attempts = r->attempts;
    cap_attempts = r->cap_attempts;
    hdr = r->hdr;
    cap_hdr = r->cap_hdr;
    memset(r, 0, sizeof *r);
    st_headers_reset(&head);
    st_buf_reset(&body);
    st_buf_reset(&text);
    r->head = head;
    r->body_buf = body;
    r->text = text;
    r->attempts = attempts;
    r->cap_attempts = cap_attempts;
    r->hdr = hdr;
    r->cap_hdr = cap_hdr;
    return r;
}

static int is_secret_header(const char *line, size_t name_len)
{
    static const char *const names[] = { "authorization", "proxy-authorization", "x-api-key", "api-key",
                                         "x-goog-api-key", "cookie", NULL };
    size_t i;
    for (i = 0; names[i]; i++)
        if (strlen(names[i]) == name_len && strncasecmp(line, names[i], name_len) == 0)
            return 1;
    return 0;
}

static void add_secret(st_request *r, const char *p, size_t len)
{
    if (r->nsecrets < MAX_SECRETS && len > 0) {
        r->secrets[r->nsecrets].p = p;
        r->secrets[r->nsecrets].len = len;
        r->nsecrets++;
    }
}

static int hex_digit(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* What libcurl sends for a URL's userinfo: base64 of "user:password",
 * percent-decoded ("user:" when there is no password), as in its Authorization
 * header, which an echoing server shows. out has room for 4 * (n + 3) / 3 bytes;
 * returns the length written. */
static size_t basic_credentials(const char *u, size_t n, char *out)
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char grp[3];
    size_t i = 0, len = 0, g = 0;
    int colon = 0;

    while (i < n || !colon) {
        unsigned char c;
        if (i == n) {
            c = ':';
            colon = 1;
        } else if (u[i] == '%' && i + 2 < n && hex_digit(u[i + 1]) >= 0 && hex_digit(u[i + 2]) >= 0) {
            c = (unsigned char)(hex_digit(u[i + 1]) * 16 + hex_digit(u[i + 2]));
            i += 3;
        } else {
            c = (unsigned char)u[i++];
            colon |= c == ':';
        }
        grp[g++] = c;
        if (g == 3 || (i == n && colon)) {
            size_t k;
            char quad[4];
            for (k = g; k < 3; k++)
                grp[k] = 0;
            quad[0] = b64[grp[0] >> 2];
            quad[1] = b64[((grp[0] & 3) << 4) | (grp[1] >> 4)];
            quad[2] = g > 1 ? b64[((grp[1] & 15) << 2) | (grp[2] >> 6)] : '=';
            quad[3] = g > 2 ? b64[grp[2] & 63] : '=';
            memcpy(out + len, quad, 4);
            len += 4;
            g = 0;
        }
    }
    return len;
}

/* "scheme://user:password@host/...": the userinfo is a credential, and so is
 * the Basic form libcurl sends of it. The text buffer has room for that form. */
static void add_url_userinfo(st_request *r)
{
    const char *start = strstr(r->url, "://"), *end;
    if (start == NULL)
        return;
    start += 3;
    end = start + strcspn(start, "/?#@");
    if (*end == '@') {
        char *basic = r->text.data + r->text.len;
        size_t n = basic_credentials(start, (size_t)(end - start), basic);
        r->text.len += n;
        add_secret(r, start, (size_t)(end - start));
        add_secret(r, basic, n);
    }
}

/* Copies method, URL, body and header lines into the request's one text
 * buffer, and links the header lines as libcurl's list. */
static int request_copy(st_request *r, const st_request_spec *spec)
{
    const char *method = spec->method ? spec->method : "GET";
    size_t lens[3], total = 0, i, off;
    const char *parts[3];
    size_t nlines = spec->nheaders;

    parts[0] = method;
    lens[0] = strlen(method);
    parts[1] = spec->url;
    lens[1] = strlen(spec->url);
    parts[2] = spec->body;
    lens[2] = spec->body ? spec->body_len : 0;
    for (i = 0; i < 3; i++)
        total += lens[i] + 1;
    total += 4 * (lens[1] + 3) / 3; /* the Basic form of a userinfo (add_url_userinfo) */
    for (i = 0; i < nlines; i++)
        total += strlen(spec->headers[i]) + 1;
    st_buf_reset(&r->text);
    if (!st_buf_reserve(&r->text, total))
        return 0;
    if (nlines > r->cap_hdr) {
        struct curl_slist *h = realloc(r->hdr, nlines * sizeof *h);
        if (h == NULL)
            return 0;
        r->hdr = h;
        r->cap_hdr = nlines;
    }
    for (i = 0; i < 3; i++) {
        if (parts[i] != NULL && lens[i])
            memcpy(r->text.data + r->text.len, parts[i], lens[i]);
        r->text.data[r->text.len + lens[i]] = '\0';
        r->text.len += lens[i] + 1;
    }
    r->method = r->text.data;
    r->url = r->text.data + lens[0] + 1;
    r->body = spec->body ? r->url + lens[1] + 1 : NULL;
    r->body_len = lens[2];
    r->nsecrets = 0;
    for (i = 0; i < nlines; i++) {
        size_t n = strlen(spec->headers[i]);
        const char *colon;
        off = r->text.len;
        memcpy(r->text.data + off, spec->headers[i], n + 1);
        r->text.len += n + 1;
        r->hdr[i].data = r->text.data + off;
        r->hdr[i].next = i + 1 < nlines ? &r->hdr[i + 1] : NULL;
        colon = strchr(r->hdr[i].data, ':');
        if (colon && is_secret_header(r->hdr[i].data, (size_t)(colon - r->hdr[i].data))) {
            const char *v = colon + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            if (strncasecmp(v, "Bearer ", 7) == 0)
                v += 7;
            add_secret(r, v, strlen(v));
        }
    }
    r->nhdr = nlines;
    add_url_userinfo(r);
    return 1;
}

st_request *st_engine_submit(st_engine *e, const st_request_spec *spec, char *err, size_t errlen)
{
    st_request *r = request_new(e);
    int64_t now = mono_ms();

    if (r == NULL) {
        set_err(err, errlen, "out of memory");
        return NULL;
    }
    r->eng = e;
    r->easy = easy_get(e);
    if (r->easy == NULL || !request_copy(r, spec)
        || (r->up = st_decider_upstream(&e->decider, spec->key ? spec->key : "", now)) == NULL) {
        set_err(err, errlen, "out of memory");
        request_release(r);
        return NULL;
    }
    st_call_init(&r->call, &e->decider, now, spec->total_ms, spec->attempts, spec->priority,
                 spec->input_tokens, spec->output_tokens);
    st_call_spend_init(&e->decider, r->up, &r->call, spec->tag, spec->reserve_usd, spec->reserve_tokens, now);
    r->connect_ms = spec->connect_ms;
    r->first_byte_ms = spec->first_byte_ms;
    r->idle_ms = spec->idle_ms;
    r->max_response = spec->max_response ? spec->max_response : (size_t)64 << 20;
    r->stream = spec->stream;
    easy_setup(r);
    e->n_requests++;
    if (spec->held) {
        /* its place in a shared limit comes first; st_engine_gate admits it */
        r->held = 1;
        r->state = ST_REQ_WAITING;
        list_push(&e->waiting, r);
        return r;
    }
    admit(e, r, now);
    return r;
}

int st_engine_cancel(st_engine *e, st_request *r)
{
    int64_t now;
    st_events ev;
    st_req_state was = r->state;

    if (was == ST_REQ_DONE)
        return 0;
    now = mono_ms();
    list_unlink(r);
    st_timerheap_remove(&e->timers, &r->timer);
    if (was == ST_REQ_RUNNING)
        curl_multi_remove_handle(e->multi, r->easy);
    ev.n = ev.dropped = 0;
    st_release(&e->decider, r->up, &r->call, now, &ev);
    queue_events(e, &ev);
    attempt_log(r, 0, CANCELED.kind);
    snprintf(r->errbuf, sizeof r->errbuf, "canceled by the caller");
    finish(e, r, CANCELED);
    if (was == ST_REQ_RUNNING)
        pump(e, r->up, now); /* its place in flight is free */
    return 1;
}

/* The call is over for good: its spend reservation parks (billed) or goes back. */
static void spend_end(st_engine *e, st_request *r)
{
    st_events ev;
    ev.n = ev.dropped = 0;
    r->spend_id = st_call_spend_end(&e->decider, r->up, &r->call, r->status, mono_ms(), &ev);
    queue_events(e, &ev);
}

st_request *st_engine_take_done(st_engine *e)
{
    st_request *r = e->done.head;
    while (r && r->userdata == NULL)
        r = r->next;
    if (r) {
        list_unlink(r);
        spend_end(e, r);
    }
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
    if (r->stream == ST_STREAM_AUTO)
        r->call.committed = 1;
    r->streamed += r->body_buf.len;
    st_buf_reset(&r->body_buf);
}

void st_request_commit(st_request *r)
{
    r->call.committed = 1;
}

unsigned st_request_attempt(const st_request *r)
{
    return r->call.attempts;
}

int st_request_current(const st_request *r, unsigned attempt)
{
    return attempt == r->call.attempts && attempt != r->retried
        && (r->state == ST_REQ_RUNNING || r->state == ST_REQ_DONE);
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
        attempt_done(e, r, o, status, 0, now);
    } else if (r->state == ST_REQ_DONE && r->outcome.kind == NULL && r->list == &e->done) {
        /* the transfer ended well but its body says otherwise: judge the attempt again */
        list_unlink(r);
        if (r->nattempts > 0)
            r->attempts[r->nattempts - 1].kind = kind;
        snprintf(r->errbuf, sizeof r->errbuf, "%s", detail);
        r->from_status = 0;
        decide(e, r, o, r->status, now);
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
    out->from_status = r->from_status;
    out->body = r->body_buf.data ? r->body_buf.data : "";
    out->body_len = r->body_buf.len;
    out->headers = r->head.block.data ? r->head.block.data : "";
    out->headers_len = r->head.block.len;
    out->timings = r->timings;
    out->http_version = r->http_version;
    out->attempts = r->attempts;
    out->nattempts = r->nattempts;
    out->detail = r->outcome.kind ? r->errbuf : "";
    out->request_id = r->request_id;
    out->key = r->up->name;
    out->retry_after = r->call.retry_after_ms > 0 ? r->call.retry_after_ms / 1000.0 : -1;
    out->committed = r->call.committed;
    out->retryable = r->retryable;
    out->stop = r->stop;
    out->spend_id = r->spend_id;
}

int64_t st_request_deadline_left(const st_request *r)
{
    int64_t left;
    if (r->call.deadline_ms <= 0)
        return -1;
    left = r->call.deadline_ms - mono_ms();
    return left > 0 ? left : 0;
}

uint64_t st_request_received(const st_request *r)
{
    return r->state == ST_REQ_RUNNING ? r->rx_bytes : 0;
}

int64_t st_request_hedge_plan(st_engine *e, st_request *r, const st_hedge_policy *p)
{
    return st_hedge_plan(&e->decider, r->up, &r->call, p, mono_ms());
}

int st_request_hedge_admit(st_engine *e, st_request *r, const char *hedge_key, const st_hedge_policy *p,
                           const char **why)
{
    int64_t now = mono_ms();
    st_upstream *h = hedge_key ? st_decider_upstream(&e->decider, hedge_key, now) : r->up;
    if (h == NULL) {
        *why = "memory";
        return 0;
    }
    return st_hedge_admit(&e->decider, r->up, h, &r->call, p, now, why);
}

void st_engine_cancel_lost(st_engine *e, st_request *r)
{
    if (r->state == ST_REQ_RUNNING && r->rx_bytes == 0) {
        int64_t now = mono_ms();
        st_hedge_lost(r->up, now, now - r->attempt_start_ms);
    }
    st_engine_cancel(e, r);
}

void st_request_free(st_request *r)
{
    if (r == NULL)
        return;
    if (r->state != ST_REQ_DONE)
        st_engine_cancel(r->eng, r);
    spend_end(r->eng, r); /* nobody will settle it: a billed one is charged in full when due */
    list_unlink(r);
    request_release(r);
}

/* ---- engine --------------------------------------------------------------- */

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
    st_decider_init(&e->decider, rp, uc, seed);
    e->multi = curl_multi_init();
    if (e->multi == NULL || !copy_config(&e->tc, tc)) {
        set_err(err, errlen, "out of memory");
        st_engine_free(e);
        return NULL;
    }
    curl_multi_setopt(e->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    return e;
}

void st_engine_want_notices(st_engine *e, int retries, int events)
{
    e->want_retries = retries;
    e->want_events = events;
}

st_decider *st_engine_decider(st_engine *e)
{
    return &e->decider;
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

static void cancel_queued(void *ud, st_upstream *u)
{
    st_engine *e = ud;
    st_qnode *n;
    while ((n = st_upstream_peek(u)) != NULL)
        st_engine_cancel(e, request_of_call((st_call *)n));
}

void st_engine_cancel_all(st_engine *e)
{
    st_request *r;

    /* queued ones first, so canceling a running one does not start them */
    st_decider_each(&e->decider, cancel_queued, e);
    while ((r = e->running.head) != NULL || (r = e->waiting.head) != NULL)
        st_engine_cancel(e, r);
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
    st_decider_free(&e->decider);
    for (i = 0; i < e->npool; i++)
        curl_easy_cleanup(e->easy_pool[i]);
    if (e->multi)
        curl_multi_cleanup(e->multi);
    st_timerheap_free(&e->timers);
    free(e->notices.items);
    free_config(&e->tc);
    free(e);
}

static void count_queued(void *ud, st_upstream *u)
{
    *(int *)ud += (int)u->queued;
}

/* ---- the fleet scope ------------------------------------------------------ */

int st_engine_gate(st_engine *e, st_request *r, int64_t wait_ms)
{
    int64_t now = mono_ms();

    if (r->state == ST_REQ_QUEUED) {
        /* already in its key's queue: the place holds it back from there */
        st_call_not_before(&r->call, now, wait_ms);
        pump(e, r->up, now);
        return 1;
    }
    if (r->state != ST_REQ_WAITING)
        return 0;
    st_call_not_before(&r->call, now, wait_ms);
    if (r->held) {
        r->held = 0;
        list_unlink(r);
        admit(e, r, now);
    }
    return 1;
}

int64_t st_request_max_wait(const st_request *r, int64_t at_ms)
{
    return st_call_max_wait_ms(&r->eng->decider, &r->call, mono_ms() + at_ms);
}

int st_request_held(const st_request *r)
{
    return r->held;
}

const double *st_request_cost(const st_request *r)
{
    return r->call.cost;
}

int st_engine_open_until(st_engine *e, const char *key, int64_t until_ms)
{
    int64_t now = mono_ms();
    st_upstream *u = st_decider_upstream(&e->decider, key, now);
    st_events ev;

    if (u == NULL)
        return 0;
    ev.n = ev.dropped = 0;
    st_fleet_open_until(u, now, until_ms, &ev);
    queue_events(e, &ev);
    return 1;
}

int st_engine_fleet_window(st_engine *e, const char *key, uint64_t calls, uint64_t failures, uint64_t slow)
{
    int64_t now = mono_ms();
    st_upstream *u = st_decider_upstream(&e->decider, key, now);
    st_events ev;
    int opened;

    if (u == NULL)
        return 0;
    ev.n = ev.dropped = 0;
    opened = st_fleet_window(u, now, calls, failures, slow, &ev);
    queue_events(e, &ev);
    return opened;
}

int st_engine_share(st_engine *e, const char *key, double n)
{
    int64_t now = mono_ms();
    st_upstream *u = st_decider_upstream(&e->decider, key, now);

    if (u == NULL)
        return 0;
    st_fleet_share(u, now, n);
    pump(e, u, now); /* a larger share may let queued calls go now */
    return 1;
}

void st_engine_stats_get(const st_engine *e, st_engine_stats *out)
{
    out->requests = e->n_requests;
    out->attempts = e->n_attempts;
    out->retries = e->n_retries;
    out->connections = e->n_connections;
    out->running = e->running.count;
    out->waiting = e->waiting.count;
    out->done = e->done.count;
    out->queued = 0;
    st_decider_each(&e->decider, count_queued, &out->queued);
}
