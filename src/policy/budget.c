#include "budget.h"


#define NONE INT64_MIN      /* slot_start of a slot that holds no period */
#define PARAM_MAX 1e12

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static unsigned slot_of(int64_t period)
{
    int64_t r = period % ST_BUDGET_SLOTS;
    return (unsigned)(r < 0 ? r + ST_BUDGET_SLOTS : r);
}

static double clamp_param(double x)
{
    if (!(x >= 0))
        return 0;
    return x > PARAM_MAX ? PARAM_MAX : x;
}

static void clear(st_budget *b)
{
    unsigned k;
    for (k = 0; k < ST_BUDGET_SLOTS; k++) {
        b->slot_start[k] = NONE;
        b->deposits[k] = 0;
        b->withdrawals[k] = 0;
    }
    b->dep_sum = 0;
    b->wd_sum = 0;
}

static void evict(st_budget *b, unsigned k)
{
    b->dep_sum -= b->deposits[k];
    b->wd_sum -= b->withdrawals[k];
    b->deposits[k] = 0;
    b->withdrawals[k] = 0;
}

/* Bring the ring up to now and return the slot for now. The ring holds at most
 * the 10 periods ending at the newest one seen, each at index period mod 10, so
 * the newest start is also the "last seen" time needed to ignore clock steps back. */
static unsigned advance(st_budget *b, int64_t now_ms)
{
    int64_t head = NONE, start, period, p;
    uint64_t gap;
    unsigned k;

    for (k = 0; k < ST_BUDGET_SLOTS; k++)
        if (b->slot_start[k] > head)
            head = b->slot_start[k];
    /* the lowest clock values have no representable period start; they are
     * "long ago" anyway, and this keeps every start above NONE */
    if (now_ms < INT64_MIN + b->slot_ms)
        now_ms = INT64_MIN + b->slot_ms;
    period = floor_div(now_ms, b->slot_ms);
    start = period * b->slot_ms;
    if (head != NONE && start <= head)          /* same slot, or time went backwards */
        return slot_of(head / b->slot_ms);

    /* unsigned difference: exact even when head and start are far apart in sign */
    gap = head == NONE ? ST_BUDGET_SLOTS : ((uint64_t)start - (uint64_t)head) / (uint64_t)b->slot_ms;
    if (gap >= ST_BUDGET_SLOTS) {
        clear(b);
    } else {
        for (p = head / b->slot_ms + 1; p < period; p++) {
            k = slot_of(p);
            evict(b, k);
            b->slot_start[k] = p * b->slot_ms;
        }
        evict(b, slot_of(period));
    }
    k = slot_of(period);
    b->slot_start[k] = start;
    return k;
}

/* Nearest integer, without libm (the module is linked without -lm). Doubles of
 * 2^52 and more are integers already. */
static double nearest(double a)
{
    if (a >= 4503599627370496.0 || a <= -4503599627370496.0)
        return a;
    return (double)(int64_t)(a >= 0 ? a + 0.5 : a - 0.5);
}

/* Products like 0.29 * 100 land a hair under the integer they stand for; snap
 * values within a relative 1e-9 of an integer so counts come out exact. */
static double allowance(const st_budget *b)
{
    double reserve = b->min_per_s * ((double)ST_BUDGET_SLOTS * (double)b->slot_ms / 1000.0);
    double earned = b->ratio * (double)b->dep_sum;
    double spent = (double)b->wd_sum;
    double a = reserve + earned - spent, r = nearest(a), off = a - r;
    return (off < 0 ? -off : off) <= 1e-9 * (1.0 + reserve + earned + spent) ? r : a;
}

void st_budget_init(st_budget *b, double ratio, double min_per_s, int64_t slot_ms, int64_t now_ms)
{
    b->ratio = clamp_param(ratio);
    b->min_per_s = clamp_param(min_per_s);
    b->slot_ms = slot_ms >= 1 ? slot_ms : 1000;
    clear(b);
    (void)advance(b, now_ms);
}

void st_budget_deposit(st_budget *b, int64_t now_ms)
{
    unsigned k = advance(b, now_ms);
    if (b->deposits[k] != UINT32_MAX) {
        b->deposits[k]++;
        b->dep_sum++;
    }
}

int st_budget_try_withdraw(st_budget *b, int64_t now_ms)
{
    unsigned k = advance(b, now_ms);
    if (allowance(b) < 1 || b->withdrawals[k] == UINT32_MAX)
        return 0;
    b->withdrawals[k]++;
    b->wd_sum++;
    return 1;
}

double st_budget_balance(st_budget *b, int64_t now_ms)
{
    (void)advance(b, now_ms);
    return allowance(b);
}
