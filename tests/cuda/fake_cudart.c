/* SPDX-License-Identifier: MIT */
/*
 * A test double of the CUDA runtime, for machines without a GPU. It
 * implements the entry points tensoralloc resolves, with host memory as
 * "device" memory and one worker thread per stream so that copies really
 * are asynchronous (a staging buffer reused too early shows up as corrupt
 * data). It checks the registration contract and records every call:
 *
 * - cudaHostRegister of a range overlapping a registration fails (712);
 * - cudaHostUnregister must name a registered base (713), and the range
 *   must still be mapped (checked with mincore): unmapping first is a
 *   violation;
 * - async copies must read or write registered host memory (or
 *   cudaMallocHost memory) and device allocations, in range;
 * - a registration larger than fake_cudart_set_max_register() fails (2),
 *   and fake_cudart_fail_register(n) makes the nth call fail.
 *
 * The fake_cudart_* functions let tests inspect all this.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

/* The entry points' prototypes are the CUDA runtime's; this file stands in
 * for a library whose header it does not include. */
#pragma GCC diagnostic ignored "-Wmissing-prototypes"
#define MAX_RANGES 4096

typedef int err_t;
enum {
    OK = 0,
    E_INVALID = 1,
    E_NOMEM = 2,
    E_NODEVICE = 100,
    E_REGISTERED = 712,
    E_NOTREGISTERED = 713
};

typedef struct {
    uintptr_t base;
    size_t size;
    int kind; /* 1 registered, 2 device, 3 mallocHost */
} range_t;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* A child forked while another thread held mu must still be able to read
 * the counters (the fork test does): held across fork, made anew in the
 * child. */
static void fork_prepare(void)
{
    pthread_mutex_lock(&mu);
}
static void fork_parent(void)
{
    pthread_mutex_unlock(&mu);
}
static void fork_child(void)
{
    pthread_mutex_init(&mu, NULL);
}
__attribute__((constructor)) static void fake_atfork(void)
{
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}
static range_t ranges[MAX_RANGES];
static int nranges;
static long calls_register, calls_unregister, calls_copy, violations, fail_register_at;
static size_t max_register = (size_t)1 << 62;
static size_t registered_bytes;
static char last_violation[256];
static char log_buf[1 << 16];
static size_t log_len;

static void logf_locked(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_locked(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (log_len < sizeof log_buf - 128)
        log_len += (size_t)vsnprintf(log_buf + log_len, sizeof log_buf - log_len, fmt, ap);
    va_end(ap);
}

static void violation_locked(const char *what, const void *p)
{
    violations++;
    snprintf(last_violation, sizeof last_violation, "%s (%p)", what, p);
    logf_locked("VIOLATION %s %p\n", what, p);
}

static int find_covering(const void *p, size_t n, int kind)
{
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < nranges; i++)
        if (ranges[i].kind == kind && a >= ranges[i].base &&
            a + n <= ranges[i].base + ranges[i].size)
            return i;
    return -1;
}

static void range_remove(int i)
{
    ranges[i] = ranges[--nranges];
}

/* ---- inspection, for tests ---------------------------------------------- */

/* The start of the i-th registered host range, or NULL. */
API void *fake_cudart_registered_range(int i)
{
    void *p = NULL;
    pthread_mutex_lock(&mu);
    for (int j = 0, k = 0; j < nranges && !p; j++)
        if (ranges[j].kind == 1 && k++ == i)
            p = (void *)ranges[j].base;
    pthread_mutex_unlock(&mu);
    return p;
}

API long fake_cudart_calls(const char *which)
{
    pthread_mutex_lock(&mu);
    long v = !strcmp(which, "register")     ? calls_register
             : !strcmp(which, "unregister") ? calls_unregister
             : !strcmp(which, "copy")       ? calls_copy
                                            : -1;
    pthread_mutex_unlock(&mu);
    return v;
}
API long fake_cudart_violations(const char **last)
{
    pthread_mutex_lock(&mu);
    long v = violations;
    if (last)
        *last = last_violation;
    pthread_mutex_unlock(&mu);
    return v;
}
API size_t fake_cudart_registered_bytes(void)
{
    pthread_mutex_lock(&mu);
    size_t v = registered_bytes;
    pthread_mutex_unlock(&mu);
    return v;
}
API int fake_cudart_registrations(void)
{
    pthread_mutex_lock(&mu);
    int n = 0;
    for (int i = 0; i < nranges; i++)
        n += ranges[i].kind == 1;
    pthread_mutex_unlock(&mu);
    return n;
}
API void fake_cudart_fail_register(long nth) /* counted from the next call */
{
    pthread_mutex_lock(&mu);
    fail_register_at = nth ? calls_register + nth : 0;
    pthread_mutex_unlock(&mu);
}
API void fake_cudart_set_max_register(size_t bytes)
{
    pthread_mutex_lock(&mu);
    max_register = bytes;
    pthread_mutex_unlock(&mu);
}
API const char *fake_cudart_log(void)
{
    return log_buf;
}

