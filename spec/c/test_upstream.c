/* Specs for an upstream's shared part as a blob (st_upstream_save / load): what
 * the workers of one nginx keep in a shared dict. Two "workers" here are two
 * st_upstream structs of the same key that load the blob before each decision
 * and save it after, as the ngx transport does under its lock; time is virtual. */
#include "test.h"

#include "upstream.h"

#include <stdlib.h>
#include <string.h>

static uint32_t saves;

typedef struct shared {
    unsigned char data[8192];
    size_t len;                 /* 0 = nothing stored yet */
} shared;

static st_upstream *worker(const st_upstream_config *c)
{
    st_upstream *u = st_upstream_new("api.example.com/model", c, 0);
    CHECK(u != NULL);
    return u;
}

static void load(st_upstream *u, const shared *s)
{
    if (s->len)
        CHECK_EQ_INT(st_upstream_load(u, s->data, s->len), ST_BLOB_OK);
}

static void save(const st_upstream *u, shared *s)
{
    s->len = st_upstream_save(u, ++saves, s->data, sizeof s->data);
    CHECK_EQ_INT(s->len, st_upstream_blob_size());
}

/* One call through worker u against a hard-down upstream: 1 when it was sent. */
static int failing_call(st_upstream *u, shared *s, int64_t now)
{
    st_permit p;
    int sent;
    if (s)
        load(u, s);
    sent = st_breaker_acquire(&u->breaker, now, &p, NULL);
    if (sent)
        st_breaker_record(&u->breaker, now, &p, ST_CLASS_OVERLOADED, 5);
    if (s)
        save(u, s);
    return sent;
}

static void test_round_trip(void)
{
    st_upstream_config c;
    st_upstream *a, *b;
    unsigned char blob[8192];
    size_t n;
    int64_t now = 1000;
    int i;

    st_upstream_config_defaults(&c);
    c.limits_per_min[ST_DIM_REQUESTS] = 600;
    a = worker(&c);
    b = worker(&c);
    for (i = 0; i < 20; i++)
        failing_call(a, NULL, now);
    CHECK_EQ_INT(st_breaker_state_now(&a->breaker), ST_BREAKER_OPEN);
    for (i = 0; i < 10; i++)
        CHECK_EQ_INT(st_limiter_acquire(&a->limiter, now, NULL), 0);
    CHECK(st_limiter_acquire(&a->limiter, now, NULL) > 0);
    CHECK(st_budget_try_withdraw(&a->budget, now));
    a->replied = 1;

    n = st_upstream_save(a, 7, blob, sizeof blob);
    CHECK_EQ_INT(n, st_upstream_blob_size());
    CHECK_EQ_INT(st_upstream_save(a, 7, blob, n - 1), 0);
    {
        /* the stamp opens and closes the blob, and means nothing to load */
        uint32_t first, last;
        unsigned char other[8192];
        memcpy(&first, blob, sizeof first);
        memcpy(&last, blob + n - sizeof last, sizeof last);
        CHECK_EQ_INT(first, 7);
        CHECK_EQ_INT(last, 7);
        CHECK_EQ_INT(st_upstream_save(a, 8, other, sizeof other), n);
        CHECK(memcmp(other + 4, blob + 4, n - 8) == 0);
        CHECK(memcmp(other, blob, 4) != 0 && memcmp(other + n - 4, blob + n - 4, 4) != 0);
        CHECK_EQ_INT(st_upstream_load(b, other, n), ST_BLOB_OK);
    }
    CHECK_EQ_INT(st_upstream_load(b, blob, n), ST_BLOB_OK);
    CHECK_EQ_INT(st_breaker_state_now(&b->breaker), ST_BREAKER_OPEN);
    CHECK_EQ_INT(b->breaker.open_until_ms, a->breaker.open_until_ms);
    CHECK_EQ_INT(st_limiter_wait_ms(&b->limiter, now, NULL), st_limiter_wait_ms(&a->limiter, now, NULL));
    CHECK_NEAR(st_budget_balance(&b->budget, now), st_budget_balance(&a->budget, now), 1e-9);
    CHECK_EQ_INT(b->replied, 1);
    /* what stays with each process */
    CHECK(b->total == NULL);
    CHECK_EQ_INT(b->in_flight, 0);
    st_upstream_free(a);
    st_upstream_free(b);
}

