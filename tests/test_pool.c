/* Suite "pool": the retain pool's data structure (lib/core/pool.c) on its own,
 * with no mapping behind its ranges: random operations checked against a
 * page-by-page model of an address space, and the cut, join and age rules
 * one by one. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <stdlib.h>

#include "../lib/core/pool.h"

#define PAGE ((size_t)4096)
#define HUGE ((size_t)2 << 20)
#define BASE ((uintptr_t)1 << 40) /* a made-up address space, never touched */

static void room(ta_pool_t *p)
{
    while (!_ta_pool_has_room(p, 2)) {
        size_t bytes = _ta_pool_storage_bytes(p), old_bytes;
        void *mem = calloc(1, bytes);
        cr_assert_not_null(mem);
        free(_ta_pool_grow(p, mem, bytes, &old_bytes));
    }
}

static void check(const ta_pool_t *p)
{
    const char *wrong = _ta_pool_check(p);
    cr_assert_null(wrong, "pool check: %s", wrong);
}

static ta_pool_t *fresh(void)
{
    static ta_pool_t p;
    free(p.nodes);
    _ta_pool_init(&p, PAGE, HUGE);
    room(&p);
    return &p;
}

static void put(ta_pool_t *p, uintptr_t addr, size_t size, uint64_t origin, uint64_t ms)
{
    room(p);
    _ta_pool_put(p, (ta_range_t){addr, size, origin, ms});
    check(p);
}

static ta_range_t take(ta_pool_t *p, size_t size, size_t align, ta_pool_take_t want)
{
    room(p);
    ta_range_t r = {0};
    ta_pool_take_t got = _ta_pool_take(p, size, align, &r);
    cr_assert_eq(got, want, "take(%zu, %zu): got %d, wanted %d", size, align, got, want);
    check(p);
    return r;
}

Test(pool, an_exact_fit_comes_back_whole)
{
    ta_pool_t *p = fresh();
    put(p, BASE, 3 * PAGE, 1, 10);
    ta_range_t r = take(p, 3 * PAGE, PAGE, TA_POOL_FIT);
    cr_assert_eq(r.addr, BASE);
    cr_assert_eq(r.size, 3 * PAGE);
    cr_assert_eq(p->count, 0);
    cr_assert_eq(p->bytes, 0);
    take(p, PAGE, PAGE, TA_POOL_EMPTY);
}

/* Only neighbours of one mapping join (one VMA, which mremap can grow);
 * the joined range keeps the older one's age. */
Test(pool, neighbours_of_one_origin_join_and_others_do_not)
{
    ta_pool_t *p = fresh();
    put(p, BASE, 4 * PAGE, 7, 1);
    put(p, BASE + 8 * PAGE, 4 * PAGE, 7, 2);
    put(p, BASE + 12 * PAGE, 4 * PAGE, 8, 3); /* another mapping: stays apart */
    cr_assert_eq(p->count, 3);
    room(p);
    int joined = _ta_pool_put(p, (ta_range_t){BASE + 4 * PAGE, 4 * PAGE, 7, 4});
    check(p);
    cr_assert_eq(joined, 2);
    cr_assert_eq(p->count, 2);
    ta_range_t e;
    cr_assert(_ta_pool_expire_one(p, 1, SIZE_MAX, &e), "the joined range is as old as its oldest");
    cr_assert_eq(e.addr, BASE);
    cr_assert_eq(e.size, 12 * PAGE);
    /* origin 0 never joins */
    put(p, BASE + 20 * PAGE, PAGE, 0, 5);
    room(p);
    cr_assert_eq(_ta_pool_put(p, (ta_range_t){BASE + 21 * PAGE, PAGE, 0, 6}), 0);
    cr_assert_eq(p->count, 3);
    take(p, 8 * PAGE, PAGE, TA_POOL_SHORT); /* the origin-8 range, to be grown */
    take(p, 8 * PAGE, PAGE, TA_POOL_EMPTY); /* origin 0: never grown */
}

Test(pool, a_cut_leaves_the_rest_where_it_was_in_age_order)
{
    ta_pool_t *p = fresh();
    put(p, BASE, 64 * PAGE, 1, 100);             /* oldest */
    put(p, BASE + 100 * PAGE, 8 * PAGE, 2, 200); /* newer */
    ta_range_t r = take(p, 16 * PAGE, PAGE, TA_POOL_FIT);
    cr_assert_eq(r.addr, BASE);
    ta_range_t e;
    cr_assert(_ta_pool_expire_one(p, 150, SIZE_MAX, &e));
    cr_assert_eq(e.addr, BASE + 16 * PAGE, "the cut end is still the oldest");
    cr_assert_eq(e.size, 48 * PAGE);
    cr_assert_not(_ta_pool_expire_one(p, 150, SIZE_MAX, &e), "the newer range is not due");
    cr_assert(_ta_pool_expire_one(p, 150, 0, &e), "over the byte bound, the oldest goes");
    cr_assert_eq(e.addr, BASE + 100 * PAGE);
    check(p);
}