/* ---- streams: a worker thread runs each stream's queue in order ---------- */

typedef struct op_s {
    int is_event;
    void *dst;
    const void *src;
    size_t n;
    atomic_int *done; /* events */
    struct op_s *next;
} op_t;

typedef struct {
    pthread_mutex_t m;
    pthread_cond_t cv;
    op_t *head, *tail;
    int pending, stop;
    pthread_t thread;
} stream_t;

typedef struct {
    atomic_int done;
    atomic_int recorded;
} event_t;

static void *stream_main(void *arg)
{
    stream_t *s = arg;
    pthread_mutex_lock(&s->m);
    for (;;) {
        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cv, &s->m);
        if (!s->head && s->stop)
            break;
        op_t *op = s->head;
        s->head = op->next;
        if (!s->head)
            s->tail = NULL;
        pthread_mutex_unlock(&s->m);
        if (op->is_event) {
            atomic_store(op->done, 1);
        } else {
            usleep(200); /* a DMA takes time: widen the window for races */
            memcpy(op->dst, op->src, op->n);
        }
        free(op);
        pthread_mutex_lock(&s->m);
        s->pending--;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->m);
    return NULL;
}

static void stream_push(stream_t *s, op_t *op)
{
    pthread_mutex_lock(&s->m);
    op->next = NULL;
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    s->pending++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->m);
}

static void stream_wait(stream_t *s)
{
    pthread_mutex_lock(&s->m);
    while (s->pending)
        pthread_cond_wait(&s->cv, &s->m);
    pthread_mutex_unlock(&s->m);
}

/* ---- the runtime entry points --------------------------------------------- */

API err_t cudaGetDeviceCount(int *count)
{
    const char *e = getenv("FAKE_CUDART_DEVICES");
    *count = e ? atoi(e) : 1;
    return *count ? OK : E_NODEVICE;
}

API err_t cudaSetDevice(int device)
{
    return device == 0 ? OK : E_INVALID;
}

API const char *cudaGetErrorString(err_t e)
{
    switch (e) {
    case OK: return "no error";
    case E_INVALID: return "invalid argument";
    case E_NOMEM: return "out of memory";
    case E_NODEVICE: return "no CUDA-capable device is detected";
    case E_REGISTERED: return "part or all of the requested memory range is already mapped";
    case E_NOTREGISTERED: return "pointer does not correspond to a registered memory region";
    default: return "unknown error";
    }
}

API err_t cudaGetLastError(void)
{
    return OK;
}

