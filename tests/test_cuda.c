/* SPDX-License-Identifier: MIT */
/*
 * Suite "cuda": the staging contract, against the CUDA runtime test double
 * (tests/cuda/fake_cudart.c, selected with TENSORALLOC_CUDART), and the real
 * libcudart on a machine without a GPU.
 */
#define _GNU_SOURCE
#include "helpers.h"
#include "core/core.h" /* _ta_large_pin_mark */
#include "tensoralloc_cuda.h"

#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static struct {
    long (*calls)(const char *);
    long (*violations)(const char **);
    size_t (*registered_bytes)(void);
    int (*registrations)(void);
    void (*fail_register)(long);
    void (*set_max_register)(size_t);
} fake;

static void use_fake(void)
{
    const char *path = getenv("FAKE_CUDART_PATH");
    cr_assert_not_null(path, "FAKE_CUDART_PATH not set (run through meson test)");
    setenv("TENSORALLOC_CUDART", path, 1);
    void *h = dlopen(path, RTLD_NOW);
    cr_assert_not_null(h, "%s", dlerror());
    *(void **)&fake.calls = dlsym(h, "fake_cudart_calls");
    *(void **)&fake.violations = dlsym(h, "fake_cudart_violations");
    *(void **)&fake.registered_bytes = dlsym(h, "fake_cudart_registered_bytes");
    *(void **)&fake.registrations = dlsym(h, "fake_cudart_registrations");
    *(void **)&fake.fail_register = dlsym(h, "fake_cudart_fail_register");
    *(void **)&fake.set_max_register = dlsym(h, "fake_cudart_set_max_register");
    cr_assert_eq(ta_cuda_init(0), 0);
}

static void no_violations(void)
{
    const char *last = NULL;
    long v = fake.violations(&last);
    cr_assert_eq(v, 0, "%ld contract violations, last: %s", v, last);
}

