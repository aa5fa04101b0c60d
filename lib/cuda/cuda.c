/* SPDX-License-Identifier: MIT */
/*
 * CUDA staging: pinned host buffers that are tensoralloc mappings
 * registered with cudaHostRegister, pinning of large blocks in place, and
 * double-buffered copies. libcudart is loaded with dlopen on first use and
 * never linked, so the library runs on machines without a GPU.
 *
 * Registration rules (sources in docs/cuda.md, "Registration rules, and
 * why"): page-aligned ranges
 * only; at most 64 GiB per cudaHostRegister call (single registrations of
 * 512 GiB fail), earlier chunks rolled back when one fails; every range is
 * unregistered before its pages are unmapped, pooled or moved (the driver
 * otherwise keeps stale tracking of the range).
 */
#define _GNU_SOURCE
#include "cuda_abi.h"
#include "core/core.h"
#include "staging.h"
#include "tensoralloc_cuda.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- the runtime, loaded once --------------------------------------------- */

static struct {
#define X(name, ret, params) ret(*name) params;
    TA_CUDART_FUNCS(X)
#undef X
    void *handle;
} rt;

static pthread_mutex_t rt_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pinned_mutex = PTHREAD_MUTEX_INITIALIZER; /* blocks pinned in place */
static int rt_status = -1; /* -1 not tried, 0 loaded, else the error code */
static int rt_device = -1;
static TA_TLS int tls_device = -1;
static TA_TLS int last_code;
static TA_TLS const char *last_message;

/* Records a failed CUDA call; "no device" kinds map to TA_ENODEVICE. */
static int cuda_fail(ta_cuerr_t e)
{
    last_code = (int)e;
    last_message = rt.cudaGetErrorString ? rt.cudaGetErrorString(e) : "unknown CUDA error";
    if (rt.cudaGetLastError)
        rt.cudaGetLastError(); /* clear it, so it is not reported later elsewhere */
    if (e == TA_CU_ERR_NODEVICE || e == TA_CU_ERR_DRIVER || e == TA_CU_ERR_STUB)
        return TA_ENODEVICE;
    return TA_ECUDA;
}

static void unpin_hook(uintptr_t base, size_t capacity);

/* ---- fork: CUDA cannot be used in a child of a process that loaded the
 * runtime (CUDA C Programming Guide, "Initialization"). The child gets
 * fresh locks, its runtime state says "no device", and pinned blocks it
 * frees are forgotten without calling the runtime. */
static bool forked_child; /* set in the child only, before it runs anything */
static ta_lock_t stats_lock;

static void cuda_fork_prepare(void)
{
    pthread_mutex_lock(&rt_mutex);
    pthread_mutex_lock(&pinned_mutex);
    _ta_lock(&stats_lock);
}

static void cuda_fork_parent(void)
{
    _ta_unlock(&stats_lock);
    pthread_mutex_unlock(&pinned_mutex);
    pthread_mutex_unlock(&rt_mutex);
}

static void cuda_fork_child(void)
{
    _ta_unlock(&stats_lock);
    pthread_mutex_init(&pinned_mutex, NULL);
    pthread_mutex_init(&rt_mutex, NULL);
    if (rt_status == 0) {
        forked_child = true;
        __atomic_store_n(&rt_status, TA_ENODEVICE, __ATOMIC_RELEASE);
        last_code = TA_CU_ERR_NODEVICE;
        last_message = "the CUDA runtime cannot be used in a child forked after it was loaded";
    }
}

static void cuda_fork_register(void)
{
    _ta_os_at_fork(cuda_fork_prepare, cuda_fork_parent, cuda_fork_child);
}