static void test_refusals(void)
{
    st_upstream_config c, other;
    st_upstream *a, *b, *c2;
    unsigned char blob[8192], bad[8192];
    size_t n, payload;
    uint32_t v;
    int64_t open_until;
    int i;

    st_upstream_config_defaults(&c);
    a = worker(&c);
    b = worker(&c);
    for (i = 0; i < 20; i++)
        failing_call(a, NULL, 0);
    n = st_upstream_save(a, 7, blob, sizeof blob);
    payload = n - sizeof(st_breaker) - sizeof(st_limiter) - sizeof(st_budget) - 1 - sizeof(uint32_t);

    CHECK_EQ_INT(st_upstream_load(b, NULL, n), ST_BLOB_SIZE);
    CHECK_EQ_INT(st_upstream_load(b, blob, n - 1), ST_BLOB_SIZE);
    CHECK_EQ_INT(st_upstream_load(b, blob, 0), ST_BLOB_SIZE);
    memcpy(bad, blob, n);
    bad[4] = 'X';
    CHECK_EQ_INT(st_upstream_load(b, bad, n), ST_BLOB_MAGIC);
    memcpy(bad, blob, n);
    v = ST_UPSTREAM_BLOB_VERSION + 1;
    memcpy(bad + 8, &v, sizeof v);
    CHECK_EQ_INT(st_upstream_load(b, bad, n), ST_BLOB_VERSION);
    memcpy(bad, blob, n);
    v = (uint32_t)sizeof(st_breaker) + 8;
    memcpy(bad + 12, &v, sizeof v);
    CHECK_EQ_INT(st_upstream_load(b, bad, n), ST_BLOB_LAYOUT);
    /* a breaker state outside its enum */
    memcpy(bad, blob, n);
    {
        st_breaker br;
        memcpy(&br, bad + payload, sizeof br);
        br.state = (st_breaker_state)7;
        memcpy(bad + payload, &br, sizeof br);
    }
    CHECK_EQ_INT(st_upstream_load(b, bad, n), ST_BLOB_INVALID);
    /* more probes out than it has permits */
    memcpy(bad, blob, n);
    {
        st_breaker br;
        memcpy(&br, bad + payload, sizeof br);
        br.probes_out = 2;
        memcpy(bad + payload, &br, sizeof br);
    }
    CHECK_EQ_INT(st_upstream_load(b, bad, n), ST_BLOB_INVALID);
    memcpy(bad, blob, n);
    bad[n - 5] = 7; /* replied is 0 or 1 */
    CHECK_EQ_INT(st_upstream_load(b, bad, n), ST_BLOB_INVALID);
    /* nothing of a refused blob was taken */
    CHECK_EQ_INT(st_breaker_state_now(&b->breaker), ST_BREAKER_CLOSED);

    /* other settings: another fingerprint, refused */
    other = c;
    other.breaker.min_calls = 10;
    c2 = worker(&other);
    CHECK(st_upstream_fingerprint(c2) != st_upstream_fingerprint(a));
    CHECK_EQ_INT(st_upstream_load(c2, blob, n), ST_BLOB_CONFIG);
    st_upstream_free(c2);
    other = c;
    other.limits_per_min[ST_DIM_TOKENS] = 1000;
    c2 = worker(&other);
    CHECK_EQ_INT(st_upstream_load(c2, blob, n), ST_BLOB_CONFIG);
    st_upstream_free(c2);
    other = c;
    other.breaker_mode = ST_BREAKER_METRICS_ONLY;
    c2 = worker(&other);
    CHECK_EQ_INT(st_upstream_load(c2, blob, n), ST_BLOB_CONFIG);
    st_upstream_free(c2);
    other = c;
    other.budget_ratio = 0.5;
    c2 = worker(&other);
    CHECK_EQ_INT(st_upstream_load(c2, blob, n), ST_BLOB_CONFIG);
    st_upstream_free(c2);
    /* the same settings in another process: the same fingerprint, taken */
    CHECK_EQ_INT(st_upstream_fingerprint(b), st_upstream_fingerprint(a));
    open_until = a->breaker.open_until_ms;
    CHECK_EQ_INT(st_upstream_load(b, blob, n), ST_BLOB_OK);
    CHECK_EQ_INT(b->breaker.open_until_ms, open_until);
    st_upstream_free(a);
    st_upstream_free(b);
}

