/* SPDX-License-Identifier: MIT */
/* Suite "slab": size classes, block reuse, and small frees lowering RSS. */
#include "helpers.h"
#include "core/slab.h" /* _ta_small_selfcheck */

#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

/* One size per slab class, from 16 bytes to the largest, found through
 * the allocator itself (usable sizes are the class sizes). */
static size_t class_sizes(size_t *out, size_t cap)
{
    size_t n = 0;
    for (size_t size = 1; size <= 256 * KiB - 1 && n < cap;) {
        void *p = ta_malloc(size);
        size_t usable = ta_usable_size(p);
        ta_free(p);
        if (usable >= 256 * KiB)
            break; /* the large threshold: the sizes from here are not slab blocks */
        if (n == 0 || usable != out[n - 1])
            out[n++] = usable;
        size = usable + 1;
    }
    return n;
}

Test(slab, every_small_size_is_usable_and_disjoint)
{
    enum { N = 4096 };
    static unsigned char *p[N];
    static size_t n[N];
    for (int i = 0; i < N; i++) {
        n[i] = (size_t)(i * 37 % 20000) + 1;
        p[i] = ta_malloc(n[i]);
        cr_assert_not_null(p[i]);
        cr_assert_geq(ta_usable_size(p[i]), n[i]);
        pattern_fill(p[i], n[i], (uint64_t)i);
    }
    for (int i = 0; i < N; i++)
        cr_assert(pattern_ok(p[i], n[i], (uint64_t)i), "block %d (%zu B) overwritten", i, n[i]);
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
}

Test(slab, usable_size_is_a_class_size)
{
    cr_assert_eq(ta_usable_size(ta_malloc(1)), 16);
    cr_assert_eq(ta_usable_size(ta_malloc(17)), 32);
    cr_assert_eq(ta_usable_size(ta_malloc(129)), 160);
    cr_assert_eq(ta_usable_size(ta_malloc(1000)), 1024);
    cr_assert_eq(ta_usable_size(ta_malloc(1025)), 1280);
}

/* The owner's frees go to the span's local list, which becomes the
 * allocation list when that runs dry: a freed block comes back within one
 * span's worth of allocations, and the last one freed comes first. */
Test(slab, freed_block_is_reused)
{
    enum { SPAN_BLOCKS = 65536 / 48 };
    void *a = ta_malloc(48), *b = ta_malloc(48);
    ta_free(b);
    ta_free(a);
    static void *got[SPAN_BLOCKS + 2];
    size_t n = 0, at_a = 0, at_b = 0;
    while (n < SPAN_BLOCKS + 2 && !(at_a && at_b)) {
        got[n] = ta_malloc(48);
        if (got[n] == a)
            at_a = n + 1;
        if (got[n] == b)
            at_b = n + 1;
        n++;
    }
    cr_assert(at_a && at_b, "both freed blocks came back within a span's worth");
    cr_assert_eq(at_b, at_a + 1, "the last freed comes back first, the one before next");
    while (n)
        ta_free(got[--n]);
}

Test(slab, a_million_small_objects_freed_lower_rss)
{
    enum { N = 1000000 };
    void **p = ta_malloc(N * sizeof *p); /* 8 MB: a large block */
    size_t start = rss_bytes();
    for (int i = 0; i < N; i++) {
        p[i] = ta_malloc(16 + (size_t)(i % 8) * 16);
        cr_assert_not_null(p[i]);
        *(int *)p[i] = i;
    }
    bool check_rss = rss_meaningful();
    if (check_rss)
        cr_assert_gt(rss_bytes(), start + 50 * MiB);
    else
        cr_log_info("under valgrind or ASan: RSS bounds not checked");
    ta_stats_t st = stats_now();
    cr_assert_geq(st.small_live_bytes, (size_t)N * 16);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(*(int *)p[i], i);
        ta_free(p[i]);
    }
    ta_trim();
    size_t end = rss_bytes();
    if (check_rss)
        cr_assert_lt(end, start + 16 * MiB, "RSS %zu MiB above start", (end - start) >> 20);
    ta_free(p);
}

Test(slab, statistics_track_small_bytes)
{
    ta_stats_t a = stats_now();
    enum { N = 1000 };
    void *p[N];
    for (int i = 0; i < N; i++)
        p[i] = ta_malloc(1000); /* class 1024 */
    ta_stats_t b = stats_now();
    cr_assert_eq(b.small_live_bytes - a.small_live_bytes, (uint64_t)N * 1024);
    cr_assert_geq(b.small_committed_bytes, b.small_live_bytes);
    struct mallinfo2 mi = ta_mallinfo2();
    cr_assert_eq(mi.uordblks, b.small_live_bytes);
    cr_assert_eq(mi.arena, b.small_committed_bytes);
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
    ta_stats_t c = stats_now();
    cr_assert_eq(c.small_live_bytes, a.small_live_bytes);
}