API err_t cudaHostRegister(void *p, size_t n, unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&mu);
    calls_register++;
    logf_locked("register %p %zu\n", p, n);
    err_t rc = OK;
    uintptr_t a = (uintptr_t)p;
    if (fail_register_at && calls_register == fail_register_at) {
        rc = E_NOMEM;
    } else if (n == 0 || n > max_register || nranges == MAX_RANGES) {
        rc = n == 0 ? E_INVALID : E_NOMEM;
    } else {
        if (a % 4096 || n % 4096)
            violation_locked("register of a range not page-aligned", p);
        for (int i = 0; i < nranges; i++)
            if (ranges[i].kind == 1 && a < ranges[i].base + ranges[i].size &&
                ranges[i].base < a + n)
                rc = E_REGISTERED;
        if (rc == OK) {
            ranges[nranges++] = (range_t){a, n, 1};
            registered_bytes += n;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

API err_t cudaHostUnregister(void *p)
{
    pthread_mutex_lock(&mu);
    calls_unregister++;
    logf_locked("unregister %p\n", p);
    err_t rc = E_NOTREGISTERED;
    for (int i = 0; i < nranges; i++)
        if (ranges[i].kind == 1 && ranges[i].base == (uintptr_t)p) {
            unsigned char vec[1];
            for (size_t off = 0; off < ranges[i].size; off += 4096)
                if (mincore((char *)p + off, 4096, vec) != 0) {
                    violation_locked("unregister after the range was unmapped", p);
                    break;
                }
            registered_bytes -= ranges[i].size;
            range_remove(i);
            rc = OK;
            break;
        }
    pthread_mutex_unlock(&mu);
    return rc;
}

API err_t cudaMalloc(void **p, size_t n)
{
    void *m = malloc(n ? n : 1);
    if (!m)
        return E_NOMEM;
    pthread_mutex_lock(&mu);
    ranges[nranges++] = (range_t){(uintptr_t)m, n, 2};
    pthread_mutex_unlock(&mu);
    *p = m;
    return OK;
}

API err_t cudaFree(void *p)
{
    if (!p)
        return OK;
    pthread_mutex_lock(&mu);
    int i = find_covering(p, 0, 2);
    if (i >= 0 && ranges[i].base == (uintptr_t)p)
        range_remove(i);
    else
        i = -1;
    pthread_mutex_unlock(&mu);
    if (i < 0)
        return E_INVALID;
    free(p);
    return OK;
}

API err_t cudaMemGetInfo(size_t *free_b, size_t *total)
{
    *total = (size_t)16 << 30;
    size_t used = 0;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < nranges; i++)
        if (ranges[i].kind == 2)
            used += ranges[i].size;
    pthread_mutex_unlock(&mu);
    *free_b = *total > used ? *total - used : 0;
    return OK;
}

API err_t cudaMallocHost(void **p, size_t n)
{
    void *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return E_NOMEM;
    pthread_mutex_lock(&mu);
    ranges[nranges++] = (range_t){(uintptr_t)m, n, 3};
    pthread_mutex_unlock(&mu);
    *p = m;
    return OK;
}

API err_t cudaFreeHost(void *p)
{
    pthread_mutex_lock(&mu);
    int i = find_covering(p, 0, 3);
    size_t n = i >= 0 ? ranges[i].size : 0;
    if (i >= 0)
        range_remove(i);
    pthread_mutex_unlock(&mu);
    if (i < 0)
        return E_INVALID;
    munmap(p, n);
    return OK;
}

API err_t cudaStreamCreateWithFlags(stream_t **out, unsigned int flags)
{
    (void)flags;
    stream_t *s = calloc(1, sizeof *s);
    pthread_mutex_init(&s->m, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_create(&s->thread, NULL, stream_main, s);
    *out = s;
    return OK;
}

API err_t cudaStreamSynchronize(stream_t *s)
{
    stream_wait(s);
    return OK;
}

API err_t cudaStreamDestroy(stream_t *s)
{
    stream_wait(s);
    pthread_mutex_lock(&s->m);
    s->stop = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->m);
    pthread_join(s->thread, NULL);
    free(s);
    return OK;
}

API err_t cudaEventCreateWithFlags(event_t **out, unsigned int flags)
{
    (void)flags;
    event_t *e = calloc(1, sizeof *e);
    atomic_store(&e->done, 1);
    *out = e;
    return OK;
}

API err_t cudaEventRecord(event_t *e, stream_t *s)
{
    atomic_store(&e->done, 0);
    atomic_store(&e->recorded, 1);
    op_t *op = calloc(1, sizeof *op);
    op->is_event = 1;
    op->done = &e->done;
    stream_push(s, op);
    return OK;
}

API err_t cudaEventSynchronize(event_t *e)
{
    while (!atomic_load(&e->done))
        usleep(50);
    return OK;
}

API err_t cudaEventDestroy(event_t *e)
{
    free(e);
    return OK;
}

API err_t cudaMemcpyAsync(void *dst, const void *src, size_t n, int kind, stream_t *s)
{
    pthread_mutex_lock(&mu);
    calls_copy++;
    err_t rc = OK;
    const void *host = kind == 1 ? src : dst;
    const void *dev = kind == 1 ? dst : src;
    if (kind != 1 && kind != 2) {
        rc = E_INVALID;
    } else if (find_covering(dev, n, 2) < 0) {
        violation_locked("copy to or from memory that is not a device allocation", dev);
        rc = E_INVALID;
    } else if (find_covering(host, n, 1) < 0 && find_covering(host, n, 3) < 0) {
        violation_locked("async copy with unregistered host memory", host);
    }
    pthread_mutex_unlock(&mu);
    if (rc != OK)
        return rc;
    op_t *op = calloc(1, sizeof *op);
    op->dst = dst;
    op->src = src;
    op->n = n;
    stream_push(s, op);
    return OK;
}

API err_t cudaDeviceSynchronize(void)
{
    return OK;
}

/* Synchronous copy: pageable host memory is allowed here. */
API err_t cudaMemcpy(void *dst, const void *src, size_t n, int kind)
{
    pthread_mutex_lock(&mu);
    const void *dev = kind == 1 ? dst : src;
    int bad = (kind != 1 && kind != 2) || find_covering(dev, n, 2) < 0;
    pthread_mutex_unlock(&mu);
    if (bad)
        return E_INVALID;
    memcpy(dst, src, n);
    return OK;
}