/* Against a hard-down upstream, two workers that share the blob send min_calls
 * calls in all before the breaker opens; two that do not, twice that. */
static void test_breaker_shared(void)
{
    st_upstream_config c;
    st_upstream *w[2];
    shared s;
    int64_t now;
    int sent_shared = 0, sent_alone = 0, i;

    st_upstream_config_defaults(&c);
    memset(&s, 0, sizeof s);
    w[0] = worker(&c);
    w[1] = worker(&c);
    for (now = 0; now < 5000; now += 10)
        sent_shared += failing_call(w[(now / 10) % 2], &s, now);
    CHECK_EQ_INT(sent_shared, 20);
    st_upstream_free(w[0]);
    st_upstream_free(w[1]);

    w[0] = worker(&c);
    w[1] = worker(&c);
    for (now = 0; now < 5000; now += 10)
        sent_alone += failing_call(w[(now / 10) % 2], NULL, now);
    CHECK_EQ_INT(sent_alone, 40);
    st_upstream_free(w[0]);
    st_upstream_free(w[1]);

    /* half-open across workers: each worker takes probe permits in turn, one
     * worker's permit is recorded by that worker after the other saved; all
     * probes succeed and the breaker closes for both */
    w[0] = worker(&c);
    w[1] = worker(&c);
    memset(&s, 0, sizeof s);
    for (i = 0; i < 20; i++)
        failing_call(w[i % 2], &s, 0);
    {
        st_permit p[4];
        int ok[4];
        now = 16000;
        for (i = 0; i < 4; i++) {
            load(w[i % 2], &s);
            ok[i] = st_breaker_acquire(&w[i % 2]->breaker, now, &p[i], NULL);
            save(w[i % 2], &s);
        }
        CHECK(ok[0] && ok[1] && ok[2]);
        CHECK(!ok[3]);  /* three probes, across both workers */
        for (i = 0; i < 3; i++) {
            load(w[i % 2], &s);
            st_breaker_record(&w[i % 2]->breaker, now + 10, &p[i], ST_CLASS_SUCCESS, 5);
            save(w[i % 2], &s);
        }
        load(w[1], &s);
        CHECK_EQ_INT(st_breaker_state_now(&w[1]->breaker), ST_BREAKER_CLOSED);
    }
    st_upstream_free(w[0]);
    st_upstream_free(w[1]);
}

/* 600/min shared by two workers that both try every millisecond: the pair
 * passes what one limiter allows; unshared, twice that. */
static void test_limiter_shared(void)
{
    st_upstream_config c;
    st_upstream *w[2];
    shared s;
    int64_t now;
    int passed_shared = 0, passed_alone = 0, k;

    st_upstream_config_defaults(&c);
    c.limits_per_min[ST_DIM_REQUESTS] = 600;   /* 10/s, a burst of 10 */
    for (k = 0; k < 2; k++) {
        int *passed = k == 0 ? &passed_shared : &passed_alone;
        memset(&s, 0, sizeof s);
        w[0] = worker(&c);
        w[1] = worker(&c);
        for (now = 0; now < 10000; now++) {
            st_upstream *u = w[now % 2];
            if (k == 0)
                load(u, &s);
            if (st_limiter_acquire(&u->limiter, now, NULL) == 0)
                (*passed)++;
            if (k == 0)
                save(u, &s);
        }
        st_upstream_free(w[0]);
        st_upstream_free(w[1]);
    }
    /* a burst of 10, then one per 100 ms for 10 s */
    CHECK(passed_shared >= 109 && passed_shared <= 110);
    CHECK(passed_alone >= 218 && passed_alone <= 220);
}

int main(void)
{
    test_round_trip();
    test_refusals();
    test_breaker_shared();
    test_limiter_shared();
    return TEST_REPORT();
}