/* The fast paths find a size class by table and a block index by a
 * multiply and a shift: both must agree with the plain arithmetic at every
 * size up to 1 KiB and every offset of every class's span. */
Test(slab, class_table_and_block_index_are_exact)
{
    cr_assert(_ta_small_selfcheck());
}

/* Freed blocks anywhere in a span must be found again (the local free
 * list becomes the allocation list): refilling the holes needs no new
 * span, and no block is handed out twice. */
Test(slab, freed_blocks_anywhere_in_a_span_are_found)
{
    enum { N = 3000 };
    static void *p[N];
    for (int i = 0; i < N; i++)
        cr_assert_not_null(p[i] = ta_malloc(48));
    uint64_t committed = stats_now().small_committed_bytes;
    for (int i = 0; i < N; i += 7) /* holes all over the spans */
        ta_free(p[i]);
    for (int i = 0; i < N; i += 7)
        p[i] = ta_malloc(48);
    cr_assert_eq(stats_now().small_committed_bytes, committed,
                 "a new span although holes were free");
    for (int i = 0; i < N; i++)
        for (int j = i + 1; j < N; j++)
            cr_assert_neq(p[i], p[j], "block %d handed out twice", i);
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
}

/* ---- the per-span lists: every state of a freed block is caught ---------- */

enum { FREED_LOCAL, FREED_REMOTE, REFILLED, STATES };
static const char *const state_names[STATES] = {"on the owner's local list",
                                                "on another thread's list",
                                                "on the allocation list after a refill"};

static void *free_in_thread(void *p)
{
    ta_free(p);
    return NULL;
}

/* In a child: frees a block of the given size twice, the first free
 * leaving it in the given state (or its span released, the big classes'
 * case: the report then says "double free or invalid pointer"). Returns what the child wrote to
 * stderr and whether it died of SIGABRT. */
static bool double_free_aborts(size_t size, int state, char *msg, size_t cap)
{
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        void *p = ta_malloc(size), *q = ta_malloc(size);
        if (state == FREED_REMOTE) {
            pthread_t t;
            pthread_create(&t, NULL, free_in_thread, p);
            pthread_join(t, NULL);
        } else {
            ta_free(p);
        }
        if (state == REFILLED) {
            /* q freed after p heads the local list; use the allocation list
             * up until the refill hands out q: p is then next on it. */
            ta_free(q);
            for (int i = 0; i < 5000 && ta_malloc(size) != q; i++)
                ;
        }
        ta_free(p);
        _exit(q != NULL ? 0 : 1); /* not reached when caught */
    }
    close(fds[1]);
    ssize_t got = read(fds[0], msg, cap - 1);
    msg[got > 0 ? got : 0] = 0;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

Test(slab, double_free_of_every_class_is_caught_in_every_state)
{
    size_t sizes[80];
    size_t n = class_sizes(sizes, 80);
    cr_assert_geq(n, 50, "%zu classes", n);
    for (size_t c = 0; c < n; c++) {
        for (int state = 0; state < STATES; state++) {
            if (state == REFILLED && sizes[c] > 4 * KiB)
                continue; /* a refill of a big class takes many blocks of memory */
            char msg[512];
            bool aborted = double_free_aborts(sizes[c], state, msg, sizeof msg);
            cr_assert(aborted && strstr(msg, "double free"), "%zu-byte block freed twice, %s: %s",
                      sizes[c], state_names[state], aborted ? msg : "not caught");
        }
    }
}

Test(slab, every_class_honours_every_alignment)
{
    size_t sizes[80];
    size_t n = class_sizes(sizes, 80);
    for (size_t c = 0; c < n; c++) {
        for (size_t align = 16; align <= 64 * KiB; align *= 2) {
            size_t size = sizes[c] - (sizes[c] > 16 ? 8 : 0);
            void *p = ta_aligned_alloc(align, size);
            cr_assert_not_null(p, "%zu bytes at %zu", size, align);
            cr_assert_eq((uintptr_t)p % align, 0, "%zu bytes at %zu: %p", size, align, p);
            cr_assert_geq(ta_usable_size(p), size);
            pattern_fill(p, size, c * 64 + align);
            void *q = ta_aligned_alloc(align, size); /* a neighbour, for the pattern */
            pattern_fill(q, size, ~(c * 64 + align));
            cr_assert(pattern_ok(p, size, c * 64 + align), "%zu bytes at %zu overlap", size, align);
            ta_free(q);
            ta_free(p);
        }
    }
}

