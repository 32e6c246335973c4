#include "spendbook.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_SETTLE_MS 60000

int64_t st_spend_usd(double usd)
{
    double micro;
    int64_t m;

    if (!(usd > 0))
        return 0;
    micro = usd * 1e6;
    if (!(micro < (double)ST_SPEND_MAX))
        return ST_SPEND_MAX;
    m = (int64_t)micro;
    return (double)m < micro ? m + 1 : m;
}

static unsigned name_hash(const char *s)
{
    unsigned h = 2166136261u; /* FNV-1a */
    while (*s)
        h = (h ^ (unsigned char)*s++) * 16777619u;
    return h % ST_SPEND_BUCKETS;
}

static void warn_add(st_spend_warnings *w, const st_call_spend *cs, int scope, st_spend *s, unsigned bits,
                     int64_t now_ms)
{
    int span, dim;
    if (w == NULL || bits == 0)
        return;
    for (span = 0; span < ST_SPEND_SPANS; span++)
        for (dim = 0; dim < ST_SPEND_DIMS; dim++) {
            st_spend_warning *x;
            if (!(bits & ST_SPEND_WARN_BIT(span, dim)))
                continue;
            if (w->n >= ST_SPEND_WARNINGS) {
                w->dropped++;
                continue;
            }
            x = &w->w[w->n++];
            x->scope = (st_spend_scope)scope;
            x->name = cs->name[scope];
            x->span = (st_spend_span)span;
            x->dim = (st_spend_dim)dim;
            x->used = st_spend_used(s, now_ms, (st_spend_span)span, (st_spend_dim)dim);
            x->cap = s->cap[span][dim];
        }
}

/* ---- the book ------------------------------------------------------------- */

static int64_t clock_of(st_spend_book *b, int64_t now_ms)
{
    if (now_ms > b->last_ms)
        b->last_ms = now_ms;
    return b->last_ms;
}


st_spend_book *st_spend_book_new(int64_t settle_ms, int64_t now_ms)
{
    st_spend_book *b = calloc(1, sizeof *b);
    if (b == NULL)
        return NULL;
    b->settle_ms = settle_ms >= 1 ? settle_ms : DEFAULT_SETTLE_MS;
    b->last_ms = now_ms;
    st_spend_init(&b->client, NULL, now_ms);
    return b;
}

static void free_chain(st_spend_named **buckets)
{
    int i;
    for (i = 0; i < ST_SPEND_BUCKETS; i++) {
        st_spend_named *n = buckets[i];
        while (n) {
            st_spend_named *next = n->next;
            free(n);
            n = next;
        }
        buckets[i] = NULL;
    }
}

void st_spend_book_free(st_spend_book *b)
{
    st_spend_rule *r;
    if (b == NULL)
        return;
    free_chain(b->keys);
    free_chain(b->tags);
    r = b->rules;
    while (r) {
        st_spend_rule *next = r->next;
        free(r);
        r = next;
    }
    free(b->parked);
    free(b->free_next);
    free(b->fifo);
    free(b);
}

void st_spend_book_cap_client(st_spend_book *b, const st_spend_config *cfg, int64_t now_ms)
{
    b->client_capped = cfg != NULL;
    st_spend_init(&b->client, cfg, now_ms);
}

int st_spend_book_rule(st_spend_book *b, st_spend_scope scope, const char *name, const st_spend_config *cfg)
{
    size_t n = strlen(name) + 1;
    st_spend_rule *r = malloc(sizeof *r + n);
    if (r == NULL)
        return 0;
    r->scope = scope;
    r->cfg = *cfg;
    memcpy(r->name, name, n);
    r->next = b->rules;
    b->rules = r;
    if (scope == ST_SCOPE_TAG && strcmp(name, "*") == 0)
        b->any_tag = r;
    return 1;
}

static const st_spend_rule *rule_for(const st_spend_book *b, st_spend_scope scope, const char *name)
{
    const st_spend_rule *r;
    for (r = b->rules; r; r = r->next) /* newest first: a later rule wins */
        if (r->scope == scope && strcmp(r->name, name) == 0)
            return r;
    return scope == ST_SCOPE_TAG ? b->any_tag : NULL;
}