static uint64_t checksum(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

/* Every test has a deadline: a hang fails that test by name (Criterion
 * prints its report only at the end, so a suite that meson kills says
 * nothing). */
TestSuite(cuda, .init = use_fake, .timeout = 120);
TestSuite(cuda_nodevice, .timeout = 60);
TestSuite(cuda_real, .timeout = 60);

Test(cuda, pool_buffers_are_registered_once_and_reused)
{
    ta_pinned_pool_t *pool;
    cr_assert_eq(ta_pinned_pool_create(64 * MiB, &pool), 0);
    void *a, *b;
    cr_assert_eq(ta_pinned_acquire(pool, 3 * MiB + 5, &a), 0);
    cr_assert_eq((uintptr_t)a % 4096, 0, "page-aligned");
    memset(a, 1, 3 * MiB + 5);
    cr_assert_eq(ta_pinned_release(pool, a), 0);
    cr_assert_eq(ta_pinned_acquire(pool, 2 * MiB, &b), 0);
    cr_assert_eq(a, b, "a free buffer that fits is reused");
    cr_assert_eq(fake.calls("register"), 1);
    cr_assert_eq(ta_pinned_release(pool, b), 0);
    cr_assert_eq(ta_pinned_release(pool, b), EINVAL, "releasing twice");
    cr_assert_eq(ta_pinned_acquire(pool, 65 * MiB, &b), TA_EBUDGET);
    ta_pinned_pool_destroy(pool);
    cr_assert_eq(fake.registrations(), 0);
    cr_assert_eq(fake.calls("unregister"), 1);
    no_violations();
}

Test(cuda, pool_stays_within_its_budget)
{
    ta_pinned_pool_t *pool;
    cr_assert_eq(ta_pinned_pool_create(8 * MiB, &pool), 0);
    void *a, *b, *c;
    cr_assert_eq(ta_pinned_acquire(pool, 4 * MiB, &a), 0);
    cr_assert_eq(ta_pinned_acquire(pool, 1 * MiB, &b), 0);
    cr_assert_eq(ta_pinned_release(pool, b), 0);
    /* 4 + 4 > 8 with the 1 MiB buffer: the free one is dropped to make room */
    cr_assert_eq(ta_pinned_acquire(pool, 4 * MiB, &c), 0);
    cr_assert_leq(fake.registered_bytes(), 8 * MiB);
    ta_stats_t st = stats_now();
    (void)st;
    ta_pinned_release(pool, a);
    ta_pinned_release(pool, c);
    ta_pinned_pool_destroy(pool);
    no_violations();
}

Test(cuda, pin_in_place_and_free_unregisters_first)
{
    unsigned char *p = ta_malloc(8 * MiB);
    cr_assert_eq(ta_cuda_pin(p), 0);
    cr_assert_eq(fake.registered_bytes(), ta_usable_size(p));
    cr_assert_eq(ta_cuda_pin(p), TA_EPINNED);
    ta_cuda_stats_t cs = {.size = sizeof cs};
    cr_assert_eq(ta_cuda_stats_get(&cs), 0);
    cr_assert_eq(cs.registered_bytes, ta_usable_size(p));
    ta_free(p); /* must unregister before the pages are unmapped or pooled */
    cr_assert_eq(fake.registrations(), 0);
    cr_assert_eq(fake.calls("unregister"), 1);
    ta_trim(); /* now the mapping is really gone */
    no_violations();
}

Test(cuda, unpin_and_bad_pointers)
{
    unsigned char *p = ta_malloc(1 * MiB);
    cr_assert_eq(ta_cuda_unpin(p), TA_ENOTPINNED);
    cr_assert_eq(ta_cuda_pin(p), 0);
    cr_assert_eq(ta_cuda_unpin(p), 0);
    cr_assert_eq(fake.registrations(), 0);
    void *small = ta_malloc(100);
    cr_assert_eq(ta_cuda_pin(small), TA_ENOTLARGE);
    cr_assert_eq(ta_cuda_pin(p + 4096), TA_ENOTLARGE, "interior pointer");
    cr_assert_eq(ta_cuda_pin(NULL), EINVAL);
    cr_assert_str_eq(ta_strerror(TA_ENOTLARGE), "not the start of a live large block");
    ta_free(small);
    ta_free(p);
    no_violations();
}

Test(cuda, realloc_of_a_pinned_block_unpins_it)
{
    unsigned char *p = ta_malloc(4 * MiB);
    cr_assert_eq(ta_cuda_pin(p), 0);
    unsigned char *q = ta_realloc(p, 64 * MiB);
    cr_assert_not_null(q);
    cr_assert_eq(fake.registrations(), 0);
    ta_free(q);
    no_violations();
}

Test(cuda, large_registrations_are_chunked_and_rolled_back)
{
    cr_assert_eq(ta_cuda_set_register_chunk(1 * MiB), 0);
    cr_assert_eq(ta_cuda_set_register_chunk(1000), EINVAL);
    fake.set_max_register(1 * MiB); /* the "driver" refuses anything larger */
    unsigned char *p = ta_malloc(10 * MiB);
    cr_assert_eq(ta_cuda_pin(p), 0);
    cr_assert_eq(fake.registrations(), 10, "ten 1 MiB chunks");
    cr_assert_eq(ta_cuda_unpin(p), 0);
    cr_assert_eq(fake.registrations(), 0);
    /* the 4th chunk fails: the three before it must be undone */
    fake.fail_register(4);
    cr_assert_eq(ta_cuda_pin(p), TA_ECUDA);
    const char *msg;
    cr_assert_eq(ta_cuda_last_error(&msg), 2);
    cr_assert_str_eq(msg, "out of memory");
    cr_assert_eq(fake.registrations(), 0, "rolled back");
    cr_assert_eq(ta_cuda_pin(p), 0, "and the block can be pinned later");
    ta_free(p);
    cr_assert_eq(fake.registrations(), 0);
    no_violations();
}

static void round_trip(ta_pinned_pool_t *pool, size_t n, uint64_t seed)
{
    unsigned char *src = ta_malloc(n), *back = ta_malloc(n);
    for (size_t i = 0; i < n; i++)
        src[i] = (unsigned char)(((uint64_t)i * 2654435761u >> 13) ^ seed); /* no short period */
    void *dev;
    cr_assert_eq(ta_cuda_device_alloc(n, &dev), 0);
    cr_assert_eq(ta_cuda_copy_to_device(pool, dev, src, n), 0, "H2D %zu", n);
    memset(back, 0, n);
    cr_assert_eq(ta_cuda_copy_to_host(pool, back, dev, n), 0, "D2H %zu", n);
    cr_assert_eq(checksum(back, n), checksum(src, n), "data changed in a %zu-byte round trip", n);
    cr_assert_eq(ta_cuda_device_free(dev), 0);
    ta_free(src);
    ta_free(back);
}

Test(cuda, staged_copies_keep_data_intact_at_every_size, .timeout = 120)
{
    ta_pinned_pool_t *pool;
    cr_assert_eq(ta_cuda_set_staging_size(64 * KiB), 0); /* many chunks per copy */
    cr_assert_eq(ta_pinned_pool_create(4 * MiB, &pool), 0);
    size_t sizes[] = {1, 7, 4095, 4096, 64 * KiB - 1, 64 * KiB + 3, 1 * MiB + 17, 9 * MiB + 5};
    for (int i = 0; i < 8; i++)
        round_trip(pool, sizes[i], (uint64_t)i);
    ta_cuda_stats_t cs = {.size = sizeof cs};
    ta_cuda_stats_get(&cs);
    cr_assert_eq(cs.staged_copies, 16);
    cr_assert_eq(cs.h2d_bytes, cs.d2h_bytes);
    cr_assert_leq(fake.calls("register"), 4, "buffers are reused across copies");
    ta_pinned_pool_destroy(pool);
    no_violations();
}

Test(cuda, pinned_in_place_copies_go_direct)
{
    size_t n = 6 * MiB + 100;
    unsigned char *src = ta_malloc(n), *back = ta_malloc(n);
    for (size_t i = 0; i < n; i++)
        src[i] = (unsigned char)(i * 7);
    cr_assert_eq(ta_cuda_pin(src), 0);
    cr_assert_eq(ta_cuda_pin(back), 0);
    void *dev;
    cr_assert_eq(ta_cuda_device_alloc(n, &dev), 0);
    cr_assert_eq(ta_cuda_copy_to_device(NULL, dev, src, n), 0);
    cr_assert_eq(ta_cuda_copy_to_host(NULL, back, dev, n), 0);
    cr_assert_eq(checksum(back, n), checksum(src, n));
    ta_cuda_stats_t cs = {.size = sizeof cs};
    ta_cuda_stats_get(&cs);
    cr_assert_eq(cs.direct_copies, 2);
    cr_assert_eq(cs.staged_copies, 0);
    /* an unpinned source needs a pool */
    unsigned char *plain = ta_malloc(n);
    cr_assert_eq(ta_cuda_copy_to_device(NULL, dev, plain, n), EINVAL);
    ta_cuda_device_free(dev);
    ta_free(src);
    ta_free(back);
    ta_free(plain);
    no_violations();
}

static ta_pinned_pool_t *shared_pool;

static void *copier(void *arg)
{
    uint64_t seed = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < 4; i++)
        round_trip(shared_pool, 3 * MiB + (size_t)seed * 4099 + (size_t)i, seed * 10 + (uint64_t)i);
    return NULL;
}