/* Freed slab pages go back to the kernel once a heap holds more than
 * 8 MiB of them, or once they have waited RETAIN_MS. Big spans' pages wait
 * like the others: a program that frees a few and allocates again (mixed
 * sizes up to 64 KiB, realloc) reuses them without faults. */
Test(slab, empty_spans_are_purged)
{
    ta_option_set(TA_OPT_RETAIN_MS, 2000); /* no purge by age while the big blocks go */
    enum { BIG = 60, FEW = 8, SMALL = 40000 };
    static void *big[BIG], *small[SMALL];
    size_t before = rss_bytes();
    for (int i = 0; i < BIG; i++) {
        big[i] = ta_malloc(200 * KiB); /* below the large threshold: slab spans of 4+ pages */
        memset(big[i], 1, 200 * KiB);
    }
    size_t full = rss_bytes();
    for (int i = 0; i < FEW; i++)
        ta_free(big[i]);
    size_t after_few = rss_bytes();
    for (int i = FEW; i < BIG; i++)
        ta_free(big[i]);
    size_t after_big = rss_bytes();
    cr_log_info("200 KiB blocks: RSS %zu MiB above start, %zu after %d frees, %zu after all",
                (full - before) / MiB, (after_few - before) / MiB, FEW, (after_big - before) / MiB);
    cr_assert_geq(after_few + 256 * KiB, full, "a few big spans' pages did not wait");
    cr_assert_lt(after_big, full - (BIG * 200 * KiB) / 2, "big spans kept their pages past 8 MiB");

    ta_option_set(TA_OPT_RETAIN_MS, 50);
    for (int i = 0; i < SMALL; i++) {
        small[i] = ta_malloc(100);
        memset(small[i], 2, 100);
    }
    for (int i = 0; i < SMALL; i++)
        ta_free(small[i]);
    uint64_t dirty = stats_now().small_dirty_bytes;
    usleep(80 * 1000); /* past RETAIN_MS: the next span release purges */
    for (int i = 0; i < 60; i++)
        small[i] = ta_malloc(3000); /* a class of its own: three spans, two released */
    for (int i = 0; i < 60; i++)
        ta_free(small[i]);
    uint64_t dirty_later = stats_now().small_dirty_bytes;
    cr_log_info("free slab pages: %llu KiB, %llu KiB after RETAIN_MS",
                (unsigned long long)dirty / 1024, (unsigned long long)dirty_later / 1024);
    cr_assert_gt(dirty, 0);
    cr_assert_lt(dirty_later, dirty, "free pages older than RETAIN_MS were kept");
}

/* Random operations against a model: every live block carries a pattern
 * (checked before it is freed and at checkpoints), sizes are honoured,
 * zeroed blocks are zero, and no two live blocks overlap. */
typedef struct {
    unsigned char *p;
    size_t size;
    uint64_t seed;
} model_block_t;

static int by_address(const void *a, const void *b)
{
    const model_block_t *x = a, *y = b;
    return x->p < y->p ? -1 : x->p > y->p;
}