Test(pool, alignment_is_met_by_cutting_the_head)
{
    ta_pool_t *p = fresh();
    uintptr_t odd = BASE + 3 * PAGE; /* not 2 MiB aligned */
    put(p, odd, 3 * HUGE, 1, 1);
    ta_range_t r = take(p, HUGE, HUGE, TA_POOL_FIT);
    cr_assert_eq(r.addr % HUGE, 0);
    cr_assert_geq(r.addr, odd);
    cr_assert_leq(r.addr + r.size, odd + 3 * HUGE);
    cr_assert_eq(p->count, 2, "head and tail stay");
    cr_assert_eq(p->bytes, 3 * HUGE - r.size);
}

Test(pool, huge_pages_are_never_cut)
{
    ta_pool_t *p = fresh();
    put(p, BASE, 8 * HUGE, 1, 1);
    /* a block of 2 MiB and a bit keeps the rest of its second huge page */
    ta_range_t r = take(p, HUGE + PAGE, HUGE, TA_POOL_FIT);
    cr_assert_eq(r.addr, BASE);
    cr_assert_eq(r.size, 2 * HUGE);
    /* a small block comes off the end, the rest stays huge aligned */
    ta_range_t s = take(p, 5 * PAGE, PAGE, TA_POOL_FIT);
    cr_assert_eq(s.addr + s.size, BASE + 8 * HUGE);
    ta_range_t t = take(p, 4 * HUGE, HUGE, TA_POOL_FIT);
    cr_assert_eq(t.addr, BASE + 2 * HUGE);
}

Test(pool, nothing_big_enough_hands_out_the_largest_smaller)
{
    ta_pool_t *p = fresh();
    put(p, BASE, 4 * PAGE, 1, 1);
    put(p, BASE + 100 * PAGE, 40 * PAGE, 2, 2);
    put(p, BASE + 200 * PAGE, 9 * PAGE, 3, 3);
    ta_range_t r = take(p, 64 * PAGE, PAGE, TA_POOL_SHORT);
    cr_assert_eq(r.addr, BASE + 100 * PAGE);
    cr_assert_eq(r.size, 40 * PAGE);
    cr_assert_eq(p->count, 2);
}

/* Pieces for a block put together by mremap: whole ranges of a known
 * origin, the largest that fits what is left, none smaller than asked. */
Test(pool, pieces_are_whole_ranges_of_a_known_origin)
{
    ta_pool_t *p = fresh();
    put(p, BASE, 256 * PAGE, 1, 1);                /* 1 MiB */
    put(p, BASE + 1024 * PAGE, 1024 * PAGE, 2, 2); /* 4 MiB */
    put(p, BASE + 4096 * PAGE, 2048 * PAGE, 3, 3); /* 8 MiB */
    put(p, BASE + 8192 * PAGE, 1536 * PAGE, 0, 4); /* 6 MiB, origin unknown */
    ta_range_t r;
    cr_assert(_ta_pool_take_piece(p, 7 * (HUGE / 2), HUGE, &r)); /* at most 7 MiB */
    check(p);
    cr_assert_eq(r.addr, BASE + 1024 * PAGE, "the 4 MiB range, not the unknown 6 MiB one");
    cr_assert_eq(r.size, 4 << 20);
    cr_assert_not(_ta_pool_take_piece(p, 7 * (HUGE / 2), HUGE, &r), "1 MiB is below the minimum");
    cr_assert(_ta_pool_take_piece(p, 16 << 20, 0, &r));
    cr_assert_eq(r.size, 8 << 20);
    cr_assert_eq(p->count, 2);
    check(p);
}

/* A model of 100,000 tensors fits if its bytes do: no cap on ranges. */
Test(pool, one_hundred_thousand_ranges)
{
    ta_pool_t *p = fresh();
    const size_t n = 100000;
    for (size_t i = 0; i < n; i++) {
        room(p);
        /* every other slot, so that none join */
        _ta_pool_put(p, (ta_range_t){BASE + 2 * i * 16 * PAGE, 16 * PAGE, i + 1, i});
    }
    check(p);
    cr_assert_eq(p->count, n);
    for (size_t i = 0; i < n; i++) {
        room(p);
        ta_range_t r;
        cr_assert_eq(_ta_pool_take(p, 16 * PAGE, PAGE, &r), TA_POOL_FIT);
        cr_assert_eq(r.size, 16 * PAGE);
    }
    check(p);
    cr_assert_eq(p->count, 0);
}