Test(cuda, concurrent_copies_share_one_pool, .timeout = 120)
{
    cr_assert_eq(ta_cuda_set_staging_size(256 * KiB), 0);
    /* room for two copies' buffers at once: the others wait their turn */
    cr_assert_eq(ta_pinned_pool_create(1 * MiB, &shared_pool), 0);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, copier, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    cr_assert_leq(fake.registered_bytes(), 1 * MiB);
    ta_pinned_pool_destroy(shared_pool);
    no_violations();
}

Test(cuda, runtime_errors_are_propagated_with_their_code)
{
    cr_assert_eq(ta_cuda_init(1), TA_ECUDA); /* the double has one device */
    const char *msg;
    cr_assert_eq(ta_cuda_last_error(&msg), 1);
    cr_assert_str_eq(msg, "invalid argument");
    void *dev = (void *)0x1000;
    cr_assert_eq(ta_cuda_device_free(dev), TA_ECUDA);
    size_t fr, total;
    cr_assert_eq(ta_cuda_mem_info(&fr, &total), 0);
    cr_assert_eq(total, (size_t)16 << 30);
}

/* ---- without a device, and without a runtime ------------------------------ */

static void check_all_fail_with(int code)
{
    ta_pinned_pool_t *pool = NULL;
    void *dev = NULL;
    cr_assert_eq(ta_cuda_init(0), code);
    cr_assert_eq(ta_pinned_pool_create(MiB, &pool), code);
    cr_assert_eq(ta_cuda_device_alloc(MiB, &dev), code);
    unsigned char *p = ta_malloc(4 * MiB);
    cr_assert_eq(ta_cuda_pin(p), code);
    cr_assert_eq(ta_cuda_copy_to_device(NULL, (void *)0x1000, p, 10), code);
    cr_assert_eq(ta_cuda_copy_to_host(NULL, p, (void *)0x1000, 10), code);
    size_t a, b;
    cr_assert_eq(ta_cuda_mem_info(&a, &b), code);
    memset(p, 1, 4 * MiB); /* the allocator is unaffected */
    ta_free(p);
    cr_assert_not_null(ta_strerror(code));
}

Test(cuda_nodevice, every_call_reports_no_device)
{
    setenv("TENSORALLOC_CUDART", getenv("FAKE_CUDART_PATH"), 1);
    setenv("FAKE_CUDART_DEVICES", "0", 1);
    check_all_fail_with(TA_ENODEVICE);
    const char *msg;
    cr_assert_eq(ta_cuda_last_error(&msg), 100);
    cr_assert_str_eq(ta_strerror(TA_ENODEVICE), "no CUDA device or driver");
}

Test(cuda_nodevice, a_missing_runtime_is_reported)
{
    setenv("TENSORALLOC_CUDART", "/nonexistent/libcudart.so", 1);
    check_all_fail_with(TA_ENORUNTIME);
}