st_spend_named *st_spend_book_find(const st_spend_book *b, st_spend_scope scope, const char *name)
{
    st_spend_named *const *buckets = scope == ST_SCOPE_TAG ? b->tags : b->keys;
    st_spend_named *n;
    for (n = buckets[name_hash(name)]; n; n = n->next)
        if (strcmp(n->name, name) == 0)
            return n;
    return NULL;
}

static st_spend_named *named(st_spend_book *b, st_spend_scope scope, const char *name, int64_t now_ms,
                             int *no_room)
{
    st_spend_named **buckets = scope == ST_SCOPE_TAG ? b->tags : b->keys;
    st_spend_named *n = st_spend_book_find(b, scope, name);
    const st_spend_rule *r;
    size_t len;

    if (no_room)
        *no_room = 0;
    if (n != NULL)
        return n;
    if ((r = rule_for(b, scope, name)) == NULL)
        return NULL;
    len = strlen(name) + 1;
    if ((scope == ST_SCOPE_TAG && b->ntags >= ST_SPEND_MAX_TAGS) || (n = malloc(sizeof *n + len)) == NULL) {
        if (no_room)
            *no_room = 1;
        return NULL;
    }
    memcpy(n->name, name, len);
    st_spend_init(&n->spend, &r->cfg, now_ms);
    n->next = buckets[name_hash(name)];
    buckets[name_hash(name)] = n;
    if (scope == ST_SCOPE_TAG)
        b->ntags++;
    return n;
}

st_spend_named *st_spend_book_key(st_spend_book *b, const char *key, int64_t now_ms, int *no_room)
{
    return named(b, ST_SCOPE_KEY, key, now_ms, no_room);
}

st_spend_named *st_spend_book_tag(st_spend_book *b, const char *tag, int64_t now_ms, int *no_room)
{
    return named(b, ST_SCOPE_TAG, tag, now_ms, no_room);
}

void st_spend_book_call(st_spend_book *b, st_call_spend *cs, st_spend_named *key, const char *tag,
                        const int64_t amount[ST_SPEND_DIMS], int64_t now_ms)
{
    int no_room = 0, d;
    st_spend_named *t = tag ? st_spend_book_tag(b, tag, now_ms, &no_room) : NULL;

    memset(cs, 0, sizeof *cs);
    for (d = 0; d < ST_SPEND_DIMS; d++)
        cs->amount[d] = amount[d] < 0 ? 0 : amount[d] > ST_SPEND_MAX ? ST_SPEND_MAX : amount[d];
    if (b->client_capped)
        cs->s[ST_SCOPE_CLIENT] = &b->client;
    if (key) {
        cs->s[ST_SCOPE_KEY] = &key->spend;
        cs->name[ST_SCOPE_KEY] = key->name;
    }
    if (t) {
        cs->s[ST_SCOPE_TAG] = &t->spend;
        cs->name[ST_SCOPE_TAG] = t->name;
    }
    if (no_room)
        cs->state = ST_CALL_SPEND_NO_ROOM;
    else if (cs->s[0] || cs->s[1] || cs->s[2])
        cs->state = ST_CALL_SPEND_WANTED;
}

/* ---- reserve, release ----------------------------------------------------- */

/* How much a refusal says: never passes > passes after a wait > depends on others. */
static int refusal_rank(st_spend_result r)
{
    return r == ST_SPEND_TOO_BIG ? 3 : r == ST_SPEND_WAIT ? 2 : r == ST_SPEND_HELD ? 1 : 0;
}

st_spend_result st_spend_book_reserve(st_spend_book *b, st_call_spend *cs, int64_t now_ms,
                                      st_spend_scope *scope, int64_t *retry_after_ms, st_spend_warnings *w)
{
    st_spend_result worst = ST_SPEND_OK;
    int64_t wait = -1;
    int i;

    now_ms = clock_of(b, now_ms);
    st_spend_book_expire(b, now_ms, w);
    if (cs->state != ST_CALL_SPEND_WANTED)
        return ST_SPEND_OK;
    for (i = 0; i < ST_SPEND_SCOPES; i++) {
        int64_t ra = -1;
        st_spend_result r;
        if (cs->s[i] == NULL)
            continue;
        r = st_spend_reserve(cs->s[i], now_ms, cs->amount, &cs->h[i], &ra);
        if (refusal_rank(r) > refusal_rank(worst) || (r == ST_SPEND_WAIT && worst == ST_SPEND_WAIT && ra > wait)) {
            worst = r;
            wait = ra;
            if (scope)
                *scope = (st_spend_scope)i;
        }
    }
    if (worst == ST_SPEND_OK) {
        cs->state = ST_CALL_SPEND_HELD;
        return ST_SPEND_OK;
    }
    for (i = 0; i < ST_SPEND_SCOPES; i++)
        if (cs->s[i] != NULL && cs->h[i].valid)
            st_spend_release(cs->s[i], now_ms, &cs->h[i]);
    b->refused++;
    if (retry_after_ms)
        *retry_after_ms = worst == ST_SPEND_WAIT ? wait : -1;
    return worst;
}

