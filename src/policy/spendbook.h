/* The spend caps of one decider (one client): its own cap, a cap per upstream
 * key and a cap per tag (a tenant or feature named on the request), each an
 * st_spend (spend.h), and the holds of calls that have ended before their
 * actual cost is known. No I/O, no clock reads: time is passed in. Allocation
 * happens only when a capped key or tag is first named and when a hold is
 * parked beyond the slots already made.
 *
 * Scopes. The client cap applies to every call, a key's cap to the calls of
 * that key, a tag's cap to the calls naming the tag. Keys and tags are capped
 * by name; the tag rule "*" caps every tag that has no rule of its own, each on
 * its own (a cap per tenant). A call reserves in every scope that caps it, all
 * or nothing: a refusal in one scope gives back what the others reserved.
 *
 * Tags. At most ST_SPEND_MAX_TAGS tags get a spend of their own; past that a
 * call naming a new capped tag is refused (st_spend_book_tag says so), since
 * it could not be capped. Tags without a rule (and no "*") cost nothing.
 *
 * Holds after the call. When a call's last attempt got a 2xx status, its reply
 * may be billed: its holds are parked under an id, and st_spend_book_settle
 * charges the actual amount in their place, once (ids are below 2^52, and a
 * slot's id repeats only after 2^20 reuses of it). A parked hold not settled
 * within settle_ms is charged at its full reserved amount (every reserve,
 * park, settle and charge first expires the overdue ones, oldest first), so the
 * cap holds whatever a caller forgets. A call that ended otherwise releases its
 * holds: an error status, or no response at all, is not billed.
 *
 * Warnings. Each scope's st_spend says when a charge first brings its settled
 * spend to warn * cap (see spend.h); those crossings are returned as
 * st_spend_warning records, at most ST_SPEND_WARNINGS per call (the rest are
 * counted in dropped).
 *
 * Amounts are int64 (µUSD and tokens) as in spend.h; st_spend_usd converts
 * dollars, rounding up (a cheap call is over-counted by less than a µUSD). */
#ifndef STURDY_SPENDBOOK_H
#define STURDY_SPENDBOOK_H

#include <stdint.h>

#include "spend.h"

#define ST_SPEND_MAX_TAGS 4096
#define ST_SPEND_WARNINGS 16
#define ST_SPEND_BUCKETS 64

typedef enum { ST_SCOPE_CLIENT = 0, ST_SCOPE_KEY, ST_SCOPE_TAG, ST_SPEND_SCOPES } st_spend_scope;

/* Dollars to µUSD, rounded up; NaN and below 0 -> 0, above ST_SPEND_MAX -> that. */
int64_t st_spend_usd(double usd);

/* A capped key's or tag's spend. */
typedef struct st_spend_named {
    struct st_spend_named *next;     /* hash chain */
    st_spend spend;
    char name[];
} st_spend_named;

/* A key or tag rule as configured. */
typedef struct st_spend_rule {
    struct st_spend_rule *next;
    st_spend_scope scope;
    st_spend_config cfg;
    char name[];
} st_spend_rule;

/* One call's part: which spends cap it and what it holds in each. Plain data,
 * embedded in the call (st_call), copied when parked. */
typedef struct st_call_spend {
    st_spend *s[ST_SPEND_SCOPES];        /* NULL: that scope does not cap the call */
    const char *name[ST_SPEND_SCOPES];   /* key and tag names, for warnings */
    st_spend_hold h[ST_SPEND_SCOPES];
    int64_t amount[ST_SPEND_DIMS];       /* the worst case reserved */
    unsigned char state;                 /* ST_CALL_SPEND_* */
} st_call_spend;

enum {
    ST_CALL_SPEND_NONE = 0,  /* nothing caps the call */
    ST_CALL_SPEND_WANTED,    /* to reserve at admission */
    ST_CALL_SPEND_NO_ROOM,   /* its tag could not get a spend (too many tags, or memory) */
    ST_CALL_SPEND_HELD,      /* reserved */
    ST_CALL_SPEND_DONE       /* released, parked or settled */
};

typedef struct st_spend_warning {
    st_spend_scope scope;
    const char *name;                    /* key or tag; NULL for the client */
    st_spend_span span;
    st_spend_dim dim;
    int64_t used, cap;                   /* settled spend in the window, and the cap */
} st_spend_warning;

typedef struct st_spend_warnings {
    unsigned n, dropped;
    st_spend_warning w[ST_SPEND_WARNINGS];
} st_spend_warnings;

typedef struct st_parked {
    st_call_spend cs;
    int64_t due_ms;                      /* charged in full from then on */
    uint32_t gen;                        /* bumped on each use of the slot: stale ids miss */
    unsigned char used;
} st_parked;