Test(slab, random_operations_match_a_model, .timeout = 120)
{
    enum { SLOTS = 4096, OPS = 300000 };
    static model_block_t live[SLOTS], sorted[SLOTS];
    uint64_t s = 12345;
    for (int op = 0; op < OPS; op++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        uint64_t r = s >> 11;
        model_block_t *b = &live[r % SLOTS];
        if (b->p) {
            cr_assert(pattern_ok(b->p, b->size, b->seed), "op %d: block %p of %zu changed", op,
                      (void *)b->p, b->size);
            if ((r >> 12) % 4 == 0) { /* realloc keeps the common part */
                size_t size = 1 + (r >> 14) % (r & (1 << 20) ? 20000 : 600);
                unsigned char *q = ta_realloc(b->p, size);
                cr_assert_not_null(q);
                size_t keep = size < b->size ? size : b->size;
                cr_assert(pattern_ok(q, keep, b->seed), "op %d: realloc lost the contents", op);
                b->p = q;
                b->size = size;
                pattern_fill(q, size, b->seed);
                continue;
            }
            ta_free(b->p);
            b->p = NULL;
            continue;
        }
        size_t size = 1 + (r >> 14) % ((r & 0xF00) == 0 ? 70000 : 700);
        switch ((r >> 40) % 3) {
        case 0: b->p = ta_malloc(size); break;
        case 1:
            b->p = ta_calloc(1, size);
            cr_assert_not_null(b->p);
            for (size_t i = 0; i < size; i++)
                cr_assert_eq(b->p[i], 0, "op %d: calloc'd byte %zu not zero", op, i);
            break;
        default:
            b->p = ta_aligned_alloc((size_t)16 << ((r >> 44) % 8), size);
            cr_assert_eq((uintptr_t)b->p % ((size_t)16 << ((r >> 44) % 8)), 0);
            break;
        }
        cr_assert_not_null(b->p);
        cr_assert_geq(ta_usable_size(b->p), size);
        b->size = size;
        b->seed = r;
        pattern_fill(b->p, size, r);
        if (op % 50000 == 49999) { /* checkpoint: live blocks are disjoint */
            size_t n = 0;
            for (int i = 0; i < SLOTS; i++)
                if (live[i].p)
                    sorted[n++] = live[i];
            qsort(sorted, n, sizeof *sorted, by_address);
            for (size_t i = 1; i < n; i++)
                cr_assert_geq(sorted[i].p, sorted[i - 1].p + sorted[i - 1].size,
                              "op %d: live blocks overlap", op);
        }
    }
    for (int i = 0; i < SLOTS; i++)
        if (live[i].p) {
            cr_assert(pattern_ok(live[i].p, live[i].size, live[i].seed));
            ta_free(live[i].p);
        }
}

/* A new span takes free pages still backed by memory before fresh ones:
 * the newest segment heads the heap's list, so first fit alone took its
 * untouched pages while an older segment's freed pages waited, resident
 * (rptest: 10.7 MiB peak RSS against 7.5 with nothing waiting). */
Test(slab, new_spans_reuse_waiting_pages_before_fresh_ones)
{
    ta_option_set(TA_OPT_RETAIN_MS, 60000); /* nothing purged by age meanwhile */
    enum { MAX = 8192 };
    static void *blocks[MAX];
    uintptr_t first_seg = 0;
    int n = 0;
    /* 1 KiB blocks until a second segment has begun */
    for (; n < MAX; n++) {
        blocks[n] = ta_malloc(1000);
        cr_assert_not_null(blocks[n]);
        memset(blocks[n], 3, 1000);
        uintptr_t seg = (uintptr_t)blocks[n] >> 22;
        if (n == 0)
            first_seg = seg;
        else if (seg != first_seg && n % 64 == 63)
            break;
    }
    cr_assert_lt(n, MAX, "8192 blocks of 1 KiB filled no segment");
    int freed = 0;
    for (int i = 0; i <= n; i++)
        if ((uintptr_t)blocks[i] >> 22 == first_seg) {
            ta_free(blocks[i]);
            blocks[i] = NULL;
            freed++;
        }
    cr_assert_gt(stats_now().small_dirty_bytes, 0, "the freed spans' pages did not wait");
    /* another class: a span of its own, which the old segment's waiting
     * pages can hold */
    void *other = ta_malloc(500);
    cr_assert_not_null(other);
    cr_log_info("%d blocks freed from the first segment; a 500 B block went to %s one", freed,
                (uintptr_t)other >> 22 == first_seg ? "the first" : "a newer");
    cr_assert_eq((uintptr_t)other >> 22, first_seg,
                 "a new span took fresh pages while freed ones waited");
    ta_free(other);
    for (int i = 0; i <= n; i++)
        ta_free(blocks[i]);
}

/* Looking for waiting pages first must not cost a heap that only grows:
 * walking every full segment for each new span made growth quadratic (4
 * GiB of 16000 B blocks took 1.6 s against 0.2, a review's probe). */
Test(slab, a_growing_heap_does_not_walk_its_segments_for_waiting_pages)
{
    enum { N = 65536 }; /* 64 MiB of 1000 B blocks: 16 segments and more */
    void **p = ta_malloc(N * sizeof *p);
    cr_assert_not_null(p);
    uint64_t before = atomic_load(&_ta_small_waiting_walks);
    for (int i = 0; i < N; i++) {
        p[i] = ta_malloc(1000);
        cr_assert_not_null(p[i]);
    }
    uint64_t walks = atomic_load(&_ta_small_waiting_walks) - before;
    cr_log_info("segments looked at for waiting pages while growing: %llu",
                (unsigned long long)walks);
    cr_assert_eq(walks, 0, "nothing was freed, yet span_new looked for waiting pages");
    for (int i = 0; i < N; i++)
        ta_free(p[i]);
    ta_free(p);
}