/* ---- random operations against a page map ------------------------------- */

#define SPACE_PAGES 8192 /* 32 MiB of made-up address space */

enum { UNMAPPED, LIVE, POOLED };

static struct {
    unsigned char state[SPACE_PAGES];
    uint64_t origin[SPACE_PAGES];
    size_t pooled;
} m;

static uintptr_t addr_of(size_t page)
{
    return BASE + page * PAGE;
}

static size_t page_of(uintptr_t addr)
{
    return (addr - BASE) / PAGE;
}

/* Every page of r must be in state `from` with one origin; they go to `to`. */
static void move_pages(ta_range_t r, int from, int to)
{
    size_t first = page_of(r.addr), n = r.size / PAGE;
    cr_assert_leq(first + n, SPACE_PAGES);
    for (size_t i = first; i < first + n; i++) {
        cr_assert_eq(m.state[i], from, "page %zu is %d, expected %d", i, m.state[i], from);
        if (from == POOLED)
            cr_assert_eq(m.origin[i], r.origin, "a range mixes origins");
        m.state[i] = (unsigned char)to;
    }
    if (from == POOLED)
        m.pooled -= n;
    if (to == POOLED)
        m.pooled += n;
}

static uint64_t rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

Test(pool, random_operations_match_a_page_map)
{
    ta_pool_t *p = fresh();
    memset(&m, 0, sizeof m);
    uint64_t s = 42, ms = 0, next_origin = 1;
    size_t takes = 0, fits = 0;
    /* live blocks: a list of ranges */
    static ta_range_t live[SPACE_PAGES];
    size_t nlive = 0;
    for (int op = 0; op < 200000; op++) {
        ms += rnd(&s) % 3;
        unsigned what = (unsigned)(rnd(&s) % 10);
        if (what < 3) { /* map: a new live block in an unmapped run */
            size_t n = 1 + rnd(&s) % 64, at = rnd(&s) % (SPACE_PAGES - n);
            bool free_run = true;
            for (size_t i = at; i < at + n && free_run; i++)
                free_run = m.state[i] == UNMAPPED;
            if (!free_run)
                continue;
            uint64_t origin = rnd(&s) % 8 ? next_origin++ : 0;
            for (size_t i = at; i < at + n; i++) {
                m.state[i] = LIVE;
                m.origin[i] = origin;
            }
            live[nlive++] = (ta_range_t){addr_of(at), n * PAGE, origin, 0};
        } else if (what < 6 && nlive) { /* free a live block into the pool */
            size_t k = rnd(&s) % nlive;
            ta_range_t r = live[k];
            live[k] = live[--nlive];
            r.freed_ms = ms;
            move_pages(r, LIVE, POOLED);
            room(p);
            _ta_pool_put(p, r);
        } else if (what < 9) { /* take */
            size_t n = 1 + rnd(&s) % 80;
            size_t align = rnd(&s) % 4 == 0 ? 16 * PAGE : PAGE;
            room(p);
            ta_range_t r;
            ta_pool_take_t t = _ta_pool_take(p, n * PAGE, align, &r);
            takes++;
            if (t == TA_POOL_EMPTY)
                continue;
            if (t == TA_POOL_FIT) {
                fits++;
                cr_assert_geq(r.size, n * PAGE);
                cr_assert_eq(r.addr % align, 0);
            } else {
                cr_assert_lt(r.size, n * PAGE);
                cr_assert_neq(r.origin, 0, "a range of no known origin handed out to grow");
            }
            move_pages(r, POOLED, LIVE);
            live[nlive++] = r;
        } else { /* expire what is older than 50 ms, or over 8 MiB */
            ta_range_t r;
            while (_ta_pool_expire_one(p, ms > 50 ? ms - 50 : 0, 8 << 20, &r)) {
                cr_assert(r.freed_ms + 50 <= ms || p->bytes + r.size > (8 << 20));
                move_pages(r, POOLED, UNMAPPED);
            }
        }
        cr_assert_eq(p->bytes, m.pooled * PAGE, "op %d", op);
        if (op % 1000 == 0)
            check(p);
    }
    check(p);
    cr_log_info("%zu takes, %zu fits, %zu ranges left", takes, fits, p->count);
    cr_assert_gt(fits, takes / 10, "the pool served too few takes to test anything");
}