Test(cuda_real, real_runtime_without_gpu_fails_cleanly)
{
    const char *real = getenv("REAL_CUDART_PATH");
    if (real == NULL || access(real, R_OK) != 0)
        cr_skip_test("no real libcudart at %s", real ? real : "(unset)");
    setenv("TENSORALLOC_CUDART", real, 1);
    int rc = ta_cuda_init(0);
    if (rc == 0)
        cr_skip_test("a GPU is present: tools/gpu-check covers the real runtime");
    cr_assert_eq(rc, TA_ENODEVICE, "expected 'no device', got %d (%s)", rc, ta_strerror(rc));
    const char *msg;
    int code = ta_cuda_last_error(&msg);
    cr_assert(code == 100 || code == 35 || code == 34, "CUDA code %d (%s)", code, msg);
    check_all_fail_with(TA_ENODEVICE);
}

static atomic_int holder_running;

/* A child forked after the runtime was loaded must not call it (CUDA does
 * not survive fork), must not hang on locks a parent thread held, and can
 * still free blocks the parent pinned. */
static void *hold_pinned_lock(void *arg)
{
    atomic_store(&holder_running, 1);
    for (int i = 0; i < 2000; i++) {
        void *p = ta_malloc(4 * MiB);
        if (p && ta_cuda_pin(p) == 0)
            ta_cuda_unpin(p);
        ta_free(p);
    }
    return arg;
}

Test(cuda, forked_child_gets_no_device_and_frees_pinned_blocks)
{
    void *pinned = ta_malloc(8 * MiB);
    cr_assert_eq(ta_cuda_pin(pinned), 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, hold_pinned_lock, NULL), 0);
    /* Fork only once the thread runs: gcc 12's AddressSanitizer does not
     * hold its thread registry across fork, and a fork during the thread's
     * start leaves it locked in the child, whose first pthread_create (the
     * purge thread, started with every signal blocked, so the alarm below
     * cannot end it) then waits forever. */
    while (!atomic_load(&holder_running))
        sched_yield();
    for (int round = 0; round < 20; round++) {
        long before = fake.calls("cudaHostUnregister");
        pid_t pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
            alarm(10);
            int rc = ta_cuda_init(0);
            void *p = ta_malloc(4 * MiB);
            int pin = ta_cuda_pin(p);
            ta_free(p);
            ta_free(pinned); /* the parent's registration: forgotten, no CUDA call */
            bool ok = rc == TA_ENODEVICE && pin == TA_ENODEVICE &&
                      fake.calls("cudaHostUnregister") == before;
            _exit(ok ? 0 : 1);
        }
        int status;
        cr_assert(wait_child(pid, 30, &status), "round %d: the child hung for 30 s (killed)",
                  round);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "round %d: child status %d (SIGALRM = hung)", round, status);
    }
    pthread_join(t, NULL);
    ta_free(pinned);
    no_violations();
}

/* Staging buffers are registered with the driver, which may split their
 * VMA: the large path must treat them as pinned (never joined with their
 * neighbours), as it does blocks pinned in place. */
Test(cuda, staging_buffers_are_marked_pinned)
{
    ta_pinned_pool_t *pool;
    cr_assert_eq(ta_pinned_pool_create(64 * MiB, &pool), 0);
    void *a;
    cr_assert_eq(ta_pinned_acquire(pool, 3 * MiB, &a), 0);
    uintptr_t base;
    size_t cap;
    cr_assert_eq(_ta_large_pin_mark(a, true, &base, &cap), 1, "the buffer is not marked pinned");
    cr_assert_eq(ta_pinned_release(pool, a), 0);
    ta_pinned_pool_destroy(pool);
    cr_assert_eq(fake.registrations(), 0);
    no_violations();
}

/* Pool buffers are faulted in before they are registered (in parallel for
 * big ones): every page is resident when the double's register runs, which
 * touches none. */
Test(cuda, pool_buffers_are_resident_before_registration)
{
    ta_pinned_pool_t *pool;
    size_t size = 200 * MiB; /* four slices: several threads */
    cr_assert_eq(ta_pinned_pool_create(size, &pool), 0);
    void *p;
    size_t rss0 = rss_bytes();
    cr_assert_eq(ta_pinned_acquire(pool, size, &p), 0);
    size_t pages = size / 4096;
    unsigned char *vec = malloc(pages);
    cr_assert_eq(mincore(p, size, vec), 0);
    size_t resident = 0;
    for (size_t i = 0; i < pages; i++)
        resident += vec[i] & 1;
    free(vec);
    cr_assert_eq(resident, pages, "%zu of %zu pages resident", resident, pages);
    cr_assert_geq(rss_bytes() - rss0, size - 4 * MiB);
    ta_pinned_release(pool, p);
    ta_pinned_pool_destroy(pool);
    no_violations();
}