void st_spend_book_release(st_spend_book *b, st_call_spend *cs, int64_t now_ms)
{
    int i;
    (void)b;
    if (cs->state != ST_CALL_SPEND_HELD)
        return;
    for (i = 0; i < ST_SPEND_SCOPES; i++)
        if (cs->s[i] != NULL)
            st_spend_release(cs->s[i], now_ms, &cs->h[i]);
    cs->state = ST_CALL_SPEND_DONE;
}

static void settle_holds(st_call_spend *cs, const int64_t actual[ST_SPEND_DIMS], int64_t now_ms,
                         st_spend_warnings *w)
{
    int i;
    for (i = 0; i < ST_SPEND_SCOPES; i++)
        if (cs->s[i] != NULL)
            warn_add(w, cs, i, cs->s[i], st_spend_settle(cs->s[i], now_ms, &cs->h[i], actual), now_ms);
    cs->state = ST_CALL_SPEND_DONE;
}

/* ---- parked holds --------------------------------------------------------- */

/* An id is the slot's generation (20 bits) above its index + 1 (32 bits): below
 * 2^52, so a Lua number holds it exactly. */
#define GEN_MASK 0xfffffu

static uint64_t id_of(const st_spend_book *b, uint32_t slot)
{
    return ((uint64_t)(b->parked[slot].gen & GEN_MASK) << 32) | (uint64_t)(slot + 1);
}

static st_parked *parked_of(st_spend_book *b, uint64_t id)
{
    uint32_t slot = (uint32_t)(id & 0xffffffffu);
    st_parked *p;
    if (slot == 0 || slot > b->nparked)
        return NULL;
    p = &b->parked[slot - 1];
    return p->used && (uint64_t)(p->gen & GEN_MASK) == id >> 32 ? p : NULL;
}

/* A free slot index, growing the slots when none is free; UINT32_MAX on OOM. */
static uint32_t take_slot(st_spend_book *b)
{
    uint32_t slot;
    if (b->free_head != 0) {
        slot = b->free_head - 1;
        b->free_head = b->free_next[slot];
        return slot;
    }
    if (b->nparked == b->cap_parked) {
        uint32_t cap = b->cap_parked ? b->cap_parked * 2 : 64;
        st_parked *p;
        uint32_t *f;
        if (cap > 0x7fffffffu)
            return UINT32_MAX;
        p = realloc(b->parked, cap * sizeof *p);
        if (p == NULL)
            return UINT32_MAX;
        b->parked = p;
        f = realloc(b->free_next, cap * sizeof *f);
        if (f == NULL)
            return UINT32_MAX;
        b->free_next = f;
        b->cap_parked = cap;
    }
    slot = b->nparked++;
    b->parked[slot].gen = 0;
    b->parked[slot].used = 0;
    return slot;
}

static void put_slot(st_spend_book *b, uint32_t slot)
{
    b->parked[slot].used = 0;
    b->free_next[slot] = b->free_head;
    b->free_head = slot + 1;
}

static int fifo_push(st_spend_book *b, uint64_t id)
{
    if (b->fifo_len == b->fifo_cap) {
        uint32_t cap = b->fifo_cap ? b->fifo_cap * 2 : 64, i;
        uint64_t *f;
        if (cap > 0x7fffffffu || (f = malloc(cap * sizeof *f)) == NULL)
            return 0;
        for (i = 0; i < b->fifo_len; i++)
            f[i] = b->fifo[(b->fifo_head + i) % b->fifo_cap];
        free(b->fifo);
        b->fifo = f;
        b->fifo_cap = cap;
        b->fifo_head = 0;
    }
    b->fifo[(b->fifo_head + b->fifo_len) % b->fifo_cap] = id;
    b->fifo_len++;
    return 1;
}