typedef struct st_spend_book {
    int client_capped;
    st_spend client;
    st_spend_rule *rules;                /* keys and tags, as configured */
    const st_spend_rule *any_tag;        /* the "*" rule, NULL none */
    st_spend_named *keys[ST_SPEND_BUCKETS], *tags[ST_SPEND_BUCKETS];
    unsigned ntags;
    int64_t settle_ms;
    st_parked *parked;                   /* slots; free ones chained through free_next */
    uint32_t nparked, cap_parked, *free_next, free_head;
    uint64_t *fifo;                      /* parked ids in order of due time (a ring) */
    uint32_t fifo_head, fifo_len, fifo_cap;
    int64_t last_ms;
    uint64_t refused, parks, settles, expired;
} st_spend_book;

/* An empty book: no caps; holds settle within settle_ms (below 1: 60000). */
st_spend_book *st_spend_book_new(int64_t settle_ms, int64_t now_ms);
void st_spend_book_free(st_spend_book *b);

/* Caps: the client's (cfg NULL = none), and rules for a key or a tag by name
 * ("*" for every tag without a rule). Returns 0 when memory runs out. A rule
 * given twice: the later one wins for spends not made yet. */
void st_spend_book_cap_client(st_spend_book *b, const st_spend_config *cfg, int64_t now_ms);
int st_spend_book_rule(st_spend_book *b, st_spend_scope scope, const char *name, const st_spend_config *cfg);

/* The spend of a key or a tag, made on first use; NULL when no rule caps it.
 * *no_room (may be NULL) is set to 1 when a rule caps it but its spend could
 * not be made (too many tags, or memory). */
st_spend_named *st_spend_book_key(st_spend_book *b, const char *key, int64_t now_ms, int *no_room);
st_spend_named *st_spend_book_tag(st_spend_book *b, const char *tag, int64_t now_ms, int *no_room);
/* The spend of a key or tag if it was made, else NULL. */
st_spend_named *st_spend_book_find(const st_spend_book *b, st_spend_scope scope, const char *name);

/* Sets up a call's part: the client's cap, the key's spend (key may be NULL),
 * the tag's (tag NULL = none), and the amounts to reserve. */
void st_spend_book_call(st_spend_book *b, st_call_spend *cs, st_spend_named *key, const char *tag,
                        const int64_t amount[ST_SPEND_DIMS], int64_t now_ms);

/* Reserves cs's amounts in every scope that caps it (state WANTED -> HELD).
 * On refusal nothing stays reserved and *scope, *result and *retry_after_ms
 * tell of the scope that refused (the latest retry_after of those that refused
 * with ST_SPEND_WAIT, else the first refusal). */
st_spend_result st_spend_book_reserve(st_spend_book *b, st_call_spend *cs, int64_t now_ms,
                                      st_spend_scope *scope, int64_t *retry_after_ms, st_spend_warnings *w);

/* Frees cs's holds (HELD -> DONE); anything else: nothing happens. */
void st_spend_book_release(st_spend_book *b, st_call_spend *cs, int64_t now_ms);

/* The call ended: billed (its last attempt got a 2xx) parks its holds and
 * returns their id (> 0); otherwise they are released and 0 is returned. When
 * memory runs out the holds are charged in full at once (0 is returned). */
uint64_t st_spend_book_end(st_spend_book *b, st_call_spend *cs, int billed, int64_t now_ms,
                           st_spend_warnings *w);

/* Charges actual (µUSD, tokens) in place of the parked holds of id. 1 when it
 * did; 0 when id is unknown, already settled or expired. */
int st_spend_book_settle(st_spend_book *b, uint64_t id, const int64_t actual[ST_SPEND_DIMS], int64_t now_ms,
                         st_spend_warnings *w);

/* Charges actual with no hold, in the scopes that cap a call of this key spend
 * and tag (the cost of a cancelled hedge). */
void st_spend_book_charge(st_spend_book *b, st_spend_named *key, const char *tag,
                          const int64_t actual[ST_SPEND_DIMS], int64_t now_ms, st_spend_warnings *w);

/* Charges in full the parked holds due by now. */
void st_spend_book_expire(st_spend_book *b, int64_t now_ms, st_spend_warnings *w);

/* Charges in full, now, every parked hold, due or not: for a book whose
 * spends outlive it (shared with other processes), when it goes away and
 * nobody will settle them. */
void st_spend_book_expire_all(st_spend_book *b, int64_t now_ms, st_spend_warnings *w);

/* For a refusal's detail: the first capped span and dimension of s that
 * `amount` more would cross (reservations in flight counted); 0 when none. */
int st_spend_binding(st_spend *s, int64_t now_ms, const int64_t amount[ST_SPEND_DIMS], st_spend_span *span,
                     st_spend_dim *dim);

#endif