static int rt_load_locked(void)
{
    const char *chosen = _ta_os_getenv("TENSORALLOC_CUDART");
    const char *candidates[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so"};
    if (chosen && *chosen) {
        rt.handle = dlopen(chosen, RTLD_NOW | RTLD_LOCAL);
    } else {
        for (size_t i = 0; i < sizeof candidates / sizeof *candidates && !rt.handle; i++)
            rt.handle = dlopen(candidates[i], RTLD_NOW | RTLD_LOCAL);
    }
    if (rt.handle == NULL) {
        last_message = "libcudart could not be loaded";
        return TA_ENORUNTIME;
    }
#define X(name, ret, params)                                                                       \
    *(void **)&rt.name = dlsym(rt.handle, #name);                                                  \
    if (rt.name == NULL) {                                                                         \
        last_message = "libcudart lacks " #name;                                                   \
        dlclose(rt.handle);                                                                        \
        memset(&rt, 0, sizeof rt);                                                                 \
        return TA_ENORUNTIME;                                                                      \
    }
    TA_CUDART_FUNCS(X)
#undef X
    int count = 0;
    ta_cuerr_t e = rt.cudaGetDeviceCount(&count);
    if (e != TA_CU_SUCCESS)
        return cuda_fail(e);
    if (count == 0) {
        last_code = TA_CU_ERR_NODEVICE;
        last_message = "no CUDA device";
        return TA_ENODEVICE;
    }
    _ta_large_set_unpin_hook(unpin_hook);
    return 0;
}

int ta_cuda_init(int device)
{
    static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
    if (device < 0)
        return EINVAL;
    pthread_once(&fork_once, cuda_fork_register);
    pthread_mutex_lock(&rt_mutex);
    if (rt_status < 0)
        __atomic_store_n(&rt_status, rt_load_locked(), __ATOMIC_RELEASE);
    int rc = rt_status;
    if (rc == 0 && rt_device != device) {
        ta_cuerr_t e = rt.cudaSetDevice(device);
        if (e != TA_CU_SUCCESS)
            rc = cuda_fail(e);
        else
            __atomic_store_n(&rt_device, tls_device = device, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&rt_mutex);
    return rc;
}

/* The runtime is loaded and this thread uses the chosen device. */
static int ensure(void)
{
    int device = __atomic_load_n(&rt_device, __ATOMIC_ACQUIRE);
    if (TA_LIKELY(__atomic_load_n(&rt_status, __ATOMIC_ACQUIRE) == 0 && device >= 0 &&
                  tls_device == device))
        return 0;
    int rc = ta_cuda_init(device >= 0 ? device : 0);
    device = __atomic_load_n(&rt_device, __ATOMIC_ACQUIRE);
    if (rc == 0 && tls_device != device) {
        ta_cuerr_t e = rt.cudaSetDevice(device); /* the current device is per thread */
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
        tls_device = device;
    }
    return rc;
}

bool _ta_cuda_ready(void)
{
    return __atomic_load_n(&rt_status, __ATOMIC_ACQUIRE) == 0 &&
           __atomic_load_n(&rt_device, __ATOMIC_ACQUIRE) >= 0;
}

int ta_cuda_last_error(const char **message)
{
    if (message)
        *message = last_message ? last_message : "no error";
    return last_code;
}

/* ---- statistics ----------------------------------------------------------------- */

static ta_cuda_stats_t cstats;

int ta_cuda_stats_get(ta_cuda_stats_t *out)
{
    if (out == NULL || out->size < offsetof(ta_cuda_stats_t, registered_bytes))
        return EINVAL;
    size_t size = out->size;
    _ta_lock(&stats_lock);
    ta_cuda_stats_t copy = cstats;
    _ta_unlock(&stats_lock);
    copy.size = size;
    copy.version = TA_CUDA_STATS_VERSION;
    memcpy(out, &copy, size < sizeof copy ? size : sizeof copy);
    return 0;
}

static void stats_copied(bool to_device, size_t bytes, double seconds, bool direct)
{
    _ta_lock(&stats_lock);
    if (to_device) {
        cstats.h2d_bytes += bytes;
        cstats.h2d_seconds += seconds;
    } else {
        cstats.d2h_bytes += bytes;
        cstats.d2h_seconds += seconds;
    }
    if (direct)
        cstats.direct_copies++;
    else
        cstats.staged_copies++;
    _ta_unlock(&stats_lock);
}

/* ---- registration in chunks ----------------------------------------------------- */

static size_t register_chunk = (size_t)64 << 30;
static size_t staging_size = (size_t)64 << 20;

int ta_cuda_set_register_chunk(size_t bytes)
{
    if (bytes == 0 || bytes % _ta_os_page_size())
        return EINVAL;
    __atomic_store_n(&register_chunk, bytes, __ATOMIC_RELAXED);
    return 0;
}

int ta_cuda_set_staging_size(size_t bytes)
{
    if (bytes == 0 || bytes % _ta_os_page_size())
        return EINVAL;
    __atomic_store_n(&staging_size, bytes, __ATOMIC_RELAXED);
    return 0;
}

static void unregister_range(void *p, size_t n)
{
    size_t chunk = __atomic_load_n(&register_chunk, __ATOMIC_RELAXED);
    uint64_t count = 0;
    for (size_t off = 0; off < n; off += chunk) {
        ta_cuerr_t e = rt.cudaHostUnregister((char *)p + off);
        if (e != TA_CU_SUCCESS) {
            cuda_fail(e);
            _ta_log(true, "tensoralloc: cudaHostUnregister(%p) failed: %s\n",
                    (void *)((char *)p + off), last_message);
        } else {
            count++;
        }
    }
    _ta_lock(&stats_lock);
    cstats.registered_bytes -= n;
    cstats.unregistrations += count;
    _ta_unlock(&stats_lock);
}

/* ---- first touch before registration ------------------------------------------
 * cudaHostRegister faults in and pins every page of the range, one thread
 * inside the driver. Faulting the pages first with MADV_POPULATE_WRITE from
 * several threads moves the zeroing onto every core: PyTorch and RMM
 * report an 8 GiB pinned pool set up 4x faster with 16-thread first touch
 * then register than with cudaHostAlloc; Mooncake PR #3939 found
 * registering faulted pages faster (docs/cuda.md). */

#define PREFAULT_SLICE ((size_t)64 << 20) /* below this, one thread */
#define PREFAULT_THREADS 16

typedef struct {
    char *base;
    size_t size, slice;
    _Atomic size_t next;
} prefault_t;

static void *prefault_main(void *arg)
{
    prefault_t *pf = arg;
    for (;;) {
        size_t off = atomic_fetch_add(&pf->next, pf->slice);
        if (off >= pf->size)
            return NULL;
        size_t len = pf->size - off < pf->slice ? pf->size - off : pf->slice;
        _ta_os_populate_write(pf->base + off, len); /* best effort: register faults the rest */
    }
}

static void prefault(void *p, size_t size)
{
    prefault_t pf = {.base = p, .size = size, .slice = PREFAULT_SLICE};
    int threads = _ta_os_cpu_count();
    if (threads > PREFAULT_THREADS)
        threads = PREFAULT_THREADS;
    if ((size_t)threads > size / PREFAULT_SLICE)
        threads = (int)(size / PREFAULT_SLICE) + 1;
    unsigned long ids[PREFAULT_THREADS];
    int started = 0;
    while (started < threads - 1 && _ta_os_thread_start(prefault_main, &pf, &ids[started]) == 0)
        started++;
    prefault_main(&pf);
    for (int i = 0; i < started; i++)
        _ta_os_thread_join(ids[i]);
}

/* Registers [p, p+n) in chunks; on failure the chunks made are undone. */
static int register_range(void *p, size_t n)
{
    size_t chunk = __atomic_load_n(&register_chunk, __ATOMIC_RELAXED);
    double t0 = _ta_os_now_s();
    size_t off = 0;
    for (; off < n; off += chunk) {
        size_t len = n - off < chunk ? n - off : chunk;
        ta_cuerr_t e = rt.cudaHostRegister((char *)p + off, len, 0);
        if (e != TA_CU_SUCCESS) {
            int rc = cuda_fail(e);
            int saved_code = last_code;
            const char *saved_message = last_message;
            for (size_t back = 0; back < off; back += chunk)
                rt.cudaHostUnregister((char *)p + back);
            last_code = saved_code;
            last_message = saved_message;
            return rc;
        }
    }
    double dt = _ta_os_now_s() - t0;
    _ta_lock(&stats_lock);
    cstats.registered_bytes += n;
    if (cstats.registered_bytes > cstats.registered_peak)
        cstats.registered_peak = cstats.registered_bytes;
    cstats.registrations += (n + chunk - 1) / chunk;
    cstats.register_seconds += dt;
    _ta_unlock(&stats_lock);
    return 0;
}

/* ---- blocks pinned in place ------------------------------------------------------- */

typedef struct pinned_s {
    uintptr_t base;
    size_t capacity;
    struct pinned_s *next;
} pinned_t;

static pinned_t *pinned_list; /* guarded by pinned_mutex */

static bool pinned_forget(uintptr_t base)
{
    pthread_mutex_lock(&pinned_mutex);
    pinned_t **pp = &pinned_list, *found = NULL;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->base == base) {
            found = *pp;
            *pp = found->next;
            break;
        }
    pthread_mutex_unlock(&pinned_mutex);
    ta_free(found);
    return found != NULL;
}

/* Is [p, p+n) inside a block pinned in place? */
static bool pinned_covers(const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;
    bool yes = false;
    pthread_mutex_lock(&pinned_mutex);
    for (pinned_t *q = pinned_list; q && !yes; q = q->next)
        yes = a >= q->base && a + n <= q->base + q->capacity && a + n >= a;
    pthread_mutex_unlock(&pinned_mutex);
    return yes;
}

/* Called by the large path before a pinned block's pages go away. */
static void unpin_hook(uintptr_t base, size_t capacity)
{
    if (pinned_forget(base) && !forked_child)
        unregister_range((void *)base, capacity);
}

int ta_cuda_pin(void *ptr)
{
    int rc = ensure();
    if (rc)
        return rc;
    if (ptr == NULL)
        return EINVAL;
    pinned_t *node = ta_malloc(sizeof *node);
    if (node == NULL)
        return ENOMEM;
    uintptr_t base;
    size_t capacity;
    int m = _ta_large_pin_mark(ptr, true, &base, &capacity);
    if (m != 0) {
        ta_free(node);
        return m < 0 ? TA_ENOTLARGE : TA_EPINNED;
    }
    if ((rc = register_range((void *)base, capacity)) != 0) {
        _ta_large_pin_mark(ptr, false, &base, &capacity);
        ta_free(node);
        return rc;
    }
    *node = (pinned_t){base, capacity, NULL};
    pthread_mutex_lock(&pinned_mutex);
    node->next = pinned_list;
    pinned_list = node;
    pthread_mutex_unlock(&pinned_mutex);
    return 0;
}

int ta_cuda_unpin(void *ptr)
{
    int rc = ensure();
    if (rc)
        return rc;
    uintptr_t base;
    size_t capacity;
    int m = _ta_large_pin_mark(ptr, false, &base, &capacity);
    if (m != 0)
        return m < 0 ? TA_ENOTLARGE : TA_ENOTPINNED;
    unpin_hook(base, capacity);
    return 0;
}

/* ---- the pinned buffer pool -------------------------------------------------------- */

typedef struct buffer_s {
    void *ptr;
    size_t size;
    bool in_use;
    struct buffer_s *next;
} buffer_t;

struct ta_pinned_pool {
    pthread_mutex_t mutex;
    pthread_cond_t released;
    size_t budget;
    size_t registered; /* bytes of buffers, plus ones being made */
    buffer_t *buffers;
};

int ta_pinned_pool_create(size_t budget, ta_pinned_pool_t **out)
{
    if (out == NULL || budget < _ta_os_page_size())
        return EINVAL;
    int rc = ensure();
    if (rc)
        return rc;
    ta_pinned_pool_t *pool = ta_calloc(1, sizeof *pool);
    if (pool == NULL)
        return ENOMEM;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->released, NULL);
    pool->budget = budget - budget % _ta_os_page_size();
    *out = pool;
    return 0;
}

static void buffer_destroy(buffer_t *b)
{
    unregister_range(b->ptr, b->size);
    ta_free(b->ptr);
    ta_free(b);
}

void ta_pinned_pool_destroy(ta_pinned_pool_t *pool)
{
    if (pool == NULL)
        return;
    for (buffer_t *b = pool->buffers, *next; b; b = next) {
        next = b->next;
        buffer_destroy(b);
    }
    pthread_mutex_destroy(&pool->mutex);
    pthread_cond_destroy(&pool->released);
    ta_free(pool);
}

/* Takes n buffers of size bytes at once (all or none, so that two copies
 * never deadlock holding one buffer each). */
/* Under the pool's mutex: takes the best-fitting free buffers into
 * taken[0..*have), and reserves the budget for the n - *have still to be
 * made, dropping free buffers or waiting for releases to get it. */
static void buffers_claim_locked(ta_pinned_pool_t *pool, int n, size_t size, buffer_t **taken,
                                 int *have)
{
    for (;;) {
        for (; *have < n; (*have)++) { /* best fits among free buffers */
            buffer_t *best = NULL;
            for (buffer_t *b = pool->buffers; b; b = b->next)
                if (!b->in_use && b->size >= size && (!best || b->size < best->size))
                    best = b;
            if (!best)
                break;
            best->in_use = true;
            taken[*have] = best;
        }
        if (*have == n || pool->registered + size * (size_t)(n - *have) <= pool->budget)
            break;
        /* make room: drop a free buffer, else wait for a release */
        buffer_t **pp = &pool->buffers, *victim = NULL;
        for (; *pp; pp = &(*pp)->next)
            if (!(*pp)->in_use) {
                victim = *pp;
                *pp = victim->next;
                break;
            }
        if (victim) {
            pool->registered -= victim->size;
            buffer_destroy(victim);
            continue;
        }
        for (int i = 0; i < *have; i++) /* hold nothing while waiting */
            taken[i]->in_use = false;
        *have = 0;
        pthread_cond_wait(&pool->released, &pool->mutex);
    }
    pool->registered += size * (size_t)(n - *have); /* reserved while the buffers are made */
}

/* A new registered buffer of size bytes, or NULL with *rc set. */
static buffer_t *buffer_make(size_t size, int *rc)
{
    buffer_t *b = ta_malloc(sizeof *b);
    void *p = b ? _ta_alloc_mapped(size, _ta_os_page_size()) : NULL;
    uintptr_t base;
    size_t cap;
    /* Marked pinned like a block pinned in place, so that the large path
     * never joins it with neighbours in a VMA the driver may split. */
    if (p != NULL && _ta_large_pin_mark(p, true, &base, &cap) != 0) {
        ta_free(p);
        p = NULL;
    }
    *rc = ENOMEM;
    if (p != NULL) {
        prefault(p, size);
        if ((*rc = register_range(p, size)) == 0) {
            *b = (buffer_t){p, size, true, NULL};
            return b;
        }
        ta_free(p);
    }
    ta_free(b);
    return NULL;
}

/* n buffers of at least size bytes from the pool (all or none: copies take
 * their two at once, so that two copies never deadlock holding one each). */
static int buffers_take(ta_pinned_pool_t *pool, int n, size_t size, void **out)
{
    size = _ta_align_up(size ? size : 1, _ta_os_page_size());
    if (size > SIZE_MAX / 4 || size * (size_t)n > pool->budget)
        return TA_EBUDGET;
    int have = 0, rc = 0;
    buffer_t *taken[2] = {0};
    pthread_mutex_lock(&pool->mutex);
    buffers_claim_locked(pool, n, size, taken, &have);
    pthread_mutex_unlock(&pool->mutex);
    int made = have;
    while (made < n && (taken[made] = buffer_make(size, &rc)) != NULL)
        made++;
    pthread_mutex_lock(&pool->mutex);
    for (int i = have; i < made; i++) { /* new buffers join the pool */
        taken[i]->next = pool->buffers;
        pool->buffers = taken[i];
    }
    if (made < n) { /* give back what this call took or reserved */
        pool->registered -= size * (size_t)(n - made);
        for (int i = 0; i < made; i++)
            taken[i]->in_use = false;
        pthread_cond_broadcast(&pool->released);
    }
    pthread_mutex_unlock(&pool->mutex);
    if (made < n)
        return rc;
    for (int i = 0; i < n; i++)
        out[i] = taken[i]->ptr;
    return 0;
}

int ta_pinned_acquire(ta_pinned_pool_t *pool, size_t size, void **buf)
{
    if (pool == NULL || buf == NULL)
        return EINVAL;
    return buffers_take(pool, 1, size, buf);
}

int ta_pinned_release(ta_pinned_pool_t *pool, void *buf)
{
    if (pool == NULL || buf == NULL)
        return EINVAL;
    int rc = EINVAL;
    pthread_mutex_lock(&pool->mutex);
    for (buffer_t *b = pool->buffers; b; b = b->next)
        if (b->ptr == buf && b->in_use) {
            b->in_use = false;
            rc = 0;
            break;
        }
    pthread_cond_broadcast(&pool->released);
    pthread_mutex_unlock(&pool->mutex);
    return rc;
}

/* ---- device memory ----------------------------------------------------------------- */

int ta_cuda_device_alloc(size_t size, void **dev_ptr)
{
    int rc = ensure();
    if (rc)
        return rc;
    if (dev_ptr == NULL)
        return EINVAL;
    ta_cuerr_t e = rt.cudaMalloc(dev_ptr, size);
    return e == TA_CU_SUCCESS ? 0 : cuda_fail(e);
}

int ta_cuda_device_free(void *dev_ptr)
{
    int rc = ensure();
    if (rc)
        return rc;
    ta_cuerr_t e = rt.cudaFree(dev_ptr);
    return e == TA_CU_SUCCESS ? 0 : cuda_fail(e);
}

int ta_cuda_mem_info(size_t *free_bytes, size_t *total_bytes)
{
    int rc = ensure();
    if (rc)
        return rc;
    if (free_bytes == NULL || total_bytes == NULL)
        return EINVAL;
    ta_cuerr_t e = rt.cudaMemGetInfo(free_bytes, total_bytes);
    return e == TA_CU_SUCCESS ? 0 : cuda_fail(e);
}

/* ---- copies -------------------------------------------------------------------------- */

typedef struct {
    ta_custream_t stream[2];
    ta_cuevent_t event[2];
    void *buf[2];
    size_t chunk;
    int streams, events;
} staging_t;

/* Two staging buffers of chunk bytes (0: the staging size), at most size. */
static int staging_open(ta_pinned_pool_t *pool, size_t size, size_t chunk, staging_t *st)
{
    memset(st, 0, sizeof *st);
    size_t page = _ta_os_page_size();
    if (chunk == 0)
        chunk = __atomic_load_n(&staging_size, __ATOMIC_RELAXED);
    chunk = _ta_align_up(chunk, page);
    if (chunk > _ta_align_up(size, page))
        chunk = _ta_align_up(size, page);
    if (2 * chunk > pool->budget)
        chunk = (pool->budget / 2) / page * page;
    if (chunk == 0)
        return TA_EBUDGET;
    st->chunk = chunk;
    for (; st->streams < 2; st->streams++) {
        ta_cuerr_t e =
            rt.cudaStreamCreateWithFlags(&st->stream[st->streams], TA_CU_STREAM_NONBLOCKING);
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
    }
    for (; st->events < 2; st->events++) {
        ta_cuerr_t e =
            rt.cudaEventCreateWithFlags(&st->event[st->events], TA_CU_EVENT_DISABLE_TIMING);
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
    }
    return buffers_take(pool, 2, chunk, st->buf);
}

static void staging_close(ta_pinned_pool_t *pool, staging_t *st)
{
    for (int i = 0; i < st->streams; i++) {
        rt.cudaStreamSynchronize(st->stream[i]);
        rt.cudaStreamDestroy(st->stream[i]);
    }
    for (int i = 0; i < st->events; i++)
        rt.cudaEventDestroy(st->event[i]);
    for (int i = 0; i < 2; i++)
        if (st->buf[i])
            ta_pinned_release(pool, st->buf[i]);
}

static int copy_direct(void *dst, const void *src, size_t size, TA_CU_KIND kind)
{
    ta_custream_t s;
    ta_cuerr_t e = rt.cudaStreamCreateWithFlags(&s, TA_CU_STREAM_NONBLOCKING);
    if (e != TA_CU_SUCCESS)
        return cuda_fail(e);
    e = rt.cudaMemcpyAsync(dst, src, size, kind, s);
    ta_cuerr_t e2 = rt.cudaStreamSynchronize(s);
    rt.cudaStreamDestroy(s);
    if (e == TA_CU_SUCCESS)
        e = e2;
    return e == TA_CU_SUCCESS ? 0 : cuda_fail(e);
}

/* Host to device through the staging buffers: chunk i goes through buffer
 * i%2, and before a buffer is refilled the DMA that last read it must be
 * done. */
static int pump_to_device(staging_t *st, void *dev_dst, const void *host_src, size_t size)
{
    for (size_t off = 0, i = 0; off < size; i++) {
        int k = (int)(i & 1);
        size_t len = size - off < st->chunk ? size - off : st->chunk;
        ta_cuerr_t e = TA_CU_SUCCESS;
        if (i >= 2)
            e = rt.cudaEventSynchronize(st->event[k]);
        if (e == TA_CU_SUCCESS) {
            memcpy(st->buf[k], (const char *)host_src + off, len);
            e = rt.cudaMemcpyAsync((char *)dev_dst + off, st->buf[k], len, TA_CU_H2D,
                                   st->stream[k]);
        }
        if (e == TA_CU_SUCCESS)
            e = rt.cudaEventRecord(st->event[k], st->stream[k]);
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
        off += len;
    }
    for (int k = 0; k < 2; k++) {
        ta_cuerr_t e = rt.cudaStreamSynchronize(st->stream[k]);
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
    }
    return 0;
}

/* Device to host: the DMA of chunk i+1 runs while the CPU copies chunk i
 * out of its buffer. */
static int issue_to_host(staging_t *st, const void *dev_src, size_t size, size_t i)
{
    size_t off = i * st->chunk, len = size - off < st->chunk ? size - off : st->chunk;
    int k = (int)(i & 1);
    ta_cuerr_t e =
        rt.cudaMemcpyAsync(st->buf[k], (const char *)dev_src + off, len, TA_CU_D2H, st->stream[k]);
    if (e == TA_CU_SUCCESS)
        e = rt.cudaEventRecord(st->event[k], st->stream[k]);
    return e == TA_CU_SUCCESS ? 0 : cuda_fail(e);
}

static int pump_to_host(staging_t *st, void *host_dst, const void *dev_src, size_t size)
{
    size_t chunks = (size + st->chunk - 1) / st->chunk;
    int rc = issue_to_host(st, dev_src, size, 0);
    for (size_t i = 0; rc == 0 && i < chunks; i++) {
        if (i + 1 < chunks && (rc = issue_to_host(st, dev_src, size, i + 1)) != 0)
            break;
        ta_cuerr_t e = rt.cudaEventSynchronize(st->event[i & 1]);
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
        size_t off = i * st->chunk, len = size - off < st->chunk ? size - off : st->chunk;
        memcpy((char *)host_dst + off, st->buf[i & 1], len);
    }
    return rc;
}

/* Both directions: checks, the direct path for pinned host memory, else
 * the staging buffers; statistics. */
static int copy(ta_pinned_pool_t *pool, void *dst, const void *src, size_t size, bool to_device)
{
    int rc = ensure();
    if (rc)
        return rc;
    if (size == 0)
        return 0;
    if (dst == NULL || src == NULL)
        return EINVAL;
    const void *host = to_device ? src : dst;
    double t0 = _ta_os_now_s();
    if (pinned_covers(host, size)) {
        rc = copy_direct(dst, src, size, to_device ? TA_CU_H2D : TA_CU_D2H);
        if (rc == 0)
            stats_copied(to_device, size, _ta_os_now_s() - t0, true);
        return rc;
    }
    if (pool == NULL)
        return EINVAL;
    staging_t st;
    rc = staging_open(pool, size, 0, &st);
    if (rc == 0)
        rc = to_device ? pump_to_device(&st, dst, src, size) : pump_to_host(&st, dst, src, size);
    staging_close(pool, &st);
    if (rc == 0)
        stats_copied(to_device, size, _ta_os_now_s() - t0, false);
    return rc;
}

int ta_cuda_copy_to_device(ta_pinned_pool_t *pool, void *dev_dst, const void *host_src, size_t size)
{
    return copy(pool, dev_dst, host_src, size, true);
}

int ta_cuda_copy_to_host(ta_pinned_pool_t *pool, void *host_dst, const void *dev_src, size_t size)
{
    return copy(pool, host_dst, dev_src, size, false);
}

/* ---- uploads: a stream of bytes to device memory ----------------------------- */

static int by_file_offset(const void *a, const void *b)
{
    uint64_t x = ((const _ta_upload_t *)a)->off, y = ((const _ta_upload_t *)b)->off;
    return x < y ? -1 : x > y;
}

/* Chunk i of the stream goes through buffer i%2: read into it (the other's
 * DMA runs meanwhile), then one async copy per span it covers, the spans
 * walked in file order with a cursor (each span is looked at by the chunks
 * it covers only). */
static int upload_sorted(staging_t *st, const _ta_upload_t *spans, size_t n, uint64_t lo,
                         uint64_t hi, _ta_upload_read_fn read, void *arg)
{
    size_t first = 0;
    for (uint64_t a = lo, i = 0; a < hi; a += st->chunk, i++) {
        int k = (int)(i & 1);
        size_t len = hi - a < st->chunk ? (size_t)(hi - a) : st->chunk;
        ta_cuerr_t e;
        if (i >= 2 && (e = rt.cudaEventSynchronize(st->event[k])) != TA_CU_SUCCESS)
            return cuda_fail(e);
        int rc = read(arg, st->buf[k], a, len);
        if (rc)
            return rc;
        while (first < n && spans[first].off + spans[first].len <= a)
            first++;
        e = TA_CU_SUCCESS;
        for (size_t s = first; s < n && spans[s].off < a + len && e == TA_CU_SUCCESS; s++) {
            uint64_t from = spans[s].off > a ? spans[s].off : a;
            uint64_t end = spans[s].off + spans[s].len, to = end < a + len ? end : a + len;
            if (from < to)
                e = rt.cudaMemcpyAsync((char *)spans[s].dev + (from - spans[s].off),
                                       (char *)st->buf[k] + (from - a), (size_t)(to - from),
                                       TA_CU_H2D, st->stream[k]);
        }
        if (e == TA_CU_SUCCESS)
            e = rt.cudaEventRecord(st->event[k], st->stream[k]);
        if (e != TA_CU_SUCCESS)
            return cuda_fail(e);
    }
    return 0;
}

int _ta_cuda_upload(ta_pinned_pool_t *pool, const _ta_upload_t *spans, size_t n, size_t chunk,
                    _ta_upload_read_fn read, void *arg)
{
    int rc = ensure();
    if (rc)
        return rc;
    _ta_upload_t *sorted = ta_malloc((n ? n : 1) * sizeof *sorted);
    if (!sorted)
        return ENOMEM;
    size_t m = 0;
    uint64_t lo = UINT64_MAX, hi = 0, bytes = 0;
    for (size_t i = 0; i < n; i++)
        if (spans[i].len) {
            sorted[m++] = spans[i];
            bytes += spans[i].len;
            lo = spans[i].off < lo ? spans[i].off : lo;
            hi = spans[i].off + spans[i].len > hi ? spans[i].off + spans[i].len : hi;
        }
    qsort(sorted, m, sizeof *sorted, by_file_offset);
    staging_t st;
    double t0 = _ta_os_now_s();
    if (m && (rc = staging_open(pool, (size_t)(hi - lo), chunk, &st)) == 0)
        rc = upload_sorted(&st, sorted, m, lo, hi, read, arg);
    if (m) {
        for (int k = 0; k < st.streams; k++) {
            ta_cuerr_t e = rt.cudaStreamSynchronize(st.stream[k]);
            if (e != TA_CU_SUCCESS && rc == 0)
                rc = cuda_fail(e);
        }
        staging_close(pool, &st);
    }
    ta_free(sorted);
    if (rc == 0 && m)
        stats_copied(true, (size_t)bytes, _ta_os_now_s() - t0, false);
    return rc;
}