void st_spend_book_expire(st_spend_book *b, int64_t now_ms, st_spend_warnings *w)
{
    now_ms = clock_of(b, now_ms);
    while (b->fifo_len > 0) {
        uint64_t id = b->fifo[b->fifo_head];
        st_parked *p = parked_of(b, id);
        if (p != NULL && p->due_ms > now_ms)
            break;
        b->fifo_head = (b->fifo_head + 1) % b->fifo_cap;
        b->fifo_len--;
        if (p != NULL) {
            settle_holds(&p->cs, p->cs.amount, now_ms, w);
            b->expired++;
            put_slot(b, (uint32_t)(p - b->parked));
        }
    }
}

void st_spend_book_expire_all(st_spend_book *b, int64_t now_ms, st_spend_warnings *w)
{
    uint32_t slot;

    now_ms = clock_of(b, now_ms);
    for (slot = 0; slot < b->nparked; slot++)
        if (b->parked[slot].used) {
            settle_holds(&b->parked[slot].cs, b->parked[slot].cs.amount, now_ms, w);
            b->expired++;
            put_slot(b, slot);
        }
    b->fifo_head = b->fifo_len = 0; /* every entry is stale now */
}

uint64_t st_spend_book_end(st_spend_book *b, st_call_spend *cs, int billed, int64_t now_ms, st_spend_warnings *w)
{
    uint32_t slot;
    uint64_t id;
    st_parked *p;

    now_ms = clock_of(b, now_ms);
    st_spend_book_expire(b, now_ms, w);
    if (cs->state != ST_CALL_SPEND_HELD)
        return 0;
    if (!billed) {
        st_spend_book_release(b, cs, now_ms);
        return 0;
    }
    slot = take_slot(b);
    if (slot == UINT32_MAX) {
        settle_holds(cs, cs->amount, now_ms, w); /* the safe side: the worst case */
        return 0;
    }
    p = &b->parked[slot];
    p->gen++;
    id = id_of(b, slot);
    if (!fifo_push(b, id)) {
        p->used = 0;
        put_slot(b, slot);
        settle_holds(cs, cs->amount, now_ms, w);
        return 0;
    }
    p->cs = *cs;
    p->due_ms = now_ms + b->settle_ms;
    p->used = 1;
    cs->state = ST_CALL_SPEND_DONE;
    b->parks++;
    return id;
}

int st_spend_book_settle(st_spend_book *b, uint64_t id, const int64_t actual[ST_SPEND_DIMS], int64_t now_ms,
                         st_spend_warnings *w)
{
    st_parked *p;

    now_ms = clock_of(b, now_ms);
    st_spend_book_expire(b, now_ms, w);
    if ((p = parked_of(b, id)) == NULL)
        return 0;
    settle_holds(&p->cs, actual, now_ms, w);
    put_slot(b, (uint32_t)(p - b->parked)); /* its FIFO entry goes stale: gen or used no longer match */
    b->settles++;
    return 1;
}

void st_spend_book_charge(st_spend_book *b, st_spend_named *key, const char *tag,
                          const int64_t actual[ST_SPEND_DIMS], int64_t now_ms, st_spend_warnings *w)
{
    st_call_spend cs;
    int i;

    now_ms = clock_of(b, now_ms);
    st_spend_book_expire(b, now_ms, w);
    st_spend_book_call(b, &cs, key, tag, actual, now_ms);
    for (i = 0; i < ST_SPEND_SCOPES; i++)
        if (cs.s[i] != NULL)
            warn_add(w, &cs, i, cs.s[i], st_spend_charge(cs.s[i], now_ms, actual), now_ms);
}

int st_spend_binding(st_spend *s, int64_t now_ms, const int64_t amount[ST_SPEND_DIMS], st_spend_span *span,
                     st_spend_dim *dim)
{
    int sp, d;
    for (sp = 0; sp < ST_SPEND_SPANS; sp++)
        for (d = 0; d < ST_SPEND_DIMS; d++) {
            int64_t cap = s->cap[sp][d], used;
            if (cap <= 0)
                continue;
            used = st_spend_used(s, now_ms, (st_spend_span)sp, (st_spend_dim)d);
            if (amount[d] + st_spend_reserved(s, (st_spend_dim)d) > cap - used) {
                *span = (st_spend_span)sp;
                *dim = (st_spend_dim)d;
                return 1;
            }
        }
    return 0;
}
